"""Checkpoint import for the CLIP towers: Hugging Face folders and hub ids, OpenCLIP / OpenAI state-dict files.

Every format is first turned into a flat Hugging Face ``CLIPModel`` state dict of numpy arrays; one function,
``build_clip_model``, then places it into the NNX tree by name and reports missing, unexpected and mis-shaped
tensors together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPConfig

from clipsel_jax import torchfile
from clipsel_jax.data.preprocess import ImagePreprocessing
from clipsel_jax.errors import CheckpointError, check_tensor_names, list_names
from clipsel_jax.hashing import file_sha256  # noqa: F401  (re-exported: its home was here)
from clipsel_jax.models.clip import ACTIVATIONS, CLIPModel



# Tensors some checkpoints carry that are buffers, not weights.
IGNORED_KEYS = re.compile(r"(^|\.)position_ids$|^input_resolution$|^context_length$|^vocab_size$|(^|\.)attn_mask$")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json"]


@dataclass
class Checkpoint:
    """A CLIP checkpoint in Hugging Face naming, ready to build a model from."""

    config: CLIPConfig
    state_dict: dict[str, np.ndarray]
    preprocessing: ImagePreprocessing
    tokenizer_source: str | None  # a folder (or hub id) that holds the tokenizer files
    identity: dict = field(default_factory=dict)  # what the checkpoint is, for cache keys and metadata
    # OpenCLIP / OpenAI files do not say their special-token ids: the text config holds CLIP's BPE defaults until
    # ``use_tokenizer`` sets those of the tokenizer actually loaded (load_encoder does).
    token_ids_from_tokenizer: bool = False

    def use_tokenizer(self, tokenizer) -> None:
        """Take the eos/bos/pad ids of a loaded tokenizer into the text config, where the checkpoint leaves them to
        the tokenizer; a Hugging Face config's own ids (legacy eos 2 included) are kept."""
        if self.token_ids_from_tokenizer:
            text = self.config.text_config
            text.eos_token_id, text.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
            text.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------------------------
# Reading tensors from files


