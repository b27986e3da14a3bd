"""The last stage: the kept subset as the input of a training job.

    load_kept(workdir)                   what a selection kept (ids, labels, preferred class and its confidence),
                                         read from selection.npz / meta.json and checked
    kept_source(source, kept)            a Source of the kept samples only (folders, zips, arrays, TFDS array_record)
    grain_dataset(source, kept)          a grain MapDataset of {"image", "label", "id"} over the kept samples
    tfds_grain_dataset(name, split, kept)  TFDS's own examples at the kept record indices, random access
                                         (tfds.data_source, array_record), as a grain MapDataset
    tfds_tf_dataset(name, split, kept)   the kept records of a TFRecord-prepared TFDS set as a tf.data pipeline
    write_kept_list(kept, path, source)  the kept samples as CSV (id, path, label, ...) or TXT (one path per line)
    export_folder(source, kept, to)      the kept images as a <class>/<file> folder (hard links, copies or links),
                                         optionally relabelled (relabeled.csv lists every move for review)

`kept` is anywhere a Kept, a Selection, a workdir of `clipsel select`, or the kept sample ids themselves. Sample
ids are the source's stable ids (record indices for TFDS, positions in a sorted listing for folders): a selection
applies to the source it was made from, and a source whose ids do not cover it is refused.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsel_jax.data.reopen import open_source
from clipsel_jax.data.sources import ImageFolder, Source, UnreadableImage, positions_of
from clipsel_jax.storage import LOCAL_ONLY

RECORD_INDEX = "record_index"  # the key the TFDS inputs add to each example: its index in the split
EXPORT_MARKER = "clipsel_export.json"


@dataclass(frozen=True)
class Kept:
    """The kept samples of a selection, in the order of the selection's indices (k,)."""

    ids: np.ndarray  # int64: the source's sample ids
    labels: np.ndarray  # int64: the given labels
    preferred_class: np.ndarray  # int64: the class whose prompt each image is closest to
    preferred_confidence: np.ndarray  # float32: its probability (NaN where the selection did not record it)
    class_names: list[str]
    data_spec: dict | None = None  # how the source was opened (meta.json), to open it again
    fingerprint: str = ""  # of the ids and labels: which selection an export came from

    def relabel(self, min_confidence: float) -> tuple[np.ndarray, np.ndarray]:
        """(labels, changed): the preferred class where it differs from the given label with a probability of at
        least min_confidence, the given label elsewhere; changed marks the relabelled samples. A suggestion for
        review, not ground truth."""
        from clipsel_jax import checks

        t = checks.number("min_confidence", min_confidence, lo=0, hi=1, lo_open=True)
        if np.isnan(self.preferred_confidence).any():
            raise ValueError("this selection has no preferred-class confidences (made by an older clipsel_jax): run "
                             "`clipsel select` again to relabel")
        changed = (self.preferred_class != self.labels) & (self.preferred_confidence >= t)
        return np.where(changed, self.preferred_class, self.labels), changed

    def __len__(self) -> int:
        return len(self.ids)

    def open_source(self, class_names: bool = False, max_image_pixels: int | None = None) -> Source:
        """The source the selection was made from, opened again from meta.json's record of it (class_names: with
        the readable class names the selection used, rather than the stored ones)."""
        spec = self.data_spec or {}
        if not spec.get("data"):
            raise ValueError("this selection does not record its source (it was made from an embeddings file "
                             "without --data): pass the source (--data) the embeddings were made from")
        return open_source(spec["data"], spec.get("subdir"), spec.get("tfds_data_dir"),
                           spec.get("class_names") if class_names else None, max_image_pixels)


