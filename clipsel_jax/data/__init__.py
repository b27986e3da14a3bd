"""Data sources and preprocessing (noise and corruptions follow)."""

from clipsel_jax.data.sources import ImageFolder, UnreadableImage, image_folder

__all__ = ["ImageFolder", "UnreadableImage", "image_folder"]
