"""Embedding extraction: sources (arrays, folder, zip, TFDS), sharding, the chunked cache, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import clipsel_jax as cs
from clipsel_jax import parallel
from clipsel_jax.data.sources import UnreadableImage
from clipsel_jax.embedding import Embeddings, embed

NDEV = 4  # tests/conftest.py forces four CPU devices
pytestmark = pytest.mark.filterwarnings("ignore:1 files in class folders are not images")


@pytest.fixture(scope="module")
def encoders(np_clip_folder_factory):
    """The same tiny CLIP on four devices and on one, and a different tiny CLIP (other weights)."""
    folder = np_clip_folder_factory()
    four = cs.load_encoder(str(folder), batch_size=8)
    one = cs.load_encoder(str(folder), batch_size=8, mesh=parallel.data_mesh(jax.devices()[:1]))
    other = cs.load_encoder(str(np_clip_folder_factory(seed=1)), batch_size=8)
    assert four.mesh.devices.size == NDEV
    return four, one, other


def arrays(n, seed=0, classes=("cat", "dog", "car")):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 20, 26, 3), dtype=np.uint8)
    return cs.data.from_arrays(images, rng.integers(0, len(classes), n), list(classes))


class Failing:
    """A source that raises partway (an interruption inside the input pipeline); counts the samples read."""

    def __init__(self, source, fail_at=None):
        self.source, self.fail_at, self.reads = source, fail_at, []

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self):
        return len(self.source)

    def read_example(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.reads.append(i)
        return self.source.read_example(i)


# -------------------------------------------------------------------------------------------------------------
# Correctness and sharding


@pytest.mark.parametrize("n", [NDEV - 1, NDEV, NDEV + 1, 5 * NDEV + 1])
def test_sharded_equals_single_device(encoders, n):
    four, one, _ = encoders
    src = arrays(n)
    for batch in (NDEV - 1, NDEV, NDEV + 1):  # global batches are rounded up to a multiple of the device count
        a = embed(src, four, batch_size=batch, progress=False)
        b = embed(src, one, batch_size=batch, progress=False)
        np.testing.assert_allclose(a.image_emb, b.image_emb, rtol=1e-5, atol=1e-6)
        assert a.image_emb.shape == (n, 16)
        np.testing.assert_array_equal(a.ids, np.arange(n))
        np.testing.assert_array_equal(a.labels, src.labels)
    np.testing.assert_allclose(a.image_emb, four.encode_images(src.images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.text_emb, four.encode_texts(["A photo of a cat.", "A photo of a dog.",
                                                              "A photo of a car."]), rtol=1e-5, atol=1e-6)


def test_chunked_cache_equals_in_memory_and_worker_processes(encoders, tmp_path):
    four = encoders[0]
    src = arrays(29)
    ref = embed(src, four, progress=False)
    cached = embed(src, four, tmp_path, chunk_size=8, batch_size=4, progress=False)
    mp = embed(src, four, tmp_path / "mp", chunk_size=8, workers=2, progress=False)  # grain worker processes
    for e in (cached, mp):
        np.testing.assert_allclose(e.image_emb, ref.image_emb, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(e.labels, ref.labels)
    (key,) = (tmp_path / "embeddings").iterdir()
    manifest = json.loads((key / "manifest.json").read_text())
    assert sorted(manifest["chunks"]) == ["0", "1", "2", "3"] and manifest["identity"]["chunk_size"] == 8
    assert manifest["identity"]["encoder"] == four.identity and manifest["identity"]["source"] == src.fingerprint()


def test_prompt_ensemble_averages_normalised_features(encoders):
    four = encoders[0]
    src = arrays(5)
    e = embed(src, four, prompts=["a {}", "a photo of the {}"], progress=False)
    assert e.prompts == ["a cat", "a dog", "a car", "a photo of the cat", "a photo of the dog", "a photo of the car"]
    t = four.encode_texts(e.prompts).reshape(2, 3, -1)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    np.testing.assert_allclose(e.text_emb, t.mean(0), rtol=1e-5, atol=1e-6)


def test_embeddings_save_and_load(encoders, tmp_path, folder):
    src = cs.data.image_folder(str(folder))
    with pytest.warns(UserWarning, match="could not be read"):
        e = embed(src, encoders[0], progress=False)
    e.save(tmp_path / "e.npz")
    back = Embeddings.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(back.image_emb, e.image_emb)
    assert back.class_names == e.class_names and back.prompts == e.prompts and back.unreadable == e.unreadable


# -------------------------------------------------------------------------------------------------------------
# Resume and invalidation


def test_interrupted_run_resumes_without_recomputing(encoders, tmp_path):
    four = encoders[0]
    src = arrays(45)
    ref = embed(src, four, tmp_path / "ref", chunk_size=10, batch_size=4, progress=False)
    failing = Failing(src, fail_at=27)
    with pytest.raises(KeyboardInterrupt):
        embed(failing, four, tmp_path / "w", chunk_size=10, batch_size=4, progress=False)
    (key,) = (tmp_path / "w" / "embeddings").iterdir()
    assert sorted(json.loads((key / "manifest.json").read_text())["chunks"]) == ["0", "1"]  # rows 0..19 finished
    again = Failing(src)
    out = embed(again, four, tmp_path / "w", chunk_size=10, batch_size=4, progress=False)
    assert min(again.reads) == 20  # finished chunks were not read again
    np.testing.assert_array_equal(out.image_emb, ref.image_emb)
    np.testing.assert_array_equal(out.ids, ref.ids)


@pytest.mark.slow  # a subprocess
def test_killed_subprocess_resumes(encoders, np_clip_folder_factory, tmp_path):
    """SIGKILL a real run mid-way; the rerun keeps the finished chunk files and gives the uninterrupted result."""
    four = encoders[0]
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (40, 20, 26, 3), dtype=np.uint8), rng.integers(0, 3, 40)
    np.savez(tmp_path / "data.npz", images=images, labels=labels)
    work = tmp_path / "w"
    script = f"""
