"""EfficientNet-Lite0 (ImageNet-1k) as a Flax NNX module, NHWC, inference only.

The architecture of the TensorFlow reference (``efficientnet/lite``) that the packaged PyTorch weights were converted
from: a 3x3 stride-2 stem, 16 MBConv blocks without squeeze-excitation, ReLU6 everywhere, TensorFlow "SAME"
padding (asymmetric for stride 2: the odd pixel goes bottom/right), a 1x1 head to 1280 channels, global average
pooling and a 1000-way classifier. Batch norm is folded into the convolution before it when the weights are loaded
(inference form: ``gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is one convolution with a bias). 1x1
convolutions are Linear layers over the channel axis; depthwise ones are fused shifted sums (see DepthwiseConv).

``features(pixels)`` returns the pooled 1280-d features; ``classify(features)`` / ``__call__`` the ImageNet logits.
Pixels are normalised as the TensorFlow models were trained: ``(x - 127) / 128`` on the 0..255 scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipsel_jax.errors import CheckpointError, list_names

# Stages of EfficientNet-B0/Lite0: (repeats, kernel, stride of the first block, expansion, in, out channels).
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
STEM_CHANNELS, HEAD_CHANNELS, NUM_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, kept by the PyTorch conversion
IMAGE_SIZE = 224
PIXEL_MEAN, PIXEL_STD = 127.0, 128.0  # on the 0..255 scale, all three channels


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expansion, in, out) per MBConv block, in order (16 for Lite0)."""
    specs = []
    for repeats, k, s, e, cin, cout in STAGES:
        specs += [(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout) for i in range(repeats)]
    return specs


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": output ceil(size / stride), the odd pixel of padding at the end (bottom/right)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nnx.Module):
    """k x k depthwise convolution (one filter per channel, folded batch norm as the bias), "SAME" padding.

    Written as a sum of k*k shifted, strided slices times per-channel weights, which XLA fuses into one loop: its
    CPU backend runs the same convolution as ``lax.conv_general_dilated(feature_group_count=C)`` 20-50x slower
    (measured on 2 cores, batch 16, all Lite0 depthwise shapes). Products and sums are float32.
    """

    def __init__(self, channels: int, kernel: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.kernel_size, self.stride = kernel, stride
        init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=())
        self.kernel = nnx.Param(init(rngs.params(), (kernel, kernel, channels), dtype))  # (kh, kw, C)
        self.bias = nnx.Param(jnp.zeros((channels,), dtype))

    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        h, w = x.shape[1:3]
        (top, bottom), (left, right) = _same_padding(h, k, s), _same_padding(w, k, s)
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        oh, ow = -(-h // s), -(-w // s)
        kernel = self.kernel[...].astype(jnp.float32)
        out = self.bias[...].astype(jnp.float32)
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :]
                out = out + window.astype(jnp.float32) * kernel[i, j]
        return out


