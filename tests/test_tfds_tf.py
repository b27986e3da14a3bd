"""The tf.data path: a TFDS set prepared as TFRecord (TFDS's default format), read through tfds.load (needs
TensorFlow; skipped without it), gives the same embeddings as the same set prepared as array_record."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

import clipsel_jax as cs  # noqa: E402
from clipsel_jax.data.sources import TFDSSource, TFDSStreamSource  # noqa: E402
from tfds_fixtures import prepare  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("tfds"))


def test_tfrecord_set_streams_through_tf_data_and_matches_array_record(prepared, tmp_path, tiny_clip_folder):
    stream = cs.data.tfds_source("tiny_images", "train", data_dir=str(prepared / "tfrecord"))
    table = cs.data.tfds_source("tiny_images", "train", data_dir=str(prepared / "array_record"))
    assert isinstance(stream, TFDSStreamSource) and isinstance(table, TFDSSource)  # "auto" picks by the format
    assert len(stream) == 23 and stream.class_names == ["cat", "dog", "owl"]
    np.testing.assert_array_equal(stream.labels, table.labels)  # the same stored order in both formats
    for i in (0, 7, 22):
        a, ya = stream.read_example(i)
        b, yb = table.read_example(i)
        np.testing.assert_array_equal(a, b)
        assert ya == yb
    enc = cs.load_encoder(str(tiny_clip_folder), batch_size=4)
    # chunks of 5, batches of 4 over 4 devices: chunk ends pad their last batch
    e1 = cs.embed(stream, enc, tmp_path / "w1", chunk_size=5, progress=False)
    e2 = cs.embed(table, enc, tmp_path / "w2", chunk_size=5, progress=False)
    np.testing.assert_array_equal(e1.ids, e2.ids)
    np.testing.assert_array_equal(e1.labels, e2.labels)
    np.testing.assert_allclose(e1.image_emb, e2.image_emb, rtol=1e-6, atol=1e-6)
    # resume: drop two chunks of the cache, the rerun recomputes only those, the result is unchanged
    chunks = sorted((tmp_path / "w1" / "embeddings").glob("*/chunk_*.npz"))
    stamps = {c: c.stat().st_mtime_ns for c in chunks}
    for c in (chunks[1], chunks[3]):
        c.unlink()
    e3 = cs.embed(stream, enc, tmp_path / "w1", chunk_size=5, progress=False)
    np.testing.assert_array_equal(e3.image_emb, e1.image_emb)
    assert all(c.stat().st_mtime_ns == stamps[c] for c in chunks if c not in (chunks[1], chunks[3]))
    e4 = cs.embed(stream, enc, None, limit=9, progress=False)  # a prefix, in memory
    np.testing.assert_array_equal(e4.image_emb, e1.image_emb[:9])


def test_reader_choice_and_errors(prepared):
    with pytest.raises(ValueError, match="plain split name"):
        cs.data.tfds_source("tiny_images", "train[:10]", data_dir=str(prepared / "tfrecord"))
    with pytest.raises(ValueError, match="no split 'validation'"):
        cs.data.tfds_source("tiny_images", "validation", data_dir=str(prepared / "tfrecord"))
    with pytest.raises(ValueError, match="cannot be opened"):  # forced random access on TFRecord files
        cs.data.tfds_source("tiny_images", "train", data_dir=str(prepared / "tfrecord"), reader="array_record")
    assert isinstance(cs.data.tfds_source("tiny_images", "train", data_dir=str(prepared / "array_record"),
                                          reader="tf"), TFDSStreamSource)
    with pytest.raises(ValueError, match="reader must be"):
        cs.data.tfds_source("tiny_images", reader="pandas")


@pytest.mark.slow  # a subprocess
def test_two_processes_match_one(prepared, tmp_path, tiny_clip_folder):
    """`clipsel embed --data tfds:...` of a TFRecord set as 2 processes x 2 CPU devices: the single-process result."""
    import os
    import sys

    from test_multihost import free_port, run_two

    from clipsel_jax.cli import main

    args = ["embed", "--encoder", str(tiny_clip_folder), "--data", "tfds:tiny_images", "--tfds-data-dir",
            str(prepared / "tfrecord"), "--batch-size", "4", "--quiet"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    cmd = [sys.executable, "-m", "clipsel_jax.cli", *args, "--workdir", str(tmp_path / "multi")]
    run_two([cmd, cmd], [{**env, "JAX_PROCESS_ID": str(i)} for i in range(2)])
    assert main([*args, "--out", str(tmp_path / "single.npz")]) == 0
    multi, single = np.load(tmp_path / "multi" / "embeddings.npz"), np.load(tmp_path / "single.npz")
    np.testing.assert_array_equal(multi["ids"], single["ids"])
    np.testing.assert_array_equal(multi["labels"], single["labels"])
    np.testing.assert_allclose(multi["image_emb"], single["image_emb"], rtol=1e-5, atol=1e-5)
