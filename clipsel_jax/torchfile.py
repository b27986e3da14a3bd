"""Reading PyTorch pickles (``torch.save`` files: ``.pth``, ``.pt``, ``.bin``) as numpy arrays, without torch.

Both formats torch writes: the zip archive (torch >= 1.6: ``<name>/data.pkl`` plus one file per storage) and the
legacy stream (magic number, protocol, system info, the pickle, the storage keys, then the raw storages in order).
Every pickle of a file goes through one restricted unpickler: the legacy header pickles may hold plain values only,
the main pickle only the classes a state dict needs (tensors, parameters, OrderedDict and plain containers); anything
else raises ``UnsupportedPickle``, like ``torch.load(weights_only=True)``: loading a checkpoint never runs arbitrary
code. Storages must hold exactly the bytes they declare and every tensor must lie inside its storage; a file where
they do not raises ``CorruptCheckpoint`` (naming the tensor) instead of reading memory outside the file's data.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64,
    "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}
_INT64_MAX = 2**63 - 1  # torch keeps sizes, strides and offsets as int64


class UnsupportedPickle(pickle.UnpicklingError):
    """The file holds objects other than tensors and plain containers (or is not a torch pickle at all)."""


class CorruptCheckpoint(UnsupportedPickle):
    """A torch file whose tensors do not fit their storages or whose storages lack their bytes: damaged or hostile.
    Unlike its base class, no other reader (torch included) should be tried on it."""


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
    """The arguments of torch's ``_rebuild_tensor`` as the pickle gave them, checked against the storage before
    any of its memory is read (``as_strided`` itself checks nothing)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def _check(self, name: str) -> None:
        def ints(xs):
            return isinstance(xs, (tuple, list)) and all(type(x) is int and 0 <= x <= _INT64_MAX for x in xs)

        st, offset, size, stride = self.storage, self.offset, self.size, self.stride
        where = f"tensor {name!r} (size {size!r:.80}, stride {stride!r:.80}, offset {offset!r:.40})"
        if not isinstance(st, _Storage):
            raise CorruptCheckpoint(f"{where} has a {type(st).__name__} as its storage")
        if not (ints(size) and ints(stride) and len(size) == len(stride) <= 64 and ints([offset])):
            raise CorruptCheckpoint(f"{where}: size and stride must be equally long tuples of non-negative ints")
        if 0 in size:  # an empty tensor reads nothing (torch does not check its offset either)
            return
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.numel:
            raise CorruptCheckpoint(f"{where} reaches element {last} of a storage of {st.numel} elements")
        if math.prod(size) * st.dtype.itemsize > _INT64_MAX:  # repeated elements (zero or overlapping strides)
            raise CorruptCheckpoint(f"{where} is too large to hold in memory")

    def numpy(self, name: str) -> np.ndarray:
        self._check(name)
        flat = self.storage.array
        if not self.size:
            return np.array(flat[self.offset])  # 0-d array, not a numpy scalar
        if 0 in self.size:
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
    """The one unpickler for every pickle in a file. Given ``storages`` (the main pickle) it allows what a state
    dict needs; without (the legacy header pickles) no class, function or storage at all: plain values only."""

    def __init__(self, f, storages: dict | None = None):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if self.storages is not None:
            if (module, name) in _ALLOWED:
                return _ALLOWED[(module, name)]
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name)
            raise UnsupportedPickle(f"the pickle holds {module}.{name}, which is not part of a plain state dict")
        raise UnsupportedPickle(f"a header pickle holds {module}.{name}; torch.save headers hold plain values only")

    def persistent_load(self, pid):
        if self.storages is None or not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsupportedPickle(f"unknown persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise UnsupportedPickle(f"storage of unknown type {storage_type!r:.80}")
        if len(pid) > 5 and pid[5] is not None:  # legacy storage views: (view_key, offset, size) into a root storage
            raise UnsupportedPickle("storage views (files from torch < 0.4) are not supported")
        if type(key) not in (str, int) or type(numel) is not int or not 0 <= numel <= _INT64_MAX:
            raise CorruptCheckpoint(f"storage {key!r:.80} has an invalid key or element count {numel!r:.40}")
        st = self.storages.setdefault(str(key), _Storage(storage_type.dtype, numel))
        if (st.dtype, st.numel) != (storage_type.dtype, numel):
            raise CorruptCheckpoint(f"storage {key} is declared twice, with different types or sizes")
        return st


def _fill(st: _Storage, key: str, data: bytes, order: str) -> None:
    """Give a storage its bytes: exactly as many as it declares, or tensors would read past them."""
    if len(data) != st.numel * st.dtype.itemsize:
        raise CorruptCheckpoint(f"storage {key} declares {st.numel} elements ({st.numel * st.dtype.itemsize} bytes) "
                                f"but the file holds {len(data)} bytes for it (truncated or tampered)")
    st.array = np.frombuffer(data, st.dtype.newbyteorder(order), st.numel)


def _materialize(obj, name: str = ""):
    if isinstance(obj, _Tensor):
        return obj.numpy(name or "<root>")
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, f"{name}.{k}" if name else str(k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, f"{name}[{i}]") for i, v in enumerate(obj))
    return obj


