"""The `geometry` teacher: exact targets from sensor depth, intrinsics and poses, or from rectified stereo.

RGB-D pairs: every pixel of A with a depth is unprojected with A's intrinsics, moved into B's camera with
the two camera-to-world poses and projected with B's intrinsics; the correspondence is kept when it lands
inside B and passes the depth-consistency (occlusion) test |z_in_B - depth_b(nearest pixel)| <=
tol = max(abs_tol, rel_tol * z_in_B), and none of the pixels around the sub-pixel position is nearer than
z_in_B - tol (so that a point just behind an occluding edge is not kept). The same is done from B to A.

Rectified stereo pairs (disparity_a, x_b = x_a - d) are turned into the same problem: depth_a = fx * b / d,
camera B = camera A shifted by the baseline b along x (the same intrinsics), and B's depth map is A's depth
splatted into B keeping the nearest surface (a z-buffer). Projecting A into B then gives exactly
x_b = x_a - d, and the occlusion test drops A's pixels hidden in B.

Intrinsics map camera points to pixel-index coordinates of the depth map (OpenCV / ScanNet: the centre of
pixel index i is at i); the teacher works at the depth (or disparity) map's resolution.

Scene units: "metres" needs metric input (sensor depth, or disparity with baseline and intrinsics);
"relative" divides every pair's depths and points by the median depth of A, so any pair works, including
stereo without calibration (then a nominal focal length of max(h, w) pixels stands in for fx).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from geod.pipeline.errors import ConfigError, TeacherError
from geod.stage1_extract.teacher import SCENE_UNITS, Teacher, TeacherPrediction

if TYPE_CHECKING:
    from geod.data_manifests.views import PairData

_MIN_Z = 1e-9


@dataclass(kw_only=True)
class GeometryTeacherConfig:
    """Options of the geometry teacher.

    abs_tol (scene units) and rel_tol (fraction of z): tolerance of the depth-consistency test, defaults
    suited to metric sensor depth. scene_units: "metres" or "relative" (see the module docstring; in
    relative units abs_tol is a fraction of view A's median depth).
    """

    abs_tol: float = 0.02
    rel_tol: float = 0.03
    scene_units: str = "metres"

    def __post_init__(self) -> None:
        if not (self.abs_tol >= 0 and self.rel_tol >= 0):
            raise ConfigError(f"abs_tol and rel_tol must be >= 0, got {self.abs_tol}, {self.rel_tol}")
        if self.scene_units not in SCENE_UNITS:
            raise ConfigError(f"scene_units must be one of {SCENE_UNITS}, got {self.scene_units!r}")


class GeometryTeacher(Teacher):
    """Exact correspondences, depth and points from known geometry (no weights, CPU, numpy)."""

    name = "geometry"

    def __init__(self, **options) -> None:
        self.cfg = GeometryTeacherConfig(**options)
        self.scene_units = self.cfg.scene_units

    def identity(self) -> dict:
        return {"id": None, "sha256": None}

    def config(self) -> dict:
        return asdict(self.cfg)

    def preprocessing(self) -> dict:
        return {"input": "sensor depth + intrinsics + poses, or rectified disparity (+ baseline)",
                "resolution": "the depth or disparity map's own", "images": "read and hashed, not used"}

    def predict(self, pairs: list[PairData]) -> list[TeacherPrediction]:
        return [self.predict_pair(pair) for pair in pairs]

    def predict_pair(self, pair: PairData) -> TeacherPrediction:
        """Prediction for one pair (TeacherError naming the pair when its geometry is incomplete)."""
        pair_id = pair.row.pair_id
        if pair.disparity_a is not None:
            views = _stereo_views(pair.disparity_a, pair.view_a.intrinsics, pair.baseline,
                                  metric=self.cfg.scene_units == "metres", pair_id=pair_id)
        else:
            views = _rgbd_views(pair, pair_id)
        depth_a, k_a, depth_b, k_b, b_from_a = views
        if self.cfg.scene_units == "relative":
            depth_a, depth_b, b_from_a = _normalise_scale(depth_a, depth_b, b_from_a, pair_id)
        return rgbd_prediction(depth_a, k_a, depth_b, k_b, b_from_a,
                               abs_tol=self.cfg.abs_tol, rel_tol=self.cfg.rel_tol)


def _clean_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float64)
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0)


def _rgbd_views(pair: PairData, pair_id: str):
    a, b = pair.view_a, pair.view_b
    missing = [name for name, value in (("depth_a", a.depth), ("depth_b", b.depth), ("intrinsics_a", a.intrinsics),
                                        ("intrinsics_b", b.intrinsics), ("pose_a", a.pose), ("pose_b", b.pose))
               if value is None]
    if missing:
        raise TeacherError(f"pair {pair_id!r}: the geometry teacher needs disparity_a, or depth, intrinsics "
                           f"and poses of both views; missing {', '.join(missing)}")
    b_from_a = np.linalg.inv(np.asarray(b.pose, np.float64)) @ np.asarray(a.pose, np.float64)
    return (_clean_depth(a.depth), np.asarray(a.intrinsics, np.float64),
            _clean_depth(b.depth), np.asarray(b.intrinsics, np.float64), b_from_a)


def _stereo_views(disparity: np.ndarray, intrinsics, baseline, *, metric: bool, pair_id: str):
    h, w = disparity.shape
    if metric and (intrinsics is None or baseline is None):
        raise TeacherError(f"pair {pair_id!r}: metric depth from disparity needs baseline and intrinsics_a; "
                           "give them in the manifest or use the teacher option scene_units='relative'")
    if intrinsics is None:
        focal = float(max(h, w))
        k = np.array([[focal, 0.0, (w - 1) / 2], [0.0, focal, (h - 1) / 2], [0.0, 0.0, 1.0]])
    else:
        k = np.asarray(intrinsics, np.float64)
    base = 1.0 if baseline is None else float(baseline)
    disparity = np.asarray(disparity, np.float64)
    known = np.isfinite(disparity) & (disparity > 0)
    depth_a = np.where(known, k[0, 0] * base / np.where(known, disparity, 1.0), 0.0)
    depth_b = splat_stereo_depth(depth_a, np.where(known, disparity, 0.0))
    b_from_a = np.eye(4)
    b_from_a[0, 3] = -base  # camera B sits at +baseline along A's x axis
    return depth_a, k, depth_b, k, b_from_a


def splat_stereo_depth(depth_a: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """Depth map of the right view of a rectified pair: A's depths moved by their disparity, nearest wins."""
    h, w = depth_a.shape
    ys, xs = np.nonzero(depth_a > 0)
    xb = np.floor(xs - disparity[ys, xs] + 0.5).astype(np.int64)
    inside = (xb >= 0) & (xb < w)
    flat = ys[inside] * w + xb[inside]
    depth_b = np.full(h * w, np.inf)
    np.minimum.at(depth_b, flat, depth_a[ys[inside], xs[inside]])
    depth_b[np.isinf(depth_b)] = 0.0
    return depth_b.reshape(h, w)


def _normalise_scale(depth_a, depth_b, b_from_a, pair_id):
    known = depth_a[depth_a > 0]
    if known.size == 0:
        raise TeacherError(f"pair {pair_id!r}: view A has no valid depth to normalise the scale with")
    scale = 1.0 / float(np.median(known))
    b_from_a = b_from_a.copy()
    b_from_a[:3, 3] *= scale
    return depth_a * scale, depth_b * scale, b_from_a


def unproject(depth: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat pixel indices, [n, 3] float64 camera-frame points) of the pixels with a depth."""
    w = depth.shape[1]
    flat = np.flatnonzero(depth > 0)
    pixels = np.stack([flat % w, flat // w, np.ones_like(flat)], axis=1).astype(np.float64)
    rays = linear3(pixels, np.linalg.inv(k))
    rays /= rays[:, 2:3]  # z = 1 even for intrinsics with a non-unit last row
    return flat, rays * depth.reshape(-1)[flat, None]


def linear3(points: np.ndarray, matrix: np.ndarray, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """points [n, 3] @ matrix.T + offset, written out per column: a BLAS call for an inner size of 3
    is slower and starts threads that fight the extraction's own."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    return np.stack([matrix[i, 0] * x + matrix[i, 1] * y + matrix[i, 2] * z + offset[i] for i in range(3)],
                    axis=1)


def transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 4x4 rigid transform to [n, 3] points."""
    return linear3(points, matrix[:3, :3], matrix[:3, 3])


def correspondence_flow(flat: np.ndarray, points_in_b: np.ndarray, shape: tuple[int, int], depth_b: np.ndarray,
                        k_b: np.ndarray, *, abs_tol: float, rel_tol: float) -> np.ndarray:
    """Dense flow [h, w, 2] of a view whose pixels `flat` have the 3D points `points_in_b` in B's frame:
    normalised (u, v) in B, NaN where unknown, outside B or failing the depth-consistency test."""
    hb, wb = depth_b.shape
    flow = np.full((shape[0] * shape[1], 2), np.nan, np.float32)
    z = points_in_b[:, 2]
    front = z > _MIN_Z
    flat, points, z = flat[front], points_in_b[front], z[front]
    projected = linear3(points, k_b)
    x = projected[:, 0] / projected[:, 2]  # pixel-index coordinates in B
    y = projected[:, 1] / projected[:, 2]
    inside = (x >= -0.5) & (x <= wb - 0.5) & (y >= -0.5) & (y <= hb - 0.5)
    flat, x, y, z = flat[inside], x[inside], y[inside], z[inside]
    tol = np.maximum(abs_tol, rel_tol * z)
    depth_flat = depth_b.reshape(-1)
    # x, y >= -0.5 here, so truncation after +0.5 / +1 is floor; clipping keeps the border pixels.
    seen = depth_flat[np.minimum((y + 0.5).astype(np.int64), hb - 1) * wb
                      + np.minimum((x + 0.5).astype(np.int64), wb - 1)]
    ok = (seen > 0) & (np.abs(z - seen) <= tol)
    # Near an occluding edge the nearest pixel may show the background while the exact sub-pixel position
    # is already covered by the occluder: also refuse when one of the (up to 2x2) pixels around the
    # position is nearer than the point by more than the tolerance.
    front = z - tol
    cols = [np.clip(np.floor(x), 0, wb - 1).astype(np.int64), np.clip(np.ceil(x), 0, wb - 1).astype(np.int64)]
    rows = [np.clip(np.floor(y), 0, hb - 1).astype(np.int64) * wb,
            np.clip(np.ceil(y), 0, hb - 1).astype(np.int64) * wb]
    for row in rows:
        for col in cols:
            near = depth_flat[row + col]
            ok &= ~((near > 0) & (near < front))
    flow[flat[ok], 0] = (x[ok] + 0.5) / wb
    flow[flat[ok], 1] = (y[ok] + 0.5) / hb
    return flow.reshape(*shape, 2)


def _dense_points(flat: np.ndarray, points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    dense = np.zeros((shape[0] * shape[1], 3), np.float32)
    dense[flat] = points
    return dense.reshape(*shape, 3)


def rgbd_prediction(depth_a: np.ndarray, k_a: np.ndarray, depth_b: np.ndarray, k_b: np.ndarray,
                    b_from_a: np.ndarray, *, abs_tol: float, rel_tol: float) -> TeacherPrediction:
    """Dense prediction of a pair with known depth, intrinsics and relative pose (B from A, 4x4)."""
    flat_a, points_a = unproject(depth_a, k_a)
    flat_b, points_b_own = unproject(depth_b, k_b)
    points_b = transform(points_b_own, np.linalg.inv(b_from_a))  # B's points in frame A
    flow_ab = correspondence_flow(flat_a, transform(points_a, b_from_a), depth_a.shape, depth_b, k_b,
                                  abs_tol=abs_tol, rel_tol=rel_tol)
    flow_ba = correspondence_flow(flat_b, points_b, depth_b.shape, depth_a, k_a, abs_tol=abs_tol, rel_tol=rel_tol)
    return TeacherPrediction(
        depth_a=depth_a.astype(np.float32), depth_b=depth_b.astype(np.float32),
        conf_a=(depth_a > 0).astype(np.float32), conf_b=(depth_b > 0).astype(np.float32),
        points_a=_dense_points(flat_a, points_a, depth_a.shape),
        points_b=_dense_points(flat_b, points_b, depth_b.shape),
        flow_ab=flow_ab, flow_ba=flow_ba,
    )
