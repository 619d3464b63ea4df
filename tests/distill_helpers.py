"""Factory for tiny target datasets used by the distillation tests.

Each pair is two crops of one random smooth texture, B shifted from A by a known offset, so the targets
(matches, depths, 3D points, cost volumes) are exact and learnable. Written through the real writer
(shard_io.write_dataset) with small PNG images referenced by the index.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from geod.pipeline.card import DatasetLayout
from geod.pipeline.format_spec import PROB_SCALE, STATUS_FAILED, STATUS_OK
from geod.pipeline.hashing import sha256_bytes
from geod.pipeline.shard_io import write_dataset, zero_arrays
from PIL import Image

SMALL_LAYOUT = {"max_matches": 24, "grid_h": 4, "grid_w": 6, "topk": 4, "depth_h": 4, "depth_w": 6,
                "pairs_per_shard": 8, "rows_per_chunk": 4}


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random colour texture (sum of upsampled noise octaves) as uint8."""
    out = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 1.0), (10, 0.6), (24, 0.35)):
        coarse = rng.random((cells, cells, 3)).astype(np.float32)
        up = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        out += weight * np.asarray(up, np.float32)
    out = (out - out.min()) / (np.ptp(out) + 1e-6) * 255
    return out.astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pair_targets(rng, layout: DatasetLayout, height: int, width: int, shift: tuple[int, int],
                  depth_field: np.ndarray) -> dict[str, np.ndarray]:
    """Exact targets for B = A shifted by `shift` = (dx, dy) pixels (A pixel x maps to x - dx in B)."""
    dx, dy = shift
    arrays = {name: value[0] for name, value in zero_arrays(layout, 1).items()}
    # Matches: random A pixels whose B position is inside B.
    xs = rng.uniform(0.5, width - 0.5, 400)
    ys = rng.uniform(0.5, height - 0.5, 400)
    inside = (xs - dx > 0.5) & (xs - dx < width - 0.5) & (ys - dy > 0.5) & (ys - dy < height - 0.5)
    xs, ys = xs[inside][:layout.max_matches], ys[inside][:layout.max_matches]
    count = len(xs)
    depth = depth_field[np.clip(ys.astype(int), 0, height - 1), np.clip(xs.astype(int), 0, width - 1)]
    arrays["match_count"] = np.int32(count)
    arrays["match_xy_a"][:count] = np.stack([xs / width, ys / height], -1)
    arrays["match_xy_b"][:count] = np.stack([(xs - dx) / width, (ys - dy) / height], -1)
    arrays["match_conf"][:count] = 1.0
    arrays["match_depth_a"][:count] = depth
    arrays["match_depth_b"][:count] = depth
    points = np.stack([(xs / width - 0.5) * depth, (ys / height - 0.5) * depth, depth], -1)
    arrays["match_points_a"][:count] = points
    arrays["match_points_b"][:count] = points
    small = np.asarray(Image.fromarray(depth_field).resize((layout.depth_w, layout.depth_h)), np.float16)
    arrays["depth_a"][:] = small
    arrays["depth_b"][:] = small
    arrays["depth_conf_a"][:] = 1
    arrays["depth_conf_b"][:] = 1
    # Cost volumes: Gaussian (sigma half a cell) around each cell centre's position in the other view.
    gh, gw = layout.grid_h, layout.grid_w
    v, u = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    centres = np.stack([u.ravel(), v.ravel()], -1)
    for name, sign in (("ab", 1), ("ba", -1)):
        target = centres - sign * np.array([dx / width, dy / height])
        valid = (target > 0).all(-1) & (target < 1).all(-1)
        dist2 = (((target[:, None, :] - centres[None, :, :]) * [gw, gh]) ** 2).sum(-1)
        prob = np.exp(-dist2 / (2 * 0.5 ** 2))
        prob /= prob.sum(-1, keepdims=True)
        order = np.argsort(-prob, axis=-1, kind="stable")[:, :layout.topk]
        top = np.floor(np.take_along_axis(prob, order, -1) * PROB_SCALE).astype(np.uint16)
        arrays[f"cv_{name}_index"][valid] = order[valid].astype(np.uint16)
        arrays[f"cv_{name}_prob"][valid] = top[valid]
        arrays[f"cv_{name}_valid"][:] = valid
    return arrays


