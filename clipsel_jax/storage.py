"""Workdirs and output folders on object stores (``gs://``, ``s3://``, any fsspec URL): a local mirror, synced.

A run never writes into a bucket file by file as it goes. It works in a local mirror of the workdir (under
``CLIPSEL_MIRROR_DIR``, default ``~/.cache/clipsel_jax/mirrors/<hash of the URL>``), which is made equal to the
bucket's copy when the run starts (``pull``); files are uploaded as they are finished (a sync thread, every
``interval`` seconds) and once more when the run ends, however it ends short of SIGKILL (``push``). So every stage,
orbax included, works on a local disk at local speed, and the bucket always holds a state a rerun can resume from:
a killed run loses at most the last ``interval`` seconds of work, and a rerun anywhere (another VM) pulls it.

Atomicity: object stores have no rename, but an object upload is all or nothing (a reader sees the whole object or
none). Every file goes up whole, read from a local file that was itself written atomically (temporary files are
never uploaded), and the files that vouch for others go up after them: the embedding cache's ``manifest.json``
after its chunks, a checkpoint step's ``checksums.json`` after its files, ``meta.json`` after the other outputs.
A reader trusts a chunk or a checkpoint step only through those files and their SHA-256s (checked on use, as for a
local workdir), so a half-synced state is never trusted. Deletions (a stage restarting) go the other way: the
vouching files first.

Paths without a scheme (or ``file://``) are local and used as they are. fsspec's ``memory://`` file system runs
anywhere and is what the tests use; ``gs://`` needs ``gcsfs`` (``pip install 'clipsel_jax[gcs]'``), ``s3://``
``s3fs``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
STATE = ".clipsel_sync.json"  # in the mirror: what was last synced, per file
VOUCHING = ("manifest.json", "checksums.json", "meta.json")  # uploaded after, deleted before, the files they cover
LOCAL_ONLY = (".clipsel.lock", STATE)


def is_remote(path) -> bool:
    """True for a URL with a scheme other than file:// (gs://bucket/run, s3://..., memory://...)."""
    m = _SCHEME.match(str(path))
    return m is not None and m.group(1).lower() != "file"


def local_path(path) -> Path:
    """A local path (file:// stripped); a ValueError for a remote URL (those go through `synced`)."""
    if is_remote(path):
        raise ValueError(f"{path} is a remote URL; this needs a local path")
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def mirror_dir(url: str) -> Path:
    root = Path(os.environ.get("CLIPSEL_MIRROR_DIR") or Path.home() / ".cache" / "clipsel_jax" / "mirrors")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.split("://", 1)[1].rstrip("/"))[-60:]
    return root / f"{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}_{name}"


