"""The geometry teacher on scenes whose answer is known in closed form, then on files of real layouts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from geod.pipeline.errors import ConfigError, TeacherError
from geod.stage1_extract.geometry import GeometryTeacher, rgbd_prediction, splat_stereo_depth

K = np.array([[50.0, 0.0, 31.5], [0.0, 48.0, 23.5], [0.0, 0.0, 1.0]])  # 64 x 48 depth maps
H, W = 48, 64
WALL_Z = 4.0


def _rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _pose(rotation: np.ndarray, centre) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rotation, centre
    return pose


def _wall_depth(pose: np.ndarray) -> np.ndarray:
    """Depth (z in the camera) of the wall world z = WALL_Z, seen from a camera-to-world pose."""
    ys, xs = np.mgrid[0:H, 0:W]
    rays = np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T  # camera frame, z = 1
    dirs = rays @ pose[:3, :3].T
    return ((WALL_Z - pose[2, 3]) / dirs[..., 2]).astype(np.float32)  # ray parameter = camera z


def _project(points_world: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = (points_world - pose[:3, 3]) @ pose[:3, :3]
    pix = cam @ K.T
    return pix[..., :2] / pix[..., 2:3], cam[..., 2]


def _near(mask: np.ndarray, position: np.ndarray, radius: float) -> np.ndarray:
    """Whether a pixel of `mask` lies within Chebyshev distance `radius` (< 1.5) of each position [..., 2]."""
    hit = np.zeros(position.shape[:-1], bool)
    base = np.round(np.nan_to_num(position, posinf=-9, neginf=-9)).astype(int)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            x, y = base[..., 0] + dx, base[..., 1] + dy
            close = np.maximum(np.abs(x - position[..., 0]), np.abs(y - position[..., 1])) <= radius
            ok = close & (x >= 0) & (x < mask.shape[1]) & (y >= 0) & (y < mask.shape[0])
            hit |= ok & mask[np.clip(y, 0, mask.shape[0] - 1), np.clip(x, 0, mask.shape[1] - 1)]
    return hit


def test_rgbd_flow_equals_projection_and_drops_occluded_pixels():
    pose_a = np.eye(4)
    pose_b = _pose(_rotation_y(0.05), [0.3, 0.05, -0.2])
    depth_a, depth_b = _wall_depth(pose_a), _wall_depth(pose_b)
    occluder = (slice(10, 25), slice(20, 40))
    depth_b[occluder] = 1.0  # an object in front of the wall that only B sees
    pred = rgbd_prediction(depth_a, K, depth_b, K, np.linalg.inv(pose_b) @ pose_a, abs_tol=0.02, rel_tol=0.03)

    ys, xs = np.mgrid[0:H, 0:W]
    world = (np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T) * depth_a[..., None]
    xy_b, _ = _project(world, pose_b)
    inside = (xy_b[..., 0] >= -0.5) & (xy_b[..., 0] <= W - 0.5) & (xy_b[..., 1] >= -0.5) & (xy_b[..., 1] <= H - 0.5)
    in_occluder = np.zeros((H, W), bool)
    in_occluder[occluder] = True
    # Visible for sure when no occluder pixel is within one pixel of the exact position; hidden for sure
    # when the nearest pixel is the occluder's; in between (sub-pixel edge) the teacher may drop the match.
    surely_visible = inside & ~_near(in_occluder, xy_b, 1.0)
    maybe_visible = inside & ~_near(in_occluder, xy_b, 0.5)
    valid = np.isfinite(pred.flow_ab[..., 0])
    assert (maybe_visible & ~surely_visible).sum() < 0.1 * (~surely_visible & inside).sum()
    assert np.all(valid[surely_visible]) and not np.any(valid[~maybe_visible])
    assert (~maybe_visible & inside).sum() > 100 and surely_visible.sum() > 1000
    got_px = pred.flow_ab[valid] * [W, H] - 0.5
    np.testing.assert_allclose(got_px, xy_b[valid], atol=1e-3)

    # B -> A: the wall part of B lands where the inverse projection says; the occluder has no match in A.
    valid_ba = np.isfinite(pred.flow_ba[..., 0])
    assert not valid_ba[occluder].any() and valid_ba.sum() > 1000
    world_b = (np.stack([xs, ys, np.ones_like(xs)], -1) @ np.linalg.inv(K).T * depth_b[..., None]) @ pose_b[:3, :3].T \
        + pose_b[:3, 3]
    xy_a, _ = _project(world_b, pose_a)
    np.testing.assert_allclose(pred.flow_ba[valid_ba] * [W, H] - 0.5, xy_a[valid_ba], atol=1e-3)
    np.testing.assert_allclose(pred.points_b[valid_ba], world_b[valid_ba], atol=1e-4)  # frame A = world here
    assert pred.conf_b[occluder].min() == 1.0 and pred.depth_a.dtype == np.float32


def _stereo_disparity() -> np.ndarray:
    disparity = np.full((H, W), 4.0, np.float32)  # background
    disparity[12:30, 30:45] = 10.0  # a nearer square
    disparity[40:, :5] = np.inf  # unknown
    return disparity


def test_stereo_flow_is_disparity_shift_with_occlusion():
    disparity = _stereo_disparity()
    row = SimpleNamespace(pair_id="s1")
    pair = SimpleNamespace(row=row, disparity_a=disparity, baseline=0.2,
                           view_a=SimpleNamespace(intrinsics=K), view_b=SimpleNamespace(intrinsics=K))
    pred = GeometryTeacher().predict([pair])[0]
    valid = np.isfinite(pred.flow_ab[..., 0])
    xs = np.arange(W)[None, :].repeat(H, 0)
    in_view = np.isfinite(disparity) & (xs - disparity >= -0.5)
    # Background just left of the square is hidden behind it in the right view: x - 4 in [20, 35), rows
    # [12, 30); a sub-pixel band around that edge may go either way.
    foreground_b = np.zeros((H, W), bool)
    foreground_b[12:30, 20:35] = True
    background = disparity == 4.0
    position = np.stack([xs - disparity, np.mgrid[0:H, 0:W][0]], axis=-1)
    surely_hidden = background & _near(foreground_b, position, 0.5)
    maybe_hidden = background & _near(foreground_b, position, 1.0)
    assert surely_hidden[12:30].sum(axis=1).tolist() == [6] * 18
    assert np.all(valid[in_view & ~maybe_hidden]) and not np.any(valid[surely_hidden | ~in_view])
    got_x = pred.flow_ab[..., 0] * W - 0.5
    np.testing.assert_allclose(got_x[valid], (xs - disparity)[valid], atol=1e-3)
    np.testing.assert_allclose(pred.flow_ab[..., 1][valid] * H - 0.5, np.mgrid[0:H, 0:W][0][valid], atol=1e-3)
    np.testing.assert_allclose(pred.depth_a[12, 35], K[0, 0] * 0.2 / 10.0, rtol=1e-6)  # metric: f * b / d
    # B's pixels see A's surfaces: the matched 3D points agree across views.
    ys, xb = np.nonzero(np.isfinite(pred.flow_ba[..., 0]))
    xa = np.floor(pred.flow_ba[ys, xb, 0] * W).astype(int)
    np.testing.assert_allclose(pred.points_b[ys, xb], pred.points_a[ys, xa], atol=1e-4)


def test_stereo_relative_units_without_calibration():
    pair = SimpleNamespace(row=SimpleNamespace(pair_id="s2"), disparity_a=_stereo_disparity(), baseline=None,
                           view_a=SimpleNamespace(intrinsics=None), view_b=SimpleNamespace(intrinsics=None))
    with pytest.raises(TeacherError, match="scene_units='relative'"):
        GeometryTeacher().predict([pair])
    teacher = GeometryTeacher(scene_units="relative")
    pred = teacher.predict([pair])[0]
    assert teacher.scene_units == "relative"
    assert np.median(pred.depth_a[pred.depth_a > 0]) == pytest.approx(1.0)
    np.testing.assert_allclose(pred.flow_ab[20, 40, 0] * W - 0.5, 40 - 10.0, atol=1e-3)


def test_splat_keeps_nearest_surface():
    depth = np.array([[4.0, 2.0, 4.0, 4.0]])
    disparity = np.ones((1, 4))  # x=0 falls outside, the others move one pixel left
    np.testing.assert_array_equal(splat_stereo_depth(depth, disparity), [[2.0, 4.0, 4.0, 0.0]])
    depth = np.array([[4.0, 4.0, 2.0, 4.0]])
    disparity = np.array([[1.0, 1.0, 2.0, 1.0]])  # x=1 -> 0 (depth 4) and x=2 -> 0 (depth 2): 2 wins
    np.testing.assert_array_equal(splat_stereo_depth(depth, disparity), [[2.0, 0.0, 4.0, 0.0]])


def test_rgbd_pair_missing_geometry_is_named():
    view = SimpleNamespace(depth=np.ones((H, W), np.float32), intrinsics=K, pose=np.eye(4))
    pair = SimpleNamespace(row=SimpleNamespace(pair_id="r1"), disparity_a=None, baseline=None,
                           view_a=view, view_b=SimpleNamespace(depth=view.depth, intrinsics=K, pose=None))
    with pytest.raises(TeacherError, match="'r1'.*pose_b"):
        GeometryTeacher().predict([pair])
    with pytest.raises(ConfigError, match="scene_units"):
        GeometryTeacher(scene_units="feet")


# ---------------------------------------------------------------------------------------------------------
# End to end: files on disk -> manifest -> run_extract -> stored targets, checked against independent truth.

def _extract(manifest, out, layout: dict, **options):
    from geod.pipeline.card import DatasetLayout
    from geod.pipeline.reader import TargetDataset
    from geod.stage1_extract.runner import ExtractConfig, run_extract

    run_extract(ExtractConfig(pairs=manifest, out=out, layout=DatasetLayout(**layout), progress=False,
                              batch_size=4, workers=2, **options))
    return TargetDataset.open(out)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Image values at continuous pixel-index positions (pixel centres at integers)."""
    h, w = image.shape[:2]
    x0 = np.clip(np.floor(x).astype(int), 0, w - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, h - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float64).reshape(h, w, -1)
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
            + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


