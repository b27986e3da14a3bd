"""The downstream trainer: learns a small separable problem, trains only on the given subset, is seeded."""

import jax
import numpy as np
import pytest
from flax import nnx

from clipsel_jax import parallel
from clipsel_jax.evaluate import TrainConfig, make_model, train_classifier
from clipsel_jax.evaluate.models import param_count
from clipsel_jax.evaluate.train import resize_images


def toy(n, seed):
    """Class k: a bright square in quadrant k of a noisy 16x16 image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 90, (n, 16, 16, 3)).astype(np.uint8)
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        x[i, r * 8 + 1:r * 8 + 7, c * 8 + 1:c * 8 + 7] = 230
    return x, y


CFG = TrainConfig(width=8, epochs=4, batch_size=32, lr=0.05, augment=False)


def test_learns_a_separable_problem():
    x, y = toy(256, 0)
    xt, yt = toy(200, 1)
    res = train_classifier(x, y, 4, xt, yt, config=CFG, seed=0)
    assert res.test_accuracy > 0.9, res
    assert res.steps == 4 * 8 and res.train_size == 256
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_learns_from_grayscale_images():
    """(N, H, W) images train like RGB ones (each repeated to three channels). The same shapes and budget as
    test_learns_a_separable_problem: one compiled program for both (the session's compilation cache)."""
    x, y = toy(256, 0)
    xt, yt = toy(200, 1)
    gray, gray_test = x.mean(-1).astype(np.uint8), xt.mean(-1).astype(np.uint8)
    res = train_classifier(gray, y, 4, gray_test[..., None], yt, config=CFG, seed=0)  # (N, H, W) and (N, H, W, 1)
    assert res.test_accuracy > 0.9, res
    with pytest.raises(ValueError, match="must be .N, H, W. grayscale"):
        train_classifier(gray[..., None, None], y, 4, gray, yt)


def test_trains_only_on_the_subset_and_is_seeded():
    x, y = toy(256, 0)
    xt, yt = toy(200, 1)
    only_01 = np.flatnonzero(y < 2)
    res = train_classifier(x, y, 4, xt, yt, indices=only_01, config=CFG, seed=0)
    assert res.train_size == len(only_01)
    assert 0.35 < res.test_accuracy < 0.6  # classes 2 and 3 were never seen: about half the test set right
    again = train_classifier(x, y, 4, xt, yt, indices=only_01, config=CFG, seed=0)
    assert again.test_accuracy == res.test_accuracy and again.history == res.history


def test_image_size_trains_on_the_resized_subset():
    """image_size=8 on 16x16 images is the run on images shrunk beforehand (same samples, same batches, same
    model), test images included; the box filter averages each 2x2 block (within PIL's fixed-point rounding)."""
    x, y = toy(256, 0)
    xt, yt = toy(200, 1)
    small, small_test = resize_images(x, 8), resize_images(xt, 8)
    blocks = x.reshape(256, 8, 2, 8, 2, 3).astype(np.float64).mean((2, 4))
    assert small.shape == (256, 8, 8, 3) and np.abs(small - blocks).max() <= 1  # PIL: fixed-point rounding
    assert resize_images(small, 8) is small and resize_images(small, 16).shape == (256, 16, 16, 3)
    only = np.flatnonzero(y != 3)
    cfg = TrainConfig(width=8, epochs=2, batch_size=32, lr=0.05, augment=False)
    res = train_classifier(x, y, 4, xt, yt, indices=only, config=TrainConfig(**{**cfg.__dict__, "image_size": 8}))
    ref = train_classifier(small, y, 4, small_test, yt, indices=only, config=cfg)
    assert res.train_size == ref.train_size == len(only) and res.steps == ref.steps
    assert res.history == ref.history and res.test_accuracy == ref.test_accuracy
    assert res.config["image_size"] == 8
    for bad in (0, 4, 8.5, True):
        with pytest.raises(ValueError, match="image_size must be a whole number of pixels >= 8"):
            train_classifier(x, y, 4, xt, yt, config=TrainConfig(image_size=bad))


def test_augmented_training_on_one_device_and_tiny_subsets():
    x, y = toy(64, 0)
    xt, yt = toy(64, 1)
    one = parallel.data_mesh(jax.devices()[:1])
    res = train_classifier(x, y, 4, xt, yt, indices=np.arange(5), mesh=one,
                           config=TrainConfig(width=8, epochs=1, batch_size=32, min_steps=3), seed=1)
    assert res.steps == 3 and 0 <= res.test_accuracy <= 1


def test_models_and_errors():
    # the CIFAR ResNet-18, counted on abstract weights (initialising 11M real ones took most of this test)
    assert param_count(nnx.eval_shape(lambda: make_model("resnet18", 10))) == pytest.approx(11.17e6, rel=0.01)
    assert make_model("small_cnn", 10)(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("vgg", 10)
    x, y = toy(8, 0)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(x, y, 4, x, y, indices=[], config=CFG)
    with pytest.raises(ValueError, match="uint8"):
        train_classifier(x.astype(np.float32), y, 4, x, y, config=CFG)


def test_training_dynamics_are_recorded():
    x, y = toy(96, 0)
    noisy = y.copy()
    noisy[:12] = (y[:12] + 1) % 4  # mislabeled: hard to fit, high EL2N
    res = train_classifier(x, noisy, 4, x[:8], y[:8], indices=np.arange(96), config=CFG, seed=0,
                           track_dynamics=True)
    dyn = res.dynamics
    assert dyn["el2n"].shape == (4, 96) and dyn["grand"].shape == (4, 96) and dyn["correct"].dtype == bool
    assert dyn["el2n"][-1][:12].mean() > dyn["el2n"][-1][12:].mean() + 0.3
    assert np.all(dyn["grand"] >= dyn["el2n"] - 1e-6)  # the gradient norm carries a factor sqrt(|h|^2 + 1) >= 1
