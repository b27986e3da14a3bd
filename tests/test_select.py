"""The selection optimiser: STE, equivalence with top-|S| by the combined score, exact k, class balance,
determinism across seeds and device counts, robustness to label noise, resume, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipsel_jax as cs
from clipsel_jax import parallel, selection
from synthetic import noisy_clusters
from clipsel_jax.selection import (SelectionConfig, class_quotas, optimise, optimise_keep_scores, rank_and_take,
                                   straight_through_mask)


def test_ste_forward_is_hard_mask_and_gradient_is_straight_through():
    s = jnp.array([0.1, 0.49, 0.51, 0.9])
    np.testing.assert_array_equal(straight_through_mask(s), [0, 0, 1, 1])
    w = jnp.array([1.0, -2.0, 3.0, 0.5])
    ours = jax.grad(lambda s: (jnp.sum(w * straight_through_mask(s)) - 1) ** 2 + jnp.sum(straight_through_mask(s)))(s)
    reference = jax.grad(lambda s: (jnp.sum(w * (s + jax.lax.stop_gradient((s > 0.5) - s))) - 1) ** 2
                         + jnp.sum(s + jax.lax.stop_gradient((s > 0.5) - s)))(s)
    np.testing.assert_allclose(ours, reference)
    assert np.all(np.asarray(ours) != 0)
    # Through the sigmoid of the method: non-zero, finite gradient for every parameter.
    g = jax.grad(lambda d: jnp.sum(straight_through_mask(jax.nn.sigmoid(100 * d))))(jnp.full(5, 0.01))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) > 0)


def test_loss_given_count_has_the_exact_gradient_of_the_loss():
    from clipsel_jax.selection import selection_loss, selection_loss_given_count

    rng = np.random.default_rng(0)
    d = jnp.asarray(rng.normal(size=64) * 0.02, jnp.float32)
    c = jnp.asarray(rng.random(64), jnp.float32)
    valid = jnp.ones(64).at[60:].set(0)
    count = float(jnp.sum((d > 0) * valid))
    # (At count == k the loop has already stopped; there jnp.abs' gradient is 1 and torch's, like sign's, is 0.)
    for k in (10.0, count - 1, count + 1, 50.0):
        g = jax.grad(selection_loss)(d, c, valid, k, 60, 2.0, 100.0)
        h = jax.grad(selection_loss_given_count)(d, c, valid, k, 60, 2.0, 100.0, count)
        np.testing.assert_allclose(g, h, rtol=1e-6, atol=1e-9)
        assert np.all(np.asarray(g)[60:] == 0)  # padding gets no gradient


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_optimiser_mask_is_top_by_combined_score(ratio):
    rng = np.random.default_rng(1)
    n = 20_000
    c = (rng.random(n) + 0.1 * rng.random(n)).astype(np.float32)  # tie-free
    k = round(ratio * n)
    d, steps, count = optimise_keep_scores(jnp.asarray(c), k)
    mask = np.asarray(d) > 0  # s > 0.5
    assert abs(mask.sum() - k) < n / 2000 + 1 and 0 < int(steps) < 100_000
    top = np.zeros(n, bool)
    top[np.argsort(-c)[: mask.sum()]] = True
    np.testing.assert_array_equal(mask, top)


def _both_loops(c, k, **cfg):
    mesh = parallel.data_mesh()
    band = optimise(c, k, SelectionConfig(**cfg), mesh)
    full = optimise(c, k, SelectionConfig(loop="full", **cfg), mesh)
    return band, full


@pytest.mark.parametrize("case", ["n=20000 r=0.1", "n=20000 r=0.5", "n=20000 r=0.9", "n=3000 r=0.3",
                                  "overshoot", "n=200", "tied blocks", "max_steps, count above the band",
                                  "max_steps, count below the band"])
def test_band_loop_is_the_full_loop(case):
    """The optimiser on the decisive band only: the same steps, the same count at the stop and, for the band's
    samples, the same d bit for bit as the loop over all N; the same selection globally and per class.
    "overshoot": N = 5,000, tolerance 2.5 while ~30 samples cross per step near the stop: the full loop's count
    jumps past the window (to 1,494 at step 185), the count term's sign flips, and it comes back (1,498 at step
    202). "tied blocks": thousands of samples cross in the same step. The max_steps cases stop unconverged with the
    count outside the band's range: it is then counted from passengers run alongside the band."""
    rng = np.random.default_rng(0)
    n, ratio, cfg = 20_000, 0.5, {}
    if case.startswith("n="):
        n, ratio = (int(case.split()[0][2:]), float(case.split()[1][2:])) if " " in case else (200, 0.5)
    elif case == "overshoot" or case == "max_steps, count below the band":
        n, ratio, rng = 5000, 0.3, np.random.default_rng(5000)
        if case != "overshoot":  # stopped just after the overshoot, the count 1,494 < lo = 1,497 (no margin)
            cfg = dict(max_steps=190, band_margin=0)
    elif case == "max_steps, count above the band":
        n, ratio, cfg = 60_000, 0.3, dict(max_steps=2_000)
    c = (rng.random(n) + 0.1 * rng.random(n)).astype(np.float32)
    if case == "tied blocks":
        c = np.repeat(np.float32([1.2, 1.0, 0.8]), 4000)
        n = len(c)
    labels = np.random.default_rng(1).integers(0, 7, n)
    k = round(ratio * n)
    (key, steps, count, how), (d, steps_f, count_f, how_f) = _both_loops(c, k, **cfg)
    assert how["loop"] == "band" and how_f == {"loop": "full", "why": "loop='full'", "resumed_from": None}
    assert (steps, count) == (steps_f, count_f)
    lo, hi = how["band"]
    band = np.lexsort((np.arange(n), -c))[lo:hi]
    if case.startswith("max_steps"):
        assert steps == cfg["max_steps"] and (count > hi if "above" in case else count < lo)
    np.testing.assert_array_equal(key[band], d[band])
    np.testing.assert_array_equal(rank_and_take(key, c, k), rank_and_take(d, c, k))
    np.testing.assert_array_equal(rank_and_take(key, c, k, labels, 7), rank_and_take(d, c, k, labels, 7))


