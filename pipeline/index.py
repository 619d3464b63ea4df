"""index.parquet: one row per manifest pair, saying where its targets live (shard, row) and whether it failed.

Rows are sorted by (shard, row), i.e. manifest order; the file is written atomically and deterministically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from geod.pipeline.errors import FormatError
from geod.pipeline.format_spec import INDEX_COLUMNS, STATUS_FAILED, STATUS_OK

# Keys of a shard record's row entries: the index columns minus the position, which the record implies.
ROW_KEYS: tuple[str, ...] = tuple(name for name, _ in INDEX_COLUMNS if name not in ("shard", "row"))
REQUIRED_ROW_KEYS: tuple[str, ...] = ("pair_id", "scene_id", "image_a", "image_b", "status")


def index_schema():
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.type_for_alias(kind)) for name, kind in INDEX_COLUMNS])


def row_entry_problems(row, where: str) -> list[str]:
    """Problems of one row entry given to write_shard (keys, types, status/reason consistency)."""
    if not isinstance(row, dict):
        return [f"{where}: expected a dict, got {type(row).__name__}"]
    problems = []
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ROW_KEYS)}")
    for key in ROW_KEYS:
        value = row.get(key)
        if value is None:
            if key in REQUIRED_ROW_KEYS:
                problems.append(f"{where}: '{key}' is required")
        elif not isinstance(value, str):
            problems.append(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    status = row.get("status")
    if status is not None and status not in (STATUS_OK, STATUS_FAILED):
        problems.append(f"{where}: status must be '{STATUS_OK}' or '{STATUS_FAILED}', got {status!r}")
    if status == STATUS_FAILED and not row.get("reason"):
        problems.append(f"{where}: a failed row needs a reason")
    if status == STATUS_OK and row.get("reason") is not None:
        problems.append(f"{where}: an ok row has no reason, got {row.get('reason')!r}")
    return problems


def build_index(shard_rows: Sequence[Sequence[dict]]):
    """Index table from each shard's row entries (shard number = position in `shard_rows`)."""
    import pyarrow as pa

    columns: dict[str, list] = {name: [] for name, _ in INDEX_COLUMNS}
    for shard, rows in enumerate(shard_rows):
        for row_number, row in enumerate(rows):
            for key in ROW_KEYS:
                columns[key].append(row.get(key))
            columns["shard"].append(shard)
            columns["row"].append(row_number)
    return pa.Table.from_pydict(columns, schema=index_schema())


def write_index(path: str | Path, table) -> None:
    """Write the index parquet atomically (temporary sibling, then rename)."""
    import io

    import pyarrow.parquet as pq

    from geod.pipeline.atomic import write_bytes_atomic

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes_atomic(path, buffer.getvalue())


def read_index(location, rel: str = "index.parquet"):
    """Read the index of a dataset Location; FormatError when missing, unreadable or of the wrong schema."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = location.read_bytes(rel)
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError) as error:
        raise FormatError(f"{location.describe(rel)}: not a readable parquet file ({error})") from None
    problems = schema_problems(table)
    if problems:
        raise FormatError(f"{location.describe(rel)}: " + "; ".join(problems))
    return table.select([name for name, _ in INDEX_COLUMNS])


def schema_problems(table) -> list[str]:
    """Missing columns or columns of the wrong Arrow type (extra columns are tolerated)."""
    expected = index_schema()
    problems = []
    for field in expected:
        if field.name not in table.column_names:
            problems.append(f"column '{field.name}' missing")
        elif table.schema.field(field.name).type != field.type:
            problems.append(f"column '{field.name}' has type {table.schema.field(field.name).type}, "
                            f"expected {field.type}")
    return problems
