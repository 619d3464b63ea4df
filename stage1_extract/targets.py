"""Teacher-agnostic target builders: one `TeacherPrediction` in, one pair's arrays of the targets format out.

Everything here is vectorised numpy over the teacher's dense maps; no per-pixel Python. The output of
`build_targets` has exactly the names, dtypes and per-pair shapes of `geod.pipeline.format_spec.FEATURES`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from geod.pipeline.card import DatasetLayout
from geod.pipeline.errors import ConfigError, TeacherError
from geod.pipeline.format_spec import FEATURES, dims_for
from geod.stage1_extract.cost_volume import cost_volume_from_dense, cost_volume_from_flow, nearest_index
from geod.stage1_extract.teacher import TeacherPrediction

_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Candidates kept per wanted match before the spread selection: enough for every cell to have a choice,
# few enough that the selection's sort stays cheap at full sensor resolution.
_OVERSAMPLE = 16


@dataclass(kw_only=True)
class TargetConfig:
    """Sizes of the targets (from the dataset layout) and the builder's own options.

    cv_sigma: width of the flow-derived cost-volume Gaussian, in patches of the grid.
    seed: mixed with each pair_id into the match-sampling RNG.
    """

    max_matches: int = 512
    grid_h: int = 24
    grid_w: int = 32
    topk: int = 32
    depth_h: int = 48
    depth_w: int = 64
    cv_sigma: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        # The sizes obey the dataset layout's rules; let the layout check them rather than repeat them here.
        DatasetLayout(max_matches=self.max_matches, grid_h=self.grid_h, grid_w=self.grid_w, topk=self.topk,
                      depth_h=self.depth_h, depth_w=self.depth_w)
        if not (self.cv_sigma > 0):
            raise ConfigError(f"cv_sigma must be > 0, got {self.cv_sigma}")

    @classmethod
    def from_layout(cls, layout, *, cv_sigma: float = 0.5, seed: int = 0) -> TargetConfig:
        """Take the sizes from a `geod.pipeline.card.DatasetLayout` (or anything with those attributes)."""
        return cls(max_matches=layout.max_matches, grid_h=layout.grid_h, grid_w=layout.grid_w,
                   topk=layout.topk, depth_h=layout.depth_h, depth_w=layout.depth_w,
                   cv_sigma=cv_sigma, seed=seed)

    @property
    def n_patches(self) -> int:
        return self.grid_h * self.grid_w

    def dims(self) -> dict[str, int]:
        return dims_for(max_matches=self.max_matches, grid_h=self.grid_h, grid_w=self.grid_w,
                        topk=self.topk, depth_h=self.depth_h, depth_w=self.depth_w)


@dataclass(kw_only=True)
class MatchSet:
    """Selected matches with their depths and points (N <= max_matches rows, float32)."""

    xy_a: np.ndarray
    xy_b: np.ndarray
    conf: np.ndarray
    depth_a: np.ndarray
    depth_b: np.ndarray
    points_a: np.ndarray
    points_b: np.ndarray


def pair_rng(pair_id: str, seed: int = 0) -> np.random.Generator:
    """RNG for one pair: a function of (seed, pair_id) only, so reruns and resumes sample the same."""
    digest = hashlib.sha256(f"geod-targets\0{seed}\0{pair_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def zero_targets(cfg: TargetConfig) -> dict[str, np.ndarray]:
    """All-zero arrays of one pair (the row of a failed pair)."""
    dims = cfg.dims()
    return {f.name: np.zeros(f.resolved_shape(dims), dtype=f.dtype) for f in FEATURES}


def spread_select(xy: np.ndarray, count: int, rng: np.random.Generator, *, aspect: float = 1.0) -> np.ndarray:
    """Indices (increasing) of at most `count` points of `xy` [N, 2] (normalised), spread over the image.

    Stratified sampling: the image is cut into about `count` cells (square in pixels for the given
    width / height `aspect`), refined when the points cover only part of the image; every occupied cell
    gives one random point before any cell gives a second. Deterministic for a given `rng` state.
    """
    n = len(xy)
    if n <= count:
        return np.arange(n)
    if n > _OVERSAMPLE * count:  # uniform thinning keeps the spatial spread and bounds the sort below
        candidates = np.flatnonzero(rng.random(n) < _OVERSAMPLE * count / n)
    else:
        candidates = np.arange(n)
    pts = xy[candidates]

    cells = _cell_ids(pts, count, aspect)
    occupied = np.count_nonzero(np.bincount(cells))
    if occupied < count:  # the points cover a fraction of the image: finer cells there
        cells = _cell_ids(pts, int(np.ceil(count * count / max(occupied, 1))), aspect)

    key = rng.random(len(pts))
    order = np.lexsort((key, cells))
    sorted_cells = cells[order]
    starts = np.r_[True, sorted_cells[1:] != sorted_cells[:-1]]
    position = np.arange(len(order))
    rank = position - np.maximum.accumulate(np.where(starts, position, 0))
    chosen = order[np.lexsort((key[order], rank))[:count]]
    return np.sort(candidates[chosen])


def _cell_ids(xy: np.ndarray, n_cells: int, aspect: float) -> np.ndarray:
    n_cells = min(max(n_cells, 1), 1 << 22)
    cols = max(1, round(float(np.sqrt(n_cells * aspect))))
    rows = max(1, round(n_cells / cols))
    return nearest_index(xy[:, 1], rows) * cols + nearest_index(xy[:, 0], cols)


def _flat_nearest(xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return nearest_index(xy[:, 1], h) * w + nearest_index(xy[:, 0], w)


def window_mean(depth: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Mean of the valid (> 0, finite) depths in the 3x3 window around the pixel nearest to each (u, v)."""
    h, w = depth.shape
    x = nearest_index(xy[:, 0], w)[:, None] + np.tile([-1, 0, 1], 3)[None, :]
    y = nearest_index(xy[:, 1], h)[:, None] + np.repeat([-1, 0, 1], 3)[None, :]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    values = depth[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)].astype(np.float64)
    valid = inside & np.isfinite(values) & (values > 0)
    total = np.where(valid, values, 0.0).sum(axis=1)
    count = valid.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)