def test_band_loop_falls_back_to_the_full_loop():
    """d_0 <= 0 (every sample starts unselected): the band premise does not apply, the full loop runs and says why;
    d out of c's order inside a band is refused."""
    from clipsel_jax.selection import band_failure

    c = np.random.default_rng(2).random(3000).astype(np.float32)
    (key, steps, count, how), (d, *_) = _both_loops(c, 900, init=-0.01)
    assert how == {"loop": "full", "why": "init <= 0: the band loop does not apply", "resumed_from": None}
    np.testing.assert_array_equal(key, d)
    assert band_failure(np.float32([0.3, 0.2, 0.2, -0.1])) is None
    with pytest.raises(ValueError, match="loop must be 'band' or 'full'"):
        SelectionConfig(loop="fast")
    with pytest.raises(ValueError, match="band_margin must be >= 0"):
        SelectionConfig(band_margin=-1)
    assert "out of the order" in band_failure(np.float32([0.3, 0.2, 0.25, -0.1]))


def test_class_quotas_sum_to_k_and_follow_ratio():
    labels = np.repeat(np.arange(4), [10, 7, 3, 1])
    for k in range(1, 22):
        q = class_quotas(labels, 4, k)
        assert q.sum() == k and np.all(q <= [10, 7, 3, 1])
        assert np.all(np.abs(q - np.array([10, 7, 3, 1]) * k / 21) < 1 + 1e-9)
    np.testing.assert_array_equal(class_quotas(labels, 4, 21), [10, 7, 3, 1])
    # An empty class gets nothing.
    np.testing.assert_array_equal(class_quotas(np.array([0, 0, 2, 2]), 3, 2), [1, 0, 1])


