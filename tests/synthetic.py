"""The suite's one generator of synthetic embeddings: class clusters, prompts near their centres, optional label
noise, unequal or shuffled classes, and image/text spaces that CLIP has not aligned."""

from typing import NamedTuple

import numpy as np


class Clusters(NamedTuple):
    x: np.ndarray  # float32 (N, image_dim) image embeddings
    y: np.ndarray  # int (N,) given labels (flipped where `flipped`)
    text: np.ndarray  # float32 (C, text_dim) one prompt embedding per class
    flipped: np.ndarray  # bool (N,) the mislabeled samples


def noisy_clusters(n_per=300, classes=10, dim=32, flip=0.2, seed=0, sizes=None, *, spread=2.5, text_noise=0.5,
                   shuffle=False, image_dim=None, text_dim=None) -> Clusters:
    """Class-clustered embeddings (centres `spread` apart in units of the within-class noise), text embeddings
    `text_noise` from the centres, `flip` of the labels moved to another class. `sizes`: samples per class
    (default n_per each); shuffle: rows in random order instead of class blocks. image_dim / text_dim: map the
    `dim`-dim clusters into unaligned spaces of these dims through random linear maps (what adapters must learn)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * spread
    sizes = sizes or [n_per] * classes
    y_true = np.repeat(np.arange(classes), sizes)
    x = (centers[y_true] + rng.normal(size=(len(y_true), dim))).astype(np.float32)
    text = (centers + text_noise * rng.normal(size=(classes, dim))).astype(np.float32)
    y = y_true.copy()
    flipped = rng.random(len(y)) < flip
    y[flipped] = (y[flipped] + rng.integers(1, classes, flipped.sum())) % classes
    if shuffle:
        order = rng.permutation(len(y))
        x, y, flipped = x[order], y[order], flipped[order]
    if image_dim is not None:
        x = (x @ rng.normal(size=(dim, image_dim))).astype(np.float32)
    if text_dim is not None:
        text = (text @ rng.normal(size=(dim, text_dim))).astype(np.float32)
    return Clusters(x, y, text, flipped)


def unaligned(seed=0, n=600, classes=5, di=12, dt=7):
    """(x, y, text) with image and text features in different spaces (different dims, random maps): zero-shot
    is chance until adapters align them."""
    x, y, t, _ = noisy_clusters(n // classes, classes, 6, flip=0, seed=seed, spread=3, text_noise=0,
                                shuffle=True, image_dim=di, text_dim=dt)
    return x, y, t
