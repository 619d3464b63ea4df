"""`validate_dataset`: a good dataset passes; each kind of damage is found and named precisely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from geod.pipeline.shard_io import digest_directory, shard_path
from geod.pipeline.validate import validate_dataset

# The dataset of b_make_dataset: 11 pairs, shard 0 rows 0-7 (pair-000..pair-007), shard 1 rows 0-2
# (pair-008..pair-010), chunks of 4 rows, pair-005 (shard 0 row 5) failed.


@pytest.fixture(scope="module")
def b_pristine(tmp_path_factory, b_make_dataset):
    return b_make_dataset(tmp_path_factory.mktemp("b_pristine") / "ds")


@pytest.fixture
def dataset(tmp_path, b_pristine) -> Path:
    """A private copy of the pristine dataset, free to damage."""
    root = tmp_path / "ds"
    shutil.copytree(b_pristine["root"], root)
    return root


def _rewrite(root: Path, shard: int, name: str, change) -> None:
    """Change an array through zarr (valid chunks), then update the shard's record and the card to the new
    files, so that only the value checks can object."""
    import fsspec
    import zarr

    array = zarr.open_array(shard_path(root, shard) / name, mode="r+")
    values = array[...]
    change(values)
    array[...] = values
    digest = digest_directory(fsspec.filesystem("file"), str(shard_path(root, shard)))
    record_file = root / "shards" / f"shard-{shard:05d}.json"
    record = json.loads(record_file.read_text())
    record.update(files=digest.files, bytes=digest.bytes, sha256=digest.sha256)
    record_file.write_text(json.dumps(record))
    card = json.loads((root / "card.json").read_text())
    card["shards"][shard].update(bytes=digest.bytes, sha256=digest.sha256)
    (root / "card.json").write_text(json.dumps(card))


def test_good_dataset_is_valid(b_pristine):
    assert validate_dataset(b_pristine["root"]) == []
    assert validate_dataset(str(b_pristine["root"]), checksums=False) == []


def test_flipped_byte_in_a_chunk_is_named(dataset):
    chunk = shard_path(dataset, 0) / "match_xy_a" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    problems = validate_dataset(dataset)
    rows = "rows 4-7 (pair_id 'pair-004' .. 'pair-007')"
    assert problems[0] == (f"shard 0 (shards/shard-00000.zarr), file match_xy_a/c/1/0/0 (array 'match_xy_a' "
                           f"{rows}): sha256 mismatch (content damaged)")
    assert problems[1].startswith("shard 0 (shards/shard-00000.zarr): checksum mismatch")
    assert problems[2].startswith(f"shard 0 {rows}, array 'match_xy_a': cannot be decoded")
    assert len(problems) == 3
    # Without checksums the damaged chunk (same size) still fails to decode: crc32c is in the codec chain.
    assert [p[:60] for p in validate_dataset(dataset, checksums=False)] == [problems[2][:60]]


def test_truncated_file_is_named(dataset):
    chunk = shard_path(dataset, 1) / "depth_a" / "c" / "0" / "0" / "0"
    size = chunk.stat().st_size
    chunk.write_bytes(chunk.read_bytes()[: size // 2])
    problems = validate_dataset(dataset)
    assert problems[0] == (f"shard 1 (shards/shard-00001.zarr), file depth_a/c/0/0/0 (array 'depth_a' rows 0-2 "
                           f"(pair_id 'pair-008' .. 'pair-010')): {size // 2} bytes, expected {size} "
                           "(truncated or rewritten)")
    assert "checksum mismatch" in problems[1]
    assert problems[2].startswith("shard 1 rows 0-2 (pair_id 'pair-008' .. 'pair-010'), array 'depth_a': "
                                  "cannot be decoded")


def test_missing_shard_and_missing_chunk_are_named(dataset):
    shutil.rmtree(shard_path(dataset, 1))
    (shard_path(dataset, 0) / "cv_ba_valid" / "c" / "0" / "0").unlink()
    problems = validate_dataset(dataset)
    assert ("shard 0 (shards/shard-00000.zarr), file cv_ba_valid/c/0/0 (array 'cv_ba_valid' rows 0-3 "
            "(pair_id 'pair-000' .. 'pair-003')): missing") in problems
    assert ("shard 1 (shards/shard-00001.zarr): missing; its 3 pairs (rows 0-2 (pair_id 'pair-008' .. "
            "'pair-010')) cannot be read") in problems
    assert any(p.startswith("shard 0 (shards/shard-00000.zarr): checksum mismatch") for p in problems)
    # The listing is compared even without checksums: a missing chunk would otherwise read as fill values.
    assert validate_dataset(dataset, checksums=False)[0] == problems[0]


def _valid_patch(made, shard: int, row: int, direction: str = "ab") -> int:
    return int(np.flatnonzero(made["blocks"][shard][f"cv_{direction}_valid"][row])[0])


def _short_row(made, shard: int) -> int:
    counts = made["blocks"][shard]["match_count"]
    statuses = [r["status"] for r in made["rows"][shard]]
    return next(r for r in range(len(counts)) if counts[r] < 8 and statuses[r] == "ok")


@pytest.mark.parametrize("case", ["nan", "prob sum", "coordinate", "index", "padding", "failed row",
                                  "negative depth", "invalid row", "match count", "order", "repeat"])
def test_value_problems_are_named_exactly(dataset, b_pristine, case):
    made = b_pristine
    if case == "nan":
        _rewrite(dataset, 0, "match_depth_a", lambda v: v.__setitem__((2, 0), np.nan))
        expected = "shard 0 row 2 (pair_id 'pair-002'), array 'match_depth_a': 1 NaN/Inf values"
    elif case == "prob sum":
        p = _valid_patch(made, 1, 1)
        _rewrite(dataset, 1, "cv_ab_prob", lambda v: v.__setitem__((1, p), [65535, 1, 0, 0]))
        expected = (f"shard 1 row 1 (pair_id 'pair-009'), array 'cv_ab_prob': 1 cost-volume rows summing above "
                    f"65535 (patches {p}; largest sum 65536)")
    elif case == "coordinate":
        _rewrite(dataset, 0, "match_xy_b", lambda v: v.__setitem__((0, 3, 1), 1.5))
        expected = ("shard 0 row 0 (pair_id 'pair-000'), array 'match_xy_b': 1 values outside [0.0, 1.0] "
                    "(min 1.5, max 1.5)")
    elif case == "index":
        p = _valid_patch(made, 0, 1, "ba")
        _rewrite(dataset, 0, "cv_ba_index", lambda v: v.__setitem__((1, p, 3), 12))
        expected = ("shard 0 row 1 (pair_id 'pair-001'), array 'cv_ba_index': 1 values outside [-inf, 11] "
                    "(indices into P = 12) (min 12, max 12)")
    elif case == "padding":
        r = _short_row(made, 0)
        count = int(made["blocks"][0]["match_count"][r])
        _rewrite(dataset, 0, "match_points_a", lambda v: v.__setitem__((r, 7, 2), 0.25))
        expected = (f"shard 0 row {r} (pair_id 'pair-{r:03d}'), array 'match_points_a': 1 nonzero padding values "
                    f"beyond match_count (match_count {count})")
    elif case == "failed row":
        _rewrite(dataset, 0, "depth_conf_a", lambda v: v.__setitem__((5, 1, 1), 2.0))
        expected = ("shard 0 row 5 (pair_id 'pair-005'), array 'depth_conf_a': 1 nonzero values in a failed row "
                    "(failed rows are all zero)")
    elif case == "negative depth":
        _rewrite(dataset, 1, "depth_b", lambda v: v.__setitem__((2, 0, 0), -1.0))
        expected = ("shard 1 row 2 (pair_id 'pair-010'), array 'depth_b': 1 values outside [0.0, inf] "
                    "(min -1.0, max -1.0)")
    elif case == "invalid row":
        p = _valid_patch(made, 0, 3)
        _rewrite(dataset, 0, "cv_ab_valid", lambda v: v.__setitem__((3, p), False))
        expected = [f"shard 0 row 3 (pair_id 'pair-003'), array 'cv_ab_index': 1 rows marked invalid in "
                    f"cv_ab_valid with nonzero entries (patches {p})",
                    f"shard 0 row 3 (pair_id 'pair-003'), array 'cv_ab_prob': 1 rows marked invalid in "
                    f"cv_ab_valid with nonzero entries (patches {p})"]
    elif case == "match count":
        _rewrite(dataset, 0, "match_count", lambda v: v.__setitem__(6, 9))
        expected = ("shard 0 row 6 (pair_id 'pair-006'), array 'match_count': 1 values outside [0, 8] "
                    "(min 9, max 9)")
    elif case == "order":
        p = _valid_patch(made, 0, 2)
        _rewrite(dataset, 0, "cv_ab_prob", lambda v: v.__setitem__((2, p), [100, 200, 0, 0]))
        expected = ("shard 0 row 2 (pair_id 'pair-002'), array 'cv_ab_prob': 1 cost-volume rows not in "
                    "decreasing probability order")
    elif case == "repeat":
        p = _valid_patch(made, 0, 0)
        _rewrite(dataset, 0, "cv_ab_index", lambda v: v.__setitem__((0, p, 1), v[0, p, 0]))
        expected = (f"shard 0 row 0 (pair_id 'pair-000'), array 'cv_ab_index': 1 cost-volume rows naming a patch "
                    f"twice (patches {p})")
    expected = expected if isinstance(expected, list) else [expected]
    assert validate_dataset(dataset) == expected
    assert validate_dataset(dataset, checksums=False) == expected


def test_index_record_and_listing_problems_are_named(dataset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(dataset / "index.parquet")
    ids = table.column("pair_id").to_pylist()
    ids[1] = "pair-000"
    table = table.set_column(table.column_names.index("pair_id"), "pair_id", pa.array(ids, pa.string()))
    pq.write_table(table, dataset / "index.parquet")
    record_file = dataset / "shards" / "shard-00001.json"
    record = json.loads(record_file.read_text())
    record["rows"][2]["status"] = "failed"
    record_file.write_text(json.dumps(record))
    (dataset / "shards" / ".tmp-shard-00002-99.zarr").mkdir()
    shutil.copytree(shard_path(dataset, 1), dataset / "shards" / "shard-00002.zarr")
    problems = validate_dataset(dataset)
    assert problems == [
        "index.parquet row 0 (pair_id 'pair-000'): pair_id appears more than once",
        "index.parquet row 1 (pair_id 'pair-000'): pair_id appears more than once",
        "shards/.tmp-shard-00002-99.zarr: leftover of an interrupted writer",
        "shards/shard-00002.zarr: not listed in the card",
        "shard 0 row 1 (pair_id 'pair-000'): index and shard record disagree on pair_id",
        "shard 1 row 2 (pair_id 'pair-010'): index and shard record disagree on status",
    ]


def test_card_problems_stop_early_with_one_message(dataset):
    card = json.loads((dataset / "card.json").read_text())
    card["format_version"] = 7
    (dataset / "card.json").write_text(json.dumps(card))
    [problem] = validate_dataset(dataset)
    assert "format_version 7" in problem and "upgrade geod" in problem
    (dataset / "card.json").unlink()
    assert validate_dataset(dataset) == [f"{dataset}/card.json: missing"]


def test_problem_list_is_capped(dataset):
    _rewrite(dataset, 0, "match_conf", lambda v: v.__setitem__(slice(None), np.nan))
    full = validate_dataset(dataset, checksums=False)
    assert len(full) > 8
    assert validate_dataset(dataset, checksums=False, max_problems=4) == full[:3] + [
        f"... and {len(full) - 3} more problems ({len(full)} in total)"]


def test_damage_is_found_through_an_fsspec_url(dataset):
    import fsspec

    chunk = shard_path(dataset, 0) / "cv_ab_prob" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[-10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    fs = fsspec.filesystem("memory")
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"/geod-test-validate/{path.relative_to(dataset).as_posix()}", path.read_bytes())
    try:
        problems = validate_dataset("memory://geod-test-validate")
    finally:
        fs.rm("/geod-test-validate", recursive=True)
    assert problems[0].startswith("shard 0 (shards/shard-00000.zarr), file cv_ab_prob/c/0/0/0 (array "
                                  "'cv_ab_prob' rows 0-3 (pair_id 'pair-000' .. 'pair-003')): sha256 mismatch")
    assert any("array 'cv_ab_prob': cannot be decoded" in p for p in problems)


@pytest.mark.parametrize("sizes, expected", [
    ((7, 4), "card shards[0] (shards/shard-00000.zarr): 7 pairs, but every shard except the last must hold 8 "
             "(layout.pairs_per_shard)"),
    ((9, 2), "card shards[0] (shards/shard-00000.zarr): 9 pairs, expected 1 to 8 (layout.pairs_per_shard)"),
    ((8, 3, 0), ["card shards[1] (shards/shard-00001.zarr): 3 pairs, but every shard except the last must hold 8 "
                 "(layout.pairs_per_shard)",
                 "card shards[2] (shards/shard-00002.zarr): 0 pairs, expected 1 to 8 (layout.pairs_per_shard)"]),
])
def test_shard_sizes_must_follow_the_layout(dataset, sizes, expected):
    # Sizes keep the card's own totals (11 pairs) consistent: only the layout rule is broken.
    card = json.loads((dataset / "card.json").read_text())
    while len(card["shards"]) < len(sizes):
        card["shards"].append(dict(card["shards"][-1], name=f"shard-{len(card['shards']):05d}.zarr"))
    for entry, pairs in zip(card["shards"], sizes):
        entry["pairs"] = pairs
    card["counts"]["shards"] = len(sizes)
    (dataset / "card.json").write_text(json.dumps(card))
    problems = validate_dataset(dataset, checksums=False)
    expected = expected if isinstance(expected, list) else [expected]
    assert [p for p in problems if "layout.pairs_per_shard" in p] == expected


def test_temporary_files_at_the_root_are_named(dataset):
    (dataset / ".tmp-card.json-4242").write_text("{}")
    (dataset / ".tmp-index.parquet-4242").write_bytes(b"")
    assert validate_dataset(dataset) == [".tmp-card.json-4242: leftover of an interrupted writer",
                                         ".tmp-index.parquet-4242: leftover of an interrupted writer"]
