"""Content hashes used for checksums in cards, indexes and shard records."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, fs=None) -> str:
    """sha256 of a file's bytes; `fs` is an optional fsspec filesystem for remote paths."""
    digest = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
