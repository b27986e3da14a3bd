"""Baselines: exact k and class quotas, and known small cases."""

import numpy as np
import pytest

from clipsel_jax import baselines as bl
from clipsel_jax.selection import class_quotas
from synthetic import noisy_clusters


def clusters(n_per=60, classes=3, dim=8, seed=0):
    x, y, _, _ = noisy_clusters(n_per, classes, dim, flip=0, seed=seed, spread=3)
    return x, y


@pytest.mark.parametrize("name", ["random", "moderate_ds", "herding", "k_center"])
@pytest.mark.parametrize("ratio", [0.1, 0.33, 1.0])
def test_exact_k_and_quotas(name, ratio):
    x, y = clusters()
    y = y[:-7]  # uneven classes
    x = x[:-7]
    idx = bl.FEATURE_BASELINES[name](x, y, 3, ratio, 0)
    assert len(idx) == round(ratio * len(y)) and len(np.unique(idx)) == len(idx)
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(y[idx], minlength=3), class_quotas(y, 3, len(idx)))
    assert np.array_equal(idx, bl.FEATURE_BASELINES[name](x, y, 3, ratio, 0))  # seeded


def test_moderate_ds_keeps_the_middle_band():
    # One class on a line: distances to the median point 0 are |t|; the median distance is 5, kept: |t| near 5.
    # (after L2 normalisation the distance to the median is still monotone in |t|)
    t = np.arange(-10, 11, dtype=np.float64)
    x = np.stack([t, np.full_like(t, 100.0)], 1)
    idx = bl.moderate_ds(x, np.zeros(len(t), int), 1, 4 / 21)
    assert len(idx) == 4 and set(np.abs(t[idx]).tolist()) <= {4.0, 5.0, 6.0}


def test_herding_and_k_center_small_cases():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0], [0.95, 0.05]], np.float64)
    y = np.zeros(5, int)
    for seed in range(5):  # whatever the first point: the two far points and one of the close trio
        far = set(bl.k_center_greedy(x, y, 1, 3 / 5, seed=seed).tolist())
        assert {2, 3} <= far and len(far & {0, 1, 4}) == 1
    # herding's first pick is the point closest to the class mean
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    first = int(np.argmin(((xn - xn.mean(0)) ** 2).sum(1)))
    assert first in bl.herding(x, y, 1, 1 / 5)


def test_ccs_drops_the_hardest_and_spreads_over_strata():
    s = np.linspace(0, 1, 1000)
    idx = bl.ccs(s, 0.3, hard_fraction=0.1, strata=10)
    assert len(idx) == 300 and s[idx].max() <= s[np.argsort(-s)[100]]
    counts = np.histogram(s[idx], bins=10, range=(0, 0.9))[0]
    assert counts.min() >= 25  # spread over the whole remaining range
    assert len(bl.ccs(s, 0.95, hard_fraction=0.1)) == 950  # k wins over the hard cut


def test_confident_learning_removes_flipped_labels():
    pytest.importorskip("cleanlab")
    x, y = clusters(n_per=100, classes=3, dim=6, seed=1)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), 30, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    idx = bl.confident_learning(x, noisy, 3, 0.5, seed=0)
    assert len(idx) == 150
    assert np.isin(idx, flipped).mean() < 0.03  # random would keep ~10% flipped
    np.testing.assert_array_equal(np.bincount(noisy[idx], minlength=3), class_quotas(noisy, 3, 150))


def test_errors():
    x, y = clusters()
    with pytest.raises(ValueError, match="ratio"):
        bl.herding(x, y, 3, 0.0)
    with pytest.raises(ValueError, match="labels must be in"):
        bl.moderate_ds(x, y, 2, 0.5)


def test_dynamics_scores_and_hardest():
    correct = np.array([[0, 1, 1, 0],   # epoch 0   sample 0: learned at 1, forgotten at 3 -> 1 event
                        [1, 0, 1, 0],   # epoch 1   sample 1: forgotten at 1 and 3 -> 2; sample 3: never -> 5
                        [1, 1, 1, 0],   # epoch 2   sample 2: never forgotten -> 0
                        [0, 0, 1, 0]], bool)
    run = {"el2n": np.tile([0.1, 0.9, 0.2, 0.5], (4, 1)), "grand": np.tile([1.0, 3.0, 2.0, 0.0], (4, 1)),
           "correct": correct}
    sc = bl.dynamics_scores([run, run])
    np.testing.assert_array_equal(sc["forgetting"], [2, 4, 0, 10])
    np.testing.assert_allclose(sc["el2n"], [0.1, 0.9, 0.2, 0.5])
    np.testing.assert_array_equal(bl.hardest(sc["el2n"], 0.5), [1, 3])
    np.testing.assert_array_equal(bl.hardest(sc["grand"], 0.25), [1])
    np.testing.assert_array_equal(bl.hardest(sc["forgetting"], 0.5), [1, 3])


def test_herding_matches_the_direct_formula():
    from clipsel_jax.selection import class_quotas

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 16)), rng.integers(0, 3, 300)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = []
    for c, q in enumerate(class_quotas(y, 3, 120)):
        m = np.flatnonzero(y == c)
        mu, total, chosen = xn[m].mean(0), np.zeros(16), np.zeros(len(m), bool)
        for t in range(q):
            gap = (((total + xn[m]) / (t + 1) - mu) ** 2).sum(1)
            gap[chosen] = np.inf
            i = int(np.argmin(gap))
            chosen[i] = True
            total += xn[m][i]
            want.append(m[i])
    np.testing.assert_array_equal(bl.herding(x, y, 3, 0.4), np.sort(want))
