"""The targets format, version 1: every array geod writes, described once.

A target dataset is a directory::

    card.json                  self-describing card (see geod.pipeline.card)
    index.parquet              one row per manifest pair (see INDEX_COLUMNS)
    shards/shard-00000.zarr/   immutable zarr v3 group, one per block of pairs
    shards/shard-00000.json    the shard's record (rows, status, sha256, bytes), written after the shard

Every array in a shard has a leading pair axis (one row per manifest pair of that shard, failed pairs
zero-filled) followed by the per-pair shape below. Symbolic dimensions are resolved from the card:
``M`` = max_matches, ``P`` = grid_h * grid_w (cost-volume patches), ``K`` = topk, ``Hd``/``Wd`` = the
low-resolution depth map size.

Coordinate conventions (the same for every teacher):
- Normalised image coordinates (u, v) in [0, 1]: u = x / W, v = y / H where (x, y) is the continuous pixel
  position with pixel centres at i + 0.5. They do not depend on any resize, so targets map onto any
  student's grid and aspect ratio.
- Patch p of the cost-volume grid is row-major: p = row * grid_w + col; its centre is at
  u = (col + 0.5) / grid_w, v = (row + 0.5) / grid_h.
- "frame A" is view A's camera frame (OpenCV: x right, y down, z forward); depth is z in a view's own frame.
- Scene units are the teacher's (metres for sensor depth and metric teachers; relative for others): the
  card's ``teacher.scene_units`` says which.

Storage of a shard (see geod.pipeline.shard_io):
- One zarr v3 group per shard, one array per feature, shape (rows, *per-pair shape). Plain chunks (no
  sharding codec) of ``rows_per_chunk`` rows by the full per-pair shape, every chunk stored (also all-zero
  ones), chunk keys ``<array>/c/<i>/0/...``. Codecs: bytes (little endian) -> blosc (zstd, level 5;
  bitshuffle for index arrays, byte shuffle for the others) -> crc32c. The group's attributes hold
  ``{"geod": {"format", "format_version", "shard", "layout"}}``.
- Shard checksum (the ``sha256`` of the card's shard entry and of the shard record): sha256 of the UTF-8
  text made of one line ``relpath + "\0" + sha256_hex(file bytes) + "\n"`` for every file below the shard
  directory, relpath POSIX-style relative to that directory, lines sorted by relpath. ``bytes`` is the sum
  of the file sizes. The record also lists every file's size and sha256, so damage is traced to one chunk.

Invariants (checked on write and by ``geod validate``):
- Float arrays hold no NaN/Inf; values lie in each feature's ``value_range``; index arrays are < their
  ``index_into`` dimension; ``match_count`` lies in [0, M] and match rows at or beyond it are zero.
- Cost volumes: a row's probabilities sum to at most PROB_SCALE and do not increase along K; the indices
  of a row's non-zero entries are distinct; rows whose ``valid`` flag is False are all zero, rows whose
  flag is True carry some probability.
- Rows of failed pairs are zero in every array.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_NAME = "geod-targets"
FORMAT_VERSION = 1

# Probabilities are stored as floor(p * PROB_SCALE) in uint16, so a stored row never sums above 1.
PROB_SCALE = 65535


@dataclass(frozen=True, kw_only=True)
class Feature:
    """One array of a shard: per-pair shape (symbolic dims allowed), dtype, units, frame, meaning."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    units: str
    frame: str
    description: str
    # Inclusive value range checked by `geod validate` (None = unbounded); NaN/Inf are always rejected.
    value_range: tuple[float | None, float | None] = (None, None)
    # For index arrays: the symbolic dimension every value must be below.
    index_into: str | None = None

    def resolved_shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_json(self, dims: dict[str, int]) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.resolved_shape(dims)),
            "symbolic_shape": [str(d) for d in self.shape],
            "units": self.units,
            "frame": self.frame,
            "description": self.description,
            "value_range": list(self.value_range),
        }


