"""Bad specs, bad checkpoints, bad images and bad texts give clear errors; the hub path works from its cache."""

import json
import shutil

import numpy as np
import pytest

import clipsel_jax as cs
from clipsel_jax import CheckpointError, ImageError


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- specs -------------------------------------------------------------------------------------------------------

def test_nonexistent_spec(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder or file nor a hub id"):
        cs.load_encoder(str(tmp_path / "no_such_model"))
    with pytest.raises(CheckpointError, match="neither an existing folder"):
        cs.load_encoder("not a spec at all")


def test_file_that_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        cs.load_encoder(str(f))


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_without_network_names_offline_alternatives(monkeypatch, tmp_path, offline):
    """HF_HUB_OFFLINE=1, or a hub endpoint that refuses connections (a closed port on this machine)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(CheckpointError) as e:
        cs.load_encoder("openai/clip-vit-base-patch32")
    msg = str(e.value)
    assert "could not get 'openai/clip-vit-base-patch32'" in msg
    assert "save_pretrained" in msg and "OpenCLIP" in msg and "HF_HOME" in msg


def test_hub_id_loads_from_cache_offline(monkeypatch, tmp_path, tiny_clip_folder):
    """A hub repository already in the huggingface_hub cache loads with no network (HF_HUB_OFFLINE=1)."""
    folder = tiny_clip_folder
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-clip"
    snap = repo / "snapshots" / ("a" * 40)
    copy_folder(folder, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    enc = cs.load_encoder("someorg/tiny-clip")
    ref = cs.load_encoder(str(folder))
    assert enc.identity["kind"] == "hub" and enc.identity["repo_id"] == "someorg/tiny-clip"
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    np.testing.assert_array_equal(enc.encode_images(imgs), ref.encode_images(imgs))


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        cs.load_encoder(str(tmp_path))


def test_folder_without_weights(tmp_path, tiny_clip_folder):
    d = copy_folder(tiny_clip_folder, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        cs.load_encoder(str(d))


def test_config_of_another_model(tmp_path, tiny_clip_folder):
    d = copy_folder(tiny_clip_folder, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="describes a 'bert' model, not CLIP"):
        cs.load_encoder(str(d))


def test_truncated_safetensors(tmp_path, tiny_clip_folder):
    d = copy_folder(tiny_clip_folder, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        cs.load_encoder(str(d))


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, tiny_clip_folder):
    from safetensors.numpy import load_file, save_file

    d = copy_folder(tiny_clip_folder, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    sd["vision_model.extra_head.weight"] = np.zeros(3, np.float32)
    sd["visual_projection.weight"] = np.zeros((5, 7), np.float32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        cs.load_encoder(str(d))
    msg = str(e.value)
    assert "missing tensors: text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "unexpected tensors: vision_model.extra_head.weight" in msg
    assert "wrong shape: visual_projection.weight (5, 7)" in msg


def test_bad_tokenizer_spec(tiny_clip_folder, tmp_path):
    with pytest.raises(CheckpointError, match="could not load a CLIP tokenizer"):
        cs.load_encoder(str(tiny_clip_folder), tokenizer=str(tmp_path / "nothing"))


def test_bad_dtype(tiny_clip_folder):
    import jax.numpy as jnp

    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cs.load_encoder(str(tiny_clip_folder), dtype=jnp.int8)


# ---- images and texts --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enc(tiny_clip_folder):
    return cs.load_encoder(str(tiny_clip_folder))


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 8, 8, 3), np.float32), "expected uint8 images, got dtype float32"),
    (np.zeros((2, 8, 8, 3), np.uint16), "expected uint8 images, got dtype uint16"),
    (np.zeros((2, 8, 8, 2), np.uint8), r"image 0: expected shape .* got \(8, 8, 2\)"),
    (np.zeros((2, 0, 8, 3), np.uint8), "image 0: image has zero size"),
    (np.zeros((8, 8, 3), np.uint8), "looks like one .* image"),
    (np.zeros((8,), np.uint8), r"\(N, H, W\) or \(N, H, W, C\)"),
    ("cat.jpg", "expected a uint8 array"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float64)], "image 1: expected uint8"),
])
def test_bad_images(enc, images, match):
    with pytest.raises(ImageError, match=match):
        enc.encode_images(images)


def test_grayscale_and_rgba_batches_are_converted(enc):
    gray = np.random.default_rng(0).integers(0, 256, (3, 20, 20), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, -1)
    np.testing.assert_array_equal(enc.encode_images(gray), enc.encode_images(rgb))
    opaque = np.concatenate([rgb, np.full((3, 20, 20, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(enc.encode_images(opaque), enc.encode_images(rgb))


def test_bad_texts(enc):
    with pytest.raises(TypeError, match="list of strings, not one string"):
        enc.encode_texts("a photo of a cat")
    with pytest.raises(TypeError, match=r"items \[1\] are not strings"):
        enc.encode_texts(["a cat", 3])


def test_overlong_text_is_truncated(enc):
    long = "photo " * 200
    out = enc.encode_texts([long, "cat"])
    assert out.shape == (2, enc.text_dim) and np.isfinite(out).all()


def test_corrupt_config_json_is_named(tmp_path, tiny_clip_folder):
    d = copy_folder(tiny_clip_folder, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        cs.load_encoder(str(d))
