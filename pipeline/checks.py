"""Vectorised checks of a block of rows against the format: dtypes, shapes and value invariants.

Used on write (write_shard refuses a bad block), by `geod validate`, and available to extraction code that
wants to test one pair (a block of one row) before writing it. Every problem names the row, the pair_id and
the array; a check costs a few numpy passes over the block, never a Python loop over values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from geod.pipeline.format_spec import FEATURE_BY_NAME, FEATURES, PROB_SCALE, STATUS_FAILED

# Arrays whose first per-pair axis is the match axis: rows [match_count, M) must be zero.
MATCH_ARRAYS = tuple(f.name for f in FEATURES if f.shape[:1] == ("M",))
# Cost-volume directions: (index, prob, valid) array names.
COST_VOLUMES = tuple((f"cv_{d}_index", f"cv_{d}_prob", f"cv_{d}_valid") for d in ("ab", "ba"))


def spec_problems(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[str, tuple[int, ...]]],
                  n_rows: int, where: str) -> list[str]:
    """Names, dtypes and shapes of a block against `expected` (name -> (dtype, per-pair shape))."""
    problems = []
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing:
        problems.append(f"{where}: missing array(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"{where}: array(s) not in the feature table: {', '.join(unknown)}")
    for name in sorted(set(expected) & set(arrays)):
        dtype, shape = expected[name]
        array = arrays[name]
        if not isinstance(array, np.ndarray):
            problems.append(f"{where}, array '{name}': expected a numpy array, got {type(array).__name__}")
            continue
        if array.dtype != np.dtype(dtype):
            problems.append(f"{where}, array '{name}': dtype {array.dtype}, expected {dtype}")
        if array.shape != (n_rows, *shape):
            problems.append(f"{where}, array '{name}': shape {array.shape}, expected {(n_rows, *shape)}")
    return problems


class _Reporter:
    """Turns per-row counts of bad values into messages naming shard/row/pair_id/array."""

    def __init__(self, where: str, first_row: int, pair_ids: Sequence[str] | None):
        self.where = where
        self.first_row = first_row
        self.pair_ids = pair_ids
        self.problems: list[str] = []

    def row_name(self, r: int) -> str:
        pid = f" (pair_id {self.pair_ids[r]!r})" if self.pair_ids is not None else ""
        return f"{self.where} row {self.first_row + r}{pid}"

    def rows(self, name: str, bad: np.ndarray, what, detail=None) -> None:
        """`bad`: boolean mask with the row axis first; one message per row that has any bad value."""
        counts = bad.reshape(bad.shape[0], -1).sum(axis=1)
        for r in np.flatnonzero(counts):
            extra = f" ({detail(r)})" if detail is not None else ""
            self.problems.append(f"{self.row_name(r)}, array '{name}': {int(counts[r])} {what}{extra}")


def _first_items(mask_row: np.ndarray, limit: int = 5) -> str:
    items = np.flatnonzero(mask_row)
    text = ", ".join(str(int(i)) for i in items[:limit])
    return text + (", ..." if len(items) > limit else "")


def value_problems(arrays: Mapping[str, np.ndarray], *, dims: Mapping[str, int], where: str,
                   first_row: int = 0, pair_ids: Sequence[str] | None = None,
                   statuses: Sequence[str] | None = None) -> list[str]:
    """Value invariants of the format on a block (any subset of the arrays; cross-array checks need both).

    - float arrays: no NaN/Inf; every feature: inside its value_range; index arrays: < their dimension;
    - match_count in [0, M]; match rows at or beyond match_count all zero;
    - cost volumes: each row's probabilities sum to at most PROB_SCALE, are non-increasing along K, the
      indices of a row's non-zero entries are distinct, rows marked invalid are all zero and rows marked
      valid carry some probability;
    - rows whose status is "failed": every array all zero.
    """
    report = _Reporter(where, first_row, pair_ids)
    for name, array in arrays.items():
        feature = FEATURE_BY_NAME.get(name)
        if array.dtype.kind == "f":
            report.rows(name, ~np.isfinite(array), "NaN/Inf values")
        if feature is None or array.dtype.kind == "b":
            continue
        lo, hi = feature.value_range
        if feature.index_into is not None:
            hi = dims[feature.index_into] - 1 if hi is None else min(hi, dims[feature.index_into] - 1)
        if name == "match_count":
            hi = dims["M"]
        if array.dtype.kind in "iu":
            # Bounds the dtype already guarantees need no pass over the data.
            info = np.iinfo(array.dtype)
            lo = None if lo is not None and lo <= info.min else lo
            hi = None if hi is not None and hi >= info.max else hi
        if lo is not None or hi is not None:
            with np.errstate(invalid="ignore"):
                outside = np.zeros(array.shape, dtype=bool)
                if lo is not None:
                    outside |= array < lo
                if hi is not None:
                    outside |= array > hi
            if outside.any():
                def detail(r, a=array, o=outside):
                    bad = a[r][o[r]]
                    return f"min {bad.min()}, max {bad.max()}"
                bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                if feature.index_into is not None:
                    bounds += f" (indices into {feature.index_into} = {dims[feature.index_into]})"
                report.rows(name, outside, f"values outside {bounds}", detail)

    counts = arrays.get("match_count")
    if counts is not None:
        n_valid = np.clip(counts.astype(np.int64), 0, dims["M"])
        padding = np.arange(dims["M"])[None, :] >= n_valid[:, None]  # [rows, M]
        for name in MATCH_ARRAYS:
            array = arrays.get(name)
            if array is None:
                continue
            mask = padding.reshape(padding.shape + (1,) * (array.ndim - 2))
            nonzero_pad = (array != 0) & mask
            report.rows(name, nonzero_pad, "nonzero padding values beyond match_count",
                        lambda r: f"match_count {int(counts[r])}")

    for index_name, prob_name, valid_name in COST_VOLUMES:
        prob = arrays.get(prob_name)
        index = arrays.get(index_name)
        valid = arrays.get(valid_name)
        if prob is not None:
            total = prob.astype(np.int64).sum(axis=-1)  # [rows, P]
            above = total > PROB_SCALE
            report.rows(prob_name, above, f"cost-volume rows summing above {PROB_SCALE}",
                        lambda r: f"patches {_first_items(above[r])}; largest sum {int(total[r].max())}")
            rising = np.diff(prob.astype(np.int32), axis=-1) > 0
            report.rows(prob_name, rising.any(axis=-1), "cost-volume rows not in decreasing probability order")
            if index is not None:
                # Entries with zero probability carry no information; the others must name distinct patches.
                keyed = np.where(prob > 0, index.astype(np.int64), -1 - np.arange(prob.shape[-1]))
                keyed = np.sort(keyed, axis=-1)
                repeated = (np.diff(keyed, axis=-1) == 0).any(axis=-1)
                report.rows(index_name, repeated, "cost-volume rows naming a patch twice",
                            lambda r: f"patches {_first_items(repeated[r])}")
        if valid is not None:
            for name, array in ((index_name, index), (prob_name, prob)):
                if array is None:
                    continue
                stray = (array != 0).any(axis=-1) & ~valid
                report.rows(name, stray, f"rows marked invalid in {valid_name} with nonzero entries",
                            lambda r, s=stray: f"patches {_first_items(s[r])}")
            if prob is not None:
                empty = valid & (prob == 0).all(axis=-1)
                report.rows(valid_name, empty, "rows marked valid with zero probability mass",
                            lambda r: f"patches {_first_items(empty[r])}")

    if statuses is not None:
        failed = np.array([s == STATUS_FAILED for s in statuses], dtype=bool)
        if failed.any():
            for name, array in arrays.items():
                nonzero = (array != 0).reshape(array.shape[0], -1) & failed[:, None]
                report.rows(name, nonzero, "nonzero values in a failed row (failed rows are all zero)")
    return report.problems
