"""The kept subset as a training input (clipsel_jax.subset, `clipsel export`): each kind of source, from a real
selection to a few training steps that read only the kept samples."""

import csv
import dataclasses
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import clipsel_jax as cs
from clipsel_jax import subset
from clipsel_jax.cli import main
from clipsel_jax.data import Source, source_spec
from clipsel_jax.evaluate.train import TrainConfig, train_classifier
from clipsel_jax.pipeline import Selection
from clipsel_jax.report import write_outputs

CLASSES = ("ant", "bee", "cow")


def make_folder(root, per_class=10, size=12):
    """Three classes of small images whose colour says the class (so a tiny CLIP still separates something)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), np.int64)
            base[..., c] = 180
            im = np.clip(base + rng.integers(0, 70, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(im).save(root / name / f"{name}_{i:02d}.png")
    return root


class Recording(Source):
    """A source that records which samples were read (the ids), reading through another source."""

    def __init__(self, base):
        self.base, self.read_ids = base, []
        self.ids, self.labels, self.class_names = base.ids, base.labels, base.class_names

    def __len__(self):
        return len(self.base)

    def describe(self, i):
        return self.base.describe(i)

    def read(self, i):
        self.read_ids.append(int(self.ids[i]))
        return self.base.read(i)

    def fingerprint(self):
        return self.base.fingerprint()


@pytest.fixture(scope="module")
def selected(tmp_path_factory, tiny_clip_folder):
    """A real selection (tiny random CLIP, no adapters) of half of a 30-image folder, written to a workdir."""
    root = tmp_path_factory.mktemp("subset")
    images = make_folder(root / "images")
    source = cs.data.image_folder(str(images))
    work = root / "work"
    sel = cs.select(source, 0.5, str(tiny_clip_folder), work, progress=False, report=False, adapter=None)
    return images, work, sel  # the source's own spec() is recorded: load_kept(work).open_source() works


def test_load_kept_matches_the_selection(selected):
    images, work, sel = selected
    kept = subset.load_kept(work)
    assert len(kept) == 15 == len(sel.indices)
    np.testing.assert_array_equal(kept.ids, sel.ids[sel.indices])
    np.testing.assert_array_equal(kept.labels, sel.labels[sel.indices])
    np.testing.assert_array_equal(kept.preferred_class, sel.preferred_class[sel.indices])
    np.testing.assert_allclose(kept.preferred_confidence, sel.preferred_confidence[sel.indices], rtol=1e-6)
    assert np.all((kept.preferred_confidence > 0) & (kept.preferred_confidence <= 1))
    assert kept.class_names == list(CLASSES)
    from_selection = subset.as_kept(sel)
    np.testing.assert_array_equal(from_selection.ids, kept.ids)
    assert from_selection.fingerprint == kept.fingerprint
    assert kept.open_source().fingerprint() == cs.data.image_folder(str(images)).fingerprint()


def sources_of(images, tmp_path):
    """The selection's images as a folder, a zip and arrays in memory (the same ids and labels)."""
    folder = cs.data.image_folder(str(images))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        for f in folder.files:
            zf.write(f, os.path.relpath(f, images.parent))
    zipped = cs.data.image_folder(f"{tmp_path / 'set.zip'}:images")
    arrays = cs.data.from_arrays(np.stack([folder.read(i) for i in range(len(folder))]), folder.labels, CLASSES)
    return {"folder": folder, "zip": zipped, "arrays": arrays}


