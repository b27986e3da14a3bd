"""Embedding a labeled image source: one feature per readable image, one text feature per class.

The expensive stage, so it is built to be interrupted. Samples are processed in chunks of ``chunk_size`` (ranges
of the source's sample order); each finished chunk is written to ``workdir/embeddings/<key>/`` with its checksum
in a manifest, atomically, so a run killed at any point resumes at the first unfinished chunk. ``<key>`` hashes
the encoder's identity (weights, dtype, preprocessing), the source's fingerprint and the chunk size: a cache made
with another encoder or another data set lives under another key and is never mixed in.

Images flow through a grain pipeline: reading, decoding and the model's resize + crop run in parallel threads (or
worker processes), then batches of a fixed global size (the last one padded) are split across the data axis of
the device mesh; with several processes each reads only its own slice of every batch. Unreadable images are
recorded (id, path, reason) in the cache, in the result, and counted in a warning: never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from clipsel_jax import checks, parallel
from clipsel_jax.data.preprocess import resize_and_crop
from clipsel_jax.data.sources import UnreadableImage, decode_record_image
from clipsel_jax.hashing import file_sha256
from clipsel_jax.text import DEFAULT_TEMPLATE, class_prompts
from clipsel_jax.workdir import RunDir
from clipsel_jax.workdir_lock import with_workdir_lock

CACHE_FORMAT = 1
DEFAULT_CHUNK_SIZE = 2048


@dataclass
class Embeddings:
    image_emb: np.ndarray  # float32 (N, D_image), one row per readable sample
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # int64 (N,) stable sample ids of the source
    text_emb: np.ndarray  # float32 (C, D_text), one row per class
    class_names: list[str]
    prompts: list[str]  # every prompt encoded (C per template)
    unreadable: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}, excluded from image_emb
    logit_scale: float | None = None  # adapted features (`clipsel adapt`): the adapters' learned temperature

    def save(self, path) -> None:
        extra = {} if self.logit_scale is None else {"logit_scale": np.float64(self.logit_scale)}
        np.savez(path, image_emb=self.image_emb, labels=self.labels, ids=self.ids, text_emb=self.text_emb,
                 class_names=np.array(self.class_names), prompts=np.array(self.prompts),
                 unreadable=np.array(json.dumps(self.unreadable)),
                 unreadable_ids=np.array([u["id"] for u in self.unreadable], np.int64), **extra)

    @classmethod
    def load(cls, path) -> Embeddings:
        """An .npz written by ``save``, checked as untrusted input: ValueError naming what is wrong."""
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("image_emb", "labels", "ids", "text_emb", "class_names", "prompts")
                           if k not in z.files]
                if missing:
                    raise ValueError(f"it lacks {', '.join(missing)}")
                unreadable = json.loads(str(z["unreadable"])) if "unreadable" in z.files else []
                scale = None
                if "logit_scale" in z.files:
                    if z["logit_scale"].shape != () or z["logit_scale"].dtype.kind != "f":
                        raise ValueError(f"logit_scale must be one float, got {z['logit_scale'].dtype} "
                                         f"{z['logit_scale'].shape}")
                    scale = checks.number("logit_scale", float(z["logit_scale"]), lo=0, lo_open=True)
                e = cls(z["image_emb"], z["labels"], z["ids"], z["text_emb"], [str(c) for c in z["class_names"]],
                        [str(p) for p in z["prompts"]], unreadable, scale)
            e.validate()
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a valid embeddings file of `clipsel embed`: {err}") from None
        return e

    def validate(self) -> None:
        """Shapes, dtypes and ranges agree: one row, label and unique id per sample, one text row and class name
        per class, labels in 0..C-1, features finite."""
        n = len(self.image_emb) if np.ndim(self.image_emb) == 2 else -1
        if n < 1 or np.ndim(self.text_emb) != 2 or len(self.text_emb) < 1:
            raise ValueError(f"image_emb and text_emb must be non-empty 2-D arrays, got shapes "
                             f"{np.shape(self.image_emb)} and {np.shape(self.text_emb)}")
        for name in ("labels", "ids"):
            a = np.asarray(getattr(self, name))
            if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} must be {n} integers (one per image_emb row), got {a.dtype} {a.shape}")
        c = len(self.text_emb)
        if len(self.class_names) != c:
            raise ValueError(f"{len(self.class_names)} class names for {c} text_emb rows (one per class)")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= c))
        if len(bad):
            raise ValueError(f"{len(bad)} labels are outside 0..{c - 1} (e.g. row {bad[0]}: {self.labels[bad[0]]})")
        dup = len(self.ids) - len(np.unique(self.ids))
        if dup:
            raise ValueError(f"{dup} sample ids are repeated; ids must be unique (one row per sample)")
        for name in ("image_emb", "text_emb"):
            checks.finite_input(name, getattr(self, name))


# -------------------------------------------------------------------------------------------------------------
# Class prompts


def class_text_embeddings(encoder, class_names, templates) -> tuple[np.ndarray, list[str]]:
    """(C, D_text) text features for the classes, and the prompts encoded.

    One template: the encoder's features of "template.format(name)" (as CLIP returns them). Several templates: the
    CLIP prompt-ensemble recipe, the mean over templates of the L2-normalised features.
    """
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("prompts: give a template such as 'A photo of a {}.' or a list of templates")
    per_template = [class_prompts(class_names, t) for t in templates]
    prompts = [p for ps in per_template for p in ps]
    feats = encoder.encode_texts(prompts).reshape(len(templates), len(class_names), -1)
    if len(templates) == 1:
        return feats[0], prompts
    feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    return feats.mean(0).astype(np.float32), prompts


# -------------------------------------------------------------------------------------------------------------
# The input pipeline


PADDING = -1  # the sample index of a padding row: it fills the last global batch of a chunk, and is dropped


@dataclass(frozen=True)
class Prepared:
    """One sample as the model takes it, as the input pipeline hands it on.

    A padding row (``index == PADDING``) holds zero pixels, label -1 and reason "": it only fills the last batch
    of a chunk, and is dropped with its features. An unreadable image keeps its index and label, zero pixels, and
    the reason it could not be read; its features are zeroed and the sample is excluded from the result."""

    index: int  # the sample's position in the source's order, or PADDING
    pixels: np.ndarray  # uint8 (H, W, 3): the image after the model's resize + crop
    label: int
    reason: str = ""  # why the image could not be read; "" for a read image (and for padding)


@dataclass(frozen=True)
class PreparedBatch:
    """A process-local batch of Prepared samples, field by field."""

    index: np.ndarray  # int64 (B,), PADDING for padding rows
    pixels: np.ndarray  # uint8 (B, H, W, 3)
    labels: np.ndarray  # int64 (B,)
    reasons: list[str]  # "" where the image was read


class _Prepare:
    """Sample index -> the model's uint8 input and its label (a Prepared); runs in grain's threads or worker
    processes. Index PADDING gives a padding row."""

    def __init__(self, source, preprocessing):
        self.source, self.preprocessing = source, preprocessing
        self.shape = (*preprocessing.crop_size, 3)

    def padding(self) -> Prepared:
        return Prepared(PADDING, np.zeros(self.shape, np.uint8), -1)

    def __call__(self, i) -> Prepared:
        i = int(i)
        if i == PADDING:
            return self.padding()
        return self._prepared(i, lambda: self.source.read_example(i), lambda: self.source.label_of(i))

    def from_record(self, i, image, label) -> Prepared:
        """A streamed record (encoded bytes or an array) -> the same output as __call__."""

        def read():
            return decode_record_image(image, f"record {i}", self.source.max_image_pixels), label

        return self._prepared(i, read, lambda: label)

    def _prepared(self, i: int, read, label_if_unreadable) -> Prepared:
        """read() -> (image, label), resized and cropped; an image that cannot be read or resized gives an
        unreadable record: zero pixels, label_if_unreadable(), and the reason."""
        try:
            image, label = read()
            return Prepared(i, resize_and_crop(image, self.preprocessing), int(label))
        except UnreadableImage as e:
            reason = str(e) or "unreadable"
        except ValueError as e:  # e.g. a decoded image of zero size
            reason = f"{type(e).__name__}: {e}"
        return Prepared(i, np.zeros(self.shape, np.uint8), int(label_if_unreadable()), reason)


def _collate(items: list[Prepared]) -> PreparedBatch:
    return PreparedBatch(np.asarray([p.index for p in items], np.int64), np.stack([p.pixels for p in items]),
                         np.asarray([p.label for p in items], np.int64), [p.reason for p in items])


def _pipeline(rows: np.ndarray, source, preprocessing, local_batch: int, threads: int, workers: int):
    """An iterator of process-local batches over `rows` (already padded and sliced for this process)."""
    import grain

    ds = grain.MapDataset.source(rows.tolist()).map(_Prepare(source, preprocessing))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * local_batch, 64)))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain < 0.2.19 reads its absl flags in mp_prefetch (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it.batch(local_batch, batch_fn=_collate))


def _stream_pipeline(rows: np.ndarray, source, preprocessing, local_batch: int, threads: int):
    """The same batches as _pipeline, for a source read in order (tf.data over TFRecord): the source streams the
    records this process needs, a thread pool decodes and resizes them, in order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    prepare = _Prepare(source, preprocessing)
    need = rows[rows != PADDING]
    padding = prepare.padding()
    pool = ThreadPoolExecutor(threads)
    try:
        records = iter(())
        if len(need):
            start, stop = int(need[0]), int(need[-1]) + 1
            keep = np.zeros(stop - start, bool)
            keep[need - start] = True
            records = source.stream(start, stop, keep)
        pending: deque = deque()

        def fill():  # keep a window of decodes in flight ahead of the consumer
            for record in records:
                pending.append(pool.submit(prepare.from_record, *record))
                if len(pending) >= 4 * local_batch:
                    break

        for b in range(0, len(rows), local_batch):
            out = []
            for r in rows[b:b + local_batch]:
                if r == PADDING:
                    out.append(padding)
                    continue
                if not pending:
                    fill()
                if not pending:
                    raise RuntimeError(f"{source.describe(int(r))}: the reader ended before this record")
                out.append(pending.popleft().result())
            fill()
            yield _collate(out)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# -------------------------------------------------------------------------------------------------------------
