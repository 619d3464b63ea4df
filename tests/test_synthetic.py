"""Synthetic RGB-D scenes: layout, determinism, and exact depth / pose / intrinsics."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from geod.data_manifests.synthetic import SyntheticConfig, make_scene, write_synthetic_scenes
from geod.data_manifests.synthetic_scene import camera_rays
from geod.pipeline.errors import ConfigError

W, H, FRAMES = 64, 48, 6
CFG = SyntheticConfig(scenes=2, frames_per_scene=FRAMES, width=W, height=H, seed=3)


@pytest.fixture(scope="module")
def a_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_synthetic_scenes(root, CFG)


def _depth_m(scene_dir, frame) -> np.ndarray:
    raw = np.asarray(Image.open(scene_dir / "depth" / f"{frame}.png"))
    assert raw.dtype == np.uint16
    return raw.astype(np.float64) / 1000.0


def _unproject(depth: np.ndarray, k: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points of every pixel, pixel (i, j) on the ray K^-1 [i, j, 1] (centres at integers)."""
    ys, xs = np.mgrid[0:depth.shape[0], 0:depth.shape[1]]
    pix = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)], axis=1)
    cam = (pix @ np.linalg.inv(k).T) * depth.reshape(-1, 1)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def _surface_distance(points: np.ndarray, geometry) -> tuple[np.ndarray, np.ndarray]:
    """Independent of the ray caster: distance to the nearest scene surface, and the smallest box SDF."""
    room = np.minimum(points, geometry.room - points).min(axis=1)
    box_sdf = []
    for box in geometry.boxes:
        q = np.abs((points - box.centre) @ box.rotation) - box.half
        box_sdf.append(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0))
    box_sdf = np.array(box_sdf).reshape(len(geometry.boxes), -1)
    nearest = np.minimum(np.abs(room), np.abs(box_sdf).min(axis=0)) if len(box_sdf) else np.abs(room)
    return nearest, (box_sdf.min(axis=0) if len(box_sdf) else np.full(len(points), np.inf))


def test_layout_and_files(a_scenes):
    root, scenes = a_scenes
    assert [s.name for s in scenes] == ["scene0000_00", "scene0001_00"]
    for index, folder in enumerate(scenes):
        scene = make_scene(CFG, index)
        k_color = np.loadtxt(folder / "intrinsic" / "intrinsic_color.txt")
        k_depth = np.loadtxt(folder / "intrinsic" / "intrinsic_depth.txt")
        assert k_color.shape == (4, 4) and np.array_equal(k_color, k_depth)
        np.testing.assert_array_equal(k_depth[:3, :3], scene.intrinsics)  # written with full precision
        # Pixel-index convention: a centred principal point would sit at (W-1)/2, jittered by at most 3%.
        assert abs(k_depth[0, 2] - (W - 1) / 2) <= 0.03 * W and abs(k_depth[1, 2] - (H - 1) / 2) <= 0.03 * H
        np.testing.assert_array_equal(np.loadtxt(folder / "intrinsic" / "extrinsic_depth.txt"), np.eye(4))
        for frame in range(FRAMES):
            with Image.open(folder / "color" / f"{frame}.jpg") as img:
                assert img.format == "JPEG" and img.size == (W, H) and img.mode == "RGB"
            pose = np.loadtxt(folder / "pose" / f"{frame}.txt")
            np.testing.assert_array_equal(pose, scene.poses[frame])
            np.testing.assert_allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-12)
            assert np.linalg.det(pose[:3, :3]) > 0 and np.array_equal(pose[3], [0, 0, 0, 1])
            depth = _depth_m(folder, frame)
            assert depth.shape == (H, W) and 0.3 < depth[depth > 0].min() and depth.max() < 10.0
    assert not list(root.glob(".tmp-*"))


def test_deterministic_for_a_seed(a_scenes, tmp_path):
    _, scenes = a_scenes
    again = write_synthetic_scenes(tmp_path, SyntheticConfig(scenes=1, frames_per_scene=FRAMES, width=W,
                                                             height=H, seed=3))
    for path in sorted(p for p in again[0].rglob("*") if p.is_file()):
        assert path.read_bytes() == (scenes[0] / path.relative_to(again[0])).read_bytes(), path
    other = make_scene(SyntheticConfig(scenes=1, frames_per_scene=FRAMES, width=W, height=H, seed=4), 0)
    assert not np.allclose(other.poses, make_scene(CFG, 0).poses)