def url_to_fs(url: str):
    """(fsspec file system, path) of a URL; a ValueError that says what to install where the scheme's package is
    missing (gcsfs for gs://, s3fs for s3://) or the scheme is unknown."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as e:
        scheme = str(url).split("://", 1)[0]
        hint = {"gs": "pip install gcsfs (or clipsel_jax[gcs])", "s3": "pip install s3fs"}.get(
            scheme, "install the fsspec implementation for it")
        raise ValueError(f"{url}: the {scheme}:// file system is not available ({e}); {hint}") from None


def _skip(rel: str) -> bool:
    """Files that never go up: temporary ones (being written), orbax's unfinished steps, this module's state and the
    lock (a lock is about this host's processes)."""
    parts = rel.split("/")
    name = parts[-1]
    return (name in LOCAL_ONLY or name.endswith((".tmp", ".part")) or name.startswith(".tmp")
            or any(".orbax-checkpoint-tmp" in p for p in parts))


def _vouching_last(rels):
    return sorted(rels, key=lambda r: (r.rsplit("/", 1)[-1] in VOUCHING, r))


class Mirror:
    """A local copy of the folder at `url`, kept in step with it (see the module docstring)."""

    def __init__(self, url: str, local: Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.local = local or mirror_dir(self.url)
        self._lock = threading.Lock()
        self._state: dict = {}
        self._made: set[str] = set()  # remote folders made by this object

    # -- the sync state: per file, the local (size, mtime) and the remote identity at the last sync
    def _load_state(self) -> dict:
        try:
            state = json.loads((self.local / STATE).read_text())
            return state if state.get("url") == self.url else {"url": self.url, "files": {}}
        except (OSError, ValueError):
            return {"url": self.url, "files": {}}

    def _save_state(self) -> None:
        tmp = self.local / (STATE + ".tmp")
        tmp.write_text(json.dumps(self._state))
        os.replace(tmp, self.local / STATE)

    def _remote_files(self) -> dict[str, tuple]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            if info.get("type", "file") != "file":
                continue
            rel = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path.rsplit("/", 1)[-1]
            if any(part in ("", ".", "..") for part in rel.split("/")) or "\\" in rel:
                # object names are data: one with '..' would be written outside the mirror
                warnings.warn(f"{self.url}: object {rel!r} has an unsafe name and is skipped", stacklevel=3)
                continue
            out[rel] = _identity(info)
        return out

    def _local_files(self) -> dict[str, list]:
        out = {}
        for dirpath, _, files in os.walk(self.local):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(self.local).as_posix()
                if _skip(rel):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:  # removed since the listing (an old checkpoint step)
                    continue
                out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def pull(self) -> dict:
        """Make the mirror equal to the remote folder: download what differs, remove what the remote lacks.
        Returns counts."""
        with self._lock:
            self.local.mkdir(parents=True, exist_ok=True)
            self._state = self._load_state()
            synced = self._state["files"]
            remote = self._remote_files()
            local = self._local_files()
            fetched = 0
            for rel, ident in remote.items():
                if _skip(rel):
                    continue
                entry = synced.get(rel)
                if rel in local and entry and entry["local"] == local[rel] and entry["remote"] == list(ident):
                    continue  # unchanged on both sides since the last sync
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".tmp")
                self.fs.get_file(f"{self.root}/{rel}", str(tmp))
                os.replace(tmp, dest)
                st = dest.stat()
                synced[rel] = {"local": [st.st_size, st.st_mtime_ns], "remote": list(ident)}
                fetched += 1
            removed = 0
            for rel in set(local) - set(remote):
                (self.local / rel).unlink(missing_ok=True)
                synced.pop(rel, None)
                removed += 1
            for rel in set(synced) - set(remote):
                synced.pop(rel, None)
            self._save_state()
            return {"fetched": fetched, "removed": removed, "files": len(remote)}

    def push(self) -> dict:
        """Upload the files changed since the last sync (vouching files last) and delete the remote copies of
        files removed here (vouching files first). Returns counts."""
        with self._lock:
            synced = self._state.setdefault("files", {})
            local = self._local_files()
            gone = [rel for rel in synced if rel not in local]
            for rel in sorted(gone, key=lambda r: (r.rsplit("/", 1)[-1] not in VOUCHING, r)):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(f"{self.root}/{rel}")
                synced.pop(rel)
            sent = 0
            for rel in _vouching_last(r for r in local if (synced.get(r) or {}).get("local") != local[r]):
                src = self.local / rel
                try:
                    parent = f"{self.root}/{rel}".rsplit("/", 1)[0]
                    if parent not in self._made:  # a no-op on object stores, but one request each: once per folder
                        self.fs.makedirs(parent, exist_ok=True)
                        self._made.add(parent)
                    self.fs.put_file(str(src), f"{self.root}/{rel}")
                except FileNotFoundError:  # removed while syncing: the next push deletes its remote copy
                    continue
                synced[rel] = {"local": local[rel], "remote": list(_identity(self.fs.info(f"{self.root}/{rel}")))}
                sent += 1
            self._save_state()
            return {"uploaded": sent, "deleted": len(gone)}


def _identity(info: dict) -> tuple:
    """What tells one version of a remote object from another: its size and whatever version stamp the store
    gives (generation / etag / md5 / modification time)."""
    stamp = next((info[k] for k in ("generation", "ETag", "etag", "md5Hash", "mtime", "updated", "LastModified",
                                    "created") if info.get(k) is not None), "")
    return int(info.get("size") or 0), str(stamp)


@contextlib.contextmanager
def synced(path, interval: float = 30.0):
    """Use `path` as a local folder for the block: a local path as it is; a remote URL through its local mirror,
    pulled first, pushed every `interval` seconds by a background thread and at the end (also when the block
    raises). No lock is taken here: workdirs are held through clipsel_jax.workdir_lock.workspace, which holds the
    mirror before it is pulled. A URL needs a single JAX process: the processes of a multi-host run share
    checkpoint folders, which per-host mirrors are not. Yields the local path (None for None)."""
    if path is None or not is_remote(path):
        yield None if path is None else local_path(path)
        return
    import jax

    if jax.process_count() > 1:
        raise ValueError(f"{path}: a bucket workdir works for one process; a multi-host run shares its workdir "
                         "between hosts: mount the bucket on every host (gcsfuse) and give the mount's path")
    mirror = Mirror(str(path))
    mirror.pull()
    stop = threading.Event()

    def sync():
        while not stop.wait(interval):
            try:
                mirror.push()
            except Exception as e:  # a network hiccup: the next round (or the final push) tries again
                warnings.warn(f"syncing {mirror.url} failed ({type(e).__name__}: {e}); retrying", stacklevel=1)

    thread = threading.Thread(target=sync, name="clipsel-sync", daemon=True)
    thread.start()
    try:
        yield mirror.local
    except BaseException:  # what finished goes up; an upload failure then must not hide why the block stopped
        stop.set()
        thread.join()
        try:
            mirror.push()
        except Exception as e:
            warnings.warn(f"uploading to {mirror.url} failed ({type(e).__name__}: {e}); the local mirror "
                          f"{mirror.local} holds the work", stacklevel=3)
        raise
    stop.set()
    thread.join()
    mirror.push()  # a failure here is the run's failure: its outputs are not in the bucket


def local_copy(url: str) -> Path:
    """A local copy of the one object at `url` (a data set's zip), downloaded into the mirror cache when missing or
    when the object changed since (size or version stamp), else reused."""
    fs, path = url_to_fs(url)
    try:
        ident = list(_identity(fs.info(path)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None
    folder = mirror_dir(url)
    local, record = folder / path.rsplit("/", 1)[-1], folder / STATE
    try:
        same = json.loads(record.read_text()) == {"url": url, "remote": ident} and local.is_file()
    except (OSError, ValueError):
        same = False
    if not same:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        fs.get_file(path, str(tmp))
        os.replace(tmp, local)
        record.write_text(json.dumps({"url": url, "remote": ident}))
    return local


def reset_mirror(url: str) -> None:
    """Delete the local mirror of `url` (the remote copy is untouched; the next run pulls it again)."""
    shutil.rmtree(mirror_dir(str(url).rstrip("/")), ignore_errors=True)


def put_file(local: Path, url: str) -> None:
    """Upload one finished local file to `url` (one object: all or nothing)."""
    fs, path = url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(local), path)


@contextlib.contextmanager
def output_file(path):
    """A local file path to write for the block: `path` itself, or for a remote URL a temporary file uploaded
    whole (one object) at the end of a block that did not raise."""
    if not is_remote(path):
        yield local_path(path)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="clipsel_out_") as d:
        local = Path(d) / (str(path).rstrip("/").rsplit("/", 1)[-1] or "out")
        yield local
        put_file(local, str(path))


@contextlib.contextmanager
def input_file(path):
    """A local copy of the file at `path` for the block (a remote one is downloaded to a temporary file)."""
    if not is_remote(path):
        yield local_path(path)
        return
    import tempfile

    fs, remote = url_to_fs(path)
    if not fs.isfile(remote):
        raise FileNotFoundError(f"{path} does not exist")
    with tempfile.TemporaryDirectory(prefix="clipsel_in_") as d:
        local = Path(d) / remote.rsplit("/", 1)[-1]
        fs.get_file(remote, str(local))
        yield local
