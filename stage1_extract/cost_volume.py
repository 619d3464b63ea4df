"""Sparse top-k cost volumes: per patch of one view, a distribution over the other view's patches.

Rows are built either from a teacher's dense probability rows (attention of MASt3R / VGGT) or, for teachers
that give a flow, as an isotropic Gaussian around where each patch centre lands in the other view. Both end
in the same top-k + uint16 quantisation (`format_spec.PROB_SCALE`, floor, so a stored row never sums above 1).
"""

from __future__ import annotations

import numpy as np

from geod.pipeline.format_spec import PROB_SCALE


def nearest_index(coord: np.ndarray, size: int) -> np.ndarray:
    """Pixel index nearest to normalised coordinates (centre of index i at (i + 0.5) / size)."""
    return np.clip(np.floor(coord * size), 0, size - 1).astype(np.int64)


def grid_centres(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (u, v) of every patch centre of a grid, row-major (p = row * grid_w + col)."""
    v, u = np.meshgrid((np.arange(grid_h) + 0.5) / grid_h, (np.arange(grid_w) + 0.5) / grid_w, indexing="ij")
    return u.ravel(), v.ravel()


def gaussian_rows(target_uv: np.ndarray, grid_h: int, grid_w: int, sigma: float) -> np.ndarray:
    """[P, P] float64 probability rows: a Gaussian of `sigma` patches around each row's target (u, v).

    Rows whose target is NaN come out as zeros. The Gaussian is normalised over the grid, so a target near
    the border keeps all its mass on the grid.
    """
    finite = np.isfinite(target_uv).all(axis=1)
    uv = np.where(finite[:, None], target_uv, 0.0)
    # Target positions in patch units, where patch (row, col) has its centre at (row, col).
    col = uv[:, 0] * grid_w - 0.5
    row = uv[:, 1] * grid_h - 0.5
    # Exponents relative to the nearest patch (the largest term is exp(0) = 1): a narrow sigma would
    # otherwise underflow every term of a row whose target lies between patches, and 0 / 0 made it NaN.
    ex = ((np.arange(grid_w)[None, :] - col[:, None]) / sigma) ** 2
    ey = ((np.arange(grid_h)[None, :] - row[:, None]) / sigma) ** 2
    gx = np.exp(-0.5 * (ex - ex.min(axis=1, keepdims=True)))
    gy = np.exp(-0.5 * (ey - ey.min(axis=1, keepdims=True)))
    gx /= gx.sum(axis=1, keepdims=True)
    gy /= gy.sum(axis=1, keepdims=True)
    rows = (gy[:, :, None] * gx[:, None, :]).reshape(len(uv), grid_h * grid_w)
    rows[~finite] = 0.0
    return rows


def topk_quantize(rows: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k of probability rows, quantised: (index uint16 [P, k], prob uint16 [P, k], valid bool [P]).

    Rows are renormalised to sum 1 and quantised (floor(p * PROB_SCALE)) first; rows that are not finite,
    hold a negative value or carry no mass are invalid and all zero. The k entries are the largest
    quantised values, ties going to the lowest patch index, in decreasing order: every entry gets a
    distinct integer key, so the result never depends on the partition algorithm's handling of ties.
    """
    rows = np.asarray(rows, dtype=np.float64)
    n_cols = rows.shape[1]
    if n_cols > 1 << 16:
        raise ValueError(f"{n_cols} patches: indices must fit in uint16")
    total = rows.sum(axis=1)
    valid = np.isfinite(total) & (total > 0) & (rows.min(axis=1) >= 0)
    prob = rows * np.where(valid, 1.0 / np.where(valid, total, 1.0), 0.0)[:, None]
    prob[~valid] = 0.0
    quantised = np.minimum(np.floor(prob * PROB_SCALE), PROB_SCALE).astype(np.int64)
    # key = value in the high bits, reversed column in the low 16 bits: larger key = larger value, then
    # lower index.
    key = (quantised << 16) | ((1 << 16) - 1 - np.arange(n_cols))
    top = np.argpartition(key, n_cols - topk, axis=1)[:, n_cols - topk:]
    top_keys = np.take_along_axis(key, top, axis=1)
    top_keys = -np.sort(-top_keys, axis=1)
    index = ((1 << 16) - 1 - (top_keys & 0xFFFF)).astype(np.uint16)
    values = (top_keys >> 16).astype(np.uint16)
    # A valid row must keep some mass: only a rounding miss (top-1 just under 1 / PROB_SCALE) can zero it.
    values[valid & (values[:, 0] == 0), 0] = 1
    index[~valid] = 0
    values[~valid] = 0
    return index, values, valid


def sample_flow(flow: np.ndarray, u: np.ndarray, v: np.ndarray, *, max_spread: float) -> np.ndarray:
    """Flow [h, w, 2] read at normalised points: bilinear where the 4 surrounding pixels agree, else nearest.

    Patch centres of an even-sized patch fall between pixels, so reading the nearest pixel alone would
    shift every target by half a pixel. Interpolating across a depth edge would blend foreground and
    background, so where the 4 neighbours are invalid or spread more than `max_spread` (normalised units)
    apart the nearest pixel is used instead.
    """
    h, w = flow.shape[:2]
    nearest = flow[nearest_index(v, h), nearest_index(u, w)].astype(np.float64)
    x, y = u * w - 0.5, v * h - 0.5  # pixel-index coordinates (centre of pixel i at i)
    x0 = np.clip(np.floor(x).astype(np.int64), 0, max(w - 2, 0))
    y0 = np.clip(np.floor(y).astype(np.int64), 0, max(h - 2, 0))
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = np.clip(x - x0, 0.0, 1.0)[:, None], np.clip(y - y0, 0.0, 1.0)[:, None]
    corners = np.stack([flow[y0, x0], flow[y0, x1], flow[y1, x0], flow[y1, x1]]).astype(np.float64)
    blended = ((1 - fy) * ((1 - fx) * corners[0] + fx * corners[1])
               + fy * ((1 - fx) * corners[2] + fx * corners[3]))
    with np.errstate(invalid="ignore"):
        spread = np.max(corners.max(axis=0) - corners.min(axis=0), axis=1)
    smooth = np.isfinite(spread) & (spread <= max_spread)
    return np.where(smooth[:, None], blended, nearest)


def cost_volume_from_flow(
    flow: np.ndarray, *, grid_h: int, grid_w: int, topk: int, sigma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cost volume of one direction from a dense flow [h, w, 2] (normalised target (u, v), NaN = none).

    The flow is read at each patch centre of the source grid (see `sample_flow`); no correspondence there
    makes the row invalid.
    """
    u, v = grid_centres(grid_h, grid_w)
    target = sample_flow(flow, u, v, max_spread=0.5 / max(grid_h, grid_w))
    inside = np.all((target >= 0.0) & (target <= 1.0), axis=1)
    target[~inside] = np.nan
    return topk_quantize(gaussian_rows(target, grid_h, grid_w, sigma), topk)


def cost_volume_from_dense(cost: np.ndarray, *, topk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cost volume of one direction from a teacher's dense [P, P] probability rows."""
    return topk_quantize(cost, topk)
