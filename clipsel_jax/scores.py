"""Sample scores of the method (METHOD.md section 2).

Semantic Alignment Score  SAS_i = cos(u_i, v_{y_i}): does the (adapted) image match its label's (adapted) prompt?
Sample Diversity Score    SDS_i = mean Euclidean distance from u_i to its K nearest neighbours of the same class,
                          itself excluded (K = 10% of the class size by default). High = sparse region = diverse.

SDS runs on device, truly per class (the authors' code assumed class-sorted data), with bounded memory: queries in
tiles of `query_tile` rows against keys in tiles of `key_tile` rows, keeping a running top-K; never more than
query_tile x (K + key_tile) distances exist at once. Query tiles are split across the devices of the mesh.
For large classes an option measures distances against a random reference sample of the class instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clipsel_jax import parallel


def l2_normalize(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def semantic_alignment(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """SAS: cosine between each sample's image feature and its label's prompt feature. float32 (N,)."""
    img = l2_normalize(jnp.asarray(image_feats, jnp.float32))
    txt = l2_normalize(jnp.asarray(text_feats, jnp.float32))
    return np.asarray(jnp.sum(img * txt[jnp.asarray(labels)], axis=-1))


@dataclass
class DiversityInfo:
    """What SDS did per class, for the run's metadata."""

    k: np.ndarray  # K used per class
    k_requested: np.ndarray  # K asked for per class (before shrinking to class size - 1)
    reference_size: np.ndarray  # keys per class (class size, or the reference sample size)


def _round_up(n, m):
    return -(-n // m) * m


@partial(jax.jit, static_argnames=("k_max", "query_tile", "key_tile", "mesh"))
def _knn_mean_distance(queries, query_ids, keys, key_ids, k, *, k_max, query_tile, key_tile, mesh):
    """Mean distance from each query row to its k nearest key rows (same id excluded, id -1 = padding).

    queries (Q, D) are split across devices; keys (M, D) are replicated. Q is a multiple of devices * query_tile,
    M of key_tile. k is a traced scalar <= k_max (so one compiled program serves classes of similar size).
    """
    key_sq = jnp.sum(keys * keys, axis=-1)
    key_tiles = (keys.reshape(-1, key_tile, keys.shape[1]), key_sq.reshape(-1, key_tile), key_ids.reshape(-1, key_tile))

    def one_query_tile(args):
        q, qid = args
        q_sq = jnp.sum(q * q, axis=-1)

        def merge(best, tile):
            kt, kt_sq, kid = tile
            d2 = q_sq[:, None] + kt_sq[None, :] - 2 * jnp.dot(q, kt.T, precision="highest")
            dist = jnp.sqrt(jnp.maximum(d2, 0.0))
            excluded = (kid[None, :] == qid[:, None]) | (kid[None, :] < 0)
            neg = jnp.where(excluded, -jnp.inf, -dist)
            best = jax.lax.top_k(jnp.concatenate([best, neg], axis=1), k_max)[0]
            return best, None

        best0 = jnp.full((q.shape[0], k_max), -jnp.inf, jnp.float32)
        best, _ = jax.lax.scan(merge, best0, key_tiles)
        nearest = -best  # ascending distances; entries past k are ignored
        take = jnp.arange(k_max)[None, :] < k
        return jnp.sum(jnp.where(take, nearest, 0.0), axis=1) / k

    def local(q, qid):
        tiles = (q.reshape(-1, query_tile, q.shape[1]), qid.reshape(-1, query_tile))
        return jax.lax.map(one_query_tile, tiles).reshape(-1)

    spec = P(parallel.DATA)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)(
        queries, query_ids)


def sample_diversity(feats: np.ndarray, labels: np.ndarray, num_classes: int, *, k_fraction: float = 0.1,
                     k: int | None = None, reference_threshold: int | None = None, reference_size: int = 4096,
                     seed: int = 0, query_tile: int = 256, key_tile: int = 1024, mesh=None,
                     ) -> tuple[np.ndarray, DiversityInfo]:
    """SDS for every sample, per class. float32 (N,).

    K per class is `k` if given, else round(k_fraction * class size), at least 1; it shrinks to class size - 1 for
    small classes (recorded in the returned info). A class of one sample has no neighbours: its SDS is 0.
    Classes larger than `reference_threshold` (if set) measure distances against `reference_size` randomly chosen
    members of the class (seeded), with K scaled by reference_size / (class size - 1).
    """
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels)
    mesh = mesh or parallel.data_mesh()
    n_dev = mesh.devices.size
    rng = np.random.default_rng(seed)
    out = np.zeros(len(feats), np.float32)
    ks = np.zeros(num_classes, np.int64)
    ks_req = np.zeros(num_classes, np.int64)
    refs = np.zeros(num_classes, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    for c in range(num_classes):
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
            key_idx = np.sort(rng.choice(members, reference_size, replace=False))
            kc = max(1, min(int(round(kc * reference_size / (n_c - 1))), reference_size - 1))
        ks[c], refs[c] = kc, len(key_idx)
        # Shapes are rounded up so that classes of similar size share one compiled program.
        k_max = max(8, 1 << (kc - 1).bit_length())
        q_tile = min(query_tile, max(8, 1 << (n_c - 1).bit_length()))
        n_q = _round_up(n_c, q_tile * n_dev)
        k_tile = min(key_tile, max(8, 1 << (len(key_idx) - 1).bit_length()))
        n_k = _round_up(max(len(key_idx), k_max), k_tile)
        queries = parallel.pad_rows(feats[members], n_q)
        qid = np.full(n_q, -2, np.int64)
        qid[:n_c] = members
        keys = parallel.pad_rows(feats[key_idx], n_k)
        kid = np.full(n_k, -1, np.int64)
        kid[: len(key_idx)] = key_idx
        sds = _knn_mean_distance(jax.device_put(queries, parallel.batch_sharding(mesh)),
                                 jax.device_put(qid.astype(np.int32), parallel.batch_sharding(mesh)),
                                 jnp.asarray(keys), jnp.asarray(kid.astype(np.int32)), jnp.int32(kc),
                                 k_max=k_max, query_tile=q_tile, key_tile=k_tile, mesh=mesh)
        out[members] = np.asarray(sds)[:n_c]
    return out, DiversityInfo(ks, ks_req, refs)


def minmax(x: np.ndarray) -> np.ndarray:
    """Min-max normalisation over the data set (the authors' code does this to both scores)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi - lo < 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)
