"""Tiny random CLIP checkpoints written with transformers, and a real (byte-level) CLIP tokenizer built offline."""

from __future__ import annotations

from pathlib import Path

TINY = dict(
    text=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=24),
    vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8),
    projection_dim=16,
)
# ViT-B/32 shapes (random weights): the model the paper uses.
VIT_B32 = dict(
    text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              max_position_embeddings=77),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=32),
    projection_dim=512,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(folder: Path):
    """A CLIP tokenizer with CLIP's byte-level base vocabulary, a few merges, and the special tokens last
    (as in CLIP, where <|endoftext|> has the largest id). Saved to `folder`; returns it."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges = [("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"), ("p", "h"), ("ph", "o"),
              ("t", "o</w>"), ("pho", "to</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(str(folder))
    return tok


def make_clip_folder(folder: Path, shapes=TINY, act: str = "quick_gelu", seed: int = 0, legacy_eos: bool = False,
                     safe_serialization: bool = True, image_mean=None):
    """Random-init transformers.CLIPModel + tokenizer + image processor saved with save_pretrained.

    Returns (torch_model, tokenizer, image_processor)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder = Path(folder)
    tok = make_tokenizer(folder)
    eos = 2 if legacy_eos else tok.eos_token_id
    text = dict(shapes["text"], vocab_size=len(tok), hidden_act=act, eos_token_id=eos,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(shapes["vision"], hidden_act=act)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=shapes["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Random init leaves layer norms at identity and biases at zero; perturb every tensor so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder))
    if not safe_serialization:  # the legacy pickle format (transformers 5 no longer writes it itself)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    size = shapes["vision"]["image_size"]
    extra = {} if image_mean is None else {"image_mean": image_mean}
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **extra)
    proc.save_pretrained(str(folder))
    return model, tok, proc


def make_clip_folder_without_torch(folder: Path, shapes=TINY, act: str = "quick_gelu", seed: int = 0) -> Path:
    """The same save_pretrained layout as make_clip_folder (config.json, model.safetensors, tokenizer, image
    processor) with random weights drawn in numpy: for the tests of everything but the parity with PyTorch, which
    then run where torch is not installed. Tensor names and shapes come from our NNX model (in torch's layout)."""
    import json

    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file
    from transformers import CLIPConfig

    from clipsel_jax.models.clip import CLIPModel
    from clipsel_jax.weights import _hf_name

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    text = dict(shapes["text"], vocab_size=len(tok), hidden_act=act, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(shapes["vision"], hidden_act=act),
                        projection_dim=shapes["projection_dim"])
    config.save_pretrained(str(folder))
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0)))
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        shape, leaf = tuple(var.shape), str(path[-1])
        if leaf == "kernel" and len(shape) == 2:  # ours (in, out) -> torch Linear (out, in)
            shape = shape[::-1]
        elif leaf == "kernel" and len(shape) == 4:  # ours (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)
            shape = (shape[3], shape[2], shape[0], shape[1])
        if leaf == "logit_scale":
            value = np.full(shape, np.log(1 / 0.07))  # CLIP's initial temperature
        elif leaf == "kernel":  # variance-preserving (std 1/sqrt(fan-in)): images stay apart through the layers,
            # so scores differ by more than float rounding (a 0.02 std gave nearly one feature for every image)
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:  # layer norm scales near 1, everything else near 0: every tensor matters
            value = (1.0 if leaf == "scale" else 0.0) + 0.02 * rng.standard_normal(shape)
        tensors[_hf_name(path)] = np.asarray(value, np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    size = shapes["vision"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}))
    return folder
