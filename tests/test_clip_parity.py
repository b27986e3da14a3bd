"""Our NNX CLIP against transformers.CLIPModel (PyTorch) on identical random weights, to float32 round-off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import clipsel_jax as cs  # noqa: E402
from clip_fixtures import TINY, VIT_B32  # noqa: E402
from clipsel_jax import parallel  # noqa: E402

TEXTS = ["a photo of a cat", "dog", "a photo of a dog photo of a cat in a photo, a very long caption " * 3, "ø ü ß"]
TOL = 1e-4


def torch_features(model, tok, proc, images, texts, context):
    with torch.no_grad():
        pv = proc(list(images), return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pv).pooler_output.numpy()
        inp = tok(texts, padding=True, truncation=True, max_length=context, return_tensors="pt")
        txt = model.get_text_features(**inp).pooler_output.numpy()
        out = model(pixel_values=pv, **inp)
    return img, txt, out.logits_per_image.numpy()


def our_logits(enc, images, texts):
    img, txt = enc.encode_images(images), enc.encode_texts(texts)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    scale = float(np.exp(enc._state["logit_scale"][...]))
    return img, txt, img @ txt.T * scale


def check_parity(folder, model, tok, proc, n_images=6, size=(40, 52), shapes=TINY):
    enc = cs.load_encoder(str(folder))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n_images, *size, 3), dtype=np.uint8)
    ref_img, ref_txt, ref_logits = torch_features(model, tok, proc, images, TEXTS, enc.context_length)
    img, txt = enc.encode_images(images), enc.encode_texts(TEXTS)
    assert img.dtype == np.float32 and img.shape == ref_img.shape
    np.testing.assert_allclose(img, ref_img, atol=TOL, rtol=0)
    np.testing.assert_allclose(txt, ref_txt, atol=TOL, rtol=0)
    # Each text alone (no padding at all) gives the same features as inside the padded batch.
    alone = np.concatenate([enc.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(alone, ref_txt, atol=TOL, rtol=0)
    _, _, logits = our_logits(enc, images, TEXTS)
    # logits are cosines times exp(logit_scale) ~ 14: compare on the unit (cosine) scale.
    scale = float(np.exp(enc._state["logit_scale"][...]))
    np.testing.assert_allclose(logits / scale, ref_logits / scale, atol=TOL, rtol=0)
    return enc


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("legacy_eos", [False, True])
def test_tiny_parity(clip_folder_factory, act, legacy_eos):
    folder, model, tok, proc = clip_folder_factory(act=act, legacy_eos=legacy_eos)
    check_parity(folder, model, tok, proc)


def test_nnx_model_logits_match_torch_forward(tiny_clip):
    """CLIPModel.__call__ (the NNX module itself) against CLIPModel.forward, on preprocessed inputs."""
    folder, model, tok, proc = tiny_clip
    from clipsel_jax.weights import build_clip_model, read_checkpoint

    ckpt = read_checkpoint(folder)
    ours = build_clip_model(ckpt.config, ckpt.state_dict)
    rng = np.random.default_rng(2)
    pv = proc(list(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)), return_tensors="pt")["pixel_values"]
    inp = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(pixel_values=pv, **inp)
    per_image, per_text = ours(jnp.asarray(pv.numpy().transpose(0, 2, 3, 1)), jnp.asarray(inp["input_ids"].numpy()),
                               jnp.asarray(inp["attention_mask"].numpy()))
    np.testing.assert_allclose(np.asarray(per_image), ref.logits_per_image.numpy(), atol=TOL * 20, rtol=0)
    np.testing.assert_allclose(np.asarray(per_text), ref.logits_per_text.numpy(), atol=TOL * 20, rtol=0)


def test_pytorch_bin_folder(clip_folder_factory):
    folder, model, tok, proc = clip_folder_factory(safe_serialization=False, seed=3)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    check_parity(folder, model, tok, proc)


def test_image_mean_from_preprocessor_config(clip_folder_factory):
    folder, model, tok, proc = clip_folder_factory(image_mean=[0.5, 0.4, 0.3], seed=4)
    enc = check_parity(folder, model, tok, proc)
    assert enc.preprocessing.image_mean == (0.5, 0.4, 0.3)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vit_b32_parity(clip_folder_factory, act):
    folder, model, tok, proc = clip_folder_factory(VIT_B32, act=act)
    enc = check_parity(folder, model, tok, proc, n_images=3, size=(180, 260), shapes=VIT_B32)
    assert enc.image_dim == 512 and enc.context_length == 77


def test_batching_padding_and_compile_count(tiny_clip):
    folder, *_ = tiny_clip
    enc = cs.load_encoder(str(folder), batch_size=4)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    whole = enc.encode_images(images, batch_size=16)
    np.testing.assert_allclose(enc.encode_images(images), whole, atol=1e-5)  # batches 4,4,3(+1 pad)
    compiled = enc._image_features._cache_size()
    for n in (5, 6, 7, 9, 10, 11):  # new lengths reuse the batch-4 program
        enc.encode_images(images[:n])
    assert enc._image_features._cache_size() == compiled
    texts = [f"a photo of a cat number {i}" for i in range(9)]
    enc.encode_texts(texts)
    n_text = enc._text_features._cache_size()
    enc.encode_texts(texts[:7])
    enc.encode_texts(texts[2:])
    assert enc._text_features._cache_size() == n_text


def test_empty_inputs(tiny_clip):
    enc = cs.load_encoder(str(tiny_clip[0]))
    assert enc.encode_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, enc.image_dim)
    assert enc.encode_images([]).shape == (0, enc.image_dim)
    assert enc.encode_texts([]).shape == (0, enc.text_dim)


def test_sharded_equals_single_device(tiny_clip):
    assert jax.device_count() == 4
    folder, *_ = tiny_clip
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    one = cs.load_encoder(str(folder), batch_size=8, mesh=parallel.data_mesh(jax.devices()[:1]))
    four = cs.load_encoder(str(folder), batch_size=8)
    assert four.mesh.devices.size == 4
    for n in (3, 4, 5, 13):
        np.testing.assert_allclose(four.encode_images(images[:n]), one.encode_images(images[:n]), atol=1e-5)
    np.testing.assert_allclose(four.encode_texts(TEXTS), one.encode_texts(TEXTS), atol=1e-5)


def test_bfloat16_close_to_float32(tiny_clip):
    folder, *_ = tiny_clip
    f32 = cs.load_encoder(str(folder))
    bf16 = cs.load_encoder(str(folder), dtype=jnp.bfloat16)
    assert bf16.dtype == "bfloat16" and bf16.identity != f32.identity
    images = np.random.default_rng(7).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a, b = f32.encode_images(images), bf16.encode_images(images)
    assert b.dtype == np.float32
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99
