"""The dataset card (card.json) and the dataset layout: what a target dataset holds and how it is cut.

The card is self-describing: format name and version, a release version chosen by the user, the teacher
and its weights, the resolved feature table, counts and per-shard checksums. It is written as canonical
JSON (sorted keys, no timestamps), so rebuilding the same dataset gives a byte-identical card.
Unknown keys are tolerated on read and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from geod.pipeline.atomic import write_json_atomic
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.format_spec import FEATURES, FORMAT_NAME, FORMAT_VERSION, dims_for

CARD_FILE = "card.json"
INDEX_FILE = "index.parquet"
SHARDS_DIR = "shards"


def _geod_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geod")
    except PackageNotFoundError:
        return "unknown"


@dataclass(kw_only=True)
class DatasetLayout:
    """Sizes of every target and how pairs are cut into shards and chunks.

    max_matches: capacity M of the match arrays; grid_h x grid_w: the cost-volume patch grid (P patches);
    topk: entries K kept per cost-volume row; depth_h x depth_w: the low-resolution depth maps;
    pairs_per_shard: rows per shard (the last shard may hold fewer);
    rows_per_chunk: rows per zarr chunk, the unit of every read.
    """

    max_matches: int = 512
    grid_h: int = 24
    grid_w: int = 32
    topk: int = 32
    depth_h: int = 48
    depth_w: int = 64
    pairs_per_shard: int = 256
    rows_per_chunk: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"layout.{f.name} must be an integer >= 1, got {value!r}")
            setattr(self, f.name, int(value))
        if self.pairs_per_shard % self.rows_per_chunk:
            raise ConfigError(f"layout.pairs_per_shard ({self.pairs_per_shard}) must be a multiple of "
                              f"layout.rows_per_chunk ({self.rows_per_chunk})")
        if self.patches > 65535:
            raise ConfigError(f"layout grid {self.grid_h}x{self.grid_w} has {self.patches} patches; "
                              "cost-volume indices are uint16, so at most 65535")
        if self.topk > self.patches:
            raise ConfigError(f"layout.topk ({self.topk}) exceeds the {self.patches} patches of the grid")

    @property
    def patches(self) -> int:
        return self.grid_h * self.grid_w

    def dims(self) -> dict[str, int]:
        """Values of the feature table's symbolic dimensions (M, P, K, Hd, Wd)."""
        return dims_for(max_matches=self.max_matches, grid_h=self.grid_h, grid_w=self.grid_w,
                        topk=self.topk, depth_h=self.depth_h, depth_w=self.depth_w)

    def feature_shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, per-pair shape) of every feature of the format."""
        dims = self.dims()
        return {f.name: (f.dtype, f.resolved_shape(dims)) for f in FEATURES}

    def features_json(self) -> dict[str, dict]:
        """The feature table resolved for this layout, as stored in the card."""
        dims = self.dims()
        return {f.name: f.to_json(dims) for f in FEATURES}

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "patches": self.patches}

    @classmethod
    def from_dict(cls, data: dict) -> DatasetLayout:
        """Build from a card's layout object; derived and unknown keys are ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"layout must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        layout = cls(**{k: v for k, v in data.items() if k in known})
        if "patches" in data and data["patches"] != layout.patches:
            raise ConfigError(f"layout.patches is {data['patches']} but grid {layout.grid_h}x{layout.grid_w} "
                              f"has {layout.patches}")
        return layout