@pytest.mark.parametrize("kind", ["folder", "zip", "arrays"])
def test_each_source_trains_on_the_kept_samples_only(selected, tmp_path, kind):
    """select -> grain dataset of the kept samples -> a few training steps: exactly the kept ids were read, and
    the images and labels are the source's."""
    images, work, sel = selected
    source = Recording(sources_of(images, tmp_path)[kind])
    ds = subset.grain_dataset(source, work).batch(5)
    batches = list(ds)
    assert sorted(source.read_ids) == sorted(sel.ids[sel.indices].tolist())  # nothing dropped was read
    x = np.concatenate([b["image"] for b in batches])
    y = np.concatenate([b["label"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(ids, sel.ids[sel.indices])
    np.testing.assert_array_equal(y, sel.labels[sel.indices])
    np.testing.assert_array_equal(x[0], source.base.read(int(sel.indices[0])))
    result = train_classifier(x, y, 3, x[:6], y[:6], config=TrainConfig(width=4, epochs=1, batch_size=8, min_steps=2,
                                                                        augment=False))
    assert result.train_size == 15 and result.steps == 2


def test_arrays_and_zips_give_the_same_kept_samples(selected, tmp_path):
    images, work, sel = selected
    folder, zipped, arrays = sources_of(images, tmp_path).values()
    expected = [folder.read(int(i)) for i in sel.indices]
    spec = zipped.spec()  # a zip's spec opens the same source again; arrays have none
    assert cs.data.open_source(spec["data"], spec["subdir"]).fingerprint() == zipped.fingerprint()
    assert arrays.spec() is None
    for source in (zipped, arrays):
        sub = subset.kept_source(source, work)
        assert len(sub) == 15
        for j in (0, 7, 14):
            np.testing.assert_array_equal(sub.read(j), expected[j])
        got = [ex["image"] for ex in subset.grain_dataset(source, work)]
        np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    # the kept ids alone work too; a relabelled source is refused
    assert len(subset.kept_source(arrays, sel.ids[sel.indices])) == 15
    wrong = cs.data.from_arrays(arrays.images, (folder.labels + 1) % 3, CLASSES)
    with pytest.raises(ValueError, match="labels differ from the selection's"):
        subset.kept_source(wrong, work)
    other = cs.data.from_arrays(arrays.images[:10], folder.labels[:10], CLASSES)
    with pytest.raises(ValueError, match="sample ids are not in it"):
        subset.grain_dataset(other, work)


def test_grain_dataset_options(selected):
    images, work, sel = selected
    source = cs.data.image_folder(str(images))
    kept = subset.load_kept(work)
    new = (kept.labels + 1) % 3  # labels to train on instead of the given ones (e.g. kept.relabel(0.9)[0])
    ds = subset.grain_dataset(source, kept, labels=new, image_size=(8, 6)).shuffle(seed=1).batch(15)
    (batch,) = list(ds)
    assert batch["image"].shape == (15, 8, 6, 3)
    np.testing.assert_array_equal(np.sort(batch["id"]), kept.ids)
    np.testing.assert_array_equal(batch["label"], new[np.searchsorted(kept.ids, batch["id"])])
    assert not np.any(batch["label"] == kept.labels[np.searchsorted(kept.ids, batch["id"])])
    for bad, match in ((dict(labels=np.zeros(3)), "one per kept sample"), (dict(labels=np.full(15, 3)), "within"),
                       (dict(image_size=0), "image_size"), (dict(image_size=(1, 2, 3)), "image_size")):
        with pytest.raises(ValueError, match=match):
            subset.grain_dataset(source, kept, **bad)
    with pytest.raises(ValueError, match="min_confidence"):
        kept.relabel(0)


def test_export_folder_links_lists_and_resumes(selected, tmp_path):
    images, work, sel = selected
    out = tmp_path / "export"
    assert main(["export", "--workdir", str(work), "--to", str(out), "--list", str(tmp_path / "kept.csv"),
                 "--quiet"]) == 0
    kept_files = [cs.data.image_folder(str(images)).files[i] for i in sel.indices]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(os.path.relpath(f, images) for f in kept_files)  # <class>/<file>, nothing else
    for f in kept_files:  # hard links: the same file, no copy
        assert os.path.samefile(f, out / os.path.relpath(f, images))
    exported = cs.data.image_folder(str(out))  # what any framework's folder reader sees: a few training steps
    x = np.stack([exported.read(i) for i in range(len(exported))])
    assert train_classifier(x, exported.labels, 3, x[:4], exported.labels[:4],
                            config=TrainConfig(width=4, epochs=1, batch_size=8, min_steps=2)).train_size == 15
    with open(tmp_path / "kept.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == sel.ids[sel.indices].tolist()
    assert [r["path"] for r in rows] == [str(os.path.abspath(f)) for f in kept_files]
    assert [r["class_name"] for r in rows] == [CLASSES[y] for y in sel.labels[sel.indices]]
    # an interrupted export (two files missing) is completed by a rerun; other contents are refused
    for p in sorted(out.rglob("*.png"))[:2]:
        p.unlink()
    assert main(["export", "--workdir", str(work), "--to", str(out), "--quiet"]) == 0
    assert len(list(out.rglob("*.png"))) == 15
    assert main(["export", "--workdir", str(work), "--to", str(out), "--mode", "copy", "--quiet"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    assert main(["export", "--workdir", str(work), "--to", str(tmp_path / "busy"), "--quiet"]) == 2
    # copies and a plain text list
    assert main(["export", "--workdir", str(work), "--to", str(tmp_path / "copies"), "--mode", "copy",
                 "--list", str(tmp_path / "kept.txt"), "--quiet"]) == 0
    copied = tmp_path / "copies" / os.path.relpath(kept_files[0], images)
    assert copied.read_bytes() == open(kept_files[0], "rb").read() and not os.path.samefile(copied, kept_files[0])
    assert (tmp_path / "kept.txt").read_text().splitlines() == [str(os.path.abspath(f)) for f in kept_files]


def test_export_from_a_zip_and_from_arrays(selected, tmp_path):
    images, work, sel = selected
    folder = cs.data.image_folder(str(images))
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        for f in folder.files:
            zf.write(f, os.path.relpath(f, images))
    assert main(["export", "--workdir", str(work), "--data", str(tmp_path / "set.zip"), "--to",
                 str(tmp_path / "from_zip"), "--list", str(tmp_path / "zip.txt"), "--quiet"]) == 0
    for i in sel.indices:
        rel = os.path.relpath(folder.files[i], images)
        assert (tmp_path / "from_zip" / rel).read_bytes() == open(folder.files[i], "rb").read()
    assert (tmp_path / "zip.txt").read_text().splitlines()[0] == \
        f"{(tmp_path / 'set.zip').resolve()}:{os.path.relpath(folder.files[sel.indices[0]], images)}"
    arrays = cs.data.from_arrays(np.stack([folder.read(i) for i in range(len(folder))]), folder.labels, CLASSES)
    info = subset.export_folder(arrays, work, tmp_path / "from_arrays")
    assert info["written"] == 15
    for i in sel.indices:
        png = tmp_path / "from_arrays" / CLASSES[folder.labels[i]] / f"{i}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(png)), folder.read(i))


def test_relabel_moves_confident_disagreements_and_lists_them(tmp_path):
    """A selection whose preferred classes disagree with some labels, written by the real writer: --relabel moves
    the confident ones only, lists each move, and never writes outside the folder whatever the class names."""
    names = ["a", "../b", "."]  # a class name that is a path, and one that is '.'
    rng = np.random.default_rng(1)
    ims = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    source = cs.data.from_arrays(ims, labels, names)
    pref = np.array([0, 1, 1, 1, 2, 1, 2, 2, 0])
    conf = np.array([.9, .95, .5, .8, .99, .7, .6, .6, .91], np.float32)
    mask = np.ones(9, bool)
    mask[5] = False
    sel = Selection(np.flatnonzero(mask), mask, {k: np.zeros(9, np.float32) for k in ("sas", "sds", "combined")},
                    {"class_names": names}, pref, np.arange(9), conf, labels)
    write_outputs(tmp_path / "w", sel, sel.ids, labels, names)
    info = subset.export_folder(source, tmp_path / "w", tmp_path / "out", relabel=0.9)
    assert info["relabeled"] == 3 and info["images"] == 8  # ids 1 (0->1, .95), 4 (1->2, .99), 8 (2->0, .91)
    folders = subset.folder_names(names)
    assert folders == ["a", "class_1_b", "class_2"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(folders + ["clipsel_export.json",
                                                                                   "relabeled.csv"])
    where = {int(p.stem): p.parent.name for p in (tmp_path / "out").rglob("*.png")}
    assert where == {0: "a", 1: "class_1_b", 2: "a", 3: "class_1_b", 4: "class_2", 6: "class_2", 7: "class_2",
                     8: "a"}
    with open(tmp_path / "out" / "relabeled.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["given_class"], r["preferred_class"]) for r in rows] == [
        ("1", "a", "../b"), ("4", "../b", "."), ("8", ".", "a")]
    assert json.loads((tmp_path / "out" / "clipsel_export.json").read_text())["relabel"] == 0.9


def test_bad_workdirs_are_clear_errors(tmp_path, capsys):
    assert main(["export", "--workdir", str(tmp_path / "none"), "--list", str(tmp_path / "k.csv")]) == 2
    assert "run `clipsel select`" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path)]) == 2
    assert "give --to DIR" in capsys.readouterr().err
    labels = np.array([0, 1, 0, 1])
    sel = Selection(np.array([0, 3]), np.array([1, 0, 0, 1], bool),
                    {k: np.zeros(4, np.float32) for k in ("sas", "sds", "combined")}, {"class_names": ["x", "y"]},
                    labels, np.arange(4), np.ones(4, np.float32), labels)
    write_outputs(tmp_path / "w", sel, sel.ids, labels, ["x", "y"])
    assert main(["export", "--workdir", str(tmp_path / "w"), "--to", str(tmp_path / "o")]) == 2
    assert "does not record its source" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path / "w"), "--list", str(tmp_path / "k.json")]) == 2
    assert ".csv or .txt" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path / "w"), "--list", str(tmp_path / "k.txt")]) == 0
    assert (tmp_path / "k.txt").read_text() == "0\n3\n"  # ids where no source is known
    for bad in (dict(indices=np.array([0, 9])), dict(labels=np.array([0, 5, 0, 1])), dict(indices=np.array([3, 0]))):
        z = dict(np.load(tmp_path / "w" / "selection.npz"))
        z.update(bad)
        np.savez(tmp_path / "w" / "selection.npz", **z)
        with pytest.raises(ValueError, match="inconsistent"):
            subset.load_kept(tmp_path / "w")
        write_outputs(tmp_path / "w", sel, sel.ids, labels, ["x", "y"])
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    for bad in (dict(class_names="xy"), dict(data_spec=["/etc"]), dict(data_spec={"data": 3})):
        (tmp_path / "w" / "meta.json").write_text(json.dumps({**meta, **bad}))
        with pytest.raises(ValueError, match="inconsistent"):
            subset.load_kept(tmp_path / "w")
    (tmp_path / "w" / "meta.json").write_text(json.dumps(meta))
    z = dict(np.load(tmp_path / "w" / "selection.npz"))
    np.savez(tmp_path / "w" / "selection.npz", **{k: v for k, v in z.items() if k != "preferred_confidence"})
    with pytest.raises(ValueError, match="older clipsel_jax"):  # a selection of an older version: no relabelling
        subset.load_kept(tmp_path / "w").relabel(0.9)
    (tmp_path / "w" / "selection.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["export", "--workdir", str(tmp_path / "w"), "--list", str(tmp_path / "k.txt")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path / "w"), "--list", str(tmp_path / "k.txt"),
                 "--relabel", "0"]) == 2


