"""Atomic, byte-deterministic file writes: write a temporary sibling, then rename it over the target.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def tmp_sibling(path: Path) -> Path:
    """The temporary name used while `path` is being written (hidden, tagged with the writer's pid)."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` never holds a partial file."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_bytes(obj) -> bytes:
    """Canonical JSON: sorted keys, indent 2, UTF-8, trailing newline, so equal objects give equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json_atomic(path: str | Path, obj) -> None:
    """Write `obj` as canonical JSON to `path` atomically."""
    write_bytes_atomic(path, json_bytes(obj))
