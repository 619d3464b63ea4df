"""Synthetic RGB-D scenes with exact geometry, written in the ScanNet export layout.

Each scene is a textured room (a few metres wide, world z up) with boxes on the floor, filmed by a camera
that moves smoothly on an arc around the room's centre while looking into the room, so consecutive frames
overlap a lot and distant frames less. Files per scene (``OUT/scene0000_00/``)::

    color/{i}.jpg                   RGB, JPEG quality 95 (4:4:4)
    depth/{i}.png                   uint16 millimetres: the exact ray-cast depth z, rounded; 0 = no hit
    pose/{i}.txt                    4x4 camera-to-world (OpenCV axes: x right, y down, z forward)
    intrinsic/intrinsic_color.txt   4x4 with K in the top-left 3x3 (colour and depth share one size here)
    intrinsic/intrinsic_depth.txt
    intrinsic/extrinsic_color.txt   identity (as in ScanNet: colour and depth share one camera)
    intrinsic/extrinsic_depth.txt

Pixel convention: K maps camera points to pixel-index coordinates with pixel centres at integers; pixel
(column i, row j) is rendered along K^-1 [i, j, 1]. Normalised coordinates are u = (i + 0.5) / W. The
principal point and focal lengths are jittered per scene, so code that ignores K or the half-pixel shift
fails the sub-pixel checks. Everything is deterministic for a seed; numbers are written with 17 significant
digits so poses and intrinsics read back exactly.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geod.data_manifests.synthetic_scene import Box, SceneGeometry, make_geometry, render
from geod.pipeline.errors import ConfigError

# Clearance between the camera path and any box, in metres: keeps depth well above zero and the view open.
_CAMERA_CLEARANCE = 0.8


@dataclass(kw_only=True)
class SyntheticConfig:
    """What to render: how many scenes and frames, at which size, from which seed."""

    scenes: int = 4
    frames_per_scene: int = 12
    width: int = 160
    height: int = 120
    seed: int = 0
    fov_deg: float = 65.0  # horizontal field of view
    boxes: tuple[int, int] = (3, 6)  # inclusive range of the box count per scene
    room_size: tuple[float, float] = (4.0, 6.0)  # range of each horizontal room side, metres
    room_height: tuple[float, float] = (2.5, 3.0)
    arc_deg: float = 100.0  # yaw swept around the room centre from the first to the last frame
    jpeg_quality: int = 95
    overwrite: bool = False  # replace scene folders that already exist

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.frames_per_scene < 2:
            raise ConfigError(f"SyntheticConfig: need scenes >= 1 and frames_per_scene >= 2, got "
                              f"scenes={self.scenes}, frames_per_scene={self.frames_per_scene}")
        if self.width < 8 or self.height < 8:
            raise ConfigError(f"SyntheticConfig: width and height must be >= 8, got {self.width}x{self.height}")
        if not 20.0 <= self.fov_deg <= 120.0:
            raise ConfigError(f"SyntheticConfig.fov_deg must be in [20, 120], got {self.fov_deg}")
        if not 0 <= self.boxes[0] <= self.boxes[1] <= 12:
            raise ConfigError(f"SyntheticConfig.boxes must be a range within [0, 12], got {self.boxes}")
        if not 3.0 <= self.room_size[0] <= self.room_size[1] <= 30.0:
            raise ConfigError(f"SyntheticConfig.room_size must be within [3, 30] metres, got {self.room_size}")
        if not 2.2 <= self.room_height[0] <= self.room_height[1] <= 10.0:
            raise ConfigError(f"SyntheticConfig.room_height must be within [2.2, 10] metres, got "
                              f"{self.room_height}")
        if not 0.0 <= self.arc_deg <= 360.0:
            raise ConfigError(f"SyntheticConfig.arc_deg must be in [0, 360], got {self.arc_deg}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"SyntheticConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass(frozen=True, eq=False)
class SyntheticScene:
    """One scene's exact description: geometry, camera intrinsics and per-frame poses."""

    name: str
    geometry: SceneGeometry
    intrinsics: np.ndarray  # 3x3, pixel-index convention (see module docstring)
    poses: np.ndarray  # F x 4 x 4 camera-to-world
    width: int
    height: int

    def render(self, frames: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """RGB float [F, H, W, 3] in [0, 1] and exact depth z [F, H, W] in metres (inf = no hit) of the
        given frames (all by default)."""
        poses = self.poses if frames is None else self.poses[list(frames)]
        return render(self.geometry, self.intrinsics, poses, self.width, self.height)


def scene_name(index: int) -> str:
    return f"scene{index:04d}_00"


def make_scene(cfg: SyntheticConfig, index: int) -> SyntheticScene:
    """The deterministic scene number `index` of a config (nothing is written)."""
    rng = np.random.default_rng([cfg.seed, index])
    room = np.array([rng.uniform(*cfg.room_size), rng.uniform(*cfg.room_size), rng.uniform(*cfg.room_height)])
    intrinsics = _intrinsics(cfg, rng)
    poses, path = _trajectory(cfg, room, rng)
    boxes = _place_boxes(cfg, room, path, rng)
    geometry = make_geometry(room, boxes, rng)
    return SyntheticScene(name=scene_name(index), geometry=geometry, intrinsics=intrinsics, poses=poses,
                          width=cfg.width, height=cfg.height)


def write_synthetic_scenes(out: str | Path, cfg: SyntheticConfig) -> list[Path]:
    """Render and write every scene of `cfg` under `out`; returns the scene folders."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(cfg.scenes):
        scene = make_scene(cfg, index)
        final = out / scene.name
        if final.exists() and not cfg.overwrite:
            raise ConfigError(f"{final}: already exists (set overwrite=True to replace it)")
        tmp = out / f".tmp-{scene.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_scene(scene, tmp, cfg.jpeg_quality)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(final)
    return written


def _write_scene(scene: SyntheticScene, folder: Path, quality: int) -> None:
    from PIL import Image

    for sub in ("color", "depth", "pose", "intrinsic"):
        (folder / sub).mkdir(parents=True)
    k4 = np.eye(4)
    k4[:3, :3] = scene.intrinsics
    for name in ("intrinsic_color", "intrinsic_depth"):
        _write_matrix(folder / "intrinsic" / f"{name}.txt", k4)
    for name in ("extrinsic_color", "extrinsic_depth"):
        _write_matrix(folder / "intrinsic" / f"{name}.txt", np.eye(4))
    colours, depths = scene.render()
    for frame, (rgb, depth) in enumerate(zip(colours, depths)):
        Image.fromarray(np.round(rgb * 255.0).astype(np.uint8)).save(
            folder / "color" / f"{frame}.jpg", quality=quality, subsampling=0)
        millimetres = np.where(np.isfinite(depth) & (depth * 1000.0 < 65535.0), np.round(depth * 1000.0), 0.0)
        Image.fromarray(millimetres.astype(np.uint16)).save(folder / "depth" / f"{frame}.png")
        _write_matrix(folder / "pose" / f"{frame}.txt", scene.poses[frame])


def _write_matrix(path: Path, matrix: np.ndarray) -> None:
    path.write_text("\n".join(" ".join(f"{v:.17g}" for v in row) for row in matrix) + "\n")


def _intrinsics(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    fx = cfg.width / 2.0 / math.tan(math.radians(cfg.fov_deg) / 2.0) * rng.uniform(0.95, 1.05)
    fy = fx * rng.uniform(0.98, 1.02)
    cx = (cfg.width - 1) / 2.0 + rng.uniform(-0.03, 0.03) * cfg.width
    cy = (cfg.height - 1) / 2.0 + rng.uniform(-0.03, 0.03) * cfg.height
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _trajectory(cfg: SyntheticConfig, room: np.ndarray, rng: np.random.Generator):
    """Camera-to-world poses on a smooth arc around the room centre, and the densely sampled path (xy)."""
    centre = room[:2] / 2.0
    radius = 0.3 * room[:2] * rng.uniform(0.85, 1.1)
    theta0 = rng.uniform(0.0, 2.0 * math.pi)
    arc = math.radians(cfg.arc_deg) * rng.choice([-1.0, 1.0])
    height = rng.uniform(1.3, 1.7)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=4)
    target_r, target_z = rng.uniform(0.2, 0.45), rng.uniform(0.75, 1.15)

    def at(s: np.ndarray):
        theta = theta0 + arc * s + 0.05 * np.sin(2.0 * math.pi * s + phases[0])
        eye = np.stack([centre[0] + radius[0] * np.cos(theta), centre[1] + radius[1] * np.sin(theta),
                        height + 0.12 * np.sin(1.6 * math.pi * s + phases[1])], axis=1)
        psi = phases[2] + 1.5 * s
        target = np.stack([centre[0] + target_r * np.cos(psi), centre[1] + target_r * np.sin(psi),
                           target_z + 0.1 * np.sin(2.0 * math.pi * s + phases[3])], axis=1)
        return eye, target, math.radians(3.0) * np.sin(2.0 * math.pi * s + phases[1])

    eyes, targets, rolls = at(np.linspace(0.0, 1.0, cfg.frames_per_scene))
    poses = np.stack([_look_at(e, t, r) for e, t, r in zip(eyes, targets, rolls)])
    return poses, at(np.linspace(0.0, 1.0, 64))[0][:, :2]


def _look_at(eye: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


def _place_boxes(cfg: SyntheticConfig, room: np.ndarray, path_xy: np.ndarray,
                 rng: np.random.Generator) -> tuple[Box, ...]:
    wanted = int(rng.integers(cfg.boxes[0], cfg.boxes[1] + 1))
    centre = room[:2] / 2.0
    boxes: list[Box] = []
    for attempt in range(400):
        if len(boxes) == wanted:
            break
        # Alternate between low boxes in the middle of the room (occluders the camera looks at) and boxes
        # of any height anywhere (clutter, pillars near the walls).
        central = len(boxes) % 2 == 0
        half = np.array([rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.4), rng.uniform(0.15, 0.45)]) if central \
            else np.array([rng.uniform(0.15, 0.55), rng.uniform(0.15, 0.55), rng.uniform(0.15, 1.1)])
        reach = float(np.hypot(half[0], half[1]))
        if central:
            xy = centre + rng.uniform(-0.12, 0.12, size=2) * room[:2]
        else:
            xy = rng.uniform(reach, room[:2] - reach)
        inside = np.all(xy - reach >= 0.05) and np.all(xy + reach <= room[:2] - 0.05)
        clear = np.min(np.linalg.norm(path_xy - xy, axis=1)) > reach + _CAMERA_CLEARANCE
        if inside and clear:
            boxes.append(Box(centre=np.array([xy[0], xy[1], half[2]]), half=half,
                             yaw=float(rng.uniform(0.0, math.pi))))
    return tuple(boxes)
