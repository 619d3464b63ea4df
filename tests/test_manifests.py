"""Pair manifests: round trips, and validation errors that name the row and the field."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geod.data_manifests.manifest import MAX_LISTED_PROBLEMS, load_manifest, write_manifest
from geod.pipeline.errors import GeodError, ManifestError

K = [100.0, 0.0, 31.5, 0.0, 101.0, 23.5, 0.0, 0.0, 1.0]


def _pose(tx: float) -> list[float]:
    c, s = np.cos(0.3), np.sin(0.3)
    return [c, -s, 0.0, tx, s, c, 0.0, 0.5, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0]


def _rgbd(i: int, **changes) -> dict:
    row = {"pair_id": f"p{i}", "scene_id": "s0", "image_a": f"color/{i}.jpg", "image_b": f"color/{i + 1}.jpg",
           "depth_a": f"depth/{i}.png", "depth_b": f"depth/{i + 1}.png", "depth_scale": 1000.0,
           "intrinsics_a": K, "intrinsics_b": K, "pose_a": _pose(0.0), "pose_b": _pose(0.2), "split": "train"}
    row.update(changes)
    return row


def _stereo(i: int) -> dict:
    return {"pair_id": f"st{i}", "scene_id": "mb", "image_a": "left.png", "image_b": "right.png",
            "disparity_a": "disp.npy", "baseline": 0.19, "intrinsics_a": K}


def _write_raw(rows: list[dict], path) -> None:
    """Write rows with pyarrow directly, bypassing validation, to test the reader's checks."""
    names = sorted({k for r in rows for k in r})
    pq.write_table(pa.table({n: [r.get(n) for r in rows] for n in names}), path)


def test_round_trip_keeps_values_types_and_extras(tmp_path):
    rows = [_rgbd(0, overlap=0.61), _rgbd(1, overlap=0.42), _stereo(0),
            {"pair_id": "img0", "scene_id": "s1", "image_a": "a.jpg", "image_b": "b.jpg"}]
    rows[1]["pose_a"] = np.asarray(rows[1]["pose_a"]).reshape(4, 4)  # numpy matrices are accepted too
    path = write_manifest(rows, tmp_path / "sub" / "pairs.parquet")
    manifest = load_manifest(path)

    assert manifest.base_dir == (tmp_path / "sub").absolute()
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [r.pair_id for r in manifest.rows] == ["p0", "p1", "st0", "img0"]
    assert [r.index for r in manifest.rows] == [0, 1, 2, 3]
    assert [r.kind for r in manifest.rows] == ["rgbd", "rgbd", "stereo", "images"]
    first = manifest.rows[0]
    assert first.intrinsics_a.shape == (3, 3) and first.intrinsics_a.dtype == np.float64
    np.testing.assert_array_equal(first.intrinsics_a.reshape(-1), K)
    np.testing.assert_array_equal(manifest.rows[1].pose_a.reshape(-1), _pose(0.0))
    assert first.pose_b.shape == (4, 4) and first.pose_b[0, 3] == 0.2
    assert first.depth_scale == 1000.0 and first.split == "train" and first.extra == {"overlap": 0.61}
    stereo = manifest.rows[2]
    assert stereo.baseline == 0.19 and stereo.pose_a is None and stereo.depth_a is None
    assert manifest.rows[3].intrinsics_a is None and manifest.rows[3].split is None

    # Rewriting the loaded rows reproduces the file byte for byte (no timestamps, stable column order).
    again = write_manifest(manifest.rows, tmp_path / "again.parquet")
    assert again.read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob("**/.*tmp*"))


