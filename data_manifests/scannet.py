"""Pair manifests from RGB-D scans in the ScanNet export layout.

Expected layout (what ScanNet's SensReader exports, and what `geod.data_manifests.synthetic` writes)::

    ROOT/scene0000_00/color/{i}.jpg       colour frames
    ROOT/scene0000_00/depth/{i}.png       uint16 depth, millimetres by default (depth_scale)
    ROOT/scene0000_00/pose/{i}.txt        4x4 camera-to-world
    ROOT/scene0000_00/intrinsic/intrinsic_depth.txt   4x4 (or 3x3) K of the depth camera

ROOT may also be a single scene folder. Frames without a depth or pose file, or whose pose holds inf/nan
(ScanNet marks failed tracking that way), are skipped.

A pair (A, B) is kept when the frame numbers differ by a gap within `frame_gap` and its co-visibility lies
within `overlap`. Co-visibility is measured on depth maps subsampled to about `overlap_width` pixels wide:
overlap(A -> B) is the fraction of A's valid depth samples (every `sample_step`-th pixel of that map) that
project inside B, in front of it, onto a valid depth with |z_B - depth_B| < depth_tolerance * z_B. The
pair's overlap is the smaller of the two directions, so both views see a good part of each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geod.data_manifests.builder_common import assign_splits, file_ref, natural_key, scene_seed
from geod.data_manifests.manifest import write_manifest
from geod.data_manifests.views import decode_depth
from geod.pipeline.errors import ConfigError, InputReadError, ManifestError

_MIN_VALID_SAMPLES = 20  # fewer valid depth samples than this: the frame's overlap is not measurable


@dataclass(kw_only=True)
class ScanNetPairConfig:
    """How pairs are chosen from RGB-D scans."""

    frame_stride: int = 5  # consider frames whose number is a multiple of this (ScanNet records 30 fps)
    frame_gap: tuple[int, int] = (5, 60)  # inclusive range of frame-number differences
    overlap: tuple[float, float] = (0.3, 0.8)  # inclusive range of co-visibility
    max_pairs_per_scene: int = 200  # random (seeded) subset beyond this
    max_candidates_per_scene: int = 20000  # bound on overlap tests per scene (random subset beyond)
    depth_scale: float = 1000.0  # depth PNG units per metre
    depth_tolerance: float = 0.1  # relative depth agreement for co-visibility
    overlap_width: int = 160  # width the depth maps are subsampled to for the overlap test
    sample_step: int = 4  # sample every n-th pixel of that map in view A
    color_dir: str = "color"
    color_ext: str = ".jpg"
    val_fraction: float = 0.0  # fraction of scenes assigned to split "val" (by scene, deterministic)
    val_scenes: tuple[str, ...] = ()  # explicit validation scenes (overrides val_fraction)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frame_stride < 1 or self.sample_step < 1 or self.overlap_width < 8:
            raise ConfigError("ScanNetPairConfig: frame_stride and sample_step must be >= 1 and overlap_width "
                              f">= 8, got {self.frame_stride}, {self.sample_step}, {self.overlap_width}")
        if not 1 <= self.frame_gap[0] <= self.frame_gap[1]:
            raise ConfigError(f"ScanNetPairConfig.frame_gap must be a range of integers >= 1, got {self.frame_gap}")
        if not 0.0 <= self.overlap[0] <= self.overlap[1] <= 1.0:
            raise ConfigError(f"ScanNetPairConfig.overlap must be a range within [0, 1], got {self.overlap}")
        if self.max_pairs_per_scene < 1 or self.max_candidates_per_scene < 1:
            raise ConfigError("ScanNetPairConfig: max_pairs_per_scene and max_candidates_per_scene must be >= 1")
        if self.depth_scale <= 0 or self.depth_tolerance <= 0:
            raise ConfigError("ScanNetPairConfig: depth_scale and depth_tolerance must be > 0, got "
                              f"{self.depth_scale}, {self.depth_tolerance}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"ScanNetPairConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        self.val_scenes = tuple(self.val_scenes)


@dataclass(frozen=True, eq=False)
class _Frame:
    number: int
    color: Path
    depth: Path
    pose: np.ndarray  # 4x4 camera-to-world


def build_scannet_pairs(root: str | Path, cfg: ScanNetPairConfig | None = None, *,
                        manifest_dir: str | Path | None = None) -> list[dict]:
    """Manifest rows for co-visible frame pairs of every scene under `root`.

    File references are relative to `manifest_dir` (where the manifest will be written), or absolute when it
    is None. Each row also carries an extra column `overlap` (the measured co-visibility).
    """
    cfg = cfg or ScanNetPairConfig()
    scenes = find_scenes(root)
    splits = assign_splits([s.name for s in scenes], val_fraction=cfg.val_fraction,
                           val_scenes=cfg.val_scenes, seed=cfg.seed)
    rows: list[dict] = []
    for scene in scenes:
        rows.extend(_scene_pairs(scene, cfg, splits[scene.name], manifest_dir))
    return rows


def write_scannet_manifest(root: str | Path, out: str | Path, cfg: ScanNetPairConfig | None = None) -> Path:
    """Build the pairs of `root` and write them to the manifest `out` with references relative to it."""
    rows = build_scannet_pairs(root, cfg, manifest_dir=Path(out).absolute().parent)
    if not rows:
        raise ManifestError(f"{root}: no frame pairs satisfy the frame gap and overlap ranges; widen them")
    return write_manifest(rows, out)


def find_scenes(root: str | Path) -> list[Path]:
    """Scene folders under `root` (or `root` itself when it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise InputReadError(f"{root}: not a directory")
    if _is_scene(root):
        return [root]
    scenes = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_scene(p)),
                    key=lambda p: natural_key(p.name))
    if not scenes:
        raise InputReadError(f"{root}: no ScanNet scenes found (expected folders holding color/, depth/ and "
                             "pose/ subfolders and intrinsic/intrinsic_depth.txt)")
    return scenes