import os, sys, time
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, clipsel_jax as cs
from clipsel_jax.embedding import embed
z = np.load({str(tmp_path / "data.npz")!r})
src = cs.data.from_arrays(z["images"], z["labels"], ["cat", "dog", "car"])
slow = src.read_example
def read_example(i):
    time.sleep(0.2)  # slow enough to be killed mid-way (1.6 s a chunk: the poll below may stall under load)
    return slow(i)
src.read_example = read_example
enc = cs.load_encoder({str(np_clip_folder_factory())!r}, batch_size=8)
embed(src, enc, {str(work)!r}, chunk_size=8, threads=1, progress=False)
print("finished")
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    manifest = None
    while time.time() < deadline:
        found = list(work.glob("embeddings/*/manifest.json"))
        if found and len(json.loads(found[0].read_text())["chunks"]) >= 2:
            manifest = found[0]
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert manifest is not None, "the subprocess finished no chunk in time"
    done = json.loads(manifest.read_text())["chunks"]
    assert 2 <= len(done) < 5, "the subprocess was not killed mid-way"
    stamps = {j: (manifest.parent / c["file"]).stat().st_mtime_ns for j, c in done.items()}
    src = Failing(cs.data.from_arrays(images, labels, ["cat", "dog", "car"]))
    out = embed(src, four, work, chunk_size=8, progress=False)
    assert min(src.reads) >= 8 * len(done)  # finished chunks were not recomputed
    assert all((manifest.parent / done[j]["file"]).stat().st_mtime_ns == t for j, t in stamps.items())
    ref = embed(cs.data.from_arrays(images, labels, ["cat", "dog", "car"]), four, progress=False)
    np.testing.assert_allclose(out.image_emb, ref.image_emb, rtol=1e-5, atol=1e-6)


def test_other_encoder_or_data_never_mixes_in(encoders, tmp_path):
    four, _, other = encoders
    src = arrays(12)
    a = embed(src, four, tmp_path, chunk_size=8, progress=False)
    b = embed(src, other, tmp_path, chunk_size=8, progress=False)
    np.testing.assert_allclose(b.image_emb, other.encode_images(src.images), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.image_emb, b.image_emb)
    changed = src.images.copy()
    changed[5] = 255 - changed[5]  # one image changed: another data set
    src2 = cs.data.from_arrays(changed, src.labels, src.class_names)
    assert src2.fingerprint() != src.fingerprint()
    c = embed(src2, four, tmp_path, chunk_size=8, progress=False)
    np.testing.assert_allclose(c.image_emb, four.encode_images(changed), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "embeddings").iterdir())) == 3  # three keys, none reused for another
    relabelled = cs.data.from_arrays(src.images, (src.labels + 1) % 3, src.class_names)
    assert relabelled.fingerprint() != src.fingerprint()


