"""CLIP image and text towers as Flax NNX modules.

Attribute names follow Hugging Face's ``CLIPModel`` (including its ``pre_layrnorm`` spelling) so that a
``model.safetensors`` maps onto this tree by name (see ``clipsel_jax.weights``). The numbers match
``transformers.CLIPModel`` to float32 round-off; ``tests/test_clip_parity.py`` holds us to that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# Every matmul accumulates and returns float32, also for bfloat16 weights: more accurate, and XLA's CPU backend
# runs bf16 x bf16 -> f32 dots about twice as fast as bf16 -> bf16 ones (measured; see scripts/bench_encoder.py).


class Attention(nnx.Module):
    def __init__(self, hidden: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} attention heads")
        self.heads = heads
        lin = dict(dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        self.q_proj = nnx.Linear(hidden, hidden, **lin)
        self.k_proj = nnx.Linear(hidden, hidden, **lin)
        self.v_proj = nnx.Linear(hidden, hidden, **lin)
        self.out_proj = nnx.Linear(hidden, hidden, **lin)

    def __call__(self, x, *, causal: bool, key_mask=None):
        b, t, d = x.shape
        hd = d // self.heads
        split = lambda y: y.reshape(b, t, self.heads, hd)  # noqa: E731
        q, k, v = split(self.q_proj(x)) * hd**-0.5, split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        allowed = None
        if causal:
            allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if key_mask is not None:
            keys = key_mask[:, None, None, :]
            allowed = keys if allowed is None else allowed & keys
        if allowed is not None:
            scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = act
        lin = dict(dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        self.fc1 = nnx.Linear(hidden, intermediate, **lin)
        self.fc2 = nnx.Linear(intermediate, hidden, **lin)

    def __call__(self, x):
        return self.fc2(activation(self.act)(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        norm = dict(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = nnx.LayerNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, x, *, causal: bool, key_mask=None):
        x = x + self.self_attn(self.layer_norm1(x), causal=causal, key_mask=key_mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, *, causal: bool, key_mask=None):
        for layer in self.layers:
            x = layer(x, causal=causal, key_mask=key_mask)
        return x


class PatchEmbedding(nnx.Module):
    """The stride-p, p x p patch convolution written as one matmul over flattened patches.

    ``kernel`` has nnx.Conv's layout (p, p, C, hidden); a patch is flattened in the same (row, col, channel) order.
    """

    def __init__(self, patch: int, channels: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.patch = patch
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (patch, patch, channels, hidden), dtype))

    def __call__(self, pixels):  # (B, H, W, C) -> (B, H/p * W/p, hidden)
        b, h, w, c = pixels.shape
        p = self.patch
        x = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        return jnp.dot(x, self.kernel[...].reshape(p * p * c, -1).astype(x.dtype), preferred_element_type=jnp.float32)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size,), dtype) * 0.02)
        self.patch_embedding = PatchEmbedding(cfg.patch_size, cfg.num_channels, cfg.hidden_size, dtype=dtype,
                                              rngs=rngs)
        self.position_embedding = nnx.Embed(n_patches + 1, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                            rngs=rngs)

    def __call__(self, pixels):
        patches = self.patch_embedding(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (patches.shape[0], 1, patches.shape[2]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding.embedding[...].astype(patches.dtype)


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, rngs: nnx.Rngs):
        norm = dict(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.embeddings = VisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = nnx.LayerNorm(cfg.hidden_size, **norm)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = nnx.LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, pixels):
        """pixels: normalised (B, image_size, image_size, C) -> pooled class-token state (B, hidden)."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        emb = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **emb)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **emb)

    def __call__(self, input_ids):
        positions = self.position_embedding.embedding[...][: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions.astype(self.token_embedding.dtype)


class TextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                              param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        """input_ids (B, T) int32 -> pooled end-of-text state (B, hidden)."""
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True, key_mask=key_mask))
        if self.eos_token_id == 2:
            # Checkpoints converted before transformers PR #24773 carry eos_token_id 2; transformers then pools
            # at the largest token id (the end-of-text token of the original vocabulary). Do the same.
            eot = jnp.argmax(input_ids, axis=-1)
        else:
            # First end-of-text token (padding may use the same id).
            eot = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return x[jnp.arange(x.shape[0]), eot]


class CLIPModel(nnx.Module):
    """Both towers, their projections and the logit scale, named as in ``transformers.CLIPModel``."""

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.text_model = TextTransformer(config.text_config, dtype=dtype, rngs=rngs)
        self.vision_model = VisionTransformer(config.vision_config, dtype=dtype, rngs=rngs)
        proj = dict(use_bias=False, dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)
        self.visual_projection = nnx.Linear(config.vision_config.hidden_size, config.projection_dim, **proj)
        self.text_projection = nnx.Linear(config.text_config.hidden_size, config.projection_dim, **proj)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, dtype=jnp.float32))

    def get_image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(self, pixels, input_ids, attention_mask=None):
        """Returns (logits_per_image, logits_per_text) as transformers does."""
        img = self.get_image_features(pixels).astype(jnp.float32)
        txt = self.get_text_features(input_ids, attention_mask).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits_per_text = txt @ img.T * jnp.exp(self.logit_scale[...])
        return logits_per_text.T, logits_per_text
