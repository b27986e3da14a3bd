"""Label noise and image corruptions for robustness experiments, seeded, with the ground truth kept.

- ``symmetric_label_noise``: exactly round(fraction * N) labels move, each to a different class drawn uniformly.
- ``pair_label_noise``: asymmetric noise between similar classes (CIFAR-10: truck -> automobile, bird -> airplane,
  deer -> horse, cat <-> dog); exactly round(fraction * n_c) labels of each listed class move.
- ``corrupt_images``: exactly round(fraction * N) images corrupted, split as equally as possible over Gaussian noise,
  a black occlusion box, 4x down-then-up resolution, fog and motion blur (the Moderate-DS protocol).

Every function returns the new data and per-sample flags, so evaluations can count what a selection kept.
``NoiseSetting`` names one of these settings as the benchmark writes it: ``symmetric:0.2``, ``pair:0.4``,
``corrupt:0.2`` or ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipsel_jax.data.preprocess import as_rgb_batch

NOISE_KINDS = ("none", "symmetric", "pair", "corrupt")
CIFAR10_PAIRS = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
CORRUPTIONS = ("gaussian_noise", "occlusion", "low_resolution", "fog", "motion_blur")


@dataclass(frozen=True)
class NoiseSetting:
    """What is wrong in a training set: `fraction` of its labels (symmetric, pair) or images (corrupt), or nothing."""

    kind: str = "none"
    fraction: float = 0.0

    def __post_init__(self):
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {self.kind!r}; choose from {', '.join(NOISE_KINDS)}")
        f = self.fraction
        if not isinstance(f, (int, float, np.integer, np.floating)) or not np.isfinite(f):
            raise ValueError(f"noise fraction must be a number, got {f!r}")
        if self.kind == "none" and f != 0:
            raise ValueError("noise kind 'none' takes no fraction")
        if self.kind != "none" and not 0 < f < 1:
            raise ValueError(f"{self.kind} noise fraction must be in (0, 1), got {f}")

    @classmethod
    def parse(cls, text: str) -> NoiseSetting:
        """'none', 'KIND:FRACTION' (symmetric:0.2, pair:0.4, corrupt:0.2), or a bare fraction: symmetric label noise
        (0 = none), the benchmark's earlier --noise form."""
        text = str(text).strip()
        kind, sep, frac = text.partition(":")
        if not sep:
            if kind == "none":
                return cls()
            try:
                f = float(kind)
            except ValueError:
                raise ValueError(f"noise {text!r}: give none, KIND:FRACTION with KIND one of symmetric, pair, "
                                 "corrupt (e.g. pair:0.4), or a symmetric fraction such as 0.2") from None
            return cls() if f == 0 else cls("symmetric", f)
        try:
            f = float(frac)
        except ValueError:
            raise ValueError(f"noise {text!r}: the fraction after ':' must be a number, e.g. {kind}:0.2") from None
        return cls(kind, f)

    @property
    def on_labels(self) -> bool:
        return self.kind in ("symmetric", "pair")

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.fraction:g}"


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def symmetric_label_noise(labels, num_classes: int, fraction: float, seed: int = 0):
    """(noisy labels, flipped bool mask): round(fraction * N) samples get a label drawn uniformly from the
    other num_classes - 1 classes (never their own)."""
    _check_fraction(fraction)
    y = np.asarray(labels, np.int64)
    if num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    rng = np.random.default_rng(seed)
    flip = np.zeros(len(y), bool)
    idx = rng.choice(len(y), size=int(round(fraction * len(y))), replace=False)
    flip[idx] = True
    noisy = y.copy()
    shift = rng.integers(1, num_classes, size=len(idx))  # 1..C-1: never the same class, uniform over the others
    noisy[idx] = (y[idx] + shift) % num_classes
    return noisy, flip


def pair_label_noise(labels, class_names, fraction: float, pairs: dict | None = None, seed: int = 0):
    """(noisy labels, flipped mask): for each source class in `pairs` (names; default CIFAR10_PAIRS), exactly
    round(fraction * n_c) of its samples, chosen at random, get the paired class's label."""
    _check_fraction(fraction)
    y = np.asarray(labels, np.int64)
    names = list(class_names)
    pairs = CIFAR10_PAIRS if pairs is None else pairs
    missing = sorted({n for kv in pairs.items() for n in kv} - set(names))
    if missing:
        raise ValueError(f"pair noise names classes {missing} that are not among the class names {names[:12]}")
    rng = np.random.default_rng(seed)
    noisy, flip = y.copy(), np.zeros(len(y), bool)
    for src, dst in pairs.items():  # chosen from the clean labels, so cat <-> dog swaps stay independent
        members = np.flatnonzero(y == names.index(src))
        pick = rng.choice(members, size=int(round(fraction * len(members))), replace=False)
        noisy[pick], flip[pick] = names.index(dst), True
    return noisy, flip