def test_synthetic_matches_reproject_within_half_pixel(tmp_path):
    from geod.data_manifests.manifest import write_manifest
    from geod.data_manifests.scannet import ScanNetPairConfig, build_scannet_pairs
    from geod.data_manifests.synthetic import SyntheticConfig, make_scene, write_synthetic_scenes
    from geod.data_manifests.synthetic_scene import camera_rays

    synth = SyntheticConfig(scenes=2, frames_per_scene=6, width=64, height=48, seed=11)
    write_synthetic_scenes(tmp_path / "scenes", synth)
    pairing = ScanNetPairConfig(frame_stride=1, frame_gap=(1, 3), overlap=(0.2, 0.98), max_pairs_per_scene=3)
    rows = build_scannet_pairs(tmp_path / "scenes", pairing, manifest_dir=tmp_path)
    assert len(rows) >= 4
    manifest = write_manifest(rows, tmp_path / "pairs.parquet")
    layout = {"max_matches": 128, "grid_h": 6, "grid_w": 8, "topk": 8, "depth_h": 12, "depth_w": 16,
              "pairs_per_shard": 4, "rows_per_chunk": 4}
    data = _extract(manifest, tmp_path / "out", layout)

    checked = 0
    for entry in data.index.to_pylist():
        assert entry["status"] == "ok", entry["reason"]
        pair = data.pair(entry["pair_id"])
        scene = make_scene(synth, int(entry["scene_id"][5:9]))
        frame_a = int(Path(entry["image_a"]).stem)
        frame_b = int(Path(entry["image_b"]).stem)
        pose_a, pose_b, k = scene.poses[frame_a], scene.poses[frame_b], scene.intrinsics
        size = np.array([synth.width, synth.height])
        px_a = pair["match_xy_a"].astype(np.float64) * size - 0.5
        px_b = pair["match_xy_b"].astype(np.float64) * size - 0.5
        assert len(px_a) >= 64

        # Truth from the scene itself (ray casting, not the depth files): A's 3D point projected into B.
        origin, dirs = camera_rays(k, pose_a, px_a)
        t, surface, _ = scene.geometry.cast(origin, dirs)
        assert np.all(surface >= 0)
        world = origin + t[:, None] * dirs
        cam_b = (world - pose_b[:3, 3]) @ pose_b[:3, :3]
        proj = cam_b @ k.T
        expected_b = proj[:, :2] / proj[:, 2:3]
        error = np.linalg.norm(px_b - expected_b, axis=1)
        assert error.max() < 0.5, f"{entry['pair_id']}: reprojection error up to {error.max():.3f} px"

        # Visible, not occluded: B's own ray through the stored point hits the same surface point.
        origin_b, dirs_b = camera_rays(k, pose_b, px_b)
        t_b, _, _ = scene.geometry.cast(origin_b, dirs_b)
        gap = np.linalg.norm(origin_b + t_b[:, None] * dirs_b - world, axis=1) / t
        # (a few may sit within the depth test's tolerance of an adjacent surface, e.g. at a box corner)
        assert np.mean(gap < 0.01) >= 0.97 and np.mean(gap < 0.05) >= 0.99, \
            f"{entry['pair_id']}: matches whose point B sees elsewhere"
        np.testing.assert_allclose(np.median(pair["match_depth_a"] / t), 1.0, atol=0.01)
        points_world = pair["match_points_a"].astype(np.float64) @ pose_a[:3, :3].T + pose_a[:3, 3]
        assert np.median(np.linalg.norm(points_world - world, axis=1) / t) < 0.01
        checked += 1
    assert checked == len(rows)


