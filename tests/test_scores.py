"""SAS and SDS against brute-force numpy; SDS truly per class (unsorted data), tiled, sharded, sampled."""

import jax
import numpy as np
import pytest

from clipsel_jax import parallel
from clipsel_jax.scores import minmax, sample_diversity, semantic_alignment
from synthetic import noisy_clusters


def brute_sds(x, y, num_classes, frac=0.1, k=None):
    out = np.zeros(len(x))
    for c in range(num_classes):
        m = np.nonzero(y == c)[0]
        if len(m) < 2:
            continue
        d = np.sqrt(((x[m][:, None].astype(np.float64) - x[m][None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        kc = min(k if k else max(1, int(round(frac * len(m)))), len(m) - 1)
        out[m] = np.sort(d, 1)[:, :kc].mean(1)
    return out


@pytest.fixture(scope="module")
def data():
    # shuffled order, unequal class sizes: not N/C contiguous blocks
    x, y, _, _ = noisy_clusters(sizes=[190, 260, 240, 310, 220, 280], classes=6, flip=0, dim=24, spread=1,
                                shuffle=True)
    return x, y, 6


def test_sas_is_cosine_with_own_label_prompt():
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(50, 8)), rng.normal(size=(4, 8))
    y = rng.integers(0, 4, 50)
    ref = (x * t[y]).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(t[y], axis=1)
    np.testing.assert_allclose(semantic_alignment(x, t, y), ref, atol=1e-5)


def test_sas_and_preferred_class_in_one_pass():
    """The pipeline's single pass (several chunks, so results from every chunk land in every output) gives
    semantic_alignment's cosine, the softmax probability of the label at the temperature, and the arg-max class."""
    from clipsel_jax.scores import alignment_and_preferred_class, preferred_class

    rng = np.random.default_rng(2)
    x, t = rng.normal(size=(203, 8)).astype(np.float16), rng.normal(size=(5, 8))
    y = rng.integers(0, 5, 203)
    sas, prob, pref, conf = alignment_and_preferred_class(x, t, y, chunk=64, temperature=7.0)
    np.testing.assert_allclose(sas, semantic_alignment(x, t, y), atol=1e-6)
    cos = (x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)) @ (
        t / np.linalg.norm(t, axis=1, keepdims=True)).T
    e = np.exp(7.0 * cos)
    np.testing.assert_allclose(prob, (e / e.sum(1, keepdims=True))[np.arange(203), y], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pref, cos.argmax(1))
    np.testing.assert_allclose(conf, (e / e.sum(1, keepdims=True)).max(1), rtol=1e-5, atol=1e-6)
    assert np.all(conf >= prob - 1e-7) and np.any(conf > prob + 0.01)  # the label's own probability is at most it
    np.testing.assert_array_equal(pref, preferred_class(x, t, chunk=50))
    assert sas.dtype == prob.dtype == conf.dtype == np.float32 and pref.dtype == np.int64
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            alignment_and_preferred_class(x, t, y, temperature=bad)


@pytest.mark.parametrize("tiles", [(8, 1 << 24), (64, 1 << 10), (256, 1 << 24)])
def test_sds_matches_brute_force_per_class(data, tiles):
    x, y, classes = data
    sds, info = sample_diversity(x, y, classes, query_tile=tiles[0], max_tile_elements=tiles[1])
    np.testing.assert_allclose(sds, brute_sds(x, y, classes), rtol=1e-4, atol=1e-4)
    sizes = np.bincount(y, minlength=classes)
    np.testing.assert_array_equal(info.k, np.maximum(1, np.round(0.1 * sizes)).astype(int))


def test_mean_of_k_smallest_is_exact():
    import jax.numpy as jnp

    from clipsel_jax.scores import mean_of_k_smallest

    rng = np.random.default_rng(5)
    d = rng.random((7, 300)).astype(np.float32) * 10
    d[:, :20] = 1.5  # ties straddling the k-th value
    d[2, 5:50] = np.inf  # excluded entries
    d[3] = 0.0
    d[4] = 7.25  # every value tied
    d[5] = rng.choice([0.5, 40.0], 300) * (1 + 1e-3 * rng.random(300))  # two modes far apart
    d[6] = np.exp(rng.uniform(-60, 60, 300))  # spread over 50 orders of magnitude
    for k in (1, 2, 19, 20, 21, 100, 250):
        ref = np.sort(d, axis=1)[:, :k].mean(1)
        np.testing.assert_allclose(mean_of_k_smallest(jnp.asarray(d), jnp.int32(k)), ref, rtol=1e-6)
        np.testing.assert_allclose(mean_of_k_smallest(jnp.asarray(d), jnp.int32(k), jnp.sqrt),
                                   np.sqrt(np.sort(d, axis=1)[:, :k]).mean(1), rtol=1e-6)
    # k = every finite value of row 2
    np.testing.assert_allclose(mean_of_k_smallest(jnp.asarray(d[2:3]), jnp.int32(255)), d[2, np.isfinite(d[2])].mean(),
                               rtol=1e-6)


def _distance_rows(rng, rows, keys, dim, modes=1):
    """Squared distances from `rows` points to `keys` points, unit vectors around `modes` centres."""
    centres = rng.standard_normal((modes, dim))
    def points(m):
        x = centres[rng.integers(0, modes, m)] * (modes > 1) + rng.standard_normal((m, dim)) * (0.1 if modes > 1 else 1)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q, key = points(rows), points(keys)
    return np.maximum((q * q).sum(1)[:, None] + (key * key).sum(1)[None] - 2 * q @ key.T, 0).astype(np.float32)


def test_k_smallest_search_passes_and_path_independence():
    """Near-normal distance rows take a handful of passes; hard rows stay within the bisection bound; each row's
    result is bit for bit the same alone as in a block (so the tiling and device count cannot change SDS)."""
    import jax
    import jax.numpy as jnp

    from clipsel_jax.scores import _k_smallest_bracket, mean_of_k_smallest

    rng = np.random.default_rng(0)
    search = jax.jit(lambda v, k: _k_smallest_bracket(v, k, 96)[4])
    near_normal = _distance_rows(rng, 64, 4096, 512)
    for k in (41, 410, 2048):
        passes = [int(search(jnp.asarray(b), jnp.int32(k))) for b in near_normal.reshape(8, 8, -1)]
        assert max(passes) <= 12 and np.mean(passes) <= 8, (k, passes)  # plain bitwise bisection: ~22 here
    hard = np.concatenate([_distance_rows(rng, 8, 4096, 64, modes=8),
                           np.exp(rng.uniform(-80, 80, (8, 4096))).astype(np.float32)])
    for k in (1, 410, 4095):
        passes = [int(search(jnp.asarray(b), jnp.int32(k))) for b in hard.reshape(2, 8, -1)]
        assert max(passes) <= 64, (k, passes)
        ref = np.sort(hard, axis=1)[:, :k].astype(np.float64).mean(1)
        np.testing.assert_allclose(mean_of_k_smallest(jnp.asarray(hard), jnp.int32(k)), ref, rtol=1e-5)
    rows = np.concatenate([near_normal[:8], hard[:8]])
    block = np.asarray(mean_of_k_smallest(jnp.asarray(rows), jnp.int32(410), jnp.sqrt))
    alone = np.concatenate([np.asarray(mean_of_k_smallest(jnp.asarray(r[None]), jnp.int32(410), jnp.sqrt)) for r in rows])
    np.testing.assert_array_equal(block, alone)


def test_sds_fixed_k_and_shrinking(data):
    x, y, classes = data
    sds, info = sample_diversity(x, y, classes, k=7)
    np.testing.assert_allclose(sds, brute_sds(x, y, classes, k=7), rtol=1e-4, atol=1e-4)
    small_y = np.array([0, 0, 0, 1, 1, 2])
    _, info = sample_diversity(x[:6], small_y, 3, k=5)
    assert info.k.tolist() == [2, 1, 0] and info.k_requested.tolist() == [5, 5, 5]


def test_sds_sharded_equals_single_device(data):
    x, y, classes = data
    four, _ = sample_diversity(x, y, classes, query_tile=32)
    one, _ = sample_diversity(x, y, classes, query_tile=32, mesh=parallel.data_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5)


def test_sds_spread_and_split_classes_agree_with_one_device():
    """On 4 devices a class of 700 of 880 samples splits its queries over the devices; the small ones run whole,
    each on one device. Both equal one device and brute force."""
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(5), [700, 50, 60, 40, 30])
    x = (rng.normal(size=(5, 12))[y] * 2 + rng.normal(size=(len(y), 12))).astype(np.float32)
    four, info = sample_diversity(x, y, 5, query_tile=16)
    one, _ = sample_diversity(x, y, 5, query_tile=16, mesh=parallel.data_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(four, brute_sds(x, y, 5), rtol=1e-4, atol=1e-4)
    assert info.k.tolist() == [70, 5, 6, 4, 3]


def test_sampled_reference_sds_is_close_to_exact():
    """Classes of 2,000 measured against 500 random members: mean abs error < 2% of the mean SDS, max < 8%,
    rank correlation within a class > 0.97 (measured: ~1.2%, ~5%, ~0.99)."""
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 2000)
    x = (rng.normal(size=(3, 16))[y] * 2 + rng.normal(size=(6000, 16))).astype(np.float32)
    exact, _ = sample_diversity(x, y, 3)
    approx, info = sample_diversity(x, y, 3, reference_threshold=1000, reference_size=500, seed=3)
    assert info.reference_size.tolist() == [500] * 3 and info.k.tolist() == [50] * 3
    err = np.abs(approx - exact) / exact.mean()
    assert err.mean() < 0.02 and err.max() < 0.08, (err.mean(), err.max())
    for c in range(3):
        m = y == c
        rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
        assert np.corrcoef(rank(exact[m]), rank(approx[m]))[0, 1] > 0.97


def test_sampled_reference_of_a_class_does_not_depend_on_the_other_classes():
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], [1500, 2000])  # class 1 is larger: it is computed first
    x = rng.normal(size=(len(y), 8)).astype(np.float32)
    both, _ = sample_diversity(x, y, 2, reference_threshold=1000, reference_size=300, seed=1)
    alone, _ = sample_diversity(x[y == 0], y[y == 0], 2, reference_threshold=1000, reference_size=300, seed=1)
    np.testing.assert_array_equal(both[y == 0], alone)


