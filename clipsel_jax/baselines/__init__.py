"""Data-selection baselines on the same embeddings as the method, for fair comparisons.

Every function returns the sorted indices of exactly k = round(ratio * N) samples. Class-wise methods keep each
class's quota round(ratio * n_c) (adjusted to sum to k, as the method's class-balanced mode does):

- ``random_subset``: uniform within each class.
- ``moderate_ds``: Moderate-DS (Xia et al., ICLR 2023): distance of each sample to its class centre; keep the
  samples whose distance is closest to the class's median distance (neither the easiest nor the hardest).
- ``herding``: greedy choice whose running mean stays closest to the class mean (Welling 2009, as in DeepCore).
- ``k_center_greedy``: farthest-point traversal per class (Sener & Savarese 2018), from a seeded first point.
- ``ccs``: Coverage-centric coreset selection (Zheng et al., ICLR 2023) over any importance score (higher =
  harder): drop the hardest `hard_fraction`, cut the score range into `strata` equal-width strata and spread the
  budget over them, smallest stratum first.
- ``confident_learning``: cleanlab's ``find_label_issues`` on 5-fold cross-validated predictions of a logistic
  regression probe on the embeddings; the flagged samples are removed, then random sampling per class.
- ``dynamics_scores`` + ``hardest``: EL2N, GraNd (Paul et al., NeurIPS 2021) and Forgetting (Toneva et al., ICLR
  2019) from short runs of the downstream trainer (``train_classifier(..., track_dynamics=True)``); as in their
  papers the hardest (highest-scoring) samples are kept, over the whole data set.
"""

from __future__ import annotations

import numpy as np

from clipsel_jax.selection import class_quotas


def _setup(labels, num_classes: int, ratio: float):
    y = np.asarray(labels, np.int64)
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    k = int(round(ratio * len(y)))
    if k == 0:
        raise ValueError(f"ratio {ratio} of {len(y)} samples keeps nothing")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    return y, k, class_quotas(y, num_classes, k)


def _normalized(features) -> np.ndarray:
    x = np.asarray(features, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def random_subset(labels, num_classes: int, ratio: float, seed: int = 0, candidates=None) -> np.ndarray:
    """Uniform within each class (among `candidates` first, when given, then the rest)."""
    y, k, quota = _setup(labels, num_classes, ratio)
    rng = np.random.default_rng(seed)
    preferred = np.ones(len(y), bool) if candidates is None else np.isin(np.arange(len(y)), candidates)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        order = np.concatenate([rng.permutation(members[preferred[members]]),
                                rng.permutation(members[~preferred[members]])])
        keep.append(order[:quota[c]])
    return np.sort(np.concatenate(keep))


def moderate_ds_scores(features, labels, num_classes: int) -> np.ndarray:
    """Moderate-DS's preference per sample (higher = kept first): minus the gap between the sample's distance to
    its class centre (the median embedding) and the class's median distance."""
    y, x = np.asarray(labels, np.int64), _normalized(features)
    score = np.zeros(len(y))
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if len(members):
            dist = np.linalg.norm(x[members] - np.median(x[members], axis=0), axis=1)
            score[members] = -np.abs(dist - np.median(dist))
    return score


def moderate_ds(features, labels, num_classes: int, ratio: float, seed: int = 0) -> np.ndarray:
    y, k, quota = _setup(labels, num_classes, ratio)
    score = moderate_ds_scores(features, y, num_classes)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        order = np.lexsort((members, -score[members]))
        keep.append(members[order[:quota[c]]])
    return np.sort(np.concatenate(keep))


def herding(features, labels, num_classes: int, ratio: float, seed: int = 0) -> np.ndarray:
    y, k, quota = _setup(labels, num_classes, ratio)
    x = _normalized(features)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        xc = x[members]
        mu = xc.mean(0)
        sq, to_mu = (xc * xc).sum(1), xc @ mu
        dots = np.zeros(len(members), np.float64)  # x_i . (sum of the chosen), kept up to date by one matvec a step
        total_sq = total_mu = 0.0
        chosen = np.zeros(len(members), bool)
        picks = []
        for t in range(quota[c]):
            # || (total + x_i) / (t + 1) - mu ||^2 up to a constant, for every candidate
            m = t + 1
            gap = (total_sq + 2 * dots + sq) / m**2 - 2 * (total_mu + to_mu) / m
            gap[chosen] = np.inf
            i = int(np.argmin(gap))
            chosen[i] = True
            total_sq += 2 * dots[i] + sq[i]
            total_mu += to_mu[i]
            dots += xc @ xc[i]
            picks.append(members[i])
        keep.append(np.asarray(picks, np.int64))
    return np.sort(np.concatenate(keep))


def k_center_greedy(features, labels, num_classes: int, ratio: float, seed: int = 0) -> np.ndarray:
    y, k, quota = _setup(labels, num_classes, ratio)
    x = _normalized(features)
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        if quota[c] == 0:
            continue
        xc = x[members]
        sq = (xc ** 2).sum(1)
        first = int(rng.integers(len(members)))
        picks = [first]
        mind = sq + sq[first] - 2 * xc @ xc[first]
        for _ in range(quota[c] - 1):
            mind[picks[-1]] = -np.inf
            i = int(np.argmax(mind))
            picks.append(i)
            mind = np.minimum(mind, sq + sq[i] - 2 * xc @ xc[i])
        keep.append(members[np.asarray(picks)])
    return np.sort(np.concatenate(keep))


def ccs(importance, ratio: float, seed: int = 0, hard_fraction: float = 0.1, strata: int = 50) -> np.ndarray:
    """Over all samples (CCS does not balance classes); `importance`: higher = harder (e.g. EL2N, or 1 - SAS)."""
    s = np.asarray(importance, np.float64)
    n = len(s)
    k = int(round(ratio * n))
    if not 0 < ratio <= 1 or k == 0:
        raise ValueError(f"ratio must keep at least one of {n} samples, got {ratio}")
    rng = np.random.default_rng(seed)
    order = np.argsort(-s, kind="stable")
    n_drop = min(int(round(hard_fraction * n)), n - k)  # never drop so many that k cannot be met
    pool = order[n_drop:]
    lo, hi = s[pool].min(), s[pool].max()
    bins = np.minimum(((s[pool] - lo) / max(hi - lo, 1e-12) * strata).astype(int), strata - 1)
    groups = [pool[bins == b] for b in range(strata)]
    groups = sorted((g for g in groups if len(g)), key=len)
    keep, budget = [], k
    for j, g in enumerate(groups):
        take = min(len(g), budget // (len(groups) - j))
        keep.append(rng.choice(g, take, replace=False))
        budget -= take
    chosen = np.concatenate(keep)
    if budget:  # rounding left a few slots: fill them at random from the pool
        rest = np.setdiff1d(pool, chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, budget, replace=False)])
    return np.sort(chosen)