def test_rank_and_take_exact_k_and_ties():
    d = np.array([0.5, 0.5, 0.1, 0.9, 0.5])
    tb = np.array([0.0, 1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(rank_and_take(d, tb, 2), [1, 3])  # 3 best; tie 1 vs 4 on tiebreak -> index 1
    labels = np.array([0, 0, 0, 1, 1])
    np.testing.assert_array_equal(rank_and_take(d, tb, 2, labels, 2), [1, 3])
    np.testing.assert_array_equal(rank_and_take(d, tb, 4, labels, 2), [0, 1, 3, 4])


@pytest.mark.parametrize("ratio", [0.01, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("balance", ["class", "global"])
def test_exact_k_and_class_balanced_counts(ratio, balance):
    x, y, text, _ = noisy_clusters(sizes=[50, 120, 7, 300, 33], classes=5, dim=16, seed=2)
    sel = cs.select_from_embeddings(x, y, text, ratio, adapter=None, balance=balance)
    k = round(ratio * len(y))
    assert len(sel.indices) == k == sel.mask.sum() and np.all(np.diff(sel.indices) > 0)
    assert sel.indices.dtype == np.int64 and sel.mask.dtype == bool
    kept = np.bincount(y[sel.indices], minlength=5)
    assert sel.meta["kept_per_class"] == kept.tolist()
    if balance == "class":
        np.testing.assert_array_equal(kept, class_quotas(y, 5, k))
    assert set(sel.scores) == {"sas", "cosine", "sds", "combined"}
    assert all(v.shape == (len(y),) and v.dtype == np.float32 for v in sel.scores.values())


def test_same_seed_same_mask_and_devices_agree():
    x, y, text, _ = noisy_clusters(n_per=150, seed=3)
    cfg = cs.AdaptConfig(epochs=2, batch_size=64)
    a = cs.select_from_embeddings(x, y, text, 0.4, seed=7, adapter=cfg)
    b = cs.select_from_embeddings(x, y, text, 0.4, seed=7, adapter=cfg)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert jax.device_count() == 4
    one = cs.select_from_embeddings(x, y, text, 0.4, seed=7, adapter=None,
                                    mesh=parallel.data_mesh(jax.devices()[:1]))
    four = cs.select_from_embeddings(x, y, text, 0.4, seed=7, adapter=None)
    np.testing.assert_array_equal(one.mask, four.mask)
    one = cs.select_from_embeddings(x, y, text, 0.3, adapter=None, balance="global",
                                    mesh=parallel.data_mesh(jax.devices()[:1]))
    four = cs.select_from_embeddings(x, y, text, 0.3, adapter=None, balance="global")
    np.testing.assert_array_equal(one.mask, four.mask)


def test_flipped_labels_are_left_out():
    """20% of labels flipped; keep 50%. Random keeps ~20% flipped; the method keeps far fewer."""
    x, y, text, flipped = noisy_clusters(n_per=400, seed=4)
    sel = cs.select_from_embeddings(x, y, text, 0.5, adapter=cs.AdaptConfig(epochs=3))
    frac = flipped[sel.indices].mean()
    assert flipped.mean() > 0.18
    assert frac < 0.02, frac


@pytest.mark.parametrize("loop", ["band", "full"])
@pytest.mark.parametrize("resume_on", ["same devices", "one device"])
def test_selection_resumes_after_interruption(tmp_path, resume_on, loop):
    """A run stopped after its second chunk of steps (`stop_after_chunks`, the public way to stop a loop that lasts
    well under a second at a known step; a real SIGKILL of a loop long enough to be caught took 12 minutes here):
    a rerun resumes after the second chunk and ends with the uninterrupted result. "one device": stopped on 4
    devices, resumed on 1 (a TPU VM restarted on a smaller slice); N pads differently on each (the full loop splits
    all N over the devices), yet the checkpoint is reused."""
    chunk = 40
    x, y, text, _ = noisy_clusters(sizes=[400, 400, 401], classes=3, seed=8)
    mesh = parallel.data_mesh(jax.devices()[:1]) if resume_on == "one device" else None
    options = dict(adapter=None, selection=SelectionConfig(loop=loop))
    ref = cs.select_from_embeddings(x, y, text, 0.3, **options)
    assert ref.meta["optimiser"]["loop"] == loop and ref.meta["optimiser"]["steps"] > 3 * chunk
    with pytest.raises(selection.LoopStopped, match="after step 80"):
        cs.select_from_embeddings(x, y, text, 0.3, workdir=tmp_path, chunk_steps=chunk, stop_after_chunks=2,
                                  **options)
    resumed = cs.select_from_embeddings(x, y, text, 0.3, workdir=tmp_path, chunk_steps=chunk, mesh=mesh, **options)
    np.testing.assert_array_equal(resumed.mask, ref.mask)
    assert resumed.meta["optimiser"] == {**ref.meta["optimiser"], "resumed_from": 2 * chunk}  # only the rest ran


def test_stop_after_chunks_is_checked_and_finishing_is_not_stopping(tmp_path):
    x, y, text, _ = noisy_clusters(sizes=[400, 400, 401], classes=3, seed=8)
    for bad in (0, -1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="stop_after_chunks"):
            cs.select_from_embeddings(x, y, text, 0.3, adapter=None, workdir=tmp_path, stop_after_chunks=bad)
    with pytest.raises(ValueError, match="needs a workdir"):
        cs.select_from_embeddings(x, y, text, 0.3, adapter=None, stop_after_chunks=1)
    # a budget the loop does not use up: the selection finishes normally
    done = cs.select_from_embeddings(x, y, text, 0.3, adapter=None, workdir=tmp_path, stop_after_chunks=1)
    assert done.meta["optimiser"]["steps"] < 20_000 and len(done.indices) == round(0.3 * len(y))


def test_sds_k_shrinks_for_small_classes_and_one_class_works():
    x, y, text, _ = noisy_clusters(sizes=[40, 3, 1], classes=3, dim=8, flip=0.0, seed=6)
    sel = cs.select_from_embeddings(x, y, text, 0.5, adapter=None, k_neighbors=5)
    assert sel.meta["sds_k"]["used"] == [5, 2, 0] and sel.meta["sds_k"]["shrunk_classes"] == [1, 2]
    assert sel.scores["sds"][y == 2][0] == 0  # a lone sample has no neighbours
    one = cs.select_from_embeddings(x[y == 0], np.zeros(40, int), text[:1], 0.25, adapter=None)
    assert len(one.indices) == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(ratio=0.0), r"ratio must be in \(0, 1\]"),
    (dict(ratio=1.5), r"ratio must be in \(0, 1\]"),
    (dict(ratio=0.001), "keeps round"),
    (dict(labels=np.zeros(20, np.float32)), "labels must be integer"),
    (dict(labels=np.full(20, 3)), r"outside 0..2"),
    (dict(labels=np.full(20, -1)), r"outside 0..2"),
    (dict(labels=np.zeros(19, int)), "one entry per image"),
    (dict(text_emb=np.ones((2, 4), np.float32), labels=np.full(20, 2)), r"text_emb has 2 rows"),
    (dict(image_emb=np.ones((0, 4), np.float32), labels=np.zeros(0, int)), "no samples"),
    (dict(image_emb=np.ones((20,), np.float32)), "must be 2-D"),
    (dict(nan_rows=[3, 7]), r"image_emb has 2 rows with NaN or inf: \[3, 7\]"),
    (dict(balance="both"), "balance must be"),
    (dict(alpha="other"), "alpha must be"),
    (dict(text_emb=np.ones((3, 5), np.float32)), "need adapters"),
])
def test_bad_input(kwargs, match):
    rng = np.random.default_rng(0)
    args = dict(image_emb=rng.normal(size=(20, 4)).astype(np.float32), labels=np.arange(20) % 3,
                text_emb=rng.normal(size=(3, 4)).astype(np.float32), ratio=0.5)
    nan_rows = kwargs.pop("nan_rows", None)
    args.update(kwargs)
    if nan_rows:
        args["image_emb"][nan_rows, 1] = np.nan
    with pytest.raises(ValueError, match=match):
        cs.select_from_embeddings(args.pop("image_emb"), args.pop("labels"), args.pop("text_emb"), args.pop("ratio"),
                                  adapter=None, **args)


def test_alpha_rules():
    x, y, text, _ = noisy_clusters(n_per=50, seed=8, classes=3)
    assert cs.select_from_embeddings(x, y, text, 0.3, adapter=None).meta["alpha"] == 0.1
    assert cs.select_from_embeddings(x, y, text, 0.3, adapter=None, alpha="paper").meta["alpha"] == 0.3
    assert cs.select_from_embeddings(x, y, text, 0.3, adapter=None, alpha=0.5).meta["alpha"] == 0.5


def test_probability_alignment_drops_the_image_another_prompt_claims():
    """The default alignment is the probability of the label's prompt among all: a mislabeled image close to its
    label's prompt but closer to another class's is dropped before a clean but atypical one. The paper's cosine
    keeps the mislabeled one (it is nearer its label's prompt in absolute terms)."""
    t = np.eye(3, dtype=np.float32)[:2]  # two prompts: axes 0 and 1
    typical = np.array([[1, 0, 0.2], [1, 0.1, 0.2], [1, 0, 0.3], [1, 0.1, 0.1]], np.float32)
    mislabeled = np.array([[0.5, 1, 0]], np.float32)  # labeled 0; cos 0.45 to prompt 0, 0.89 to prompt 1
    atypical = np.array([[0.4, 0, 1]], np.float32)  # labeled 0; cos 0.37 to prompt 0, 0 to prompt 1
    x = np.concatenate([typical, mislabeled, atypical, -typical[:, [1, 0, 2]] * [-1, -1, 1]])
    y = np.array([0] * 6 + [1] * 4)
    kw = dict(adapter=None, balance="class", alpha=0.0)
    ours = cs.select_from_embeddings(x, y, t, 0.8, **kw)
    paper = cs.select_from_embeddings(x, y, t, 0.8, alignment="cosine", **kw)
    assert ours.mask[5] and not ours.mask[4]  # atypical kept, mislabeled dropped
    assert paper.mask[4] and not paper.mask[5]
    assert ours.meta["alignment"] == "probability" and ours.meta["temperature"] == 100.0  # CLIP's, no adapters
    np.testing.assert_allclose(paper.scores["sas"], ours.scores["cosine"], rtol=1e-6)
    e = np.exp(100.0 * (x[:6] / np.linalg.norm(x[:6], axis=1, keepdims=True)) @ t.T)
    np.testing.assert_allclose(ours.scores["sas"][:6], e[:, 0] / e.sum(1), rtol=1e-4, atol=1e-6)


def test_paper_method_is_one_option_away():
    """method="paper": the cosine alignment, alpha = ratio, one top-k over the whole set; an explicit setting wins
    over the preset; the same as giving the three settings."""
    x, y, text, _ = noisy_clusters(n_per=60, seed=12, classes=3)
    paper = cs.select_from_embeddings(x, y, text, 0.4, adapter=None, method="paper")
    spelled = cs.select_from_embeddings(x, y, text, 0.4, adapter=None, alignment="cosine", balance="global",
                                        alpha="paper")
    np.testing.assert_array_equal(paper.indices, spelled.indices)
    m = paper.meta
    assert (m["method"], m["alignment"], m["balance"], m["alpha"]) == ("paper", "cosine", "global", 0.4)
    ours = cs.select_from_embeddings(x, y, text, 0.4, adapter=None).meta
    assert (ours["method"], ours["alignment"], ours["balance"], ours["alpha"]) == ("clipsel", "probability",
                                                                                  "class", 0.1)
    mixed = cs.select_from_embeddings(x, y, text, 0.4, adapter=None, method="paper", balance="class").meta
    assert mixed["balance"] == "class" and mixed["alignment"] == "cosine"
    with pytest.raises(ValueError, match="method must be one of clipsel, paper"):
        cs.select_from_embeddings(x, y, text, 0.4, adapter=None, method="papr")
    with pytest.raises(ValueError, match="alignment must be one of"):
        cs.select_from_embeddings(x, y, text, 0.4, adapter=None, alignment="dot")
    for bad in (0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            cs.select_from_embeddings(x, y, text, 0.4, adapter=None, temperature=bad)


def test_typicality_drops_images_unlike_their_class():
    """The class typicality's weight reaches the selection: samples aligned with their prompt (SAS alone cannot
    tell them apart) but atypical of their class in the encoder's features, as corrupted images are, are kept at
    the base rate without it and dropped with it. The method's preset is 0 for both methods; a bad weight or
    feature shape is refused before anything runs."""
    x, y, text, _ = noisy_clusters(n_per=200, seed=13, classes=4, flip=0.0)
    rng = np.random.default_rng(0)
    encoder = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)  # the encoder's features: x, a little noise
    odd = rng.random(len(y)) < 0.2
    encoder[odd] = rng.normal(size=(odd.sum(), x.shape[1])).astype(np.float32) * np.linalg.norm(x, axis=1).mean()
    kw = dict(adapter=None, typicality_features=encoder)
    without = cs.select_from_embeddings(x, y, text, 0.5, **kw)
    with_t = cs.select_from_embeddings(x, y, text, 0.5, typicality=1.0, **kw)
    assert odd[without.mask].mean() > 0.1 and odd[with_t.mask].mean() < 0.02, (odd[without.mask].mean(),
                                                                               odd[with_t.mask].mean())
    assert (without.meta["typicality"], with_t.meta["typicality"]) == (0.0, 1.0)
    assert cs.select_from_embeddings(x, y, text, 0.5, adapter=None, method="paper").meta["typicality"] == 0.0
    for bad in (-1, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="typicality must be"):
            cs.select_from_embeddings(x, y, text, 0.5, adapter=None, typicality=bad)
    with pytest.raises(ValueError, match="typicality_features must be one feature row per sample"):
        cs.select_from_embeddings(x, y, text, 0.5, adapter=None, typicality=0.3, typicality_features=encoder[:10])
    encoder[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"typicality_features has 1 rows with NaN or inf: \[3\]"):
        cs.select_from_embeddings(x, y, text, 0.5, adapter=None, typicality=0.3, typicality_features=encoder)


def test_selection_config_is_used():
    x, y, text, _ = noisy_clusters(n_per=100, seed=9, classes=3)
    sel = cs.select_from_embeddings(x, y, text, 0.3, adapter=None, selection=SelectionConfig(max_steps=5))
    assert sel.meta["optimiser"]["steps"] == 5 and not sel.meta["optimiser"]["converged"]
    assert len(sel.indices) == 90  # still exactly k by rank


def test_half_precision_embeddings_are_not_upcast_whole():
    """float16 features (half the memory) give the same selection as their float32 values."""
    x, y, text, _ = noisy_clusters(n_per=100, seed=10, classes=4)
    x16 = x.astype(np.float16)
    a = cs.select_from_embeddings(x16, y, text, 0.4, adapter=None)
    b = cs.select_from_embeddings(x16.astype(np.float32), y, text, 0.4, adapter=None)
    np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="must be floating point"):
        cs.select_from_embeddings(x.astype(np.int32), y, text, 0.4, adapter=None)