# -------------------------------------------------------------------------------------------------------------
# TFDS


@pytest.fixture(scope="module")
def tfds_selected(tmp_path_factory, tiny_clip_folder):
    pytest.importorskip("tensorflow")
    from tfds_fixtures import prepare

    root = prepare(tmp_path_factory.mktemp("tfds_subset"))
    data_dir = str(root / "array_record")
    source = cs.data.tfds_source("tiny_images", "train", data_dir=data_dir)
    work = root / "work"
    sel = cs.select(source, 0.3, str(tiny_clip_folder), work, progress=False, report=False, adapter=None,
                    data_spec=source_spec("tfds:tiny_images", "train", data_dir))
    return root, work, sel


class RecordingRecords:
    """A TFDS data source that records which records were read."""

    def __init__(self, ds):
        self.ds, self.read = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.ds[i]


def test_tfds_array_record_kept_records_feed_a_jitted_step(tfds_selected):
    import tensorflow_datasets as tfds

    root, work, sel = tfds_selected
    kept = sel.ids[sel.indices]
    assert len(kept) == 7
    records = RecordingRecords(tfds.data_source("tiny_images", split="train", data_dir=str(root / "array_record")))
    ds = subset.tfds_grain_dataset(records, "train", work)
    resized = ds.map(lambda ex: (np.asarray(Image.fromarray(ex["image"]).resize((16, 16))).astype(np.float32) / 255,
                                 ex["label"], ex[subset.RECORD_INDEX]))
    x, y, idx = (np.stack(a) for a in zip(*list(resized)))
    assert sorted(records.read) == sorted(kept.tolist())  # only the kept records were read
    np.testing.assert_array_equal(idx, kept)
    np.testing.assert_array_equal(y, sel.labels[sel.indices])

    @jax.jit
    def step(w, x, y):
        def loss(w):
            logits = x.reshape(len(x), -1) @ w
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
        value, g = jax.value_and_grad(loss)(w)
        return w - 1e-3 * g, value

    w = jnp.zeros((16 * 16 * 3, 3))
    losses = []
    for _ in range(3):
        w, value = step(w, x, y)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    # a TFDS source of the kept records reads none of the others (its labels are never all read to check them)
    table = cs.data.tfds_source("tiny_images", "train", data_dir=str(root / "array_record"))
    sub = subset.kept_source(table, work)
    assert len(sub) == 7 and table._labels is None
    # by name, the same records; another split or data set is refused
    by_name = subset.tfds_grain_dataset("tiny_images", "train", work, data_dir=str(root / "array_record"))
    assert [int(ex[subset.RECORD_INDEX]) for ex in by_name] == kept.tolist()
    other = dataclasses.replace(subset.load_kept(work), data_spec={"data": "tfds:cifar10", "subdir": "train"})
    with pytest.raises(ValueError, match="made from tfds:cifar10 split train, not tfds:tiny_images split train"):
        subset.tfds_grain_dataset("tiny_images", "train", other, data_dir=str(root / "array_record"))
    with pytest.raises(ValueError, match="within 0..4"):
        subset.tfds_grain_dataset(RecordingRecords(list(range(5))), "train", work)