def make_target_dataset(root: Path, *, pairs: int = 20, height: int = 32, width: int = 48, seed: int = 0,
                        layout: dict | None = None, failed: tuple[int, ...] = (), val_every: int = 0,
                        max_shift: int = 8) -> Path:
    """Write a dataset of `pairs` toy pairs under root/targets (images under root/images); returns its path.

    `failed`: pair numbers recorded as failed (zero arrays); `val_every`: every n-th pair gets split "val"
    (0: all "train").
    """
    rng = np.random.default_rng(seed)
    layout = DatasetLayout(**(layout or SMALL_LAYOUT))
    out = root / "targets"
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, arrays = [], []
    for i in range(pairs):
        texture = _texture(rng, height + 2 * max_shift, width + 2 * max_shift)
        dx, dy = (int(v) for v in rng.integers(-max_shift, max_shift + 1, 2))
        a = texture[max_shift:max_shift + height, max_shift:max_shift + width]
        b = texture[max_shift + dy:max_shift + dy + height, max_shift + dx:max_shift + dx + width]
        data_a, data_b = _png(np.ascontiguousarray(a)), _png(np.ascontiguousarray(b))
        (images / f"{i:04d}_a.png").write_bytes(data_a)
        (images / f"{i:04d}_b.png").write_bytes(data_b)
        yy, xx = np.mgrid[0:height, 0:width]
        depth_field = (1.0 + 0.8 * yy / height + 0.3 * np.sin(xx / 5.0 + i)).astype(np.float32)
        split = "val" if val_every and i % val_every == val_every - 1 else "train"
        row = {"pair_id": f"p{i:04d}", "scene_id": f"s{i // 4}", "split": split,
               "image_a": f"images/{i:04d}_a.png", "image_b": f"images/{i:04d}_b.png",
               "image_a_sha256": sha256_bytes(data_a), "image_b_sha256": sha256_bytes(data_b)}
        if i in failed:
            row.update(status=STATUS_FAILED, reason="toy failure")
            arrays.append({name: value[0] for name, value in zero_arrays(layout, 1).items()})
        else:
            row.update(status=STATUS_OK, reason=None)
            arrays.append(_pair_targets(rng, layout, height, width, (dx, dy), depth_field))
        rows.append(row)
    write_dataset(out, arrays, rows, layout, teacher={"name": "toy-shift", "scene_units": "relative"},
                  source={"manifest": None, "manifest_sha256": None, "base_dir": str(root)})
    return out


def random_batch(pairs: int, matches: int, cells: int, topk: int, device, *, seed: int = 0) -> dict:
    """A batch as the loader collates it (float pixels at 32x48), random but valid, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    depth = 1 + rand(pairs, matches)
    prob = torch.softmax(rand(pairs, cells, topk) * 4, -1).sort(-1, descending=True).values
    batch = {"pixel_a": rand(pairs, 3, 32, 48) * 2 - 1, "pixel_b": rand(pairs, 3, 32, 48) * 2 - 1,
             "xy_a": rand(pairs, matches, 2), "xy_b": rand(pairs, matches, 2),
             "mask": torch.ones(pairs, matches, dtype=torch.bool), "depth_a": depth, "depth_b": depth + 0.1,
             "points_a": rand(pairs, matches, 3) * 3, "points_b": rand(pairs, matches, 3) * 3,
             "scene_scale": torch.ones(pairs)}
    for side in ("ab", "ba"):
        batch[f"cv_{side}_index"] = torch.stack([torch.stack([torch.randperm(cells, generator=generator)[:topk]
                                                              for _ in range(cells)]) for _ in range(pairs)])
        batch[f"cv_{side}_prob"] = prob
        batch[f"cv_{side}_valid"] = torch.ones(pairs, cells, dtype=torch.bool)
    return {k: v.to(device) for k, v in batch.items()}