def pointwise(cin: int, cout: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A 1x1 convolution is a Linear over the channel axis (one matmul; faster than a 1x1 conv on XLA's CPU)."""
    return nnx.Linear(cin, cout, dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs)


class MBConv(nnx.Module):
    """Inverted bottleneck: 1x1 expand (skipped when expansion is 1), depthwise kxk, 1x1 project, residual when the
    shape is kept. Every convolution carries its folded batch norm as a bias."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        mid = cin * expand
        self.expand = pointwise(cin, mid, dtype=dtype, rngs=rngs) if expand != 1 else None
        self.depthwise = DepthwiseConv(mid, kernel, stride, dtype=dtype, rngs=rngs)
        self.project = pointwise(mid, cout, dtype=dtype, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        h = jax.nn.relu6(self.expand(x)) if self.expand is not None else x
        h = self.project(jax.nn.relu6(self.depthwise(h)))
        return h + x if self.residual else h


class EfficientNetLite0(nnx.Module):
    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        # A dense 3x3 stride-2 convolution: XLA's own conv is fast here. "SAME" pads as TensorFlow does.
        self.stem = nnx.Conv(3, STEM_CHANNELS, (3, 3), 2, padding="SAME", dtype=dtype, param_dtype=dtype,
                             preferred_element_type=jnp.float32, rngs=rngs)
        self.blocks = nnx.List([MBConv(*spec, dtype=dtype, rngs=rngs) for spec in block_specs()])
        self.head = pointwise(STAGES[-1][-1], HEAD_CHANNELS, dtype=dtype, rngs=rngs)
        self.classifier = nnx.Linear(HEAD_CHANNELS, NUM_CLASSES, dtype=dtype, param_dtype=dtype,
                                     preferred_element_type=jnp.float32, rngs=rngs)

    def features(self, pixels):
        """Normalised pixels (B, H, W, 3) -> pooled features float32 (B, 1280)."""
        x = jax.nn.relu6(self.stem(pixels))
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu6(self.head(x))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def classify(self, features):
        """Pooled features (B, 1280) -> ImageNet-1k logits float32 (B, 1000) (dropout is the identity here)."""
        return self.classifier(features).astype(jnp.float32)

    def __call__(self, pixels):
        return self.classify(self.features(pixels))


# ---------------------------------------------------------------------------------------------------------------
# Weights: the efficientnet_pytorch state dict (``_conv_stem``, ``_bn0``, ``_blocks.N._depthwise_conv``, ...)


def _fold(sd: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """torch conv weight (out, in/groups, kh, kw) and its batch norm -> (weight scaled per output channel, bias)."""
    w = sd[f"{conv}.weight"].astype(np.float64)
    gamma, beta = sd[f"{bn}.weight"].astype(np.float64), sd[f"{bn}.bias"].astype(np.float64)
    mean, var = sd[f"{bn}.running_mean"].astype(np.float64), sd[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + BN_EPS)  # folded in float64, rounded to float32 once
    return (w * scale[:, None, None, None]).astype(np.float32), (beta - mean * scale).astype(np.float32)


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packaged PyTorch state dict -> arrays keyed by this module's parameter paths, batch norm folded."""
    out = {}

    def put(path: str, conv: str, bn: str, layout: str):
        w, out[f"{path}.bias"] = _fold(sd, conv, bn)
        if layout == "conv":  # (out, in, kh, kw) -> nnx.Conv's (kh, kw, in, out)
            out[f"{path}.kernel"] = w.transpose(2, 3, 1, 0)
        elif layout == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C)
            out[f"{path}.kernel"] = w[:, 0].transpose(1, 2, 0)
        else:  # 1x1 (out, in, 1, 1) -> Linear's (in, out)
            out[f"{path}.kernel"] = w[:, :, 0, 0].T

    put("stem", "_conv_stem", "_bn0", "conv")
    for i, (_, _, expand, _, _) in enumerate(block_specs()):
        p = f"_blocks.{i}"
        if expand != 1:
            put(f"blocks.{i}.expand", f"{p}._expand_conv", f"{p}._bn0", "pointwise")
        put(f"blocks.{i}.depthwise", f"{p}._depthwise_conv", f"{p}._bn1", "depthwise")
        put(f"blocks.{i}.project", f"{p}._project_conv", f"{p}._bn2", "pointwise")
    put("head", "_conv_head", "_bn1", "pointwise")
    out["classifier.kernel"] = sd["_fc.weight"].T
    out["classifier.bias"] = sd["_fc.bias"]
    return out


def expected_torch_keys() -> set[str]:
    """Every tensor name the packaged state dict must hold (num_batches_tracked counters aside)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias"}
    keys |= {f"{m}.{s}" for m in ("_bn0", "_bn1") for s in bn}
    for i, (_, _, expand, _, _) in enumerate(block_specs()):
        convs = [("_expand_conv", "_bn0")] if expand != 1 else []
        for conv, norm in convs + [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]:
            keys.add(f"_blocks.{i}.{conv}.weight")
            keys |= {f"_blocks.{i}.{norm}.{s}" for s in bn}
    return keys


def check_state_dict(sd: dict[str, np.ndarray], source: str) -> None:
    have = {k for k in sd if not k.endswith("num_batches_tracked")}  # a training counter, not a weight
    missing, unexpected = expected_torch_keys() - have, have - expected_torch_keys()
    if missing or unexpected:
        raise CheckpointError(f"{source} is not an EfficientNet-Lite0 state dict in efficientnet_pytorch naming: "
                              f"missing {list_names(missing) or 'none'}; "
                              f"unexpected {list_names(unexpected) or 'none'}")