def test_tfds_tfrecord_kept_records_through_tf_data(tfds_selected):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    root, work, sel = tfds_selected
    kept = sel.ids[sel.indices]
    ds = subset.tfds_tf_dataset("tiny_images", "train", work, data_dir=str(root / "tfrecord"))
    got = list(ds.as_numpy_iterator())
    assert [int(ex[subset.RECORD_INDEX]) for ex in got] == kept.tolist()
    table = tfds.data_source("tiny_images", split="train", data_dir=str(root / "array_record"))
    for ex in got:
        ref = table[int(ex[subset.RECORD_INDEX])]
        np.testing.assert_array_equal(ex["image"], ref["image"])
        assert ex["label"] == ref["label"]
    # ready for a training step: resized and batched in tf.data, one jitted step of a linear classifier
    batch = next(ds.map(lambda ex: (tf.image.resize(ex["image"], (8, 8)) / 255.0, ex["label"])).batch(16)
                 .as_numpy_iterator())
    w, loss = jax.jit(lambda w, x, y: jax.value_and_grad(lambda w: -jnp.mean(jax.nn.log_softmax(
        x.reshape(len(x), -1) @ w)[jnp.arange(len(y)), y]))(w)[::-1])(jnp.zeros((192, 3)), *batch)
    assert batch[0].shape == (7, 8, 8, 3) and np.isclose(float(loss), np.log(3), atol=1e-5)
    # the kept ids alone, and their errors
    assert len(list(subset.tfds_tf_dataset("tiny_images", "train", kept[:2], data_dir=str(root / "tfrecord")))) == 2
    with pytest.raises(ValueError, match="within 0..22"):
        subset.tfds_tf_dataset("tiny_images", "train", np.array([30]), data_dir=str(root / "tfrecord"))
    with pytest.raises(ValueError, match="no split"):
        subset.tfds_tf_dataset("tiny_images", "test", kept, data_dir=str(root / "tfrecord"))
    # random access is refused on TFRecord with the way to go
    stream = cs.data.tfds_source("tiny_images", "train", data_dir=str(root / "tfrecord"))
    with pytest.raises(ValueError, match="tfds_tf_dataset"):
        subset.kept_source(stream, kept)