def read_matrix(path: Path, size: int) -> np.ndarray:
    """A whitespace-separated matrix file; 4x4 files give their 3x3 top-left block when size is 3."""
    try:
        values = [float(v) for v in path.read_text().split()]
    except FileNotFoundError:
        raise InputReadError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise InputReadError(f"{path}: cannot read a matrix of numbers: {exc}") from exc
    allowed = sorted({size * size, 16})
    if len(values) not in allowed:
        raise InputReadError(f"{path}: expected {' or '.join(map(str, allowed))} numbers, got {len(values)}")
    side = round(len(values) ** 0.5)
    return np.asarray(values, dtype=np.float64).reshape(side, side)[:size, :size]


def pair_overlap(points_a_world: np.ndarray, depth_b: np.ndarray, intrinsics_b: np.ndarray, pose_b: np.ndarray,
                 tolerance: float = 0.1) -> float:
    """Fraction of A's world points [N, 3] that B sees: inside B's depth map, in front, depth-consistent."""
    if len(points_a_world) < _MIN_VALID_SAMPLES:
        return 0.0
    cam = (points_a_world - pose_b[:3, 3]) @ pose_b[:3, :3]  # world -> camera B (R^T (X - t))
    z = cam[:, 2]
    front = z > 1e-6
    proj = cam[front] @ intrinsics_b.T
    x = np.rint(proj[:, 0] / proj[:, 2]).astype(np.int64)
    y = np.rint(proj[:, 1] / proj[:, 2]).astype(np.int64)
    height, width = depth_b.shape
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    seen = depth_b[y[inside], x[inside]]
    z_in = z[front][inside]
    consistent = (seen > 0) & (np.abs(z_in - seen) < tolerance * z_in)
    return float(consistent.sum()) / len(points_a_world)


def _is_scene(folder: Path) -> bool:
    return (folder / "depth").is_dir() and (folder / "pose").is_dir() and (folder / "intrinsic").is_dir()


