"""Data sources and preprocessing (noise and corruptions follow)."""

from clipsel_jax.data.demo import demo, demo_mislabeled
from clipsel_jax.data.reopen import open_source
from clipsel_jax.data.sources import (ArraySource, ImageFolder, Source, TFDSSource, UnreadableImage, from_arrays,
                                      image_folder, positions_of, source_spec, tfds_source)

__all__ = ["demo", "demo_mislabeled", "ArraySource", "ImageFolder", "Source", "TFDSSource", "UnreadableImage",
           "from_arrays", "image_folder", "open_source", "positions_of", "source_spec", "tfds_source"]
