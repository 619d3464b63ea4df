"""ScanNet-layout pair builder, run on synthetic scenes written in that layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from geod.data_manifests.manifest import load_manifest
from geod.data_manifests.scannet import ScanNetPairConfig, build_scannet_pairs, write_scannet_manifest
from geod.data_manifests.synthetic import SyntheticConfig, write_synthetic_scenes
from geod.data_manifests.views import load_pair
from geod.pipeline.errors import ConfigError, InputReadError, ManifestError

W, H, FRAMES = 64, 48, 8
# sample_step=1: the builder tests every pixel, like the independent full-resolution check below.
ALL = ScanNetPairConfig(frame_stride=1, frame_gap=(1, FRAMES - 1), overlap=(0.0, 1.0), max_pairs_per_scene=1000,
                        sample_step=1)


@pytest.fixture(scope="module")
def a_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scannet")
    write_synthetic_scenes(root, SyntheticConfig(scenes=2, frames_per_scene=FRAMES, width=W, height=H, seed=1))
    return root


def _frames(row) -> tuple[int, int]:
    *_, a, b = row["pair_id"].split("_")
    return int(a), int(b)


def _overlap_full_res(scene_dir, a: int, b: int) -> float:
    """Co-visibility A -> B over every valid pixel at full resolution (independent of the builder)."""
    k = np.loadtxt(scene_dir / "intrinsic" / "intrinsic_depth.txt")[:3, :3]
    depth_a = np.asarray(Image.open(scene_dir / "depth" / f"{a}.png")).astype(np.float64) / 1000.0
    depth_b = np.asarray(Image.open(scene_dir / "depth" / f"{b}.png")).astype(np.float64) / 1000.0
    pose_a, pose_b = (np.loadtxt(scene_dir / "pose" / f"{f}.txt") for f in (a, b))
    ys, xs = np.nonzero(depth_a > 0)
    cam_a = np.linalg.solve(k, np.stack([xs, ys, np.ones_like(xs)]).astype(np.float64)) * depth_a[ys, xs]
    world = pose_a[:3, :3] @ cam_a + pose_a[:3, 3:]
    cam_b = pose_b[:3, :3].T @ (world - pose_b[:3, 3:])
    u, v = (k @ cam_b)[:2] / cam_b[2]
    col, row = np.rint(u).astype(int), np.rint(v).astype(int)
    ok = (cam_b[2] > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
    seen = depth_b[row[ok], col[ok]]
    return float(((seen > 0) & (np.abs(seen - cam_b[2][ok]) < 0.1 * cam_b[2][ok])).sum()) / len(xs)


def test_pairs_have_overlap_in_range(a_root):
    everything = build_scannet_pairs(a_root, ALL)
    assert len(everything) == 2 * FRAMES * (FRAMES - 1) // 2  # every candidate pair when nothing is filtered
    cfg = ScanNetPairConfig(frame_stride=1, frame_gap=(2, 5), overlap=(0.3, 0.7), max_pairs_per_scene=1000,
                            sample_step=1)
    rows = build_scannet_pairs(a_root, cfg)
    assert 5 <= len(rows) < len(everything)
    expected = {r["pair_id"] for r in everything
                if 0.3 <= r["overlap"] <= 0.7 and 2 <= _frames(r)[1] - _frames(r)[0] <= 5}
    assert {r["pair_id"] for r in rows} == expected
    for row in rows:
        a, b = _frames(row)
        assert 2 <= b - a <= 5 and 0.3 <= row["overlap"] <= 0.7
        scene_dir = a_root / row["scene_id"]
        independent = min(_overlap_full_res(scene_dir, a, b), _overlap_full_res(scene_dir, b, a))
        assert abs(independent - row["overlap"]) < 1e-3, (row["pair_id"], independent, row["overlap"])
    # Close frames overlap more than distant ones.
    by_gap = {}
    for row in everything:
        by_gap.setdefault(_frames(row)[1] - _frames(row)[0], []).append(row["overlap"])
    assert np.mean(by_gap[1]) > 0.7 and np.mean(by_gap[1]) > np.mean(by_gap[FRAMES - 1]) + 0.2


def test_manifest_round_trip_with_relative_refs(a_root, tmp_path):
    out = tmp_path / "manifests" / "pairs.parquet"
    write_scannet_manifest(a_root, out, ScanNetPairConfig(frame_stride=1, frame_gap=(1, 3), overlap=(0.3, 0.95)))
    manifest = load_manifest(out)
    row = manifest.rows[0]
    assert not row.image_a.startswith("/") and row.image_a.startswith("../")
    assert row.kind == "rgbd" and row.depth_scale == 1000.0 and row.split == "train"
    assert "overlap" in row.extra
    scene_dir = a_root / row.scene_id
    a, b = _frames({"pair_id": row.pair_id})
    np.testing.assert_array_equal(row.intrinsics_a,
                                  np.loadtxt(scene_dir / "intrinsic" / "intrinsic_depth.txt")[:3, :3])
    np.testing.assert_array_equal(row.pose_b, np.loadtxt(scene_dir / "pose" / f"{b}.txt"))
    pair = load_pair(row, manifest.base_dir)
    assert pair.view_a.image.shape == (H, W, 3) and pair.view_b.depth.shape == (H, W)
    np.testing.assert_allclose(pair.view_a.depth, np.asarray(Image.open(scene_dir / "depth" / f"{a}.png")) / 1000.0,
                               rtol=1e-6)


def test_bad_poses_are_skipped_and_malformed_files_named(a_root, tmp_path):
    root = tmp_path / "scans"
    shutil.copytree(a_root / "scene0000_00", root / "scene0000_00")
    (root / "scene0000_00" / "pose" / "3.txt").write_text("\n".join(["-inf -inf -inf -inf"] * 4))
    (root / "scene0000_00" / "depth" / "5.png").unlink()
    rows = build_scannet_pairs(root, ALL)
    used = {f for r in rows for f in _frames(r)}
    assert used == set(range(FRAMES)) - {3, 5}

    (root / "scene0000_00" / "pose" / "2.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    with pytest.raises(InputReadError, match=r"pose/2\.txt: expected 16 numbers, got 12"):
        build_scannet_pairs(root, ALL)
    (root / "scene0000_00" / "intrinsic" / "intrinsic_depth.txt").unlink()
    with pytest.raises(InputReadError, match=r"intrinsic_depth\.txt: file not found"):
        build_scannet_pairs(root, ALL)
    with pytest.raises(InputReadError, match="no ScanNet scenes found"):
        build_scannet_pairs(tmp_path / "scans" / "scene0000_00" / "color", ALL)


def test_single_scene_root_stride_and_cap(a_root):
    scene = a_root / "scene0001_00"
    strided = build_scannet_pairs(scene, ScanNetPairConfig(frame_stride=2, frame_gap=(2, 6), overlap=(0.0, 1.0)))
    assert strided and all(a % 2 == 0 and b % 2 == 0 for a, b in map(_frames, strided))
    capped = ScanNetPairConfig(frame_stride=1, frame_gap=(1, 7), overlap=(0.0, 1.0), max_pairs_per_scene=5, seed=7)
    first, second = build_scannet_pairs(scene, capped), build_scannet_pairs(scene, capped)
    assert len(first) == 5 and first == second
    assert all(r["scene_id"] == "scene0001_00" and r["image_a"].startswith("/") for r in first)


def test_splits_by_scene(a_root):
    rows = build_scannet_pairs(a_root, ScanNetPairConfig(frame_stride=1, frame_gap=(1, 2), overlap=(0.0, 1.0),
                                                         val_fraction=0.5))
    split_of = {r["scene_id"]: r["split"] for r in rows}
    assert sorted(split_of.values()) == ["train", "val"]
    assert all(r["split"] == split_of[r["scene_id"]] for r in rows)
    named = build_scannet_pairs(a_root, ScanNetPairConfig(frame_stride=1, frame_gap=(1, 2), overlap=(0.0, 1.0),
                                                          val_scenes=("scene0000_00",)))
    assert {r["scene_id"]: r["split"] for r in named} == {"scene0000_00": "val", "scene0001_00": "train"}
    with pytest.raises(ConfigError, match="val_scenes names scenes that do not exist: nope"):
        build_scannet_pairs(a_root, ScanNetPairConfig(val_scenes=("nope",)))


def test_config_and_empty_results(a_root, tmp_path):
    with pytest.raises(ConfigError, match="overlap"):
        ScanNetPairConfig(overlap=(0.8, 0.3))
    with pytest.raises(ConfigError, match="frame_gap"):
        ScanNetPairConfig(frame_gap=(0, 3))
    impossible = ScanNetPairConfig(frame_stride=1, frame_gap=(1, 1), overlap=(0.999, 1.0))
    with pytest.raises(ManifestError, match="no frame pairs satisfy"):
        write_scannet_manifest(a_root, tmp_path / "m.parquet", impossible)
    assert not (tmp_path / "m.parquet").exists()
