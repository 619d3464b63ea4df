"""Reading, validating and writing pair manifests (the parquet files described in `schema`).

Validation collects every problem before failing, so that a user fixes a manifest in one pass. Each problem
names the row (numbered from 0), its pair_id and the field, e.g.
``row 17 (pair_id 'scene0000_00_000010_000025'), field 'pose_a': expected 16 floats, got 12``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geod.data_manifests import schema
from geod.pipeline.errors import ManifestError
from geod.pipeline.hashing import sha256_file

# More lines than this make an error message unreadable; the count of the rest is still given.
MAX_LISTED_PROBLEMS = 50
# Tolerances for the rigid-transform check of poses (ScanNet stores poses with ~7 significant digits).
_POSE_ROW_TOL = 1e-6
_ROTATION_TOL = 1e-3


@dataclass(frozen=True, kw_only=True, eq=False)
class PairRow:
    """One validated manifest row. Matrices are float64 arrays; absent optional values are None."""

    index: int
    pair_id: str
    scene_id: str
    image_a: str
    image_b: str
    depth_a: str | None = None
    depth_b: str | None = None
    depth_scale: float | None = None
    intrinsics_a: np.ndarray | None = None  # 3x3, pixels of depth_a (see schema for the pixel convention)
    intrinsics_b: np.ndarray | None = None
    pose_a: np.ndarray | None = None  # 4x4 camera-to-world, OpenCV camera axes
    pose_b: np.ndarray | None = None
    disparity_a: str | None = None
    baseline: float | None = None
    split: str | None = None
    extra: Mapping = field(default_factory=dict)  # unknown columns, kept as read

    @property
    def kind(self) -> str:
        """"rgbd" (depth + poses), "stereo" (disparity) or "images" (no geometry)."""
        if self.depth_a is not None:
            return "rgbd"
        if self.disparity_a is not None:
            return "stereo"
        return "images"

    def to_dict(self) -> dict:
        """The row as a manifest dict (matrices as flat lists), e.g. to write a filtered manifest."""
        out: dict = {}
        for name in schema.ALL_COLUMNS:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = value.reshape(-1).tolist()
            out[name] = value
        out.update(self.extra)
        return out


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest:
    """A loaded manifest: its rows and where relative references are resolved from."""

    path: Path
    base_dir: Path
    rows: list[PairRow]
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a pair manifest; raise ManifestError listing every problem found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: pair manifest not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: cannot read the pair manifest as parquet: {exc}") from exc
    column_problems = _check_column_types(table.schema)
    if column_problems:
        raise ManifestError(_format_problems(str(path), column_problems))
    raw_rows = table.to_pylist()
    problems = check_rows(raw_rows)
    if problems:
        raise ManifestError(_format_problems(str(path), problems))
    rows = [_to_pair_row(i, raw) for i, raw in enumerate(raw_rows)]
    return Manifest(path=path.absolute(), base_dir=path.absolute().parent, rows=rows,
                    sha256=sha256_file(path))


def write_manifest(rows: Sequence[Mapping | PairRow], path: str | Path) -> Path:
    """Validate rows (dicts or PairRow) and write them atomically as a parquet manifest."""
    import pyarrow.parquet as pq

    path = Path(path)
    dict_rows = [_normalise_for_write(r.to_dict() if isinstance(r, PairRow) else r) for r in rows]
    problems = check_rows(dict_rows)
    if problems:
        raise ManifestError(_format_problems(f"{path} (rows to write)", problems))
    table = _to_table(dict_rows, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_rows(rows: Sequence[Mapping]) -> list[str]:
    """Every problem of a list of manifest rows (dicts as read from parquet); empty when valid."""
    if len(rows) == 0:
        return ["the manifest has no rows"]
    problems: list[str] = []
    first_row_of: dict[str, int] = {}
    for index, row in enumerate(rows):
        problems.extend(_check_row(index, row, first_row_of))
    return problems


def _check_column_types(arrow_schema) -> list[str]:
    import pyarrow as pa

    problems = []
    names = set(arrow_schema.names)
    for name in schema.REQUIRED_COLUMNS:
        if name not in names:
            problems.append(f"column '{name}': missing (required columns: "
                            f"{', '.join(schema.REQUIRED_COLUMNS)})")
    for arrow_field in arrow_schema:
        name, typ = arrow_field.name, arrow_field.type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if name not in schema.ALL_COLUMNS or pa.types.is_null(typ):
            continue  # unknown columns are tolerated; an all-null column means "absent"
        if name in schema.STRING_COLUMNS:
            ok = pa.types.is_string(typ) or pa.types.is_large_string(typ)
            expected = "string"
        elif name in schema.FLOAT_COLUMNS:
            ok = pa.types.is_floating(typ) or pa.types.is_integer(typ)
            expected = "float64"
        else:
            ok = (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) \
                and (pa.types.is_floating(typ.value_type) or pa.types.is_integer(typ.value_type))
            expected = "list<float64>"
        if not ok:
            problems.append(f"column '{name}': expected {expected}, got {typ}")
    return problems


def _row_label(index: int, row: Mapping) -> str:
    pair_id = row.get("pair_id")
    return f"row {index} (pair_id {pair_id!r})" if isinstance(pair_id, str) else f"row {index}"


def _check_row(index: int, row: Mapping, first_row_of: dict[str, int]) -> list[str]:
    label = _row_label(index, row)
    problems: list[str] = []

    def bad(name: str, message: str) -> None:
        problems.append(f"{label}, field '{name}': {message}")

    present = {name: row.get(name) is not None for name in schema.ALL_COLUMNS}
    for name in schema.REQUIRED_COLUMNS:
        if not present[name]:
            bad(name, "required value is missing")
    for name in schema.STRING_COLUMNS:
        value = row.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            bad(name, f"expected a string, got {type(value).__name__}")
        elif not value.strip():
            bad(name, "empty string (leave the field null when there is no value)")
    for name in schema.FLOAT_COLUMNS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            bad(name, f"expected a number, got {type(value).__name__}")
        elif not math.isfinite(value) or value <= 0:
            bad(name, f"must be a finite number > 0, got {value!r}")
    for name, length in schema.MATRIX_COLUMNS.items():
        value = row.get(name)
        if value is not None:
            message = _check_matrix(name, value, length)
            if message:
                bad(name, message)

    pair_id = row.get("pair_id")
    if isinstance(pair_id, str):
        if pair_id in first_row_of:
            bad("pair_id", f"duplicate of row {first_row_of[pair_id]}")
        else:
            first_row_of[pair_id] = index

    # Geometry must come in complete sets: a teacher cannot use half of one.
    rgbd_given = [n for n in ("depth_a", "depth_b", "pose_a", "pose_b") if present[n]]
    if rgbd_given:
        for name in schema.RGBD_COLUMNS:
            if not present[name]:
                bad(name, "missing; an RGB-D row needs depth_a, depth_b, intrinsics_a, intrinsics_b, "
                          f"pose_a and pose_b (this row has {', '.join(rgbd_given)})")
    if present["disparity_a"]:
        for name in ("depth_a", "depth_b", "pose_a", "pose_b"):
            if present[name]:
                bad(name, "not allowed together with disparity_a (a row is either RGB-D or rectified stereo)")
    elif present["baseline"]:
        bad("baseline", "given without disparity_a (baseline only applies to rectified stereo)")
    return problems


def _check_matrix(name: str, value, length: int) -> str | None:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)):
        return f"expected a list of {length} floats, got {type(value).__name__}"
    if len(value) != length:
        return f"expected {length} floats, got {len(value)}"
    for k, v in enumerate(value):
        if v is None or isinstance(v, bool) or not isinstance(v, numbers.Real):
            return f"element {k} is {v!r}, expected a number"
        if not math.isfinite(v):
            return f"element {k} is {v!r}, expected a finite number"
    m = np.asarray(value, dtype=np.float64)
    if length == 9:
        k = m.reshape(3, 3)
        if k[0, 0] <= 0 or k[1, 1] <= 0:
            return f"fx and fy must be > 0, got fx={k[0, 0]!r}, fy={k[1, 1]!r}"
        if k[1, 0] != 0 or not np.array_equal(k[2], [0.0, 0.0, 1.0]):
            return f"not a camera matrix (expected [[fx,s,cx],[0,fy,cy],[0,0,1]] row-major), got {value}"
        return None
    pose = m.reshape(4, 4)
    if np.abs(pose[3] - [0.0, 0.0, 0.0, 1.0]).max() > _POSE_ROW_TOL:
        return f"bottom row must be [0, 0, 0, 1], got {pose[3].tolist()} (is the matrix row-major?)"
    rot = pose[:3, :3]
    if np.abs(rot.T @ rot - np.eye(3)).max() > _ROTATION_TOL or np.linalg.det(rot) < 0:
        return "rotation part is not a rotation (orthonormal with determinant +1)"
    return None


def _to_pair_row(index: int, raw: Mapping) -> PairRow:
    values: dict = {}
    for name in schema.ALL_COLUMNS:
        value = raw.get(name)
        if value is not None and name in schema.MATRIX_COLUMNS:
            side = 3 if schema.MATRIX_COLUMNS[name] == 9 else 4
            value = np.asarray(value, dtype=np.float64).reshape(side, side)
        elif value is not None and name in schema.FLOAT_COLUMNS:
            value = float(value)
        values[name] = value
    extra = {k: v for k, v in raw.items() if k not in schema.ALL_COLUMNS}
    return PairRow(index=index, extra=extra, **values)


def _normalise_for_write(row: Mapping) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.reshape(-1).tolist() if key in schema.MATRIX_COLUMNS else value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        out[key] = value
    return out


def _to_table(rows: list[dict], path: Path):
    import pyarrow as pa

    known = [n for n in schema.ALL_COLUMNS
             if n in schema.REQUIRED_COLUMNS or any(r.get(n) is not None for r in rows)]
    unknown = sorted({k for r in rows for k in r} - set(schema.ALL_COLUMNS))
    arrays, names = [], []
    for name in known + unknown:
        if name in schema.STRING_COLUMNS:
            typ = pa.string()
        elif name in schema.FLOAT_COLUMNS:
            typ = pa.float64()
        elif name in schema.MATRIX_COLUMNS:
            typ = pa.list_(pa.float64())
        else:
            typ = None
        try:
            arrays.append(pa.array([r.get(name) for r in rows], type=typ))
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(f"{path}: column '{name}': values cannot be stored in parquet: {exc}") from exc
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _format_problems(source: str, problems: list[str]) -> str:
    lines = [f"{source}: {len(problems)} problem(s) in the pair manifest (rows numbered from 0):"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)