def _from_mapping(cls, value, where: str):
    """Accept either an instance of a small card dataclass or a dict of its fields (unknown keys ignored)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise FormatError(f"{where} must be an object, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in value.items() if k in known})
    except TypeError as error:
        raise FormatError(f"{where}: {error}") from None


def _check_type(value, types, where: str, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise FormatError(f"{where} has the wrong type: {value!r}")
    if not isinstance(value, types):
        raise FormatError(f"{where} has the wrong type: expected {types}, got {type(value).__name__} {value!r}")


@dataclass(kw_only=True)
class TeacherInfo:
    """Which teacher produced the targets: name, units of its 3D outputs, weights identity, options."""

    name: str
    scene_units: str
    weights: dict = field(default_factory=lambda: {"id": None, "sha256": None})
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type(self.name, str, "teacher.name")
        _check_type(self.scene_units, str, "teacher.scene_units")
        _check_type(self.weights, dict, "teacher.weights")
        _check_type(self.config, dict, "teacher.config")
        self.weights = {"id": self.weights.get("id"), "sha256": self.weights.get("sha256"), **self.weights}


@dataclass(kw_only=True)
class SourceInfo:
    """The manifest the dataset was extracted from."""

    manifest: str | None = None
    manifest_sha256: str | None = None
    base_dir: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(getattr(self, f.name), str, f"source.{f.name}", nullable=True)


@dataclass(kw_only=True)
class ShardEntry:
    """One shard as listed in the card: directory name, rows, total bytes and directory checksum."""

    name: str
    pairs: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        _check_type(self.name, str, "shards[].name")
        _check_type(self.pairs, int, f"shards[{self.name}].pairs")
        _check_type(self.bytes, int, f"shards[{self.name}].bytes")
        _check_type(self.sha256, str, f"shards[{self.name}].sha256")


@dataclass(kw_only=True)
class Counts:
    pairs: int = 0
    ok: int = 0
    failed: int = 0
    shards: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(getattr(self, f.name), int, f"counts.{f.name}")
        if self.ok + self.failed != self.pairs:
            raise FormatError(f"counts: ok ({self.ok}) + failed ({self.failed}) != pairs ({self.pairs})")


def _check_features(features: dict, layout: DatasetLayout) -> None:
    """Every format feature must be present with the layout's dtype and shape; extra features need both."""
    expected = layout.feature_shapes()
    problems = []
    for name, (dtype, shape) in expected.items():
        entry = features.get(name)
        if not isinstance(entry, dict):
            problems.append(f"features.{name}: missing")
            continue
        if entry.get("dtype") != dtype:
            problems.append(f"features.{name}.dtype is {entry.get('dtype')!r}, the format says {dtype!r}")
        if entry.get("shape") != list(shape):
            problems.append(f"features.{name}.shape is {entry.get('shape')!r}, the layout gives {list(shape)}")
    for name, entry in features.items():
        if name in expected:
            continue
        try:
            np.dtype(entry["dtype"])
            if not all(isinstance(d, int) and d >= 1 for d in entry["shape"]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            problems.append(f"features.{name}: an added feature needs a numpy 'dtype' and an integer 'shape'")
    if problems:
        raise FormatError("; ".join(problems))


@dataclass(kw_only=True)
class DatasetCard:
    """Everything card.json holds. Dict values for the nested parts are accepted and converted."""

    teacher: TeacherInfo
    layout: DatasetLayout = field(default_factory=DatasetLayout)
    dataset_version: str = "0.1.0"
    preprocessing: dict = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    shards: list[ShardEntry] = field(default_factory=list)
    source: SourceInfo | None = None
    licence: str | None = None
    extra: dict = field(default_factory=dict)
    features: dict | None = None  # None: the layout's resolved feature table
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    geod_version: str = field(default_factory=_geod_version)
    # Top-level keys this version does not know (written by a newer geod): kept and written back as they are.
    unknown: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.format != FORMAT_NAME:
            raise FormatError(f"format is {self.format!r}, not a geod target dataset ({FORMAT_NAME!r})")
        _check_type(self.format_version, int, "format_version")
        if self.format_version > FORMAT_VERSION:
            raise FormatError(f"format_version {self.format_version} was written by a newer geod; this geod "
                              f"reads format_version <= {FORMAT_VERSION}: upgrade geod to read it")
        if self.format_version < 1:
            raise FormatError(f"format_version must be >= 1, got {self.format_version}")
        self.teacher = _from_mapping(TeacherInfo, self.teacher, "teacher")
        try:
            self.layout = self.layout if isinstance(self.layout, DatasetLayout) else \
                DatasetLayout.from_dict(self.layout)
        except (ConfigError, TypeError) as error:
            raise FormatError(f"layout: {error}") from None
        self.counts = _from_mapping(Counts, self.counts, "counts")
        _check_type(self.shards, list, "shards")
        self.shards = [_from_mapping(ShardEntry, s, f"shards[{i}]") for i, s in enumerate(self.shards)]
        if self.source is not None:
            self.source = _from_mapping(SourceInfo, self.source, "source")
        for name in ("dataset_version", "geod_version"):
            _check_type(getattr(self, name), str, name)
        _check_type(self.licence, str, "licence", nullable=True)
        for name in ("preprocessing", "extra", "unknown"):
            _check_type(getattr(self, name), dict, name)
        if self.features is None:
            self.features = self.layout.features_json()
        _check_type(self.features, dict, "features")
        _check_features(self.features, self.layout)
        if self.counts.shards != len(self.shards):
            raise FormatError(f"counts.shards is {self.counts.shards} but {len(self.shards)} shards are listed")
        if sum(s.pairs for s in self.shards) != self.counts.pairs:
            raise FormatError(f"counts.pairs is {self.counts.pairs} but the shards hold "
                              f"{sum(s.pairs for s in self.shards)} rows")

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.unknown)
        data.update({
            "format": self.format,
            "format_version": self.format_version,
            "dataset_version": self.dataset_version,
            "geod_version": self.geod_version,
            "teacher": asdict(self.teacher),
            "preprocessing": self.preprocessing,
            "layout": self.layout.to_dict(),
            "features": self.features,
            "counts": asdict(self.counts),
            "shards": [asdict(s) for s in self.shards],
            "source": asdict(self.source) if self.source is not None else None,
            "licence": self.licence,
            "extra": self.extra,
        })
        return data

    @classmethod
    def from_dict(cls, data: dict, *, where: str = CARD_FILE) -> DatasetCard:
        """Parse a card object; FormatError naming `where` and the field at fault."""
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
        # Check the version before anything else, so a newer card fails with the upgrade hint.
        version = data.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise FormatError(f"{where}: format_version {version} was written by a newer geod; this geod "
                              f"reads format_version <= {FORMAT_VERSION}: upgrade geod to read it")
        known = {f.name for f in fields(cls)} - {"unknown"}
        missing = [k for k in ("format", "format_version", "teacher", "layout", "counts", "shards")
                   if k not in data]
        if missing:
            raise FormatError(f"{where}: missing field(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["unknown"] = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kwargs)
        except FormatError as error:
            raise FormatError(f"{where}: {error}") from None


def read_card_json(dir_or_url: str | Path, storage_options: dict | None = None) -> dict:
    """The raw card.json object of a dataset (local directory or fsspec URL)."""
    from geod.pipeline.location import locate

    location = locate(dir_or_url, storage_options)
    raw = location.read_bytes(CARD_FILE)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{location.describe(CARD_FILE)}: not valid JSON ({error})") from None


def read_card(dir_or_url: str | Path, storage_options: dict | None = None) -> DatasetCard:
    """Read and check a dataset's card; FormatError for a missing, malformed or too new card."""
    from geod.pipeline.location import locate

    location = locate(dir_or_url, storage_options)
    return DatasetCard.from_dict(read_card_json(dir_or_url, storage_options),
                                 where=location.describe(CARD_FILE))


def write_card(directory: str | Path, card: DatasetCard) -> Path:
    """Write card.json into a local dataset directory atomically; returns its path."""
    path = Path(directory) / CARD_FILE
    write_json_atomic(path, card.to_dict())
    return path
