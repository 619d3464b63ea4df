"""Export a target dataset as one HDF5 file.

Every dataset in the file sits at the root and has the exported pairs as its leading axis, in dataset
order. The file therefore reads as one table: with h5py, and with loaders that map datasets to columns,
such as the ``hdf5`` builder of Hugging Face datasets.

- one dataset per feature, shape ``(N, *per-pair shape)``, with the dtype of the targets format. Match
  arrays keep their M rows, and rows at or beyond ``match_count`` are zero. Cost-volume probabilities stay
  as stored: uint16 floor(p * 65535). Each feature dataset carries ``units``, ``frame`` and
  ``description`` attributes copied from the card.
- UTF-8 string datasets ``pair_id``, ``scene_id``, ``split``, ``image_a``, ``image_b``,
  ``image_a_sha256``, ``image_b_sha256``, ``status`` ("ok" / "failed") and ``reason``. A null in the index
  is stored as the empty string.
- int32 datasets ``source_shard`` and ``source_row``: where the pair lives in the source dataset.
- root attributes: ``card`` (the card.json text with an ``export`` section), ``format``
  ("geod-targets-hdf5"), ``format_version`` (1) and ``prob_scale`` (65535).

Datasets are chunked along the pair axis, at most about 1 MiB per chunk. They use the chosen compression
(gzip with byte shuffle, lzf with byte shuffle, or none) and fletcher32 checksums, so a damaged chunk fails
to read. The file is written under a hidden temporary name and renamed when complete. The same export
gives a byte-identical file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geod.pipeline.atomic import json_bytes, tmp_sibling
from geod.pipeline.errors import ConfigError
from geod.pipeline.export_common import (ExportedFile, ExportSummary, check_split_option, exported_card,
                                         iter_plan, plan_export, progress_bar, source_card)
from geod.pipeline.format_spec import FORMAT_NAME, PROB_SCALE
from geod.pipeline.hashing import sha256_file

FORMAT = "hdf5"
HDF5_FORMAT_NAME = f"{FORMAT_NAME}-hdf5"
HDF5_FORMAT_VERSION = 1
COMPRESSIONS = ("gzip", "lzf", None)
STRING_COLUMNS = ("pair_id", "scene_id", "split", "image_a", "image_b", "image_a_sha256", "image_b_sha256",
                  "status", "reason")
POSITION_COLUMNS = (("source_shard", "shard"), ("source_row", "row"))
_CHUNK_BYTES = 1 << 20
# Readable by HDF5 >= 1.10; the 1.8 object headers allow a card attribute larger than 64 KiB.
_LIBVER = ("v108", "v110")


@dataclass(kw_only=True)
class HDF5ExportConfig:
    """Options of an HDF5 export (saved in the card attribute's ``export.options``).

    split: export only this split (None = all); include_failed: also export failed pairs (status
    "failed", all-zero arrays); compression: "gzip", "lzf" or None; gzip_level: 0-9.
    """

    split: str | None = None
    include_failed: bool = False
    compression: str | None = "gzip"
    gzip_level: int = 4

    def __post_init__(self) -> None:
        check_split_option(self.split)
        if not isinstance(self.include_failed, bool):
            raise ConfigError(f"include_failed must be True or False, got {self.include_failed!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of 'gzip', 'lzf' or None, got {self.compression!r}")
        if isinstance(self.gzip_level, bool) or not isinstance(self.gzip_level, int) or \
                not 0 <= self.gzip_level <= 9:
            raise ConfigError(f"gzip_level must be an integer in 0..9, got {self.gzip_level!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def filters(self) -> dict:
        """h5py create_dataset keyword arguments for the filters."""
        if self.compression is None:
            return {"fletcher32": True}
        options = {"compression_opts": self.gzip_level} if self.compression == "gzip" else {}
        return {"compression": self.compression, **options, "shuffle": True, "fletcher32": True}


def chunk_rows(row_bytes: int, n_pairs: int) -> int:
    """Pairs per chunk: as many as fit in about 1 MiB (at least 1, at most n_pairs)."""
    return int(max(1, min(n_pairs, _CHUNK_BYTES // max(1, row_bytes))))


def _create_datasets(handle, dataset, n_pairs: int, cfg: HDF5ExportConfig) -> None:
    import h5py

    filters = cfg.filters()
    features = dataset.card.features
    for name in dataset.feature_names:
        entry = features[name]
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        target = handle.create_dataset(name, shape=(n_pairs, *shape), dtype=dtype,
                                       chunks=(chunk_rows(row_bytes, n_pairs), *shape), **filters)
        for key in ("units", "frame", "description"):
            if isinstance(entry.get(key), str):
                target.attrs[key] = entry[key]
    text = h5py.string_dtype("utf-8")
    for name in STRING_COLUMNS:
        # Filters do not apply to variable-length strings (HDF5 stores them in a heap), so none here.
        handle.create_dataset(name, shape=(n_pairs,), dtype=text, chunks=(chunk_rows(64, n_pairs),))
    for name, _ in POSITION_COLUMNS:
        handle.create_dataset(name, shape=(n_pairs,), dtype=np.int32, chunks=(chunk_rows(4, n_pairs),),
                              **filters)


def _write_file(path: Path, dataset, plan, cfg: HDF5ExportConfig, card_text: str, progress: bool) -> None:
    import h5py

    with h5py.File(path, "w", libver=_LIBVER, rdcc_nbytes=16 * _CHUNK_BYTES) as handle:
        handle.attrs["format"] = HDF5_FORMAT_NAME
        handle.attrs["format_version"] = HDF5_FORMAT_VERSION
        handle.attrs["prob_scale"] = PROB_SCALE
        handle.attrs["card"] = card_text
        _create_datasets(handle, dataset, plan.pairs, cfg)
        position = 0
        with progress_bar(plan.pairs, "export hdf5", progress) as bar:
            for metas, arrays in iter_plan(dataset, plan):
                end = position + len(metas)
                for name, value in arrays.items():
                    handle[name][position:end] = value
                for name in STRING_COLUMNS:
                    handle[name][position:end] = [meta[name] or "" for meta in metas]
                for name, key in POSITION_COLUMNS:
                    handle[name][position:end] = np.array([meta[key] for meta in metas], dtype=np.int32)
                position = end
                bar.update(len(metas))


def export_hdf5(dataset_url, out_path, *, split: str | None = None, include_failed: bool = False,
                compression: str | None = "gzip", gzip_level: int = 4, overwrite: bool = False,
                progress: bool = True, storage_options: dict | None = None) -> ExportSummary:
    """Export a target dataset (local directory or fsspec URL) as the single local HDF5 file `out_path`.

    Exports the ok pairs of `split` (None = every split); with `include_failed`, failed pairs too (their
    status column says "failed"). Raises ConfigError for bad options, a missing split, or an existing
    `out_path` unless `overwrite`.
    """
    from geod.pipeline.reader import TargetDataset

    cfg = HDF5ExportConfig(split=split, include_failed=include_failed, compression=compression,
                           gzip_level=gzip_level)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise ConfigError(f"{out_path}: exists already; pass overwrite to replace it")
    dataset = TargetDataset.open(dataset_url, storage_options)
    card, card_sha256 = source_card(dataset_url, storage_options)
    plan = plan_export(dataset, split=cfg.split, include_failed=cfg.include_failed)
    layout = {
        "datasets": "one per feature plus the string columns " + ", ".join(STRING_COLUMNS) + " and "
                    + ", ".join(n for n, _ in POSITION_COLUMNS) + "; all with the pair axis first",
        "match_arrays": "M rows as stored; rows at or beyond match_count are zero",
        "probabilities": f"cv_*_prob as stored: uint16 floor(p * {PROB_SCALE}); divide by prob_scale",
        "prob_scale": PROB_SCALE,
        "null_strings": "stored as the empty string",
    }
    card_text = json_bytes(exported_card(card, card_sha256, fmt=FORMAT, options=cfg.to_dict(), plan=plan,
                                         layout=layout)).decode("utf-8")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out_path)
    try:
        _write_file(tmp, dataset, plan, cfg, card_text, progress)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    exported = ExportedFile(name=out_path.name, pairs=plan.pairs, bytes=out_path.stat().st_size,
                            sha256=sha256_file(out_path))
    return ExportSummary(format=FORMAT, out=out_path, pairs=plan.pairs, failed_included=plan.failed_included,
                         failed_skipped=plan.failed_skipped, split=cfg.split, files=(exported,))
