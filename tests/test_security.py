"""Adversarial input, tried as a hostile or careless user would (the security and reliability issue).

Every malicious or broken file is built here by the test itself. What is checked: no code runs from a data or weight
file, no memory is read outside a file's data, a bad setting never yields an output, every bad input gets one clear
message (exit 2 on the command line) or is recorded as unreadable while the run goes on, a workdir is held by one run
at a time, and finished work is never lost (damaged checkpoints are recomputed).
"""

import collections
import io
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import clipsel_jax as cs
from clipsel_jax import selection, torchfile
from clipsel_jax.adapt import AdaptConfig, train_adapters
from clipsel_jax.checks import StageOutputError
from clipsel_jax.ckpt import CHECKSUMS, Checkpointer
from clipsel_jax.cli import main
from clipsel_jax.data.sources import DEFAULT_MAX_IMAGE_PIXELS, UnreadableImage, decode_image
from clipsel_jax.embedding import embed
from clipsel_jax.report import write_outputs, write_report
from clipsel_jax.weights import CheckpointError, read_checkpoint, read_state_dict
from clipsel_jax.workdir_lock import LOCK_NAME, WorkdirBusy, hold_workdir
from synthetic import noisy_clusters, unaligned


# ==================================================================================================================
# Settings, embeddings files, exit codes and the report
# ==================================================================================================================


def clusters(n_per=20, classes=3, dim=8, seed=0):
    x, y, t, _ = noisy_clusters(n_per, classes, dim, flip=0, seed=seed, spread=3, text_noise=0.3)
    return x, y, t


def embeddings_file(path, **changes):
    x, y, t = clusters()
    e = dict(image_emb=x, labels=y, ids=np.arange(len(y)), text_emb=t, class_names=np.array(["a", "b", "c"]),
             prompts=np.array(["A photo of a a.", "A photo of a b.", "A photo of a c."]))
    e.update(changes)
    np.savez(path, **e)
    return str(path)


