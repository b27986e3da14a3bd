"""Dataset adapters A_I and A_T (docs/method.md, "Dataset adaptation"): small trainable maps from a frozen
encoder's features to a shared space. Linear by default, as in the authors' code; a two-layer residual MLP as an
option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LinearAdapter(nnx.Module):
    """y = W x + b. Square adapters start at the identity, so training starts from the encoder's own alignment."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_dim, out_dim, rngs=rngs)
        if in_dim == out_dim:
            self.linear.kernel[...] = jnp.eye(in_dim, dtype=jnp.float32)

    def __call__(self, x):
        return self.linear(x)


class MLPAdapter(nnx.Module):
    """y = P x + fc2(gelu(fc1(x))), P the identity for square adapters; fc2 starts at zero (so y starts at P x)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, *, rngs: nnx.Rngs):
        hidden = hidden or max(in_dim, out_dim)
        self.skip = LinearAdapter(in_dim, out_dim, rngs=rngs)
        self.fc1 = nnx.Linear(in_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out_dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x):
        return self.skip(x) + self.fc2(jax.nn.gelu(self.fc1(x)))


class Adapters(nnx.Module):
    """The image adapter, the text adapter (separate weights: the authors' code shared one by mistake) and the
    learnable contrastive temperature (as log of the logit scale, initialised to 1 / 0.07)."""

    def __init__(self, image_dim: int, text_dim: int, shared_dim: int | None = None, kind: str = "linear", *,
                 rngs: nnx.Rngs):
        if kind not in ("linear", "mlp"):
            raise ValueError(f"adapter kind must be 'linear' or 'mlp', got {kind!r}")
        shared_dim = shared_dim or min(image_dim, text_dim)
        make = LinearAdapter if kind == "linear" else MLPAdapter
        self.image = make(image_dim, shared_dim, rngs=rngs)
        self.text = make(text_dim, shared_dim, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.log(jnp.float32(1 / 0.07)))

    def __call__(self, image_feats, text_feats):
        return self.image(image_feats), self.text(text_feats)
