"""Shared pytest fixtures. Fixture names carry a prefix per test area (b_: targets format)."""

from __future__ import annotations

import numpy as np
import pytest


def _b_random_block(layout, n_rows: int, *, first: int = 0, seed: int = 0, failed=()) -> tuple[dict, list]:
    """Random arrays that satisfy every invariant of the format, and their row entries.

    Pair numbers run from `first`; `failed` holds pair numbers recorded as failed (all-zero arrays).
    """
    from geod.pipeline.format_spec import PROB_SCALE
    from geod.pipeline.hashing import sha256_bytes
    from geod.pipeline.shard_io import zero_arrays

    rng = np.random.default_rng(seed)
    dims = layout.dims()
    m, p, k = dims["M"], dims["P"], dims["K"]
    arrays = zero_arrays(layout, n_rows)
    counts = rng.integers(0, m + 1, n_rows)
    counts[0] = m  # one full row, so padding code paths see both extremes
    live = (np.arange(m)[None, :] < counts[:, None])
    arrays["match_count"][:] = counts
    for name in ("match_xy_a", "match_xy_b"):
        arrays[name][:] = rng.random((n_rows, m, 2), dtype=np.float32) * live[..., None]
    for name in ("match_conf", "match_depth_a", "match_depth_b"):
        arrays[name][:] = rng.uniform(0.1, 5.0, (n_rows, m)).astype(np.float32) * live
    for name in ("match_points_a", "match_points_b"):
        arrays[name][:] = rng.normal(size=(n_rows, m, 3)).astype(np.float32) * live[..., None]
    for name in ("depth_a", "depth_b", "depth_conf_a", "depth_conf_b"):
        arrays[name][:] = rng.uniform(0.0, 10.0, arrays[name].shape).astype(np.float16)
    for direction in ("ab", "ba"):
        index = np.argsort(rng.random((n_rows, p, p)), axis=-1)[..., :k]  # distinct patches per row
        raw = -np.sort(-rng.random((n_rows, p, k)), axis=-1)
        prob = np.floor(raw / raw.sum(-1, keepdims=True) * PROB_SCALE)
        valid = rng.random((n_rows, p)) < 0.8
        arrays[f"cv_{direction}_index"][:] = np.where(valid[..., None], index, 0)
        arrays[f"cv_{direction}_prob"][:] = np.where(valid[..., None], prob, 0)
        arrays[f"cv_{direction}_valid"][:] = valid
    rows = []
    for i in range(n_rows):
        number = first + i
        is_failed = number in failed
        if is_failed:
            for array in arrays.values():
                array[i] = 0
        rows.append({
            "pair_id": f"pair-{number:03d}", "scene_id": f"scene-{number // 4}",
            "split": "val" if number % 5 == 4 else "train",
            "image_a": f"images/{number:03d}_a.jpg", "image_b": f"images/{number:03d}_b.jpg",
            "image_a_sha256": sha256_bytes(f"a{number}".encode()), "image_b_sha256": None if is_failed
            else sha256_bytes(f"b{number}".encode()),
            "status": "failed" if is_failed else "ok", "reason": "cannot decode image" if is_failed else None,
        })
    return arrays, rows


@pytest.fixture(scope="session")
def b_layout():
    """A tiny layout: 8 matches, 3x4 grid, top-4, 4x6 depth maps, 8 pairs per shard in chunks of 4."""
    from geod.pipeline.card import DatasetLayout

    return DatasetLayout(max_matches=8, grid_h=3, grid_w=4, topk=4, depth_h=4, depth_w=6, pairs_per_shard=8,
                         rows_per_chunk=4)


@pytest.fixture(scope="session")
def b_random_block():
    """Factory: (layout, n_rows, first=, seed=, failed=) -> (arrays, rows) valid under the format."""
    return _b_random_block


@pytest.fixture(scope="session")
def b_make_dataset(b_layout):
    """Factory writing a complete dataset (shards + index + card) under `root`; returns what was written."""
    from geod.pipeline.shard_io import finalize_dataset, write_shard

    def make(root, *, n_pairs: int = 11, failed=(5,), layout=None, seed: int = 0) -> dict:
        layout = layout or b_layout
        per = layout.pairs_per_shard
        blocks, rows = [], []
        for shard, first in enumerate(range(0, n_pairs, per)):
            arrays, shard_rows = _b_random_block(layout, min(per, n_pairs - first), first=first,
                                                 seed=seed + shard, failed=failed)
            write_shard(root, shard, arrays, shard_rows, layout)
            blocks.append(arrays)
            rows.append(shard_rows)
        card = finalize_dataset(
            root, n_shards=len(blocks), layout=layout, dataset_version="1.2.0",
            teacher={"name": "geometry", "scene_units": "metres", "weights": {"id": None, "sha256": None},
                     "config": {"rel_tol": 0.05}},
            preprocessing={"resize": None}, source={"manifest": "pairs.parquet", "manifest_sha256": "0" * 64,
                                                    "base_dir": "/data"},
            licence="CC-BY-4.0", extra={"note": "test"},
        )
        return {"root": root, "layout": layout, "blocks": blocks, "rows": rows, "card": card}

    return make