def _read_zip(path: Path, storages: dict):
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkl = sorted(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        if not pkl:
            raise UnsupportedPickle(f"{path} is a zip archive without data.pkl (TorchScript or not torch)")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
        for key, st in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise CorruptCheckpoint(f"{path}: storage {key} is missing from the archive (no {member})")
            if zf.getinfo(member).file_size != st.numel * st.dtype.itemsize:  # before reading a huge member
                raise CorruptCheckpoint(f"{path}: storage {key} declares {st.numel} elements but {member} holds "
                                        f"{zf.getinfo(member).file_size} bytes (truncated or tampered)")
            _fill(st, key, zf.read(member), ">" if big_endian else "<")
    return obj


def _header(f, path: Path, what: str, kind: type):
    value = _Unpickler(f).load()
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UnsupportedPickle(f"{path}: the {what} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _read_legacy(path: Path, storages: dict):
    with open(path, "rb") as f:
        try:
            magic = _Unpickler(f).load()
        except UnsupportedPickle:
            raise
        except Exception as e:  # any other first bytes: not a pickle, so not a torch file
            raise UnsupportedPickle(f"{path} is not a PyTorch file ({type(e).__name__}: {e})") from None
        if type(magic) is not int or magic != LEGACY_MAGIC:
            raise UnsupportedPickle(f"{path} is not a PyTorch file (no torch.save magic number)")
        if _header(f, path, "protocol version", int) != LEGACY_PROTOCOL:
            raise UnsupportedPickle(f"{path}: unknown torch.save protocol version")
        sys_info = _header(f, path, "system info", dict)
        order = "<" if sys_info.get("little_endian", True) else ">"
        obj = _Unpickler(f, storages).load()
        keys = _header(f, path, "storage key list", list)
        if not all(type(k) in (str, int) for k in keys) or sorted(map(str, keys)) != sorted(storages):
            raise CorruptCheckpoint(f"{path}: the storage key list does not match the storages of the pickle")
        left = path.stat().st_size - f.tell()
        for key in map(str, keys):
            st = storages[key]
            numel = struct.unpack(order + "q", f.read(8))[0] if left >= 8 else -1
            nbytes = st.numel * st.dtype.itemsize
            if numel != st.numel or nbytes > left - 8:  # checked before reading: numel is the file's to choose
                raise CorruptCheckpoint(f"{path} is truncated or tampered: storage {key} declares {st.numel} "
                                        f"elements, its data {numel} elements, and {max(left - 8, 0)} bytes remain")
            _fill(st, key, f.read(nbytes), order)
            left -= 8 + nbytes
    return obj


def load(path: str | Path):
    """The object saved with torch.save (a state dict, possibly nested), with every tensor as a numpy array.

    Raises UnsupportedPickle for objects other than tensors and plain containers (torch's weights_only loader may
    still read them) and its subclass CorruptCheckpoint for a damaged or hostile file."""
    path = Path(path)
    storages: dict[str, _Storage] = {}
    try:
        obj = _read_zip(path, storages) if zipfile.is_zipfile(path) else _read_legacy(path, storages)
        return _materialize(obj)
    except UnsupportedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, struct.error, zipfile.BadZipFile, RecursionError) as e:  # a malformed pickle or archive
        raise CorruptCheckpoint(f"{path} is not a readable PyTorch file ({type(e).__name__}: {e})") from e