def probe_predictions(features, labels, num_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities (N, C) of a logistic-regression probe on the normalised embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    x, y = _normalized(features), np.asarray(labels, np.int64)
    probe = LogisticRegression(C=10.0, max_iter=500)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(probe, x, y, cv=cv, method="predict_proba")
    out = np.zeros((len(y), num_classes))
    out[:, np.unique(y)] = probs
    return out


def confident_learning(features, labels, num_classes: int, ratio: float, seed: int = 0,
                       pred_probs: np.ndarray | None = None) -> np.ndarray:
    """Remove cleanlab's label issues, then sample each class's quota at random from what is left (flagged
    samples only fill a class that has too few unflagged ones)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as e:
        raise ImportError("the confident-learning baseline needs cleanlab: pip install 'clipsel_jax[bench]'") from e
    y, _, _ = _setup(labels, num_classes, ratio)
    probs = probe_predictions(features, y, num_classes, seed=seed) if pred_probs is None else pred_probs
    # In this process (n_jobs=1): cleanlab's default forks workers, and forking a process that runs JAX's threads
    # can deadlock (Python warns of it); the per-class pruning is cheap beside the probe.
    issues = find_label_issues(y, probs, n_jobs=1)
    return random_subset(y, num_classes, ratio, seed, candidates=np.flatnonzero(~issues))


def dynamics_scores(runs: list[dict], epoch: int = -1) -> dict[str, np.ndarray]:
    """EL2N and GraNd at `epoch` averaged over runs (seeds), and Forgetting: the number of times a sample went from
    correct to wrong between consecutive epochs, summed over runs; a sample never learned in a run counts as
    forgotten more often than any other (epochs + 1), as Toneva et al. rank unlearned examples first."""
    el2n = np.mean([r["el2n"][epoch] for r in runs], axis=0)
    grand = np.mean([r["grand"][epoch] for r in runs], axis=0)
    forgetting = np.zeros_like(el2n)
    for r in runs:
        c = np.asarray(r["correct"], bool)
        events = (c[:-1] & ~c[1:]).sum(0).astype(np.float64)
        forgetting += np.where(c.any(0), events, c.shape[0] + 1)
    return {"el2n": el2n, "grand": grand, "forgetting": forgetting}


def hardest(scores, ratio: float, seed: int = 0) -> np.ndarray:
    """The round(ratio * N) highest scores (ties broken at random, seeded)."""
    s = np.asarray(scores, np.float64)
    k = int(round(ratio * len(s)))
    if not 0 < ratio <= 1 or k == 0:
        raise ValueError(f"ratio must keep at least one of {len(s)} samples, got {ratio}")
    tiebreak = np.random.default_rng(seed).random(len(s))
    return np.sort(np.lexsort((tiebreak, -s))[:k])


FEATURE_BASELINES = {
    "random": lambda f, y, c, r, s: random_subset(y, c, r, s),
    "moderate_ds": moderate_ds,
    "herding": herding,
    "k_center": k_center_greedy,
    "confident_learning": confident_learning,
}
