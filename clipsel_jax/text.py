"""CLIP tokenization with bounded sequence-length buckets."""

from __future__ import annotations

import numpy as np

from clipsel_jax.errors import CheckpointError


def load_tokenizer(spec: str):
    """A CLIP tokenizer from a folder (vocab.json + merges.txt or tokenizer.json) or a hub id (cached)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(spec))
    except Exception as e:  # transformers raises OSError/ValueError/HTTP errors for the same user mistake
        raise CheckpointError(
            f"could not load a CLIP tokenizer from {spec!r} ({type(e).__name__}: {e}). Give a folder with "
            "vocab.json and merges.txt (or tokenizer.json), e.g. one written by CLIPTokenizer.save_pretrained, "
            "or a hub id when this machine has network") from e


def length_bucket(n_tokens: int, max_length: int) -> int:
    """n_tokens rounded up to a multiple of 8, capped at the model's context length.

    The encoder compiles once per bucket, so short prompts do not pay for all 77 positions and a stream of batches
    compiles at most ceil(context / 8) text shapes. Padding after the end-of-text token changes nothing: attention
    is causal and pooling reads the end-of-text position.
    """
    return min(-(-max(n_tokens, 1) // 8) * 8, max_length)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (N, bucket) int32; texts longer than max_length tokens are truncated."""
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings, not one string; wrap it: [text]")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode_texts takes strings; items {bad[:10]} are not strings "
                        f"(first: {type(texts[bad[0]]).__name__})")
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    length = length_bucket(ids.shape[1], max_length)
    pad = length - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=tokenizer.pad_token_id)
    mask = np.pad(mask, ((0, 0), (0, pad)))
    return ids, mask


# The prompt of the authors' code; `class_prompts` fills it with each class name.
DEFAULT_TEMPLATE = "A photo of a {}."


def class_prompts(class_names: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' where the class name goes")
    return [template.format(name.replace("_", " ")) for name in class_names]


def readable_class_names(class_names: list[str], mapping_file: str) -> list[str]:
    """Prompt-friendly names for classes stored under ids (ImageNet / Tiny-ImageNet WordNet ids such as n01443537).

    mapping_file: a path (or ARCHIVE.zip:inner/path) to a JSON list (one name per class, in label order), a JSON object {stored name: readable name}, or a
    text file of "key<whitespace>name[, synonym, ...]" lines (Tiny-ImageNet's words.txt, ImageNet's
    LOC_synset_mapping.txt): the first synonym is used. Every class must be covered.
    """
    import json
    from pathlib import Path

    if ".zip:" in str(mapping_file):  # a file inside a zip, e.g. tiny-imagenet-200.zip:tiny-imagenet-200/words.txt
        import zipfile

        archive, inner = str(mapping_file).split(".zip:", 1)
        try:
            with zipfile.ZipFile(archive + ".zip") as zf:
                text = zf.read(inner).decode("utf-8")
        except (FileNotFoundError, KeyError, zipfile.BadZipFile) as e:
            raise FileNotFoundError(f"class-name file {mapping_file!r} cannot be read: {e}") from None
    else:
        path = Path(mapping_file)
        if not path.is_file():
            raise FileNotFoundError(f"class-name file {mapping_file!r} does not exist")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = {}
        for line in text.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                data[parts[0]] = parts[1].split(",")[0].strip()
    if isinstance(data, list):
        if len(data) != len(class_names):
            raise ValueError(f"{mapping_file}: {len(data)} names for {len(class_names)} classes; give one per class "
                             "in label order (classes sorted by folder name)")
        return [str(n) for n in data]
    if not isinstance(data, dict):
        raise ValueError(f"{mapping_file}: expected a JSON list or object, or 'key name' lines")
    missing = [c for c in class_names if c not in data]
    if missing:
        raise ValueError(f"{mapping_file} has no name for {len(missing)} of the {len(class_names)} classes "
                         f"(e.g. {missing[:3]})")
    return [str(data[c]) for c in class_names]