def _write_motorcycle(root: Path, factor: int = 4) -> Path:
    """Middlebury 2014 Motorcycle (from scikit-image), downscaled by `factor`, with a stereo manifest."""
    from PIL import Image
    from skimage import data as skdata

    from geod.data_manifests.manifest import write_manifest

    left, right, disparity = skdata.stereo_motorcycle()
    h, w = left.shape[0] // factor, left.shape[1] // factor
    for name, image in (("left.png", left), ("right.png", right)):
        Image.fromarray(image).resize((w, h), Image.BOX).save(root / name)
    # The small pixel j covers large pixels [f j, f j + f): read the disparity at its centre.
    small = disparity[factor // 2::factor, factor // 2::factor][:h, :w] / factor
    np.save(root / "disparity.npy", small.astype(np.float32))
    return write_manifest([{"pair_id": "motorcycle", "scene_id": "middlebury-motorcycle", "image_a": "left.png",
                            "image_b": "right.png", "disparity_a": "disparity.npy", "split": "test"}],
                          root / "stereo.parquet")


def test_middlebury_motorcycle_matches_follow_ground_truth_disparity(tmp_path):
    from PIL import Image

    manifest = _write_motorcycle(tmp_path)
    disparity = np.load(tmp_path / "disparity.npy")
    left = np.asarray(Image.open(tmp_path / "left.png").convert("L"))
    right = np.asarray(Image.open(tmp_path / "right.png").convert("L"))
    h, w = disparity.shape
    layout = {"max_matches": 256, "grid_h": 12, "grid_w": 16, "topk": 8, "depth_h": 24, "depth_w": 32,
              "pairs_per_shard": 1, "rows_per_chunk": 1}
    data = _extract(manifest, tmp_path / "out", layout, teacher_options={"scene_units": "relative"})
    assert data.card.teacher.scene_units == "relative"
    pair = data.pair("motorcycle")
    assert pair["status"] == "ok" and len(pair["match_xy_a"]) == 256

    px_a = pair["match_xy_a"].astype(np.float64) * [w, h] - 0.5
    px_b = pair["match_xy_b"].astype(np.float64) * [w, h] - 0.5
    ix, iy = np.round(px_a[:, 0]).astype(int), np.round(px_a[:, 1]).astype(int)
    truth = disparity[iy, ix]
    assert np.all(np.isfinite(truth) & (truth > 0))
    np.testing.assert_allclose(px_a[:, 0] - px_b[:, 0], truth, atol=1e-2)
    np.testing.assert_allclose(px_b[:, 1], px_a[:, 1], atol=1e-3)
    # Spread over the image: every quarter of it holds matches.
    quarters = np.histogram2d(px_a[:, 0], px_a[:, 1], bins=2, range=[[0, w], [0, h]])[0]
    assert quarters.min() >= 256 / 4 * 0.5

    # The photographs agree: matched intensities are far closer than the same points without the shift.
    matched = np.abs(_bilinear(left, px_a[:, 0], px_a[:, 1]) - _bilinear(right, px_b[:, 0], px_b[:, 1])).mean()
    unshifted = np.abs(_bilinear(left, px_a[:, 0], px_a[:, 1]) - _bilinear(right, px_a[:, 0], px_a[:, 1])).mean()
    assert matched < 0.4 * unshifted

    # Relative depth is 1 / disparity, scaled so that A's median depth is 1 (the 3D point is read at the
    # keypoint's pixel; match_depth_a is a 3x3-window mean, so compare it only in the median).
    scale = pair["match_points_a"][:, 2] * truth
    np.testing.assert_allclose(scale, np.median(scale), rtol=1e-4)
    assert np.median(pair["match_depth_a"] * truth / scale) == pytest.approx(1.0, abs=0.01)
    known = np.isfinite(disparity) & (disparity > 0)
    assert np.median(scale[0] / disparity[known]) == pytest.approx(1.0, rel=0.01)

    # Cost-volume rows peak on the patch of B that holds the shifted patch centre of A.
    gh, gw = layout["grid_h"], layout["grid_w"]
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    cx = np.floor((cols + 0.5) / gw * w).astype(int)
    cy = np.floor((rows + 0.5) / gh * h).astype(int)
    valid = pair["cv_ab_valid"]
    assert valid.mean() > 0.6
    shifted = cx - np.where(valid, disparity[cy, cx], 0.0)
    target_col = np.floor((shifted + 0.5) / w * gw).astype(int)
    top1 = pair["cv_ab_index"][:, 0].astype(int)
    assert np.all(top1[valid] // gw == rows[valid])
    assert np.all(np.abs(top1[valid] % gw - target_col[valid]) <= 1)
    assert np.mean(top1[valid] % gw == target_col[valid]) > 0.95