def load_kept(workdir) -> Kept:
    """The kept samples of the selection in `workdir` (selection.npz and meta.json of `clipsel select` or
    pipeline.write_selection). The files are checked as untrusted input: indices in range, one id and label per
    sample, labels within the classes. A gs:// (any fsspec) workdir is read through its local mirror."""
    from clipsel_jax import storage
    from clipsel_jax.report import load_outputs

    if storage.is_remote(workdir):
        with storage.synced(workdir) as local:
            return load_kept(local)

    try:
        a, meta = load_outputs(workdir)
    except FileNotFoundError:  # says which file and what to run
        raise
    except Exception as e:  # a damaged npz or json: zipfile.BadZipFile, ValueError, ...
        raise ValueError(f"{workdir}: the selection files cannot be read ({type(e).__name__}: {e}); run `clipsel "
                         "select` with this --workdir again") from None
    missing = [k for k in ("indices", "ids", "labels") if k not in a]
    if missing:
        raise ValueError(f"{workdir}/selection.npz lacks {', '.join(missing)}: not a selection of clipsel_jax")
    ids, labels, idx = (np.asarray(a[k]) for k in ("ids", "labels", "indices"))
    n = len(ids)
    names = meta.get("class_names") or [str(i) for i in range(int(meta.get("num_classes") or 0))]
    spec = meta.get("data_spec")
    bad = None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        bad = "meta.json's class_names must be a list of names"
    elif spec is not None and (not isinstance(spec, dict) or not all(
            v is None or isinstance(v, str) for v in spec.values())):
        bad = "meta.json's data_spec must map names to paths"
    elif ids.ndim != 1 or labels.shape != ids.shape or idx.ndim != 1:
        bad = f"ids {ids.shape}, labels {labels.shape} and indices {idx.shape} must be 1-D, ids and labels alike"
    elif not all(np.issubdtype(x.dtype, np.integer) for x in (ids, labels, idx)):
        bad = "ids, labels and indices must be integers"
    elif len(idx) and (idx.min() < 0 or idx.max() >= n or np.any(np.diff(idx) <= 0)):
        bad = f"indices must be increasing and within 0..{n - 1}"
    elif n and (labels.min() < 0 or labels.max() >= len(names)):
        bad = f"labels must be within 0..{len(names) - 1} (the {len(names)} classes of meta.json)"
    if bad is not None:
        raise ValueError(f"{workdir}: the selection files are inconsistent ({bad}); run `clipsel select` again")
    pref = np.asarray(a.get("preferred_class", labels))
    conf = np.asarray(a["preferred_confidence"] if "preferred_confidence" in a else np.full(n, np.nan), np.float32)
    if pref.shape != (n,) or conf.shape != (n,) or (n and (pref.min() < 0 or pref.max() >= len(names))):
        raise ValueError(f"{workdir}: selection.npz is inconsistent (preferred_class / preferred_confidence); run "
                         "`clipsel select` again")
    return _kept(ids[idx], labels[idx], pref[idx], conf[idx], names, spec)


def _kept(ids, labels, preferred, confidence, class_names, data_spec) -> Kept:
    """A Kept, its fingerprint (which selection an export came from) taken of the kept ids and labels."""
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    h = hashlib.sha256(ids.tobytes() + labels.tobytes()).hexdigest()[:16]
    return Kept(ids, labels, np.asarray(preferred, np.int64), np.asarray(confidence, np.float32),
                list(class_names), data_spec, h)


def as_kept(kept) -> Kept | np.ndarray:
    """A Kept from a workdir path or a Selection; an array of ids stays an int64 array."""
    if isinstance(kept, Kept):
        return kept
    if isinstance(kept, (str, os.PathLike)):
        return load_kept(kept)
    if hasattr(kept, "indices") and hasattr(kept, "mask"):  # a pipeline.Selection
        n = len(kept.mask)
        if kept.labels is None:
            raise ValueError("this Selection carries no labels; pass its kept ids (sel.ids[sel.indices]) instead")
        ids = np.arange(n, dtype=np.int64) if kept.ids is None else np.asarray(kept.ids, np.int64)
        pref = kept.labels if kept.preferred_class is None else kept.preferred_class
        conf = np.full(n, np.nan, np.float32) if kept.preferred_confidence is None else kept.preferred_confidence
        idx = kept.indices
        return _kept(ids[idx], np.asarray(kept.labels)[idx], np.asarray(pref)[idx], np.asarray(conf)[idx],
                     kept.meta.get("class_names") or [], kept.meta.get("data_spec"))
    ids = np.asarray(kept)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or len(ids) == 0):
        raise TypeError(f"kept must be a workdir, a Selection, a Kept or a 1-D array of sample ids; got "
                        f"{type(kept).__name__} {getattr(ids, 'shape', '')}")
    return ids.astype(np.int64)