FEATURES: tuple[Feature, ...] = (
    Feature(name="match_count", dtype="int32", shape=(), units="count", frame="-",
            description="number of valid matches; rows [0, match_count) of the match_* arrays are valid, "
                        "the rest are zero padding", value_range=(0, None)),
    Feature(name="match_xy_a", dtype="float32", shape=("M", 2), units="normalised image coordinates (u, v)",
            frame="image A", description="matched points in view A", value_range=(0.0, 1.0)),
    Feature(name="match_xy_b", dtype="float32", shape=("M", 2), units="normalised image coordinates (u, v)",
            frame="image B", description="the corresponding points in view B", value_range=(0.0, 1.0)),
    Feature(name="match_conf", dtype="float32", shape=("M",), units="teacher confidence (>= 0)",
            frame="-", description="confidence of each match (min of both views' confidences)",
            value_range=(0.0, None)),
    Feature(name="match_depth_a", dtype="float32", shape=("M",), units="scene units",
            frame="camera A", description="depth (z) of view A at each match, 3x3-window average",
            value_range=(0.0, None)),
    Feature(name="match_depth_b", dtype="float32", shape=("M",), units="scene units",
            frame="camera B", description="depth (z) of view B at each match, in B's own frame",
            value_range=(0.0, None)),
    Feature(name="match_points_a", dtype="float32", shape=("M", 3), units="scene units", frame="camera A",
            description="3D point of view A's match"),
    Feature(name="match_points_b", dtype="float32", shape=("M", 3), units="scene units", frame="camera A",
            description="3D point of view B's match, expressed in view A's frame"),
    Feature(name="depth_a", dtype="float16", shape=("Hd", "Wd"), units="scene units", frame="camera A",
            description="low-resolution depth map of view A (0 = unknown)", value_range=(0.0, None)),
    Feature(name="depth_b", dtype="float16", shape=("Hd", "Wd"), units="scene units", frame="camera B",
            description="low-resolution depth map of view B (0 = unknown)", value_range=(0.0, None)),
    Feature(name="depth_conf_a", dtype="float16", shape=("Hd", "Wd"), units="teacher confidence (>= 0)",
            frame="-", description="confidence of depth_a (0 = unknown)", value_range=(0.0, None)),
    Feature(name="depth_conf_b", dtype="float16", shape=("Hd", "Wd"), units="teacher confidence (>= 0)",
            frame="-", description="confidence of depth_b (0 = unknown)", value_range=(0.0, None)),
    Feature(name="cv_ab_index", dtype="uint16", shape=("P", "K"), units="patch index into B's grid",
            frame="grid B", description="top-k patches of B for each patch of A, by decreasing probability",
            value_range=(0, None), index_into="P"),
    Feature(name="cv_ab_prob", dtype="uint16", shape=("P", "K"), units=f"probability * {PROB_SCALE} (floor)",
            frame="-", description="teacher probability of each top-k entry; rows sum to at most "
                                   f"{PROB_SCALE}", value_range=(0, PROB_SCALE)),
    Feature(name="cv_ab_valid", dtype="bool", shape=("P",), units="-", frame="grid A",
            description="whether the row of A's patch carries a target (e.g. co-visible)"),
    Feature(name="cv_ba_index", dtype="uint16", shape=("P", "K"), units="patch index into A's grid",
            frame="grid A", description="top-k patches of A for each patch of B, by decreasing probability",
            value_range=(0, None), index_into="P"),
    Feature(name="cv_ba_prob", dtype="uint16", shape=("P", "K"), units=f"probability * {PROB_SCALE} (floor)",
            frame="-", description="teacher probability of each top-k entry; rows sum to at most "
                                   f"{PROB_SCALE}", value_range=(0, PROB_SCALE)),
    Feature(name="cv_ba_valid", dtype="bool", shape=("P",), units="-", frame="grid B",
            description="whether the row of B's patch carries a target"),
)

FEATURE_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}

# Columns of index.parquet, in order, with their Arrow types.
INDEX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("pair_id", "string"),         # unique id from the manifest
    ("scene_id", "string"),
    ("split", "string"),           # nullable
    ("image_a", "string"),         # source reference as written in the manifest (path or URI)
    ("image_b", "string"),
    ("image_a_sha256", "string"),  # of the source file's bytes; null when the pair failed before reading
    ("image_b_sha256", "string"),
    ("shard", "int32"),            # shard number (shards/shard-{shard:05d}.zarr)
    ("row", "int32"),              # row inside that shard
    ("status", "string"),          # "ok" or "failed"
    ("reason", "string"),          # why it failed; null when ok
)

STATUS_OK = "ok"
STATUS_FAILED = "failed"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.zarr"


def shard_record_name(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def dims_for(*, max_matches: int, grid_h: int, grid_w: int, topk: int, depth_h: int, depth_w: int) -> dict:
    """The symbolic dimensions of the feature table for one dataset."""
    return {"M": max_matches, "P": grid_h * grid_w, "K": topk, "Hd": depth_h, "Wd": depth_w}