# ---- settings: refused where they enter, never a NaN or arbitrary output ----------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(k_neighbors=0), "k_neighbors must be >= 1"),
    (dict(k_neighbors=-1), "k_neighbors must be >= 1"),
    (dict(k_neighbors=2.5), "k_neighbors must be an integer"),
    (dict(reference_size=0), "reference_size must be >= 2"),
    (dict(reference_threshold=0), "reference_threshold must be >= 1"),
    (dict(k_fraction=float("nan")), "k_fraction must be finite"),
    (dict(k_fraction=0.0), r"k_fraction must be in \(0, 1\]"),
    (dict(alpha=float("inf")), "alpha must be finite"),
    (dict(alpha=-1.0), "alpha must be >= 0"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(ratio=True), "ratio must be a number, got True"),
    (dict(ratio=float("nan")), "ratio must be finite"),
    (dict(ratio="0.5"), "ratio must be a number"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, match):
    x, y, t = clusters()
    args = dict(ratio=0.5, adapter=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cs.select_from_embeddings(x, y, t, args.pop("ratio"), **args)


def test_numpy_scalars_are_settings_too():
    x, y, t = clusters()
    sel = cs.select_from_embeddings(x, y, t, np.float32(0.5), adapter=None, k_neighbors=np.int64(3),
                                    beta=np.float64(2.0))
    assert len(sel.indices) == 30 and sel.meta["ratio"] == 0.5


@pytest.mark.parametrize("make, match", [
    (lambda: AdaptConfig(lr=float("nan")), "lr must be finite"),
    (lambda: AdaptConfig(lr=0.0), "lr must be > 0"),
    (lambda: AdaptConfig(epochs=-1), "epochs must be >= 0"),
    (lambda: AdaptConfig(batch_size=2.5), "batch_size must be an integer"),
    (lambda: AdaptConfig(shared_dim=0), "shared_dim must be >= 1"),
    (lambda: AdaptConfig(epochs=True), "epochs must be an integer, got True"),
    (lambda: cs.SelectionConfig(temperature=0.0), "temperature must be > 0"),
    (lambda: cs.SelectionConfig(lr=float("inf")), "lr must be finite"),
    (lambda: cs.SelectionConfig(momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda: cs.SelectionConfig(max_steps=-5), "max_steps must be >= 0"),
    (lambda: cs.SelectionConfig(tolerance=float("nan")), "tolerance must be finite"),
    (lambda: cs.SelectionConfig(beta=float("nan")), "beta must be finite"),
])
def test_config_objects_refuse_bad_numbers(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_diverging_adapters_stop_with_the_cause():
    """An absurd learning rate makes the weights overflow: the stage stops naming it, nothing is scored."""
    x, y, t = clusters()
    with pytest.raises(StageOutputError, match=r"dataset adaptation.*lower it"):
        train_adapters(x, y, t, AdaptConfig(lr=1e38, epochs=3, batch_size=16))


def test_nan_embeddings_are_refused_by_adapters_and_scores(tmp_path, capsys):
    x, y, t = clusters()
    x[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"image_emb has 1 rows with NaN or inf: \[4\]"):
        train_adapters(x, y, t, AdaptConfig(epochs=1))
    bad = embeddings_file(tmp_path / "nan.npz", image_emb=x)
    for argv in (["adapt", "--embeddings", bad, "--workdir", str(tmp_path / "a")],
                 ["score", "--embeddings", bad, "--out", str(tmp_path / "s.csv")]):
        assert main(argv) == 2
        assert "NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "a" / "adapted.npz").exists()


@pytest.mark.parametrize("argv, message", [
    (["--k-neighbors", "0"], "argument --k-neighbors: k_neighbors must be >= 1, got 0"),
    (["--k-neighbors", "-1"], "argument --k-neighbors: k_neighbors must be >= 1"),
    (["--reference-size", "0"], "argument --reference-size: reference_size must be >= 2"),
    (["--adapter-lr", "nan"], "argument --adapter-lr: adapter_lr must be finite"),
    (["--adapter-refine", "-1"], "argument --adapter-refine: adapter_refine must be in [0, 10], got -1"),
    (["--adapter-refine", "1.5"], "argument --adapter-refine: invalid int value"),
    (["--alpha", "inf"], "--alpha must be code, paper or a finite number >= 0"),
    (["--beta", "nan"], "argument --beta: beta must be finite"),
    (["--ratio", "nan"], "argument --ratio: ratio must be finite"),
    (["--seed", "-3"], "argument --seed: seed must be >= 0"),
])
def test_cli_refuses_bad_numbers_before_embedding(argv, message, tmp_path, capsys):
    emb = embeddings_file(tmp_path / "e.npz")
    base = ["select", "--embeddings", emb, "--workdir", str(tmp_path / "w"), "--no-report"]
    if "--ratio" not in argv:
        base += ["--ratio", "0.5"]
    try:
        code = main(base + argv)
    except SystemExit as e:  # argparse's own exit for a bad option value
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w" / "scores.csv").exists()


def test_cli_checks_config_values_too(tmp_path, capsys):
    """Values from a --config file are not typed by argparse: they are checked all the same, before any work."""
    config = tmp_path / "c.py"
    config.write_text("def get_config():\n    return {'ratio': 0.5, 'scores': {'k_neighbors': 0}}\n")
    code = main(["select", "--config", str(config), "--data", str(tmp_path / "no_such_folder"),
                 "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert "k_neighbors must be >= 1" in capsys.readouterr().err


def test_cli_checks_the_ratio_before_embedding(folder, tmp_path, capsys):
    """Twelve images at 1%: nothing would be kept; said at once, not after the encoder ran (no encoder is even
    loaded: the spec given does not exist)."""
    code = main(["select", "--data", str(folder), "--encoder", str(tmp_path / "no_such_encoder"), "--ratio", "0.01",
                 "--workdir", str(tmp_path / "w"), "--quiet"])
    assert code == 2
    assert "keeps round(0.01 * 12) = 0" in capsys.readouterr().err


# ---- inputs that used to escape as IndexError / EOFError / FileExistsError (exit 1) -----------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(class_names=np.array(["a", "b"])), "2 class names for 3 text_emb rows"),
    (dict(ids=np.arange(10)), "ids must be 60 integers"),
    (dict(labels=np.full(60, 7)), r"60 labels are outside 0..2"),
    (dict(ids=np.zeros(60, int)), "59 sample ids are repeated"),
    (dict(image_emb=np.zeros((0, 8), np.float32), labels=np.zeros(0, int), ids=np.zeros(0, int)), "non-empty"),
    (dict(logit_scale=np.ones(3)), "logit_scale must be one float"),
    (dict(logit_scale=np.array(-1.0)), "logit_scale must be > 0"),
    (dict(logit_scale=np.array(np.nan)), "logit_scale must be"),
    ("empty", "not a valid embeddings file"),
    ("not_npz", "not a valid embeddings file"),
])
@pytest.mark.parametrize("command", ["select", "score", "adapt"])
def test_bad_embeddings_files_exit_2(changes, message, command, tmp_path, capsys):
    path = tmp_path / "e.npz"
    if changes == "empty":
        path.write_bytes(b"")
    elif changes == "not_npz":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        embeddings_file(path, **changes)
    argv = {"select": ["select", "--ratio", "0.5", "--workdir", str(tmp_path / "w"), "--no-report"],
            "score": ["score", "--out", str(tmp_path / "s.csv")],
            "adapt": ["adapt", "--workdir", str(tmp_path / "w")]}[command]
    assert main(argv + ["--embeddings", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_workdir_that_is_a_file_exits_2(tmp_path, capsys):
    emb = embeddings_file(tmp_path / "e.npz")
    (tmp_path / "w").write_text("I am a file")
    assert main(["select", "--embeddings", emb, "--ratio", "0.5", "--workdir", str(tmp_path / "w")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_report_with_another_data_set_exits_2(tmp_path, capsys):
    """The selection covers ids 0..59; the folder given to the report holds 4 images."""
    x, y, t = clusters()
    sel = cs.select_from_embeddings(x, y, t, 0.5, adapter=None)
    sel.meta["class_names"] = ["a", "b", "c"]
    write_outputs(tmp_path / "w", sel, np.arange(60), y, ["a", "b", "c"])
    for c in ("a", "b"):
        (tmp_path / "other" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "other" / c / f"{i}.png")
    assert main(["report", "--workdir", str(tmp_path / "w"), "--data", str(tmp_path / "other")]) == 2
    assert "not the one the selection was made from" in capsys.readouterr().err


def test_class_names_are_never_mathtext(tmp_path):
    """`a$^$b` made matplotlib's mathtext parser fail (no report.html); names are drawn as they are."""
    x, y, t = clusters()
    names = ["a$^$b", "$\\frac{1}{0}$", "cost $5"]
    sel = cs.select_from_embeddings(x, y, t, 0.5, adapter=None)
    sel.meta["class_names"] = names
    write_outputs(tmp_path, sel, np.arange(60), y, names)
    page = write_report(tmp_path).read_text()
    assert "<img" in page and "a$^$b" in json.loads((tmp_path / "meta.json").read_text())["class_names"]


# ==================================================================================================================
# Checkpoint files: no code runs, no memory outside the file's data is read, TorchScript needs consent
# ==================================================================================================================


try:  # the checkpoint tests build valid files with torch (and compare with it); no other test here needs it
    import torch
except ImportError:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch builds the checkpoint files: pip install torch")

SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


class Payload:
    """Unpickles as ``func(arg)``: how a hostile pickle runs code."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def payloads(marker):
    return {"os.system": Payload(os.system, f"touch {marker}"),
            "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()")}


class Storage:
    """A float32 storage, pickled as torch's persistent id ("storage", type, key, location, numel[, view])."""

    def __init__(self, key="0", data=(0.0, 1.0, 2.0, 3.0), numel=None, type_name="FloatStorage"):
        self.key, self.data = key, np.asarray(data, np.float32)
        self.numel = len(self.data) if numel is None else numel
        self.type = getattr(torch, type_name, type_name)  # a name torch lacks stays a str: an unknown type


class Tensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) with any values at all."""

    def __init__(self, storage, offset=0, size=(4,), stride=(1,)):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
    def __init__(self, f, legacy: bool):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.type, obj.key, "cpu", obj.numel) + ((None,) if self.legacy else ())
        return None


def dumps(obj, legacy=False) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, legacy).dump(obj)
    return buf.getvalue()


def zip_file(tmp_path, name, obj, drop_storage=False):
    """torch.save's own archive of one 4-float storage, with data.pkl replaced by the pickle of ``obj``."""
    src = tmp_path / "src.pt"
    if not src.exists():
        torch.save({"w": torch.arange(4, dtype=torch.float32)}, src)
    dst = tmp_path / name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data.pkl"):
                zout.writestr(info.filename, dumps(obj))
            elif not (drop_storage and info.filename.endswith("/data/0")):
                zout.writestr(info.filename, zin.read(info.filename))
    return dst


def legacy_file(path, obj, storages, replace: dict | None = None, stream_numel: dict | None = None):
    """The legacy torch.save stream: magic, protocol, sys_info, the pickle, the storage keys, then the storages.
    ``replace`` swaps one of the five pickles (by index) for another object; ``stream_numel`` fakes the element
    count written before a storage's bytes."""
    parts = [torchfile.LEGACY_MAGIC, 1001, SYS_INFO, obj, sorted(s.key for s in storages)]
    with open(path, "wb") as f:
        for i, part in enumerate(parts):
            if replace and i in replace:
                pickle.dump(replace[i], f, protocol=2)
            else:
                f.write(dumps(part, legacy=True) if i == 3 else pickle.dumps(part, protocol=2))
        for s in sorted(storages, key=lambda s: s.key):
            f.write(struct.pack("<q", (stream_numel or {}).get(s.key, s.numel)) + s.data.tobytes())
    return path


@needs_torch
def test_hand_built_files_are_what_torch_writes(tmp_path):
    """The builders above write files torch itself reads: the tampered ones below differ only where they say."""
    for f in (zip_file(tmp_path, "ok.pt", {"w": Tensor(Storage())}),
              legacy_file(tmp_path / "ok.pth", {"w": Tensor(Storage())}, [Storage()])):
        want = torch.load(f, weights_only=True)["w"].numpy()
        np.testing.assert_array_equal(want, [0, 1, 2, 3])
        np.testing.assert_array_equal(torchfile.load(f)["w"], want)


# ---------------------------------------------------------------------------------------------------------------
# 1. No pickle of a file runs code


HEADER_PICKLES = {"magic": 0, "protocol": 1, "sys_info": 2, "storage_keys": 4}


@needs_torch
@pytest.mark.parametrize("payload", ["os.system", "exec"])
@pytest.mark.parametrize("part", list(HEADER_PICKLES))
def test_legacy_header_pickles_run_no_code(tmp_path, part, payload):
    marker = tmp_path / "pwned"
    f = legacy_file(tmp_path / "evil.pth", {"w": Tensor(Storage())}, [Storage()],
                    replace={HEADER_PICKLES[part]: payloads(marker)[payload]})
    with pytest.raises(torchfile.UnsupportedPickle, match=r"header pickle holds \w+\.(system|exec)"):
        torchfile.load(f)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # torch's weights_only loader, tried next, refuses it as well
        read_state_dict(f)
    assert not marker.exists()


@needs_torch
@pytest.mark.parametrize("part, value, message", [
    ("magic", "0x1950a86a20f9469cfc6c", "no torch.save magic number"),
    ("protocol", 1001.0, "protocol version is a float"),
    ("protocol", 7, "unknown torch.save protocol version"),
    ("sys_info", ["little_endian"], "system info is a list"),
    ("storage_keys", {"0": 0}, "storage key list is a dict"),
    ("storage_keys", [0.5], "storage key list does not match"),
    ("storage_keys", ["0", "1"], "storage key list does not match"),
])
def test_legacy_header_values_are_checked(tmp_path, part, value, message):
    f = legacy_file(tmp_path / "odd.pth", {"w": Tensor(Storage())}, [Storage()], replace={HEADER_PICKLES[part]: value})
    with pytest.raises(torchfile.UnsupportedPickle, match=message):
        torchfile.load(f)


@needs_torch
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_main_pickle_runs_no_code(tmp_path, fmt):
    marker = tmp_path / "pwned"
    obj = {"w": Tensor(Storage()), "x": payloads(marker)["os.system"]}
    f = zip_file(tmp_path, "evil.pt", obj) if fmt == "zip" else legacy_file(tmp_path / "evil.pt", obj, [Storage()])
    with pytest.raises(torchfile.UnsupportedPickle, match=r"the pickle holds posix\.system"):
        torchfile.load(f)
    with pytest.raises(CheckpointError):
        read_state_dict(f)
    assert not marker.exists()


@needs_torch
def test_load_encoder_runs_no_code(tmp_path):
    from clip_fixtures import make_tokenizer

    import clipsel_jax as cs

    make_tokenizer(tmp_path / "tok")
    marker = tmp_path / "pwned"
    f = legacy_file(tmp_path / "evil.pt", {"w": Tensor(Storage())}, [Storage()],
                    replace={0: payloads(marker)["os.system"]})
    with pytest.raises(CheckpointError):
        cs.load_encoder(str(f), tokenizer=str(tmp_path / "tok"), activation="gelu")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Tensors stay inside their storages, storages hold the bytes they declare

NAME = r"tensor 'model\.visual\.proj'"
TAMPERED = {  # file name: (tensor arguments or other tampering, the error it must raise)
    "too_many_elements": (dict(size=(65536,)), rf"{NAME} .* reaches element 65535 of a storage of 4 elements"),
    "huge_stride": (dict(size=(2,), stride=(2**40,)), rf"{NAME} .* reaches element {2**40} of a storage of 4"),
    "offset_beyond": (dict(offset=10, size=(1,)), rf"{NAME} .* reaches element 10 of a storage of 4 elements"),
    "negative_offset": (dict(offset=-1, size=(1,)), rf"{NAME} .* tuples of non-negative ints"),
    "negative_size": (dict(size=(-1,)), rf"{NAME} .* tuples of non-negative ints"),
    "negative_stride": (dict(offset=3, size=(2,), stride=(-1,)), rf"{NAME} .* tuples of non-negative ints"),
    "float_size": (dict(size=(2.0,)), rf"{NAME} .* tuples of non-negative ints"),
    "int_size": (dict(size=4, stride=1), rf"{NAME} .* tuples of non-negative ints"),
    "rank_mismatch": (dict(size=(2, 2), stride=(1,)), rf"{NAME} .* equally long"),
    "int64_overflow": (dict(size=(0, 2**64)), rf"{NAME} .* tuples of non-negative ints"),
    "overflowing_product": (dict(size=(2**62, 2**62), stride=(0, 0)), rf"{NAME} .* too large"),
    "storage_not_a_storage": (dict(storage=5), rf"{NAME} .* has a int as its storage"),
    "short_data": (dict(storage=Storage(numel=8), size=(8,)), r"storage 0 declares 8 elements .* holds 16 bytes"),
    "missing_storage": ("drop", r"storage 0 is missing from the archive"),
    "unknown_storage_type": (dict(storage=Storage(type_name="NotAStorage")), r"storage of unknown type 'NotAStorage'"),
    "legacy_huge_stride": ("legacy", rf"{NAME} .* reaches element {2**40} of a storage of 4"),
    "legacy_short_data": ("legacy_short", r"storage 0 declares 4 elements, its data 1000 elements"),
}


def tampered_file(tmp_path, case):
    tamper = TAMPERED[case][0]
    if tamper == "legacy":
        obj = {"model": {"visual.proj": Tensor(Storage(), size=(2,), stride=(2**40,))}}
        return legacy_file(tmp_path / f"{case}.pth", obj, [Storage()])
    if tamper == "legacy_short":
        return legacy_file(tmp_path / f"{case}.pth", {"w": Tensor(Storage())}, [Storage()], stream_numel={"0": 1000})
    args = {} if tamper == "drop" else dict(tamper)
    obj = {"model": {"visual.proj": Tensor(args.pop("storage", Storage()), **args)}}
    return zip_file(tmp_path, f"{case}.pt", obj, drop_storage=tamper == "drop")


@pytest.fixture(scope="module")
def tampered_results(tmp_path_factory):
    """torchfile.load on every tampered file, in a subprocess: a reader that reads outside a storage may crash,
    and must not take pytest with it."""
    tmp = tmp_path_factory.mktemp("tampered")
    files = {case: str(tampered_file(tmp, case)) for case in TAMPERED}
    script = ("import json, sys\nfrom clipsel_jax import torchfile\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n        torchfile.load(path)\n        result = 'loaded'\n"
              "    except torchfile.UnsupportedPickle as e:\n        result = f'{type(e).__name__}: {e}'\n"
              "    print(json.dumps([path, result]), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, *files.values()], capture_output=True, text=True,
                          timeout=300)
    results = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    return proc, {case: results.get(path) for case, path in files.items()}


@needs_torch
@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_tensors_and_storages_are_refused(tampered_results, case):
    proc, results = tampered_results
    assert proc.returncode == 0, f"the reader crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    kind = "UnsupportedPickle" if case == "unknown_storage_type" else "CorruptCheckpoint"
    assert results[case] is not None and results[case].startswith(kind + ": "), results[case]
    assert re.search(TAMPERED[case][1], results[case]), results[case]


@needs_torch
@pytest.mark.parametrize("case", ["too_many_elements", "short_data", "legacy_short_data"])
def test_corrupt_files_are_not_handed_to_torch(tmp_path, monkeypatch, case):
    f = tampered_file(tmp_path, case)
    monkeypatch.setitem(sys.modules, "torch", None)  # CorruptCheckpoint must not fall back to torch.load
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint: .*(declares|reaches)"):
        read_state_dict(f)


def valid_state_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    flat = base.view(-1)
    return collections.OrderedDict(
        w=base, t=base.t(), strided=base[1:3, ::2], tail=flat[20:], last=flat[-1],  # views of one storage
        overlapping=torch.arange(10.0).unfold(0, 4, 2),  # windows that share elements
        position_ids=torch.arange(7).expand((1, -1)),  # a zero stride, as in older transformers files
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), empty_view=base[:, 6:],
        half=torch.randn(3, 2).half().t(), bf16=torch.randn(5).bfloat16(), double=torch.randn(2, 2).double(),
        bool=torch.tensor([True, False]), param=torch.nn.Parameter(torch.ones(2)))


@needs_torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_valid_files_still_match_torch(tmp_path, zip_format):
    f = tmp_path / "valid.pt"
    torch.save(valid_state_dict(), f, _use_new_zipfile_serialization=zip_format)
    want, got = torch.load(f, weights_only=True), torchfile.load(f)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].shape == tuple(v.shape) and str(got[k].dtype) == str(v.dtype).removeprefix("torch."), k
        np.testing.assert_array_equal(got[k].astype(np.float32), v.detach().float().numpy(), err_msg=k)
    floats = read_state_dict(f)
    assert all(floats[k].dtype == np.float32 for k in floats) and set(floats) == set(want)


# ---------------------------------------------------------------------------------------------------------------
# 3. TorchScript archives run code: refused unless allowed


@pytest.fixture
def torchscript_file(tmp_path):
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.arange(3.0))

        def forward(self, x):
            return x + self.w

    f = tmp_path / "ViT-B-32.pt"
    with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's releases remain TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Holder()), str(f))
    return f


REFUSAL = r"TorchScript archive, refused by default: .*carry code.*allow_torchscript=True.*--trust-torchscript"


@needs_torch
def test_torchscript_is_refused_before_torch_runs(torchscript_file, monkeypatch, tmp_path):
    def jit_load(*_, **__):
        raise AssertionError("torch.jit.load must not be called")

    import clipsel_jax as cs

    monkeypatch.setattr(torch.jit, "load", jit_load)
    with pytest.raises(CheckpointError, match=REFUSAL):  # before the missing tokenizer: the first thing to fix
        cs.load_encoder(str(torchscript_file))
    with pytest.raises(CheckpointError, match=REFUSAL):
        read_checkpoint(torchscript_file, tokenizer=str(tmp_path), activation="quick_gelu")
    monkeypatch.setitem(sys.modules, "torch", None)  # not even imported
    with pytest.raises(CheckpointError, match=REFUSAL):
        read_state_dict(torchscript_file)


@needs_torch
def test_torchscript_is_read_when_allowed(torchscript_file):
    np.testing.assert_array_equal(read_state_dict(torchscript_file, allow_torchscript=True)["w"], [0, 1, 2])


# ==================================================================================================================
# Data files: decompression bombs, zip entries with unsafe paths, broken links, duplicated class folders
# ==================================================================================================================


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels (a decompression bomb)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096, 9))
            + chunk(b"IEND", b""))


