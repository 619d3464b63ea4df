"""The targets format: layout and card, shard writing, atomic publication, byte determinism, reading."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from geod.pipeline.card import DatasetCard, DatasetLayout, read_card, read_card_json, write_card
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.format_spec import FEATURES, PROB_SCALE
from geod.pipeline.reader import TargetDataset
from geod.pipeline.shard_io import (checksum_of_files, finalize_dataset, read_record, remove_torn,
                                    shard_is_complete, shard_path, write_shard)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- layout and card -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(pairs_per_shard=10, rows_per_chunk=4), "multiple of"),
    (dict(grid_h=2, grid_w=2, topk=5), "exceeds"),
    (dict(grid_h=256, grid_w=257), "65535"),
    (dict(max_matches=0), "max_matches"),
    (dict(depth_h=True), "depth_h"),
])
def test_layout_rejects_inconsistent_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DatasetLayout(**kwargs)


def test_layout_dims_and_dict_round_trip():
    layout = DatasetLayout(grid_h=6, grid_w=8, topk=5)
    assert layout.dims() == {"M": 512, "P": 48, "K": 5, "Hd": 48, "Wd": 64}
    assert layout.feature_shapes()["cv_ab_index"] == ("uint16", (48, 5))
    assert layout.to_dict()["patches"] == 48
    assert DatasetLayout.from_dict({**layout.to_dict(), "future_key": 1}) == layout
    with pytest.raises(ConfigError, match="patches"):
        DatasetLayout.from_dict({**layout.to_dict(), "patches": 47})


def test_card_round_trip_is_byte_identical_and_keeps_unknown_keys(tmp_path, b_layout):
    card = DatasetCard(teacher={"name": "geometry", "scene_units": "metres"}, layout=b_layout,
                       dataset_version="2.0.1", licence=None, extra={"k": [1, 2]})
    write_card(tmp_path, card)
    first = (tmp_path / "card.json").read_bytes()
    data = json.loads(first)
    assert data["format"] == "geod-targets" and data["format_version"] == 1
    assert data["features"]["match_xy_a"]["shape"] == [8, 2] and data["features"]["depth_a"]["dtype"] == "float16"
    assert "time" not in first.decode() and "date" not in first.decode()
    data["future_field"] = {"x": 1}
    (tmp_path / "card.json").write_text(json.dumps(data))
    again = read_card(tmp_path)
    assert again.layout == b_layout and again.dataset_version == "2.0.1" and again.extra == {"k": [1, 2]}
    assert again.unknown == {"future_field": {"x": 1}}
    write_card(tmp_path, again)
    assert json.loads((tmp_path / "card.json").read_bytes())["future_field"] == {"x": 1}
    del again.unknown["future_field"]
    write_card(tmp_path, again)
    assert (tmp_path / "card.json").read_bytes() == first


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=2), "newer geod.*upgrade"),
    (lambda d: d.update(format="something-else"), "not a geod target dataset"),
    (lambda d: d.pop("teacher"), "missing field"),
    (lambda d: d["features"]["match_xy_a"].update(dtype="float64"), "match_xy_a.dtype"),
    (lambda d: d["features"].pop("cv_ab_prob"), "cv_ab_prob: missing"),
    (lambda d: d["layout"].update(rows_per_chunk=3), "multiple of"),
    (lambda d: d["counts"].update(ok=99), "ok .* failed"),
])
def test_card_reader_names_the_bad_field(tmp_path, b_layout, change, message):
    data = DatasetCard(teacher={"name": "t", "scene_units": "relative"}, layout=b_layout).to_dict()
    change(data)
    (tmp_path / "card.json").write_text(json.dumps(data))
    assert read_card_json(tmp_path)["format"] == data.get("format")
    with pytest.raises(FormatError, match=message) as error:
        read_card(tmp_path)
    assert "card.json" in str(error.value)


def test_missing_card_is_a_clear_error(tmp_path):
    with pytest.raises(FormatError, match="card.json: missing"):
        read_card(tmp_path)


# ---- writing ---------------------------------------------------------------------------------------------

def test_round_trip_is_exact(tmp_path, b_make_dataset):
    made = b_make_dataset(tmp_path / "ds", n_pairs=11, failed=(5,))
    data = TargetDataset.open(tmp_path / "ds")
    assert data.n_shards == 2 and len(data) == 11 and data.card.counts.failed == 1 and data.card.counts.ok == 10
    assert list(data.iter_blocks()) == [(0, 0, 4), (0, 4, 8), (1, 0, 3)]
    assert data.feature_names == [f.name for f in FEATURES]
    for shard, start, stop in data.iter_blocks():
        block = data.read_rows(shard, start, stop)
        for name, expected in made["blocks"][shard].items():
            assert block[name].dtype == expected.dtype
            np.testing.assert_array_equal(block[name], expected[start:stop], err_msg=name)
    index = data.index.to_pylist()
    assert [r["pair_id"] for r in index] == [f"pair-{i:03d}" for i in range(11)]
    assert [(r["shard"], r["row"]) for r in index] == [(0, i) for i in range(8)] + [(1, i) for i in range(3)]
    assert index[5]["status"] == "failed" and index[5]["reason"] == "cannot decode image"
    assert index[5]["image_b_sha256"] is None and index[4]["split"] == "val"
    assert data.block_index(1, 1, 3).column("pair_id").to_pylist() == ["pair-009", "pair-010"]
    assert data.locate("pair-009") == (1, 1)
    one = data.read_rows(1, 2, 3, names=["match_count", "cv_ba_prob"])
    assert set(one) == {"match_count", "cv_ba_prob"} and one["cv_ba_prob"].shape == (1, 12, 4)


def test_pair_trims_matches_and_scales_probabilities(tmp_path, b_make_dataset):
    made = b_make_dataset(tmp_path / "ds")
    data = TargetDataset.open(tmp_path / "ds")
    pair = data.pair("pair-010")
    raw = {name: value[2] for name, value in made["blocks"][1].items()}
    count = int(raw["match_count"])
    assert pair["pair_id"] == "pair-010" and pair["status"] == "ok" and pair["shard"] == 1 and pair["row"] == 2
    assert pair["match_xy_a"].shape == (count, 2)
    np.testing.assert_array_equal(pair["match_points_b"], raw["match_points_b"][:count])
    assert pair["cv_ab_prob"].dtype == np.float32
    np.testing.assert_allclose(pair["cv_ab_prob"] * PROB_SCALE, raw["cv_ab_prob"], rtol=1e-6)
    assert (pair["cv_ab_prob"].sum(-1) <= 1 + 1e-6).all()
    failed = data.pair("pair-005")
    assert failed["status"] == "failed" and len(failed["match_xy_a"]) == 0 and not failed["depth_a"].any()
    with pytest.raises(KeyError, match="nope"):
        data.pair("nope")
    with pytest.raises(IndexError):
        data.read_rows(1, 0, 4)


def _bad_input(case, arrays, rows):
    if case == "dtype":
        arrays["match_xy_a"] = arrays["match_xy_a"].astype(np.float64)
    elif case == "shape":
        arrays["depth_a"] = arrays["depth_a"][:, :3]
    elif case == "missing":
        del arrays["cv_ba_valid"]
    elif case == "extra":
        arrays["bonus"] = np.zeros(len(rows))
    elif case == "nan":
        arrays["match_depth_b"][1, 0] = np.nan
    elif case == "status":
        rows[2]["status"] = "maybe"
    elif case == "duplicate":
        rows[3]["pair_id"] = rows[0]["pair_id"]
    elif case == "unknown key":
        rows[0]["colour"] = "red"
    elif case == "failed nonzero":
        rows[1].update(status="failed", reason="x")


@pytest.mark.parametrize("case, message", [
    ("dtype", "'match_xy_a': dtype float64, expected float32"),
    ("shape", r"'depth_a': shape \(4, 3, 6\)"),
    ("missing", "missing array.*cv_ba_valid"),
    ("extra", "not in the feature table: bonus"),
    ("nan", r"row 1 \(pair_id 'pair-001'\), array 'match_depth_b': 1 NaN/Inf"),
    ("status", "status must be"),
    ("duplicate", "repeated: 'pair-000'"),
    ("unknown key", "unknown key.*colour"),
    ("failed nonzero", r"row 1 \(pair_id 'pair-001'\), array .*nonzero values in a failed row"),
])
def test_write_shard_rejects_bad_input_and_leaves_nothing(tmp_path, b_layout, b_random_block, case, message):
    arrays, rows = b_random_block(b_layout, 4)
    _bad_input(case, arrays, rows)
    with pytest.raises(FormatError, match=message):
        write_shard(tmp_path, 0, arrays, rows, b_layout)
    assert not (tmp_path / "shards").exists() or os.listdir(tmp_path / "shards") == []


def test_write_shard_publishes_atomically_with_a_record(tmp_path, b_layout, b_random_block):
    arrays, rows = b_random_block(b_layout, 6)
    record = write_shard(tmp_path, 3, arrays, rows, b_layout)
    assert sorted(os.listdir(tmp_path / "shards")) == ["shard-00003.json", "shard-00003.zarr"]
    assert record == read_record(tmp_path, 3)
    assert record["pairs"] == 6 and [r["pair_id"] for r in record["rows"]] == [r["pair_id"] for r in rows]
    on_disk = _tree(shard_path(tmp_path, 3))
    assert set(record["files"]) == set(on_disk)
    assert record["bytes"] == sum(len(v) for v in on_disk.values())
    assert checksum_of_files(record["files"]) == record["sha256"]
    # Every chunk is stored, also the all-zero ones (no silent fill values), and no sharding codec is used.
    assert sum(1 for name in on_disk if "/c/" in name) == len(FEATURES) * 2
    meta = json.loads(on_disk["cv_ab_index/zarr.json"])
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 12, 4]
    with pytest.raises(FormatError, match="exists already"):
        write_shard(tmp_path, 3, arrays, rows, b_layout)


def test_rewriting_gives_byte_identical_files(tmp_path, b_make_dataset):
    first = b_make_dataset(tmp_path / "one")["root"]
    second = b_make_dataset(tmp_path / "two")["root"]
    one, two = _tree(first), _tree(second)
    assert list(one) == list(two)
    assert one == two  # shards, records, index.parquet and card.json
    # Rewriting a removed shard in place reproduces it too.
    shutil.rmtree(shard_path(first, 1))
    assert remove_torn(first, 1)
    made_rows = TargetDataset.open(second).block_index(1, 0, 3).to_pylist()
    arrays = TargetDataset.open(second).read_rows(1, 0, 3)
    rows = [{k: r[k] for k in r if k not in ("shard", "row")} for r in made_rows]
    write_shard(first, 1, arrays, rows, TargetDataset.open(second).layout)
    assert _tree(first) == two


# ---- interruption: torn shards ---------------------------------------------------------------------------

def test_torn_shards_are_detected_and_removed(tmp_path, b_layout, b_random_block):
    arrays, rows = b_random_block(b_layout, 4)
    write_shard(tmp_path, 0, arrays, rows, b_layout)
    write_shard(tmp_path, 1, arrays, [{**r, "pair_id": r["pair_id"] + "b"} for r in rows], b_layout)
    shards = tmp_path / "shards"
    # A crash after the rename but before the record: directory without record.
    (shards / "shard-00001.json").unlink()
    # A crash while writing: temporary directory and temporary record of shard 1, and one of shard 0.
    (shards / ".tmp-shard-00001-4242.zarr" / "x").mkdir(parents=True)
    (shards / ".tmp-shard-00001.json-4242").write_text("{")
    (shards / ".tmp-shard-00000-77.zarr").mkdir()
    assert shard_is_complete(tmp_path, 0) and not shard_is_complete(tmp_path, 1)
    assert remove_torn(tmp_path, 1)
    assert sorted(os.listdir(shards)) == [".tmp-shard-00000-77.zarr", "shard-00000.json", "shard-00000.zarr"]
    assert not remove_torn(tmp_path, 1)
    assert remove_torn(tmp_path, 0) and shard_is_complete(tmp_path, 0)  # only the leftover went
    # Damage inside a recorded shard: only a verifying check notices, and remove_torn then drops it.
    chunk = shard_path(tmp_path, 0) / "match_conf" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    assert shard_is_complete(tmp_path, 0, verify=False) and not shard_is_complete(tmp_path, 0)
    assert not remove_torn(tmp_path, 0, verify=False)
    assert remove_torn(tmp_path, 0) and os.listdir(shards) == []
    write_shard(tmp_path, 0, arrays, rows, b_layout)
    assert shard_is_complete(tmp_path, 0)


def test_finalize_refuses_incomplete_or_inconsistent_shards(tmp_path, b_layout, b_random_block):
    teacher = {"name": "t", "scene_units": "metres"}
    arrays, rows = b_random_block(b_layout, 4)
    write_shard(tmp_path, 0, arrays, rows, b_layout)
    with pytest.raises(FormatError, match="shard-00001.zarr: shard missing"):
        finalize_dataset(tmp_path, n_shards=2, layout=b_layout, teacher=teacher)
    write_shard(tmp_path, 1, arrays, rows, b_layout)
    with pytest.raises(FormatError, match="more than one shard: 'pair-000'"):
        finalize_dataset(tmp_path, n_shards=2, layout=b_layout, teacher=teacher)
    with pytest.raises(FormatError, match="unexpected entries shard-00001.json, shard-00001.zarr"):
        finalize_dataset(tmp_path, n_shards=1, layout=b_layout, teacher=teacher)
    other = DatasetLayout.from_dict({**b_layout.to_dict(), "pairs_per_shard": 16})
    with pytest.raises(FormatError, match="written with layout"):
        finalize_dataset(tmp_path, n_shards=2, layout=other, teacher=teacher)
    with pytest.raises(ConfigError, match="derives counts"):
        finalize_dataset(tmp_path, n_shards=1, layout=b_layout, teacher=teacher, counts={})


# ---- reading through fsspec ------------------------------------------------------------------------------

def _copy_to_memory(root: Path, prefix: str) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"/{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())
    return f"memory://{prefix}"


def test_reading_through_fsspec_urls(tmp_path, b_make_dataset):
    import fsspec

    made = b_make_dataset(tmp_path / "ds")
    url = _copy_to_memory(tmp_path / "ds", "geod-test-read")
    try:
        for source in (url, f"file://{tmp_path / 'ds'}"):
            data = TargetDataset.open(source)
            assert data.card.counts.pairs == 11 and data.index.num_rows == 11
            for shard, start, stop in data.iter_blocks():
                block = data.read_rows(shard, start, stop)
                for name, expected in made["blocks"][shard].items():
                    np.testing.assert_array_equal(block[name], expected[start:stop], err_msg=f"{source} {name}")
            assert data.pair("pair-003")["pair_id"] == "pair-003"
    finally:
        fsspec.filesystem("memory").rm("/geod-test-read", recursive=True)


def test_open_rejects_an_index_that_disagrees_with_the_card(tmp_path, b_make_dataset):
    import pyarrow.parquet as pq

    b_make_dataset(tmp_path / "ds")
    table = pq.read_table(tmp_path / "ds" / "index.parquet")
    pq.write_table(table.slice(0, 10), tmp_path / "ds" / "index.parquet")
    with pytest.raises(FormatError, match="index has 10 rows"):
        TargetDataset.open(tmp_path / "ds")
    pq.write_table(table.drop_columns(["reason"]), tmp_path / "ds" / "index.parquet")
    with pytest.raises(FormatError, match="column 'reason' missing"):
        TargetDataset.open(tmp_path / "ds")


def test_reader_checks_a_shard_against_the_card_on_first_use(tmp_path, b_make_dataset):
    import zarr

    b_make_dataset(tmp_path / "ds")
    group = zarr.open_group(shard_path(tmp_path / "ds", 1), mode="r+")
    del group["depth_conf_b"]
    data = TargetDataset.open(tmp_path / "ds")
    assert data.read_rows(0, 0, 4)["depth_conf_b"].shape == (4, 4, 6)
    with pytest.raises(FormatError, match=r"shard 1\), array 'depth_conf_b': missing"):
        data.read_rows(1, 0, 3)


def test_reader_names_a_damaged_chunk(tmp_path, b_make_dataset):
    b_make_dataset(tmp_path / "ds")
    chunk = shard_path(tmp_path / "ds", 0) / "cv_ab_index" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x01
    chunk.write_bytes(bytes(data))
    dataset = TargetDataset.open(tmp_path / "ds")
    assert dataset.read_rows(0, 0, 4)["cv_ab_index"].shape == (4, 12, 4)
    with pytest.raises(FormatError, match=r"\(shard 0\) rows 4-7, array 'cv_ab_index': cannot read"):
        dataset.read_rows(0, 4, 8)


def test_match_coordinates_keep_sub_pixel_precision_at_2048_px(tmp_path, b_layout, b_random_block):
    """The product requirement: stored normalised coordinates are within 0.01 px of the truth at 2048 px."""
    from geod.pipeline.format_spec import FEATURE_BY_NAME

    assert FEATURE_BY_NAME["match_xy_a"].dtype == FEATURE_BY_NAME["match_xy_b"].dtype == "float32"
    arrays, rows = b_random_block(b_layout, 4)
    x = np.random.default_rng(0).uniform(0, 2048, arrays["match_xy_a"].shape)  # sub-pixel positions
    live = arrays["match_xy_a"] != 0
    arrays["match_xy_a"] = np.where(live, x / 2048, 0).astype(np.float32)
    write_shard(tmp_path, 0, arrays, rows, b_layout)
    finalize_dataset(tmp_path, n_shards=1, layout=b_layout, teacher={"name": "t", "scene_units": "metres"})
    stored = TargetDataset.open(tmp_path).read_rows(0, 0, 4, names=["match_xy_a"])["match_xy_a"]
    assert np.abs(stored.astype(np.float64) * 2048 - x)[live].max() <= 0.01


def test_write_dataset_cuts_pairs_into_shards_and_finalises(tmp_path, b_layout):
    from geod.pipeline.reader import TargetDataset
    from geod.pipeline.shard_io import write_dataset, zero_arrays

    n = b_layout.pairs_per_shard + 3
    pairs = [{name: value[0] for name, value in zero_arrays(b_layout, 1).items()} for _ in range(n)]
    rows = [{"pair_id": f"p{i}", "scene_id": "s", "split": None, "image_a": "a.png", "image_b": "b.png",
             "image_a_sha256": None, "image_b_sha256": None, "status": "failed", "reason": "test"}
            for i in range(n)]
    card = write_dataset(tmp_path, pairs, rows, b_layout, teacher={"name": "t", "scene_units": "metres"})
    assert card.counts.shards == 2 and card.counts.pairs == n and card.counts.failed == n
    assert TargetDataset.open(tmp_path).index.column("pair_id").to_pylist() == [f"p{i}" for i in range(n)]
    with pytest.raises(ConfigError, match="as many index rows"):
        write_dataset(tmp_path / "other", pairs, rows[:-1], b_layout, teacher={"name": "t", "scene_units": "m"})