def _scene_pairs(scene: Path, cfg: ScanNetPairConfig, split: str, manifest_dir) -> list[dict]:
    k_path = scene / "intrinsic" / "intrinsic_depth.txt"
    intrinsics = read_matrix(k_path, 3)
    if intrinsics[0, 0] <= 0 or intrinsics[1, 1] <= 0 or not np.all(np.isfinite(intrinsics)):
        raise InputReadError(f"{k_path}: not a valid camera matrix (fx, fy must be finite and > 0)")
    frames = _list_frames(scene, cfg)
    if len(frames) < 2:
        return []
    samples = [_load_samples(f, intrinsics, cfg) for f in frames]
    numbers = np.array([f.number for f in frames])
    lo, hi = cfg.frame_gap
    candidates = [(i, j) for i in range(len(frames)) for j in range(i + 1, len(frames))
                  if lo <= numbers[j] - numbers[i] <= hi]
    rng = np.random.default_rng(scene_seed(cfg.seed, scene.name))
    if len(candidates) > cfg.max_candidates_per_scene:
        keep = np.sort(rng.choice(len(candidates), cfg.max_candidates_per_scene, replace=False))
        candidates = [candidates[k] for k in keep]
    kept = []
    for i, j in candidates:
        (points_i, map_i, k_i), (points_j, map_j, k_j) = samples[i], samples[j]
        overlap = min(pair_overlap(points_i, map_j, k_j, frames[j].pose, cfg.depth_tolerance),
                      pair_overlap(points_j, map_i, k_i, frames[i].pose, cfg.depth_tolerance))
        if cfg.overlap[0] <= overlap <= cfg.overlap[1]:
            kept.append((i, j, overlap))
    if len(kept) > cfg.max_pairs_per_scene:
        chosen = np.sort(rng.choice(len(kept), cfg.max_pairs_per_scene, replace=False))
        kept = [kept[k] for k in chosen]
    k_list = intrinsics.reshape(-1).tolist()
    rows = []
    for i, j, overlap in kept:
        a, b = frames[i], frames[j]
        rows.append({
            "pair_id": f"{scene.name}_{a.number:06d}_{b.number:06d}", "scene_id": scene.name,
            "image_a": file_ref(a.color, manifest_dir), "image_b": file_ref(b.color, manifest_dir),
            "depth_a": file_ref(a.depth, manifest_dir), "depth_b": file_ref(b.depth, manifest_dir),
            "depth_scale": float(cfg.depth_scale), "intrinsics_a": k_list, "intrinsics_b": k_list,
            "pose_a": a.pose.reshape(-1).tolist(), "pose_b": b.pose.reshape(-1).tolist(),
            "split": split, "overlap": round(overlap, 4),
        })
    return rows


def _list_frames(scene: Path, cfg: ScanNetPairConfig) -> list[_Frame]:
    color_dir = scene / cfg.color_dir
    if not color_dir.is_dir():
        raise InputReadError(f"{color_dir}: colour folder not found")
    frames = []
    for color in sorted(color_dir.glob(f"*{cfg.color_ext}"), key=lambda p: natural_key(p.name)):
        if not color.stem.isdigit() or int(color.stem) % cfg.frame_stride != 0:
            continue
        depth, pose_path = scene / "depth" / f"{color.stem}.png", scene / "pose" / f"{color.stem}.txt"
        if not (depth.is_file() and pose_path.is_file()):
            continue
        pose = read_matrix(pose_path, 4)
        if pose.shape != (4, 4):
            raise InputReadError(f"{pose_path}: expected a 4x4 pose, got {pose.shape[0]}x{pose.shape[1]}")
        if not np.all(np.isfinite(pose)):
            continue  # ScanNet writes -inf poses where tracking failed
        rot = pose[:3, :3]
        if np.abs(pose[3] - [0, 0, 0, 1]).max() > 1e-6 or np.abs(rot.T @ rot - np.eye(3)).max() > 1e-3:
            raise InputReadError(f"{pose_path}: not a rigid camera-to-world transform")
        frames.append(_Frame(number=int(color.stem), color=color, depth=depth, pose=pose))
    return frames


def _load_samples(frame: _Frame, intrinsics: np.ndarray, cfg: ScanNetPairConfig):
    """Subsampled depth map (metres) with its intrinsics, and the world points of its sample grid."""
    depth = decode_depth(frame.depth.read_bytes(), str(frame.depth), cfg.depth_scale)
    step = max(1, round(depth.shape[1] / cfg.overlap_width))
    offset = step // 2
    small = depth[offset::step, offset::step]
    # Pixel (i, j) of the subsampled map is pixel (offset + step * i, ...) of the full map.
    k = intrinsics.copy()
    k[0, :] /= step
    k[1, :] /= step
    k[0, 2] = (intrinsics[0, 2] - offset) / step
    k[1, 2] = (intrinsics[1, 2] - offset) / step
    ys, xs = np.mgrid[0:small.shape[0]:cfg.sample_step, 0:small.shape[1]:cfg.sample_step]
    z = small[ys, xs]
    valid = z > 0
    pixels = np.stack([xs[valid], ys[valid], np.ones(valid.sum())], axis=1).astype(np.float64)
    cam = (pixels @ np.linalg.inv(k).T) * z[valid][:, None].astype(np.float64)
    world = cam @ frame.pose[:3, :3].T + frame.pose[:3, 3]
    return world, small, k
