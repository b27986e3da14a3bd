"""Placing named numpy arrays into an NNX module tree, for models whose weights are converted by name."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipsel_jax.errors import check_tensor_names


def build_from_arrays(make: Callable[[], nnx.Module], arrays: dict[str, np.ndarray], source: str) -> nnx.Module:
    """``make()`` (built abstractly, no random init) with every parameter taken from ``arrays``, keyed by the
    dotted parameter path (``blocks.3.depthwise.kernel``) and already in NNX layout. Missing, unexpected and
    mis-shaped arrays are reported together in one ``CheckpointError``."""
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
    check_tensor_names(source, "the model's architecture", missing, set(arrays) - used, misshaped)
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
