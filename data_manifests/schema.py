"""The pair manifest: one parquet row per image pair, the input of `geod extract`.

Columns (nullable ones may be absent from the file altogether):

| column         | type          | required | meaning                                                          |
|----------------|---------------|----------|------------------------------------------------------------------|
| pair_id        | string        | yes      | unique id of the pair                                            |
| scene_id       | string        | yes      | scene the two views belong to                                    |
| image_a        | string        | yes      | path or URI of view A's image (relative paths: to the manifest)  |
| image_b        | string        | yes      | same for view B                                                  |
| depth_a        | string        | no       | depth map of A: 16-bit PNG (see depth_scale) or float32 .npy     |
| depth_b        | string        | no       | same for view B                                                  |
| depth_scale    | float64       | no       | PNG depth units per scene unit (1000 = millimetres -> metres)    |
| intrinsics_a   | list<float64> | no       | 3x3 row-major camera matrix of A, in pixels of A's depth map     |
| intrinsics_b   | list<float64> | no       | same for B                                                       |
| pose_a         | list<float64> | no       | 4x4 row-major camera-to-world pose of A (OpenCV camera axes)     |
| pose_b         | list<float64> | no       | same for B                                                       |
| disparity_a    | string        | no       | rectified stereo: float32 .npy disparity of A in A's pixels,     |
|                |               |          | x_b = x_a - d; non-finite or <= 0 = unknown                      |
| baseline       | float64       | no       | rectified stereo: baseline in scene units (depth = f * B / d)    |
| split          | string        | no       | e.g. "train", "val", "test"                                      |

Depth maps are registered to their colour image: the same normalised coordinate (u = x / W) names the same
ray in both, whatever their resolutions.

Pixel conventions (precise, because sub-pixel targets depend on them):
- Intrinsics follow OpenCV/ScanNet: K maps a point (x, y, z) of the camera frame to pixel-index coordinates
  (x_idx, y_idx) = (fx x / z + cx, fy y / z + cy) in which the centre of pixel (column i, row j) is at
  exactly (i, j); a centred principal point is cx = (W - 1) / 2, cy = (H - 1) / 2.
- The continuous coordinate used by normalised targets puts pixel centres at i + 0.5, so
  u = (x_idx + 0.5) / W and v = (y_idx + 0.5) / H, with W x H the size of the map K belongs to.
- Rows are numbered from 0 in every error message ("row 0" is the first row of the file).
"""

from __future__ import annotations

REQUIRED_COLUMNS: tuple[str, ...] = ("pair_id", "scene_id", "image_a", "image_b")
STRING_COLUMNS: tuple[str, ...] = (
    "pair_id", "scene_id", "image_a", "image_b", "depth_a", "depth_b", "disparity_a", "split",
)
FLOAT_COLUMNS: tuple[str, ...] = ("depth_scale", "baseline")
# Fixed-length float lists and their lengths.
MATRIX_COLUMNS: dict[str, int] = {"intrinsics_a": 9, "intrinsics_b": 9, "pose_a": 16, "pose_b": 16}
# Geometry columns of an RGB-D row: any of depth_a, depth_b, pose_a, pose_b requires all six.
RGBD_COLUMNS: tuple[str, ...] = ("depth_a", "depth_b", "intrinsics_a", "intrinsics_b", "pose_a", "pose_b")
PATH_COLUMNS: tuple[str, ...] = ("image_a", "image_b", "depth_a", "depth_b", "disparity_a")
ALL_COLUMNS: tuple[str, ...] = (
    "pair_id", "scene_id", "image_a", "image_b", "depth_a", "depth_b", "depth_scale",
    "intrinsics_a", "intrinsics_b", "pose_a", "pose_b", "disparity_a", "baseline", "split",
)
