"""Checks of settings and arrays that come from users, shared by every stage and the command line.

A bad setting (NaN, 0, a negative count, a bool where a number is meant) must be refused where it enters, with a
message naming the setting; a stage whose output holds NaN or inf must stop with a message naming the stage and
the likely cause, never write that output. Nothing here imports JAX.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

# Rows per pass over an (N, D) array, wherever one is worked through in slices (checks here, scores and adapters
# on device, gathers): temporaries stay bounded for any N (a whole boolean one would cost N*D bytes).
ROW_CHUNK = 65536


class StageOutputError(ValueError):
    """A stage produced NaN or inf from inputs that passed the checks: the message names the stage and the cause."""


def number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False):
    """``value`` as a Python int (integer=True) or float after checking it: a real number (numpy scalars
    included; bools and strings are not numbers), finite, and within [lo, hi] (open ends with lo_open / hi_open).
    Raises ValueError naming the setting otherwise."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if integer and not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    value = int(value) if integer else float(value)
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        if lo is not None and hi is not None:
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        else:
            span = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else f"{'<' if hi_open else '<='} {hi:g}"
        raise ValueError(f"{name} must be {span}, got {value!r}")
    return value


def optional_number(name: str, value, **bounds):
    """None, or ``number(name, value, **bounds)``."""
    return None if value is None else number(name, value, **bounds)


def nonfinite_rows(a) -> np.ndarray:
    """Indices of the rows of a (N, ...) array with any NaN or inf, scanned in row chunks."""
    a = np.asarray(a)
    rows = []
    for i in range(0, len(a), ROW_CHUNK):
        ok = np.isfinite(a[i:i + ROW_CHUNK]).reshape(len(a[i:i + ROW_CHUNK]), -1).all(axis=1)
        rows.append(np.flatnonzero(~ok) + i)
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def _listed(rows: np.ndarray) -> str:
    return f"{rows[:10].tolist()}{' …' if len(rows) > 10 else ''}"


def finite_input(name: str, a, what_to_do: str = "drop or re-embed those samples") -> None:
    """Refuse an input array with NaN or inf rows (ValueError naming the rows)."""
    rows = nonfinite_rows(a)
    if len(rows):
        raise ValueError(f"{name} has {len(rows)} rows with NaN or inf: {_listed(rows)}; {what_to_do}")


def finite_output(stage: str, name: str, a, cause: str) -> None:
    """Stop a stage whose output holds NaN or inf (StageOutputError naming the stage, the rows and the cause)."""
    rows = nonfinite_rows(a)
    if len(rows):
        raise StageOutputError(f"{stage}: {name} has NaN or inf in {len(rows)} of {len(np.asarray(a))} rows "
                               f"({_listed(rows)}). Likely cause: {cause}")


def arg_number(name: str, **bounds):
    """An argparse ``type=`` that parses a number and checks it with ``number`` (NaN, inf, 0 or a negative count
    are refused as the option is parsed: exit 2, the message naming the setting)."""
    import argparse

    integer = bounds.get("integer", False)

    def parse(text):
        value = int(text) if integer else float(text)  # a ValueError: argparse's "invalid float value: 'x'"
        try:
            return number(name, value, **bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = "int" if integer else "float"  # the type argparse names when the text is not a number
    return parse
