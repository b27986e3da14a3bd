"""Workdirs on object stores (clipsel_jax.storage), tested on fsspec's in-memory file system: the same code path
as gs:// (fsspec URLs, one object per file, no rename), offline."""

import importlib.util
import json
import zipfile

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

import clipsel_jax as cs
from clipsel_jax import selection, storage, subset
from clipsel_jax.cli import main
from synthetic import noisy_clusters


@pytest.fixture(autouse=True)
def mirrors(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEL_MIRROR_DIR", str(tmp_path / "mirrors"))
    return tmp_path / "mirrors"


def bucket(tmp_path):
    return f"memory://{tmp_path.name}"


def remote_files(url):
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root):].lstrip("/") for p in fs.find(root)}


class RecordingMemoryFS(MemoryFileSystem):
    """The in-memory file system, recording the order of uploads and deletions."""

    protocol = "recmem"
    log = []

    def put_file(self, lpath, rpath, *args, **kwargs):
        type(self).log.append(("put", rpath.rsplit("/", 1)[-1]))
        return super().put_file(lpath, rpath, *args, **kwargs)

    def rm_file(self, path):
        type(self).log.append(("rm", path.rsplit("/", 1)[-1]))
        return super().rm_file(path)


fsspec.register_implementation("recmem", RecordingMemoryFS, clobber=True)


def test_mirror_uploads_vouching_files_last_and_deletes_them_first(tmp_path):
    url = f"recmem://{tmp_path.name}/run"
    m = storage.Mirror(url)
    m.pull()
    cache = m.local / "embeddings" / "k"
    cache.mkdir(parents=True)
    for name in ("manifest.json", "chunk_000000.npz", "chunk_000001.npz", "zz.npz"):
        (cache / name).write_bytes(name.encode())
    (cache / ".chunk_000002.npz.host.1.tmp").write_bytes(b"half")  # being written: never uploaded
    (m.local / ".clipsel.lock").write_text("me")  # this host's lock: never uploaded
    RecordingMemoryFS.log.clear()
    assert m.push() == {"uploaded": 4, "deleted": 0}
    assert [name for _, name in RecordingMemoryFS.log][-1] == "manifest.json"
    assert remote_files(url) == {f"embeddings/k/{n}" for n in ("manifest.json", "chunk_000000.npz",
                                                               "chunk_000001.npz", "zz.npz")}
    assert m.push() == {"uploaded": 0, "deleted": 0}  # nothing changed
    RecordingMemoryFS.log.clear()
    for p in cache.iterdir():
        p.unlink()
    assert m.push()["deleted"] == 4
    assert RecordingMemoryFS.log[0] == ("rm", "manifest.json")


def test_pull_makes_the_mirror_equal_to_the_bucket(tmp_path, mirrors):
    url = f"{bucket(tmp_path)}/run"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe({f"{root}/a.txt": b"one", f"{root}/sub/b.txt": b"two"})
    m = storage.Mirror(url)
    assert m.pull()["fetched"] == 2
    assert (m.local / "sub" / "b.txt").read_bytes() == b"two"
    assert m.pull()["fetched"] == 0  # in step
    fs.pipe({f"{root}/a.txt": b"changed elsewhere"})  # another VM's run
    (m.local / "stale.txt").write_text("left by a killed run, never uploaded")
    assert m.pull() == {"fetched": 1, "removed": 1, "files": 2}
    assert (m.local / "a.txt").read_bytes() == b"changed elsewhere" and not (m.local / "stale.txt").exists()
    assert str(m.local).startswith(str(mirrors))


def test_unavailable_scheme_says_what_to_install():
    if importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ValueError, match="gcsfs"):
        storage.Mirror("gs://some-bucket/run")