# -------------------------------------------------------------------------------------------------------------
# Image corruptions (uint8 (H, W, 3) in, uint8 out)


def gaussian_noise(image: np.ndarray, rng, sigma: float = 0.08) -> np.ndarray:
    x = image / 255.0 + rng.normal(0.0, sigma, image.shape)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def occlusion(image: np.ndarray, rng, size: float = 0.5) -> np.ndarray:
    """A black box of `size` x the image side at a random place (inside the image)."""
    h, w = image.shape[:2]
    bh, bw = max(1, int(round(size * h))), max(1, int(round(size * w)))
    top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    out = image.copy()
    out[top:top + bh, left:left + bw] = 0
    return out


def low_resolution(image: np.ndarray, rng=None, factor: int = 4) -> np.ndarray:
    """Down by `factor` (box filter), then back up (nearest): the detail is gone, the size is the same."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


def _plasma(size: int, rng, decay: float = 2.0) -> np.ndarray:
    """A smooth random field in [0, 1] (sum of upsampled noise octaves, coarse ones strongest)."""
    field = np.zeros((size, size))
    amp, cells = 1.0, 2
    while cells <= size:
        octave = Image.fromarray(rng.random((cells, cells)).astype(np.float32))  # mode "F"
        field += amp * np.asarray(octave.resize((size, size), Image.BICUBIC))
        amp, cells = amp / decay, cells * 2
    field -= field.min()
    return field / max(field.max(), 1e-12)


def fog(image: np.ndarray, rng, strength: float = 0.6) -> np.ndarray:
    """Blend toward white through a smooth random field, and lower the contrast (as ImageNet-C's fog)."""
    h, w = image.shape[:2]
    field = _plasma(1 << max(1, (max(h, w) - 1).bit_length()), rng)[:h, :w, None]
    x = image / 255.0
    x = x * (1 - strength * field) + strength * field
    x = (x - x.mean()) * (1 - strength / 2) + x.mean()
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def motion_blur(image: np.ndarray, rng, length: float = 0.25) -> np.ndarray:
    """Average along a line of `length` x the image side at a random angle (camera shake)."""
    h, w = image.shape[:2]
    n = max(3, int(round(length * max(h, w))) | 1)
    angle = rng.uniform(0, np.pi)
    offsets = np.arange(n) - n // 2
    dy, dx = np.round(offsets * np.sin(angle)).astype(int), np.round(offsets * np.cos(angle)).astype(int)
    padded = np.pad(image.astype(np.float64), ((n, n), (n, n), (0, 0)), mode="edge")
    acc = np.zeros(image.shape)
    for oy, ox in zip(dy, dx):
        acc += padded[n + oy:n + oy + h, n + ox:n + ox + w]
    return np.clip(np.round(acc / n), 0, 255).astype(np.uint8)


_FUNCTIONS = {"gaussian_noise": gaussian_noise, "occlusion": occlusion, "low_resolution": low_resolution,
              "fog": fog, "motion_blur": motion_blur}


def corrupt_images(images: np.ndarray, fraction: float, seed: int = 0, kinds=CORRUPTIONS):
    """(corrupted copy of images, kind index per sample: -1 = untouched, else the index into `kinds`).

    images: uint8 (N, H, W, 3), or grayscale (N, H, W) / (N, H, W, 1) (returned as RGB). round(fraction * N)
    images are corrupted, split over `kinds` as equally as possible (the first kinds get one more when it does
    not divide).
    """
    _check_fraction(fraction)
    images = as_rgb_batch(images, "corrupt_images: images")
    unknown = [k for k in kinds if k not in _FUNCTIONS]
    if unknown or not kinds:
        raise ValueError(f"unknown corruption kinds {unknown}; choose from {list(CORRUPTIONS)}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=int(round(fraction * len(images))), replace=False)
    kind = np.full(len(images), -1, np.int64)
    kind[chosen] = np.arange(len(chosen)) % len(kinds)
    out = images.copy()
    for i in chosen:
        out[i] = _FUNCTIONS[kinds[kind[i]]](images[i], rng)
    return out, kind