# -------------------------------------------------------------------------------------------------------------
# A source of the kept samples, and a grain dataset over it


class KeptSource(Source):
    """The kept samples of `base`, in the selection's order; ids, labels and images are the base's."""

    def __init__(self, base: Source, ids):
        if getattr(base, "streaming", False):
            raise ValueError("this TFDS set is prepared as TFRecord, which is read in order, not by record: use "
                             "clipsel_jax.subset.tfds_tf_dataset for its kept records (or rebuild it as "
                             "array_record for random access)")
        self.base = base
        self.ids = np.asarray(ids, np.int64)
        self.positions = positions_of(base, self.ids)
        self.class_names = base.class_names
        self.max_image_pixels = base.max_image_pixels

    def __len__(self) -> int:
        return len(self.positions)

    def describe(self, i: int) -> str:
        return self.base.describe(int(self.positions[i]))

    def read_example(self, i: int) -> tuple[np.ndarray, int]:
        return self.base.read_example(int(self.positions[i]))

    def label_of(self, i: int) -> int:
        return self.base.label_of(int(self.positions[i]))

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.label_of(i) for i in range(len(self))], np.int64)

    def fingerprint(self) -> str:
        return hashlib.sha256((self.base.fingerprint() + "kept").encode() + self.ids.tobytes()).hexdigest()[:16]


def kept_source(source: Source, kept) -> KeptSource:
    """A Source of the kept samples of `source` (the one the selection was made from); usable wherever a source is
    (``embed``, ``train`` loops, ``grain_dataset``). Where the selection recorded labels and the source has them at
    hand (folders, zips, arrays), they must agree: a relabelled or reordered source is refused."""
    k = as_kept(kept)
    sub = KeptSource(source, k.ids if isinstance(k, Kept) else k)
    held = vars(source).get("labels")  # labels in memory only: a TFDS source's property would read every record
    if isinstance(k, Kept) and isinstance(held, np.ndarray) and len(sub):
        given = held[sub.positions]
        differ = np.flatnonzero(given != k.labels)
        if len(differ):
            raise ValueError(f"the source's labels differ from the selection's for {len(differ)} kept samples "
                             f"(first: {sub.describe(int(differ[0]))}); pass the source the selection was made "
                             "from")
    return sub


class _Examples:
    """Random access to the kept samples as dicts (a grain RandomAccessDataSource; picklable for worker
    processes)."""

    def __init__(self, source: KeptSource, labels: np.ndarray | None, image_size):
        self.source, self.labels, self.image_size = source, labels, image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        i = int(i)
        try:
            image, label = self.source.read_example(i)
        except UnreadableImage as e:
            raise UnreadableImage(f"{self.source.describe(i)}: {e} (it was readable when the selection was "
                                  "made)") from None
        if self.image_size is not None and image.shape[:2] != self.image_size:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize(self.image_size[::-1], Image.BILINEAR))
        return {"image": image, "label": np.int64(label if self.labels is None else self.labels[i]),
                "id": np.int64(self.source.ids[i])}

    def __repr__(self):
        return f"kept samples of {self.source.base!r}"


