"""Label noise and image corruptions: exact fractions, never a flip to the own class, seeded, flags kept."""

import numpy as np
import pytest

from clipsel_jax.data import noise

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.37, 1.0])
def test_symmetric_noise(fraction):
    y = np.repeat(np.arange(10), 300)
    noisy, flip = noise.symmetric_label_noise(y, 10, fraction, seed=3)
    assert flip.sum() == round(fraction * len(y))
    assert np.all(noisy[flip] != y[flip]) and np.array_equal(noisy[~flip], y[~flip])
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, flip2 = noise.symmetric_label_noise(y, 10, fraction, seed=3)
    assert np.array_equal(again, noisy) and np.array_equal(flip2, flip)
    if fraction == 1.0:  # each wrong class is about equally likely: 3000 flips over 9 targets per class
        pairs = np.zeros((10, 10), int)
        np.add.at(pairs, (y, noisy), 1)
        off = pairs[~np.eye(10, dtype=bool)]
        assert off.min() > 15 and off.max() < 55  # expected 33.3 each


def test_symmetric_noise_seeds_differ_and_errors():
    y = np.arange(100) % 4
    a, _ = noise.symmetric_label_noise(y, 4, 0.3, seed=0)
    b, _ = noise.symmetric_label_noise(y, 4, 0.3, seed=1)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="fraction"):
        noise.symmetric_label_noise(y, 4, 1.5)
    with pytest.raises(ValueError, match="0..2"):
        noise.symmetric_label_noise(y, 3, 0.2)


def test_pair_noise_cifar10():
    y = np.repeat(np.arange(10), 50)
    noisy, flip = noise.pair_label_noise(y, CIFAR, 0.4, seed=0)
    for src, dst in noise.CIFAR10_PAIRS.items():
        s, d = CIFAR.index(src), CIFAR.index(dst)
        moved = flip & (y == s)
        assert moved.sum() == 20 and np.all(noisy[moved] == d)
    untouched = [CIFAR.index(c) for c in CIFAR if c not in noise.CIFAR10_PAIRS]
    assert not flip[np.isin(y, untouched)].any()
    assert np.array_equal(noisy[~flip], y[~flip])
    with pytest.raises(ValueError, match="not among the class names"):
        noise.pair_label_noise(y, [str(i) for i in range(10)], 0.2)


def test_corruptions():
    rng = np.random.default_rng(0)
    images = rng.integers(30, 226, (53, 32, 32, 3), dtype=np.uint8)
    out, kind = noise.corrupt_images(images, 0.4, seed=5)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert (kind >= 0).sum() == round(0.4 * 53)  # 21
    counts = np.bincount(kind[kind >= 0], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 21
    assert np.array_equal(out[kind < 0], images[kind < 0])  # the others are untouched
    for i in np.flatnonzero(kind >= 0):
        assert not np.array_equal(out[i], images[i]), noise.CORRUPTIONS[kind[i]]
    again, kind2 = noise.corrupt_images(images, 0.4, seed=5)
    assert np.array_equal(again, out) and np.array_equal(kind2, kind)


def test_each_corruption_does_what_it_says():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    occ = noise.occlusion(img, rng)
    assert (occ == 0).all(axis=-1).sum() >= 16 * 16  # a 16 x 16 black box
    low = noise.low_resolution(img)
    blocks = low.reshape(8, 4, 8, 4, 3).transpose(0, 2, 1, 3, 4).reshape(64, 16, 3)
    assert all(len(np.unique(b, axis=0)) == 1 for b in blocks)  # constant 4 x 4 blocks: 8 x 8 of detail left
    foggy = noise.fog(img, rng)
    assert foggy.std() < img.std() and foggy.mean() > img.mean()  # lower contrast, whiter
    blurred = noise.motion_blur(img, rng)
    assert np.abs(np.diff(blurred.astype(int), axis=1)).mean() < np.abs(np.diff(img.astype(int), axis=1)).mean()
    noisy = noise.gaussian_noise(img, rng)
    assert 10 < np.abs(noisy.astype(int) - img).mean() < 30  # sigma 0.08 of the range: ~16 grey levels


def test_corruption_errors():
    with pytest.raises(ValueError, match="uint8"):
        noise.corrupt_images(np.zeros((2, 8, 8, 3), np.float32), 0.5)
    with pytest.raises(ValueError, match="unknown corruption"):
        noise.corrupt_images(np.zeros((2, 8, 8, 3), np.uint8), 0.5, kinds=("rain",))
