"""A tiny TFDS data set built here (no download): 23 images of varied sizes in 3 classes, prepared in either of
TFDS's file formats."""

import numpy as np
import tensorflow_datasets as tfds


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """23 images of varied sizes, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "dog", "owl"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(23)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (20 + i % 3, 24 + i % 5, 3), dtype=np.uint8), "label": i % 3}


def prepare(root, formats=("tfrecord", "array_record")):
    """TinyImages prepared under root/<format> for each format."""
    for fmt in formats:
        TinyImages(data_dir=str(root / fmt), file_format=fmt).download_and_prepare()
    return root
