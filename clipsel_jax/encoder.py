"""The encoder object every later stage uses, and ``load_encoder``, the one way to get one.

An encoder turns uint8 images and strings into float32 numpy features (projected, not normalised: what
``CLIPModel.get_image_features`` / ``get_text_features`` return). Forward passes are jit-compiled once per batch
shape and run data-parallel over a 1-D device mesh: the batch is split across devices, weights are replicated.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipsel_jax import parallel
from clipsel_jax.data.preprocess import (ImageError, ImagePreprocessing, as_rgb_uint8, prepare_images,
                                         resize_and_crop)
from clipsel_jax.errors import CheckpointError
from clipsel_jax.models.clip import CLIPModel
from clipsel_jax.text import load_tokenizer, tokenize
from clipsel_jax.weights import build_clip_model, read_checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_name(dtype) -> str:
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {name}")
    return name


def _default_batch_size() -> int:
    return 64 if jax.default_backend() == "cpu" else 256


class Encoder:
    """What every encoder shares: fixed-shape, device-sharded batches over a 1-D mesh, and a host-side step that
    turns any image into the model's fixed uint8 input (``prepare_image``), so input pipelines can run it in
    worker processes and send only small uint8 tensors to the devices.

    A subclass sets ``image_dim``, ``text_dim``, ``identity`` (JSON-able: what the encoder is, for cache keys),
    ``preprocessing`` (an ``ImagePreprocessing``), and two jitted functions of replicated state:
    ``self._image_features(state, uint8 (B, h, w, 3)) -> float32 (B, image_dim)`` with ``self._image_state``, and
    ``self._text_features(state, *token arrays) -> float32 (B, text_dim)`` with ``self._text_state``; and it
    implements ``_tokenize(texts) -> list of (B, L) arrays``.
    """

    image_dim: int
    text_dim: int
    dtype: str

    def __init__(self, preprocessing: ImagePreprocessing, identity: dict, dtype: str, batch_size: int | None,
                 mesh=None):
        self.preprocessing = preprocessing
        self.dtype = dtype
        self.batch_size = batch_size or _default_batch_size()
        self.mesh = mesh or parallel.data_mesh()
        self.identity = {**identity, "dtype": dtype, "preprocessing": preprocessing.to_dict()}
        self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))

    # -- host side -------------------------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one prepared image: uint8 (h, w, 3)."""
        return (*self.preprocessing.crop_size, 3)

    def prepare_image(self, image) -> np.ndarray:
        """One image (uint8 array of any size, grayscale/RGBA, or PIL) -> the model's uint8 (h, w, 3) input."""
        return resize_and_crop(as_rgb_uint8(image), self.preprocessing)

    # -- device side -----------------------------------------------------------------------------------------
    def _precision(self):
        # Matmuls in full float32 (TPUs otherwise round f32 inputs to bf16); bfloat16 models use the default.
        return jax.default_matmul_precision("highest" if self.dtype == "float32" else "default")

    def features_of_prepared(self, pixels: np.ndarray):
        """This process's rows of a global batch of prepared images, uint8 (B / processes, h, w, 3), with the
        global B a multiple of the device count -> float32 (B, image_dim), a batch-sharded device array dispatched
        asynchronously (``np.asarray`` waits; on several processes gather it with process_allgather)."""
        sharding = parallel.batch_sharding(self.mesh)
        global_shape = (pixels.shape[0] * jax.process_count(), *pixels.shape[1:])
        with self._precision():
            x = jax.make_array_from_process_local_data(sharding, pixels, global_shape)
            return self._image_features(self._image_state, x)

    def _run(self, fn: Callable, state, n: int, batch_size: int | None, make_batch: Callable, desc: str,
             progress: bool):
        """Run fn over n items in fixed-shape, device-sharded batches; the last batch is padded, never recompiled."""
        n_dev = self.mesh.devices.size
        b = parallel.padded_batch_size(n, batch_size or self.batch_size, n_dev)
        sharding = parallel.batch_sharding(self.mesh)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="img" if desc == "images" else "txt")
        pending, results = None, []
        with self._precision():
            for start in range(0, n, b):
                stop = min(n, start + b)
                inputs = [parallel.global_batch(parallel.pad_rows(x, b), sharding)
                          for x in make_batch(start, stop)]
                out = fn(state, *inputs)  # dispatch is asynchronous: the host prepares the next batch meanwhile
                if pending is not None:
                    results.append(parallel.to_host(pending[0])[: pending[1]])
                    if bar is not None:
                        bar.update(pending[1])
                pending = (out, stop - start)
            if pending is not None:
                results.append(parallel.to_host(pending[0])[: pending[1]])
                if bar is not None:
                    bar.update(pending[1])
        if bar is not None:
            bar.close()
        return np.concatenate(results) if results else None

    def encode_images(self, images, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """uint8 images (N, H, W, 3), (N, H, W) grayscale, (N, H, W, 4) RGBA, or a list of PIL images / arrays of
        any sizes -> float32 (N, image_dim)."""
        if isinstance(images, np.ndarray) and images.ndim in (3, 4) and images.dtype != np.uint8:
            raise ImageError(f"expected uint8 images, got dtype {images.dtype}. Convert floats in [0, 1] with "
                             "(x * 255).round().astype(np.uint8)")
        n = len(images) if isinstance(images, (np.ndarray, list, tuple)) else None
        if n is None:
            raise ImageError(f"expected a uint8 array (N, H, W, C) or a list of images, got {type(images).__name__}")
        if n == 0:
            return np.zeros((0, self.image_dim), np.float32)
        make = lambda a, b: [prepare_images(images[a:b], self.preprocessing, self._pool)]  # noqa: E731
        return self._run(self._image_features, self._image_state, n, batch_size, make, "images", progress)

    def encode_texts(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Strings -> float32 (M, text_dim); texts longer than the model's context are truncated."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings, not one string; wrap it: [text]")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.text_dim), np.float32)
        make = lambda a, b: self._tokenize(texts[a:b])  # noqa: E731
        return self._run(self._text_features, self._text_state, len(texts), batch_size, make, "texts", progress)

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        raise NotImplementedError


class ClipEncoder(Encoder):
    """CLIP image and text towers behind ``encode_images`` / ``encode_texts``."""

    def __init__(self, model: CLIPModel, tokenizer, preprocessing: ImagePreprocessing, identity: dict,
                 batch_size: int | None = None, mesh=None):
        super().__init__(preprocessing, identity, dtype_name(model.visual_projection.kernel.dtype), batch_size,
                         mesh)
        self.config = model.config
        self.tokenizer = tokenizer
        self.image_dim = self.text_dim = model.config.projection_dim
        self.context_length = model.config.text_config.max_position_embeddings
        graphdef, state = nnx.split(model)
        self._state = self._image_state = self._text_state = jax.device_put(state, parallel.replicated(self.mesh))
        mean = jnp.asarray(preprocessing.image_mean, jnp.float32)
        std = jnp.asarray(preprocessing.image_std, jnp.float32)
        compute = DTYPES[self.dtype]
        out = parallel.batch_sharding(self.mesh)

        @jax.jit
        def image_features(state, pixels):  # uint8 (B, h, w, 3) -> float32 (B, D)
            x = ((pixels.astype(jnp.float32) * (1 / 255) - mean) / std).astype(compute)
            y = nnx.merge(graphdef, state).get_image_features(x).astype(jnp.float32)
            return jax.lax.with_sharding_constraint(y, out)

        @jax.jit
        def text_features(state, ids, mask):
            # Every real row starts with a start-of-text token; forcing position 0 on also gives the all-zero pad
            # rows of a last batch one visible key, so no softmax row is empty. Pad rows are dropped after.
            mask = mask.at[:, 0].set(1)
            y = nnx.merge(graphdef, state).get_text_features(ids, mask).astype(jnp.float32)
            return jax.lax.with_sharding_constraint(y, out)

        self._image_features, self._text_features = image_features, text_features

    def __repr__(self):
        v, t = self.config.vision_config, self.config.text_config
        return (f"ClipEncoder(ViT {v.num_hidden_layers}x{v.hidden_size} patch {v.patch_size} @ {v.image_size}px, "
                f"text {t.num_hidden_layers}x{t.hidden_size}, dim {self.image_dim}, {self.dtype}, "
                f"{len(self.mesh.devices.flat)} device(s))")

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        if self.tokenizer is None:
            raise CheckpointError("this encoder was loaded without a tokenizer; pass tokenizer=<folder or hub id> "
                                  "to load_encoder")
        ids, mask = tokenize(self.tokenizer, texts, self.context_length)
        return [ids, mask]


# -------------------------------------------------------------------------------------------------------------
# Loading

ENCODER_FACTORIES: dict[str, Callable[..., object]] = {}


def register_encoder(name: str, factory: Callable[..., object]) -> None:
    """Make ``load_encoder(name, ...)`` call ``factory(dtype=..., **kwargs)`` (for encoders that are not CLIP)."""
    ENCODER_FACTORIES[name] = factory


def load_encoder(spec, dtype=jnp.float32, *, tokenizer: str | None = None, activation: str | None = None,
                 revision: str | None = None, batch_size: int | None = None, mesh=None,
                 allow_torchscript: bool = False) -> Encoder:
    """Load an encoder from a spec.

    spec: a folder written by ``CLIPModel.save_pretrained`` (with its tokenizer and preprocessor files); a hub id
    such as ``"openai/clip-vit-base-patch32"`` (downloaded once into the huggingface_hub cache); an OpenCLIP / OpenAI
    state-dict file (.pt, .bin, .safetensors) with ``tokenizer=`` a folder or hub id unless the file's folder holds
    one, and ``activation=`` when it cannot be inferred; or the name of a registered encoder.
    dtype: float32 (parity with PyTorch) or bfloat16 (faster on TPU/GPU).
    allow_torchscript: read a TorchScript archive (OpenAI's original .pt releases). Off by default: torch runs the
    code such an archive carries while loading it, so allow it only for files you trust (or convert the file once
    to .safetensors on a trusted machine). Pickled state dicts never need it: they are read without running code.
    """
    if isinstance(spec, str) and spec in ENCODER_FACTORIES:
        return ENCODER_FACTORIES[spec](dtype=dtype, batch_size=batch_size, mesh=mesh)
    dtype = DTYPES[dtype_name(dtype)]
    ckpt = read_checkpoint(spec, tokenizer=tokenizer, activation=activation, revision=revision,
                           allow_torchscript=allow_torchscript)
    tok_source = tokenizer or ckpt.tokenizer_source
    if tok_source is None:
        raise CheckpointError(f"{spec} has no tokenizer files (vocab.json + merges.txt or tokenizer.json); pass "
                              "tokenizer=<folder or hub id>")
    tok = load_tokenizer(tok_source)  # the one place a CLIP tokenizer is loaded; weights.py only finds it
    ckpt.use_tokenizer(tok)  # OpenCLIP files take their special-token ids from it
    model = build_clip_model(ckpt.config, ckpt.state_dict, dtype=dtype, source=str(spec))
    return ClipEncoder(model, tok, ckpt.preprocessing, ckpt.identity, batch_size=batch_size, mesh=mesh)
