"""Sample scores of the method (docs/method.md, "Sample scores").

Semantic Alignment Score  does the (adapted) image match its label's (adapted) prompt? By default the probability
                          that the image picks its label's prompt among all C prompts, softmax_c(t cos(u_i, v_c))
                          at y_i (t: the adapters' learned temperature); alignment="cosine" is the paper's
                          SAS_i = cos(u_i, v_{y_i}). docs/method.md, "Sample scores", says why and shows the evidence.
Sample Diversity Score    SDS_i = mean Euclidean distance from u_i to its K nearest neighbours of the same class,
                          itself excluded (K = 10% of the class size by default). High = sparse region = diverse.

Class typicality         (an option, weight 0 by default) the cosine of a sample's encoder features to the mean
                          direction of its labeled class: low for images unlike their class as a whole, e.g.
                          corrupted ones (docs/method.md, "Typicality").

SDS runs on device, truly per class (the authors' code assumed class-sorted data), with bounded memory: queries in
tiles of rows against the class's keys, at most `max_tile_elements` distances at once per device (never an N x N
or class x class matrix); the mean of the K smallest per row is found exactly without sorting. Query tiles are
split across the devices of the mesh. For large classes an option measures distances against a random reference
sample of the class instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clipsel_jax import checks, parallel

SQRT_2PI = math.sqrt(2 * math.pi)  # the normal density's normaliser: pdf(z) = exp(-z^2 / 2) / sqrt(2 pi)
ALIGNMENTS = ("probability", "cosine")  # the alignment score: the default, and the paper's SAS
DEFAULT_TEMPERATURE = 100.0  # CLIP's logit scale: the probability's temperature for features without adapters


def l2_normalize(x, axis=-1):
    """x / max(|x|, 1e-12), with a zero gradient for an all-zero row (batch padding). jnp.linalg.norm's gradient at
    zero is NaN, which made the adapters NaN whenever a data set smaller than one batch was padded (found by the
    stage-output check); the norm of a zero row is therefore taken of a stand-in and replaced by 0 (the
    double-where idiom), and every other row's value is the same as before, bit for bit."""
    zero = jnp.all(x == 0, axis=axis, keepdims=True)
    norm = jnp.where(zero, 0.0, jnp.linalg.norm(jnp.where(zero, 1.0, x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def _local_devices(mesh) -> list:
    """Devices to spread independent row chunks over: the mesh's, in a single-process run; else the default one
    (every process computes every row, so the result is the same everywhere)."""
    mesh = mesh or parallel.data_mesh()
    return list(mesh.devices.flat) if jax.process_count() == 1 else [jax.local_devices()[0]]


def _rows_by_chunks(fn, rows: tuple, extra: tuple, out, chunk: int, mesh):
    """out[i:i+chunk] = fn(*(r[i:i+chunk] for r in rows), *extra) for every chunk, the chunks dealt round-robin to
    the devices and run asynchronously (a few in flight): host and device memory stay bounded for any N, and every
    device works. `out` may be a tuple of arrays, fn then returning one result per array. Floating rows go as
    float32 (float16 storage is cast a chunk at a time)."""
    devices = _local_devices(mesh)
    extra_on = {d: [jax.device_put(e, d) for e in extra] for d in devices}
    outs = out if isinstance(out, tuple) else (out,)

    def put(r, sl, d):
        part = np.asarray(r[sl])
        return jax.device_put(part.astype(np.float32, copy=False) if part.dtype.kind == "f" else part, d)

    def store(i0, y):
        for o, part in zip(outs, y if isinstance(out, tuple) else (y,)):
            o[i0:i0 + len(part)] = np.asarray(part)

    pending = []
    for j, i in enumerate(range(0, len(outs[0]), chunk)):
        d = devices[j % len(devices)]
        pending.append((i, fn(*(put(r, slice(i, i + chunk), d) for r in rows), *extra_on[d])))
        while len(pending) > 2 * len(devices):
            store(*pending.pop(0))
    for i0, y in pending:
        store(i0, y)
    return out


def semantic_alignment(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                       chunk: int = checks.ROW_CHUNK, mesh=None) -> np.ndarray:
    """SAS: cosine between each sample's image feature and its label's prompt feature. float32 (N,)."""
    txt = l2_normalize(jnp.asarray(text_feats, jnp.float32))
    out = np.empty(len(image_feats), np.float32)
    return _rows_by_chunks(_cosine_to_label, (image_feats, np.asarray(labels)), (txt,), out, chunk, mesh)


@jax.jit
def _cosine_to_label(img, labels, txt):
    return jnp.sum(l2_normalize(img) * txt[labels], axis=-1)


def class_typicality(feats: np.ndarray, labels: np.ndarray, num_classes: int, chunk: int = checks.ROW_CHUNK,
                     mesh=None) -> np.ndarray:
    """Cosine of each sample's features to the mean of its labeled class's unit features, float32 (N,): 1 for a
    sample pointing where its class points on average, lower for an atypical one. Two passes over the rows in chunks
    (class sums, then the cosines), so memory stays bounded at any N; an all-zero row scores 0."""
    sums = np.zeros((num_classes, feats.shape[1]), np.float64)
    labels = np.asarray(labels)
    for i in range(0, len(feats), chunk):  # sort + reduceat: linear in the rows whatever C is (np.add.at is ~10x slower)
        f = np.asarray(feats[i:i + chunk], np.float32)
        u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        order = np.argsort(labels[i:i + chunk], kind="stable")
        sorted_labels = labels[i:i + chunk][order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        sums[sorted_labels[starts]] += np.add.reduceat(u[order], starts, axis=0)
    return semantic_alignment(feats, sums.astype(np.float32), labels, chunk, mesh)  # the sums are normalised there


def preferred_class(image_feats: np.ndarray, text_feats: np.ndarray, chunk: int = checks.ROW_CHUNK,
                    mesh=None) -> np.ndarray:
    """The class whose prompt each image is closest to (cosine), int64 (N,). Where it differs from the label,
    the sample is a candidate mislabel: the report shows both."""
    txt = l2_normalize(jnp.asarray(text_feats, jnp.float32))
    return _rows_by_chunks(_closest_prompt, (image_feats,), (txt,), np.empty(len(image_feats), np.int64), chunk,
                           mesh)


@jax.jit
def _closest_prompt(img, txt):
    return jnp.argmax(l2_normalize(img) @ txt.T, axis=-1)


def alignment_and_preferred_class(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                                  chunk: int = checks.ROW_CHUNK, mesh=None,
                                  temperature: float = DEFAULT_TEMPERATURE) -> tuple[np.ndarray, ...]:
    """(cosine SAS, label probability, preferred class, its probability) in one pass over the features (each pass
    reads all N rows; at 1.28M x 512 a pass costs seconds on a CPU). The probability is softmax_c(temperature *
    cos(u, v_c)) at the label: float32 (N,), like the cosine; the preferred class int64 (N,), the arg-max class, and
    its probability float32 (N,) (how confidently the image picks it: what relabelling goes by)."""
    temperature = checks.number("temperature", temperature, lo=0, lo_open=True)
    txt = l2_normalize(jnp.asarray(text_feats, jnp.float32))
    n = len(image_feats)
    out = (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.int64), np.empty(n, np.float32))
    return _rows_by_chunks(_alignment_and_closest, (image_feats, np.asarray(labels)),
                           (txt, np.float32(temperature)), out, chunk, mesh)


@jax.jit
def _alignment_and_closest(img, labels, txt, temperature):
    # One product with every (unit) prompt gives all three: the cosine is the label's column over the image's norm,
    # the probability a softmax of the scaled cosines, the preferred class the argmax (a positive per-row scale
    # changes no argmax). No normalised copy of the chunk.
    dots = jnp.dot(img, txt.T, precision="highest")
    cos = dots / jnp.maximum(jnp.linalg.norm(img, axis=-1), 1e-12)[:, None]
    own = jnp.take_along_axis(cos, labels[:, None], axis=1)[:, 0]
    p = jax.nn.softmax(temperature * cos, axis=-1)
    prob = jnp.take_along_axis(p, labels[:, None], axis=1)[:, 0]
    closest = jnp.argmax(dots, axis=-1)
    return own, prob, closest, jnp.take_along_axis(p, closest[:, None], axis=1)[:, 0]


@dataclass
class DiversityInfo:
    """What SDS did per class, for the run's metadata."""

    k: np.ndarray  # K used per class
    k_requested: np.ndarray  # K asked for per class (before shrinking to class size - 1)
    reference_size: np.ndarray  # keys per class (class size, or the reference sample size)


def _k_smallest_bracket(values, k, max_steps):
    """Per row of non-negative float32 values (R, M), thresholds that isolate the k smallest; k traced.

    Sought: a threshold t with exactly k values <= t (any t between the k-th and the (k+1)-th smallest; the mean
    is then the sum over v <= t), found by a safeguarded search on the row's count c(t) = #{v <= t}, one
    vectorised compare-and-count pass per step:
    - first a guess from a normal fit of the row (mean, variance: distances to many keys are close to normal),
    - then Newton/secant steps on c from the last point, aimed at rank k - 1/2, falling back to interpolation
      inside the bracket [lo, hi] (c(lo) < k <= c(hi)) when they leave it,
    - and a bisection of the bracket's int32 bit patterns (non-negative float32 order is their order) whenever
      a step has not halved the bracket (see `stalled`): from step 8 on at least every other step halves it, and
      it starts at most 2^31 bit patterns wide, so a row is done within 72 steps; max_steps is a backstop.
    A row is done when c(hi) = k, when c(lo) = k - 1 (the k-th is the next value above lo), or when lo and hi
    are adjacent floats (ties at the k-th value). The result is the same set of values summed whatever the path,
    and each row's path depends on its own values only, so it does not depend on the tiling.
    Returns lo, hi (int32 bit patterns), c(lo), c(hi) and the number of passes taken.
    """
    as_bits = partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    as_float = partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    bits = as_bits(values)
    finite = values < jnp.inf
    k = jnp.asarray(k, jnp.float32)
    # Accepted thresholds lie between the (k-1)-th and the (k+1)-th smallest, around the k-th: count ~ k - 1/2.
    target = k - 0.5

    def count(t):  # float32 sum of 0/1 (exact below 2^24 columns) vectorises better than an integer count
        return jnp.sum(jnp.where(bits <= t[:, None], 1.0, 0.0), axis=1)

    fv = jnp.where(finite, values, 0.0)
    n = jnp.sum(jnp.where(finite, 1.0, 0.0), axis=1)
    mean = jnp.sum(fv, axis=1) / n
    std = jnp.sqrt(jnp.maximum(jnp.sum(fv * fv, axis=1) / n - mean * mean, 0.0))
    z = jax.scipy.special.ndtri(jnp.clip(target / n, 1e-6, 1 - 1e-6))
    guess = mean + std * z
    slope = n * jnp.exp(-0.5 * z * z) / (std * SQRT_2PI)  # d count / dt of the normal fit at the guess
    lo = as_bits(jnp.min(values, axis=1)) - 1  # c(lo) = 0 (bits -1: below every non-negative float)
    hi = as_bits(jnp.max(fv, axis=1))  # c(hi) = n >= k

    def done(lo, hi, c_lo, c_hi):
        return (c_hi <= k) | (c_lo == k - 1) | (hi - lo <= 1)

    def step(s):
        lo, hi, c_lo, c_hi, t_prev, c_prev, slope, width_prev, it = s
        newton = as_bits(jnp.maximum(jnp.where(it == 0, guess, as_float(t_prev) + (target - c_prev) / slope), 0.0))
        lo_v, hi_v = as_float(jnp.maximum(lo, 0)), as_float(hi)
        inside = as_bits(lo_v + (hi_v - lo_v) * ((target - c_lo) / (c_hi - c_lo)))
        t = jnp.where((newton > lo) & (newton < hi), newton, inside)
        # Bisect where the last step did not halve the bracket, once it is closed on both sides (halving towards
        # the row's extreme wastes a pass on near-normal rows), and on every row from step 8 on.
        two_sided = (c_lo > 0) & (c_hi < n)
        stalled = (it >= 2) & (hi - lo > width_prev // 2) & (two_sided | (it >= 8))
        t = jnp.where(stalled, lo + (hi - lo) // 2, t)
        t = jnp.clip(t, lo + 1, hi - 1)
        c = count(t)
        active = ~done(lo, hi, c_lo, c_hi)
        up, down = active & (c >= k), active & (c < k)
        dt = as_float(t) - as_float(t_prev)
        secant = (c - c_prev) / jnp.where(dt == 0, 1.0, dt)
        slope = jnp.where(active & (it > 0) & (secant > 0), secant, slope)
        return (jnp.where(down, t, lo), jnp.where(up, t, hi), jnp.where(down, c, c_lo), jnp.where(up, c, c_hi),
                jnp.where(active, t, t_prev), jnp.where(active, c, c_prev), slope, hi - lo, it + 1)

    def go_on(s):
        return jnp.any(~done(*s[:4])) & (s[-1] < max_steps)

    zero = jnp.zeros_like(n)
    lo, hi, c_lo, c_hi, *_, steps = jax.lax.while_loop(
        go_on, step, (lo, hi, zero, n, as_bits(guess), zero, slope, hi - lo, 0))
    return lo, hi, c_lo, c_hi, steps


def mean_of_k_smallest(values, k, transform=None, *, max_steps=96):
    """Row-wise mean of transform(v) over the k smallest entries v of non-negative values (R, M); k traced.

    Exact, without sorting (see `_k_smallest_bracket`). `transform` must be monotone (e.g. sqrt of squared
    distances: the search runs on the squares). Rows need at least k finite values (+inf marks excluded entries).
    """
    transform = transform or (lambda v: v)
    lo, hi, c_lo, c_hi, _ = _k_smallest_bracket(values, k, max_steps)
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    k = jnp.asarray(k, jnp.float32)
    # Either exactly k values are <= hi (their sum), or the k - c(lo) missing ones all equal the next value above lo.
    exact = c_hi <= k
    summed = jnp.sum(jnp.where(bits <= jnp.where(exact, hi, lo)[:, None], transform(values), 0.0), axis=1)
    above_lo = jnp.min(jnp.where(bits > lo[:, None], values, jnp.inf), axis=1)
    return jnp.where(exact, summed, summed + (k - c_lo) * transform(above_lo)) / k


@partial(jax.jit, static_argnames=("query_tile", "mesh"))
def _knn_mean_distance(queries, query_ids, keys, key_ids, k, *, query_tile, mesh):
    """Mean distance from each query row to its k nearest key rows (same id excluded; id -1 = padding key).

    queries (Q, D) are split across devices, keys (M, D) replicated; each device walks its queries in tiles of
    query_tile rows, so at most query_tile x M distances exist at once per device. Q is a multiple of
    devices * query_tile. k is traced, so classes of similar size share one compiled program.
    """
    key_sq = jnp.sum(keys * keys, axis=-1)
    # The search runs on row blocks of 8: XLA runs a block's passes on one core, vectorised (~5-6 G values/s here,
    # where a 256-row tile's passes split over two threads reach ~2 G/s per thread), and a block's search stops
    # with its own slowest row rather than the tile's. One device per core keeps every core on blocks.
    block = math.gcd(query_tile, 8)

    def one_block(args):
        dots, q_sq, qid = args
        d2 = q_sq[:, None] + key_sq[None, :] - 2 * dots
        excluded = (key_ids[None, :] == qid[:, None]) | (key_ids[None, :] < 0)
        # The k nearest by squared distance are the k nearest; sqrt only where it is summed.
        return mean_of_k_smallest(jnp.where(excluded, jnp.inf, jnp.maximum(d2, 0.0)), k, jnp.sqrt)

    def one_query_tile(args):
        q, qid = args
        dots = jnp.dot(q, keys.T, precision="highest")
        blocks = (dots.reshape(-1, block, dots.shape[1]), jnp.sum(q * q, axis=-1).reshape(-1, block),
                  qid.reshape(-1, block))
        return jax.lax.map(one_block, blocks).reshape(-1)

    def local(q, qid):
        tiles = (q.reshape(-1, query_tile, q.shape[1]), qid.reshape(-1, query_tile))
        return jax.lax.map(one_query_tile, tiles).reshape(-1)

    spec = P(parallel.DATA)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)(
        queries, query_ids)


def _gather_rows(feats: np.ndarray, idx: np.ndarray, rows: int) -> np.ndarray:
    """float32 (rows, D): feats[idx] then zero rows, written in one copy (a class of 128k x 512 is 256 MB)."""
    out = np.empty((rows, feats.shape[1]), np.float32)
    step = checks.ROW_CHUNK  # in slices: a float16 source is cast a slice at a time
    for i in range(0, len(idx), step):
        out[i:i + step][: len(idx[i:i + step])] = feats[idx[i:i + step]]
    out[len(idx):] = 0
    return out


@dataclass(frozen=True)
class ScoresConfig:
    """The scoring stage's settings, each default written here once (the functions below and the CLI read them):
    the alignment score, and SDS's neighbours."""
    alignment: str | None = None  # "probability" | "cosine" (the paper's SAS); None: the method's (probability)
    temperature: float | None = None  # the probability's; None: the adapters' learned one (100 without adapters)
    k_fraction: float = 0.1  # K = round(k_fraction * class size): the paper's 10%
    k_neighbors: int | None = None  # a fixed K for every class instead
    reference_threshold: int | None = None  # classes larger than this measure SDS against a random reference ...
    reference_size: int = 4096  # ... of this many members (memory for huge classes)
    typicality: float | None = None  # weight of the class typicality in c; None: the method's (0: off)

    def __post_init__(self):
        if self.alignment is not None and self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {self.alignment!r}")
        object.__setattr__(self, "temperature",
                           checks.optional_number("temperature", self.temperature, lo=0, lo_open=True))
        checked = diversity_settings(self.k_neighbors, self.k_fraction, self.reference_threshold,
                                     self.reference_size)
        for name, value in zip(("k_neighbors", "k_fraction", "reference_threshold", "reference_size"), checked):
            object.__setattr__(self, name, value)  # frozen: numpy scalars become Python numbers
        object.__setattr__(self, "typicality", checks.optional_number("typicality", self.typicality, lo=0))


DiversityConfig = ScoresConfig  # its name before the alignment settings joined it


def diversity_settings(k, k_fraction, reference_threshold, reference_size) -> tuple:
    """SDS's settings, checked (K = 0 would average no distances: NaN; a reference of 0 samples: all zero)."""
    return (checks.optional_number("k_neighbors", k, lo=1, integer=True),
            checks.number("k_fraction", k_fraction, lo=0, hi=1, lo_open=True),
            checks.optional_number("reference_threshold", reference_threshold, lo=1, integer=True),
            checks.number("reference_size", reference_size, lo=2, integer=True))


def sample_diversity(feats: np.ndarray, labels: np.ndarray, num_classes: int, *,
                     k_fraction: float = DiversityConfig.k_fraction, k: int | None = None,
                     reference_threshold: int | None = None, reference_size: int = DiversityConfig.reference_size,
                     seed: int = 0, query_tile: int = 256, max_tile_elements: int = 1 << 24, mesh=None,
                     ) -> tuple[np.ndarray, DiversityInfo]:
    """SDS for every sample, per class. float32 (N,).

    K per class is `k` if given, else round(k_fraction * class size), at least 1; it shrinks to class size - 1 for
    small classes (recorded in the returned info). A class of one sample has no neighbours: its SDS is 0.
    Classes larger than `reference_threshold` (if set) measure distances against `reference_size` randomly chosen
    members of the class (seeded), with K scaled by reference_size / (class size - 1).
    """
    k, k_fraction, reference_threshold, reference_size = diversity_settings(k, k_fraction, reference_threshold,
                                                                            reference_size)
    feats = np.asarray(feats)  # cast per class below: a float16 (N, D) array is never copied whole
    labels = np.asarray(labels)
    mesh = mesh or parallel.data_mesh()
    n_dev = mesh.devices.size
    # Classes of at most 1 / (2 x devices) of the data run whole, each on one device, spread over the devices
    # (largest first, to the least loaded; async dispatch keeps them all busy): no padding of a class's queries
    # to whole tiles on every device, which costs up to a fifth for classes of ~1k. Larger classes, and every class
    # in a multi-process run (each process must compute them all), split their queries over the mesh instead.
    spread = n_dev > 1 and jax.process_count() == 1
    one_device_meshes = {d: jax.sharding.Mesh(np.array([d]), (parallel.DATA,)) for d in mesh.devices.flat}
    load = dict.fromkeys(one_device_meshes, 0.0)
    pending = []  # (members, n_c, result) not yet copied back
    out = np.zeros(len(feats), np.float32)
    ks = np.zeros(num_classes, np.int64)
    ks_req = np.zeros(num_classes, np.int64)
    refs = np.zeros(num_classes, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    sizes = np.diff(bounds)
    for c in np.argsort(-sizes, kind="stable"):  # largest first: the spread stays balanced
        members = order[bounds[c]:bounds[c + 1]]
        n_c = len(members)
        want = int(k) if k is not None else max(1, int(round(k_fraction * n_c)))
        ks_req[c] = want
        if n_c < 2:
            refs[c] = n_c
            continue
        key_idx = members
        kc = min(want, n_c - 1)
        if reference_threshold is not None and n_c > reference_threshold and reference_size < n_c:
            # Seeded per class: the sample does not depend on the order the classes are computed in.
            key_idx = np.sort(np.random.default_rng([seed, int(c)]).choice(members, reference_size, replace=False))
            kc = max(1, min(int(round(kc * reference_size / (n_c - 1))), reference_size - 1))
        ks[c], refs[c] = kc, len(key_idx)
        # Key counts are rounded up (to a power of two below 256, else a multiple of 256) so that classes of
        # similar size share one compiled program; the query tile shrinks for large key sets so that a tile of
        # distances stays under max_tile_elements.
        n_k = (max(8, 1 << (len(key_idx) - 1).bit_length()) if len(key_idx) < 256
               else parallel.round_up(len(key_idx), 256))
        q_tile = min(query_tile, max(8, 1 << (n_c - 1).bit_length()),
                     max(1, 1 << (max_tile_elements // n_k).bit_length() - 1))
        if spread and n_c * 2 * n_dev <= len(feats):
            device = min(load, key=load.get)
            load[device] += n_c * n_k
            run_mesh, n_q = one_device_meshes[device], parallel.round_up(n_c, q_tile)
        else:
            run_mesh, n_q = mesh, parallel.round_up(n_c, q_tile * n_dev)
        queries = _gather_rows(feats, members, n_q)
        qid = np.full(n_q, -2, np.int32)
        qid[:n_c] = members
        # A class measured against itself has its queries as keys: reuse their rows rather than gather them again.
        keys = queries[:n_k] if key_idx is members and n_k <= n_q else _gather_rows(feats, key_idx, n_k)
        kid = np.full(n_k, -1, np.int32)
        kid[: len(key_idx)] = key_idx
        put = partial(jax.device_put, device=parallel.batch_sharding(run_mesh))
        sds = _knn_mean_distance(put(queries), put(qid), jax.device_put(keys, parallel.replicated(run_mesh)),
                                 jax.device_put(kid, parallel.replicated(run_mesh)), jnp.int32(kc),
                                 query_tile=q_tile, mesh=run_mesh)
        pending.append((members, n_c, sds))
        while len(pending) > 2 * n_dev:  # bounded: at most a few classes' inputs in flight
            done_members, done_n, done_sds = pending.pop(0)
            out[done_members] = parallel.to_host(done_sds)[:done_n]
    for done_members, done_n, done_sds in pending:
        out[done_members] = parallel.to_host(done_sds)[:done_n]
    return out, DiversityInfo(ks, ks_req, refs)


def minmax(x: np.ndarray) -> np.ndarray:
    """Min-max normalisation over the data set (the authors' code does this to both scores)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi - lo < 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The scoring stage


def combined_score(sas, sds, alpha, typicality=None, weight=0.0):
    """c = SAS / mean(SAS) + alpha * SDS / mean(SDS) [+ weight * T / mean(T), T the class typicality]: the loss's
    per-sample reward (scores min-max normalised). A score that is constant over the data set (normalised to all
    zeros) contributes nothing."""
    def term(x):
        m = jnp.mean(x)
        return jnp.where(m > 0, x / jnp.where(m > 0, m, 1.0), 0.0)

    c = term(sas) + alpha * term(sds)
    return c if typicality is None or weight == 0 else c + weight * term(typicality)


@dataclass
class Scores:
    """The scoring stage's output, one entry per sample (N,) unless said."""

    sas: np.ndarray  # float32: the alignment score in c (higher = better aligned): `alignment`'s
    cosine: np.ndarray  # float32: cosine of the image and its label's prompt (the paper's SAS)
    sds: np.ndarray  # float32: mean distance to the K nearest same-class neighbours (higher = more diverse)
    combined: np.ndarray  # float32: c = SAS / mean(SAS) + alpha * SDS / mean(SDS) [+ w T / mean(T)], min-max normalised
    preferred_class: np.ndarray  # int64: the class whose prompt the image is closest to
    diversity: DiversityInfo  # K and reference size per class (C,)
    alignment: str = "probability"  # which score `sas` holds
    temperature: float = DEFAULT_TEMPERATURE  # the probability's temperature
    preferred_confidence: np.ndarray | None = None  # float32: the probability (at `temperature`) of preferred_class
    typicality: np.ndarray | None = None  # float32: the class typicality T, where its weight is > 0


def score_samples(u, v, labels, alpha: float, *, alignment: str = ALIGNMENTS[0],
                  temperature: float = DEFAULT_TEMPERATURE, k: int | None = None,
                  k_fraction: float = DiversityConfig.k_fraction, reference_threshold: int | None = None,
                  reference_size: int = DiversityConfig.reference_size, seed: int = 0,
                  typicality: float = 0.0, typicality_feats=None, mesh=None) -> Scores:
    """SAS, SDS, the combined score and the preferred class of aligned features.

    u: float (N, D) image features; v: float (C, D) class prompt features in the same space (adapted, or CLIP's
    own); labels: int (N,) in 0..C-1; alpha: the diversity weight (a number; see pipeline.alpha_value for the
    rules); alignment: "probability" (softmax over the C prompts of temperature * cosine, at the label) or
    "cosine" (the paper's SAS); temperature: the probability's (the adapters' learned logit scale in the pipeline);
    k, k_fraction, reference_threshold, reference_size: SDS's neighbours (see sample_diversity); seed: the
    reference samples of large classes; typicality: the weight w >= 0 of the class typicality T in c (0: not
    computed), measured on `typicality_feats` (N, Di) (None: on u; the pipeline passes the encoder's own features).
    Raises StageOutputError if any score is NaN or inf."""
    typicality = checks.number("typicality", typicality, lo=0)
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    cosine, prob, preferred, confidence = alignment_and_preferred_class(u, v, labels, mesh=mesh,
                                                                        temperature=temperature)
    sas = prob if alignment == "probability" else cosine
    sds, div = sample_diversity(u, labels, len(v), k_fraction=k_fraction, k=k,
                                reference_threshold=reference_threshold, reference_size=reference_size, seed=seed,
                                mesh=mesh)
    typ = None
    if typicality > 0:
        feats = u if typicality_feats is None else typicality_feats
        if len(feats) != len(u):
            raise ValueError(f"typicality_feats must have one row per sample ({len(u)}), got {len(feats)}")
        typ = class_typicality(feats, labels, len(v), mesh=mesh)
    c = np.asarray(combined_score(jnp.asarray(minmax(sas)), jnp.asarray(minmax(sds)), alpha,
                                  None if typ is None else jnp.asarray(minmax(typ)), typicality))
    for name, x in (("SAS", sas), ("SDS", sds), ("the combined score", c)):
        checks.finite_output("scoring", name, x, "features too large for float32 distances (rescale the embeddings), "
                                                 "or NaN/inf in features given without adapters")
    return Scores(sas.astype(np.float32), cosine.astype(np.float32), sds.astype(np.float32), c.astype(np.float32),
                  preferred, div, alignment, float(temperature), confidence, typ)
