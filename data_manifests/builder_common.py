"""Helpers shared by the manifest builders: split assignment, file references, natural ordering."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from geod.pipeline.errors import ConfigError

TRAIN, VAL = "train", "val"


def assign_splits(scene_ids: Iterable[str], *, val_fraction: float = 0.0, val_scenes: Iterable[str] = (),
                  seed: int = 0) -> dict[str, str]:
    """Map every scene to "train" or "val", deterministically.

    Scenes named in `val_scenes` are "val". Otherwise, with val_fraction > 0, scenes are ranked by
    sha256(f"{seed}:{scene_id}") and the first round(val_fraction * n) of them (at least one when there are
    two or more scenes) are "val": the choice depends on the scene names and the seed only, never on the
    order in which scenes are found.
    """
    scenes = sorted(set(scene_ids))
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    named = set(val_scenes)
    unknown = sorted(named - set(scenes))
    if unknown:
        raise ConfigError(f"val_scenes names scenes that do not exist: {', '.join(unknown)}")
    if named:
        return {s: VAL if s in named else TRAIN for s in scenes}
    n_val = 0
    if val_fraction > 0 and len(scenes) >= 2:
        n_val = min(len(scenes) - 1, max(1, math.floor(val_fraction * len(scenes) + 0.5)))
    ranked = sorted(scenes, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    chosen = set(ranked[:n_val])
    return {s: VAL if s in chosen else TRAIN for s in scenes}


def file_ref(path: Path, manifest_dir: str | Path | None) -> str:
    """How a manifest refers to a file: relative to the manifest's folder, or absolute when None."""
    path = Path(os.path.abspath(path))
    if manifest_dir is None:
        return path.as_posix()
    return Path(os.path.relpath(path, os.path.abspath(manifest_dir))).as_posix()


def natural_key(name: str) -> tuple:
    """Sort key that orders "frame2" before "frame10"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def scene_seed(seed: int, scene_id: str) -> int:
    """A per-scene RNG seed that does not depend on which other scenes exist."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{scene_id}".encode()).digest()[:8], "little")
