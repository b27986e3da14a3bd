"""Image sources (folder and zip, unreadable files) and the whole pipeline from one: select() end to end."""

import json
import os
import zipfile

import numpy as np
import pytest

import clipsel_jax as cs
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


def test_select_end_to_end(folder, tmp_path, tiny_clip_folder):
    """Image folder -> embed -> adapt -> score -> select, then a rerun reuses the saved embeddings."""
    src = image_folder(str(folder))
    work = tmp_path / "work"
    with pytest.warns(UserWarning, match="could not be read"):
        sel = cs.select(src, 0.5, str(tiny_clip_folder), work, adapter=cs.AdaptConfig(epochs=2, batch_size=4),
                        progress=False)
    assert len(sel.indices) == 5 and len(sel.meta["unreadable"]) == 2  # 10 readable images
    z = np.load(work / "selection.npz")
    np.testing.assert_array_equal(z["indices"], sel.indices)
    assert set(z["kept_ids"].tolist()) <= set(range(12)) - {3, 5}
    meta = json.loads((work / "meta.json").read_text())
    assert meta["k"] == 5 and meta["class_names"] == ["cat", "dog"]
    chunks = sorted((work / "embeddings").glob("*/chunk_*.npz"))
    stamps = [c.stat().st_mtime_ns for c in chunks]
    again = cs.select(src, 0.5, str(tiny_clip_folder), work, adapter=cs.AdaptConfig(epochs=2, batch_size=4),
                      progress=False)
    assert chunks and [c.stat().st_mtime_ns for c in chunks] == stamps  # reused, not recomputed
    np.testing.assert_array_equal(again.mask, sel.mask)
