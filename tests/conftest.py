"""Test setup: four fake CPU devices (set before jax is imported) so sharding runs in every test session."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One compilation cache for the session and the subprocesses it starts: many tests compile the same small programs
# (an adapter step, an SDS tile, a training step) from fresh closures, which jit's in-memory cache never reuses.
# Each entry is keyed by the program's HLO and the compile options, so a hit is the same executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    _cache = tempfile.mkdtemp(prefix="clipsel_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import importlib.util  # noqa: E402

# CUDA builds of torch ship triton, whose bundled LLVM clashes with TensorFlow's when TensorFlow is loaded first:
# the later `import triton` (torch._dynamo, pulled in by transformers) segfaults. The suite imports both (the
# TFRecord reader's tests and the parity tests), so triton goes first. CPU builds of torch have no triton.
if importlib.util.find_spec("triton") and importlib.util.find_spec("tensorflow"):
    importlib.import_module("triton")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from clip_fixtures import TINY, make_clip_folder, make_clip_folder_without_torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(folder, torch CLIPModel, tokenizer, image processor) for a tiny random CLIP with QuickGELU (needs torch:
    the parity tests; tiny_clip_folder is the same model's layout without torch)."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("tiny_clip")
    return (folder, *make_clip_folder(folder, TINY, act="quick_gelu"))


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A tiny random CLIP folder (save_pretrained layout) made without torch: for every test that runs the
    pipeline rather than comparing with PyTorch."""
    return make_clip_folder_without_torch(tmp_path_factory.mktemp("tiny_clip_np"), TINY)


@pytest.fixture(scope="session")
def clip_folder_factory(tmp_path_factory):
    """Builds (and caches) random CLIP folders keyed by their options, with the torch model (the parity tests)."""
    made = {}

    def make(shapes=TINY, **kw):
        pytest.importorskip("torch")
        key = (id(shapes), repr(sorted(kw.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp("clip")
            made[key] = (folder, *make_clip_folder(folder, shapes, **kw))
        return made[key]

    return make


@pytest.fixture(scope="session")
def np_clip_folder_factory(tmp_path_factory):
    """Random tiny CLIP folders made without torch, one per seed (other weights, same layout)."""
    made = {}

    def make(seed=0):
        if seed not in made:
            made[seed] = make_clip_folder_without_torch(tmp_path_factory.mktemp("clip_np"), TINY, seed=seed)
        return made[seed]

    return make


@pytest.fixture
def folder(tmp_path):
    """Two classes of small images of several kinds, plus an empty, a truncated and a non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "cat" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(root / "dog" / "deep.png")
    Image.new("CMYK", (16, 16), (10, 20, 30, 40)).save(root / "dog" / "cmyk.jpg")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    data = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "dog" / "notes.txt").write_text("not an image")  # not an image suffix: not listed
    return root
