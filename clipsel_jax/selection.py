"""Selection optimisation (METHOD.md section 3): a keep-mask learned with a straight-through estimator.

One real parameter d_i per sample; selection probability s_i = sigmoid(T d_i); hard mask b_i = [s_i > 0.5] whose
gradient passes straight through to s_i. Loss (the authors' code, scores min-max normalised):

    L = - mean(s * SAS / mean(SAS)) - alpha * mean(s * SDS / mean(SDS)) + beta * |sum(b) - k| / N

optimised with SGD + momentum inside one jitted ``lax.while_loop`` until |sum(b) - k| < N / 2000 (their stopping
rule) or max_steps. The subset is then exactly k samples ranked by d (globally, or per class in class-balanced mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
    alpha: float = 0.1  # weight of diversity; the paper's text uses alpha = ratio ("paper" rule)
    beta: float = 2.0  # weight of the count constraint
    lr: float = 1e-3
    momentum: float = 0.9
    max_steps: int = 100_000
    tolerance: float | None = None  # stop when |sum(b) - k| < tolerance; default N / 2000 (the authors' rule)


def combined_score(sas, sds, alpha):
    """c = SAS / mean(SAS) + alpha * SDS / mean(SDS): the loss's per-sample reward (scores min-max normalised).
    A score that is constant over the data set (normalised to all zeros) contributes nothing."""
    def term(x):
        m = jnp.mean(x)
        return jnp.where(m > 0, x / jnp.where(m > 0, m, 1.0), 0.0)

    return term(sas) + alpha * term(sds)


def selection_loss(d, c, valid, k, n, beta, temperature):
    """The loss of the authors' code, with the two score terms folded into c = combined_score(...):
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


def _count(d, valid):
    return jnp.sum((d > 0) * valid)  # s = sigmoid(T d) > 0.5  <=>  d > 0


def init_state(c, cfg: SelectionConfig, n: int):
    """(step, d, optimiser state, count of the current mask): every sample starts at d = init (selected)."""
    d0 = jnp.full_like(c, cfg.init)
    return jnp.int32(0), d0, _optimizer(cfg).init(d0), jnp.float32(n if cfg.init > 0 else 0)


@partial(jax.jit, static_argnames=("cfg", "n"))
def optimise_chunk(state, c, k, stop_step, cfg: SelectionConfig, n: int):
    """Advance the optimiser until the mask's count is within tolerance of k (the authors' rule), or until
    step == stop_step (chunks allow checkpoints in between; one chunk when stop_step = max_steps).
    c may be sharded over 'data'; entries past n are padding.
    """
    tol = cfg.tolerance if cfg.tolerance is not None else n / 2000
    tx = _optimizer(cfg)
    grad_fn = jax.grad(selection_loss_given_count)

    def cond(state):
        step, _, _, count = state
        return (step < stop_step) & (jnp.abs(count - k) >= tol)

    def body(state):
        step, d, opt_state, count = state
        # Built inside the body from an iota, the padding mask fuses into the step instead of being read from memory.
        valid = (jax.lax.iota(jnp.int32, c.shape[0]) < n).astype(c.dtype)
        g = grad_fn(d, c, valid, k, n, cfg.beta, cfg.temperature, count)
        updates, opt_state = tx.update(g, opt_state, d)
        d = optax.apply_updates(d, updates)
        return step + 1, d, opt_state, _count(d, valid)

    return jax.lax.while_loop(cond, body, state)


def optimise_keep_scores(c, k: int, cfg: SelectionConfig = SelectionConfig()):
    """The whole optimisation in one jitted while_loop: returns (d, steps, count at stop)."""
    n = c.shape[0]
    step, d, _, count = optimise_chunk(init_state(c, cfg, n), c, jnp.float32(k), jnp.int32(cfg.max_steps), cfg, n)
    return d, step, count


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
