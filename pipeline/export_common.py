"""What the exporters share: choosing the rows to export, reading them in blocks, and the exported card.

An export walks the dataset in its own order (index order = (shard, row) order) and reads it with
`TargetDataset.read_rows` on chunk-aligned blocks only; blocks without a selected row are not read at all.
The exported card is the source card.json (every key kept) plus an ``export`` section that records the
export format, its resolved options, the files written and the sha256 of the source card.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geod.pipeline.card import CARD_FILE
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.format_spec import STATUS_FAILED, STATUS_OK
from geod.pipeline.hashing import sha256_bytes
from geod.pipeline.location import locate

EXPORT_KEY = "export"


@dataclass(frozen=True, kw_only=True)
class ExportedFile:
    """One file an export wrote: name relative to the output, pairs it holds, size and sha256."""

    name: str
    pairs: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pairs": self.pairs, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True, kw_only=True)
class ExportSummary:
    """What an export wrote. `out` is the output directory (webdataset) or file (hdf5)."""

    format: str
    out: Path
    pairs: int
    failed_included: int
    failed_skipped: int
    split: str | None
    files: tuple[ExportedFile, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line for the command line."""
        which = f"split {self.split!r}" if self.split is not None else "all splits"
        failed = (f"{self.failed_included} failed pair(s) included" if self.failed_included
                  else f"{self.failed_skipped} failed pair(s) left out")
        size = sum(f.bytes for f in self.files)
        return (f"{self.out}: {self.pairs} pairs ({which}; {failed}) exported to {self.format} in "
                f"{len(self.files)} file(s), {size / 1e6:.1f} MB")


@dataclass(frozen=True)
class Block:
    """One chunk-aligned block of a shard and the positions (within the block) of its exported rows."""

    shard: int
    start: int
    stop: int
    rows: np.ndarray


@dataclass(frozen=True)
class ExportPlan:
    """The blocks to read, in dataset order, and how many pairs they contribute."""

    blocks: tuple[Block, ...]
    pairs: int
    failed_included: int
    failed_skipped: int


def plan_export(dataset, *, split: str | None, include_failed: bool) -> ExportPlan:
    """Select the pairs of `split` (None = all), ok ones only unless `include_failed`.

    ConfigError when the split does not exist or nothing is left to export.
    """
    import pyarrow.compute as pc

    index = dataset.index
    status = index.column("status").to_numpy(zero_copy_only=False)
    in_split = np.ones(index.num_rows, dtype=bool)
    if split is not None:
        splits = index.column("split")
        in_split = pc.fill_null(pc.equal(splits, split), False).to_numpy(zero_copy_only=False)
        if not in_split.any():
            known = sorted(str(s) for s in pc.unique(splits).to_pylist() if s is not None)
            raise ConfigError(f"{dataset.url}: no pair has split {split!r}; the dataset's splits are "
                              f"{', '.join(map(repr, known)) or 'none (the split column is empty)'}")
    failed = in_split & (status == STATUS_FAILED)
    selected = in_split & ((status == STATUS_OK) | (failed if include_failed else False))
    if not selected.any():
        which = f"split {split!r}" if split is not None else "the dataset"
        raise ConfigError(f"{dataset.url}: nothing to export: {which} holds no ok pair "
                          f"({int(failed.sum())} failed; pass include_failed to export those)")
    offsets = np.concatenate([[0], np.cumsum([dataset.shard_pairs(s) for s in range(dataset.n_shards)])])
    blocks = []
    for shard, start, stop in dataset.iter_blocks():
        first = int(offsets[shard])
        rows = np.flatnonzero(selected[first + start:first + stop])
        if rows.size:
            blocks.append(Block(shard, start, stop, rows))
    n_failed = int(failed.sum())
    return ExportPlan(blocks=tuple(blocks), pairs=int(selected.sum()),
                      failed_included=n_failed if include_failed else 0,
                      failed_skipped=0 if include_failed else n_failed)


def iter_plan(dataset, plan: ExportPlan) -> Iterator[tuple[list[dict], dict[str, np.ndarray]]]:
    """For each planned block: (index rows of the exported pairs, name -> array of those pairs).

    One `read_rows` call per block (a chunk-aligned block read); rows are then picked in memory.
    """
    for block in plan.blocks:
        arrays = dataset.read_rows(block.shard, block.start, block.stop)
        meta = dataset.block_index(block.shard, block.start, block.stop).to_pylist()
        yield ([meta[i] for i in block.rows.tolist()],
               {name: value[block.rows] for name, value in arrays.items()})


def source_card(dataset_url, storage_options: dict | None = None) -> tuple[dict, str]:
    """(raw card.json object, sha256 of its bytes) of the source dataset."""
    location = locate(dataset_url, storage_options)
    raw = location.read_bytes(CARD_FILE)
    try:
        return json.loads(raw), sha256_bytes(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{location.describe(CARD_FILE)}: not valid JSON ({error})") from None


def exported_card(card: dict, card_sha256: str, *, fmt: str, options: dict, plan: ExportPlan,
                  layout: dict, files: list[ExportedFile] | None = None) -> dict:
    """The source card with the ``export`` section: no paths or times, so reruns give the same bytes."""
    section = {
        "format": fmt,
        "geod_version": geod_version(),
        "options": options,
        "source_card_sha256": card_sha256,
        "pairs": plan.pairs,
        "failed_included": plan.failed_included,
        "failed_skipped": plan.failed_skipped,
        "layout": layout,
    }
    if files is not None:
        section["files"] = [f.to_dict() for f in files]
    return {**card, EXPORT_KEY: section}


def geod_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geod")
    except PackageNotFoundError:
        return "unknown"


def check_split_option(split) -> None:
    if split is not None and (not isinstance(split, str) or not split):
        raise ConfigError(f"split must be a non-empty string or None, got {split!r}")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over exported pairs (on stderr); a disabled one when `enabled` is False."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pair", disable=not enabled, leave=False)
