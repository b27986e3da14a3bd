"""orbax checkpoints behind one small interface: a pytree of arrays plus JSON metadata per step, newest kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves {"state": pytree, "meta": dict} at integer steps under `directory`; restores the latest."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True),
            item_names=("state", "meta"))

    def clear(self) -> None:
        """Delete every checkpoint here (another run's state that must not be resumed or mixed in)."""
        self.manager.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.manager = self._open()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()
        if not saved:  # orbax skips, silently, a step at or below the latest one on disk
            raise RuntimeError(f"checkpoint step {step} was not saved in {self.directory}: step "
                               f"{self.latest_step()} is already there; clear() it first or use another folder")

    def restore(self, step: int | None = None, like=None):
        """(state, meta) of `step` (default: latest). `like`: a pytree with the target structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state_args = ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON metadata of `step` (default: latest): to check a checkpoint belongs to this run before its
        arrays (whose shapes may differ) are read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self):
        self.manager.close()