def grain_dataset(source: Source, kept, *, labels=None, image_size: int | tuple[int, int] | None = None):
    """The kept samples of `source` as a ``grain.MapDataset`` of {"image": uint8 (H, W, 3), "label": int64,
    "id": int64} (random access: shuffle, batch, map and iterate it as any grain dataset). labels: one label per
    kept sample to train on instead of the given ones (e.g. ``Kept.relabel(0.9)[0]``); image_size: resize every
    image to (H, W) (an int: square), so that batches stack."""
    import grain

    from clipsel_jax import checks

    sub = kept_source(source, kept)
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (len(sub),):
            raise ValueError(f"labels must be one per kept sample ({len(sub)}), got shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(sub.class_names)):
            raise ValueError(f"labels must be within 0..{len(sub.class_names) - 1}")
    if image_size is not None:
        size = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        image_size = tuple(checks.number("image_size", s, lo=1, integer=True) for s in size)
    return grain.MapDataset.source(_Examples(sub, labels, image_size))


# -------------------------------------------------------------------------------------------------------------
# TFDS: the kept records as TFDS's own examples


def _record_indices(kept, n: int, name: str | None, split: str) -> np.ndarray:
    """The kept record indices, checked against the split's size (and its name, where the selection recorded
    where it was made from and `name` is known)."""
    k = as_kept(kept)
    if name is not None and isinstance(k, Kept) and k.data_spec and k.data_spec.get("data"):
        made_from = (k.data_spec["data"], k.data_spec.get("subdir") or "train")
        if made_from != (f"tfds:{name}", split):
            raise ValueError(f"this selection was made from {made_from[0]} split {made_from[1]}, not tfds:{name} "
                             f"split {split}")
    idx = k.ids if isinstance(k, Kept) else k
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"record indices must be within 0..{n - 1} (split {split!r} holds {n}); this "
                         "selection was made from another data set or split")
    return np.asarray(idx, np.int64)


class _Records:
    """The records of a TFDS data source at given indices, each with its index under RECORD_INDEX."""

    def __init__(self, data_source, indices: np.ndarray):
        self.data_source, self.indices = data_source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        r = int(self.indices[int(i)])
        return {**self.data_source[r], RECORD_INDEX: np.int64(r)}


def tfds_grain_dataset(name_or_source, split: str = "train", kept=None, *, data_dir: str | None = None,
                       decoders=None):
    """The kept records of a TFDS split as a ``grain.MapDataset`` over ``tfds.data_source`` (array_record, random
    access: only the kept records are read). Each element is TFDS's own example dict (decoded as usual, or with
    `decoders`) plus RECORD_INDEX, its index in the split. name_or_source: the data set's name, or a data source
    already opened (any object with __len__ and __getitem__ over the split's records)."""
    import grain

    if kept is None:
        raise ValueError("kept is required: a workdir of `clipsel select`, a Selection, or record indices")
    if isinstance(name_or_source, str):
        import tensorflow_datasets as tfds

        try:
            ds = tfds.data_source(name_or_source, split=split, data_dir=data_dir, decoders=decoders)
        except Exception as e:
            raise ValueError(f"TFDS data set {name_or_source!r} split {split!r} cannot be opened for random access "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it must be "
                             "prepared as array_record (a TFRecord set: use tfds_tf_dataset)") from None
        name = name_or_source
    else:
        ds, name = name_or_source, None
    idx = _record_indices(kept, len(ds), name, split)
    return grain.MapDataset.source(_Records(ds, idx))


