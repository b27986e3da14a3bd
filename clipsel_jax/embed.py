"""Embedding a labeled image source: image features for every readable sample, one text feature per class.

Unreadable images are recorded (id, path, reason), excluded, and counted in a warning, never silently dropped.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from clipsel_jax.data.sources import UnreadableImage
from clipsel_jax.text import DEFAULT_TEMPLATE, class_prompts


@dataclass
class Embeddings:
    image_emb: np.ndarray  # float32 (N, D_image), one row per readable sample
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # int64 (N,) stable sample ids of the source
    text_emb: np.ndarray  # float32 (C, D_text), one row per class
    class_names: list[str]
    prompts: list[str]
    unreadable: list[dict] = field(default_factory=list)  # {"id", "path", "reason"}

    def save(self, path) -> None:
        np.savez(path, image_emb=self.image_emb, labels=self.labels, ids=self.ids, text_emb=self.text_emb,
                 class_names=np.array(self.class_names), prompts=np.array(self.prompts),
                 unreadable_ids=np.array([u["id"] for u in self.unreadable], np.int64))


def embed(source, encoder, template: str = DEFAULT_TEMPLATE, batch_size: int = 256, limit: int | None = None,
          progress: bool = True) -> Embeddings:
    """Encode every image of `source` (decoded in a thread pool) and one prompt per class."""
    n = len(source) if limit is None else min(limit, len(source))
    feats, keep, unreadable = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="embedding", unit="img")

    def read(i):
        try:
            return source.read(i)
        except UnreadableImage as e:
            return e

    with ThreadPoolExecutor(8) as pool:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            images = []
            for i, img in zip(idx, pool.map(read, idx)):
                if isinstance(img, UnreadableImage):
                    unreadable.append({"id": int(source.ids[i]), "path": source.describe(i), "reason": str(img)})
                else:
                    images.append(img)
                    keep.append(i)
            if images:
                feats.append(encoder.encode_images(images))
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    if unreadable:
        warnings.warn(f"{len(unreadable)} of {n} images could not be read and are excluded "
                      f"(first: {unreadable[0]['path']}: {unreadable[0]['reason']})", stacklevel=2)
    keep = np.asarray(keep, np.int64)
    prompts = class_prompts(source.class_names, template)
    return Embeddings(np.concatenate(feats) if feats else np.zeros((0, encoder.image_dim), np.float32),
                      source.labels[keep], source.ids[keep], encoder.encode_texts(prompts), list(source.class_names),
                      prompts, unreadable)
