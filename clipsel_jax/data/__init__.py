"""Data sources and preprocessing (noise and corruptions follow)."""

from clipsel_jax.data.sources import (ArraySource, ImageFolder, Source, TFDSSource, UnreadableImage, from_arrays,
                                      image_folder, tfds_source)

__all__ = ["ArraySource", "ImageFolder", "Source", "TFDSSource", "UnreadableImage", "from_arrays", "image_folder",
           "tfds_source"]
