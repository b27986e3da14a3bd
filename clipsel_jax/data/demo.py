"""The demo data set shipped inside the package: 2,000 CIFAR-10 training images (200 per class), 100 of them (10 per
class) filed under a wrong class on purpose. Built by scripts/make_demo.py; small enough (2 MB) to live in the repo,
so a first run needs neither network nor a download."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
DEMO_ZIP = DEMO_DIR / "cifar10_demo.zip"


def demo():
    """The demo set as an image-folder source (ids 0..1999, sorted by class then file name)."""
    from clipsel_jax.data.sources import image_folder

    if not DEMO_ZIP.is_file():
        raise FileNotFoundError(f"the demo data set is missing from this installation ({DEMO_ZIP}); reinstall "
                                "clipsel_jax from the repository (it ships clipsel_jax/demo/cifar10_demo.zip)")
    return image_folder(DEMO_ZIP)


def demo_mislabeled(source=None) -> np.ndarray:
    """Bool (N,) over the demo source: True where the image was filed under a wrong class on purpose."""
    source = source or demo()
    flipped = {f["file"] for f in json.loads((DEMO_DIR / "cifar10_demo_flipped.json").read_text())["flipped"]}
    return np.array([source.describe(i) in flipped for i in range(len(source))])
