"""The benchmark's data: a labeled training split and a test split of any image data set.

- a folder or .zip holding both splits: ``--data cifar10-jpeg.zip`` finds ``train/`` and ``test/`` (or ``val/``,
  ``validation/``) at its top or inside its one top-level folder (CIFAR-10's ``cifar10-jpeg/``, Tiny-ImageNet's
  ``tiny-imagenet-200/``);
- two folders or zip paths: ``--data A.zip:inner/train --test-data A.zip:inner/val``;
- TFDS: ``--data tfds:NAME`` with ``--train-split`` (default train) and ``--test-split`` (default test);
- a config file (``--config``): its ``data`` section (path, subdir, class_names, tfds_data_dir) is the training
  split; the test split is found beside it as above, or given with ``--test-data``.

Both splits must list the same classes (the test labels are the training labels' integers). ``--class-names``
maps stored class names (WordNet ids) to readable ones for the prompts (clipsel_jax.text.readable_class_names).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEST_NAMES = ("test", "val", "validation")


@dataclass
class Splits:
    train: object  # a clipsel_jax.data Source
    test: object
    where: str  # how the splits were found, for the log and setting.json
    stored_names: list  # the class names as stored (folder names, WordNet ids), before --class-names


def _children(path: Path, inner: str) -> set[str]:
    """Folder names directly under `inner` ('' = the top) of a folder or zip."""
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            pre = inner.strip("/") + "/" if inner.strip("/") else ""
            return {n[len(pre):].split("/", 1)[0] for n in zf.namelist()
                    if n.startswith(pre) and "/" in n[len(pre):]}
    root = path / inner if inner else path
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def find_splits(spec: str) -> tuple[str, str] | None:
    """(train spec, test spec) inside a folder or zip holding ``train/`` and ``test/``|``val/``|``validation/``,
    at its top or in its only top-level folder; None when there are none."""
    if ".zip:" in spec:
        archive, inner = spec.split(".zip:", 1)
        path = Path(archive + ".zip")
    else:
        path, inner = Path(spec), ""
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r} does not exist")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise ValueError(f"--data {spec!r} is a file but not a zip archive")
    inner = inner.strip("/")
    levels = [inner]
    if not inner:  # one level down too, when the top holds exactly one folder
        top = _children(path, "")
        levels += list(top) if len(top) == 1 else []
    for level in levels:
        names = _children(path, level)
        test = next((t for t in TEST_NAMES if t in names), None)
        if "train" in names and test:
            if path.is_file():
                base = f"{path}:{level}/" if level else f"{path}:"
            else:
                base = f"{path / level if level else path}/"
            return base + "train", base + test
    return None


def open_splits(data, test_data: str | None = None, train_split: str = "train", test_split: str = "test") -> Splits:
    """The training and test sources of a DataConfig `data` (path, subdir, class_names, tfds_data_dir,
    max_image_pixels) and an optional test path; ValueError / FileNotFoundError saying what to give otherwise."""
    from clipsel_jax.data import image_folder, tfds_source

    if not data.path:
        raise ValueError("--data is required: a folder or .zip with train/ and test/ (or val/) inside, a training "
                         "folder with --test-data, or tfds:NAME; or a --config whose data section names one")
    if data.path.startswith("tfds:"):
        name = data.path[len("tfds:"):]
        train = tfds_source(name, data.subdir or train_split, data_dir=data.tfds_data_dir)
        test = tfds_source(name, test_split, data_dir=data.tfds_data_dir)
        where = f"tfds:{name} splits {data.subdir or train_split} / {test_split}"
    else:
        spec = data.path
        if data.subdir:  # the folder inside a zip (ARCHIVE.zip:inner) or a folder
            spec = f"{spec}:{data.subdir}" if spec.endswith(".zip") else str(Path(spec) / data.subdir)
        if test_data:
            train_spec, test_spec = spec, test_data
        else:
            found = find_splits(spec)
            if found is None:
                raise ValueError(f"no train/ and test/ (or val/) folders found in {spec!r}: give the training split "
                                 "as --data and the test split as --test-data (folders, zips, or ZIP:inner/folder)")
            train_spec, test_spec = found
        train, test = image_folder(train_spec), image_folder(test_spec)
        where = f"train {train_spec}, test {test_spec}"
    for s in (train, test):
        if data.max_image_pixels is not None and hasattr(s, "max_image_pixels"):
            s.max_image_pixels = data.max_image_pixels
    if list(train.class_names) != list(test.class_names):
        extra = sorted(set(test.class_names) - set(train.class_names))
        missing = sorted(set(train.class_names) - set(test.class_names))
        raise ValueError(f"the test split's classes differ from the training split's ({len(test.class_names)} vs "
                         f"{len(train.class_names)}; only in test: {extra[:5]}, only in train: {missing[:5]}); "
                         "both must hold the same class folders")
    stored = list(train.class_names)
    if data.class_names:
        from clipsel_jax.text import readable_class_names

        names = readable_class_names(stored, data.class_names)
        train.class_names = test.class_names = names
    return Splits(train, test, where, stored)


def load_images(source, positions=None, skip_unreadable: bool = False, threads: int = 4):
    """Decode the images of `source` at the given positions (default all, in order) into one uint8 (N, H, W, 3)
    array; returns (images, the positions decoded). An unreadable image is skipped with a warning when
    `skip_unreadable` (the test split), else an error naming it; ValueError when the sizes differ (the trainer
    needs one size)."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from clipsel_jax.data import UnreadableImage

    positions = np.arange(len(source)) if positions is None else np.asarray(positions, np.int64)

    def read(i):
        try:
            return source.read(int(i))
        except UnreadableImage as e:
            if not skip_unreadable:
                raise ValueError(f"{source.describe(int(i))} cannot be read: {e}") from None
            return None

    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(read, positions))
    ok = np.array([im is not None for im in images], bool)
    if not ok.all():
        warnings.warn(f"{int((~ok).sum())} unreadable images of {source!r} left out (first: "
                      f"{source.describe(int(positions[~ok][0]))})", stacklevel=2)
    images = [im for im in images if im is not None]
    if not images:
        raise ValueError(f"no readable images in {source!r}")
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ValueError(f"the images of {source!r} have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                         "the benchmark trains on one size: resize the data set first")
    return np.stack(images), positions[ok]
