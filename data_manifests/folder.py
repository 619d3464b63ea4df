"""Pair manifests from plain image folders (video frames or photo sequences, no geometry).

Each subfolder of ROOT is a scene (ROOT itself is the only scene when it holds images directly). Images are
ordered by natural sort of their names ("frame2" before "frame10"), and every image is paired with the
images `min_gap` to `max_gap` positions after it. Rows carry no geometry columns: a learned teacher
(MASt3R, VGGT) supplies the targets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geod.data_manifests.builder_common import assign_splits, file_ref, natural_key, scene_seed
from geod.pipeline.errors import ConfigError, InputReadError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def build_folder_pairs(root: str | Path, *, min_gap: int = 1, max_gap: int = 3, stride: int = 1,
                       max_pairs_per_scene: int | None = None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                       val_fraction: float = 0.0, val_scenes: tuple[str, ...] = (), seed: int = 0,
                       manifest_dir: str | Path | None = None) -> list[dict]:
    """Manifest rows pairing nearby images of each scene folder.

    `stride` keeps every n-th image before pairing; gaps count positions among the kept images.
    `max_pairs_per_scene` keeps a seeded random subset. File references are relative to `manifest_dir`,
    or absolute when it is None. Splits are assigned by scene (see `builder_common.assign_splits`).
    """
    if not 1 <= min_gap <= max_gap:
        raise ConfigError(f"build_folder_pairs: need 1 <= min_gap <= max_gap, got min_gap={min_gap}, "
                          f"max_gap={max_gap}")
    if stride < 1 or (max_pairs_per_scene is not None and max_pairs_per_scene < 1):
        raise ConfigError("build_folder_pairs: stride and max_pairs_per_scene must be >= 1")
    root = Path(root)
    if not root.is_dir():
        raise InputReadError(f"{root}: not a directory")
    suffixes = {e.lower() for e in extensions}
    scenes = {}
    if _images(root, suffixes):
        scenes[root.name] = _images(root, suffixes)
    else:
        for sub in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
            if sub.is_dir() and not sub.name.startswith("."):
                images = _images(sub, suffixes)
                if len(images) >= 2:
                    scenes[sub.name] = images
    if not scenes:
        raise InputReadError(f"{root}: no scene folders with two or more images "
                             f"({', '.join(sorted(suffixes))}) found")
    splits = assign_splits(scenes, val_fraction=val_fraction, val_scenes=val_scenes, seed=seed)
    rows: list[dict] = []
    for scene, images in scenes.items():
        images = images[::stride]
        pairs = [(i, j) for i in range(len(images))
                 for j in range(i + min_gap, min(i + max_gap, len(images) - 1) + 1)]
        if max_pairs_per_scene is not None and len(pairs) > max_pairs_per_scene:
            rng = np.random.default_rng(scene_seed(seed, scene))
            pairs = [pairs[k] for k in np.sort(rng.choice(len(pairs), max_pairs_per_scene, replace=False))]
        for i, j in pairs:
            rows.append({
                "pair_id": f"{scene}_{i * stride:05d}_{j * stride:05d}", "scene_id": scene,
                "image_a": file_ref(images[i], manifest_dir), "image_b": file_ref(images[j], manifest_dir),
                "split": splits[scene],
            })
    return rows


def _images(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                   and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
