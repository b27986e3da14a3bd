"""Two processes on this CPU (localhost coordinator, gloo collectives) give the single-process result."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipsel_jax as cs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two(commands, envs=(None, None), timeout=300) -> list[str]:
    """Start both processes, wait for both; their combined output, each asserted to have exited 0."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


pytestmark = pytest.mark.slow  # two JAX processes each: ~100 s


def test_two_process_embedding_matches_one(tmp_path, np_clip_folder_factory):
    model = str(np_clip_folder_factory())
    port = str(free_port())
    worker = Path(__file__).with_name("multihost_worker.py")
    run_two([[sys.executable, str(worker), str(i), port, str(tmp_path), model] for i in range(2)], timeout=240)
    info = [json.loads((tmp_path / f"info{i}.json").read_text()) for i in range(2)]
    assert info[0]["processes"] == 2 and info[0]["devices"] == 4
    # Each process read only its own half of every batch; together, every sample once.
    r0, r1 = set(info[0]["reads"]), set(info[1]["reads"])
    assert not r0 & r1 and r0 | r1 == set(range(23))
    assert [u["id"] for u in info[0]["unreadable"]] == [7] == [u["id"] for u in info[1]["unreadable"]]
    assert "zero size" in info[1]["unreadable"][0]["reason"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 20, 26, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 23)
    keep = [i for i in range(23) if i != 7]
    enc = cs.load_encoder(model, batch_size=8)
    for i in range(2):
        z = np.load(tmp_path / f"emb{i}.npz")
        np.testing.assert_array_equal(z["ids"], keep)
        np.testing.assert_array_equal(z["labels"], labels[keep])
        np.testing.assert_allclose(z["image_emb"], enc.encode_images(images[keep]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z["text"], enc.encode_texts(["A photo of a a.", "A photo of a b.",
                                                                "A photo of a c."]), rtol=1e-5, atol=1e-5)


def test_two_process_select_matches_one(tmp_path, folder, tiny_clip_folder):
    """`clipsel select` as 2 processes x 2 CPU devices (joined through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, one shared workdir, as on a pod with a shared disk) writes exactly the mask of one process."""
    import os
    import warnings

    from clipsel_jax.cli import main

    args = ["select", "--encoder", str(tiny_clip_folder), "--data", str(folder), "--ratio", "0.5",
            "--adapter-epochs", "3", "--adapter-batch", "4", "--quiet"]
    port = str(free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "clipsel_jax.cli", *args, "--workdir", str(tmp_path / "multi")]
    logs = run_two([cmd, cmd], [{**env, "JAX_PROCESS_ID": str(i)} for i in range(2)])
    assert '"kept": 5' in logs[0] and '"kept"' not in logs[1]  # process 0 reports and writes the outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--workdir", str(tmp_path / "single")]) == 0
    multi, single = np.load(tmp_path / "multi" / "selection.npz"), np.load(tmp_path / "single" / "selection.npz")
    np.testing.assert_array_equal(multi["mask"], single["mask"])
    np.testing.assert_array_equal(multi["ids"], single["ids"])
    for key in ("sas", "sds", "combined"):
        np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert (tmp_path / "multi" / "report.html").is_file()
