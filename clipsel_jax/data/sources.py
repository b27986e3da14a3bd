"""Labeled image sources with one interface: stable integer ids, uint8 RGB images, integer labels, class names.

A source is a sequence of samples: ``len(src)``, ``src.class_names``, ``src.ids`` (int64; stable: a sample keeps
its id across runs), ``src.labels`` (int64, one per sample), ``src.describe(i)`` (a path or key for messages),
``src.read_example(i)`` -> (uint8 (H, W, 3), label) raising ``UnreadableImage`` for an image that cannot be
decoded, and ``src.fingerprint()`` (identity of the data, for caches). Sources pickle, so input-pipeline worker
processes can read from them.

- ``image_folder(path)``: ``<class>/<file>`` images in a folder or a .zip;
- ``from_arrays(images, labels, class_names)``: arrays in memory (a notebook);
- ``tfds_source(name, split)``: a prepared TFDS data set, read through ``tfds.data_source`` when prepared as
  array_record (random access, no TensorFlow needed), or streamed through ``tfds.load`` / tf.data when prepared
  as TFRecord (needs TensorFlow; ``embed`` reads such a source in order).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipsel_jax.data.preprocess import as_rgb_uint8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class UnreadableImage(Exception):
    """An image file that exists but cannot be decoded; carries the reason."""


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3). Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: keep the top 8 bits
                arr = np.asarray(im, dtype=np.float64)
                scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
                return as_rgb_uint8(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "L", "1", "F"):
                return as_rgb_uint8(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None


class Source:
    """Base class: subclasses set ``class_names`` and ``ids`` and implement ``__len__``, ``describe``,
    ``read_example`` (or ``read`` plus ``labels``) and ``fingerprint``."""

    class_names: list[str]
    ids: np.ndarray
    labels: np.ndarray

    def read(self, i: int) -> np.ndarray:
        return self.read_example(i)[0]

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        return self.read(i), int(self.labels[i])

    def label_of(self, i: int) -> int:
        """The label without decoding the image (-1 where unknown: a record that cannot be read at all)."""
        return int(self.labels[i])

    def __repr__(self):
        return f"{type(self).__name__}({len(self)} samples, {len(self.class_names)} classes)"


@dataclass(repr=False)
class ImageFolder(Source):
    """Images stored as ``<class>/<file>`` in a folder or inside a zip archive (classes and files sorted)."""

    location: str
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    _zip_path: str | None = None

    def __post_init__(self):
        self.ids = np.arange(len(self.files), dtype=np.int64)
        self._local = threading.local()  # one open ZipFile per thread: ZipFile objects are not thread-safe

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):  # the per-thread ZipFile handles stay behind
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def describe(self, i: int) -> str:
        return self.files[i]

    def read(self, i: int) -> np.ndarray:
        if self._zip_path is None:
            data = Path(self.files[i]).read_bytes()
        else:
            zf = getattr(self._local, "zf", None)
            if zf is None:
                zf = self._local.zf = zipfile.ZipFile(self._zip_path)
            data = zf.read(self.files[i])
        return decode_image(data)

    def fingerprint(self) -> str:
        """Identity of the listing and contents (paths, labels, and each file's CRC in a zip or size and
        modification time in a folder), for caches: a replaced image changes it."""
        h = hashlib.sha256(self.location.encode())
        if self._zip_path is not None:
            with zipfile.ZipFile(self._zip_path) as zf:
                stamps = [(i.CRC, i.file_size) for i in map(zf.getinfo, self.files)]
        else:
            stamps = [(st.st_size, st.st_mtime_ns) for st in (Path(f).stat() for f in self.files)]
        for f, y, st in zip(self.files, self.labels.tolist(), stamps):
            h.update(f"{f}\t{y}\t{st}\n".encode())
        return h.hexdigest()[:16]


def image_folder(path: str, subdir: str | None = None) -> ImageFolder:
    """A folder or .zip of ``<class>/<file>`` images. ``subdir`` selects a folder inside it (e.g. "train");
    ``archive.zip:inner/folder`` is the same as ``image_folder("archive.zip", "inner/folder")``."""
    spec = str(path)
    if ".zip:" in spec and subdir is None:
        spec, subdir = spec.split(".zip:", 1)
        spec += ".zip"
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image folder or zip {spec!r} does not exist")
    prefix = (subdir or "").strip("/")
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise ValueError(f"{spec!r} is a file but not a zip archive; give a folder or a .zip of <class>/<file>")
        with zipfile.ZipFile(p) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
        pre = prefix + "/" if prefix else ""
        entries = [(n, n[len(pre):].split("/")) for n in names if n.startswith(pre)]
        entries = [(n, parts) for n, parts in entries if len(parts) == 2]
        location = f"{p.resolve()}:{prefix}"
        zip_path = str(p)
    else:
        root = p / prefix if prefix else p
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        entries = [(str(f), [f.parent.name, f.name]) for f in root.glob("*/*") if f.is_file()]
        location = str(root.resolve())
        zip_path = None
    skipped = [n for n, _ in entries if Path(n).suffix.lower() not in IMAGE_SUFFIXES]
    if skipped:
        kinds = sorted({Path(n).suffix.lower() or "(no suffix)" for n in skipped})
        warnings.warn(f"{len(skipped)} files in class folders are not images by their suffix and are skipped "
                      f"({', '.join(kinds[:8])}; first: {skipped[0]})", stacklevel=2)
    entries = [(n, parts) for n, parts in entries if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if not entries:
        where = f"{spec}:{prefix}" if prefix else spec
        raise ValueError(f"no images found as <class>/<file> in {where!r} (image types: {sorted(IMAGE_SUFFIXES)})")
    class_names = sorted({parts[0] for _, parts in entries})
    index = {c: i for i, c in enumerate(class_names)}
    entries.sort(key=lambda e: (index[e[1][0]], e[1][1]))
    files = [n for n, _ in entries]
    labels = np.array([index[parts[0]] for _, parts in entries], dtype=np.int64)
    return ImageFolder(location, files, labels, class_names, zip_path)


# -------------------------------------------------------------------------------------------------------------
# Arrays in memory


def _check_labels(labels, n: int, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{what}: labels must be one integer per image ({n}), got shape {y.shape}")
    if n and not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{what}: labels must be integers (class indices), got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= n_classes))
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} labels are outside 0..{n_classes - 1} (the {n_classes} class names); "
                         f"first at index {bad[0]}: {y[bad[0]]}")
    return y


class ArraySource(Source):
    """Images held in memory: a uint8 array (N, H, W[, C]) or a list of uint8 arrays / PIL images of any sizes."""

    def __init__(self, images, labels, class_names, ids=None):
        if isinstance(images, np.ndarray):
            if images.ndim not in (3, 4):
                raise ValueError(f"from_arrays: images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
            if images.dtype != np.uint8:
                raise ValueError(f"from_arrays: images must be uint8, got {images.dtype}; convert floats in [0, 1] "
                                 "with (x * 255).round().astype(np.uint8)")
        elif not isinstance(images, (list, tuple)):
            raise TypeError(f"from_arrays: images must be a uint8 array or a list of images, got "
                            f"{type(images).__name__}")
        self.images = images
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise ValueError("from_arrays: class_names is empty; give one name per class")
        self.labels = _check_labels(labels, len(images), len(self.class_names), "from_arrays")
        self.ids = np.arange(len(images), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if self.ids.shape != (len(images),) or len(np.unique(self.ids)) != len(images):
            raise ValueError("from_arrays: ids must be one unique integer per image")
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return f"array[{i}]"

    def read(self, i: int) -> np.ndarray:
        try:
            return as_rgb_uint8(self.images[i], where=f"array[{i}]")
        except ValueError as e:
            raise UnreadableImage(str(e)) from None

    def fingerprint(self) -> str:
        """A hash of the pixels, labels, ids and class names (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.class_names).encode())
            h.update(self.labels.tobytes())
            h.update(self.ids.tobytes())
            items = [self.images] if isinstance(self.images, np.ndarray) else self.images
            for im in items:
                a = np.ascontiguousarray(np.asarray(im))
                h.update(str((a.shape, a.dtype.str)).encode())
                h.update(a.data)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def from_arrays(images, labels, class_names, ids=None) -> ArraySource:
    """A source over images in memory (uint8 (N, H, W[, C]) or a list of images), integer labels in
    [0, len(class_names)), and optional stable ids (default 0..N-1)."""
    return ArraySource(images, labels, class_names, ids)


