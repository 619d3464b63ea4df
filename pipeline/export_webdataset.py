"""Export a target dataset as webdataset tar shards: ``OUT/{name}-000000.tar``, ``OUT/card.json``,
``OUT/SHA256SUMS``.

One sample per exported pair, in dataset order, with these members (sorted by name inside the sample):

- ``<key>.json``: the pair's index row (pair_id, scene_id, split, image_a, image_b, image_a_sha256,
  image_b_sha256, status, reason), its place in the source (source_shard, source_row), match_count,
  prob_scale, the teacher's name and scene units, and ``"features": "card.json#/features"``, a pointer to
  the dtype / shape / units / frame of every array in the exported card.
- ``<key>.<feature>.npy``: one array per feature, without the pair axis. The match arrays are cut to
  match_count rows. The cost-volume probabilities stay as stored: uint16 floor(p * 65535), so divide by
  the json's prob_scale to get floats. Every other array keeps the dtype the format gives it.

Sample keys: webdataset splits a member name at the first dot, so a key cannot hold one. The key is the
pair_id percent-encoded: every UTF-8 byte outside ``[A-Za-z0-9_-]`` becomes ``%XX`` (upper-case hex). The
mapping is one-to-one, and ``urllib.parse.unquote(key)`` gives the pair_id back. The exact pair_id is
also in the json.

Tars are byte-deterministic: POSIX pax format, every member with mtime 0, uid/gid 0, no user or group
names, mode 0644. Each tar is written under a hidden temporary name and renamed when complete.
card.json is written last, so a directory with a card.json holds a complete export.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from geod.pipeline.atomic import tmp_sibling, write_bytes_atomic, write_json_atomic
from geod.pipeline.card import CARD_FILE
from geod.pipeline.checks import MATCH_ARRAYS
from geod.pipeline.errors import ConfigError, FormatError
from geod.pipeline.export_common import (EXPORT_KEY, ExportedFile, ExportSummary, check_split_option,
                                         exported_card, iter_plan, plan_export, progress_bar, source_card)
from geod.pipeline.format_spec import PROB_SCALE
from geod.pipeline.hashing import sha256_file

FORMAT = "webdataset"
CHECKSUMS_FILE = "SHA256SUMS"
DEFAULT_SAMPLES_PER_TAR = 1000
FEATURES_POINTER = f"{CARD_FILE}#/features"
_KEY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MTIME = 0
_MODE = 0o644


def sample_key(pair_id: str) -> str:
    """The webdataset key of a pair: percent-encoding of every UTF-8 byte outside [A-Za-z0-9_-]."""
    if not isinstance(pair_id, str) or not pair_id:
        raise FormatError(f"pair_id {pair_id!r}: a webdataset key needs a non-empty string")
    return "".join(ch if ch in _KEY_SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
                   for ch in pair_id)


def pair_id_from_key(key: str) -> str:
    """Inverse of `sample_key`."""
    from urllib.parse import unquote

    return unquote(key, errors="strict")


def tar_name(name: str, number: int) -> str:
    return f"{name}-{number:06d}.tar"


@dataclass(kw_only=True)
class WebDatasetExportConfig:
    """Options of a webdataset export (saved in the exported card's ``export.options``).

    samples_per_tar: pairs per tar (the last tar may hold fewer); split: export only this split
    (None = all); include_failed: also export failed pairs (status "failed", all-zero arrays, no matches);
    name: tar file prefix, letters, digits, '-' and '_' only.
    """

    samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR
    split: str | None = None
    include_failed: bool = False
    name: str = "targets"

    def __post_init__(self) -> None:
        if isinstance(self.samples_per_tar, bool) or not isinstance(self.samples_per_tar, (int, np.integer)) \
                or self.samples_per_tar < 1:
            raise ConfigError(f"samples_per_tar must be an integer >= 1, got {self.samples_per_tar!r}")
        self.samples_per_tar = int(self.samples_per_tar)
        check_split_option(self.split)
        if not isinstance(self.include_failed, bool):
            raise ConfigError(f"include_failed must be True or False, got {self.include_failed!r}")
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"name must be made of letters, digits, '-' and '_', got {self.name!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as C-ordered .npy bytes (never pickled); 0-d arrays stay 0-d."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array(array, order="C", copy=True), allow_pickle=False)
    return buffer.getvalue()


def sample_members(meta: dict, arrays: dict[str, np.ndarray], extra: dict) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one pair's sample, sorted by name. `arrays`: one pair, no row axis."""
    key = sample_key(meta["pair_id"])
    count = int(arrays["match_count"])
    members = []
    for name, value in arrays.items():
        members.append((f"{key}.{name}.npy", npy_bytes(value[:count] if name in MATCH_ARRAYS else value)))
    info = {
        **{k: v for k, v in meta.items() if k not in ("shard", "row")},
        "source_shard": meta["shard"], "source_row": meta["row"],
        "key": key, "match_count": count, "prob_scale": PROB_SCALE, "features": FEATURES_POINTER, **extra,
    }
    text = json.dumps(info, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    members.append((f"{key}.json", text.encode("utf-8")))
    return sorted(members)


class _TarShards:
    """Writes samples into numbered tars; each tar is published by a rename once it is complete."""

    def __init__(self, out_dir: Path, name: str, samples_per_tar: int):
        self.out_dir, self.name, self.samples_per_tar = out_dir, name, samples_per_tar
        self.files: list[ExportedFile] = []
        self._tar: tarfile.TarFile | None = None
        self._handle = None
        self._tmp: Path | None = None
        self._count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(data), _MTIME, _MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count == self.samples_per_tar:
            self._publish()

    def _open(self) -> None:
        final = self.out_dir / tar_name(self.name, len(self.files))
        self._tmp = tmp_sibling(final)
        self._handle = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._handle, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _publish(self) -> None:
        self._tar.close()
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        final = self.out_dir / tar_name(self.name, len(self.files))
        os.replace(self._tmp, final)
        self.files.append(ExportedFile(name=final.name, pairs=self._count, bytes=final.stat().st_size,
                                       sha256=sha256_file(final)))
        self._tar = self._handle = self._tmp = None

    def finish(self) -> list[ExportedFile]:
        if self._tar is not None:
            self._publish()
        return self.files

    def abort(self) -> None:
        """Remove the tar being written and every tar this run published."""
        if self._handle is not None:
            self._handle.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for file in self.files:
            (self.out_dir / file.name).unlink(missing_ok=True)


def _clear_previous(out_dir: Path, name: str, overwrite: bool) -> None:
    """Refuse (or, with overwrite, remove) an earlier export in `out_dir`. The card goes first, so an
    interrupted removal never leaves something that looks like a complete export."""
    pattern = re.compile(rf"{re.escape(name)}-\d{{6}}\.tar")
    # Temporaries of a killed export can never become outputs: remove them whatever `overwrite` says.
    for entry in os.listdir(out_dir):
        base = entry[len(".tmp-"):].rsplit("-", 1)[0] if entry.startswith(".tmp-") else None
        if base is not None and (pattern.fullmatch(base) or base in (CARD_FILE, CHECKSUMS_FILE)):
            (out_dir / entry).unlink(missing_ok=True)
    old_tars = {n for n in os.listdir(out_dir) if pattern.fullmatch(n)}
    card_path = out_dir / CARD_FILE
    if card_path.exists():
        try:
            listed = json.loads(card_path.read_bytes()).get(EXPORT_KEY, {}).get("files", [])
            old_tars |= {f["name"] for f in listed if isinstance(f, dict) and isinstance(f.get("name"), str)
                         and "/" not in f["name"] and f["name"].endswith(".tar")}
        except (ValueError, AttributeError):
            pass
    found = ([CARD_FILE] if card_path.exists() else []) + sorted(old_tars)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{out_dir}: holds an earlier (or interrupted) export ({', '.join(found[:3])}"
                          f"{', ...' if len(found) > 3 else ''}); pass overwrite to replace it")
    card_path.unlink(missing_ok=True)
    (out_dir / CHECKSUMS_FILE).unlink(missing_ok=True)
    for tar in sorted(old_tars):
        (out_dir / tar).unlink(missing_ok=True)


def _layout_description(name: str, n_tars: int, feature_names: list[str]) -> dict:
    """How the export is laid out, for the ``export.layout`` section of the card."""
    return {
        "tars": f"{name}-{{000000..{n_tars - 1:06d}}}.tar",
        "checksums": CHECKSUMS_FILE,
        "key": "pair_id with every UTF-8 byte outside [A-Za-z0-9_-] percent-encoded as %XX (upper-case hex); "
               "urllib.parse.unquote(key) == pair_id; the json holds the exact pair_id",
        "members": "<key>.json and <key>.<feature>.npy for every feature, sorted by name within a sample",
        "match_arrays": {"trimmed_to": "match_count", "names": sorted(n for n in feature_names if n in MATCH_ARRAYS)},
        "probabilities": f"cv_*_prob as stored: uint16 floor(p * {PROB_SCALE}); divide by prob_scale",
        "prob_scale": PROB_SCALE,
        "tar": "POSIX pax; members with mtime 0, uid/gid 0, empty user/group names, mode 0644",
    }


def export_webdataset(dataset_url, out_dir, *, samples_per_tar: int = DEFAULT_SAMPLES_PER_TAR,
                      split: str | None = None, include_failed: bool = False, name: str = "targets",
                      overwrite: bool = False, progress: bool = True,
                      storage_options: dict | None = None) -> ExportSummary:
    """Export a target dataset (local directory or fsspec URL) as webdataset tars in local `out_dir`.

    Exports the ok pairs of `split` (None = every split); with `include_failed`, failed pairs too
    (their json says status "failed"; their arrays are zero and they have no matches). Writes
    ``{name}-NNNNNN.tar``, ``SHA256SUMS`` (sha256sum format) and ``card.json`` (the source card plus an
    ``export`` section listing every tar with its pair count, size and sha256). Raises ConfigError for
    bad options, a missing split or an earlier export in `out_dir` (unless `overwrite`).
    """
    from geod.pipeline.reader import TargetDataset

    cfg = WebDatasetExportConfig(samples_per_tar=samples_per_tar, split=split, include_failed=include_failed,
                                 name=name)
    dataset = TargetDataset.open(dataset_url, storage_options)
    card, card_sha256 = source_card(dataset_url, storage_options)
    plan = plan_export(dataset, split=cfg.split, include_failed=cfg.include_failed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, cfg.name, overwrite)
    extra = {"teacher": dataset.card.teacher.name, "scene_units": dataset.card.teacher.scene_units}
    shards = _TarShards(out_dir, cfg.name, cfg.samples_per_tar)
    try:
        with progress_bar(plan.pairs, "export webdataset", progress) as bar:
            for metas, arrays in iter_plan(dataset, plan):
                for i, meta in enumerate(metas):
                    shards.add(sample_members(meta, {n: v[i] for n, v in arrays.items()}, extra))
                bar.update(len(metas))
        files = shards.finish()
        sums = "".join(f"{f.sha256}  {f.name}\n" for f in files)
        write_bytes_atomic(out_dir / CHECKSUMS_FILE, sums.encode("utf-8"))
        layout = _layout_description(cfg.name, len(files), dataset.feature_names)
        write_json_atomic(out_dir / CARD_FILE, exported_card(card, card_sha256, fmt=FORMAT, options=cfg.to_dict(),
                                                             plan=plan, layout=layout, files=files))
    except BaseException:
        # Leave no partial export behind: tars of this run, the checksum list and a half-written card.
        shards.abort()
        (out_dir / CHECKSUMS_FILE).unlink(missing_ok=True)
        (out_dir / CARD_FILE).unlink(missing_ok=True)
        raise
    return ExportSummary(format=FORMAT, out=out_dir, pairs=plan.pairs, failed_included=plan.failed_included,
                         failed_skipped=plan.failed_skipped, split=cfg.split, files=tuple(files))