def _is_torchscript(path: Path) -> bool:
    """OpenAI's released .pt files are TorchScript archives (a zip with constants.pkl), not pickled state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except zipfile.BadZipFile:  # a broken archive: torchfile says what is wrong with it
        return False


def _check_torchscript(path: Path, allow_torchscript: bool) -> bool:
    """Whether ``path`` is a TorchScript archive, refused unless allowed: torch.jit.load compiles and runs the code
    such an archive carries, so only a trusted one may be read."""
    torchscript = _is_torchscript(path)
    if torchscript and not allow_torchscript:
        raise CheckpointError(
            f"{path} is a TorchScript archive, refused by default: TorchScript archives carry code that torch runs "
            "while loading them (OpenAI's original .pt releases are TorchScript). If you trust the file, pass "
            "allow_torchscript=True (load_encoder, read_checkpoint, read_openclip_file, read_state_dict) or "
            "--trust-torchscript on the command line; or convert it once to .safetensors on a trusted machine")
    return torchscript


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it from the original checkpoint") from e


def read_state_dict(path: str | os.PathLike, *, allow_torchscript: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors, PyTorch pickle or TorchScript (OpenAI .pt) file, as float32 numpy.

    Pickled state dicts are read without torch; torch is needed only for pickles that hold other objects (read with
    its weights_only loader) and for TorchScript archives, which run code and are read only with
    ``allow_torchscript=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    torchscript = _check_torchscript(path, allow_torchscript)
    if not torchscript:
        try:  # torch-free: plain state dicts need no torch (clipsel_jax/torchfile.py)
            return _tensors_of(path, torchfile.load(path), lambda v: np.asarray(v, np.float32), np.ndarray)
        except torchfile.CorruptCheckpoint as e:  # damaged or hostile: not to be handed to torch either
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
        except torchfile.UnsupportedPickle as e:
            reason = str(e)  # other objects in the pickle: torch's weights_only loader may still read it
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    else:
        reason = "a TorchScript archive"
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{path} is {reason}; reading it needs torch: pip install 'clipsel_jax[torch]' (or "
                              "convert it to .safetensors once)") from e
    try:
        if torchscript:
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's files remain TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:  # weights_only: torch's own restricted unpickler, for every pickle of the file
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(e).__name__}: {e}") from e
    return _tensors_of(path, obj, lambda v: v.detach().to(torch.float32).cpu().numpy(), torch.Tensor)


def _tensors_of(path: Path, obj, to_numpy, tensor_type) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # OpenCLIP training checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k.removeprefix("module."): to_numpy(v) for k, v in obj.items() if isinstance(v, tensor_type)}


# ---------------------------------------------------------------------------------------------------------------
# Placing a Hugging Face state dict into the NNX model


def _hf_name(path: tuple) -> str:
    *mods, leaf = (str(p) for p in path)
    return ".".join(mods + [{"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)])


def _to_nnx_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:  # torch Linear (out, in) -> (in, out)
        return array.T
    if leaf == "kernel" and array.ndim == 4:  # torch Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def build_clip_model(config: CLIPConfig, state_dict: dict[str, np.ndarray], dtype=jnp.float32,
                     source: str = "checkpoint") -> CLIPModel:
    """An NNX ``CLIPModel`` holding exactly the tensors of ``state_dict`` (Hugging Face names)."""
    abstract = nnx.eval_shape(lambda: CLIPModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    used, missing, misshaped, filled = set(), [], [], []
    for path, var in nnx.to_flat_state(state):
        name = _hf_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        array = _to_nnx_layout(state_dict[name], str(path[-1]))
        if array.shape != tuple(var.shape):
            misshaped.append(f"{name} {tuple(state_dict[name].shape)} (expected {tuple(var.shape)} in our layout)")
            continue
        filled.append((path, var.replace(jnp.asarray(array, dtype=var.dtype))))
    unexpected = [k for k in state_dict if k not in used and not IGNORED_KEYS.search(k)]
    check_tensor_names(source, "the CLIP architecture of its config", missing, unexpected, misshaped)
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders and hub ids


def read_preprocessing(folder: Path) -> ImagePreprocessing:
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return ImagePreprocessing()
    cfg = _read_json(file)
    size = cfg.get("size", 224)
    shortest = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", shortest)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    if cfg.get("resample", 3) != 3:
        raise CheckpointError(f"{file}: resample={cfg['resample']} is not bicubic (3); only CLIP's bicubic "
                              "preprocessing is implemented")
    defaults = ImagePreprocessing()
    return ImagePreprocessing(int(shortest), crop, tuple(cfg.get("image_mean", defaults.image_mean)),
                              tuple(cfg.get("image_std", defaults.image_std)))


def read_hf_folder(folder: str | os.PathLike, identity: dict | None = None) -> Checkpoint:
    """A folder written by ``CLIPModel.save_pretrained`` (plus its processor's ``save_pretrained``)."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a folder written by "
                              "CLIPModel.save_pretrained, or pass an OpenCLIP/OpenAI .pt/.bin/.safetensors file")
    raw = _read_json(cfg_file)
    if raw.get("model_type") not in (None, "clip"):
        raise CheckpointError(f"{cfg_file} describes a {raw.get('model_type')!r} model, not CLIP")
    config = CLIPConfig.from_pretrained(str(folder))
    shards = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise CheckpointError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")
    state_dict = {}
    for shard in shards:
        state_dict.update(read_state_dict(shard))
    tokenizer_files = ("tokenizer.json", "vocab.json")
    tokenizer = str(folder) if any((folder / f).is_file() for f in tokenizer_files) else None
    identity = identity or {"kind": "hf_folder", "path": str(folder.resolve())}
    identity["weights_sha"] = _weights_fingerprint(shards)
    return Checkpoint(config, state_dict, read_preprocessing(folder), tokenizer, identity)


