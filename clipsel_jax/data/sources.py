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

Data files are untrusted input. An image that cannot be read is one ``UnreadableImage`` (recorded by ``embed``,
the run goes on): a broken or empty file, a link that cannot be followed (dangling, a loop: listed, not dropped),
or an image that declares more than ``max_image_pixels`` pixels (a decompression bomb: a small file that would
decode to gigabytes; the declared size is checked before decoding, with this limit in place of PIL's
process-global ``Image.MAX_IMAGE_PIXELS``). Zip entries with absolute paths, drive letters, backslashes or
``..`` are skipped with a warning (their class would be wrong); images listed under two classes (class folders or
files that are links to the same place) are warned about.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipsel_jax.data.preprocess import as_rgb_uint8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

# Images declaring more pixels than this are unreadable, refused before decoding: a few KB of PNG can declare
# 30000x30000 pixels and decode to gigabytes. PIL's own default (1024**3 // 4 // 3): 256 MiB decoded as RGB, per
# image and decoding thread; photos and scans are far below it, and what PIL reads without a warning reads here.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_PIL_LIMIT_LOCK = threading.Lock()


class UnreadableImage(Exception):
    """An image file that exists but cannot be decoded; carries the reason."""


@contextlib.contextmanager
def _without_pil_limit():
    """PIL's own pixel limit off, so that ours applies: Image.MAX_IMAGE_PIXELS is process-global (it warns above it
    and raises above twice it), so it is set and restored under a lock that decoding threads share."""
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 (H, W, 3). Grayscale, palette, RGBA, CMYK and 16-bit images are converted to RGB.
    An image declaring more than `max_pixels` pixels (None: no limit) is refused before it is decoded."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with _without_pil_limit():  # Image.open reads only the header: quick, even under the lock
            im = Image.open(io.BytesIO(data))
        with im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise UnreadableImage(
                    f"the image declares {w}x{h} pixels, more than the limit of {max_pixels} (a decompression "
                    "bomb?); if it is genuine, raise the limit: the source's max_image_pixels "
                    "(image_folder(..., max_image_pixels=N), --max-image-pixels N)")
            # Some formats (TIFF, GIF) check PIL's limit again while decoding: an image above PIL's default that
            # ours allows decodes with PIL's off, one at a time (which also bounds the memory such images take)
            with _without_pil_limit() if w * h > DEFAULT_MAX_IMAGE_PIXELS else contextlib.nullcontext():
                im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: keep the top 8 bits
                arr = np.asarray(im, dtype=np.float64)
                scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
                return as_rgb_uint8(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "L", "1", "F"):
                return as_rgb_uint8(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None


def _read_file(path: str) -> bytes:
    """A file's bytes; a file that cannot be read (a dangling link, a link loop, gone, no permission) is one
    unreadable image, not the end of the run."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        if os.path.islink(path):
            raise UnreadableImage("symbolic link loop" if e.errno == errno.ELOOP
                                  else f"dangling symbolic link (to {os.readlink(path)})") from None
        raise UnreadableImage(f"{type(e).__name__}: {e.strerror}") from None


def _file_stamp(path: str):
    """(size, modification time) of a file; of the link itself where it cannot be followed (dangling, a loop);
    the error's name where even that fails (gone since listing)."""
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)
        except OSError as e:
            return type(e).__name__
    return st.st_size, st.st_mtime_ns


