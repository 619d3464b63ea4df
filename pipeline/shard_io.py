"""Writing shards: one immutable zarr v3 group per block of pairs, published atomically, then recorded.

Life of a shard (one writer per shard; different shards may be written by different processes):
1. the arrays are checked against the format (names, dtypes, shapes, value invariants);
2. the group is written whole to ``shards/.tmp-shard-NNNNN-<pid>.zarr``;
3. its checksum is computed and the directory is renamed to ``shards/shard-NNNNN.zarr`` (one os.rename);
4. the record ``shards/shard-NNNNN.json`` (rows, bytes, checksum, per-file hashes) is written atomically.
A shard directory without a record whose checksum matches is torn (a crash between 3 and 4, or a damaged
disk) and is removed by `remove_torn`. `finalize_dataset` turns the records into index.parquet + card.json.

Storage: plain zarr chunks (no sharding codec) of ``rows_per_chunk`` pairs by the full per-pair shape;
codec chain bytes -> blosc(zstd, level 5; bitshuffle for index arrays, byte shuffle otherwise) -> crc32c, so
a damaged chunk fails to decode instead of returning wrong numbers. Metadata holds nothing time- or
run-dependent: the same arrays give byte-identical files (with the same zarr/numcodecs versions).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geod.pipeline.atomic import write_json_atomic
from geod.pipeline.card import INDEX_FILE, SHARDS_DIR, Counts, DatasetCard, DatasetLayout, ShardEntry, write_card
from geod.pipeline.checks import spec_problems, value_problems
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.format_spec import (FEATURES, FORMAT_NAME, FORMAT_VERSION, STATUS_OK, shard_name,
                                       shard_record_name)
from geod.pipeline.hashing import sha256_bytes, sha256_file
from geod.pipeline.index import ROW_KEYS, build_index, row_entry_problems, write_index

BLOSC_LEVEL = 5
_MAX_LISTED = 20


def feature_codecs(dtype: str, *, is_index: bool) -> list:
    """Bytes-to-bytes codecs of one array.

    blosc-zstd level 5 with bitshuffle for patch indices (neighbouring patch numbers share their high bits)
    and byte shuffle for the rest was the smallest of the candidates measured by benchmarks/bench_format.py
    (30% below plain zstd-3); crc32c comes last so that a damaged chunk fails to decode.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "bitshuffle" if is_index else "shuffle"
    return [BloscCodec(cname="zstd", clevel=BLOSC_LEVEL, shuffle=shuffle, typesize=np.dtype(dtype).itemsize,
                       blocksize=0),
            Crc32cCodec()]


def zero_arrays(layout: DatasetLayout, n_rows: int) -> dict[str, np.ndarray]:
    """All-zero arrays of every feature for `n_rows` pairs (the content of failed rows)."""
    return {name: np.zeros((n_rows, *shape), dtype=dtype) for name, (dtype, shape) in layout.feature_shapes().items()}


