"""SHA-256 of files (standard library only): checksums of cache chunks, checkpoint steps and packaged weights."""

from __future__ import annotations

import hashlib


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
