"""The layout of a run's workdir, in one place, and the one rule for state left there by other inputs.

    WORKDIR/
      .clipsel.lock            who holds the workdir (clipsel_jax.workdir_lock)
      embeddings/<key>/        the embedding cache: chunks, manifest.json, unreadable.json, text_<hash>.npz
      adapters/                orbax steps of the adapter training (every 30 s and at the end)
      adapters_refit<r>/       the same for refit r of the refinement (clipsel_jax.adapt)
      selection_band/          orbax steps of the selection loop on the decisive band (the default loop)
      selection/               orbax steps of the selection loop over every sample (loop="full")
      selection_final/         the final selection (indices, mask, ranking key, scores) as an orbax checkpoint
      selection.npz, scores.csv, meta.json, report.html      the outputs (clipsel_jax.report)

The rule for resumable state (adapters, selection loops): a checkpoint records the settings and a fingerprint of
the inputs it was made from; a rerun with the same ones resumes from it; state made from other inputs or settings
is removed with a warning naming what differs, and the stage starts over: never resumed, never mixed in. (The
embedding cache needs no such rule: another encoder or data set gets another <key>.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

LOCK = ".clipsel.lock"


@dataclass(frozen=True)
class RunDir:
    """Every path of a run under `root`."""

    root: Path

    def __init__(self, root):
        object.__setattr__(self, "root", Path(root))

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def embeddings(self, key: str) -> Path:
        return self.root / "embeddings" / key

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def adapter_fit(self, fit: int) -> Path:
        """Checkpoints of one fit of the adaptation stage: the first in adapters/, refit r in adapters_refit<r>/."""
        return self.adapters if fit == 0 else self.root / f"adapters_refit{fit}"

    def selection_loop(self, band: bool) -> Path:
        return self.root / ("selection_band" if band else "selection")

    @property
    def selection_final(self) -> Path:
        return self.root / "selection_final"

    @property
    def outputs(self) -> dict[str, Path]:
        return {name: self.root / file for name, file in (("selection", "selection.npz"), ("scores", "scores.csv"),
                                                          ("meta", "meta.json"), ("report", "report.html"))}


def resume_state(ckpt, settings: dict, what: str) -> dict | None:
    """The metadata of `ckpt`'s latest step if it was made with `settings` (then resume from it); else None, after
    removing any state made from other inputs or settings with a warning that names the differences."""
    if ckpt.latest_step() is None:
        return None
    meta = ckpt.restore_meta()
    recorded = meta.get("settings") or {}
    if recorded == settings:
        return meta
    changed = sorted(k for k in settings.keys() | recorded.keys() if recorded.get(k) != settings.get(k))
    warnings.warn(f"{ckpt.directory} holds {what} made from other inputs or settings (differs in: "
                  f"{', '.join(changed)}); it is removed and the stage starts over", stacklevel=3)
    ckpt.clear()
    return None
