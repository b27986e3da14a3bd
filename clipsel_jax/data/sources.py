"""Labeled image sources with one interface: stable integer ids, uint8 RGB images, integer labels, class names.

A source is a sequence: ``len(src)``, ``src.labels`` (int64, one per sample), ``src.class_names``, ``src.ids``
(stable: a sample keeps its id across runs), ``src.describe(i)`` (a path or key for messages) and
``src.read(i)`` -> uint8 (H, W, 3), raising ``UnreadableImage`` for a file that cannot be decoded.
"""

from __future__ import annotations

import hashlib
import io
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


@dataclass
class ImageFolder:
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
        """Identity of the listing (paths and labels), for caches."""
        h = hashlib.sha256(self.location.encode())
        for f, y in zip(self.files, self.labels.tolist()):
            h.update(f"{f}\t{y}\n".encode())
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