def test_selection_resumes_from_the_bucket_alone(tmp_path):
    """Stopped after two chunks with a memory:// workdir, its local mirror then deleted (the VM is gone): a rerun
    pulls the checkpoint from the bucket and resumes after step 80, with the uninterrupted result."""
    url = f"{bucket(tmp_path)}/sel"
    x, y, text, _ = noisy_clusters(sizes=[400, 400, 401], classes=3, seed=8)
    options = dict(adapter=None, selection=cs.SelectionConfig(loop="full"), chunk_steps=40)
    ref = cs.select_from_embeddings(x, y, text, 0.3, **options)
    with pytest.raises(selection.LoopStopped):
        cs.select_from_embeddings(x, y, text, 0.3, workdir=url, stop_after_chunks=2, **options)
    assert "selection/80/checksums.json" in remote_files(url)
    storage.reset_mirror(url)
    again = cs.select_from_embeddings(x, y, text, 0.3, workdir=url, **options)
    assert again.meta["optimiser"] == {**ref.meta["optimiser"], "resumed_from": 80}
    np.testing.assert_array_equal(again.mask, ref.mask)
    assert any(f.startswith("selection_final/0/") for f in remote_files(url))


def make_images(root):
    rng = np.random.default_rng(3)
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_cli_on_a_bucket_workdir(tmp_path, tiny_clip_folder, capsys):
    """select, report, export and the stage commands with gs://-style URLs (memory://): every output lands in the
    bucket, a rerun after the local mirror is gone reuses the bucket's embedding cache, and a damaged chunk in the
    bucket is caught by its checksum and recomputed."""
    images = make_images(tmp_path / "images")
    url = f"{bucket(tmp_path)}/run"
    common = ["--encoder", str(tiny_clip_folder), "--adapter", "none", "--quiet", "--no-report"]
    assert main(["select", "--data", str(images), "--workdir", url, "--ratio", "0.5", *common]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["workdir"] == url and out["kept"] == 8
    files = remote_files(url)
    assert {"selection.npz", "scores.csv", "meta.json"} <= files
    chunks = sorted(f for f in files if f.startswith("embeddings/") and "chunk_" in f)
    assert chunks and any(f.endswith("manifest.json") for f in files)
    kept = subset.load_kept(url)  # read through a mirror
    assert len(kept) == 8

    # another VM: no local mirror; one chunk in the bucket damaged
    storage.reset_mirror(url)
    fs, root = fsspec.core.url_to_fs(url)
    data = bytearray(fs.cat_file(f"{root}/{chunks[0]}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{root}/{chunks[0]}", bytes(data))
    with pytest.warns(UserWarning):
        assert main(["select", "--data", str(images), "--workdir", url, "--ratio", "0.5", *common]) == 0
    capsys.readouterr()
    assert subset.load_kept(url).fingerprint == kept.fingerprint
    assert fs.cat_file(f"{root}/{chunks[0]}") != bytes(data)  # recomputed and uploaded again

    assert main(["report", "--workdir", url]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == url + "/report.html"
    assert "report.html" in remote_files(url)
    assert main(["export", "--workdir", url, "--list", f"{url}_kept.csv", "--to", f"{url}_subset", "--quiet"]) == 0
    capsys.readouterr()
    assert fs.cat_file(f"{root}_kept.csv").decode().startswith("id,path,label")
    assert len([f for f in remote_files(f"{url}_subset") if f.endswith(".png")]) == 8

    # embed --out / select --embeddings / score --out with URLs
    assert main(["embed", "--data", str(images), "--encoder", str(tiny_clip_folder), "--out", f"{url}/e.npz",
                 "--quiet"]) == 0
    assert main(["score", "--embeddings", f"{url}/e.npz", "--out", f"{url}/s.csv"]) == 0
    assert {"e.npz", "s.csv", "s.npz"} <= remote_files(url)
    capsys.readouterr()
    assert main(["select", "--embeddings", f"{url}/e.npz", "--workdir", f"{url}2", "--ratio", "0.5",
                 "--adapter", "none", "--quiet", "--no-report"]) == 0
    assert main(["select", "--embeddings", f"{url}/missing.npz", "--workdir", f"{url}3", "--ratio", "0.5"]) == 2
    assert main(["bench", "--data", str(images), "--workdir", f"{url}4"]) == 2


def test_a_bucket_workdir_refuses_several_processes(tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)  # the multi-host case; its hosts would need one folder
    with pytest.raises(ValueError, match="mount the bucket on every host"):
        with storage.synced(f"{bucket(tmp_path)}/run"):
            pass


def test_objects_with_unsafe_names_are_never_written_outside_the_mirror(tmp_path):
    url = f"{bucket(tmp_path)}/run"
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe({f"{root}/ok.txt": b"fine", f"{root}/sub/../../escape.txt": b"evil", f"{root}/a\\b.txt": b"odd"})
    m = storage.Mirror(url)
    with pytest.warns(UserWarning, match="unsafe name"):
        m.pull()
    assert sorted(p.name for p in m.local.rglob("*") if p.is_file()) == [".clipsel_sync.json", "ok.txt"]
    assert not (m.local.parent / "escape.txt").exists()


def test_a_zip_in_a_bucket_is_a_data_source(tmp_path, tiny_clip_folder, capsys):
    """--data memory://.../set.zip:images: copied once to a local cache, recorded and listed by its URL, and named
    by its URL in the embedding cache's key, so that a fresh copy (another machine) reuses the embeddings."""
    images = make_images(tmp_path / "images")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        for p in sorted(images.rglob("*.png")):
            zf.write(p, p.relative_to(tmp_path).as_posix())
    url = f"{bucket(tmp_path)}/data/set.zip"
    storage.put_file(tmp_path / "set.zip", url)
    work = tmp_path / "work"
    argv = ["select", "--data", f"{url}:images", "--workdir", str(work), "--ratio", "0.5", "--encoder",
            str(tiny_clip_folder), "--adapter", "none", "--quiet", "--no-report"]
    assert main(argv) == 0
    keys = sorted(p.name for p in (work / "embeddings").iterdir())
    assert main(["export", "--workdir", str(work), "--list", str(tmp_path / "kept.txt")]) == 0
    assert (tmp_path / "kept.txt").read_text().splitlines()[0].startswith(f"{url}:images/ant/")
    storage.reset_mirror(url)  # the local copy is gone (another machine): downloaded again, same cache key
    assert main(argv) == 0
    assert sorted(p.name for p in (work / "embeddings").iterdir()) == keys
    capsys.readouterr()
    assert main([*argv[:2], f"{bucket(tmp_path)}/data/images", *argv[3:]]) == 2
    assert "read from a zip" in capsys.readouterr().err
    assert main([*argv[:2], f"{bucket(tmp_path)}/data/missing.zip", *argv[3:]]) == 2


class FailingMemoryFS(MemoryFileSystem):
    """The in-memory file system with uploads that fail (a network outage)."""

    protocol = "failmem"

    def put_file(self, lpath, rpath, *args, **kwargs):
        raise ConnectionError("network is unreachable")


fsspec.register_implementation("failmem", FailingMemoryFS, clobber=True)


def test_an_upload_failure_never_hides_why_a_run_stopped(tmp_path):
    url = f"failmem://{tmp_path.name}/run"
    with pytest.raises(KeyError, match="the run's own error"), pytest.warns(UserWarning, match="unreachable"):
        with storage.synced(url) as local:
            (local / "a.txt").write_text("work")
            raise KeyError("the run's own error")
    with pytest.raises(ConnectionError):  # a run that finished but could not upload its outputs fails
        with storage.synced(url) as local:
            (local / "a.txt").write_text("work")


def test_a_scheme_without_its_package_is_a_clear_error_everywhere(tmp_path, capsys):
    if importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed here")
    (tmp_path / "f.txt").write_text("x")
    for call in (lambda: storage.put_file(tmp_path / "f.txt", "gs://b/f.txt"),
                 lambda: storage.local_copy("gs://b/s.zip")):
        with pytest.raises(ValueError, match="pip install gcsfs"):
            call()
    assert main(["score", "--embeddings", "gs://b/e.npz"]) == 2
    assert "pip install gcsfs" in capsys.readouterr().err