def png(size=(20, 24), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_folder(root, files: dict):
    """{"cat/0.png": bytes} -> files under root."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def encoder(np_clip_folder_factory):
    return cs.load_encoder(str(np_clip_folder_factory()), batch_size=8)


# -------------------------------------------------------------------------------------------------------------
# A. Decompression bombs


def test_decode_image_refuses_a_declared_size_over_the_limit():
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 2000
    with pytest.raises(UnreadableImage, match=r"declares 30000x30000 pixels, more than the limit of 89478485.*"
                                              r"max_image_pixels"):
        decode_image(bomb)


def test_pixel_limit_is_the_setting_not_pils_global(monkeypatch):
    data = png((100, 100))
    with pytest.raises(UnreadableImage, match=r"100x100 pixels, more than the limit of 2500"):
        decode_image(data, max_pixels=50 * 50)
    assert decode_image(data).shape == (100, 100, 3)
    # PIL's process-global limit neither warns nor refuses: ours applies, and PIL's is left as it was
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data).shape == (100, 100, 3)
        assert decode_image(data, max_pixels=None).shape == (100, 100, 3)  # None: no limit
    assert Image.MAX_IMAGE_PIXELS == 100


def test_image_folder_pixel_limit_setting(tmp_path):
    root = make_folder(tmp_path, {"cat/big.png": png((100, 100)), "dog/small.png": png((20, 20))})
    src = cs.data.image_folder(str(root), max_image_pixels=50 * 50)
    assert src.max_image_pixels == 2500
    with pytest.raises(UnreadableImage, match="100x100 pixels, more than the limit of 2500"):
        src.read(0)
    assert src.read(1).shape == (20, 20, 3)
    default = cs.data.image_folder(str(root))
    assert default.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS and default.read(0).shape == (100, 100, 3)
    assert default.fingerprint() != src.fingerprint()  # which images are read depends on the limit
    src.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS  # a plain attribute (the CLI sets it), kept when pickled
    assert pickle.loads(pickle.dumps(src)).read(0).shape == (100, 100, 3)
    assert src.fingerprint() == default.fingerprint()
    with pytest.raises(ValueError, match="max_image_pixels must be a positive"):
        cs.data.image_folder(str(root), max_image_pixels=0)


def test_bomb_among_good_images_is_recorded_and_the_run_goes_on(encoder, tmp_path):
    files = {f"{c}/{i}.png": png(seed=10 * k + i) for k, c in enumerate(("cat", "dog")) for i in range(3)}
    root = make_folder(tmp_path / "imgs", {**files, "dog/bomb.png": png_declaring(30000, 30000)})
    src = cs.data.image_folder(str(root))
    with pytest.warns(UserWarning, match="1 of 7 images could not be read"):
        e = embed(src, encoder, tmp_path / "work", chunk_size=4, progress=False)
    (bad,) = e.unreadable
    assert bad["path"].endswith("bomb.png") and "declares 30000x30000 pixels" in bad["reason"]
    assert len(e.ids) == 6 and bad["id"] not in e.ids
    readable = [i for i in range(len(src)) if i != bad["id"]]
    np.testing.assert_allclose(e.image_emb, encoder.encode_images([src.read(i) for i in readable]), rtol=1e-5,
                               atol=1e-6)


def test_tfds_sources_take_the_pixel_limit():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        src = cs.data.tfds_source("cifar10", "train", reader="array_record", max_image_pixels=10)
        with pytest.raises(UnreadableImage, match="32x32 pixels, more than the limit of 10"):
            src.read_example(0)
        src.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
        image, label = src.read_example(0)
        assert image.shape == (32, 32, 3) and 0 <= label < 10


def test_streamed_tfrecord_set_applies_the_pixel_limit(encoder, tmp_path):
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")

    class BombCheckImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["small", "large"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                side = 40 if i % 3 == 2 else 16
                yield i, {"image": np.full((side, side, 3), 9 * i, np.uint8), "label": int(side == 40)}

    BombCheckImages(data_dir=str(tmp_path / "tfds"), file_format="tfrecord").download_and_prepare()
    src = cs.data.tfds_source("bomb_check_images", "train", data_dir=str(tmp_path / "tfds"), max_image_pixels=1000)
    assert src.streaming
    with pytest.warns(UserWarning, match="2 of 6 images could not be read"):
        e = embed(src, encoder, progress=False)
    assert [u["id"] for u in e.unreadable] == np.flatnonzero(src.labels == 1).tolist()  # the 40x40 ones
    assert all("40x40 pixels, more than the limit of 1000" in u["reason"] for u in e.unreadable)


# -------------------------------------------------------------------------------------------------------------
# B. Zip entries with unsafe paths


UNSAFE = ["../evil.png", "cat/../../x.png", "/etc/x.png", "C:/x.png", "cat\\y.png", "./cat/z.png"]


def write_zip(path, names):
    with zipfile.ZipFile(path, "w") as zf:
        for n in names:
            zf.writestr(zipfile.ZipInfo(n), png())
    return path


def test_zip_entries_with_unsafe_paths_are_skipped_with_a_warning(tmp_path):
    z = write_zip(tmp_path / "a.zip", ["cat/0.png", "dog/0.png", *UNSAFE])
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist()[2:] == UNSAFE  # stored as given
    shown = r"'\.\./evil\.png', 'cat/\.\./\.\./x\.png', '/etc/x\.png', 'C:/x\.png', 'cat\\\\y\.png', \.\.\."
    with pytest.warns(UserWarning, match=r"6 zip entries with unsafe paths .* skipped: " + shown):
        src = cs.data.image_folder(str(z))
    assert src.class_names == ["cat", "dog"] and src.files == ["cat/0.png", "dog/0.png"]
    z2 = write_zip(tmp_path / "b.zip", ["train/cat/0.png", "train/../x/y.png"])
    with pytest.warns(UserWarning, match=r"1 zip entries with unsafe paths .*'train/\.\./x/y\.png'"):
        assert cs.data.image_folder(f"{z2}:train").class_names == ["cat"]


def test_zip_of_only_unsafe_entries_is_refused(tmp_path):
    z = write_zip(tmp_path / "a.zip", UNSAFE)
    with pytest.raises(ValueError, match=r"no usable images .* 6 entries with unsafe paths .* refused"):
        cs.data.image_folder(str(z))


def test_damaged_zip_entry_is_unreadable(tmp_path):
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("cat/0.png", png(seed=1))
        zf.writestr("cat/1.png", png(seed=2))
    raw = bytearray(z.read_bytes())
    at = raw.index(png(seed=2)) + 100  # inside the second entry's stored data
    raw[at] ^= 0xFF
    z.write_bytes(bytes(raw))
    src = cs.data.image_folder(str(z))
    assert src.read(0).shape == (20, 24, 3)
    with pytest.raises(UnreadableImage, match="zip entry: BadZipFile: Bad CRC-32"):
        src.read(1)


# -------------------------------------------------------------------------------------------------------------
# C/D. Links in folders


def test_broken_links_are_listed_as_unreadable_and_fingerprinted(encoder, tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat/0.png": png(seed=0), "cat/1.png": png(seed=1),
                                           "dog/0.png": png(seed=2)})
    os.symlink("missing.png", root / "cat" / "dangling.png")
    os.symlink("loop.png", root / "dog" / "loop.png")
    os.symlink(root / "dog" / "0.png", root / "dog" / "1.png")  # a link to a file: read as the file
    os.mkfifo(root / "dog" / "fifo.png")  # not a file: never listed (reading it would block)
    os.symlink("fifo.png", root / "dog" / "to_fifo.png")
    src = cs.data.image_folder(str(root))
    names = [os.path.relpath(f, root) for f in src.files]
    assert names == ["cat/0.png", "cat/1.png", "cat/dangling.png", "dog/0.png", "dog/1.png", "dog/loop.png"]
    with pytest.raises(UnreadableImage, match=r"dangling symbolic link \(to missing.png\)"):
        src.read(2)
    with pytest.raises(UnreadableImage, match="symbolic link loop"):
        src.read(5)
    np.testing.assert_array_equal(src.read(4), src.read(3))
    fp = src.fingerprint()  # stats every file: the broken links by their own stamp
    assert cs.data.image_folder(str(root)).fingerprint() == fp
    (root / "cat" / "missing.png").write_bytes(png(seed=3))  # the link now leads to a file: other data
    assert cs.data.image_folder(str(root)).fingerprint() != fp
    (root / "cat" / "missing.png").unlink()
    with pytest.warns(UserWarning, match="2 of 6 images could not be read"):
        e = embed(src, encoder, progress=False)
    reasons = {os.path.basename(u["path"]): u["reason"] for u in e.unreadable}
    assert reasons == {"dangling.png": "dangling symbolic link (to missing.png)", "loop.png": "symbolic link loop"}
    assert len(e.ids) == 4


def test_images_listed_under_two_classes_warn(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat/0.png": png(seed=0), "cat/1.png": png(seed=1),
                                           "dog/0.png": png(seed=2)})
    os.symlink("cat", root / "kitty")  # the same folder under a second class name
    os.symlink(root / "cat" / "0.png", root / "dog" / "cat0.png")  # one file under two classes
    os.symlink("loop", root / "loop")  # class-level loop and dangling link: not classes, no hang, no crash
    os.symlink("nowhere", root / "gone")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = cs.data.image_folder(str(root))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert f"class folders cat, kitty in {root} are the same folder ({(root / 'cat').resolve()})" in messages[0]
    assert messages[1].startswith("1 files in") and "listed under two classes" in messages[1]
    assert f"{root / 'cat' / '0.png'} and {root / 'dog' / 'cat0.png'}" in messages[1]
    assert src.class_names == ["cat", "dog", "kitty"] and len(src) == 6


# ==================================================================================================================
# Workdirs: one run at a time; damaged checkpoint steps are discarded and recomputed
# ==================================================================================================================


TESTS = str(Path(__file__).parent)

HOLD = """
import sys, time
from clipsel_jax.workdir_lock import hold_workdir
with hold_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
print("released", flush=True)
"""


def hold_in_another_process(workdir, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def busy_for_another_thread(workdir) -> bool:
    out = []

    def attempt():
        try:
            with hold_workdir(workdir):
                out.append(False)
        except WorkdirBusy:
            out.append(True)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return out[0]


@pytest.mark.slow  # a subprocess
def test_second_run_is_refused_at_once_and_a_killed_holder_does_not_block(tmp_path):
    x, y, t = unaligned(seed=3, n=200)
    cfg = AdaptConfig(epochs=1, batch_size=100)
    holder = hold_in_another_process(tmp_path, 600)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkdirBusy, match=rf"pid {holder.pid} on host {re.escape(socket.gethostname())}") as e:
            train_adapters(x, y, t, cfg, workdir=tmp_path)
        assert time.monotonic() - t0 < 5  # at once, not after a wait
        assert e.value.holder["pid"] == holder.pid and e.value.holder["since"] in str(e.value)
        assert "--wait" in str(e.value) and "another --workdir" in str(e.value)
        assert not (tmp_path / "adapters").exists()  # refused before touching anything
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file with its pid stays behind
        holder.wait()
    assert str(holder.pid) in (tmp_path / LOCK_NAME).read_text()
    _, hist = train_adapters(x, y, t, cfg, workdir=tmp_path)  # the kernel dropped the dead holder's lock
    assert len(hist["loss"]) == 1


@pytest.mark.slow  # a subprocess
def test_wait_blocks_until_the_holder_is_done(tmp_path, capfd):
    x, y, t = unaligned(seed=3, n=200)
    holder = hold_in_another_process(tmp_path, 3)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkdirBusy):  # a number: wait that long at most
            with hold_workdir(tmp_path, wait=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 3
        with hold_workdir(tmp_path, wait=True):
            # we got the lock because the holder's hold ended (its exit, JAX's teardown included, may take seconds
            # more on a loaded machine: a 5 s timeout on the exit itself failed once under a load of 8 on 2 cores)
            assert holder.stdout.readline().strip() == "released"
            _, hist = train_adapters(x, y, t, AdaptConfig(epochs=1, batch_size=100), workdir=tmp_path)
        assert len(hist["loss"]) == 1 and holder.wait(timeout=120) == 0
        err = capfd.readouterr().err
        assert f"pid {holder.pid}" in err and "waiting" in err
    finally:
        holder.kill()
        holder.wait()


def test_holding_is_reentrant_within_a_thread(tmp_path):
    """select_from_embeddings holds the workdir and calls train_adapters, which holds it again: no self-deadlock,
    and the workdir stays held until the outermost hold ends."""
    x, y, text, _ = noisy_clusters(n_per=60, classes=3, dim=8, seed=1)
    with hold_workdir(tmp_path):
        with hold_workdir(f"{tmp_path}/../{tmp_path.name}"):  # another spelling of the same workdir
            sel = cs.select_from_embeddings(x, y, text, 0.5, adapter=AdaptConfig(epochs=2), workdir=tmp_path)
        assert len(sel.indices) == 90 and (tmp_path / "adapters").is_dir()
        assert busy_for_another_thread(tmp_path)  # still held: only the nested holds ended
    assert not busy_for_another_thread(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released: no holder named


def test_cli_on_a_held_workdir_exits_2_naming_the_holder(tmp_path, capsys):
    emb = embeddings_file(tmp_path / "e.npz")
    held, release = threading.Event(), threading.Event()

    def holder():  # another thread of this process is another holder
        with hold_workdir(tmp_path / "w"):
            held.set()
            release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    try:
        held.wait(60)
        argv = ["select", "--embeddings", emb, "--ratio", "0.5", "--workdir", str(tmp_path / "w"), "--no-report"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run: pid {os.getpid()}" in err and "--wait" in err
        assert not (tmp_path / "w" / "scores.csv").exists()
    finally:
        release.set()
        t.join()
    assert main(argv + ["--wait", "30"]) == 0 and (tmp_path / "w" / "scores.csv").exists()


RACE = """
import sys, time, pathlib
sys.path.insert(0, sys.argv[3])
import clipsel_jax as cs
from test_select import noisy_clusters

x, y, text, _ = noisy_clusters(n_per=150, classes=4, dim=16, seed=5)
go = pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
try:
    cs.select_from_embeddings(x, y, text, 0.5, adapter=cs.AdaptConfig(epochs=8), workdir=sys.argv[1], chunk_steps=50)
    print("ok")
except cs.WorkdirBusy as e:
    print("busy", e)
"""


@pytest.mark.slow  # a subprocess
def test_two_concurrent_selections_in_one_workdir(tmp_path):
    """Started together on one workdir: one selects, the other is refused cleanly (before this lock the second died
    with FileNotFoundError on a checkpoint the first had removed)."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "work"), str(go), TESTS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.communicate()[1][-3000:]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = sorted(out.split()[0] for out, _ in outs)
    assert results == ["busy", "ok"], outs
    busy = next(out for out, _ in outs if out.startswith("busy"))
    winner = next(p for p, (out, _) in zip(procs, outs) if out.startswith("ok"))
    assert f"pid {winner.pid}" in busy


MULTI = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]))
from clipsel_jax.workdir_lock import WorkdirBusy, hold_workdir
def tell(answer):  # a file of its own: gloo writes to stdout, unbuffered, and can split a line there
    with open(sys.argv[4], "a") as f:
        f.write(answer + "\\n")
