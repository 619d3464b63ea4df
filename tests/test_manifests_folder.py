"""Plain image-folder pair builder and the shared split assignment."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from geod.data_manifests.builder_common import assign_splits, natural_key
from geod.data_manifests.folder import build_folder_pairs
from geod.data_manifests.manifest import load_manifest, write_manifest
from geod.data_manifests.views import load_pair
from geod.pipeline.errors import ConfigError, InputReadError


def _images(folder, names):
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        Image.fromarray(np.full((6, 8, 3), 20 * k, np.uint8)).save(folder / name)


def test_pairs_of_nearby_frames_in_natural_order(tmp_path):
    root = tmp_path / "videos"
    _images(root / "walk", ["f10.jpg", "f2.jpg", "f1.png"])
    (root / "walk" / "notes.txt").write_text("not an image")
    _images(root / "tour", [f"{i}.jpg" for i in range(5)])
    (root / ".hidden").mkdir()

    rows = build_folder_pairs(root, max_gap=2, manifest_dir=tmp_path)
    walk = [(r["image_a"], r["image_b"]) for r in rows if r["scene_id"] == "walk"]
    assert walk == [("videos/walk/f1.png", "videos/walk/f2.jpg"), ("videos/walk/f1.png", "videos/walk/f10.jpg"),
                    ("videos/walk/f2.jpg", "videos/walk/f10.jpg")]
    tour = [r for r in rows if r["scene_id"] == "tour"]
    assert len(tour) == 4 + 3  # gaps 1 and 2 among 5 frames
    assert {r["split"] for r in rows} == {"train"}
    assert all(set(r) == {"pair_id", "scene_id", "image_a", "image_b", "split"} for r in rows)

    path = write_manifest(rows, tmp_path / "pairs.parquet")
    manifest = load_manifest(path)
    assert [r.kind for r in manifest.rows] == ["images"] * len(rows)
    pair = load_pair(manifest.rows[0], manifest.base_dir)
    assert pair.view_a.image.shape == (6, 8, 3) and pair.view_a.depth is None


def test_stride_min_gap_cap_and_single_folder_root(tmp_path):
    _images(tmp_path / "seq", [f"img_{i:03d}.png" for i in range(10)])
    rows = build_folder_pairs(tmp_path / "seq", min_gap=2, max_gap=2, stride=3)
    assert [r["pair_id"] for r in rows] == ["seq_00000_00006", "seq_00003_00009"]
    assert rows[0]["image_a"].endswith("seq/img_000.png") and rows[0]["image_a"].startswith("/")
    capped = build_folder_pairs(tmp_path / "seq", max_gap=4, max_pairs_per_scene=6, seed=1)
    assert len(capped) == 6 and capped == build_folder_pairs(tmp_path / "seq", max_gap=4, max_pairs_per_scene=6,
                                                             seed=1)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="min_gap <= max_gap"):
        build_folder_pairs(tmp_path, min_gap=3, max_gap=2)
    with pytest.raises(InputReadError, match="not a directory"):
        build_folder_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputReadError, match="no scene folders with two or more images"):
        build_folder_pairs(tmp_path / "empty")


def test_assign_splits_is_deterministic_and_order_free():
    scenes = [f"scene{i:04d}_00" for i in range(20)]
    splits = assign_splits(scenes, val_fraction=0.25, seed=0)
    assert sum(v == "val" for v in splits.values()) == 5
    assert assign_splits(reversed(scenes), val_fraction=0.25, seed=0) == splits
    assert assign_splits(scenes, val_fraction=0.25, seed=1) != splits
    assert set(assign_splits(["only"], val_fraction=0.5).values()) == {"train"}  # one scene stays trainable
    assert assign_splits(["a", "b"], val_fraction=0.01)["a"] != assign_splits(["a", "b"], val_fraction=0.01)["b"]
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_splits(scenes, val_fraction=1.0)
    assert sorted(["x10", "x9", "x1"], key=natural_key) == ["x1", "x9", "x10"]
