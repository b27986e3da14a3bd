"""The text tower of sentence-transformers' all-MiniLM-L6-v2 as a Flax NNX module.

A BERT encoder (6 post-LayerNorm layers, 384 wide, 12 heads, exact GELU) read from the Hugging Face ``BertModel``
safetensors, followed by what sentence-transformers does on top: mean pooling over the real (mask = 1) tokens and
L2 normalisation. Token type ids are all 0 (single sentences). Matches ``transformers.BertModel`` + mean pooling +
normalisation to float32 round-off (``tests/test_offline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipsel_jax.errors import CheckpointError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type") != "bert":
            raise CheckpointError(f"expected a BERT config (model_type 'bert'), got {cfg.get('model_type')!r}")
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError("only BERT with hidden_act 'gelu' and absolute position embeddings is implemented, "
                                  f"got {cfg.get('hidden_act')!r} / {cfg.get('position_embedding_type')!r}")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class Layer(nnx.Module):
    """Post-LN BERT layer: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        if d % cfg.num_attention_heads:
            raise ValueError(f"hidden size {d} is not divisible by {cfg.num_attention_heads} attention heads")
        self.heads = cfg.num_attention_heads
        lin = dict(dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        norm = dict(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = (nnx.Linear(d, d, **lin) for _ in range(3))
        self.attention_out = nnx.Linear(d, d, **lin)
        self.attention_norm = nnx.LayerNorm(d, **norm)
        self.intermediate = nnx.Linear(d, f, **lin)
        self.output = nnx.Linear(f, d, **lin)
        self.output_norm = nnx.LayerNorm(d, **norm)

    def __call__(self, x, key_mask):
        b, t, d = x.shape
        hd = d // self.heads
        split = lambda y: y.reshape(b, t, self.heads, hd)  # noqa: E731
        q, k, v = split(self.query(x) * hd**-0.5), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        # A finite floor, not -inf: an all-padding row (pad rows of a last batch) gets a uniform softmax, not NaN.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32).reshape(b, t, d)
        x = self.attention_norm(x + self.attention_out(attended))
        return self.output_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class MiniLM(nnx.Module):
    """BERT encoder + mean pooling + L2 normalisation (a sentence-transformers model with Pooling/Normalize)."""

    def __init__(self, cfg: BertConfig = BertConfig(), *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        emb = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **emb)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **emb)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **emb)
        self.embeddings_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                                             param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def hidden_states(self, input_ids, attention_mask):
        """(B, T) ids and 0/1 mask -> last hidden states float32 (B, T, hidden)."""
        t = input_ids.shape[1]
        x = (self.word_embeddings(input_ids).astype(jnp.float32)
             + self.position_embeddings.embedding[...][:t].astype(jnp.float32)
             + self.token_type_embeddings.embedding[...][0].astype(jnp.float32))  # token type 0 everywhere
        x = self.embeddings_norm(x)
        key_mask = attention_mask.astype(bool)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def __call__(self, input_ids, attention_mask):
        """(B, T) ids and 0/1 mask -> unit-norm sentence embeddings float32 (B, hidden)."""
        x = self.hidden_states(input_ids, attention_mask)
        m = attention_mask.astype(jnp.float32)[..., None]
        # The clamps are sentence-transformers' (Pooling: count >= 1e-9; F.normalize: norm >= 1e-12).
        pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Weights: transformers' BertModel names -> this module's parameter paths


def convert_state_dict(sd: dict[str, np.ndarray], cfg: BertConfig) -> dict[str, np.ndarray]:
    """A ``BertModel`` state dict (``embeddings.*``, ``encoder.layer.N.*``; the unused pooler is dropped) -> arrays
    keyed by this module's parameter paths, in NNX layout (Linear kernels transposed to (in, out))."""
    names = {"embeddings.word_embeddings.weight": "word_embeddings.embedding",
             "embeddings.position_embeddings.weight": "position_embeddings.embedding",
             "embeddings.token_type_embeddings.weight": "token_type_embeddings.embedding",
             "embeddings.LayerNorm.weight": "embeddings_norm.scale",
             "embeddings.LayerNorm.bias": "embeddings_norm.bias"}
    per_layer = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
                 "attention.output.dense": "attention_out", "intermediate.dense": "intermediate",
                 "output.dense": "output"}
    norms = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}
    for i in range(cfg.num_hidden_layers):
        for src, dst in per_layer.items():
            names[f"encoder.layer.{i}.{src}.weight"] = f"layers.{i}.{dst}.kernel"
            names[f"encoder.layer.{i}.{src}.bias"] = f"layers.{i}.{dst}.bias"
        for src, dst in norms.items():
            names[f"encoder.layer.{i}.{src}.weight"] = f"layers.{i}.{dst}.scale"
            names[f"encoder.layer.{i}.{src}.bias"] = f"layers.{i}.{dst}.bias"
    # Some exports prefix every name with "bert." (BertForX heads); the bare BertModel names are what we read.
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    out = {}
    for src, dst in names.items():
        if src in sd:
            a = sd[src]
            out[dst] = a.T if dst.endswith(".kernel") else a
    return out
