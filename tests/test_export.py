"""Exports of a target dataset: webdataset tars and one HDF5 file, read back by their own libraries."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from geod.pipeline.card import read_card
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.export import export_command
from geod.pipeline.export_hdf5 import export_hdf5
from geod.pipeline.export_webdataset import export_webdataset, pair_id_from_key, sample_key
from geod.pipeline.format_spec import PROB_SCALE
from geod.pipeline.reader import TargetDataset

MATCH_ARRAYS = ("match_xy_a", "match_xy_b", "match_conf", "match_depth_a", "match_depth_b", "match_points_a",
                "match_points_b")
N_PAIRS, FAILED = 11, (5,)  # pairs 4 and 9 are in split "val", the rest (failed pair 5 too) in "train"


def _pair_id(number: int) -> str:
    """Pair ids with dots, slashes, spaces, '%', '~' and non-ASCII text; one longer than a ustar name."""
    if number == 3:
        return "long.name." + "x" * 150 + ".3"
    return f"scene{number // 4}.v1/frame {number:03d}%{'üñ~'[number % 3]}.jpg"


def _make(root: Path, layout, random_block, *, extra=None) -> dict:
    from geod.pipeline.shard_io import finalize_dataset, write_shard

    per = layout.pairs_per_shard
    blocks, rows = [], []
    for shard, first in enumerate(range(0, N_PAIRS, per)):
        arrays, shard_rows = random_block(layout, min(per, N_PAIRS - first), first=first, seed=10 + shard,
                                          failed=FAILED)
        for i, row in enumerate(shard_rows):
            row["pair_id"] = _pair_id(first + i)
        write_shard(root, shard, arrays, shard_rows, layout)
        blocks.append(arrays)
        rows += shard_rows
    finalize_dataset(root, n_shards=len(blocks), layout=layout, dataset_version="1.0.0",
                     teacher={"name": "geometry", "scene_units": "metres"}, licence="CC-BY-4.0",
                     source={"manifest": "pairs.parquet", "manifest_sha256": "0" * 64, "base_dir": "/data"},
                     extra=extra or {})
    flat = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    return {"root": root, "arrays": flat, "rows": rows}


@pytest.fixture(scope="module")
def source(tmp_path_factory, b_layout, b_random_block) -> dict:
    """A read-only two-shard dataset (11 pairs, pair 5 failed) with awkward pair ids."""
    return _make(tmp_path_factory.mktemp("source") / "ds", b_layout, b_random_block)


def _ok(source) -> list[int]:
    return [i for i, row in enumerate(source["rows"]) if row["status"] == "ok"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- sample keys --------------------------------------------------------------------------------------------

def test_sample_key_is_dot_free_reversible_and_one_to_one():
    ids = ["a.b", "a%2Eb", "a/b", "a b", "ü", "~", "%", "plain-id_1", "x" * 300, "a.b.c/d.e"]
    keys = [sample_key(pid) for pid in ids]
    assert sample_key("a.b") == "a%2Eb" and sample_key("a%2Eb") == "a%252Eb" and sample_key("ü") == "%C3%BC"
    assert sample_key("plain-id_1") == "plain-id_1"
    assert len(set(keys)) == len(ids)
    for pid, key in zip(ids, keys):
        assert pair_id_from_key(key) == pid
        assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_%")
    with pytest.raises(FormatError, match="non-empty"):
        sample_key("")


# ---- webdataset -------------------------------------------------------------------------------------------

def test_webdataset_export_reads_back_with_webdataset_equal_to_the_dataset(tmp_path, source):
    import webdataset as wds

    summary = export_webdataset(source["root"], tmp_path / "wds", samples_per_tar=4, progress=False)
    tars = sorted((tmp_path / "wds").glob("targets-*.tar"))
    assert [t.name for t in tars] == ["targets-000000.tar", "targets-000001.tar", "targets-000002.tar"]
    assert summary.pairs == 10 and summary.failed_skipped == 1 and [f.pairs for f in summary.files] == [4, 4, 2]

    data = TargetDataset.open(source["root"])
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode())
    assert [s["json"]["pair_id"] for s in samples] == [source["rows"][i]["pair_id"] for i in _ok(source)]
    for sample in samples:
        info = sample["json"]
        expected = data.pair(info["pair_id"])
        assert pair_id_from_key(sample["__key__"]) == info["pair_id"] == expected["pair_id"]
        assert info["key"] == sample["__key__"] and "." not in sample["__key__"]
        for field in ("scene_id", "split", "image_a", "image_b", "image_a_sha256", "image_b_sha256", "status",
                      "reason"):
            assert info[field] == expected[field], field
        assert (info["source_shard"], info["source_row"]) == (expected["shard"], expected["row"])
        assert info["match_count"] == int(expected["match_count"]) and info["prob_scale"] == PROB_SCALE
        assert info["features"] == "card.json#/features" and info["scene_units"] == "metres"
        arrays = {k[:-len(".npy")]: v for k, v in sample.items() if k.endswith(".npy")}
        assert set(arrays) == set(data.feature_names)
        for name, got in arrays.items():
            if name.endswith("_prob"):  # stored uint16; pair() gives floats
                assert got.dtype == np.uint16 and got.shape == expected[name].shape
                np.testing.assert_array_equal(got.astype(np.float32) / np.float32(info["prob_scale"]),
                                              expected[name], err_msg=name)
            else:
                assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
                np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_webdataset_tars_read_with_tarfile_and_np_load(tmp_path, source):
    out = tmp_path / "wds"
    summary = export_webdataset(source["root"], out, samples_per_tar=3, progress=False)
    ok = _ok(source)
    seen = []
    for tar_path in sorted(out.glob("targets-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            for m in members:
                assert m.isreg() and (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            names = [m.name for m in members]
            keys = list(dict.fromkeys(name.split(".", 1)[0] for name in names))
            for key in keys:
                at = [j for j, n in enumerate(names) if n.split(".", 1)[0] == key]
                own = [names[j] for j in at]
                assert at == list(range(at[0], at[0] + len(at)))  # a sample's members are contiguous...
                assert own == sorted(own) and len(own) == len(source["arrays"]) + 1  # ...sorted, arrays + json
                info = json.loads(tar.extractfile(f"{key}.json").read())
                i = ok[len(seen)]
                assert info["pair_id"] == source["rows"][i]["pair_id"] and pair_id_from_key(key) == info["pair_id"]
                count = int(source["arrays"]["match_count"][i])
                for name, stored in source["arrays"].items():
                    got = np.load(io.BytesIO(tar.extractfile(f"{key}.{name}.npy").read()), allow_pickle=False)
                    want = stored[i][:count] if name in MATCH_ARRAYS else stored[i]
                    assert got.dtype == want.dtype and got.shape == want.shape, name
                    np.testing.assert_array_equal(got, want, err_msg=name)
                seen.append(info["pair_id"])
    assert len(seen) == len(ok) == summary.pairs

    sums = (out / "SHA256SUMS").read_text().splitlines()
    card = json.loads((out / "card.json").read_bytes())
    listed = [(f["sha256"], f["name"]) for f in card["export"]["files"]]
    assert [tuple(line.split("  ")) for line in sums] == listed
    for digest, name in listed:
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    source_card = json.loads((source["root"] / "card.json").read_bytes())
    assert {k: v for k, v in card.items() if k != "export"} == source_card
    assert card["export"]["format"] == "webdataset" and card["export"]["pairs"] == 10
    card_bytes = (source["root"] / "card.json").read_bytes()
    assert card["export"]["source_card_sha256"] == hashlib.sha256(card_bytes).hexdigest()
    assert card["export"]["options"] == {"samples_per_tar": 3, "split": None, "include_failed": False,
                                         "name": "targets"}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert read_card(out).unknown["export"] == card["export"]  # the copy still parses as a card


def test_exports_are_byte_deterministic(tmp_path, source):
    for run in ("a", "b"):
        export_webdataset(source["root"], tmp_path / run, samples_per_tar=4, progress=False)
        export_hdf5(source["root"], tmp_path / f"{run}.h5", progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_webdataset_split_and_failed_pairs(tmp_path, source):
    import webdataset as wds

    summary = export_webdataset(source["root"], tmp_path / "val", split="val", progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "val" / "targets-000000.tar"), shardshuffle=False).decode())
    assert [s["json"]["pair_id"] for s in samples] == [_pair_id(4), _pair_id(9)] and summary.split == "val"

    summary = export_webdataset(source["root"], tmp_path / "all", include_failed=True, progress=False)
    samples = list(wds.WebDataset(str(tmp_path / "all" / "targets-000000.tar"), shardshuffle=False).decode())
    assert len(samples) == N_PAIRS and summary.failed_included == 1
    assert len({frozenset(s) - {"__key__", "__url__"} for s in samples}) == 1  # one schema for every sample
    failed = samples[5]
    assert failed["json"]["status"] == "failed" and failed["json"]["reason"] == "cannot decode image"
    assert failed["json"]["match_count"] == 0 and failed["match_xy_a.npy"].shape == (0, 2)
    assert not failed["cv_ab_prob.npy"].any() and not failed["depth_a.npy"].any()

    with pytest.raises(ConfigError, match=r"no pair has split 'test'.*'train', 'val'"):
        export_webdataset(source["root"], tmp_path / "test", split="test", progress=False)
    with pytest.raises(ConfigError, match="samples_per_tar"):
        export_webdataset(source["root"], tmp_path / "bad", samples_per_tar=0, progress=False)
    with pytest.raises(ConfigError, match="name"):
        export_webdataset(source["root"], tmp_path / "bad", name="a.b", progress=False)


def test_webdataset_refuses_an_earlier_export_and_overwrite_removes_stale_tars(tmp_path, source):
    out = tmp_path / "wds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / ".tmp-targets-000003.tar-999999").write_bytes(b"left by a killed export")
    export_webdataset(source["root"], out, samples_per_tar=2, progress=False)
    assert len(list(out.glob("targets-*.tar"))) == 5
    with pytest.raises(ConfigError, match=r"earlier \(or interrupted\) export.*overwrite"):
        export_webdataset(source["root"], out, samples_per_tar=8, progress=False)
    export_webdataset(source["root"], out, samples_per_tar=8, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "card.json", "notes.txt", "targets-000000.tar",
                                                     "targets-000001.tar"]


def test_an_interrupted_export_leaves_no_partial_output(tmp_path, source, monkeypatch):
    real = TargetDataset.read_rows
    calls = []

    def failing(self, shard, start, stop, names=None):
        calls.append(shard)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real(self, shard, start, stop, names)

    monkeypatch.setattr(TargetDataset, "read_rows", failing)
    out = tmp_path / "wds"
    with pytest.raises(OSError, match="disk went away"):
        export_webdataset(source["root"], out, samples_per_tar=2, progress=False)
    assert list(out.iterdir()) == []  # two tars had been published before the failure; both are gone
    calls.clear()
    with pytest.raises(OSError, match="disk went away"):
        export_hdf5(source["root"], tmp_path / "t.h5", progress=False)
    assert list(tmp_path.glob("*.h5*")) == [] and not list(tmp_path.glob(".tmp*"))


def test_exports_read_whole_chunk_aligned_blocks_and_skip_unselected_ones(tmp_path, source, monkeypatch):
    real = TargetDataset.read_rows
    calls = []

    def recording(self, shard, start, stop, names=None):
        calls.append((shard, start, stop, names))
        return real(self, shard, start, stop, names)

    def no_pair_reads(self, pair_id):
        raise AssertionError("exports must not read pair by pair")

    monkeypatch.setattr(TargetDataset, "read_rows", recording)
    monkeypatch.setattr(TargetDataset, "pair", no_pair_reads)
    export_webdataset(source["root"], tmp_path / "wds", split="val", progress=False)
    export_hdf5(source["root"], tmp_path / "val.h5", split="val", progress=False)
    # Pair 4 lies in block [4, 8) of shard 0, pair 9 in block [0, 3) of shard 1; block [0, 4) holds no val pair.
    assert calls == [(0, 4, 8, None), (1, 0, 3, None)] * 2
    calls.clear()
    export_hdf5(source["root"], tmp_path / "all.h5", progress=False)
    assert calls == [(0, 0, 4, None), (0, 4, 8, None), (1, 0, 3, None)]


# ---- HDF5 -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_hdf5_export_reads_back_exactly_with_h5py(tmp_path, source, compression):
    import h5py

    out = tmp_path / "targets.h5"
    summary = export_hdf5(source["root"], out, compression=compression, progress=False)
    ok = _ok(source)
    assert summary.pairs == len(ok) and summary.files[0].sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    source_card = json.loads((source["root"] / "card.json").read_bytes())
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "geod-targets-hdf5" and f.attrs["prob_scale"] == PROB_SCALE
        card = json.loads(f.attrs["card"])
        assert {k: v for k, v in card.items() if k != "export"} == source_card
        assert card["export"]["format"] == "hdf5" and card["export"]["options"]["compression"] == compression
        for name, stored in source["arrays"].items():
            dset = f[name]
            assert dset.dtype == stored.dtype and dset.shape == (len(ok), *stored.shape[1:]), name
            assert dset.chunks[1:] == stored.shape[1:] and dset.compression == compression and dset.fletcher32
            np.testing.assert_array_equal(dset[:], stored[ok], err_msg=name)
            assert dset.attrs["units"] == source_card["features"][name]["units"]
        for column in ("pair_id", "scene_id", "split", "image_a", "image_b", "image_a_sha256", "image_b_sha256",
                       "status", "reason"):
            assert f[column].asstr()[:].tolist() == [source["rows"][i][column] or "" for i in ok], column
        assert f["source_shard"][:].tolist() == [i // 8 for i in ok]
        assert f["source_row"][:].tolist() == [i % 8 for i in ok]
        assert {f[name].shape[0] for name in f} == {len(ok)}  # one table: every dataset has the pair axis first


def test_hdf5_failed_pairs_big_card_and_errors(tmp_path, source, b_layout, b_random_block):
    import h5py

    out = tmp_path / "all.h5"
    export_hdf5(source["root"], out, include_failed=True, progress=False)
    with h5py.File(out, "r") as f:
        assert f["status"].asstr()[:].tolist() == ["failed" if i in FAILED else "ok" for i in range(N_PAIRS)]
        assert f["reason"].asstr()[5] == "cannot decode image"
        assert not f["cv_ab_prob"][5].any() and f["match_count"][5] == 0
    with pytest.raises(ConfigError, match="exists already"):
        export_hdf5(source["root"], out, progress=False)
    export_hdf5(source["root"], out, split="val", overwrite=True, progress=False)
    with h5py.File(out, "r") as f:
        assert f["pair_id"].asstr()[:].tolist() == [_pair_id(4), _pair_id(9)]
    with pytest.raises(ConfigError, match="compression"):
        export_hdf5(source["root"], tmp_path / "x.h5", compression="zstd", progress=False)

    # A card larger than the 64 KiB of a compact HDF5 attribute still fits.
    big = _make(tmp_path / "big", b_layout, b_random_block, extra={"notes": "n" * 100_000})
    export_hdf5(big["root"], tmp_path / "big.h5", progress=False)
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert json.loads(f.attrs["card"])["extra"]["notes"] == "n" * 100_000


# ---- the command body -----------------------------------------------------------------------------------

def test_export_command_dispatches_reads_urls_and_rejects_misplaced_options(tmp_path, source):
    import fsspec
    import h5py

    fs = fsspec.filesystem("memory")
    for path in sorted(source["root"].rglob("*")):
        if path.is_file():
            fs.pipe_file(f"/geod-test-export/{path.relative_to(source['root']).as_posix()}", path.read_bytes())
    try:
        summary = export_command("memory://geod-test-export", tmp_path / "t.h5", "hdf5", compression="none",
                                 progress=False)
    finally:
        fs.rm("/geod-test-export", recursive=True)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["match_xy_a"].compression is None and f["pair_id"].shape == (10,)
    assert "10 pairs" in summary.describe() and "1 failed pair(s) left out" in summary.describe()

    summary = export_command(str(source["root"]), tmp_path / "wds", "webdataset", split="train",
                             samples_per_tar=5, progress=False)
    assert summary.pairs == 8 and [f.pairs for f in summary.files] == [5, 3]
    with pytest.raises(ConfigError, match="unknown export format 'zarr'"):
        export_command(str(source["root"]), tmp_path / "z", "zarr")
    with pytest.raises(ConfigError, match="hdf5 exports only"):
        export_command(str(source["root"]), tmp_path / "w2", "webdataset", compression="lzf")
    with pytest.raises(ConfigError, match="webdataset exports only"):
        export_command(str(source["root"]), tmp_path / "h.h5", "hdf5", samples_per_tar=10)
