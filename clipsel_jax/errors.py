"""The library's own error types and their message helpers; imports nothing, so any module may import it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint or encoder spec that cannot be loaded; the message says what is wrong and what to do."""


def list_names(names, limit: int = 12) -> str:
    """Sorted names joined by commas for an error message, the first ``limit`` of them and a count of the rest."""
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_tensor_names(source: str, what: str, missing, unexpected, misshaped) -> None:
    """One CheckpointError naming every missing, unexpected and mis-shaped tensor, if there are any."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {list_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {list_names(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape: {list_names(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match {what}: " + "; ".join(problems))
