"""Where a target dataset lives: a local directory or any fsspec URL (memory://, s3://, https://, ...).

Local directories (plain paths and file:// URLs) are read with zarr's LocalStore and plain file IO; every
other URL goes through fsspec (zarr's FsspecStore), read-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geod.pipeline.errors import FormatError


def _is_url(text: str) -> bool:
    return "://" in text or "::" in text


@dataclass(frozen=True)
class Location:
    """A dataset root; `rel` paths below are POSIX paths relative to it (e.g. "shards/shard-00000.zarr")."""

    url: str
    local_root: Path | None
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return self.local_root is not None

    def describe(self, rel: str = "") -> str:
        """Human-readable name of a file below the root, for error messages."""
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def fs_and_path(self, rel: str = ""):
        """(fsspec filesystem, path inside it) of `rel`."""
        import fsspec

        if self.is_local:
            return fsspec.filesystem("file"), str(self.local_root / rel) if rel else str(self.local_root)
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, f"{path.rstrip('/')}/{rel}" if rel else path

    def exists(self, rel: str) -> bool:
        if self.is_local:
            return (self.local_root / rel).exists()
        fs, path = self.fs_and_path(rel)
        return fs.exists(path)

    def read_bytes(self, rel: str) -> bytes:
        """Bytes of a file; FormatError naming it when it is missing or unreadable."""
        try:
            if self.is_local:
                return (self.local_root / rel).read_bytes()
            fs, path = self.fs_and_path(rel)
            return fs.cat_file(path)
        except FileNotFoundError:
            raise FormatError(f"{self.describe(rel)}: missing") from None
        except OSError as error:
            raise FormatError(f"{self.describe(rel)}: cannot read ({error})") from None

    def list_dir(self, rel: str) -> list[str]:
        """Names (not paths) of the entries of a directory below the root; [] when it does not exist."""
        if self.is_local:
            folder = self.local_root / rel
            return sorted(os.listdir(folder)) if folder.is_dir() else []
        fs, path = self.fs_and_path(rel)
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

    def zarr_store(self, rel: str):
        """A read-only zarr store for a group below the root."""
        from zarr.storage import FsspecStore, LocalStore

        if self.is_local:
            return LocalStore(self.local_root / rel, read_only=True)
        return FsspecStore.from_url(f"{self.url.rstrip('/')}/{rel}", storage_options=self.storage_options or None,
                                    read_only=True)


def locate(path_or_url: str | Path, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a dataset root given as a local path, a file:// URL or another fsspec URL."""
    text = str(path_or_url)
    if isinstance(path_or_url, Path) or not _is_url(text):
        return Location(url=text, local_root=Path(text).absolute(), storage_options={})
    if text.startswith("file://"):
        return Location(url=text, local_root=Path(text[len("file://"):]).absolute(), storage_options={})
    return Location(url=text.rstrip("/"), local_root=None, storage_options=dict(storage_options or {}))