def tfds_tf_dataset(name: str, split: str = "train", kept=None, *, data_dir: str | None = None,
                    image_key: str = "image", read_config=None):
    """The kept records of a TFDS split prepared as TFRecord, as a ``tf.data.Dataset`` of TFDS's example dicts
    (the image decoded) plus RECORD_INDEX, in stored order; shuffle, batch and prefetch it as usual. TFRecord files
    are read in order, so the dropped records' bytes are read, but their images are never decoded; the files
    after the last kept record are not read. Needs TensorFlow."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if kept is None:
        raise ValueError("kept is required: a workdir of `clipsel select`, a Selection, or record indices")
    builder = tfds.builder(name, data_dir=data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS data set {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    if RECORD_INDEX in builder.info.features:
        raise ValueError(f"{name!r} has a feature named {RECORD_INDEX!r}, the key this input adds")
    n = int(builder.info.splits[split].num_examples)
    idx = _record_indices(kept, n, name, split)
    if len(idx) == 0:
        raise ValueError("no records are kept")
    mask = np.zeros(n, bool)
    mask[idx] = True
    stop = int(idx.max()) + 1
    feature = builder.info.features[image_key]
    ds = builder.as_dataset(split=f"{split}[:{stop}]", shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()},
                            read_config=read_config or tfds.ReadConfig(try_autocache=False))
    keep = tf.constant(mask[:stop])

    def decode(i, ex):
        return {**ex, image_key: feature.decode_example(ex[image_key]), RECORD_INDEX: i}

    return ds.enumerate().filter(lambda i, ex: tf.gather(keep, i)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)


# -------------------------------------------------------------------------------------------------------------
# Files for any other framework: a list, or a <class>/<file> folder


def _where(source: Source | None, pos: int | None, sample_id: int) -> str:
    """A path another program can open: the file of a folder, ARCHIVE.zip:entry in a zip; else the source's own
    description (a TFDS record), or the id where no source is known."""
    if source is None or pos is None:
        return str(sample_id)
    return source.path_of(pos) if isinstance(source, ImageFolder) else source.describe(pos)


def _name_of(k: Kept, source: Source | None):
    names = k.class_names or (source.class_names if source is not None else [])
    return lambda c: names[c] if 0 <= c < len(names) else str(c)


def write_kept_list(kept, path, source: Source | None = None) -> Path:
    """The kept samples as a list for any framework: ``.csv`` (id, path, label, class_name, preferred_class,
    preferred_confidence; a header row) or ``.txt`` (one path per line; the id where no source is known)."""
    k = as_kept(kept)
    if not isinstance(k, Kept):
        raise TypeError("write_kept_list needs a workdir, a Selection or a Kept (labels are written too)")
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".txt"):
        raise ValueError(f"{path}: the kept list is written as .csv or .txt; give a name ending in one of them")
    pos = positions_of(source, k.ids) if source is not None else [None] * len(k)
    where = [_where(source, None if p is None else int(p), int(i)) for p, i in zip(pos, k.ids)]
    name = _name_of(k, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as f:
        if path.suffix.lower() == ".txt":
            f.writelines(w + "\n" for w in where)
        else:
            w = csv.writer(f)
            w.writerow(["id", "path", "label", "class_name", "preferred_class", "preferred_confidence"])
            for j in range(len(k)):
                w.writerow([int(k.ids[j]), where[j], int(k.labels[j]), name(k.labels[j]), name(k.preferred_class[j]),
                            f"{k.preferred_confidence[j]:.6f}"])
    os.replace(tmp, path)
    return path


_UNSAFE_CHARS = re.compile(r"[/\\\x00-\x1f]")


def folder_names(class_names: list[str]) -> list[str]:
    """One safe, distinct folder name per class: no path separators or control characters, never '', '.' or
    '..' (a class name is data: it must not write outside the export folder)."""
    out, seen = [], set()
    for i, c in enumerate(class_names):
        name = _UNSAFE_CHARS.sub("_", str(c)).strip()
        if name in ("", ".", "..") or name.startswith("."):  # also no hidden folders (loaders skip them)
            name = f"class_{i}_{name.lstrip('._')}".rstrip("_")
        base, j = name, 1
        while name.lower() in seen:  # case-insensitive filesystems (macOS, Windows) merge Cat and cat
            j += 1
            name = f"{base}_{j}"
        seen.add(name.lower())
        out.append(name)
    return out


def _place(src_path: str, dest: Path, mode: str) -> str:
    """Put a folder source's file at dest by hard link, symbolic link or copy; a hard link that cannot be made
    (another filesystem, or not allowed) becomes a copy. Returns what was done."""
    if mode in ("link", "hard"):
        try:
            os.link(src_path, dest)
            return "link"
        except OSError as e:
            if mode == "hard" or e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP,
                                                  errno.EACCES):
                raise
    if mode == "symlink":
        os.symlink(os.path.abspath(src_path), dest)
        return "symlink"
    tmp = dest.with_name(dest.name + ".part")
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dest)
    return "copy"


def _write_bytes(data: bytes, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def export_folder(source: Source, kept, to, *, mode: str = "link", relabel: float | None = None,
                  progress: bool = False) -> dict:
    """Write the kept images of `source` as ``to/<class>/<file>``, a folder any framework can train on.

    mode: "link" (default: a hard link per file, a copy where links cannot be made), "hard" (links only),
    "copy", or "symlink" (for folder sources; zip entries are extracted, array and TFDS images written as PNG).
    Class folders take the source's class names (made safe for a file system: see folder_names).
    relabel: a probability in (0, 1]: a kept sample whose preferred class differs from its label with at least
    this confidence is written under the preferred class, and listed in ``to/relabeled.csv`` (id, source path,
    exported file, given and preferred class, confidence) for review. An option to review, not a default.

    A rerun completes an interrupted export (files already written are kept); a folder holding an export of
    another selection, or anything else, is refused. Returns counts by what was done and the relabelled count.
    """
    if mode not in ("link", "hard", "copy", "symlink"):
        raise ValueError(f"mode must be link, hard, copy or symlink, got {mode!r}")
    k = as_kept(kept)
    if not isinstance(k, Kept):
        raise TypeError("export_folder needs a workdir, a Selection or a Kept (the labels decide the folders)")
    sub = kept_source(source, k)
    labels, changed = (k.labels, np.zeros(len(k), bool)) if relabel is None else k.relabel(relabel)
    to = Path(to)
    marker = {"selection": k.fingerprint, "source": source.fingerprint(), "mode": mode, "relabel": relabel}
    if to.exists():
        if not to.is_dir():
            raise ValueError(f"{to} is a file; give a folder to export into (it is created if missing)")
        have = to / EXPORT_MARKER
        if have.is_file():
            try:
                before = json.loads(have.read_text())
            except ValueError:
                before = None
            if before != marker:
                raise ValueError(f"{to} holds an export of another selection or with other settings; give an empty "
                                 "or new folder")
        elif any(p.name not in LOCAL_ONLY for p in to.iterdir()):  # a bucket's mirror holds its sync state
            raise ValueError(f"{to} is not empty and holds no export of clipsel; give an empty or new folder")
    to.mkdir(parents=True, exist_ok=True)
    (to / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
    folders = folder_names(source.class_names)
    for c in sorted(set(labels.tolist())):
        (to / folders[c]).mkdir(exist_ok=True)
    done = {"link": 0, "symlink": 0, "copy": 0, "written": 0, "already there": 0}
    taken: dict[str, set] = {}
    moved = []
    class_name = _name_of(k, source)
    from tqdm.auto import tqdm

    for j in tqdm(range(len(sub)), desc="export", unit="img", disable=not progress):
        pos = int(sub.positions[j])
        name = _file_name(source, pos, int(k.ids[j]))
        names = taken.setdefault(folders[labels[j]], set())
        if name.lower() in names:  # relabelled into a class with a file of the same name
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}_id{int(k.ids[j])}.{ext}" if dot else f"{name}_id{int(k.ids[j])}"
        names.add(name.lower())
        dest = to / folders[labels[j]] / name
        if changed[j]:
            moved.append([int(k.ids[j]), _where(source, pos, int(k.ids[j])), f"{folders[labels[j]]}/{name}",
                          class_name(k.labels[j]), class_name(labels[j]),
                          f"{k.preferred_confidence[j]:.6f}"])
        if os.path.lexists(dest):
            done["already there"] += 1
            continue
        if isinstance(source, ImageFolder) and not source.is_zip:
            done[_place(source.files[pos], dest, mode)] += 1
        elif isinstance(source, ImageFolder):  # the stored bytes, extracted
            _write_bytes(source.read_bytes(pos), dest)
            done["written"] += 1
        else:
            from PIL import Image

            image = sub.read(j)
            tmp = dest.with_name(dest.name + ".part")
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, dest)
            done["written"] += 1
    if relabel is not None:
        with open(to / "relabeled.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "source", "exported_as", "given_class", "preferred_class", "preferred_confidence"])
            w.writerows(moved)
    if done["copy"] and mode == "link":
        warnings.warn(f"{done['copy']} files were copied: hard links cannot be made from {source.location} to {to} "
                      "(another filesystem?)", stacklevel=2)
    return {"folder": str(to), "images": len(sub), "relabeled": int(changed.sum()),
            **{key: v for key, v in done.items() if v}}


def _file_name(source: Source, pos: int, sample_id: int) -> str:
    if isinstance(source, ImageFolder):
        return Path(source.files[pos]).name
    return f"{sample_id}.png"
