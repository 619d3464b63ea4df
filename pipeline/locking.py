"""An exclusive, advisory lock on a directory that one writer at a time may fill."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from geod.pipeline.errors import ConfigError

LOCK_FILE = ".geod-lock"


@contextlib.contextmanager
def exclusive_directory_lock(directory: Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `directory` (a `.geod-lock` file in it) or fail at once if another holds it.

    Two writers in one directory would delete each other's temporaries and race on the same shards; the
    lock turns that into a clear error. The kernel drops the lock when the process dies, so a killed run
    never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: proceed unlocked
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another {what} is writing to {directory} right now; wait for it to finish or "
                              "choose another output directory") from None
        yield
    finally:
        os.close(handle)