def test_reader_lists_every_problem_with_row_and_field(tmp_path):
    bad_k = list(K)
    bad_k[0] = -5.0
    bad_pose = _pose(0.0)
    bad_pose[12] = 0.3
    rows = [
        _rgbd(0),
        _rgbd(1, pose_a=_pose(0.0)[:12]),
        _rgbd(2, intrinsics_b=K[:4] + [float("nan")] + K[5:]),
        _rgbd(3, intrinsics_a=bad_k, pose_b=bad_pose),
        _rgbd(4, pair_id="p0"),
        _rgbd(5, pose_b=None),
        _rgbd(6, disparity_a="d.npy"),
        _rgbd(7, depth_scale=0.0),
        _rgbd(8, image_b=None),
        {"pair_id": "x9", "scene_id": "s", "image_a": "a", "image_b": "b", "baseline": 0.1},
    ]
    path = tmp_path / "bad.parquet"
    _write_raw(rows, path)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    expected = [
        "row 1 (pair_id 'p1'), field 'pose_a': expected 16 floats, got 12",
        "row 2 (pair_id 'p2'), field 'intrinsics_b': element 4 is nan, expected a finite number",
        "row 3 (pair_id 'p3'), field 'intrinsics_a': fx and fy must be > 0",
        "row 3 (pair_id 'p3'), field 'pose_b': bottom row must be [0, 0, 0, 1]",
        "row 4 (pair_id 'p0'), field 'pair_id': duplicate of row 0",
        "row 5 (pair_id 'p5'), field 'pose_b': missing; an RGB-D row needs",
        "row 6 (pair_id 'p6'), field 'pose_a': not allowed together with disparity_a",
        "row 6 (pair_id 'p6'), field 'depth_a': not allowed together with disparity_a",
        "row 7 (pair_id 'p7'), field 'depth_scale': must be a finite number > 0, got 0.0",
        "row 8 (pair_id 'p8'), field 'image_b': required value is missing",
        "row 9 (pair_id 'x9'), field 'baseline': given without disparity_a",
    ]
    for line in expected:
        assert line in message
    assert "row 0 " not in message  # the good row is not blamed

    # The writer applies the same checks and leaves nothing behind.
    target = tmp_path / "out.parquet"
    with pytest.raises(ManifestError, match=r"row 1 \(pair_id 'p1'\), field 'pose_a'"):
        write_manifest(rows, target)
    assert not target.exists() and not list(tmp_path.glob(".*tmp*"))


def test_rotation_must_be_rigid(tmp_path):
    scaled = _pose(0.0)
    scaled[0] *= 2.0
    with pytest.raises(ManifestError, match=r"row 0 \(pair_id 'p0'\), field 'pose_a': rotation part"):
        write_manifest([_rgbd(0, pose_a=scaled)], tmp_path / "m.parquet")


def test_column_level_problems(tmp_path):
    missing = tmp_path / "missing.parquet"
    _write_raw([{"pair_id": "a", "scene_id": "s", "image_a": "x"}], missing)
    with pytest.raises(ManifestError, match="column 'image_b': missing"):
        load_manifest(missing)

    wrong_type = tmp_path / "wrong.parquet"
    _write_raw([{**_stereo(0), "intrinsics_a": "100 0 30 0 100 20 0 0 1"}], wrong_type)
    with pytest.raises(ManifestError, match=r"column 'intrinsics_a': expected list<float64>, got string"):
        load_manifest(wrong_type)


def test_unknown_and_all_null_columns_are_tolerated(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table({"pair_id": ["a"], "scene_id": ["s"], "image_a": ["x.jpg"], "image_b": ["y.jpg"],
                      "depth_a": pa.array([None], type=pa.null()), "my_note": [7]})
    pq.write_table(table, path)
    row = load_manifest(path).rows[0]
    assert row.depth_a is None and row.extra == {"my_note": 7}


def test_problem_list_is_capped(tmp_path):
    rows = [_rgbd(i, pose_a=[1.0]) for i in range(80)]
    with pytest.raises(ManifestError) as info:
        write_manifest(rows, tmp_path / "m.parquet")
    lines = str(info.value).splitlines()
    assert lines[0].endswith("80 problem(s) in the pair manifest (rows numbered from 0):")
    assert len(lines) == 1 + MAX_LISTED_PROBLEMS + 1
    assert lines[-1].strip() == f"... and {80 - MAX_LISTED_PROBLEMS} more"


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ManifestError, match="pair manifest not found"):
        load_manifest(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file at all")
    with pytest.raises(ManifestError, match="cannot read the pair manifest as parquet"):
        load_manifest(junk)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"pair_id": pa.array([], pa.string()), "scene_id": pa.array([], pa.string()),
                             "image_a": pa.array([], pa.string()), "image_b": pa.array([], pa.string())}), empty)
    with pytest.raises(ManifestError, match="has no rows"):
        load_manifest(empty)
    assert issubclass(ManifestError, GeodError)


def test_failed_write_keeps_the_previous_manifest(tmp_path):
    path = write_manifest([_rgbd(0)], tmp_path / "m.parquet")
    before = path.read_bytes()
    with pytest.raises(ManifestError):
        write_manifest([_rgbd(0, pose_a=[0.0] * 16)], path)
    assert path.read_bytes() == before
