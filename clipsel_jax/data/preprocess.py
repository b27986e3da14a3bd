"""Image preprocessing that reproduces ``transformers.CLIPImageProcessor`` (its PIL backend).

The geometric part (shortest side to the model's size with PIL's bicubic filter, then center crop) runs on the host
in uint8, exactly as transformers does it, so only a small uint8 tensor travels to the device; rescaling and
normalisation happen on the device inside the jitted encoder.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class ImagePreprocessing:
    """What ``CLIPImageProcessor`` does to a uint8 image, read from a checkpoint's preprocessor config."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def to_dict(self) -> dict:
        return {"shortest_edge": self.shortest_edge, "crop_size": list(self.crop_size),
                "image_mean": list(self.image_mean), "image_std": list(self.image_std), "resample": "bicubic"}


class ImageError(ValueError):
    """An image (or batch of images) that cannot be encoded; the message says which and why."""


def _channels_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (..., C) with C in 1, 3, 4 -> (..., 3): gray repeated, alpha composited onto white."""
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def as_rgb_batch(images, what: str = "images") -> np.ndarray:
    """A batch of same-size images as uint8 (N, H, W, 3): grayscale (N, H, W) or (N, H, W, 1) is repeated over the
    channels, RGBA composited onto white (as ``as_rgb_uint8``). ImageError naming `what` for anything else."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ImageError(f"{what} must be uint8 pixels, got dtype {a.dtype}; convert floats in [0, 1] with "
                         "(x * 255).round().astype(np.uint8)")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{what} must be (N, H, W) grayscale or (N, H, W, 1|3|4), got shape {a.shape}")
    return _channels_to_rgb(a)


def as_rgb_uint8(image, where: str = "image") -> np.ndarray:
    """One image (PIL or array: (H, W), (H, W, 1), (H, W, 3), (H, W, 4)) as uint8 (H, W, 3).

    Grayscale is repeated over the channels; alpha is composited onto white, as ``CLIPImageProcessor`` does.
    """
    if isinstance(image, Image.Image):
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if has_alpha:
            rgba = image.convert("RGBA")
            return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ImageError(f"{where}: expected uint8 pixels, got dtype {a.dtype}. Convert floats in [0, 1] with "
                         "(x * 255).round().astype(np.uint8); 16-bit images with (x >> 8).astype(np.uint8)")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"{where}: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{where}: image has zero size {a.shape}")
    return _channels_to_rgb(a)


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): short side to the size, long truncated."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def center_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop: zero-pad to at least the crop size (centered), then take the centered window."""
    h, w = image.shape[:2]
    ch, cw = crop
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        top_pad, left_pad = -(-(nh - h) // 2), -(-(nw - w) // 2)
        padded = np.zeros((nh, nw, image.shape[2]), image.dtype)
        padded[top_pad:top_pad + h, left_pad:left_pad + w] = image
        top, left = (h - ch) // 2 + top_pad, (w - cw) // 2 + left_pad
        return padded[top:top + ch, left:left + cw]
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


def resize_and_crop(image: np.ndarray, pre: ImagePreprocessing) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (crop_h, crop_w, 3), bit-identical to CLIPImageProcessor before rescaling."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, pre.shortest_edge)
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
    return center_crop(image, pre.crop_size)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prepare_images(images, pre: ImagePreprocessing, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """A batch (uint8 array (N, H, W[, C]) or a sequence of PIL images / arrays of any sizes) -> (N, h, w, 3) uint8.

    PIL releases the GIL while resampling, so a thread pool spreads the work over the host's cores.
    """
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ImageError(f"expected a batch of images shaped (N, H, W) or (N, H, W, C), got {images.shape}; "
                             "for one image use images[None]")
        if images.ndim == 3 and images.shape[-1] in (3, 4):
            raise ImageError(f"a 3-d array {images.shape} looks like one (H, W, C) image, not a batch of grayscale "
                             "images; pass images[None] for one image")
        items = images
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        raise ImageError(f"expected a uint8 array (N, H, W, C) or a list of images, got {type(images).__name__}")
    n = len(items)
    out = np.empty((n, *pre.crop_size, 3), np.uint8)

    def one(i):
        out[i] = resize_and_crop(as_rgb_uint8(items[i], where=f"image {i}"), pre)

    if n <= 4:
        for i in range(n):
            one(i)
    elif pool is not None:
        list(pool.map(one, range(n)))
    else:
        with ThreadPoolExecutor(_workers()) as p:
            list(p.map(one, range(n)))
    return out