# The cache


def savez_file(path: Path, **arrays) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the temporary name
        np.savez(f, **arrays)


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # processes may share the dir
    write(tmp)
    os.replace(tmp, path)


class EmbeddingCache:
    """``<workdir>/embeddings/<key>/``: manifest.json, chunk_NNNNNN.npz, text_<hash>.npz, unreadable.json."""

    def __init__(self, workdir, identity: dict, num_samples: int, chunk_size: int):
        self.identity = {"format": CACHE_FORMAT, **identity, "num_samples": num_samples, "chunk_size": chunk_size}
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = RunDir(workdir).embeddings(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        self.chunks: dict[int, dict] = {}
        if self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                manifest = None
            if manifest is None or manifest.get("identity") != self.identity:
                warnings.warn(f"embedding cache manifest {self.manifest_path} is unreadable or belongs to other "
                              "inputs; recomputing its chunks", stacklevel=3)
            else:
                self.chunks = {int(j): c for j, c in manifest["chunks"].items()}

    def chunk_path(self, j: int) -> Path:
        return self.dir / f"chunk_{j:06d}.npz"

    def valid(self, j: int) -> bool:
        """Chunk j is listed and its file has the recorded checksum (a damaged file is recomputed)."""
        entry = self.chunks.get(j)
        if entry is None:
            return False
        path = self.chunk_path(j)
        if path.is_file() and file_sha256(path) == entry["sha256"]:
            return True
        warnings.warn(f"embedding cache chunk {path} is missing or damaged (checksum mismatch); recomputing it",
                      stacklevel=3)
        del self.chunks[j]
        return False

    def put(self, j: int, ids, labels, emb, reasons) -> None:
        path = self.chunk_path(j)
        ok = np.array([not r for r in reasons], bool)
        write_atomic(path, lambda t: savez_file(t, ids=ids, labels=labels, emb=emb, ok=ok,
                                             reasons=np.array(reasons, dtype=str)))
        self.chunks[j] = {"file": path.name, "sha256": file_sha256(path), "rows": int(len(ids)),
                          "unreadable": int((~ok).sum())}
        manifest = {"identity": self.identity, "chunks": {str(k): v for k, v in sorted(self.chunks.items())}}
        write_atomic(self.manifest_path, lambda t: Path(t).write_text(json.dumps(manifest, indent=1)))

    def get(self, j: int) -> dict:
        with np.load(self.chunk_path(j), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


# -------------------------------------------------------------------------------------------------------------
# embed


def _check_source(source) -> None:
    missing = [a for a in ("__len__", "read_example", "label_of", "describe", "fingerprint", "class_names", "ids")
               if not hasattr(source, a)]
    if missing:
        raise TypeError(f"embed needs a clipsel_jax source (lacking {', '.join(missing)} on "
                        f"{type(source).__name__}); wrap arrays with clipsel_jax.data.from_arrays(images, labels, "
                        "class_names), a folder with data.image_folder(path), TFDS with data.tfds_source(name)")


@with_workdir_lock
def embed(source, encoder, workdir=None, prompts=DEFAULT_TEMPLATE, *, batch_size: int | None = None,
          chunk_size: int = DEFAULT_CHUNK_SIZE, threads: int | None = None, workers: int = 0,
          limit: int | None = None, progress: bool = True) -> Embeddings:
    """Encode every image of `source` and one prompt per class with `encoder`.

    workdir: where the chunked cache lives (None: in memory only, nothing resumable); held for the call (a second
    run on it gets clipsel_jax.WorkdirBusy, see clipsel_jax.workdir_lock).
    prompts: a template with "{}" for the class name, or a list of templates (averaged, CLIP's prompt ensemble).
    batch_size: global batch per step (rounded up to a multiple of the device count; default the encoder's).
    chunk_size: samples per cache chunk: the most work a kill can lose.
    threads / workers: grain read threads per process (default 2 x CPUs) / worker processes (0: threads only).
    limit: only the first `limit` samples in source order (their chunks are embedded whole, and cached).
    """
    _check_source(source)
    n = len(source) if limit is None else min(int(limit), len(source))
    if n <= 0:
        raise ValueError(f"the source has no samples to embed ({source!r})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mesh = encoder.mesh
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    global_batch = parallel.round_up(batch_size or encoder.batch_size, n_dev)
    local_batch = global_batch // n_proc
    threads = threads or 2 * (os.cpu_count() or 1)

    n_total = len(source)
    n_chunks = -(-n // chunk_size)
    ranges = [(j * chunk_size, min((j + 1) * chunk_size, n_total)) for j in range(n_chunks)]
    identity = {"encoder": encoder.identity, "source": source.fingerprint()}
    cache = EmbeddingCache(workdir, identity, n_total, chunk_size) if workdir is not None else None
    done = {j for j in range(n_chunks) if cache is not None and cache.valid(j)}
    todo = [j for j in range(n_chunks) if j not in done]
    memory: dict[int, dict] = {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        cached = sum(ranges[j][1] - ranges[j][0] for j in done)
        bar = tqdm(total=sum(b - a for a, b in ranges), initial=cached, desc="embedding images", unit="img",
                   smoothing=0.1)
        if cached:
            state = "all done" if not todo else "resuming"
            bar.write(f"embedding cache {cache.dir}: {len(done)} of {n_chunks} chunks done, {state}")

    if todo:
        # Each chunk is padded to whole global batches (PADDING rows); this process reads its slice of each.
        padded = [np.concatenate([np.arange(a, b), np.full(parallel.round_up(b - a, global_batch) - (b - a), PADDING)])
                  for a, b in (ranges[j] for j in todo)]
        rows = np.concatenate(padded).reshape(-1, n_proc, local_batch)[:, jax.process_index()].reshape(-1)
        if getattr(source, "streaming", False):  # read in order (tf.data); decoded in threads
            batches = _stream_pipeline(rows, source, encoder.preprocessing, local_batch, threads)
        else:
            batches = _pipeline(rows, source, encoder.preprocessing, local_batch, threads, workers)
        for j, chunk_rows in zip(todo, padded):
            chunk = _embed_chunk(chunk_rows, batches, encoder, global_batch, local_batch, bar)
            if cache is not None:
                cache.put(j, *chunk)  # written (atomically) before the next chunk starts
            else:
                memory[j] = dict(zip(("ids", "labels", "emb", "reasons"), chunk))
    if bar is not None:
        bar.close()

    parts = [memory[j] if j in memory else cache.get(j) for j in range(n_chunks)]
    ids = np.concatenate([p["ids"] for p in parts])[:n]
    labels = np.concatenate([p["labels"] for p in parts])[:n]
    emb = np.concatenate([p["emb"] for p in parts])[:n]
    reasons = np.concatenate([np.asarray(p["reasons"], dtype=str) for p in parts])[:n]
    ok = reasons == ""
    unreadable = [{"id": int(source.ids[i]), "path": source.describe(int(i)), "reason": str(reasons[i])}
                  for i in np.flatnonzero(~ok)]
    if cache is not None:
        write_atomic(cache.dir / "unreadable.json", lambda t: Path(t).write_text(json.dumps(unreadable, indent=1)))
    if unreadable:
        warnings.warn(f"{len(unreadable)} of {n} images could not be read and are excluded (listed in the result's "
                      f"`unreadable`{' and ' + str(cache.dir / 'unreadable.json') if cache else ''}; first: "
                      f"{unreadable[0]['path']}: {unreadable[0]['reason']})", stacklevel=2)
    text_emb, prompt_list = _text(encoder, source.class_names, prompts, cache)
    return Embeddings(emb[ok], labels[ok], source.ids[ids[ok]], text_emb, list(source.class_names), prompt_list,
                      unreadable)


def _embed_chunk(chunk_rows, batches, encoder, global_batch, local_batch, bar):
    """Encode one chunk's batches; the device works on batch b while the host collects batch b - 1."""
    n_batches = len(chunk_rows) // global_batch
    lo = jax.process_index() * local_batch
    feats, labels, reasons, pending = [], [], [], None
    for b in range(n_batches):
        batch = next(batches)
        expected = chunk_rows[b * global_batch + lo: b * global_batch + lo + local_batch]
        if not np.array_equal(batch.index, expected):  # the pipeline must never reorder or drop samples
            raise RuntimeError(f"input pipeline returned samples {batch.index[:4]}... where {expected[:4]}... "
                               "were due")
        out = encoder.features_of_prepared(batch.pixels)
        if pending is not None:
            feats.append(parallel.to_host(pending))
        pending = out
        labels.append(_gather_host(batch.labels))
        reasons.extend(_gather_strings(batch.reasons))
        if bar is not None:
            bar.update(int((chunk_rows[b * global_batch:(b + 1) * global_batch] != PADDING).sum()))
    feats.append(parallel.to_host(pending))
    real = chunk_rows != PADDING
    ids = chunk_rows[real]
    labels = np.concatenate(labels)[real]
    emb = np.concatenate(feats)[real].astype(np.float32)
    reasons = [r for r, keep in zip(reasons, real) if keep]
    emb[[bool(r) for r in reasons]] = 0.0  # rows of unreadable images carry no features
    return ids, labels, emb, reasons


def _gather_host(x: np.ndarray) -> np.ndarray:
    """Each process's rows of a global batch (host numpy) -> the whole batch, in process order."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_strings(reasons: list[str], width: int = 240) -> list[str]:
    """Each process's failure reasons -> the whole batch's, in row order (as fixed-width UTF-8 bytes)."""
    if jax.process_count() == 1:
        return list(reasons)
    raw = np.zeros((len(reasons), width), np.uint8)
    for i, r in enumerate(reasons):
        b = r.encode()[:width]
        raw[i, :len(b)] = np.frombuffer(b, np.uint8)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in _gather_host(raw)]


def _text(encoder, class_names, prompts, cache):
    templates = [prompts] if isinstance(prompts, str) else list(prompts)
    if cache is None:
        return class_text_embeddings(encoder, class_names, templates)
    key = hashlib.sha256(json.dumps([list(class_names), templates]).encode()).hexdigest()[:16]
    path = cache.dir / f"text_{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["text_emb"], [str(p) for p in z["prompts"]]
        except (OSError, ValueError, KeyError):
            pass  # damaged: recompute
    text_emb, prompt_list = class_text_embeddings(encoder, class_names, templates)
    write_atomic(path, lambda t: savez_file(t, text_emb=text_emb, prompts=np.array(prompt_list)))
    return text_emb, prompt_list