def _match_candidates(pred: TeacherPrediction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xy_a, xy_b, conf) of every usable correspondence, from the teacher's matches or its flow."""
    depth_a, conf_a = pred.depth_a.reshape(-1), pred.conf_a.reshape(-1)
    depth_b, conf_b = pred.depth_b.reshape(-1), pred.conf_b.reshape(-1)
    if pred.matches is not None:
        xy_a = np.asarray(pred.matches.xy_a, dtype=np.float64)
        xy_b = np.asarray(pred.matches.xy_b, dtype=np.float64)
        conf = np.asarray(pred.matches.conf, dtype=np.float64)
        usable = np.isfinite(conf) & (conf > 0) & np.all((xy_a >= 0) & (xy_a <= 1), axis=1)
        usable &= np.all((xy_b >= 0) & (xy_b <= 1), axis=1)  # False for NaN too
        keep = np.flatnonzero(usable)
        xy_a, xy_b, conf = xy_a[keep], xy_b[keep], conf[keep]
        flat_a = _flat_nearest(xy_a, pred.depth_a.shape)
    else:
        h, w = pred.depth_a.shape
        flow = pred.flow_ab.reshape(-1, 2)
        inside = np.all((flow >= 0) & (flow <= 1), axis=1)  # False for NaN too
        flat_a = np.flatnonzero(inside & (conf_a > 0))
        xy_a = np.stack([(flat_a % w + 0.5) / w, (flat_a // w + 0.5) / h], axis=1)
        xy_b = flow[flat_a].astype(np.float64)
        conf = conf_a[flat_a].astype(np.float64)
    flat_b = _flat_nearest(xy_b, pred.depth_b.shape)
    # Both ends need known depth and confidence at their own pixel: the depth targets and the 3D points
    # of the matching loss are read there.
    usable = (depth_a[flat_a] > 0) & (depth_b[flat_b] > 0) & (conf_b[flat_b] > 0)
    if pred.matches is None:
        conf = np.minimum(conf, conf_b[flat_b])
    keep = np.flatnonzero(usable)
    return xy_a[keep], xy_b[keep], conf[keep]


def select_matches(pred: TeacherPrediction, max_matches: int, rng: np.random.Generator) -> MatchSet:
    """Up to `max_matches` spread-out matches with 3x3-window depths and nearest-pixel 3D points."""
    xy_a, xy_b, conf = _match_candidates(pred)
    h, w = pred.depth_a.shape
    chosen = spread_select(xy_a, max_matches, rng, aspect=w / h)
    xy_a, xy_b, conf = xy_a[chosen], xy_b[chosen], conf[chosen]
    flat_a = _flat_nearest(xy_a, pred.depth_a.shape)
    flat_b = _flat_nearest(xy_b, pred.depth_b.shape)
    return MatchSet(
        xy_a=xy_a.astype(np.float32), xy_b=xy_b.astype(np.float32), conf=conf.astype(np.float32),
        depth_a=window_mean(pred.depth_a, xy_a), depth_b=window_mean(pred.depth_b, xy_b),
        points_a=pred.points_a.reshape(-1, 3)[flat_a].astype(np.float32),
        points_b=pred.points_b.reshape(-1, 3)[flat_b].astype(np.float32),
    )


def downsample_depth(depth: np.ndarray, conf: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Depth and confidence maps resized to (out_h, out_w), float32.

    Each output cell averages the valid depths whose pixel centres fall in it (no min-pooling: it would
    bias depth towards the foreground); its confidence is the cell's mean confidence with unknown pixels
    counted as 0, so depth 0 <=> confidence 0. A cell holding no source pixel (upsampling) takes the
    nearest source pixel.
    """
    h, w = depth.shape
    depth = depth.astype(np.float64)
    valid = np.isfinite(depth) & (depth > 0) & (conf > 0)
    rows = nearest_index((np.arange(h) + 0.5) / h, out_h)  # non-decreasing: every cell is a block
    cols = nearest_index((np.arange(w) + 0.5) / w, out_w)
    n_all = (np.bincount(rows, minlength=out_h)[:, None] * np.bincount(cols, minlength=out_w)[None, :]).ravel()
    # Sums over each cell's block of rows, then of columns (ufuncs over whole arrays: fast, and free of
    # the interpreter lock, which the loader and GPU threads need meanwhile).
    row_starts = np.minimum(np.searchsorted(rows, np.arange(out_h)), h - 1)
    col_starts = np.minimum(np.searchsorted(cols, np.arange(out_w)), w - 1)

    def block_sums(values: np.ndarray) -> np.ndarray:
        if h % out_h == 0 and w % out_w == 0:  # equal blocks (the usual layouts): a reshape, 3x faster
            rows_summed = values.reshape(out_h, h // out_h, w).sum(axis=1)
            return rows_summed.reshape(out_h, out_w, w // out_w).sum(axis=2).ravel()
        # an empty cell gets a meaningless sum here; the nearest-pixel rule below replaces it
        return np.add.reduceat(np.add.reduceat(values, col_starts, axis=1), row_starts, axis=0).ravel()

    n_valid = block_sums(valid.astype(np.float64))
    sum_depth = block_sums(np.where(valid, depth, 0.0))
    sum_conf = block_sums(np.where(valid, conf, 0.0).astype(np.float64))
    out_depth = np.where(n_valid > 0, sum_depth / np.maximum(n_valid, 1), 0.0)
    out_conf = np.where(n_all > 0, sum_conf / np.maximum(n_all, 1), 0.0)

    empty = np.flatnonzero(n_all == 0)
    if len(empty):
        src_y = nearest_index((empty // out_w + 0.5) / out_h, h)
        src_x = nearest_index((empty % out_w + 0.5) / out_w, w)
        ok = valid[src_y, src_x]
        out_depth[empty] = np.where(ok, depth[src_y, src_x], 0.0)
        out_conf[empty] = np.where(ok, conf[src_y, src_x], 0.0)
    return (out_depth.reshape(out_h, out_w).astype(np.float32),
            out_conf.reshape(out_h, out_w).astype(np.float32))


def _cost_volume(cost: np.ndarray | None, flow: np.ndarray | None, cfg: TargetConfig, top=None):
    if top is not None and top.index.shape[-1] == cfg.topk:  # reduced by the teacher already
        return top.index, top.prob, top.valid
    if cost is not None:
        return cost_volume_from_dense(cost, topk=cfg.topk)
    if flow is None:
        raise TeacherError(f"the teacher gave its cost volume as top-{top.index.shape[-1]} rows only, but the "
                           f"layout keeps top-{cfg.topk}; set the teacher's cost_topk to {cfg.topk}")
    return cost_volume_from_flow(flow, grid_h=cfg.grid_h, grid_w=cfg.grid_w, topk=cfg.topk, sigma=cfg.cv_sigma)


def build_targets(pred: TeacherPrediction, cfg: TargetConfig, pair_id: str) -> dict[str, np.ndarray]:
    """All target arrays of one pair (format_spec names, dtypes and shapes), deterministic in pair_id."""
    pred.check(cfg.n_patches)
    out = zero_targets(cfg)
    matches = select_matches(pred, cfg.max_matches, pair_rng(pair_id, cfg.seed))
    n = len(matches.conf)
    out["match_count"][...] = n
    for name in ("xy_a", "xy_b", "conf", "depth_a", "depth_b", "points_a", "points_b"):
        out[f"match_{name}"][:n] = getattr(matches, name)
    for view in ("a", "b"):
        depth, conf = downsample_depth(getattr(pred, f"depth_{view}"), getattr(pred, f"conf_{view}"),
                                       cfg.depth_h, cfg.depth_w)
        out[f"depth_{view}"][...] = np.minimum(depth, _FLOAT16_MAX)
        out[f"depth_conf_{view}"][...] = np.minimum(conf, _FLOAT16_MAX)
    for direction in ("ab", "ba"):
        index, prob, valid = _cost_volume(getattr(pred, f"cost_{direction}"), getattr(pred, f"flow_{direction}"), cfg,
                                          getattr(pred, f"cost_{direction}_topk"))
        out[f"cv_{direction}_index"][...] = index
        out[f"cv_{direction}_prob"][...] = prob
        out[f"cv_{direction}_valid"][...] = valid
    _check_finite(out)
    return out


def _check_finite(arrays: dict[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise TeacherError(f"teacher output gives non-finite values in target {name!r}")