# -------------------------------------------------------------------------------------------------------------
# TensorFlow Datasets


class TFDSSource(Source):
    """A split of a prepared TFDS data set, read by record index through ``tfds.data_source`` (array_record)."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # not found / not prepared / not array_record: tfds's own errors are long
            raise ValueError(
                f"TFDS data set {name!r} split {split!r} cannot be opened ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). tfds_source needs it prepared in array_record "
                f"format under data_dir ({data_dir or 'the TFDS default, ~/tensorflow_datasets'}): run "
                f"`tfds build {name} --file_format=array_record` (needs TensorFlow) where there is network, and "
                "copy the folder") from None
        self.class_names = _tfds_class_names(builder, name, image_key, label_key)
        self.full_name = builder.info.full_name
        self.ids = np.arange(len(self._ds), dtype=np.int64)
        self._labels = None

    def __len__(self) -> int:
        return len(self._ds)

    def describe(self, i: int) -> str:
        return f"{self.full_name}[{self.split}][{i}]"

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        try:
            ex = self._ds[int(i)]
        except Exception as e:  # a record that cannot be decoded: recorded by the caller, never a deep traceback
            raise UnreadableImage(f"{type(e).__name__}: {e}") from None
        try:
            return as_rgb_uint8(np.asarray(ex[self.image_key]), where=self.describe(i)), int(ex[self.label_key])
        except ValueError as e:
            raise UnreadableImage(str(e)) from None

    def label_of(self, i: int) -> int:
        try:
            return int(self._ds[int(i)][self.label_key])
        except Exception:
            return -1

    @property
    def labels(self) -> np.ndarray:
        """All labels (reads every record once; ``embed`` collects them as it goes instead)."""
        if self._labels is None:
            self._labels = np.array([self.label_of(i) for i in range(len(self))], np.int64)
        return self._labels

    def fingerprint(self) -> str:
        where = str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else "default"
        key = f"tfds\t{self.full_name}\t{self.split}\t{len(self)}\t{where}\t{self.image_key}\t{self.label_key}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class TFDSStreamSource(Source):
    """A split of a TFDS set prepared as TFRecord (TFDS's default format), read in order through ``tfds.load`` /
    tf.data: TensorFlow reads the records, clipsel_jax decodes and resizes them (the same code as every other
    source, so the features are identical). ``embed`` streams it (``stream``); ``read_example`` reads single
    records and is meant for a few (the report's galleries)."""

    streaming = True

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str, builder):
        if "[" in split or "+" in split:
            raise ValueError(f"split {split!r}: a TFRecord-prepared set is read by plain split name (train, test, "
                             "...); take a part of it with embed(limit=N) / --limit")
        if split not in builder.info.splits:
            raise ValueError(f"TFDS data set {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self.class_names = _tfds_class_names(builder, name, image_key, label_key)
        self.full_name = builder.info.full_name
        self._n = int(builder.info.splits[split].num_examples)
        self.ids = np.arange(self._n, dtype=np.int64)
        self._labels = None

    def __len__(self) -> int:
        return self._n

    def describe(self, i: int) -> str:
        return f"{self.full_name}[{self.split}][{i}]"

    def stream(self, start: int, stop: int, keep: np.ndarray | None = None):
        """(record index, encoded image bytes or array, label) for the records in [start, stop) where keep[i -
        start] (all when None), in order. Files before `start` are skipped without reading them."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        ds = tfds.load(self.name, split=f"{self.split}[{start}:{stop}]", data_dir=self.data_dir, download=False,
                       shuffle_files=False, decoders={self.image_key: tfds.decode.SkipDecoding()},
                       read_config=tfds.ReadConfig(try_autocache=False))
        ds = ds.enumerate(start)
        if keep is not None:
            mask = tf.constant(np.asarray(keep, bool))
            ds = ds.filter(lambda i, ex: tf.gather(mask, i - start))
        ds = ds.map(lambda i, ex: (i, ex[self.image_key], ex[self.label_key])).prefetch(tf.data.AUTOTUNE)
        for i, image, label in ds.as_numpy_iterator():
            yield int(i), image, int(label)

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        _, image, label = next(self.stream(int(i), int(i) + 1))
        return decode_record_image(image, self.describe(i)), label

    def label_of(self, i: int) -> int:
        return int(next(self.stream(int(i), int(i) + 1))[2])

    @property
    def labels(self) -> np.ndarray:
        """All labels (one pass over the split; ``embed`` collects them as it goes instead)."""
        if self._labels is None:
            self._labels = np.array([y for _, _, y in self.stream(0, self._n)], np.int64)
        return self._labels

    def fingerprint(self) -> str:
        where = str(Path(self.data_dir).expanduser().resolve()) if self.data_dir else "default"
        key = (f"tfds-tfrecord\t{self.full_name}\t{self.split}\t{self._n}\t{where}\t{self.image_key}\t"
               f"{self.label_key}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def decode_record_image(image, where: str) -> np.ndarray:
    """A record's image as uint8 RGB: encoded bytes (PNG/JPEG, as TFDS stores Image features) or an array."""
    if isinstance(image, (bytes, np.bytes_)):
        return decode_image(bytes(image))
    try:
        return as_rgb_uint8(np.asarray(image), where=where)
    except ValueError as e:
        raise UnreadableImage(str(e)) from None


def _tfds_class_names(builder, name, image_key, label_key) -> list[str]:
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"TFDS data set {name!r} has no feature {key!r}; its features are "
                             f"{sorted(features.keys())}: pass image_key= / label_key=")
    label = features[label_key]
    if not hasattr(label, "names"):
        raise ValueError(f"feature {label_key!r} of {name!r} is not a ClassLabel; pass the integer class "
                         "feature as label_key=")
    return list(label.names)


def tfds_source(name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", reader: str = "auto") -> Source:
    """A TFDS data set (e.g. ``tfds_source("cifar10", "train")``) as a source. Sample ids are record indices within
    the split; class names come from the label feature's names.

    reader: "array_record" reads through ``tfds.data_source`` (random access, no TensorFlow needed);
    "tf" reads a TFRecord-prepared set in order through ``tfds.load`` / tf.data (needs TensorFlow: the
    ``[tf]`` extra); "auto" (default) picks "tf" for a set prepared as TFRecord, else "array_record".
    """
    if reader not in ("auto", "array_record", "tf"):
        raise ValueError(f"reader must be auto, array_record or tf, got {reader!r}")
    if reader != "array_record":
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            prepared_as_tfrecord = builder.is_prepared() and str(builder.info.file_format).lower().endswith(
                "tfrecord")
        except Exception:  # unknown name etc.: the array_record path gives the full message
            builder, prepared_as_tfrecord = None, False
        if reader == "tf" or prepared_as_tfrecord:
            if builder is None or not builder.is_prepared():
                raise ValueError(f"TFDS data set {name!r} is not prepared under data_dir "
                                 f"({data_dir or 'the TFDS default'}): run `tfds build {name}` first")
            import importlib.util

            if importlib.util.find_spec("tensorflow") is None:
                raise ValueError(f"TFDS data set {name!r} is prepared as TFRecord, which is read through tf.data: "
                                 "install TensorFlow (pip install 'clipsel_jax[tf]'), or rebuild it as "
                                 f"array_record (`tfds build {name} --file_format=array_record`) to read it "
                                 "without TensorFlow")
            return TFDSStreamSource(name, split, data_dir, image_key, label_key, builder)
    return TFDSSource(name, split, data_dir, image_key, label_key)
