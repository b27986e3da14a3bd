"""orbax checkpoints behind one small interface: a pytree of arrays plus JSON metadata per step, newest kept.

Every step carries ``checksums.json``: the SHA-256 of each of its files, written (atomically) once orbax has
finished the step. orbax itself checks nothing: flipped bytes in a step restore as garbage (optimizer moments of
1e38) without a word. So a step is used only once its files match, and a damaged step is deleted with a warning
that names the file: its stage is recomputed from the previous good step, or from scratch, the policy of the
embedding cache (clipsel_jax.embedding). Callers need nothing special: ``latest_step`` and ``restore`` only ever
see verified steps.

A step without ``checksums.json`` (written by an older clipsel_jax, or killed between orbax's commit and the
checksum file) is discarded the same way: it cannot be told apart from a damaged one, and recomputing one stage
(an adapter epoch, a chunk of selection steps) is cheap next to resuming from garbage.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from clipsel_jax.hashing import file_sha256

CHECKSUMS = "checksums.json"


class Checkpointer:
    """Saves {"state": pytree, "meta": dict} at integer steps under `directory`; restores the latest."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.manager = self._open()
        self._verified: set[int] = set()  # steps whose checksums matched (or that this object wrote)

    def _open(self):
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True),
            item_names=("state", "meta"))

    def clear(self) -> None:
        """Delete every checkpoint here (another run's state that must not be resumed or mixed in)."""
        self.manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = self._open()
        self._verified.clear()

    def _damage(self, step: int) -> str | None:
        """Why step `step` cannot be trusted, or None if every file has its recorded SHA-256."""
        step_dir = self.directory / str(step)
        try:
            recorded = json.loads((step_dir / CHECKSUMS).read_text())["files"]
        except FileNotFoundError:
            return f"it has no {CHECKSUMS} (written by an older version, or killed while saving)"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{step_dir / CHECKSUMS} is unreadable"
        for name, digest in recorded.items():
            path = step_dir / name
            if not path.is_file():
                return f"{path} is missing"
            if file_sha256(path) != digest:
                return f"{path} does not match its recorded SHA-256"
        return None if recorded else f"{step_dir / CHECKSUMS} lists no files"

    def _drop_damaged(self) -> None:
        """Delete the steps whose files do not verify. With several processes process 0 checks (on the shared
        disk) and the others wait for it, so that every process then sees the same steps."""
        if jax.process_index() == 0:
            for step in self.manager.all_steps():
                if step in self._verified:
                    continue
                why = self._damage(step)
                if why is None:
                    self._verified.add(step)
                    continue
                warnings.warn(f"checkpoint {self.directory / str(step)} is damaged and is discarded: {why}; its "
                              "stage is recomputed from the previous good step (or from scratch)", stacklevel=3)
                shutil.rmtree(self.directory / str(step), ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("clipsel_jax.ckpt: damaged steps dropped")
        self.manager.reload()  # orbax caches its list of steps

    def latest_step(self) -> int | None:
        """The newest step whose files verify (damaged steps are deleted on the way, with a warning)."""
        self._drop_damaged()
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        if not saved:  # orbax skips, silently, a step at or below the latest one on disk
            raise RuntimeError(f"checkpoint step {step} was not saved in {self.directory}: step "
                               f"{self.manager.latest_step()} is already there; clear() it first or use another "
                               "folder")
        if jax.process_index() == 0:  # orbax has committed the step: every process's files are in place
            step_dir = self.directory / str(step)
            files = {p.relative_to(step_dir).as_posix(): file_sha256(p)
                     for p in sorted(step_dir.rglob("*")) if p.is_file()}
            tmp = step_dir / f".{CHECKSUMS}.tmp"
            tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
            os.replace(tmp, step_dir / CHECKSUMS)  # atomic: a kill leaves no checksum file, never half of one
        self._verified.add(step)

    def _verified_step(self, step: int | None) -> int:
        latest = self.latest_step()
        step = latest if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(f"no {'' if step is None else f'intact step {step} of a '}checkpoint in "
                                    f"{self.directory}")
        return step

    def restore(self, step: int | None = None, like=None):
        """(state, meta) of `step` (default: latest). `like`: a pytree with the target structure and shardings."""
        step = self._verified_step(step)
        state_args = ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON metadata of `step` (default: latest): to check a checkpoint belongs to this run before its
        arrays (whose shapes may differ) are read."""
        step = self._verified_step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self):
        self.manager.close()
