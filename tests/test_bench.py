"""The selection-quality benchmark (clipsel_jax.evaluate: benchmark, splits, tables): any data set with a test
split, noise kinds, the references, the detection AUC, several architectures, resumable rows."""

import csv
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsel_jax.cli import main
from clipsel_jax.config import DataConfig
from clipsel_jax.data.noise import NoiseSetting, corrupt_images
from clipsel_jax.evaluate.benchmark import FIELDS, detection_auc, read_cached, write_cached
from clipsel_jax.evaluate.splits import find_splits, open_splits


def _image_set(path: Path, classes=("airplane", "cat", "dog"), per_class=6, test=2, top="cifar10-jpeg",
               test_name="test", gray_every=0, zip_it=True):
    """A small <split>/<class>/<file> set (a zip, or a folder) whose classes differ in brightness; every
    `gray_every`-th image is stored grayscale (Tiny-ImageNet holds some)."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", per_class), (test_name, test)):
        for c_i, c in enumerate(classes):
            for i in range(n):
                img = np.full((32, 32, 3), 40 * c_i, np.uint8) + rng.integers(0, 30, (32, 32, 3), dtype=np.uint8)
                im = Image.fromarray(img)
                if gray_every and i % gray_every == 0:
                    im = im.convert("L")
                files[f"{top + '/' if top else ''}{split}/{c}/{i:04d}.png"] = im
    if zip_it:
        with zipfile.ZipFile(path, "w") as z:
            for name, im in files.items():
                import io

                b = io.BytesIO()
                im.save(b, "PNG")
                z.writestr(name, b.getvalue())
    else:
        for name, im in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            im.save(path / name)
    return path


def _rows(work):
    return list(csv.DictReader(open(work / "results.csv")))


# ---------------------------------------------------------------------------------------------------------------
# Parts


def test_detection_auc_known_cases_and_sklearn():
    bad = np.array([0, 0, 1, 1], bool)
    assert detection_auc([4, 3, 2, 1], bad) == 1.0  # every clean sample preferred
    assert detection_auc([1, 2, 3, 4], bad) == 0.0  # the noisy ones preferred
    assert detection_auc([1, 1, 1, 1], bad) == 0.5  # ties count half
    assert detection_auc([1, 2, 3], np.zeros(3, bool)) is None  # nothing noisy: no detector to rate
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s, b = rng.normal(size=500).round(1), rng.random(500) < 0.3  # rounded: ties too
    assert detection_auc(s, b) == pytest.approx(sklearn.roc_auc_score(~b, s), abs=1e-12)


def test_noise_settings_parse_and_refuse():
    assert [str(NoiseSetting.parse(t)) for t in ("none", "0", "0.2", "pair:0.4", "corrupt:0.2", "symmetric:0.1")] == [
        "none", "none", "symmetric:0.2", "pair:0.4", "corrupt:0.2", "symmetric:0.1"]
    for bad, says in (("x", "give none"), ("pair:x", "must be a number"), ("blur:0.2", "unknown noise kind"),
                      ("pair:1", "in (0, 1)"), ("corrupt:0", "in (0, 1)"), ("none:0.1", "takes no fraction"),
                      ("nan", "must be a number"), ("symmetric:-0.1", "in (0, 1)")):
        with pytest.raises(ValueError, match=re.escape(says)):
            NoiseSetting.parse(bad)


def test_find_splits_in_zips_and_folders(tmp_path):
    z = _image_set(tmp_path / "c.zip")
    assert find_splits(str(z)) == (f"{z}:cifar10-jpeg/train", f"{z}:cifar10-jpeg/test")
    assert find_splits(f"{z}:cifar10-jpeg") == (f"{z}:cifar10-jpeg/train", f"{z}:cifar10-jpeg/test")
    assert find_splits(f"{z}:cifar10-jpeg/train") is None  # class folders, not splits
    t = _image_set(tmp_path / "t.zip", top="", test_name="val")  # splits at the top, the test split named val
    assert find_splits(str(t)) == (f"{t}:train", f"{t}:val")
    (tmp_path / "f").mkdir()
    f = _image_set(tmp_path / "f", top="tiny", test_name="validation", zip_it=False)
    assert find_splits(str(f)) == (f"{f / 'tiny'}/train", f"{f / 'tiny'}/validation")
    s = open_splits(DataConfig(path=str(f), subdir="tiny/train"), test_data=str(f / "tiny" / "validation"))
    assert len(s.train) == 18 and len(s.test) == 6  # a config's subdir inside a folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_splits(str(tmp_path / "missing.zip"))
    with pytest.raises(ValueError, match="no train/ and test/"):
        open_splits(DataConfig(path=f"{z}:cifar10-jpeg/train"))


def test_open_splits_checks_classes_and_maps_names(tmp_path):
    z = _image_set(tmp_path / "c.zip", classes=("n01", "n02", "n03"))
    names = tmp_path / "words.txt"
    names.write_text("n01\tgoldfish, Carassius auratus\nn02\tcat\nn03\tdog\nn99\tunused\n")
    s = open_splits(DataConfig(path=str(z), class_names=str(names)))
    assert s.train.class_names == s.test.class_names == ["goldfish", "cat", "dog"]
    assert s.stored_names == ["n01", "n02", "n03"] and len(s.train) == 18 and len(s.test) == 6
    other = _image_set(tmp_path / "o.zip", classes=("n01", "n02", "n04"))
    with pytest.raises(ValueError, match="test split's classes differ"):
        open_splits(DataConfig(path=f"{z}:cifar10-jpeg/train"), test_data=f"{other}:cifar10-jpeg/test")


def test_grayscale_images_are_accepted_by_the_corruptions():
    """Grayscale (N, H, W) images come out RGB (the trainer's side: tests/test_train.py)."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (12, 16, 16), dtype=np.uint8)
    out, kind = corrupt_images(gray, 0.5, seed=0)
    assert out.shape == (12, 16, 16, 3) and (kind >= 0).sum() == 6
    assert (out[kind < 0] == gray[kind < 0][..., None]).all()  # untouched images: the gray repeated


# ---------------------------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_bench_without_a_training_budget_measures_the_selections(tmp_path, tiny_clip_folder, capsys):
    """No --train-steps/--train-epochs: selection metrics only (this used to fail: the name holding the budget was
    rebound to the image source); grayscale images among the training ones; the clean oracle keeps no noisy one."""
    data = _image_set(tmp_path / "c.zip", gray_every=3)
    work = tmp_path / "bench"
    argv = ["bench", "--data", str(data), "--workdir", str(work), "--encoder", str(tiny_clip_folder),
            "--methods", "clipsel", "random", "moderate_ds", "oracle", "full", "--ratios", "0.5",
            "--noise", "symmetric:0.3", "--seeds", "0"]
    assert main(argv) == 0
    rows = {r["method"]: r for r in _rows(work)}
    assert sorted(rows) == ["clipsel", "full", "moderate_ds", "oracle", "random"]
    assert all(r["arch"] == "" and r["test_accuracy"] == "" and r["noise"] == "symmetric:0.3" for r in rows.values())
    assert float(rows["oracle"]["noisy_kept_frac"]) == 0.0 and rows["oracle"]["kept"] == "9"
    assert rows["full"]["noisy_kept_frac"] == rows["full"]["noisy_full_frac"] and rows["full"]["kept"] == "18"
    for m in ("clipsel", "moderate_ds"):  # they rank samples: an AUC; random and the references do not
        assert 0 <= float(rows[m]["detect_auc"]) <= 1
    assert rows["random"]["detect_auc"] == rows["oracle"]["detect_auc"] == ""
    md = (work / "results.md").read_text()
    assert "| 30% symmetric label noise | 50% | clipsel | - |" in md
    # trained rows may join the selection-only ones (the selection is reused); then the budget is fixed
    # (on the 32x32 images shrunk to 16x16: --train-image-size is part of the budget's setting)
    trained_argv = argv[:-12] + ["--methods", "random", "--ratios", "0.5", "--noise", "symmetric:0.3", "--seeds",
                                 "0", "--train-steps", "1", "--train-width", "4", "--train-image-size", "16"]
    capsys.readouterr()
    assert main(trained_argv) == 0
    assert "training small_cnn" in capsys.readouterr().err  # each run shows its progress
    trained = [r for r in _rows(work) if r["arch"] == "small_cnn"]
    assert len(trained) == 1 and trained[0]["test_accuracy"] != "" and trained[0]["kept"] == "9"
    assert json.loads((work / "setting.json").read_text())["train_image_size"] == 16
    assert main(argv) == 2  # a selection-only run now differs from the workdir's budget
    capsys.readouterr()
    assert main(trained_argv[:-1] + ["24"]) == 2  # and so does another image size
    assert "holds results of another setting" in capsys.readouterr().err
    assert main(trained_argv[:-1] + ["4"]) == 2
    assert "train_image_size must be >= 8, got 4" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_refuses_pair_noise_it_cannot_place_and_an_earlier_results_file(tmp_path, tiny_clip_folder, capsys):
    data = _image_set(tmp_path / "c.zip", classes=("n01", "n02", "n03"))
    base = ["bench", "--data", str(data), "--encoder", str(tiny_clip_folder), "--methods", "random", "--seeds", "0",
            "--ratios", "0.5"]
    assert main(base + ["--workdir", str(tmp_path / "a"), "--noise", "pair:0.4"]) == 2
    assert "give --pair-map FILE" in capsys.readouterr().err
    (tmp_path / "a").mkdir(exist_ok=True)
    (tmp_path / "a" / "results.csv").write_text("method,ratio,noise,seed,kept,mislabeled_kept_frac\n")
    assert main(base + ["--workdir", str(tmp_path / "a"), "--noise", "none"]) == 2
    assert "written by an earlier clipsel bench" in capsys.readouterr().err


def test_bench_trains_the_adapters_of_a_label_set_once(tmp_path, tiny_clip_folder):
    """Two ratios x clipsel, clipsel_paper and ccs, the refinement and the class typicality on (the config's
    settings, which the paper's method's rows take too): one adapter training (a first fit and its refit), reused
    by every row; each row's select_s still counts both fits."""
    data = _image_set(tmp_path / "c.zip")
    work = tmp_path / "bench"
    refit = tmp_path / "refit.py"  # the refinement on: clipsel's adapters are the first fit and a refit
    refit.write_text("def get_config():\n    return {'adapt': {'refine': 1}, 'scores': {'typicality': 0.3}}\n")
    argv = ["bench", "--data", str(data), "--workdir", str(work), "--encoder", str(tiny_clip_folder),
            "--methods", "clipsel", "clipsel_paper", "ccs", "--ratios", "0.3", "0.5", "--noise", "symmetric:0.3",
            "--seeds", "0", "--config", str(refit)]
    assert main(argv) == 0
    where = work / "adapters" / "symmetric0.3_seed0"
    assert [p.name for p in (where / "adapters").iterdir() if p.name.isdigit()] != []
    assert [p.name for p in (where / "adapters_refit1").iterdir() if p.name.isdigit()] != []
    trained = json.loads((where / "adapt_s.json").read_text())["seconds"]
    refit = json.loads((where / "adapt_refit1_s.json").read_text())["seconds"]
    rows = _rows(work)
    assert len(rows) == 6
    for r in rows:
        assert float(r["select_s"]) >= round(trained + refit, 2), r


def test_cached_arrays_are_checked_and_never_unpickled(tmp_path, capsys):
    """The bench's caches (probe predictions, training dynamics) sit in a workdir that others may write: a file is
    used only if it holds exactly the arrays expected; anything else is reported and computed again."""
    path = tmp_path / "c.npz"
    expect = {"probs": ((4, 3), "f"), "labels": ((4,), "iu")}
    assert read_cached(path, expect) is None  # absent: nothing said
    assert capsys.readouterr().err == ""
    probs, labels = np.full((4, 3), 1 / 3), np.arange(4) % 3
    write_cached(path, probs=probs, labels=labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # written under another name, then renamed
    z = read_cached(path, expect)
    assert np.array_equal(z["probs"], probs) and np.array_equal(z["labels"], labels)
    for arrays, why in [(dict(probs=probs[:3], labels=labels), "probs of shape (3, 3), expected (4, 3)"),
                        (dict(probs=np.where(probs > 0, np.nan, 0), labels=labels), "probs holds non-finite values"),
                        (dict(probs=probs.astype(str), labels=labels), "probs of type <U"),
                        (dict(probs=probs, labels=labels.astype(np.float64)), "labels of type float64"),
                        (dict(probs=probs), "unreadable"),  # a key missing
                        (dict(probs=np.array([{"x": 1}] * 12, object).reshape(4, 3), labels=labels), "unreadable")]:
        np.savez(path, **arrays)  # the last one pickles an object array: refused, never loaded
        assert read_cached(path, expect) is None
        assert why in capsys.readouterr().err
    path.write_bytes(b"PK\x03\x04 truncated")
    assert read_cached(path, expect) is None and "not a usable cache" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_computes_the_probe_of_a_label_set_once(tmp_path, tiny_clip_folder, capsys):
    """Confident learning's probe predictions are cached per label set (WORKDIR/probe/): a rerun with another
    ratio reuses them and makes the same selection as a fresh probe; every row is charged the probe's seconds; a
    cache of another label set or a tampered one is computed again."""
    pytest.importorskip("cleanlab")
    data = _image_set(tmp_path / "c.zip", per_class=10)
    work = tmp_path / "bench"
    argv = ["bench", "--data", str(data), "--workdir", str(work), "--encoder", str(tiny_clip_folder),
            "--methods", "confident_learning", "--ratios", "0.5", "--noise", "symmetric:0.3", "--seeds", "0"]
    assert main(argv) == 0
    path = work / "probe" / "symmetric0.3_seed0" / "probs.npz"
    with np.load(path) as z:
        seconds, probs, labels = float(z["seconds"]), z["probs"], z["labels"]
    assert probs.shape == (30, 3) and np.allclose(probs.sum(1), 1) and seconds > 0
    made = path.stat().st_mtime_ns
    assert main(argv[:-5] + ["0.3", "0.7"] + argv[-4:]) == 0  # the same label set: the cache, not a new probe
    assert path.stat().st_mtime_ns == made
    rows = _rows(work)
    assert len(rows) == 3 and all(float(r["select_s"]) >= round(seconds, 2) for r in rows)
    # the cached probe gives the selection a fresh probe gives (a new workdir)
    fresh = tmp_path / "fresh"
    assert main(argv[:4] + [str(fresh)] + argv[5:-5] + ["0.7"] + argv[-4:]) == 0
    assert [r["kept"] for r in _rows(fresh)] == [r["kept"] for r in rows if r["ratio"] == "0.7"]
    assert _rows(fresh)[0]["noisy_kept_frac"] == [r for r in rows if r["ratio"] == "0.7"][0]["noisy_kept_frac"]
    # another label set's probe, then a pickled file: each is reported and computed again
    write_cached(path, probs=probs, labels=(labels + 1) % 3, seconds=np.float64(seconds))
    capsys.readouterr()
    assert main(argv[:-5] + ["0.4"] + argv[-4:]) == 0
    assert "another label set" in capsys.readouterr().err
    with np.load(path) as z:
        assert np.array_equal(z["labels"], labels)
    np.savez(path, probs=np.array([None] * 90, object).reshape(30, 3), labels=labels, seconds=seconds)
    assert main(argv[:-5] + ["0.6"] + argv[-4:]) == 0
    assert "not a usable cache" in capsys.readouterr().err
    assert len(_rows(work)) == 5


@pytest.mark.slow
def test_bench_noise_kinds_references_archs_and_resume(tmp_path, tiny_clip_folder, capsys):
    """pair (from a map file) and corrupt noise, both references, two architectures, the corrupted images'
    embeddings cached once; a rerun finds every row done; another setting is refused."""
    data = _image_set(tmp_path / "c.zip", classes=("n01", "n02", "n03"), gray_every=4)
    pair_map = tmp_path / "pairs.json"
    pair_map.write_text(json.dumps({"n01": "n02", "n03": "n01"}))
    work = tmp_path / "bench"
    argv = ["bench", "--data", str(data), "--workdir", str(work), "--encoder", str(tiny_clip_folder),
            "--methods", "clipsel", "confident_learning", "oracle", "full", "--ratios", "0.5",
            "--noise", "pair:0.5", "corrupt:0.5", "--pair-map", str(pair_map), "--seeds", "0",
            "--archs", "small_cnn", "resnet18", "--train-steps", "2", "--train-width", "4"]
    if not __import__("importlib").util.find_spec("cleanlab"):
        argv[argv.index("confident_learning")] = "random"
    assert main(argv) == 0
    rows = _rows(work)
    assert len(rows) == 2 * 4 * 2 and all(r["test_accuracy"] != "" for r in rows)
    assert {r["arch"] for r in rows} == {"small_cnn", "resnet18"}
    by = {(r["noise"], r["method"], r["arch"]): r for r in rows}
    # pair 0.5 of n01 (6) and n03 (6): 6 flipped of 18; corrupt: 9 images of 18
    assert by[("pair:0.5", "full", "small_cnn")]["noisy_full_frac"] == str(round(6 / 18, 5))
    assert by[("corrupt:0.5", "full", "resnet18")]["noisy_full_frac"] == "0.5"
    assert by[("pair:0.5", "oracle", "small_cnn")]["noisy_kept_frac"] == "0.0"
    # corrupt 0.5 of 18: a class may hold fewer clean images than its quota; the oracle keeps no more noisy ones
    # than that shortfall
    from clipsel_jax.evaluate.splits import load_images
    from clipsel_jax.selection import class_quotas

    train = open_splits(DataConfig(path=str(data))).train
    bad = corrupt_images(load_images(train)[0], 0.5, seed=0)[1] >= 0
    quota = class_quotas(train.labels, 3, 9)
    shortfall = sum(max(0, quota[k] - int((~bad[train.labels == k]).sum())) for k in range(3))
    assert by[("corrupt:0.5", "oracle", "small_cnn")]["noisy_kept_frac"] == str(round(shortfall / 9, 5))
    for noise in ("pair:0.5", "corrupt:0.5"):
        assert by[(noise, "clipsel", "small_cnn")]["detect_auc"] != ""
        # one selection per method, noise and seed, shared by the architectures
        assert by[(noise, "clipsel", "small_cnn")]["kept"] == by[(noise, "clipsel", "resnet18")]["kept"] == "9"
    corrupt_cache = list((work / "corrupt" / "0.5_seed0" / "embeddings").glob("*/manifest.json"))
    assert len(corrupt_cache) == 1  # only the 9 corrupted images were embedded, once
    assert json.loads(corrupt_cache[0].read_text())["identity"]["num_samples"] == 9
    md = (work / "results.md").read_text()
    assert "**50% corrupted images, resnet18**" in md and "| 50% pair label noise | 100% | full | small_cnn |" in md
    assert (work / "results.png").stat().st_size > 1000
    assert main(argv) == 0 and len(_rows(work)) == 16  # a rerun finds every row done
    capsys.readouterr()
    assert main(argv[:-2] + ["--train-width", "8"]) == 2  # another setting is refused, never mixed in
    assert "holds results of another setting" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_workers_sharing_a_workdir_never_write_a_row_twice(tmp_path, tiny_clip_folder, monkeypatch, capsys):
    """Two workers may start the same row; the second to finish it must not append it again."""
    import clipsel_jax.evaluate as ev

    work = tmp_path / "bench"
    real = ev.train_classifier

    def train_while_another_worker_finishes_the_row(*args, **kwargs):
        result = real(*args, **kwargs)
        with open(work / "results.csv", "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({"method": "random", "arch": "small_cnn", "ratio": 0.5,
                                                "noise": "none", "seed": 0, "kept": 9, "noisy_kept_frac": 0.0,
                                                "noisy_full_frac": 0.0, "detect_auc": "", "class_frac_min": 0.5,
                                                "class_frac_max": 0.5, "select_s": 0.0, "test_accuracy": 0.5,
                                                "train_s": 1.0})
        return result

    monkeypatch.setattr(ev, "train_classifier", train_while_another_worker_finishes_the_row)
    argv = ["bench", "--data", str(_image_set(tmp_path / "c.zip")), "--workdir", str(work), "--encoder",
            str(tiny_clip_folder), "--methods", "random", "--ratios", "0.5", "--noise", "none", "--seeds", "0",
            "--train-steps", "2", "--train-width", "4"]
    assert main(argv) == 0
    rows = _rows(work)
    assert [(r["method"], r["test_accuracy"]) for r in rows] == [("random", "0.5")]  # the other worker's row, once
    assert "another worker wrote this row first" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_reads_tfds_splits_and_a_config(tmp_path, tiny_clip_folder):
    """tfds:NAME with its train and test splits (mock data); --config gives the data and encoder, options override."""
    tfds = pytest.importorskip("tensorflow_datasets")
    work = tmp_path / "bench"
    cfg = tmp_path / "my.py"
    cfg.write_text(f"def get_config():\n    return dict(data=dict(path='tfds:cifar10'), "
                   f"encoder=dict(name={str(tiny_clip_folder)!r}), adapt=dict(epochs=2))\n")
    with tfds.testing.mock_data(num_examples=20):
        assert main(["bench", "--config", str(cfg), "--workdir", str(work), "--methods", "clipsel", "oracle",
                     "--ratios", "0.5", "--noise", "0.2", "--seeds", "0"]) == 0
        labels = __import__("clipsel_jax").data.tfds_source("cifar10", "train").labels
    rows = {r["method"]: r for r in _rows(work)}
    # the oracle keeps a mislabeled sample only where a class has fewer clean ones than its quota
    from clipsel_jax.data.noise import symmetric_label_noise
    from clipsel_jax.selection import class_quotas

    noisy, flipped = symmetric_label_noise(labels, 10, 0.2, seed=0)
    quota = class_quotas(noisy, 10, 10)
    shortfall = sum(max(0, int(quota[k]) - int(((noisy == k) & ~flipped).sum())) for k in range(10))
    assert rows["clipsel"]["kept"] == "10" and rows["oracle"]["noisy_kept_frac"] == str(round(shortfall / 10, 5))
    setting = json.loads((work / "setting.json").read_text())
    assert setting["data"] == "tfds:cifar10 splits train / test" and setting["encoder"] == str(tiny_clip_folder)


def test_load_images_skips_unreadable_test_images_and_names_training_ones(tmp_path):
    from clipsel_jax.evaluate.splits import load_images

    (tmp_path / "f").mkdir()
    root = _image_set(tmp_path / "f", top="", zip_it=False)
    (root / "test" / "cat" / "0001.png").write_bytes(b"not a png")
    s = open_splits(DataConfig(path=str(root)))
    with pytest.warns(UserWarning, match="1 unreadable images"):
        images, kept = load_images(s.test, skip_unreadable=True)
    assert images.shape == (5, 32, 32, 3) and len(kept) == 5 and 3 not in kept.tolist()
    with pytest.raises(ValueError, match="cannot be read"):
        load_images(s.test)