def shard_path(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS_DIR / shard_name(shard)


def record_path(root: str | Path, shard: int) -> Path:
    return Path(root) / SHARDS_DIR / shard_record_name(shard)


@dataclass(frozen=True)
class ShardDigest:
    """Checksum of a shard directory: sha256, total bytes, and {relative path: {"bytes", "sha256"}}."""

    sha256: str
    bytes: int
    files: dict[str, dict]


def checksum_of_files(files: dict[str, dict]) -> str:
    """The shard checksum: sha256 of the lines "relpath\\0filesha256\\n" of every file, sorted by relpath."""
    lines = "".join(f"{rel}\0{files[rel]['sha256']}\n" for rel in sorted(files))
    return sha256_bytes(lines.encode("utf-8"))


def list_directory(fs, path: str, *, hash_files: bool = True) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file below `path` on an fsspec filesystem (local or
    remote); without hash_files only the sizes (one listing, no reads)."""
    files = {}
    for full, info in sorted(fs.find(path, detail=True, withdirs=False).items()):
        rel = full[len(path.rstrip("/")) + 1:].replace(os.sep, "/")
        files[rel] = {"bytes": int(info["size"])}
        if hash_files:
            files[rel]["sha256"] = sha256_file(full, fs=fs)
    return files


def digest_directory(fs, path: str) -> ShardDigest:
    """Hash every file below `path` on an fsspec filesystem (local or remote)."""
    files = list_directory(fs, path)
    return ShardDigest(sha256=checksum_of_files(files), bytes=sum(f["bytes"] for f in files.values()),
                       files=files)


def _digest_local(path: Path) -> ShardDigest:
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = Path(folder) / name
            rel = full.relative_to(path).as_posix()
            files[rel] = {"bytes": full.stat().st_size, "sha256": sha256_file(full)}
    files = dict(sorted(files.items()))
    return ShardDigest(sha256=checksum_of_files(files), bytes=sum(f["bytes"] for f in files.values()),
                       files=files)


def _problem_list(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def check_shard_input(shard: int, arrays: dict, rows: list[dict], layout: DatasetLayout) -> None:
    """FormatError listing every problem of a shard's arrays and row entries (write-side validation)."""
    where = f"shard {shard}"
    n_rows = len(rows)
    if not 1 <= n_rows <= layout.pairs_per_shard:
        raise FormatError(f"{where}: {n_rows} rows; a shard holds 1 to {layout.pairs_per_shard}")
    problems = spec_problems(arrays, layout.feature_shapes(), n_rows, where)
    for i, row in enumerate(rows):
        problems += row_entry_problems(row, f"{where} row {i}")
    if problems:
        raise FormatError(f"{where}: bad input:{_problem_list(problems)}")
    ids = [row["pair_id"] for row in rows]
    repeated = sorted(pid for pid, n in Counter(ids).items() if n > 1)
    if repeated:
        raise FormatError(f"{where}: pair_id(s) repeated: {', '.join(map(repr, repeated[:_MAX_LISTED]))}")
    problems = value_problems(arrays, dims=layout.dims(), where=where, pair_ids=ids,
                              statuses=[row["status"] for row in rows])
    if problems:
        raise FormatError(f"{where}: arrays break the format:{_problem_list(problems)}")


def _write_group(path: Path, shard: int, arrays: dict, layout: DatasetLayout) -> None:
    import zarr
    from zarr.storage import LocalStore

    attributes = {"geod": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shard": shard,
                           "layout": layout.to_dict()}}
    group = zarr.open_group(LocalStore(path), mode="w-", zarr_format=3, attributes=attributes)
    dims = layout.dims()
    for feature in FEATURES:
        data = arrays[feature.name]
        array = group.create_array(
            feature.name, shape=data.shape, dtype=data.dtype,
            chunks=(layout.rows_per_chunk, *feature.resolved_shape(dims)),
            compressors=feature_codecs(feature.dtype, is_index=feature.index_into is not None),
            fill_value=False if data.dtype == bool else 0,
            dimension_names=["pair", *(d if isinstance(d, str) else None for d in feature.shape)],
            # Every chunk is stored, even an all-zero one: a missing chunk file then always means damage.
            config={"write_empty_chunks": True},
        )
        array[...] = data


