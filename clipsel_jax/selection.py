"""Selection optimisation (docs/method.md, "Selection optimisation"): a keep-mask learned with a straight-through
estimator.

One real parameter d_i per sample; selection probability s_i = sigmoid(T d_i); hard mask b_i = [s_i > 0.5] whose
gradient passes straight through to s_i. Loss (the authors' code, scores min-max normalised):

    L = - mean(s * SAS / mean(SAS)) - alpha * mean(s * SDS / mean(SDS)) + beta * |sum(b) - k| / N

optimised with SGD + momentum inside one jitted ``lax.while_loop`` until |sum(b) - k| < N / 2000 (their stopping
rule) or max_steps. The subset is then exactly k samples ranked by d (globally, or per class in class-balanced mode).

Every d_i starts at the same value and its gradient is T s_i (1 - s_i) (beta sign(sum(b) - k) - c_i) / N: its
path depends on c_i and on one number shared by all, the sign of the count term. d stays ordered as c is (checked
on every run, see below), so the mask is always a top segment of the c order, and what the loop needs of the count
(its sign, and whether it is within the tolerance of k) is decided by the samples around the k-th rank of c: while
the band's last sample is selected the count is above the window (sign +1), while its first is not the count is
below it (sign -1), otherwise it is exactly known. The default loop ("band") therefore runs the optimiser on that
band only (N / 1000 + 256 samples): the same steps, the same stop, the same d for the band's samples and the same
selection as the loop over all N ("full"; tested equal, bit for bit), with a thousandth of the work. Where its
premise fails (d out of c's order in the band, or d_0 <= 0) the full loop runs instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipsel_jax import checks, parallel
from clipsel_jax.ckpt import Checkpointer
from clipsel_jax.workdir import RunDir, resume_state


@jax.custom_vjp
def straight_through_mask(s):
    """Forward: the hard mask 1[s > 0.5]. Backward: the identity, as if the mask were s itself."""
    return (s > 0.5).astype(s.dtype)


def _ste_fwd(s):
    return straight_through_mask(s), None


def _ste_bwd(_, g):
    return (g,)


straight_through_mask.defvjp(_ste_fwd, _ste_bwd)


@dataclass(frozen=True)
class SelectionConfig:
    temperature: float = 100.0  # T in sigmoid(T d)
    init: float = 0.01  # d_0: every sample starts selected
    # weight of diversity: "code" (0.1, the authors' code), "paper" (= ratio), a number; None: the method's
    # (pipeline.METHODS: "code" for clipsel, "paper" for the paper's method)
    alpha: float | str | None = None
    beta: float = 2.0  # weight of the count constraint
    lr: float = 1e-3
    momentum: float = 0.9
    max_steps: int = 100_000
    tolerance: float | None = None  # stop when |sum(b) - k| < tolerance; default N / 2000 (the authors' rule)
    loop: str = "band"  # "band": the optimiser on the samples around rank k of c (exact; see above); "full": all N
    band_margin: int = 128  # samples the band extends past the tolerance window on either side

    def alpha_for(self, ratio: float) -> float:
        """The diversity weight alpha at this keep ratio."""
        if self.alpha in ("code", None):
            return 0.1
        return float(ratio) if self.alpha == "paper" else self.alpha

    def tolerance_for(self, n: int) -> float:
        """The stopping window: the loop stops when |sum(b) - k| < this (default N / 2000, the authors' rule)."""
        return self.tolerance if self.tolerance is not None else n / 2000

    def __post_init__(self):
        if self.loop not in ("band", "full"):
            raise ValueError(f"SelectionConfig.loop must be 'band' or 'full', got {self.loop!r}")
        if isinstance(self.alpha, str) and self.alpha not in ("code", "paper"):
            raise ValueError(f"alpha must be 'code' (0.1), 'paper' (= ratio) or a number >= 0, got {self.alpha!r}")
        # band_margin >= 0: the band must cover the tolerance window around k (see decisive_band).
        bounds = {"temperature": dict(lo=0, lo_open=True), "init": {}, "beta": dict(lo=0),
                  "lr": dict(lo=0, lo_open=True), "momentum": dict(lo=0, hi=1, hi_open=True),
                  "max_steps": dict(lo=0, integer=True), "band_margin": dict(lo=0, integer=True)}
        for name, b in bounds.items():  # frozen: checked values are written back (numpy scalars become Python's)
            object.__setattr__(self, name, checks.number(f"SelectionConfig.{name}", getattr(self, name), **b))
        if not isinstance(self.alpha, str) and self.alpha is not None:
            object.__setattr__(self, "alpha", checks.number("alpha", self.alpha, lo=0))
        object.__setattr__(self, "tolerance", checks.optional_number("SelectionConfig.tolerance", self.tolerance,
                                                                     lo=0))


def selection_loss(d, c, valid, k, n, beta, temperature):
    """The loss of the authors' code, with the two score terms folded into c = scores.combined_score(...):
    -mean(s * SAS/mean(SAS)) - alpha * mean(s * SDS/mean(SDS)) == -mean(s * c).

    `valid` masks padding (arrays are padded to a multiple of the device count); padded entries get no gradient and
    are not counted, so the trajectory is the same on any number of devices.
    """
    s = jax.nn.sigmoid(temperature * d)
    count = jnp.sum(straight_through_mask(s) * valid)
    return -jnp.sum(s * c * valid) / n + beta * jnp.abs(count - k) / n


def selection_loss_given_count(d, c, valid, k, n, beta, temperature, count):
    """selection_loss with the mask's count sum(b) already known (it is computed with the previous update).

    |sum(b) - k| is replaced by sign(count - k) * sum(b): same value up to a constant, exactly the same gradient
    (tested), and no reduction over the data before the gradient, so one optimiser step reads the data once.
    """
    s = jax.nn.sigmoid(temperature * d)
    count_term = jnp.sign(count - k) * jnp.sum(straight_through_mask(s) * valid)
    return -jnp.sum(s * c * valid) / n + beta * count_term / n


def _optimizer(cfg: SelectionConfig):
    return optax.sgd(cfg.lr, momentum=cfg.momentum)


class LoopState(NamedTuple):
    """The optimiser loop's carry (and what a checkpoint holds)."""

    step: jax.Array  # int32: steps taken
    d: jax.Array  # float32 (m,): one parameter per sample optimised
    opt_state: optax.OptState  # SGD momentum
    count: jax.Array  # float32: sum(b) of the current mask (for the band loop: with the samples above/below it)


def init_state(c, cfg: SelectionConfig, n: int) -> LoopState:
    """Every sample starts at d = init (init > 0: selected, so the count starts at n)."""
    d0 = jnp.full_like(c, cfg.init)
    return LoopState(jnp.int32(0), d0, _optimizer(cfg).init(d0), jnp.float32(n if cfg.init > 0 else 0))


def loop_done(step, count, k, cfg: SelectionConfig, n: int) -> bool:
    """The loop's stopping test, on the host (the while_loop's cond, negated)."""
    return step >= cfg.max_steps or abs(count - k) < cfg.tolerance_for(n)


@partial(jax.jit, static_argnames=("cfg", "n", "n_valid", "band_size"))
def optimise_chunk(state, c, k, stop_step, cfg: SelectionConfig, n: int, n_valid: int | None = None,
                   band_size: int | None = None, above=0.0, below=0.0):
    """Advance the optimiser until the mask's count is within tolerance of k (the authors' rule), or until
    step == stop_step (chunks allow checkpoints in between; one chunk when stop_step = max_steps).

    n is the data set's size (the loss's 1/N). c holds n_valid real entries (default n; the rest is padding to a
    multiple of the device count) and may be sharded over 'data'. With band_size: c[:band_size] is the decisive
    band, sorted by descending c, with `above` samples ranked above it (selected exactly while the band's first
    sample is) and `below` samples ranked under it (selected exactly while the band's last sample is); entries
    past band_size are passengers: optimised, not counted.
    """
    n_valid = n if n_valid is None else n_valid
    tol = cfg.tolerance_for(n)
    tx = _optimizer(cfg)
    grad_fn = jax.grad(selection_loss_given_count)

    def count_of(d, valid):
        if band_size is None:
            return jnp.sum((d > 0) * valid)  # s = sigmoid(T d) > 0.5  <=>  d > 0
        counted = jax.lax.iota(jnp.int32, c.shape[0]) < band_size
        return above * (d[0] > 0) + jnp.sum((d > 0) * counted) + below * (d[band_size - 1] > 0)

    def cond(state: LoopState):
        return (state.step < stop_step) & (jnp.abs(state.count - k) >= tol)

    def body(state: LoopState):
        # Built inside the body from an iota, the padding mask fuses into the step instead of being read from memory.
        valid = (jax.lax.iota(jnp.int32, c.shape[0]) < n_valid).astype(c.dtype)
        g = grad_fn(state.d, c, valid, k, n, cfg.beta, cfg.temperature, state.count)
        updates, opt_state = tx.update(g, state.opt_state, state.d)
        d = optax.apply_updates(state.d, updates)
        return LoopState(state.step + 1, d, opt_state, count_of(d, valid))

    return jax.lax.while_loop(cond, body, LoopState(*state))


def optimise_keep_scores(c, k: int, cfg: SelectionConfig = SelectionConfig()):
    """The full loop (every sample's d) in one jitted while_loop: returns (d, steps, count at stop)."""
    n = c.shape[0]
    state = optimise_chunk(init_state(c, cfg, n), c, jnp.float32(k), jnp.int32(cfg.max_steps), cfg, n)
    return state.d, state.step, state.count


def decisive_band(c: np.ndarray, k: int, cfg: SelectionConfig):
    """(order, lo, hi): `order` ranks the samples by descending c (ties: lower index first, as rank_and_take);
    order[lo:hi] is the band whose optimisation decides the loop (see the module docstring). None where the band
    loop does not apply (d_0 <= 0: all samples start unselected, and the band is not known to start selected)."""
    n = len(c)
    if cfg.init <= 0:
        return None
    tol = cfg.tolerance_for(n)
    order = np.lexsort((np.arange(n), -c))
    # lo <= k - tol: while the band's first sample is unselected the count (<= lo) is below the window.
    lo = max(0, int(np.floor(k - tol)) - cfg.band_margin)
    # hi >= k + tol: while the band's last sample is selected the count (>= hi) is above the window.
    hi = min(n, int(np.ceil(k + tol)) + cfg.band_margin)
    return order, lo, hi


def band_with_passengers(c_band, passengers, k: int, steps: int, cfg: SelectionConfig, n: int, above: int,
                         below: int):
    """Rerun the band loop for `steps` steps with `passengers` (scores of samples outside the band) optimised
    alongside, not counted: the band's path, hence the count's sign at every step, is unchanged, and each
    passenger's d is what the full loop gives it. Returns (d of the band, d of the passengers)."""
    c = jnp.asarray(np.concatenate([c_band, passengers]).astype(np.float32))
    m = len(c_band)
    state = optimise_chunk(init_state(c, cfg, n), c, jnp.float32(k), jnp.int32(steps), cfg, n, c.shape[0], m,
                           jnp.float32(above), jnp.float32(below))
    d = np.asarray(state.d)
    return d[:m], d[m:]


def selected_prefix(c_side: np.ndarray, d_of, probes: int = 4096) -> int | None:
    """How many of c_side (descending c) are selected at the end: a prefix, found from evenly spaced probes and then
    the samples between the last selected probe and the next. d_of(scores) -> their final d. None if d is out of
    c's order among the samples simulated."""
    m = len(c_side)
    if m == 0:
        return 0
    at = np.unique(np.linspace(0, m - 1, min(m, probes)).round().astype(np.int64))
    d = d_of(c_side[at])
    if np.any(np.diff(d) > 0):
        return None
    if d[-1] > 0:
        return m
    first_out = int(np.argmax(d <= 0))
    start = int(at[first_out - 1]) + 1 if first_out > 0 else 0
    between = d_of(c_side[start:int(at[first_out])]) if at[first_out] > start else np.zeros(0, np.float32)
    if np.any(np.diff(between) > 0) or (first_out > 0 and len(between) and between[0] > d[first_out - 1]):
        return None
    return start + int(np.sum(between > 0))


def band_failure(d_band: np.ndarray) -> str | None:
    """Why the band loop's result cannot stand (None: it holds): d out of the order of c inside the band."""
    if np.any(np.diff(d_band) > 0):
        return "d out of the order of c inside the band"
    return None


def ranking_key(d_band: np.ndarray, order: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """A key that ranks like the full loop's d: the band's own d; +inf above the band, -inf below it (there d is
    ordered as c, which rank_and_take's tiebreak then applies)."""
    key = np.empty(len(order), np.float32)
    key[order[:lo]] = np.inf
    key[order[lo:hi]] = d_band
    key[order[hi:]] = -np.inf
    return key


def class_quotas(labels: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """Per-class keep counts round(ratio * n_c), adjusted by largest remainder so they sum to exactly k."""
    sizes = np.bincount(labels, minlength=num_classes)
    exact = sizes * (k / max(1, sizes.sum()))
    quota = np.minimum(np.floor(exact).astype(np.int64), sizes)
    rest = k - quota.sum()
    # Hand the remaining slots to the largest fractional parts (ties: lower class id), never past a class's size.
    order = np.lexsort((np.arange(num_classes), -(exact - quota)))
    while rest > 0:
        for c in order:
            if rest == 0:
                break
            if quota[c] < sizes[c]:
                quota[c] += 1
                rest -= 1
    return quota


def rank_and_take(d: np.ndarray, tiebreak: np.ndarray, k: int, labels: np.ndarray | None = None,
                  num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of exactly k samples with the largest d (ties: larger tiebreak, then lower index);
    per class by quota when labels are given."""
    n = len(d)
    order = np.lexsort((np.arange(n), -tiebreak, -d))  # best first
    if labels is None:
        return np.sort(order[:k])
    quota = class_quotas(labels, num_classes, k)
    ranked_labels = labels[order]
    by_class = np.argsort(ranked_labels, kind="stable")  # grouped by class, rank order kept inside a class
    starts = np.searchsorted(ranked_labels[by_class], np.arange(num_classes))
    rank_in_class = np.empty(n, np.int64)
    rank_in_class[by_class] = np.arange(n) - starts[ranked_labels[by_class]]
    return np.sort(order[rank_in_class < quota[ranked_labels]])


# ---------------------------------------------------------------------------------------------------------------
# The loop, resumable: the band loop where its premise holds, else the loop over every sample


class Optimised(NamedTuple):
    """What the selection loop ends with."""

    key: np.ndarray  # float32 (N,): ranks the samples as the full loop's final d does (rank_and_take takes the top)
    steps: int  # optimiser steps taken
    count: float  # sum(b) at the stop
    how: dict  # {"loop": "band", "band": [lo, hi]} or {"loop": "full", "why": the reason the band loop did not run};
    #            "resumed_from": the step a checkpoint of an interrupted run was resumed at (None: from the start)


class LoopStopped(Exception):
    """Raised by `optimise(stop_after_chunks=N)` after N chunks of this call, their checkpoint saved: a
    time-boxed job (or a test) stops at a known step, and the same call again resumes from there."""

    def __init__(self, step: int):
        super().__init__(f"selection loop stopped after step {step} (stop_after_chunks); its checkpoint is kept: "
                         "run the same selection again to resume")
        self.step = step


def _fingerprint(c: np.ndarray, k: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(c, np.float32).tobytes() + str(k).encode()).hexdigest()[:16]


def optimise(c: np.ndarray, k: int, cfg: SelectionConfig = SelectionConfig(), mesh=None,
             workdir: str | Path | None = None, chunk_steps: int = 20_000,
             stop_after_chunks: int | None = None) -> Optimised:
    """Optimise the keep-mask for the combined scores c (float32 (N,)) and target count k.

    cfg.loop == "band" (default) runs the optimiser on the decisive band around rank k (exact: the same steps, count
    and selection as the full loop; see the module docstring), falling back to the loop over every sample where its
    premise fails; "full" always runs that. mesh: devices for the full loop (N split over them). workdir: the loop's
    state is checkpointed (orbax) every `chunk_steps` steps under workdir/selection_band or workdir/selection, and a
    rerun with the same c, k and cfg resumes from it; state from other inputs is removed with a warning (the rule of
    clipsel_jax.workdir), never resumed. stop_after_chunks: after this many chunks of this call (checkpointed; needs
    workdir), raise LoopStopped instead of finishing.
    """
    if stop_after_chunks is not None:
        stop_after_chunks = checks.number("stop_after_chunks", stop_after_chunks, lo=1, integer=True)
        if workdir is None:
            raise ValueError("stop_after_chunks needs a workdir: the loop stops to be resumed from its checkpoint")
    budget = {"chunks": stop_after_chunks}  # shared by the band loop and a full loop it falls back to
    c = np.asarray(c, np.float32)
    n = len(c)
    mesh = mesh or parallel.data_mesh()
    workdir = Path(workdir) if workdir is not None else None
    settings = {**dataclasses.asdict(cfg), "fingerprint": _fingerprint(c, k)}
    band = decisive_band(c, k, cfg) if cfg.loop == "band" else None
    if band is not None:
        order, lo, hi = band
        c_band = c[order[lo:hi]]
        d_band, steps, count, resumed = _run_loop(c_band, k, cfg, n, mesh,
                                                  workdir and RunDir(workdir).selection_loop(True), chunk_steps,
                                                  {**settings, "band": [lo, hi]}, band=(lo, n - hi),
                                                  budget=budget)
        fallback = band_failure(d_band)
        if fallback is None and (d_band[-1] > 0 or d_band[0] <= 0):
            # Stopped at max_steps with the count outside the band's range: count the selected samples past the
            # band's end (all of the band selected) or before its start (none of it selected).
            def d_of(passengers):
                d_rerun, d_pass = band_with_passengers(c_band, passengers, k, steps, cfg, n, lo, n - hi)
                if not np.array_equal(d_rerun, d_band):
                    raise RuntimeError("the band loop did not repeat itself bit for bit; rerun with loop='full' "
                                       "(--loop full) and report this")
                return d_pass

            past = selected_prefix(c[order[hi:]], d_of) if d_band[-1] > 0 else selected_prefix(c[order[:lo]], d_of)
            fallback = "d out of the order of c outside the band" if past is None else None
            count = hi + (past or 0) if d_band[-1] > 0 else (past or 0)
        if fallback is None:
            return Optimised(ranking_key(d_band, order, lo, hi), steps, float(count),
                             {"loop": "band", "band": [lo, hi], "resumed_from": resumed})
    else:
        fallback = "loop='full'" if cfg.loop == "full" else "init <= 0: the band loop does not apply"
    d, steps, count, resumed = _run_loop(c, k, cfg, n, mesh, workdir and RunDir(workdir).selection_loop(False),
                                         chunk_steps, settings, budget=budget)
    return Optimised(d, steps, count, {"loop": "full", "why": fallback, "resumed_from": resumed})


def _run_loop(c: np.ndarray, k: int, cfg: SelectionConfig, n: int, mesh, ckpt_dir: Path | None, chunk_steps: int,
              settings: dict, band: tuple[int, int] | None = None, budget: dict | None = None):
    """Run optimise_chunk in chunks of steps over c (all n samples, or the band with `band` = (samples above it,
    samples below it)), checkpointing the LoopState after each chunk; a rerun resumes from the checkpoint.
    budget["chunks"] (None: no limit) counts down the chunks left before LoopStopped.
    All n samples are split over the mesh; the band (a few thousand) is replicated. Returns (d, steps, count, the
    step resumed at or None)."""
    m = len(c)
    m_pad = m if band is not None else parallel.round_up(m, mesh.devices.size)
    sharding = parallel.replicated(mesh) if band is not None else parallel.batch_sharding(mesh)
    c_pad = np.zeros(m_pad, np.float32)  # entries past m are padding, masked inside the loss
    c_pad[:m] = c
    c_dev = jax.device_put(c_pad, sharding)
    state = init_state(c_dev, cfg, n)
    ckpt = None
    resumed = None
    rep = parallel.replicated(mesh)

    def unpadded(state: LoopState) -> dict:  # checkpoints hold the m real samples: a run resumes on any device count
        return jax.tree.map(lambda a: jax.device_put(a[:m], rep) if np.ndim(a) else a, state._asdict())

    if ckpt_dir is not None:
        ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
        if resume_state(ckpt, settings, "selection loop state") is not None:
            restored, _ = ckpt.restore(like=unpadded(state))
            state = LoopState(**jax.tree.map(
                lambda a: jax.device_put(np.pad(np.asarray(a), (0, m_pad - m)), sharding) if np.ndim(a)
                else jax.device_put(np.asarray(a), rep), restored))
            resumed = int(state.step)
    above, below = band or (0, 0)
    while not loop_done(int(state.step), float(state.count), k, cfg, n):
        stop = jnp.int32(min(cfg.max_steps, int(state.step) + chunk_steps))
        state = optimise_chunk(state, c_dev, jnp.float32(k), stop, cfg, n, m, m if band else None,
                               jnp.float32(above), jnp.float32(below))
        if ckpt is not None:
            ckpt.save(int(state.step), unpadded(state), {"settings": settings, "step": int(state.step)})
        if budget and budget["chunks"] is not None:
            budget["chunks"] -= 1
            if budget["chunks"] <= 0 and not loop_done(int(state.step), float(state.count), k, cfg, n):
                ckpt.close()
                raise LoopStopped(int(state.step))
    if ckpt is not None:
        ckpt.close()
    return parallel.to_host(state.d)[:m], int(state.step), float(state.count), resumed
