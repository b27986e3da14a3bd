"""One run per workdir: an advisory lock file, ``<workdir>/.clipsel.lock``.

Two runs in one workdir destroy each other's state (one clears the checkpoints the other is resuming from). So every
entry point that writes into a workdir (``embed``, ``train_adapters``, ``select_from_embeddings``, ``select``) holds
the workdir for its duration, and the CLI holds it around each command: a second run refuses at once with
``WorkdirBusy`` naming the holder, or, with ``wait``, waits until the holder is done.

The lock is ``fcntl.flock`` on the open lock file, so the kernel releases it when the holder exits in any way,
SIGKILL and crashes included: a leftover file never blocks a rerun. The pid, host, start time and command line
written into it are only for the message. Holding is re-entrant within a thread (``select`` calls ``embed`` and
``select_from_embeddings``, which calls ``train_adapters``: the nested holds just count); another thread of the same
process is a second holder and is refused like another process. With several JAX processes (one run over several
hosts) process 0 holds the lock and tells the others whether it got it, so they all go on or all refuse.

flock is advisory: it stops other clipsel_jax runs, not a program that ignores the file (nor a user deleting the
workdir). On network filesystems it is only as good as the mount's locking: Linux NFS maps flock onto NFS byte-range
locks, which hold across hosts (a dead client's lock is released when its lease expires, about a minute or two
later); mounts with local-only locks (NFS ``local_lock=all``, Lustre ``localflock``) protect against runs on the same
host only; a filesystem without locks (ENOLCK / EOPNOTSUPP) gets a warning and the run goes on unprotected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import shlex
import socket
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

from clipsel_jax.workdir import LOCK, RunDir

LOCK_NAME = LOCK  # the file's name in every workdir (clipsel_jax.workdir)
_held = threading.local()  # .locks: {(pid, workdir): [fd, depth]} of this thread


class WorkdirBusy(Exception):
    """Another run holds the workdir. `holder`: its {"pid", "host", "since", "command"}, or None if unknown."""

    def __init__(self, workdir, holder: dict | None):
        self.workdir, self.holder = Path(workdir), holder
        super().__init__(f"workdir {self.workdir} is in use by {_who(holder)}. Wait for it to finish, use another "
                         "--workdir, or pass --wait to wait for it (in Python: with "
                         "clipsel_jax.hold_workdir(workdir, wait=True): ...)")


def _who(holder: dict | None) -> str:
    if not holder:
        return "another run (still starting)"
    return (f"another run: pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}, "
            f"command: {str(holder.get('command', '?'))[:300]}")


def _holder(path: Path, patience: float = 1.0) -> dict | None:
    """What the holder wrote; it writes just after taking the lock, so an empty file gets `patience` seconds."""
    end = time.monotonic() + patience
    while True:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet (or half), or gone
            if time.monotonic() >= end:
                return None
            time.sleep(0.02)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _acquire(path: Path, wait: bool | float) -> int | None:
    """The lock file's descriptor, locked and naming us; None where the filesystem has no locks."""
    deadline = None if wait is True else time.monotonic() + (0.0 if wait is False or wait is None else float(wait))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated here: it names the current holder
    try:
        told = False
        while not _try_lock(fd):
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkdirBusy(path.parent, _holder(path))
            if not told:
                print(f"workdir {path.parent} is in use by {_who(_holder(path, 0.2))}; waiting until it is done",
                      file=sys.stderr)
                told = True
            time.sleep(0.2)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            warnings.warn(f"cannot lock {path} ({e.strerror}): this filesystem has no file locks, so nothing stops "
                          "a second run in the same workdir from destroying this one's state", stacklevel=4)
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv))[:1000]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _agree(ok: bool) -> bool:
    """Process 0's answer, on every JAX process (a lone process: its own)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold_workdir(workdir: str | Path | None, wait: bool | float = False):
    """Hold `workdir` (created if missing) for the duration of the block: a second holder gets WorkdirBusy.

    wait: False: refuse at once if another run holds it; True: wait as long as it takes; a number: wait up to that
    many seconds, then refuse. Re-entrant within a thread; workdir=None holds nothing.
    """
    if workdir is None:
        yield
        return
    import jax

    path = RunDir(Path(workdir).absolute()).lock
    locks = _held.__dict__.setdefault("locks", {})
    # One workdir under two spellings is one lock; the pid: a forked child inherits this dict but holds nothing.
    key = (os.getpid(), os.path.realpath(path.parent))
    if key in locks:  # nested in a hold of this thread
        locks[key][1] += 1
    else:
        fd, error = None, None
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = _acquire(path, wait)
            except Exception as e:  # told to the other processes before raising: they must not run on alone
                error = e
        if not _agree(error is None):
            raise error or WorkdirBusy(path.parent, _holder(path))
        locks[key] = [fd, 1]
    try:
        yield
    finally:
        locks[key][1] -= 1
        if locks[key][1] == 0:
            fd = locks.pop(key)[0]
            if fd is not None:
                os.ftruncate(fd, 0)  # a later reader finds no stale holder's name
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


@contextlib.contextmanager
def workspace(workdir, wait: bool | float = False):
    """Hold `workdir` for the block and yield it as a local folder: a local path as it is; a URL (gs://..., any
    fsspec scheme) through its synced local mirror (clipsel_jax.storage), held before it is pulled, so that two
    runs of this host never pull into, or write, one mirror at once."""
    from clipsel_jax import storage

    if workdir is None or not storage.is_remote(workdir):
        with hold_workdir(workdir, wait=wait):
            yield None if workdir is None else storage.local_path(workdir)
        return
    with hold_workdir(storage.mirror_dir(str(workdir).rstrip("/")), wait=wait), storage.synced(workdir) as local:
        yield local


def with_workdir_lock(fn):
    """Decorator: `fn` holds its `workdir` argument (if not None) while it runs, without waiting. A URL workdir is
    worked on through its local mirror (see workspace): `fn` gets the mirror's path."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        with workspace(bound.arguments.get("workdir")) as local:
            if local is not None:
                bound.arguments["workdir"] = local
            return fn(*bound.args, **bound.kwargs)

    return wrapper