def write_shard(root: str | Path, shard: int, arrays: dict[str, np.ndarray], rows: list[dict],
                layout: DatasetLayout) -> dict:
    """Check, write and publish shard `shard` under `root`; returns its record.

    `arrays`: every feature of the format with a leading row axis (1 <= rows <= pairs_per_shard);
    `rows`: one index entry per row (pair_id, scene_id, split, image_a, image_b, image_a_sha256,
    image_b_sha256, status, reason). Raises FormatError when the input breaks the format or the shard
    already exists (run `remove_torn` first to replace a torn one).
    """
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or shard < 0:
        raise ConfigError(f"shard number must be an integer >= 0, got {shard!r}")
    shard = int(shard)
    rows = list(rows)
    check_shard_input(shard, arrays, rows, layout)
    final = shard_path(root, shard)
    if final.exists():
        raise FormatError(f"{final}: shard exists already (remove it, or call remove_torn if it is torn)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-shard-{shard:05d}-{os.getpid()}.zarr"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_group(tmp, shard, arrays, layout)
        digest = _digest_local(tmp)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shard": shard, "name": final.name,
        "pairs": len(rows), "bytes": digest.bytes, "sha256": digest.sha256, "files": digest.files,
        "rows": [{key: row.get(key) for key in ROW_KEYS} for row in rows],
    }
    write_json_atomic(record_path(root, shard), record)
    return record


def parse_record(data, where: str, shard: int | None = None) -> dict:
    """Check a record object's structure; FormatError naming `where` when it is malformed."""
    problems = []
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a JSON object")
    for key, kind in (("shard", int), ("name", str), ("pairs", int), ("bytes", int), ("sha256", str),
                      ("files", dict), ("rows", list)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            problems.append(f"'{key}' missing or not {kind.__name__}")
    if not problems:
        if shard is not None and (data["shard"] != shard or data["name"] != shard_name(shard)):
            problems.append(f"names shard {data['shard']} ({data['name']}), expected {shard}")
        if len(data["rows"]) != data["pairs"]:
            problems.append(f"{len(data['rows'])} rows listed but pairs is {data['pairs']}")
        if not _files_ok(data["files"]):
            problems.append("'files' entries need 'bytes' and 'sha256'")
        elif checksum_of_files(data["files"]) != data["sha256"]:
            problems.append("file list does not hash to the recorded sha256")
    if problems:
        raise FormatError(f"{where}: malformed shard record: " + "; ".join(problems))
    return data


def _files_ok(files: dict) -> bool:
    return all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
               for v in files.values())


def read_record(root: str | Path, shard: int) -> dict | None:
    """A local shard's record, None when it has none; FormatError when it exists but is malformed."""
    import json

    path = record_path(root, shard)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: not valid JSON ({error})") from None
    return parse_record(data, str(path), shard)


def shard_is_complete(root: str | Path, shard: int, verify: bool = True) -> bool:
    """True when the shard directory and a well-formed record exist (and, with verify, the files hash to it)."""
    try:
        record = read_record(root, shard)
    except FormatError:
        return False
    folder = shard_path(root, shard)
    if record is None or not folder.is_dir():
        return False
    if not verify:
        return True
    digest = _digest_local(folder)
    return digest.sha256 == record["sha256"] and digest.bytes == record["bytes"]


