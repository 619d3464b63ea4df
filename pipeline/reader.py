"""Reading a target dataset from a local directory or any fsspec URL, in chunk-aligned blocks of rows.

Reads are block reads: `read_rows` makes one zarr call per array for a contiguous row range of one shard
(zarr decodes the chunks involved, concurrently for remote stores). Iterate with `iter_blocks` and shuffle
in memory; per-pair access (`pair`) is a convenience for inspection, not for training loops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geod.pipeline.card import INDEX_FILE, SHARDS_DIR, DatasetCard, DatasetLayout, read_card
from geod.pipeline.errors import FormatError
from geod.pipeline.format_spec import FEATURE_BY_NAME, FEATURES, PROB_SCALE, STATUS_FAILED, STATUS_OK, shard_name
from geod.pipeline.index import read_index
from geod.pipeline.location import Location, locate

_MATCH_PREFIX = "match_"


def expected_arrays(card: DatasetCard) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, per-pair shape) of every feature the card lists: the format's in feature-table
    order, then any added ones by name."""
    names = [f.name for f in FEATURES] + sorted(set(card.features) - set(FEATURE_BY_NAME))
    return {name: (card.features[name]["dtype"], tuple(card.features[name]["shape"])) for name in names}


def inspect_shard_arrays(location: Location, card: DatasetCard, shard: int) -> tuple[dict[str, Any], list[str]]:
    """Open one shard's zarr arrays and check each one's dtype, shape and chunking against the card.

    Returns the arrays that passed and one problem (naming shard and array) per array that did not.
    """
    import zarr

    rel = f"{SHARDS_DIR}/{shard_name(shard)}"
    where = f"{location.describe(rel)} (shard {shard})"
    try:
        group = zarr.open_group(location.zarr_store(rel), mode="r", zarr_format=3)
    except FileNotFoundError:
        return {}, [f"{where}: missing"]
    except Exception as error:  # zarr raises many kinds for unreadable metadata
        return {}, [f"{where}: cannot open zarr group ({type(error).__name__}: {error})"]
    pairs = card.shards[shard].pairs
    arrays, problems = {}, []
    for name, (dtype, shape) in expected_arrays(card).items():
        try:
            array = group[name]
        except KeyError:
            problems.append(f"{where}, array '{name}': missing")
            continue
        except Exception as error:
            problems.append(f"{where}, array '{name}': unreadable metadata ({type(error).__name__}: {error})")
            continue
        if array.dtype != np.dtype(dtype):
            problems.append(f"{where}, array '{name}': dtype {array.dtype}, the card says {dtype}")
        elif tuple(array.shape) != (pairs, *shape):
            problems.append(f"{where}, array '{name}': shape {tuple(array.shape)}, expected {(pairs, *shape)}")
        elif tuple(array.chunks) != (card.layout.rows_per_chunk, *shape):
            problems.append(f"{where}, array '{name}': chunks {tuple(array.chunks)}, expected "
                            f"{(card.layout.rows_per_chunk, *shape)}")
        else:
            arrays[name] = array
    return arrays, problems


def index_position_problems(index, card: DatasetCard) -> list[str]:
    """The index must list every row of every shard once, in (shard, row) order."""
    pairs = np.array([s.pairs for s in card.shards], dtype=np.int64)
    if index.num_rows != int(pairs.sum()):
        return [f"index has {index.num_rows} rows, the card's shards hold {int(pairs.sum())}"]
    shard = index.column("shard").to_numpy(zero_copy_only=False)
    row = index.column("row").to_numpy(zero_copy_only=False)
    want_shard = np.repeat(np.arange(len(pairs)), pairs)
    want_row = np.arange(len(row)) - np.repeat(np.cumsum(pairs) - pairs, pairs)
    bad = np.flatnonzero((shard != want_shard) | (row != want_row))
    problems = [f"index row {i}: (shard {shard[i]}, row {row[i]}), expected (shard {want_shard[i]}, row "
                f"{want_row[i]}) — the index must list every shard row once, in order" for i in bad[:20]]
    if len(bad) > 20:
        problems.append(f"... {len(bad) - 20} more rows out of place")
    return problems


def index_count_problems(index, card: DatasetCard) -> list[str]:
    """The index's ok/failed counts must agree with the card's."""
    import pyarrow.compute as pc

    n_ok = int(pc.sum(pc.equal(index.column("status"), STATUS_OK)).as_py() or 0)
    n_failed = int(pc.sum(pc.equal(index.column("status"), STATUS_FAILED)).as_py() or 0)
    problems = []
    if n_ok != card.counts.ok:
        problems.append(f"index has {n_ok} ok rows, the card counts {card.counts.ok}")
    if n_failed != card.counts.failed:
        problems.append(f"index has {n_failed} failed rows, the card counts {card.counts.failed}")
    return problems


