"""Placing named numpy arrays into an NNX module tree, for models whose weights are converted by name."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx


def build_from_arrays(make: Callable[[], nnx.Module], arrays: dict[str, np.ndarray], source: str) -> nnx.Module:
    """``make()`` (built abstractly, no random init) with every parameter taken from ``arrays``, keyed by the
    dotted parameter path (``blocks.3.depthwise.kernel``) and already in NNX layout. Missing, unexpected and
    mis-shaped arrays are reported together in one ``CheckpointError``."""
    from clipsel_jax.weights import CheckpointError, _list_names

    graphdef, state = nnx.split(nnx.eval_shape(make))
    used, missing, misshaped, filled = set(), [], [], []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        if name not in arrays:
            missing.append(name)
            continue
        used.add(name)
        array = np.asarray(arrays[name])
        if array.shape != tuple(var.shape):
            misshaped.append(f"{name} {array.shape} (expected {tuple(var.shape)})")
            continue
        filled.append((path, var.replace(jnp.asarray(array, dtype=var.dtype))))
    problems = []
    if missing:
        problems.append(f"missing tensors: {_list_names(missing)}")
    unexpected = set(arrays) - used
    if unexpected:
        problems.append(f"unexpected tensors: {_list_names(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape: {_list_names(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model's architecture: " + "; ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