def test_replaced_file_changes_folder_fingerprint(folder):
    a = cs.data.image_folder(str(folder)).fingerprint()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "cat" / "1.png")
    os.utime(folder / "cat" / "1.png", ns=(1, 1))
    assert cs.data.image_folder(str(folder)).fingerprint() != a


def test_damaged_chunk_is_recomputed(encoders, tmp_path):
    four = encoders[0]
    src = arrays(20)
    ref = embed(src, four, tmp_path, chunk_size=8, progress=False)
    (chunk,) = tmp_path.glob("embeddings/*/chunk_000001.npz")
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.warns(UserWarning, match="chunk_000001.npz is missing or damaged"):
        again = Failing(src)
        out = embed(again, four, tmp_path, chunk_size=8, progress=False)
    assert sorted(set(again.reads)) == list(range(8, 16))
    np.testing.assert_array_equal(out.image_emb, ref.image_emb)


# -------------------------------------------------------------------------------------------------------------
# Unreadable images and bad input


def test_corrupt_files_are_recorded_not_dropped(encoders, folder, tmp_path):
    four = encoders[0]
    src = cs.data.image_folder(str(folder))
    with pytest.warns(UserWarning, match=r"2 of 12 images could not be read"):
        e = embed(src, four, tmp_path, chunk_size=5, progress=False)
    bad = {os.path.basename(u["path"]): u for u in e.unreadable}
    assert set(bad) == {"empty.jpg", "truncated.png"}
    assert "empty file" in bad["empty.jpg"]["reason"] and bad["truncated.png"]["reason"]
    assert sorted(u["id"] for u in e.unreadable) == [3, 5]
    assert 3 not in e.ids and 5 not in e.ids and len(e.ids) == 10
    (key,) = (tmp_path / "embeddings").iterdir()
    assert json.loads((key / "unreadable.json").read_text()) == e.unreadable
    readable = [i for i in range(len(src)) if i not in (3, 5)]  # grayscale, RGBA, 16-bit, CMYK all embedded
    np.testing.assert_allclose(e.image_emb, four.encode_images([src.read(i) for i in readable]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(e.labels, src.labels[readable])


def test_zip_source_embeds_like_the_folder(encoders, folder, tmp_path):
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, "train/" + str(f.relative_to(folder)))
    with pytest.warns(UserWarning):
        a = embed(cs.data.image_folder(str(folder)), encoders[0], progress=False)
        b = embed(cs.data.image_folder(f"{z}:train"), encoders[0], workers=2, progress=False)
    np.testing.assert_array_equal(a.image_emb, b.image_emb)
    assert [u["id"] for u in a.unreadable] == [u["id"] for u in b.unreadable]


def test_from_arrays_errors():
    imgs = np.zeros((3, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="outside 0..1"):
        cs.data.from_arrays(imgs, [0, 1, 2], ["a", "b"])
    with pytest.raises(ValueError, match="one integer per image"):
        cs.data.from_arrays(imgs, [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="must be integers"):
        cs.data.from_arrays(imgs, [0.5, 1, 0], ["a", "b"])
    with pytest.raises(ValueError, match="must be uint8"):
        cs.data.from_arrays(imgs.astype(np.float32), [0, 1, 0], ["a", "b"])
    with pytest.raises(ValueError, match="class_names is empty"):
        cs.data.from_arrays(imgs, [0, 0, 0], [])
    src = cs.data.from_arrays([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], [0, 0], ["a"])
    with pytest.raises(UnreadableImage, match="uint8"):
        src.read(1)


def test_embed_errors(encoders):
    with pytest.raises(TypeError, match="from_arrays"):
        embed(np.zeros((3, 8, 8, 3), np.uint8), encoders[0])
    with pytest.raises(ValueError, match="no samples"):
        embed(cs.data.from_arrays(np.zeros((0, 8, 8, 3), np.uint8), [], ["a"]), encoders[0])
    with pytest.raises(ValueError, match="template"):
        embed(arrays(3), encoders[0], prompts=[], progress=False)


# -------------------------------------------------------------------------------------------------------------
# TFDS


def test_tfds_source_with_mock_data(encoders, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    four = encoders[0]
    with tfds.testing.mock_data(num_examples=11):
        src = cs.data.tfds_source("cifar10", "train")
        ds = tfds.data_source("cifar10", split="train")
        images = np.stack([ds[i]["image"] for i in range(11)])
        labels = np.array([int(ds[i]["label"]) for i in range(11)])
        assert len(src) == 11 and src.class_names == tfds.builder("cifar10").info.features["label"].names
        e = embed(src, four, tmp_path, chunk_size=4, workers=2, progress=False)
        np.testing.assert_array_equal(src.labels, labels)
        with pytest.raises(ValueError, match="has no feature 'picture'"):
            cs.data.tfds_source("cifar10", "train", image_key="picture")
    np.testing.assert_array_equal(e.labels, labels)
    np.testing.assert_allclose(e.image_emb, four.encode_images(images), rtol=1e-5, atol=1e-6)
    assert e.class_names == src.class_names and len(e.text_emb) == 10


def test_tfds_missing_data_set_says_what_to_do(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="tfds build cifar10"):
        cs.data.tfds_source("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot be opened"):
        cs.data.tfds_source("no_such_dataset_xyz", "train", data_dir=str(tmp_path))


# -------------------------------------------------------------------------------------------------------------
# Real data


CIFAR = Path(os.environ.get("CLIPSEL_CIFAR10_ZIP", Path(__file__).parents[1] / ".." / "shared" / "data" /
                            "cifar10-jpeg.zip"))


@pytest.mark.skipif(not CIFAR.is_file(), reason="CIFAR-10 zip not present (set CLIPSEL_CIFAR10_ZIP)")
def test_cifar10_slice(encoders, tmp_path):
    src = cs.data.image_folder(f"{CIFAR}:cifar10-jpeg/test")
    assert len(src) == 10_000 and src.class_names[:3] == ["airplane", "automobile", "bird"]
    e = embed(src, encoders[0], tmp_path, chunk_size=32, limit=96, progress=False)
    assert e.image_emb.shape == (96, 16) and not e.unreadable and np.isfinite(e.image_emb).all()
    np.testing.assert_array_equal(e.ids, np.arange(96))
    np.testing.assert_array_equal(e.labels, src.labels[:96])
    np.testing.assert_allclose(e.image_emb, encoders[0].encode_images([src.read(i) for i in range(96)]),
                               rtol=1e-5, atol=1e-6)


def test_prepared_records_padding_and_unreadable_from_both_paths():
    """A sample read by index (__call__) and the same sample streamed as a record (from_record) give the same
    Prepared; an image that cannot be read gives an unreadable record (zero pixels, its label, the reason) on
    both paths; PADDING gives the padding row; _collate keeps the fields by name."""
    from types import SimpleNamespace

    from clipsel_jax.data.preprocess import as_rgb_uint8
    from clipsel_jax.embedding import PADDING, Prepared, _collate, _Prepare

    class Source:
        max_image_pixels = None
        images = [np.full((12, 9, 3), 200, np.uint8), np.zeros((0, 5, 3), np.uint8)]  # the second: no pixels

        def read_example(self, i):
            if i == 2:
                raise UnreadableImage("truncated file")
            return as_rgb_uint8(self.images[i], f"sample {i}"), 7 + i  # as the sources decode

        def label_of(self, i):
            return 7 + i

    prepare = _Prepare(Source(), SimpleNamespace(shortest_edge=8, crop_size=(8, 8)))
    good = prepare(0)
    assert good.index == 0 and good.label == 7 and good.reason == "" and good.pixels.shape == (8, 8, 3)
    assert good.pixels.any()
    streamed = prepare.from_record(0, Source.images[0], 7)
    assert (streamed.index, streamed.label, streamed.reason) == (0, 7, "")
    np.testing.assert_array_equal(streamed.pixels, good.pixels)
    for bad in (prepare(1), prepare(2), prepare.from_record(1, Source.images[1], 8), prepare.from_record(
            2, b"not an image", 9)):
        assert bad.reason and bad.label == 7 + bad.index and not bad.pixels.any()
        assert bad.pixels.shape == (8, 8, 3)
    assert prepare(2).reason == "truncated file"
    pad = prepare(PADDING)
    assert pad == Prepared(PADDING, pad.pixels, -1, "") and not pad.pixels.any()
    batch = _collate([good, prepare(2), pad])
    np.testing.assert_array_equal(batch.index, [0, 2, PADDING])
    np.testing.assert_array_equal(batch.labels, [7, 9, -1])
    assert batch.reasons == ["", "truncated file", ""] and batch.pixels.shape == (3, 8, 8, 3)