def test_constant_scores_do_not_give_nan():
    """Only singleton classes: every SDS is 0, min-max gives zeros; the combined score stays finite."""
    rng = np.random.default_rng(11)
    x, t = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    sel = cs.select_from_embeddings(x, np.arange(6), t, 0.5, adapter=None, balance="global")
    assert np.isfinite(sel.scores["combined"]).all() and len(sel.indices) == 3
    np.testing.assert_array_equal(sel.scores["sds"], 0)


def test_workdir_reused_with_other_settings_replaces_state(tmp_path):
    """orbax silently skips a save at a step it already has: a second run in the same workdir (another ratio)
    must clear the first run's selection state and final selection, not keep them."""
    from clipsel_jax.ckpt import Checkpointer

    x, y, text, _ = noisy_clusters(n_per=200, seed=12, classes=4)
    first = cs.select_from_embeddings(x, y, text, 0.3, adapter=None, workdir=tmp_path, chunk_steps=50)
    second = cs.select_from_embeddings(x, y, text, 0.6, adapter=None, workdir=tmp_path, chunk_steps=50)
    assert first.meta["k"] != second.meta["k"]
    state, meta = Checkpointer(tmp_path / "selection_final").restore()
    assert meta["k"] == second.meta["k"]
    np.testing.assert_array_equal(state["indices"], second.indices)
    latest = Checkpointer(tmp_path / "selection_band").latest_step()
    assert latest == second.meta["optimiser"]["steps"]


def test_checkpointer_refuses_a_silent_skip(tmp_path):
    from clipsel_jax.ckpt import Checkpointer

    ck = Checkpointer(tmp_path / "c")
    ck.save(3, {"a": np.zeros(2)}, {"v": 1})
    with pytest.raises(RuntimeError, match="step 3 was not saved"):
        ck.save(3, {"a": np.ones(2)}, {"v": 2})
    ck.clear()
    ck.save(3, {"a": np.ones(2)}, {"v": 2})
    state, meta = ck.restore()
    assert meta == {"v": 2} and state["a"].tolist() == [1, 1]