class TargetDataset:
    """A read-only target dataset. Create with `TargetDataset.open(path_or_url)`.

    Opening reads card.json and index.parquet and checks them against each other; a shard's arrays are
    opened and checked (dtype, shape, chunking vs the card) the first time a shard is read, so opening a
    large remote dataset costs two reads. Picklable (open zarr handles are dropped), so it can be handed
    to DataLoader workers; handles are reopened per process.
    """

    def __init__(self, location: Location, card: DatasetCard, index):
        self._location = location
        self._card = card
        self._index = index
        self._offsets = np.concatenate([[0], np.cumsum([s.pairs for s in card.shards])]).astype(np.int64)
        self._arrays: dict[int, dict[str, Any]] = {}
        self._arrays_pid = os.getpid()
        self._positions: dict[str, int] | None = None

    @classmethod
    def open(cls, path_or_url: str | Path, storage_options: dict | None = None) -> TargetDataset:
        """Open a dataset directory or URL; FormatError when its card or index is missing or inconsistent."""
        location = locate(path_or_url, storage_options)
        card = read_card(path_or_url, storage_options)
        index = read_index(location, INDEX_FILE)
        problems = index_position_problems(index, card) + index_count_problems(index, card)
        if problems:
            raise FormatError(f"{location.describe(INDEX_FILE)}: " + "; ".join(problems[:5]) +
                              (f"; ... ({len(problems)} problems, run `geod validate`)" if len(problems) > 5 else ""))
        return cls(location, card, index)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        state["_positions"] = None
        return state

    @property
    def card(self) -> DatasetCard:
        return self._card

    @property
    def layout(self) -> DatasetLayout:
        return self._card.layout

    @property
    def index(self):
        """The index as a pyarrow Table (columns of format_spec.INDEX_COLUMNS), in (shard, row) order."""
        return self._index

    @property
    def n_shards(self) -> int:
        return len(self._card.shards)

    @property
    def url(self) -> str:
        return self._location.url

    @property
    def feature_names(self) -> list[str]:
        return list(expected_arrays(self._card))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def shard_pairs(self, shard: int) -> int:
        self._check_shard(shard)
        return self._card.shards[shard].pairs

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: the dataset has {self.n_shards} shards")

    def _shard_arrays(self, shard: int) -> dict[str, Any]:
        if self._arrays_pid != os.getpid():  # forked: handles of the parent must not be reused
            self._arrays, self._arrays_pid = {}, os.getpid()
        if shard not in self._arrays:
            arrays, problems = inspect_shard_arrays(self._location, self._card, shard)
            if problems:
                raise FormatError("; ".join(problems))
            self._arrays[shard] = arrays
        return self._arrays[shard]

    def read_rows(self, shard: int, start: int, stop: int, names: Sequence[str] | None = None
                  ) -> dict[str, np.ndarray]:
        """Rows [start, stop) of one shard: name -> array with a leading row axis (one zarr call per array)."""
        self._check_shard(shard)
        pairs = self._card.shards[shard].pairs
        if not 0 <= start < stop <= pairs:
            raise IndexError(f"rows [{start}, {stop}) out of range for shard {shard} of {pairs} rows")
        arrays = self._shard_arrays(shard)
        names = list(arrays) if names is None else list(names)
        unknown = [n for n in names if n not in arrays]
        if unknown:
            raise KeyError(f"unknown feature(s) {', '.join(unknown)}; the dataset has {', '.join(arrays)}")
        out = {}
        for name in names:
            try:
                out[name] = arrays[name][start:stop]
            except Exception as error:  # damaged chunk: checksum or decompression failure
                raise FormatError(
                    f"{self._location.describe(f'{SHARDS_DIR}/{shard_name(shard)}')} (shard {shard}) rows "
                    f"{start}-{stop - 1}, array '{name}': cannot read ({type(error).__name__}: {error}); "
                    "run `geod validate`") from None
        return out

    def block_index(self, shard: int, start: int, stop: int):
        """The index rows (pyarrow Table) of rows [start, stop) of one shard."""
        self._check_shard(shard)
        first = int(self._offsets[shard]) + start
        return self._index.slice(first, stop - start)

    def iter_blocks(self, shards: Sequence[int] | None = None) -> Iterator[tuple[int, int, int]]:
        """(shard, start, stop) of every chunk-aligned block (rows_per_chunk rows; the last may be shorter)."""
        step = self.layout.rows_per_chunk
        for shard in range(self.n_shards) if shards is None else shards:
            pairs = self.shard_pairs(shard)
            for start in range(0, pairs, step):
                yield shard, start, min(start + step, pairs)

    def locate(self, pair_id: str) -> tuple[int, int]:
        """(shard, row) of a pair; KeyError when the dataset does not hold it."""
        if self._positions is None:
            ids = self._index.column("pair_id").to_pylist()
            self._positions = {pid: i for i, pid in enumerate(ids)}
        try:
            position = self._positions[pair_id]
        except KeyError:
            raise KeyError(f"pair_id {pair_id!r} is not in {self.url}") from None
        shard = int(np.searchsorted(self._offsets, position, side="right") - 1)
        return shard, position - int(self._offsets[shard])

    def pair(self, pair_id: str) -> dict[str, Any]:
        """One pair for inspection: arrays without the row axis, match arrays cut to match_count,
        cost-volume probabilities as float32 in [0, 1], plus the pair's index fields (pair_id, status, ...)."""
        shard, row = self.locate(pair_id)
        arrays = {name: value[0] for name, value in self.read_rows(shard, row, row + 1).items()}
        count = int(arrays["match_count"])
        for name in arrays:
            if name.startswith(_MATCH_PREFIX) and name != "match_count":
                arrays[name] = arrays[name][:count]
            elif name.startswith("cv_") and name.endswith("_prob"):
                arrays[name] = arrays[name].astype(np.float32) / np.float32(PROB_SCALE)
        meta = self.block_index(shard, row, row + 1).to_pylist()[0]
        return {**meta, **arrays}