def _weights_fingerprint(files) -> str:
    """Cheap identity of weight files: name, size and the first and last MiB (hashing GBs would take seconds)."""
    h = hashlib.sha256()
    for f in files:
        f = Path(f)
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a hub repository: from the huggingface_hub cache, downloading it once if needed."""
    from huggingface_hub import snapshot_download

    def fetch(local_only: bool, patterns):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=local_only))

    for local_only in (True, False):
        try:
            folder = fetch(local_only, HUB_PATTERNS + ["model.safetensors"])
            if not (folder / "model.safetensors").is_file():  # older repos ship only the PyTorch pickle
                folder = fetch(local_only, HUB_PATTERNS + ["pytorch_model.bin"])
            if (folder / "config.json").is_file():
                return folder
        except Exception as e:  # offline, unknown repo, gated repo, HTTP errors: all end in the message below
            error = e
            if local_only:
                continue
            raise CheckpointError(
                f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). If this machine "
                "has no network, load the weights offline instead: a local folder written by "
                "CLIPModel.save_pretrained (copy it from a machine with network), an OpenCLIP/OpenAI "
                ".pt/.bin/.safetensors file (with tokenizer=<folder>). Set HF_HOME to a pre-filled cache to reuse one.") from error
    raise CheckpointError(f"hub repository {repo_id!r} has no config.json; it is not a transformers CLIP model")


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP / OpenAI state dicts


# Sub-module names inside one residual block: OpenCLIP -> transformers.
BLOCK_NAMES = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]


def openclip_to_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename an OpenCLIP / OpenAI CLIP state dict to transformers' CLIPModel names (unknown names pass through)."""
    prefixes = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                ("ln_final.", "text_model.final_layer_norm."), ("logit_scale", "logit_scale"),
                ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
                ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
                ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
                ("visual.ln_pre.", "vision_model.pre_layrnorm."), ("visual.ln_post.", "vision_model.post_layernorm.")]
    out = {}
    for key, value in sd.items():
        if key == "text_projection":  # used as x @ P: (width, embed); a Linear weight is (embed, width)
            out["text_projection.weight"] = value.T
            continue
        if key == "visual.proj":
            out["visual_projection.weight"] = value.T
            continue
        m = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$", key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            dst, rest = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
                    out[f"{dst}.self_attn.{name}.{kind}"] = part
                continue
            renamed = [f"{dst}.{b}{rest[len(a):]}" for a, b in BLOCK_NAMES if rest.startswith(a)]
            out[renamed[0] if renamed else key] = value
            continue
        for a, b in prefixes:
            if key == a or (a.endswith(".") and key.startswith(a)):
                out[b + key[len(a):]] = value
                break
        else:
            out[key] = value
    return out