def test_minmax():
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    assert minmax(np.ones(3)).tolist() == [0, 0, 0]


def test_class_typicality_is_the_cosine_to_the_class_mean_direction(data):
    """Against numpy: each row's cosine to the normalised mean of its class's unit rows, with the rows in several
    chunks (the class sums add up across chunks) and an all-zero row (scores 0, adds nothing to its class)."""
    from clipsel_jax.scores import class_typicality

    x, y, c = data
    x = x.copy()
    x[7] = 0.0
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    means = np.stack([unit[y == k].sum(0) for k in range(c)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    ref = (unit * means[y]).sum(1)
    np.testing.assert_allclose(class_typicality(x, y, c, chunk=500), ref, atol=1e-5)
    np.testing.assert_allclose(class_typicality(x, y, c), ref, atol=1e-5)
    assert class_typicality(x, y, c)[7] == 0.0


def test_typicality_weight_adds_its_term_to_the_combined_score_and_only_then(data):
    """c = SAS / mean + alpha SDS / mean + w T / mean (min-max normalised T, measured on the features given for it);
    w = 0 computes nothing and leaves c as it was; a bad weight or a feature count that does not match is refused."""
    from clipsel_jax.scores import class_typicality, score_samples

    x, y, c = data
    rng = np.random.default_rng(0)
    text = rng.normal(size=(c, x.shape[1])).astype(np.float32)
    other = rng.normal(size=(len(x), 5)).astype(np.float32)  # e.g. the encoder's features beside adapted ones
    base = score_samples(x, text, y, 0.1)
    assert base.typicality is None
    with_t = score_samples(x, text, y, 0.1, typicality=0.3, typicality_feats=other)
    t = minmax(class_typicality(other, y, c))
    np.testing.assert_allclose(with_t.typicality, class_typicality(other, y, c))
    np.testing.assert_allclose(with_t.combined, base.combined + 0.3 * t / t.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(score_samples(x, text, y, 0.1, typicality=0.0).combined, base.combined)
    for bad in (-0.1, float("nan"), float("inf"), "0.3"):
        with pytest.raises(ValueError, match="typicality must be"):
            score_samples(x, text, y, 0.1, typicality=bad)
    with pytest.raises(ValueError, match="one row per sample"):
        score_samples(x, text, y, 0.1, typicality=0.3, typicality_feats=other[:-1])