class Source:
    """Base class: subclasses set ``class_names`` and ``ids`` and implement ``__len__``, ``describe``,
    ``read_example`` (or ``read`` plus ``labels``) and ``fingerprint``."""

    class_names: list[str]
    ids: np.ndarray
    labels: np.ndarray
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # used by sources that decode encoded images

    def read(self, i: int) -> np.ndarray:
        return self.read_example(i)[0]

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        return self.read(i), int(self.labels[i])

    def label_of(self, i: int) -> int:
        """The label without decoding the image (-1 where unknown: a record that cannot be read at all)."""
        return int(self.labels[i])

    def spec(self) -> dict | None:
        """How to open this source again (see source_spec), or None where it cannot be (arrays in memory)."""
        return None

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
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are unreadable (None: no limit)
    origin: str | None = None  # the URL of a zip read from a bucket (its local copy is _zip_path)

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

    def read_bytes(self, i: int) -> bytes:
        """The stored file of sample i, undecoded (UnreadableImage where it cannot be read)."""
        if self._zip_path is None:
            return _read_file(self.files[i])
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = self._local.zf = zipfile.ZipFile(self._zip_path)
        try:
            return zf.read(self.files[i])
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
            # a damaged entry (bad CRC, truncated), an unsupported compression, or encrypted
            raise UnreadableImage(f"zip entry: {type(e).__name__}: {e}") from None

    def read(self, i: int) -> np.ndarray:
        return decode_image(self.read_bytes(i), self.max_image_pixels)

    @property
    def is_zip(self) -> bool:
        return self._zip_path is not None

    def spec(self) -> dict:
        if self._zip_path is not None:
            return source_spec(self.origin or str(Path(self._zip_path).resolve()),
                               self.location.rsplit(":", 1)[1] or None)
        return source_spec(self.location)

    def path_of(self, i: int) -> str:
        """Where sample i lives, as another program can open it: the absolute file path, or ARCHIVE.zip:entry (the
        archive's URL for a zip read from a bucket)."""
        if self._zip_path is not None:
            return f"{self.origin or Path(self._zip_path).resolve()}:{self.files[i]}"
        return str(Path(self.files[i]).absolute())

    def fingerprint(self) -> str:
        """Identity of the listing and contents (paths, labels, and each file's CRC in a zip or size and
        modification time in a folder), for caches: a replaced image changes it. A zip from a bucket is named by
        its URL, so that its copy on another machine keeps the embedding cache's key."""
        where = self.location if self.origin is None else f"{self.origin}:{self.location.rsplit(':', 1)[1]}"
        h = hashlib.sha256(where.encode())
        if self._zip_path is not None:
            with zipfile.ZipFile(self._zip_path) as zf:
                stamps = [(i.CRC, i.file_size) for i in map(zf.getinfo, self.files)]
        else:
            stamps = [_file_stamp(f) for f in self.files]
        for f, y, st in zip(self.files, self.labels.tolist(), stamps):
            h.update(f"{f}\t{y}\t{st}\n".encode())
        h.update(_limit_tag(self.max_image_pixels).encode())
        return h.hexdigest()[:16]


def _limit_tag(max_image_pixels) -> str:
    """For fingerprints: the pixel limit decides which images are read, so a changed one is other data (the
    default adds nothing, so fingerprints from before the limit existed stay valid)."""
    return "" if max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS else f"\tmax_image_pixels={max_image_pixels}"


_DRIVE = re.compile(r"[A-Za-z]:")


def _unsafe_entry(name: str) -> bool:
    """A zip entry name that is absolute, has a drive letter or backslashes, or '.', '..' or empty parts: its
    class would be wrong (a class named '..'), and an extracting tool would write it outside the folder."""
    return (name.startswith("/") or "\\" in name or _DRIVE.match(name) is not None
            or any(part in ("", ".", "..") for part in name.split("/")))


def _real(path: str) -> str | None:
    """The resolved path, None for a link that cannot be followed (a loop raises RuntimeError before Python
    3.13, OSError after; a dangling link, FileNotFoundError)."""
    try:
        return str(Path(path).resolve(strict=True))
    except (OSError, RuntimeError):
        return None


def _list_folder(root: Path) -> list[tuple[str, list[str]]]:
    """(path, [class, file name]) for the files in root's class folders, and for links there that cannot be
    followed (dangling, loops: listed, so that they are recorded as unreadable rather than vanish). Warns about
    images listed under two classes: class folders, or files, that are links to the same place."""
    folders = {d.name: _real(d.path) for d in os.scandir(root) if os.path.isdir(d.path)}  # isdir: False on a loop
    same = {}
    for name, real in sorted(folders.items()):
        same.setdefault(real, []).append(name)
    for real, names in same.items():
        if len(names) > 1:
            warnings.warn(f"class folders {', '.join(names)} in {root} are the same folder ({real}): each of its "
                          "images is listed once per class", stacklevel=3)
    entries, seen, twice = [], {}, []
    for c in sorted(folders):
        for f in os.scandir(Path(root, c)):
            if f.is_symlink():  # listed when it leads to a file or nowhere; never to a folder, a FIFO or a device
                if not (os.path.isfile(f.path) or not os.path.exists(f.path)):
                    continue
                real = _real(f.path)
            elif f.is_file():
                real = os.path.join(folders[c], f.name)  # no system call per plain file
            else:
                continue
            entries.append((f.path, [c, f.name]))
            first_class, first_path = seen.setdefault(real, (c, f.path)) if real else (c, None)
            if folders[first_class] != folders[c]:
                twice.append((first_path, f.path))
    if twice:
        warnings.warn(f"{len(twice)} files in {root} are listed under two classes (links to the same file), e.g. "
                      f"{twice[0][0]} and {twice[0][1]}", stacklevel=3)
    return entries