def _count_blocks(sd, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def openclip_config(sd: dict[str, np.ndarray], activation: str, eos_token_id: int = 49407, bos_token_id: int = 49406,
                    pad_token_id: int = 49407, model_cfg: dict | None = None) -> CLIPConfig:
    """A CLIPConfig inferred from the shapes of an OpenCLIP / OpenAI ViT state dict; the token ids default to those
    of CLIP's BPE tokenizer (<|startoftext|> 49406, <|endoftext|> 49407, also the pad token)."""
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "ln_final.weight", "text_projection"]
    absent = [k for k in need if k not in sd]
    if absent:
        hint = " (a ResNet-based CLIP: only ViT towers are supported)" if "visual.layer1.0.conv1.weight" in sd else ""
        raise CheckpointError(f"not an OpenCLIP/OpenAI ViT CLIP state dict{hint}: missing tensors {list_names(absent)}")
    model_cfg = model_cfg or {}
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    t_width = sd["ln_final.weight"].shape[0]
    # Head counts are not visible in tensor shapes: OpenAI's rule is width // 64; an OpenCLIP config may say otherwise.
    v_heads = v_width // model_cfg.get("vision_cfg", {}).get("head_width", 64)
    t_heads = model_cfg.get("text_cfg", {}).get("heads", t_width // 64)
    for tower, width, heads in (("vision", v_width, v_heads), ("text", t_width, t_heads)):
        if heads < 1 or width % heads:
            raise CheckpointError(f"cannot infer the number of attention heads of the {tower} tower (width {width}) "
                                  "from tensor shapes; put the model's open_clip_config.json beside the file "
                                  "(model_cfg.vision_cfg.head_width, model_cfg.text_cfg.heads)")
    text = dict(vocab_size=sd["token_embedding.weight"].shape[0], hidden_size=t_width,
                intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_count_blocks(sd, "transformer.resblocks."), num_attention_heads=t_heads,
                max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=activation,
                layer_norm_eps=1e-5, eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                projection_dim=sd["text_projection"].shape[1])
    vision = dict(hidden_size=v_width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_count_blocks(sd, "visual.transformer.resblocks."),
                  num_attention_heads=v_heads, image_size=grid * patch, patch_size=patch,
                  hidden_act=activation, layer_norm_eps=1e-5, projection_dim=sd["visual.proj"].shape[1])
    if text["projection_dim"] != vision["projection_dim"]:
        raise CheckpointError(f"text projection dim {text['projection_dim']} != visual projection dim "
                              f"{vision['projection_dim']}: not a CLIP state dict")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"])


def read_openclip_file(path: str | os.PathLike, tokenizer: str | None, activation: str | None, *,
                       allow_torchscript: bool = False) -> Checkpoint:
    """An OpenCLIP / OpenAI state-dict file; ``open_clip_config.json`` beside it is used when present.
    ``tokenizer``: where its tokenizer is (folder or hub id; default: the file's folder if it holds one). It is only
    recorded here, not loaded: the caller loads it and passes it to ``Checkpoint.use_tokenizer`` for its token ids.
    ``allow_torchscript``: read TorchScript archives (OpenAI's .pt releases), which run code while loading."""
    path = Path(path)
    _check_torchscript(path, allow_torchscript)  # before the tokenizer and activation questions
    model_cfg, pre = {}, ImagePreprocessing()
    side = path.parent / "open_clip_config.json"
    if side.is_file():
        side_cfg = _read_json(side)
        model_cfg = side_cfg.get("model_cfg", {})
        p = side_cfg.get("preprocess_cfg", {})
        pre = ImagePreprocessing(image_mean=tuple(p.get("mean", pre.image_mean)),
                                 image_std=tuple(p.get("std", pre.image_std)))
    if activation is None:
        if side.is_file():  # OpenCLIP's model config: quick_gelu defaults to False
            activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        elif _is_torchscript(path):  # OpenAI's own release uses QuickGELU
            activation = "quick_gelu"
        else:
            raise CheckpointError(
                f"{path.name}: the activation cannot be inferred from tensor shapes. Pass activation='quick_gelu' "
                "(OpenAI weights and OpenCLIP '-quickgelu' models) or activation='gelu' (most LAION OpenCLIP models)")
    if activation not in ACTIVATIONS:
        raise CheckpointError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if tokenizer is None:
        tokenizer = str(path.parent) if any((path.parent / f).is_file() for f in ("tokenizer.json", "vocab.json")) \
            else None
    if tokenizer is None:
        raise CheckpointError(
            f"{path.name} holds no tokenizer. Pass tokenizer=<folder with CLIP's vocab.json/merges.txt or "
            "tokenizer.json> or tokenizer='openai/clip-vit-base-patch32' (hub id, cached after the first download)")
    sd = read_state_dict(path, allow_torchscript=allow_torchscript)
    config = openclip_config(sd, activation, model_cfg=model_cfg)
    pre.shortest_edge = config.vision_config.image_size
    pre.crop_size = (config.vision_config.image_size,) * 2
    identity = {"kind": "openclip_file", "path": str(path.resolve()), "weights_sha": _weights_fingerprint([path]),
                "activation": activation, "tokenizer": str(tokenizer)}
    return Checkpoint(config, openclip_to_hf(sd), pre, str(tokenizer), identity, token_ids_from_tokenizer=True)


def read_checkpoint(spec: str | os.PathLike, tokenizer: str | None = None, activation: str | None = None,
                    revision: str | None = None, *, allow_torchscript: bool = False) -> Checkpoint:
    """Resolve an encoder spec: a local folder, a state-dict file, or a hub id ("org/name"). Loads no tokenizer:
    for a state-dict file, load ``tokenizer_source`` and pass it to ``Checkpoint.use_tokenizer`` before building.
    ``allow_torchscript``: read a TorchScript state-dict file (it runs code while loading; refused by default)."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        return read_hf_folder(path)
    if path.is_file():
        if path.suffix not in STATE_DICT_SUFFIXES:
            raise CheckpointError(f"{spec_str!r} is a file but not a checkpoint ({', '.join(STATE_DICT_SUFFIXES)})")
        return read_openclip_file(path, tokenizer, activation, allow_torchscript=allow_torchscript)
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec_str) and not spec_str.startswith((".", "/")):
        folder = hub_snapshot(spec_str, revision)
        return read_hf_folder(folder, {"kind": "hub", "repo_id": spec_str, "revision": revision or "main",
                                       "snapshot": folder.name})
    raise CheckpointError(
        f"encoder spec {spec_str!r} is neither an existing folder or file nor a hub id like "
        "'openai/clip-vit-base-patch32'. Give a folder written by CLIPModel.save_pretrained, an OpenCLIP/OpenAI "
        "state-dict file (.pt/.bin/.safetensors), or a hub id")
