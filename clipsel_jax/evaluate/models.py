"""Downstream classifiers for judging a selected subset: a small CNN that trains in minutes on a CPU, and the CIFAR
form of ResNet-18 (3x3 stem, no max-pool) for GPU/TPU. NHWC, batch norm, ReLU; Flax NNX."""

from __future__ import annotations

import jax
from flax import nnx


class ConvBN(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class SmallCNN(nnx.Module):
    """Three stages of two 3x3 conv + BN + ReLU (width, 2x, 4x), max-pool between, global average pool, linear."""

    def __init__(self, num_classes: int, width: int = 32, *, rngs: nnx.Rngs):
        w = [width, 2 * width, 4 * width]
        self.stages = nnx.List([
            nnx.List([ConvBN(3 if i == 0 else w[i - 1], w[i], rngs=rngs), ConvBN(w[i], w[i], rngs=rngs)])
            for i in range(3)])
        self.head = nnx.Linear(w[2], num_classes, rngs=rngs)

    def features(self, x):  # the penultimate (pooled) features
        for i, (a, b) in enumerate(self.stages):
            x = b(a(x))
            if i < 2:
                x = _pool(x)
        return x.mean(axis=(1, 2))

    def __call__(self, x):
        return self.head(self.features(x))


class BasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.a = ConvBN(cin, cout, stride, rngs=rngs)
        self.conv = nnx.Conv(cout, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:  # a 1x1 projection where the shape changes
            self.shortcut = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.shortcut_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.shortcut = self.shortcut_bn = None

    def __call__(self, x):
        y = self.bn(self.conv(self.a(x)))
        skip = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return jax.nn.relu(y + skip)


class ResNet18(nnx.Module):
    """ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant): stages of 2 blocks at 64/128/256/512."""

    def __init__(self, num_classes: int, width: int = 64, *, rngs: nnx.Rngs):
        self.stem = ConvBN(3, width, rngs=rngs)
        blocks, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2, rngs=rngs), BasicBlock(cout, cout, 1, rngs=rngs)]
            cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def features(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(axis=(1, 2))

    def __call__(self, x):
        return self.head(self.features(x))


MODELS = {"small_cnn": SmallCNN, "resnet18": ResNet18}


def make_model(name: str, num_classes: int, width: int | None = None, seed: int = 0) -> nnx.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    kwargs = {} if width is None else {"width": width}
    return MODELS[name](num_classes, rngs=nnx.Rngs(seed), **kwargs)


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["SmallCNN", "ResNet18", "make_model", "param_count"]
