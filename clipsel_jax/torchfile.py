"""Reading PyTorch pickles (``torch.save`` files: ``.pth``, ``.pt``, ``.bin``) as numpy arrays, without torch.

Both formats torch writes: the zip archive (torch >= 1.6: ``<name>/data.pkl`` plus one file per storage) and the
legacy stream (magic number, protocol, system info, the pickle, then the raw storages in order). Only the classes a
state dict needs are allowed (tensors, parameters, OrderedDict and plain containers); anything else raises
``UnsupportedPickle``, like ``torch.load(weights_only=True)``: loading a checkpoint never runs arbitrary code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}


class UnsupportedPickle(pickle.UnpicklingError):
    """The file holds objects other than tensors and plain containers (or is not a torch pickle at all)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        dt = _STORAGE_DTYPES[name]
        if dt == "bfloat16":
            import ml_dtypes

            dt = ml_dtypes.bfloat16
        self.dtype = np.dtype(dt)


class _Storage:
    """A storage whose bytes are read after the pickle (legacy) or from its own archive member (zip)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        flat = self.storage.array
        if not self.size:
            return np.array(flat[self.offset])  # 0-d array, not a numpy scalar
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, flat.dtype)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size, [s * item for s in self.stride])
        return np.array(view)  # a copy: storages may be shared between tensors


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, storages: dict):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsupportedPickle(f"the pickle holds {module}.{name}, which is not part of a plain state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsupportedPickle(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise UnsupportedPickle(f"untyped storage {storage_type!r:.80}")
        view = pid[5] if len(pid) > 5 else None
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, numel)
        if view is not None:  # legacy storage views: (view_key, offset, size) into the root storage
            raise UnsupportedPickle("storage views (files from torch < 0.4) are not supported")
        return self.storages[key]


def _materialize(obj):
    if isinstance(obj, _Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def load(path: str | Path):
    """The object saved with torch.save (a state dict, possibly nested), with every tensor as a numpy array."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise UnsupportedPickle(f"{path} is a zip archive without data.pkl (TorchScript or not torch)")
            prefix = pkl[0][: -len("data.pkl")]
            big_endian = zf.read(prefix + "byteorder").strip() == b"big" if prefix + "byteorder" in names else False
            obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
            for key, st in storages.items():
                raw = zf.read(f"{prefix}data/{key}")
                st.array = np.frombuffer(raw, st.dtype.newbyteorder(">" if big_endian else "<"), st.numel)
    else:
        with open(path, "rb") as f:
            try:
                magic = pickle.load(f)
            except Exception as e:
                raise UnsupportedPickle(f"{path} is not a PyTorch file ({type(e).__name__}: {e})") from None
            if magic != LEGACY_MAGIC:
                raise UnsupportedPickle(f"{path} is not a PyTorch file (no torch.save magic number)")
            pickle.load(f)  # protocol version
            sys_info = pickle.load(f)
            order = "<" if sys_info.get("little_endian", True) else ">"
            obj = _Unpickler(f, storages).load()
            keys = pickle.load(f)
            for key in keys:
                st = storages[str(key)]
                (numel,) = struct.unpack(order + "q", f.read(8))
                data = f.read(numel * st.dtype.itemsize)
                if len(data) != numel * st.dtype.itemsize:
                    raise UnsupportedPickle(f"{path} is truncated (storage {key} is incomplete)")
                st.array = np.frombuffer(data, st.dtype.newbyteorder(order), numel)
    return _materialize(obj)
