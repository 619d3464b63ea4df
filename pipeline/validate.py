"""`geod validate`: re-check a whole target dataset and name every problem found.

Checks, in order: the card; the index (columns, types, unique pair_ids, status/reason, positions, counts);
the shard sizes (full but the last, none empty); the dataset and shards directories (nothing missing,
nothing unlisted, no leftovers of interrupted writers); per shard the record (against card and index),
the files (per-file size and sha256 against the record, the directory checksum against the card), the
arrays (dtype, shape, chunking), and the values, read in chunk-aligned blocks and checked with vectorised
numpy (geod.pipeline.checks). Every message names the shard, the rows
and their pair_ids, and the array or file at fault.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from geod.pipeline.card import INDEX_FILE, SHARDS_DIR, DatasetCard, read_card
from geod.pipeline.checks import value_problems
from geod.pipeline.errors import FormatError
from geod.pipeline.format_spec import STATUS_FAILED, STATUS_OK, shard_name, shard_record_name
from geod.pipeline.index import REQUIRED_ROW_KEYS, ROW_KEYS, read_index
from geod.pipeline.location import Location, locate
from geod.pipeline.reader import index_count_problems, index_position_problems, inspect_shard_arrays
from geod.pipeline.shard_io import checksum_of_files, list_directory, parse_record


def _rows_text(ids: list[str] | None, start: int, stop: int) -> str:
    """'rows 32-63 (pair_id 'a' .. 'b')' for a half-open row range."""
    if stop - start == 1:
        text = f"row {start}"
        return text + (f" (pair_id {ids[start]!r})" if ids else "")
    text = f"rows {start}-{stop - 1}"
    return text + (f" (pair_id {ids[start]!r} .. {ids[stop - 1]!r})" if ids else "")


def index_problems(index, card: DatasetCard) -> list[str]:
    """Content problems of the index: nulls, repeated pair_ids, bad status/reason."""
    problems = []
    columns = {name: index.column(name).to_pylist() for name in (*ROW_KEYS, "shard", "row")}
    for name in (*REQUIRED_ROW_KEYS, "shard", "row"):
        for i, value in enumerate(columns[name]):
            if value is None:
                problems.append(f"{INDEX_FILE} row {i}: '{name}' is null")
    repeated = {pid for pid, n in Counter(columns["pair_id"]).items() if n > 1 and pid is not None}
    for i, pid in enumerate(columns["pair_id"]):
        if pid in repeated:
            problems.append(f"{INDEX_FILE} row {i} (pair_id {pid!r}): pair_id appears more than once")
    for i, (pid, status, reason) in enumerate(zip(columns["pair_id"], columns["status"], columns["reason"])):
        if status not in (STATUS_OK, STATUS_FAILED):
            problems.append(f"{INDEX_FILE} row {i} (pair_id {pid!r}): status {status!r} is not ok/failed")
        elif status == STATUS_FAILED and not reason:
            problems.append(f"{INDEX_FILE} row {i} (pair_id {pid!r}): failed without a reason")
        elif status == STATUS_OK and reason is not None:
            problems.append(f"{INDEX_FILE} row {i} (pair_id {pid!r}): ok but has reason {reason!r}")
    return problems


def shard_size_problems(card: DatasetCard) -> list[str]:
    """Shards are consecutive blocks of pairs_per_shard pairs: every shard full but the last, none empty."""
    per = card.layout.pairs_per_shard
    problems = []
    for shard, entry in enumerate(card.shards):
        where = f"card shards[{shard}] ({SHARDS_DIR}/{entry.name})"
        last = shard == len(card.shards) - 1
        if not 1 <= entry.pairs <= per:
            problems.append(f"{where}: {entry.pairs} pairs, expected 1 to {per} (layout.pairs_per_shard)")
        elif not last and entry.pairs != per:
            problems.append(f"{where}: {entry.pairs} pairs, but every shard except the last must hold "
                            f"{per} (layout.pairs_per_shard)")
    return problems


def _listing_problems(location: Location, card: DatasetCard) -> list[str]:
    listed = {s.name for s in card.shards} | {shard_record_name(i) for i in range(len(card.shards))}
    # A temporary card or index at the root means a writer stopped between writing and renaming it.
    problems = [f"{name}: leftover of an interrupted writer" for name in location.list_dir("")
                if name.startswith(".tmp-")]
    for name in location.list_dir(SHARDS_DIR):
        if name.startswith(".tmp-"):
            problems.append(f"{SHARDS_DIR}/{name}: leftover of an interrupted writer")
        elif name not in listed:
            problems.append(f"{SHARDS_DIR}/{name}: not listed in the card")
    return problems


def _file_problems(rel_shard: str, shard: int, files: dict, record_files: dict, pairs: int, rows_per_chunk: int,
                   ids: list[str] | None) -> list[str]:
    """Per-file comparison of a shard directory with its record, naming the array and rows of each chunk."""
    def what(rel: str) -> str:
        parts = rel.split("/")
        if rel == "zarr.json":
            return "group metadata"
        if len(parts) == 2 and parts[1] == "zarr.json":
            return f"array '{parts[0]}' metadata"
        if len(parts) >= 3 and parts[1] == "c" and parts[2].isdigit():
            start = int(parts[2]) * rows_per_chunk
            stop = min(start + rows_per_chunk, pairs)
            if start < pairs:
                return f"array '{parts[0]}' {_rows_text(ids, start, stop)}"
        return "unknown file"

    problems = []
    prefix = f"shard {shard} ({rel_shard})"
    for rel in sorted(set(record_files) | set(files)):
        want, have = record_files.get(rel), files.get(rel)
        if have is None:
            problems.append(f"{prefix}, file {rel} ({what(rel)}): missing")
        elif want is None:
            problems.append(f"{prefix}, file {rel} ({what(rel)}): not in the shard record")
        elif have["bytes"] != want["bytes"]:
            problems.append(f"{prefix}, file {rel} ({what(rel)}): {have['bytes']} bytes, expected "
                            f"{want['bytes']} (truncated or rewritten)")
        elif "sha256" in have and have["sha256"] != want["sha256"]:
            problems.append(f"{prefix}, file {rel} ({what(rel)}): sha256 mismatch (content damaged)")
    return problems


def _record_problems(location: Location, card: DatasetCard, shard: int, ids_index: list[dict] | None
                     ) -> tuple[dict | None, list[str]]:
    rel = f"{SHARDS_DIR}/{shard_record_name(shard)}"
    try:
        record = parse_record(json.loads(location.read_bytes(rel)), rel, shard)
    except (FormatError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, [f"shard {shard} record: {error}"]
    entry = card.shards[shard]
    problems = []
    for key in ("pairs", "bytes", "sha256"):
        if record[key] != getattr(entry, key):
            problems.append(f"shard {shard} record {rel}: {key} {record[key]!r}, the card says "
                            f"{getattr(entry, key)!r}")
    if ids_index is not None and len(ids_index) == len(record["rows"]):
        for r, (a, b) in enumerate(zip(record["rows"], ids_index)):
            keys = [k for k in ROW_KEYS if a.get(k) != b.get(k)]
            if keys:
                problems.append(f"shard {shard} row {r} (pair_id {b.get('pair_id')!r}): index and shard record "
                                f"disagree on {', '.join(keys)}")
    return record, problems


def _shard_problems(location: Location, card: DatasetCard, shard: int, index_rows: list[dict] | None,
                    checksums: bool) -> list[str]:
    entry = card.shards[shard]
    rel = f"{SHARDS_DIR}/{shard_name(shard)}"
    problems = []
    if entry.name != shard_name(shard):
        problems.append(f"card shards[{shard}]: name {entry.name!r}, expected {shard_name(shard)!r}")
    if not location.exists(rel):
        ids = [r["pair_id"] for r in index_rows] if index_rows else None
        span = f"; its {entry.pairs} pairs ({_rows_text(ids, 0, entry.pairs)}) cannot be read" if entry.pairs else ""
        return problems + [f"shard {shard} ({rel}): missing{span}"]
    record, record_problems = _record_problems(location, card, shard, index_rows)
    problems += record_problems
    rows = index_rows if index_rows is not None else (record["rows"] if record else None)
    ids = [r["pair_id"] for r in rows] if rows is not None else None
    statuses = [r["status"] for r in rows] if rows is not None else None
    # The file listing (names and sizes) is always compared: a missing chunk would otherwise read as fill
    # values, and a truncated one may still decode. Hashing every byte is what `checksums` adds.
    fs, path = location.fs_and_path(rel)
    files = list_directory(fs, path, hash_files=checksums)
    if record is not None:
        problems += _file_problems(rel, shard, files, record["files"], entry.pairs, card.layout.rows_per_chunk,
                                   ids)
    if checksums:
        sha256, size = checksum_of_files(files), sum(f["bytes"] for f in files.values())
        if sha256 != entry.sha256 or size != entry.bytes:
            problems.append(f"shard {shard} ({rel}): checksum mismatch: files hash to {sha256} ({size} bytes), "
                            f"the card says {entry.sha256} ({entry.bytes} bytes)")
    arrays, array_problems = inspect_shard_arrays(location, card, shard)
    problems += array_problems
    dims = card.layout.dims()
    step = card.layout.rows_per_chunk
    for start in range(0, entry.pairs, step):
        stop = min(start + step, entry.pairs)
        block = {}
        for name, array in arrays.items():
            try:
                block[name] = array[start:stop]
            except Exception as error:  # damaged chunk: crc32c or decompression failure, missing object
                problems.append(f"shard {shard} {_rows_text(ids, start, stop)}, array '{name}': cannot be "
                                f"decoded ({type(error).__name__}: {error})")
        problems += value_problems(block, dims=dims, where=f"shard {shard}", first_row=start,
                                   pair_ids=ids[start:stop] if ids else None,
                                   statuses=statuses[start:stop] if statuses else None)
    return problems


def validate_dataset(path_or_url: str | Path, *, checksums: bool = True, storage_options: dict | None = None,
                     max_problems: int = 1000) -> list[str]:
    """Every problem of a dataset (local directory or fsspec URL) as one message each; [] = valid.

    checksums: also hash every file (slower; catches damage that still decodes).
    At most `max_problems` messages are returned, the last one saying how many were left out.
    """
    location = locate(path_or_url, storage_options)
    try:
        card = read_card(path_or_url, storage_options)
    except FormatError as error:
        return [str(error)]
    problems: list[str] = []
    index_rows_by_shard: list[list[dict] | None] = [None] * len(card.shards)
    try:
        index = read_index(location, INDEX_FILE)
    except FormatError as error:
        problems.append(str(error))
    else:
        positions = index_position_problems(index, card)
        problems += index_problems(index, card)
        problems += [f"{INDEX_FILE}: {p}" for p in positions + index_count_problems(index, card)]
        if not positions:
            rows = index.to_pylist()
            offset = 0
            for shard, entry in enumerate(card.shards):
                index_rows_by_shard[shard] = rows[offset:offset + entry.pairs]
                offset += entry.pairs
    problems += shard_size_problems(card)
    problems += _listing_problems(location, card)
    for shard in range(len(card.shards)):
        problems += _shard_problems(location, card, shard, index_rows_by_shard[shard], checksums)
    if len(problems) > max_problems:
        dropped = len(problems) - max_problems + 1
        problems = problems[:max_problems - 1] + [f"... and {dropped} more problems ({len(problems)} in total)"]
    return problems
