"""Test setup: four fake CPU devices (set before jax is imported) so sharding runs in every test session."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from clip_fixtures import TINY, make_clip_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(folder, torch CLIPModel, tokenizer, image processor) for a tiny random CLIP with QuickGELU."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    return (folder, *make_clip_folder(folder, TINY, act="quick_gelu"))


@pytest.fixture(scope="session")
def clip_folder_factory(tmp_path_factory):
    """Builds (and caches) random CLIP folders keyed by their options."""
    made = {}

    def make(shapes=TINY, **kw):
        key = (id(shapes), repr(sorted(kw.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp("clip")
            made[key] = (folder, *make_clip_folder(folder, shapes, **kw))
        return made[key]

    return make