def image_folder(path: str, subdir: str | None = None,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageFolder:
    """A folder or .zip of ``<class>/<file>`` images. ``subdir`` selects a folder inside it (e.g. "train");
    ``archive.zip:inner/folder`` is the same as ``image_folder("archive.zip", "inner/folder")``.
    ``max_image_pixels``: images declaring more pixels are unreadable (decompression bombs); None: no limit."""
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be a positive number of pixels or None, got {max_image_pixels}")
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
        names = [n for n in names if n.startswith(pre)]
        unsafe = [n for n in names if _unsafe_entry(n)]
        entries = [(n, n[len(pre):].split("/")) for n in names if not _unsafe_entry(n)]
        entries = [(n, parts) for n, parts in entries if len(parts) == 2]
        if unsafe:
            shown = ", ".join(map(repr, unsafe[:5])) + (", ..." if len(unsafe) > 5 else "")
            if not entries:
                raise ValueError(f"no usable images in {spec!r}: its {len(unsafe)} entries with unsafe paths "
                                 f"(absolute, a drive letter, backslashes, '.', '..' or empty parts) are refused "
                                 f"({shown})")
            warnings.warn(f"{len(unsafe)} zip entries with unsafe paths (absolute, a drive letter, backslashes, "
                          f"'.', '..' or empty parts) are skipped: {shown}", stacklevel=2)
        location = f"{p.resolve()}:{prefix}"
        zip_path = str(p)
    else:
        root = p / prefix if prefix else p
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        entries = _list_folder(root)
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
    return ImageFolder(location, files, labels, class_names, zip_path, max_image_pixels)


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
    """A split of a prepared TFDS data set, read by record index through ``tfds.data_source`` (array_record).
    Encoded images (an ``Image`` feature) are decoded here, as every other source's, with ``max_image_pixels``."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self.max_image_pixels = max_image_pixels
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            image = builder.info.features[image_key] if image_key in builder.info.features else None
            encoded = isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                        decoders={image_key: tfds.decode.SkipDecoding()} if encoded else None)
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

    def spec(self) -> dict:
        return source_spec(f"tfds:{self.name}", self.split, self.data_dir)

    def describe(self, i: int) -> str:
        return f"{self.full_name}[{self.split}][{i}]"

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        try:
            ex = self._ds[int(i)]
        except Exception as e:  # a record that cannot be decoded: recorded by the caller, never a deep traceback
            raise UnreadableImage(f"{type(e).__name__}: {e}") from None
        image = decode_record_image(ex[self.image_key], self.describe(i), self.max_image_pixels)
        return image, int(ex[self.label_key])

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
        where = source_spec("tfds:", None, self.data_dir)["tfds_data_dir"] or "default"  # a gs:// dir stays a URL
        key = f"tfds\t{self.full_name}\t{self.split}\t{len(self)}\t{where}\t{self.image_key}\t{self.label_key}"
        key += _limit_tag(self.max_image_pixels)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class TFDSStreamSource(Source):
    """A split of a TFDS set prepared as TFRecord (TFDS's default format), read in order through ``tfds.load`` /
    tf.data: TensorFlow reads the records, clipsel_jax decodes and resizes them (the same code as every other
    source, so the features are identical). ``embed`` streams it (``stream``); ``read_example`` reads single
    records and is meant for a few (the report's galleries)."""

    streaming = True

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str, builder,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if "[" in split or "+" in split:
            raise ValueError(f"split {split!r}: a TFRecord-prepared set is read by plain split name (train, test, "
                             "...); take a part of it with embed(limit=N) / --limit")
        if split not in builder.info.splits:
            raise ValueError(f"TFDS data set {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self.max_image_pixels = max_image_pixels
        self.class_names = _tfds_class_names(builder, name, image_key, label_key)
        self.full_name = builder.info.full_name
        self._n = int(builder.info.splits[split].num_examples)
        self.ids = np.arange(self._n, dtype=np.int64)
        self._labels = None

    def __len__(self) -> int:
        return self._n

    def spec(self) -> dict:
        return source_spec(f"tfds:{self.name}", self.split, self.data_dir)

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
        return decode_record_image(image, self.describe(i), self.max_image_pixels), label

    def label_of(self, i: int) -> int:
        return int(next(self.stream(int(i), int(i) + 1))[2])

    @property
    def labels(self) -> np.ndarray:
        """All labels (one pass over the split; ``embed`` collects them as it goes instead)."""
        if self._labels is None:
            self._labels = np.array([y for _, _, y in self.stream(0, self._n)], np.int64)
        return self._labels

    def fingerprint(self) -> str:
        where = source_spec("tfds:", None, self.data_dir)["tfds_data_dir"] or "default"  # a gs:// dir stays a URL
        key = (f"tfds-tfrecord\t{self.full_name}\t{self.split}\t{self._n}\t{where}\t{self.image_key}\t"
               f"{self.label_key}{_limit_tag(self.max_image_pixels)}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def decode_record_image(image, where: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """A record's image as uint8 RGB: encoded bytes (PNG/JPEG, as TFDS stores Image features; refused above
    `max_pixels` pixels) or an array."""
    if isinstance(image, (bytes, np.bytes_)):
        return decode_image(bytes(image), max_pixels)
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
                label_key: str = "label", reader: str = "auto",
                max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Source:
    """A TFDS data set (e.g. ``tfds_source("cifar10", "train")``) as a source. Sample ids are record indices within
    the split; class names come from the label feature's names.

    reader: "array_record" reads through ``tfds.data_source`` (random access, no TensorFlow needed);
    "tf" reads a TFRecord-prepared set in order through ``tfds.load`` / tf.data (needs TensorFlow: the
    ``[tf]`` extra); "auto" (default) picks "tf" for a set prepared as TFRecord, else "array_record".
    max_image_pixels: images declaring more pixels are unreadable (decompression bombs); None: no limit.
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
            return TFDSStreamSource(name, split, data_dir, image_key, label_key, builder, max_image_pixels)
    return TFDSSource(name, split, data_dir, image_key, label_key, max_image_pixels)


# -------------------------------------------------------------------------------------------------------------
# A source's description (the CLI's --data, a workdir's record of it; opened again by data/reopen.py)

DEMO = "demo"  # the 2,000-image CIFAR-10 set shipped in the package


def source_spec(path: str | None, subdir: str | None = None, tfds_data_dir: str | None = None,
                class_names: str | None = None) -> dict:
    """How a source was opened, with absolute paths (recorded in meta.json as ``data_spec``), so that later
    commands (report, export) can open it again from another working directory."""
    def absolute(p):  # URLs (a TFDS data_dir in gs://) stay as they are
        if p is None or p == DEMO or p.startswith("tfds:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", p):
            return p
        return str(Path(p).expanduser().resolve())

    if path and ".zip:" in path and path != DEMO:
        archive, inner = path.split(".zip:", 1)
        path = absolute(archive + ".zip") + ":" + inner
    else:
        path = absolute(path)
    return {"data": path, "subdir": subdir, "tfds_data_dir": absolute(tfds_data_dir),
            "class_names": absolute(class_names)}


def positions_of(source: Source, ids) -> np.ndarray:
    """Positions in `source` (what read() takes) of the given sample ids (stable ids, e.g. a selection's); a
    ValueError when any id is not in the source (another data set, or it changed since)."""
    ids = np.asarray(ids, np.int64)
    src_ids = np.asarray(source.ids)
    if len(src_ids) == 0:
        raise ValueError("the source holds no samples; pass the --data the selection was made from")
    order = np.argsort(src_ids, kind="stable")
    # Clipped: an id past the largest of another source's would index out of range before the check below.
    pos = order[np.minimum(np.searchsorted(src_ids, ids, sorter=order), len(order) - 1)]
    if not np.array_equal(src_ids[pos], ids):
        missing = ids[src_ids[pos] != ids]
        raise ValueError(f"the source is not the one the selection was made from: {len(missing)} sample ids are not "
                         f"in it (first: {int(missing[0])}); pass the same --data as for the selection")
    return pos