for wait in (False, True):
    try:
        with hold_workdir(sys.argv[3], wait=wait):
            tell("held")
    except WorkdirBusy as e:
        tell(f"busy {e.holder and e.holder['pid']}")
"""


def answers(files, n, procs, timeout=240.0) -> list[list[str]]:
    """The first `n` answers of each MULTI process, waiting up to `timeout` s; a process that dies or stays silent
    fails the test with its output, at once, rather than after some other timer has changed the situation."""
    start = time.monotonic()
    end = start + timeout
    while True:
        got = [f.read_text().split("\n")[:-1] if f.exists() else [] for f in files]  # whole lines only
        if all(len(g) >= n for g in got):
            return [g[:n] for g in got]
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > end:
            for p in procs:
                p.kill()
                p.wait()
            logs = [Path(f"{f}.log").read_text()[-3000:] for f in files]
            pytest.fail(f"after {time.monotonic() - start:.0f} s the answers are {got}; exit codes "
                        f"{[p.returncode for p in procs]}; output: {logs}")
        time.sleep(0.2)


@pytest.mark.slow
def test_all_processes_of_a_multi_process_run_agree(tmp_path):
    """Process 0 holds the lock for the run; when it is refused, every process is refused (rather than the others
    running on into a collective that never completes), and when it waits, they all wait."""
    from test_multihost import free_port

    holder = hold_in_another_process(tmp_path / "w", 3600)  # until it is killed below
    port = str(free_port())
    files = [tmp_path / f"answers{i}" for i in range(2)]
    logs = [open(f"{f}.log", "w") for f in files]
    procs = [subprocess.Popen([sys.executable, "-c", MULTI, str(i), port, str(tmp_path / "w"), str(f)],
                              stdout=log, stderr=subprocess.STDOUT) for i, (f, log) in enumerate(zip(files, logs))]
    try:
        busy = f"busy {holder.pid}"
        assert answers(files, 1, procs) == [[busy]] * 2
        time.sleep(1.0)  # both now wait (process 1 in the broadcast of process 0's answer): nothing more is told
        assert [f.read_text() for f in files] == [busy + "\n"] * 2
        holder.kill()  # the waiting second attempt now gets the lock, on process 0, for both
        got = answers(files, 2, procs)
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs + [holder]:
            p.kill()
            p.wait()
        for log in logs:
            log.close()
    assert got == [[busy, "held"]] * 2


# -------------------------------------------------------------------------------------------------------------
# Checksummed checkpoints


def flip_bytes(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(data)


def largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS), key=lambda p: p.stat().st_size)


def test_checkpointer_discards_a_damaged_step(tmp_path):
    ck = Checkpointer(tmp_path / "c")
    for step in (1, 2):
        ck.save(step, {"a": np.arange(1000.0) * step}, {"step": step})
    damaged = largest_file(tmp_path / "c" / "2")
    flip_bytes(damaged)
    ck = Checkpointer(tmp_path / "c")
    with pytest.warns(UserWarning, match=re.escape(str(damaged))):
        assert ck.latest_step() == 1
    assert not (tmp_path / "c" / "2").exists()
    state, meta = ck.restore()
    assert meta == {"step": 1} and state["a"][1] == 1.0
    ck.save(2, {"a": np.arange(1000.0) * 2}, {"step": 2})  # the stage is redone at the same step
    assert Checkpointer(tmp_path / "c").restore()[1] == {"step": 2}


@pytest.mark.parametrize("damage, resumed_from", [("largest file", 2), ("array data of every step", None),
                                                  ("no checksums", 2)])
def test_damaged_adapter_checkpoint_is_recomputed(tmp_path, damage, resumed_from):
    """16 bytes flipped in the largest file of the newest epoch's checkpoint, or in the array data of every kept
    epoch, or the newest one's checksums missing (as after a kill between orbax's commit and the checksum file): a
    warning names it, and training redoes the lost epochs from the previous good one (or from scratch) to the very
    adapters of an uninterrupted run."""
    x, y, t = unaligned(seed=1)
    cfg = AdaptConfig(epochs=4, lr=3e-3, batch_size=100)
    full, hist_full = train_adapters(x, y, t, cfg)
    # one checkpoint per epoch (checkpoint_every=0): epochs 2 and 3 are kept
    train_adapters(x, y, t, cfg, workdir=tmp_path, stop_after_epochs=3, checkpoint_every=0)
    steps = tmp_path / "adapters"
    expected = []
    for step in [steps / "3"] + ([steps / "2"] if resumed_from is None else []):
        if damage == "no checksums":
            (step / CHECKSUMS).unlink()
            expected.append(f"{step} is damaged and is discarded: it has no {CHECKSUMS}")
        else:
            f = largest_file(step / "state" / "d" if damage.startswith("array") else step)
            flip_bytes(f)
            expected.append(f"{f} does not match its recorded SHA-256")
    with pytest.warns(UserWarning) as record:
        resumed, hist = train_adapters(x, y, t, cfg, workdir=tmp_path, checkpoint_every=0)
    messages = [str(w.message) for w in record]
    for text in expected:
        assert any(text in m for m in messages), messages
    assert hist["resumed_from"] == resumed_from
    assert hist["loss"] == hist_full["loss"]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(full))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(p.name for p in steps.iterdir() if p.name.isdigit()) == ["3", "4"]


@pytest.mark.parametrize("loop", ["band", "full"])
def test_damaged_selection_checkpoint_is_recomputed(tmp_path, loop):
    """Stopped after the second chunk of selection steps, its checkpoint damaged: the rerun warns and starts the
    loop over, ending with the uninterrupted selection."""
    x, y, text, _ = noisy_clusters(sizes=[400, 400, 401], classes=3, seed=8)
    options = dict(adapter=None, selection=cs.SelectionConfig(loop=loop), chunk_steps=40)
    ref = cs.select_from_embeddings(x, y, text, 0.3, **options)
    with pytest.raises(selection.LoopStopped):
        cs.select_from_embeddings(x, y, text, 0.3, workdir=tmp_path, stop_after_chunks=2, **options)
    (step,) = [p for p in (tmp_path / f"selection{'_band' if loop == 'band' else ''}").iterdir() if p.name.isdigit()]
    assert step.name == "80"
    damaged = largest_file(step)
    flip_bytes(damaged)
    with pytest.warns(UserWarning, match=re.escape(str(damaged))):
        again = cs.select_from_embeddings(x, y, text, 0.3, workdir=tmp_path, **options)
    np.testing.assert_array_equal(again.mask, ref.mask)
    assert again.meta["optimiser"] == ref.meta["optimiser"]