def test_stored_depth_is_the_exact_ray_cast_depth(a_scenes):
    _, scenes = a_scenes
    for index, folder in enumerate(scenes):
        scene = make_scene(CFG, index)
        _, exact = scene.render()
        for frame in range(FRAMES):
            stored = _depth_m(folder, frame)
            assert np.abs(stored - exact[frame]).max() <= 0.0005 + 1e-9  # rounding to millimetres only
            # Independently of the ray caster: every unprojected pixel lies on a surface of the scene and
            # never inside a box (tolerance: the millimetre rounding along a ray of length <= ~1.5 z).
            points = _unproject(stored, scene.intrinsics, scene.poses[frame])
            nearest, box_sdf = _surface_distance(points, scene.geometry)
            assert nearest.max() < 1e-3
            assert box_sdf.min() > -1e-3
            # A half-pixel error in the ray convention would move points off slanted surfaces.
            shifted = _unproject(stored, scene.intrinsics + [[0, 0, 0.5], [0, 0, 0.5], [0, 0, 0]],
                                 scene.poses[frame])
            assert _surface_distance(shifted, scene.geometry)[0].max() > 5e-3


def _project_and_cast(scene, depth_a, a, b):
    """Project A's pixels (with depth_a) into B; return B's exact hit distance there and the points' z in B."""
    points = _unproject(depth_a, scene.intrinsics, scene.poses[a])[depth_a.reshape(-1) > 0]
    cam_b = (points - scene.poses[b][:3, 3]) @ scene.poses[b][:3, :3]
    proj = cam_b @ scene.intrinsics.T
    xy = proj[:, :2] / proj[:, 2:]
    inside = (cam_b[:, 2] > 0) & (xy[:, 0] > -0.5) & (xy[:, 0] < W - 0.5) & (xy[:, 1] > -0.5) \
        & (xy[:, 1] < H - 0.5)
    origin, dirs = camera_rays(scene.intrinsics, scene.poses[b], xy[inside])
    t, _, _ = scene.geometry.cast(origin, dirs)
    return t, cam_b[inside, 2]


def test_reprojection_between_frames_is_exact(a_scenes):
    _, scenes = a_scenes
    scene = make_scene(CFG, 0)
    _, exact = scene.render()
    for a, b in [(0, 1), (0, FRAMES - 1), (3, 2)]:
        t, z = _project_and_cast(scene, exact[a], a, b)
        # B's ray through the projection never passes beyond the point (it lies on a surface) and meets it
        # exactly wherever the point is visible from B.
        assert np.all(t <= z + 1e-9)
        visible = np.abs(t - z) < 1e-9
        assert visible.mean() > (0.8 if abs(a - b) == 1 else 0.3)

        # The same with the files' millimetre depth: agreement to a few millimetres for nearly all of them.
        t_file, z_file = _project_and_cast(scene, _depth_m(scenes[0], a), a, b)
        assert (np.abs(t_file - z_file) < 0.003).mean() > 0.97 * visible.mean()


def test_textures_are_rich_and_distinct(a_scenes):
    _, scenes = a_scenes
    images = [np.asarray(Image.open(s / "color" / "0.jpg"), dtype=np.float64) for s in scenes]
    for image in images:
        patches = image[:H // 8 * 8, :W // 8 * 8].reshape(H // 8, 8, W // 8, 8, 3)
        contrast = patches.std(axis=(1, 3)).max(axis=-1)
        assert (contrast > 4.0).mean() > 0.9  # almost no flat 8x8 patch
        assert np.abs(np.diff(image, axis=1)).mean() > 5.0
        assert image.std(axis=(0, 1)).min() > 15.0  # colour varies in every channel
    assert np.abs(images[0] - images[1]).mean() > 20.0


def test_trajectory_is_smooth(a_scenes):
    scene = make_scene(CFG, 0)
    steps = np.linalg.norm(np.diff(scene.poses[:, :3, 3], axis=0), axis=1)
    assert steps.min() > 0.05 and steps.max() < 2.0 * steps.min()
    for a in range(FRAMES - 1):
        relative = scene.poses[a, :3, :3].T @ scene.poses[a + 1, :3, :3]
        angle = np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1)))
        assert 1.0 < angle < 40.0


def test_default_size_renders_fast_enough():
    cfg = SyntheticConfig(scenes=1)  # 12 frames of 160x120
    start = time.perf_counter()
    colours, depths = make_scene(cfg, 0).render()
    elapsed = time.perf_counter() - start
    assert colours.shape == (12, 120, 160, 3) and np.isfinite(depths).all()
    assert elapsed < 10.0  # vectorised: about 1 s on 2 slow cores; a per-pixel loop would take minutes


def test_config_validation_and_overwrite(a_scenes, tmp_path):
    with pytest.raises(ConfigError, match="frames_per_scene"):
        SyntheticConfig(frames_per_scene=1)
    with pytest.raises(ConfigError, match="room_size"):
        SyntheticConfig(room_size=(1.0, 2.0))
    small = SyntheticConfig(scenes=1, frames_per_scene=2, width=16, height=12)
    write_synthetic_scenes(tmp_path, small)
    with pytest.raises(ConfigError, match=r"scene0000_00: already exists"):
        write_synthetic_scenes(tmp_path, small)
    small.overwrite = True
    assert write_synthetic_scenes(tmp_path, small) == [tmp_path / "scene0000_00"]
