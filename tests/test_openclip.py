"""OpenCLIP / OpenAI state-dict files load through the name map and match transformers.CLIPModel."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import clipsel_jax as cs  # noqa: E402
from clipsel_jax.errors import CheckpointError  # noqa: E402

BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
         "mlp.fc2": "mlp.c_proj"}


# The tiny test towers have 4 heads of width 8; OpenAI's width // 64 rule cannot see that.
HEADS = {"model_cfg": {"vision_cfg": {"head_width": 8}, "text_cfg": {"heads": 4}}}


def to_openclip(hf: dict) -> dict:
    """transformers CLIPModel state dict -> OpenCLIP/OpenAI names and layouts (written independently of the loader)."""
    out = {"logit_scale": hf["logit_scale"], "text_projection": hf["text_projection.weight"].T.contiguous(),
           "visual.proj": hf["visual_projection.weight"].T.contiguous()}
    for tower, src in (("text_model", ""), ("vision_model", "visual.")):
        layers = {int(k.split(".")[3]) for k in hf if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            p = f"{tower}.encoder.layers.{i}."
            q = f"{src}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[q + f"attn.in_proj_{kind}"] = torch.cat([hf[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
                for a, b in BLOCK.items():
                    out[q + f"{b}.{kind}"] = hf[p + f"{a}.{kind}"]
    out["token_embedding.weight"] = hf["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = hf["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = hf["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = hf["text_model.final_layer_norm.bias"]
    v = "vision_model."
    out["visual.class_embedding"] = hf[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = hf[v + "embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = hf[v + "embeddings.patch_embedding.weight"]
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"visual.{b}.{kind}"] = hf[f"{v}{a}.{kind}"]
    return {k: t.detach().clone() for k, t in out.items()}


class Holder(torch.nn.Module):
    def forward(self, x):
        return x


def torchscript_archive(sd: dict, path):
    """A TorchScript archive whose state dict has exactly these names, as OpenAI's released .pt files are."""
    root = Holder()
    for name, t in sd.items():
        *mods, leaf = name.split(".")
        m = root
        for part in mods:
            if not hasattr(m, part):
                m.add_module(part, Holder())
            m = getattr(m, part)
        m.register_buffer(leaf, t)
    for extra in ("input_resolution", "context_length", "vocab_size"):  # OpenAI's archives carry these ints
        root.register_buffer(extra, torch.tensor(1))
    torch.jit.save(torch.jit.script(root), str(path))


def reference(model, tok, proc, images, texts):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(list(images), return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    return img.pooler_output.numpy(), txt.pooler_output.numpy()


@pytest.fixture(scope="module")
def openclip_case(clip_folder_factory, tmp_path_factory):
    folder, model, tok, proc = clip_folder_factory(act="gelu", seed=11)
    sd = to_openclip(model.state_dict())
    out = tmp_path_factory.mktemp("openclip")
    (out / "open_clip_config.json").write_text(json.dumps(HEADS))
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    texts = ["a photo of a cat", "a dog", "photo"]
    return folder, out, sd, reference(model, tok, proc, images, texts), images, texts


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript"])
def test_openclip_file_matches_reference(openclip_case, fmt):
    folder, out, sd, (ref_img, ref_txt), images, texts = openclip_case
    path = out / f"model_{fmt}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)  # training ckpt
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torchscript_archive(sd, path)
    enc = cs.load_encoder(str(path), tokenizer=str(folder), activation="gelu", allow_torchscript=fmt == "torchscript")
    np.testing.assert_allclose(enc.encode_images(images), ref_img, atol=1e-4, rtol=0)
    np.testing.assert_allclose(enc.encode_texts(texts), ref_txt, atol=1e-4, rtol=0)
    assert enc.identity["kind"] == "openclip_file" and enc.config.vision_config.patch_size == 8


def test_activation_inference(openclip_case, tmp_path):
    folder, _, sd, (ref_img, _), images, _ = openclip_case
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="activation='quick_gelu'"):
        cs.load_encoder(str(path), tokenizer=str(folder))
    with pytest.raises(CheckpointError, match="number of attention heads"):
        cs.load_encoder(str(path), tokenizer=str(folder), activation="gelu")
    # An OpenCLIP config beside the file settles both (no quick_gelu key: OpenCLIP's default, GELU).
    (tmp_path / "open_clip_config.json").write_text(json.dumps(HEADS))
    enc = cs.load_encoder(str(path), tokenizer=str(folder))
    assert enc.config.vision_config.hidden_act == "gelu"
    np.testing.assert_allclose(enc.encode_images(images), ref_img, atol=1e-4, rtol=0)
    # The wrong activation, forced, changes the features (so the test above can fail).
    wrong = cs.load_encoder(str(path), tokenizer=str(folder), activation="quick_gelu")
    assert np.abs(wrong.encode_images(images) - ref_img).max() > 1e-3


def test_openclip_errors(openclip_case, tmp_path):
    folder, _, sd, *_ = openclip_case
    from safetensors.torch import save_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps(HEADS))
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="holds no tokenizer"):
        cs.load_encoder(str(path), activation="gelu")
    broken = dict(sd)
    del broken["visual.proj"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors visual\.proj"):
        cs.load_encoder(str(tmp_path / "broken.safetensors"), tokenizer=str(folder), activation="gelu")
    extra = dict(sd, **{"visual.attn_pool.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: visual\.attn_pool\.weight"):
        cs.load_encoder(str(tmp_path / "extra.safetensors"), tokenizer=str(folder), activation="gelu")
