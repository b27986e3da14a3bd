"""The torch-free reader of torch.save files, against torch itself, in both of torch's formats."""

import collections
import pickle

import numpy as np
import pytest

from clipsel_jax import torchfile
from clipsel_jax.weights import CheckpointError, read_state_dict

torch = pytest.importorskip("torch")


def state_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return collections.OrderedDict(
        w=base, t=base.t(), view=base[1:3, ::2],  # shared storage, transposed and strided views
        h=torch.randn(3).half(), bf=torch.randn(5).bfloat16(), d=torch.randn(2, 2).double(),
        i=torch.tensor(7), s=torch.tensor(2.5), b=torch.tensor([True, False]), p=torch.nn.Parameter(torch.ones(2)),
        e=torch.zeros(0, 3), nested={"x": [torch.ones(1)], "step": 3})


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_saves(tmp_path, zip_format):
    sd = state_dict()
    f = tmp_path / "sd.pt"
    torch.save(sd, f, _use_new_zipfile_serialization=zip_format)
    got = torchfile.load(f)
    assert list(got) == list(sd) and isinstance(got, collections.OrderedDict)
    for k, v in sd.items():
        if k == "nested":
            np.testing.assert_array_equal(got[k]["x"][0], v["x"][0].numpy())
            assert got[k]["step"] == 3
            continue
        want = v.detach().float().numpy() if k == "bf" else v.detach().numpy()
        have = got[k].astype(np.float32) if k == "bf" else got[k]
        assert isinstance(have, np.ndarray) and have.shape == want.shape and have.dtype == want.dtype
        np.testing.assert_array_equal(have, want)


def test_state_dict_files_need_no_torch(tmp_path, monkeypatch):
    f = tmp_path / "pytorch_model.bin"
    torch.save({"module.a": torch.randn(3, 2), "b": torch.tensor([1, 2])}, f)
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # read_state_dict must not import torch for a plain pickle
    sd = read_state_dict(f)
    assert set(sd) == {"a", "b"} and sd["b"].dtype == np.float32


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_other_objects_and_bad_files(tmp_path, capsys):
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Evil()}, f, _use_new_zipfile_serialization=False)
    with pytest.raises(torchfile.UnsupportedPickle, match=r"holds \w+\.print, which is not part of a plain state dict"):
        torchfile.load(f)
    assert "must never run" not in capsys.readouterr().out
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(torchfile.UnsupportedPickle, match="magic number"):
        torchfile.load(plain)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(torchfile.UnsupportedPickle, match="truncated"):
        torchfile.load(cut)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(cut)
