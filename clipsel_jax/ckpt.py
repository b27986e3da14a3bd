"""orbax checkpoints behind one small interface: a pytree of arrays plus JSON metadata per step, newest kept."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves {"state": pytree, "meta": dict} at integer steps under `directory`; restores the latest."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int | None = None, like=None):
        """(state, meta) of `step` (default: latest). `like`: a pytree with the target structure and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state_args = ocp.args.StandardRestore(like) if like is not None else ocp.args.StandardRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()