def test_export_of_a_tfds_selection_reopens_the_recorded_source(tfds_selected, tmp_path):
    root, work, sel = tfds_selected
    assert main(["export", "--workdir", str(work), "--to", str(tmp_path / "out"), "--quiet"]) == 0
    pngs = sorted(tmp_path.glob("out/*/*.png"))
    assert sorted(int(p.stem) for p in pngs) == sorted(sel.ids[sel.indices].tolist())
    source = cs.data.tfds_source("tiny_images", "train", data_dir=str(root / "array_record"))
    for p in pngs:
        image, label = source.read_example(int(p.stem))
        np.testing.assert_array_equal(np.asarray(Image.open(p)), image)
        assert p.parent.name == ["cat", "dog", "owl"][label]


# -------------------------------------------------------------------------------------------------------------
# Caches follow the environment


@pytest.mark.slow  # subprocesses: the cache locations are read when huggingface_hub / tfds are imported
def test_caches_follow_hf_home_and_tfds_data_dir(tmp_path, tiny_clip_folder, tfds_selected):
    """HF_HOME decides where hub ids are looked up (a pre-filled cache loads offline), TFDS_DATA_DIR where tfds:
    sets are found, and `clipsel info` says where both live."""
    import shutil
    import subprocess
    import sys

    root, _, _ = tfds_selected
    snap = tmp_path / "hf" / "hub" / "models--someorg--tiny-clip" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_clip_folder, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TFDS_DATA_DIR=str(root / "array_record"),
               JAX_PLATFORMS="cpu")

    def clipsel(*args):
        r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", *args], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    info = json.loads(clipsel("info"))
    assert info["caches"]["huggingface_hub"] == str(tmp_path / "hf" / "hub")
    assert info["caches"]["tfds_data_dir"] == str(root / "array_record")
    clipsel("embed", "--encoder", "someorg/tiny-clip", "--data", "tfds:tiny_images", "--out", str(tmp_path / "e.npz"),
            "--quiet", "--cpu-devices", "1")
    with np.load(tmp_path / "e.npz") as z:
        assert z["image_emb"].shape[0] == 23