def remove_torn(root: str | Path, shard: int, verify: bool = True) -> bool:
    """Delete this shard's leftovers: temporary dirs/files, and the shard itself unless it is complete.

    Only names of this shard number are touched, so writers of other shards are not disturbed.
    Returns True when something was removed.
    """
    folder = Path(root) / SHARDS_DIR
    if not folder.is_dir():
        return False
    removed = False
    prefixes = (f".tmp-shard-{shard:05d}-", f".tmp-{shard_record_name(shard)}-")
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefixes):
            _remove(folder / name)
            removed = True
    if not shard_is_complete(root, shard, verify=verify):
        record, data = record_path(root, shard), shard_path(root, shard)
        # Record first: a crash between the two leaves a directory without record, which is still torn.
        if record.exists():
            record.unlink()
            removed = True
        if data.exists():
            trash = folder / f".tmp-shard-{shard:05d}-trash-{os.getpid()}.zarr"
            os.rename(data, trash)
            _remove(trash)
            removed = True
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _shard_layout(root: Path, shard: int) -> dict | None:
    import json

    try:
        meta = json.loads((shard_path(root, shard) / "zarr.json").read_bytes())
        return meta["attributes"]["geod"]["layout"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finalize_dataset(root: str | Path, *, n_shards: int, layout: DatasetLayout, **card_fields) -> DatasetCard:
    """Gather shards 0..n_shards-1 into index.parquet and card.json (both atomic); returns the card.

    `card_fields` are the descriptive DatasetCard fields (teacher, preprocessing, dataset_version, source,
    licence, extra, ...); counts, shards and features are derived here. Raises FormatError when a shard is
    missing or incomplete, when shards of a larger earlier run are left over, when a pair_id repeats
    across shards, or when a shard was written with another layout.
    """
    root = Path(root)
    derived = {"counts", "shards", "features", "layout"} & set(card_fields)
    if derived:
        raise ConfigError(f"finalize_dataset derives {', '.join(sorted(derived))}; do not pass them")
    records = []
    for shard in range(n_shards):
        record = read_record(root, shard)
        if record is None or not shard_path(root, shard).is_dir():
            raise FormatError(f"{shard_path(root, shard)}: shard missing or without record; "
                              "the extraction did not finish")
        if _shard_layout(root, shard) != layout.to_dict():
            raise FormatError(f"{shard_path(root, shard)}: written with layout {_shard_layout(root, shard)}, "
                              f"not {layout.to_dict()}")
        records.append(record)
    known = {shard_name(i) for i in range(n_shards)} | {shard_record_name(i) for i in range(n_shards)}
    shards_dir = root / SHARDS_DIR
    leftovers = sorted(n for n in os.listdir(shards_dir) if n not in known) if shards_dir.is_dir() else []
    if leftovers:
        raise FormatError(f"{root / SHARDS_DIR}: unexpected entries {', '.join(leftovers[:_MAX_LISTED])} "
                          f"(left over from another run or a crashed writer); remove them")
    seen: dict[str, int] = {}
    repeated = []
    for record in records:
        for row in record["rows"]:
            if row["pair_id"] in seen:
                repeated.append(f"{row['pair_id']!r} (shards {seen[row['pair_id']]} and {record['shard']})")
            seen[row["pair_id"]] = record["shard"]
    if repeated:
        raise FormatError(f"pair_id(s) in more than one shard: {', '.join(repeated[:_MAX_LISTED])}")
    write_index(root / INDEX_FILE, build_index([record["rows"] for record in records]))
    n_ok = sum(row["status"] == STATUS_OK for record in records for row in record["rows"])
    n_pairs = sum(record["pairs"] for record in records)
    card = DatasetCard(
        layout=layout,
        counts=Counts(pairs=n_pairs, ok=n_ok, failed=n_pairs - n_ok, shards=n_shards),
        shards=[ShardEntry(name=r["name"], pairs=r["pairs"], bytes=r["bytes"], sha256=r["sha256"])
                for r in records],
        **card_fields,
    )
    write_card(root, card)
    return card


def write_dataset(root: str | Path, pairs: list[dict[str, np.ndarray]], rows: list[dict], layout: DatasetLayout,
                  **card_fields) -> DatasetCard:
    """Write a whole dataset at once from per-pair arrays and index rows (small datasets: tests, benchmarks).

    Pairs are cut into shards of `layout.pairs_per_shard` in order, then finalised with `card_fields`.
    """
    if len(pairs) != len(rows) or not pairs:
        raise ConfigError(f"write_dataset needs as many index rows as pairs (>= 1), got {len(rows)} and {len(pairs)}")
    per = layout.pairs_per_shard
    n_shards = (len(pairs) + per - 1) // per
    for shard in range(n_shards):
        part = slice(shard * per, (shard + 1) * per)
        stacked = {name: np.stack([pair[name] for pair in pairs[part]]) for name in pairs[0]}
        write_shard(root, shard, stacked, rows[part], layout)
    return finalize_dataset(root, n_shards=n_shards, layout=layout, **card_fields)
