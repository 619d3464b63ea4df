"""Stage 1: run a teacher over a pair manifest and write a target dataset, resumably.

Shards are consecutive blocks of `layout.pairs_per_shard` manifest rows. A rerun skips shards whose record
and checksum are complete, deletes torn ones and rebuilds them; since targets depend only on the inputs,
the teacher and the pair_id-seeded sampling, the result is byte-identical to an uninterrupted run.

Work is pipelined: a thread pool reads, decodes and prepares (`teacher.prepare`, e.g. resizing) the next
pairs and builds targets while `teacher.predict` runs on a batch (two batches at once for teachers that
allow it, so one batch's host-side work overlaps the next one's device work), and `write_workers` threads
compress, hash and write finished shards (each shard on its own, so the bytes do not depend on how many
run at once). A pair whose inputs cannot be read, that the teacher rejects or whose targets break the format
is recorded as failed (zero arrays, its reason in the index) and the run goes on.

`OUT/extract.json` records what determines the shards' content (manifest checksum, teacher identity and
options, layout, target options); extracting into a directory made with different values is refused unless
`overwrite` is set, so a resume never mixes two configurations.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geod.pipeline.atomic import json_bytes, write_bytes_atomic
from geod.pipeline.card import CARD_FILE, INDEX_FILE, SHARDS_DIR, DatasetLayout
from geod.pipeline.errors import ConfigError, GeodError, TeacherError
from geod.pipeline.format_spec import FORMAT_VERSION, STATUS_FAILED, STATUS_OK
from geod.pipeline.locking import LOCK_FILE, exclusive_directory_lock
from geod.stage1_extract.targets import TargetConfig, build_targets, zero_targets
from geod.stage1_extract.teacher import Teacher, TeacherPrediction, create_teacher

FINGERPRINT_FILE = "extract.json"
_OWN_ENTRIES = (CARD_FILE, INDEX_FILE, FINGERPRINT_FILE, SHARDS_DIR)


@dataclass(kw_only=True)
class ExtractConfig:
    """What to extract and how.

    pairs: the pair manifest (parquet); out: the target dataset directory (created);
    teacher / teacher_options: registry name and keyword options of the teacher;
    layout: sizes of the targets and shards; batch_size: pairs per `teacher.predict` call;
    workers: threads reading inputs and building targets; write_workers: shards compressed and written at
    once (each holds one finished shard in memory); seed: mixed into each pair's match sampling;
    cv_sigma: width (patches) of flow-derived cost-volume rows; overwrite: replace a dataset made with other
    settings; verify_existing: re-hash finished shards before skipping them; progress: show a tqdm bar.
    """

    pairs: Path
    out: Path
    teacher: str = "geometry"
    teacher_options: dict = field(default_factory=dict)
    layout: DatasetLayout = field(default_factory=DatasetLayout)
    batch_size: int = 8
    workers: int = 2
    write_workers: int = 2
    dataset_version: str = "0.1.0"
    licence: str | None = None
    seed: int = 0
    cv_sigma: float = 0.5
    overwrite: bool = False
    verify_existing: bool = True
    progress: bool = True
    switch_interval_ms: float | None = None

    def __post_init__(self) -> None:
        self.pairs, self.out = Path(self.pairs), Path(self.out)
        if isinstance(self.layout, dict):
            self.layout = DatasetLayout.from_dict(self.layout)
        # The card checks these too, but only when the run finalises: fail before any extraction work.
        if not isinstance(self.dataset_version, str) or not self.dataset_version.strip():
            raise ConfigError(f"dataset_version must be a non-empty string, got {self.dataset_version!r}")
        if self.licence is not None and not isinstance(self.licence, str):
            raise ConfigError(f"licence must be a string or None, got {type(self.licence).__name__}")
        if not isinstance(self.teacher_options, dict):
            raise ConfigError(f"teacher_options must be a dict, got {type(self.teacher_options).__name__}")
        if self.batch_size < 1 or self.workers < 1 or self.write_workers < 1:
            raise ConfigError(f"batch_size, workers and write_workers must be >= 1, got {self.batch_size}, "
                              f"{self.workers}, {self.write_workers}")
        TargetConfig.from_layout(self.layout, cv_sigma=self.cv_sigma, seed=self.seed)  # validates cv_sigma
        if self.switch_interval_ms is not None and not self.switch_interval_ms > 0:
            raise ConfigError(f"switch_interval_ms must be > 0 or None, got {self.switch_interval_ms}")


@dataclass(kw_only=True)
class ExtractSummary:
    """What a run left behind (counts over the whole dataset, not just this run's shards)."""

    out: Path
    pairs: int
    ok: int
    failed: int
    shards: int
    shards_written: int
    shards_skipped: int


def run_extract(cfg: ExtractConfig, *, teacher: Teacher | None = None) -> ExtractSummary:
    """Extract targets for every pair of `cfg.pairs` into `cfg.out` (resuming a previous run there).

    `teacher` overrides the registry lookup of `cfg.teacher` (e.g. an already loaded model).
    """
    from geod.data_manifests.manifest import load_manifest

    manifest = load_manifest(cfg.pairs)
    if teacher is None:
        teacher = create_teacher(cfg.teacher, **cfg.teacher_options)
    _check_teacher_grid(teacher, cfg.layout)
    targets = TargetConfig.from_layout(cfg.layout, cv_sigma=cfg.cv_sigma, seed=cfg.seed)
    fingerprint = extraction_fingerprint(cfg, manifest.sha256, teacher)
    with exclusive_directory_lock(cfg.out, what="geod extract"):
        return _extract_locked(cfg, teacher, targets, manifest, fingerprint)


def _extract_locked(cfg: ExtractConfig, teacher: Teacher, targets: TargetConfig, manifest, fingerprint: dict
                    ) -> ExtractSummary:
    from tqdm import tqdm

    from geod.pipeline import shard_io

    prepare_out_dir(cfg.out, fingerprint, overwrite=cfg.overwrite)

    per_shard = cfg.layout.pairs_per_shard
    blocks = [manifest.rows[start:start + per_shard] for start in range(0, len(manifest.rows), per_shard)]
    todo = []
    for shard in range(len(blocks)):
        # Deletes this shard's temporary leftovers, and the shard itself unless record and files agree.
        shard_io.remove_torn(cfg.out, shard, verify=cfg.verify_existing)
        if not shard_io.shard_is_complete(cfg.out, shard, verify=False):
            todo.append(shard)
    done = len(manifest.rows) - sum(len(blocks[shard]) for shard in todo)

    n_predict = 2 if getattr(teacher, "concurrent_predict", False) else 1
    previous_interval = sys.getswitchinterval()
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    try:
        _run_shards(cfg, teacher, targets, manifest, blocks, todo, done, n_predict, shard_io, tqdm)
    finally:
        sys.setswitchinterval(previous_interval)

    card = _finalize(cfg, manifest, teacher, n_shards=len(blocks))
    return ExtractSummary(out=cfg.out, pairs=card.counts.pairs, ok=card.counts.ok, failed=card.counts.failed,
                          shards=card.counts.shards, shards_written=len(todo), shards_skipped=len(blocks) - len(todo))


def _run_shards(cfg: ExtractConfig, teacher: Teacher, targets: TargetConfig, manifest, blocks: list, todo: list,
                done: int, n_predict: int, shard_io, tqdm) -> None:
    with tqdm(total=len(manifest.rows), initial=done, unit="pair", desc=f"extract ({teacher.name})",
              disable=not cfg.progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="geod-extract") as pool, \
            ThreadPoolExecutor(max_workers=n_predict, thread_name_prefix="geod-predict") as predictor, \
            ThreadPoolExecutor(max_workers=cfg.write_workers, thread_name_prefix="geod-write") as writer:
        stage = _ShardStage(teacher=teacher, targets=targets, base_dir=manifest.base_dir, pool=pool,
                            predictor=predictor, in_flight=n_predict, batch_size=cfg.batch_size, bar=bar)
        loads = _prefetch(pool, stage.load, (row for shard in todo for row in blocks[shard]),
                          depth=(n_predict + 1) * cfg.batch_size + cfg.workers)
        writes: deque[Future] = deque()
        for shard in todo:
            arrays, rows = stage.extract(blocks[shard], loads)
            while len(writes) >= cfg.write_workers:  # bounded: each waiting shard is held in memory
                writes.popleft().result()
            writes.append(writer.submit(shard_io.write_shard, cfg.out, shard, arrays, rows, cfg.layout))
        while writes:
            writes.popleft().result()


def _check_teacher_grid(teacher: Teacher, layout: DatasetLayout) -> None:
    """A teacher giving dense cost rows must give them on the layout's grid, or every pair would fail."""
    grid = teacher.config().get("cost_grid")
    if grid is not None and [int(v) for v in grid] != [layout.grid_h, layout.grid_w]:
        raise ConfigError(f"teacher {teacher.name!r} builds cost volumes on a {grid[0]}x{grid[1]} grid but the "
                          f"layout's grid is {layout.grid_h}x{layout.grid_w}; set the teacher option cost_grid "
                          "or the layout's grid_h/grid_w so that they agree")


def extraction_fingerprint(cfg: ExtractConfig, manifest_sha256: str, teacher: Teacher) -> dict:
    """Everything the shards' bytes depend on (the card-only fields such as dataset_version are left out)."""
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "manifest_sha256": manifest_sha256,
        "teacher": {"name": teacher.name, "scene_units": teacher.scene_units, "weights": teacher.identity(),
                    "config": teacher.config()},
        "preprocessing": teacher.preprocessing(),
        "layout": cfg.layout.to_dict(),
        "targets": {"cv_sigma": cfg.cv_sigma, "seed": cfg.seed},
    }
    return json.loads(json_bytes(fingerprint))  # tuples -> lists, as it reads back from disk


def prepare_out_dir(out: Path, fingerprint: dict, *, overwrite: bool) -> None:
    """Create `out`, or check that it holds a resumable extraction with the same fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    record = out / FINGERPRINT_FILE
    entries = [name for name in os.listdir(out) if not name.startswith(".tmp-") and name != LOCK_FILE]
    if record.exists():
        try:
            previous = json.loads(record.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{record}: unreadable ({error}); delete it or use overwrite") from None
        if previous != fingerprint and not overwrite:
            differs = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise ConfigError(f"{out} holds targets extracted with other settings (differing: "
                              f"{', '.join(differs)}); use overwrite (--overwrite) to replace them or choose "
                              "another output directory")
    elif entries:
        raise ConfigError(f"{out} is not empty and holds no geod extraction ({', '.join(sorted(entries)[:5])}); "
                          "choose an empty or new output directory")
    # Temporaries of a killed writer of card.json / index.parquet / extract.json can never become outputs;
    # left in place they would make a resumed dataset differ from an uninterrupted one.
    if overwrite:
        doomed = [*_OWN_ENTRIES, *(n for n in os.listdir(out) if n.startswith(".tmp-"))]
    else:
        doomed = [n for n in os.listdir(out) if _is_own_temporary(n)]
    for name in doomed:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if not record.exists():
        write_bytes_atomic(record, json_bytes(fingerprint))


def _is_own_temporary(name: str) -> bool:
    """Whether `name` is an atomic-write temporary (`.tmp-<file>-<pid>`) of one of the run's own files."""
    base, _, pid = name[len(".tmp-"):].rpartition("-")
    return name.startswith(".tmp-") and pid.isdigit() and base in _OWN_ENTRIES


def _prefetch(pool: ThreadPoolExecutor, fn, items: Iterable, *, depth: int) -> Iterator:
    """fn(item) for every item, computed in the pool up to `depth` items ahead, yielded in order."""
    iterator = iter(items)
    pending: deque[Future] = deque()
    for item in iterator:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            break
    while pending:
        result = pending.popleft().result()
        for item in iterator:
            pending.append(pool.submit(fn, item))
            break
        yield result


@dataclass
class _Failure:
    reason: str


class _ShardStage:
    """Turns the rows of one shard into its arrays and index rows (load -> predict -> build)."""

    def __init__(self, *, teacher: Teacher, targets: TargetConfig, base_dir: Path, pool: ThreadPoolExecutor,
                 predictor: ThreadPoolExecutor, in_flight: int, batch_size: int, bar) -> None:
        self.teacher, self.targets, self.base_dir = teacher, targets, base_dir
        self.pool, self.batch_size, self.bar = pool, batch_size, bar
        self.predictor, self.in_flight = predictor, in_flight
        self.dims = targets.dims()
        self.failures = 0

    def load(self, row):
        """(row, PairData or _Failure): runs in the pool."""
        from geod.data_manifests.views import load_pair

        try:
            pair = load_pair(row, self.base_dir)
        except GeodError as error:
            return row, _Failure(f"inputs: {error}")
        except Exception as error:  # noqa: BLE001 - a decoder choking on a hostile file must not stop a long run
            return row, _Failure(f"inputs: unexpected {type(error).__name__} while reading: {error}")
        try:
            return row, self.teacher.prepare(pair)
        except Exception:  # noqa: BLE001 - `predict` meets the same problem and reports it, pair by pair
            return row, pair

    def extract(self, block: list, loads: Iterator) -> tuple[dict[str, np.ndarray], list[dict]]:
        """Arrays (zero rows for failed pairs) and index rows of one shard's manifest rows."""
        zero = zero_targets(self.targets)
        arrays = {name: np.zeros((len(block), *a.shape), a.dtype) for name, a in zero.items()}
        rows: list[dict | None] = [None] * len(block)
        builds: deque[tuple[int, _Shas, Future | _Failure]] = deque()
        batch: list[tuple[int, object]] = []

        def collect(wait: bool) -> None:
            # Finished builds are copied into the shard's arrays at once, so their memory is freed early.
            while builds and (wait or isinstance(builds[0][2], _Failure) or builds[0][2].done()):
                position, shas, outcome = builds.popleft()
                if not isinstance(outcome, _Failure):
                    outcome = outcome.result()
                if isinstance(outcome, _Failure):
                    rows[position] = self._failed(shas.row, shas, outcome.reason)
                    continue
                for name, value in outcome.items():
                    arrays[name][position] = value
                rows[position] = _index_row(shas.row, shas, None)

        predicting: deque[tuple[list, Future]] = deque()

        def predicted(wait_all: bool) -> None:
            # batches finish in submission order; at most `in_flight` run at once
            while predicting and (wait_all or len(predicting) >= self.in_flight):
                done_batch, future = predicting.popleft()
                builds.extend(self._submit_builds(done_batch, future.result()))
                collect(wait=False)

        for position in range(len(block)):
            row, loaded = next(loads)
            if isinstance(loaded, _Failure):
                rows[position] = self._failed(row, None, loaded.reason)
                self.bar.update(1)
                continue
            batch.append((position, loaded))
            if len(batch) == self.batch_size:
                predicted(wait_all=False)
                predicting.append((batch, self.predictor.submit(self._predict_isolating, [p for _, p in batch])))
                batch = []
        if batch:
            predicted(wait_all=False)
            predicting.append((batch, self.predictor.submit(self._predict_isolating, [p for _, p in batch])))
        predicted(wait_all=True)
        collect(wait=True)
        return arrays, rows

    def _failed(self, row, shas: _Shas | None, reason: str) -> dict:
        self.failures += 1
        self.bar.set_postfix(failed=self.failures, refresh=False)
        return _index_row(row, shas, reason)

    def _submit_builds(self, batch: list[tuple[int, object]],
                       outcomes: list) -> list[tuple[int, _Shas, Future | _Failure]]:
        self.bar.update(len(batch))
        result = []
        for (position, pair), outcome in zip(batch, outcomes, strict=True):
            if not isinstance(outcome, _Failure):
                outcome = self.pool.submit(self._build, outcome, pair.row.pair_id)
            result.append((position, _Shas(pair), outcome))
        return result

    def _predict_isolating(self, pairs: list) -> list[TeacherPrediction | _Failure]:
        """Predict a batch; when the teacher rejects it, retry pair by pair to fail only the culprits."""
        try:
            predictions = self.teacher.predict(pairs)
            if len(predictions) != len(pairs):
                raise TeacherError(f"teacher {self.teacher.name!r} returned {len(predictions)} predictions for "
                                   f"{len(pairs)} pairs")
            return predictions
        except TeacherError as error:
            if len(pairs) == 1:
                return [_Failure(f"teacher: {error}")]
            return [self._predict_isolating([pair])[0] for pair in pairs]

    def _build(self, prediction: TeacherPrediction, pair_id: str) -> dict[str, np.ndarray] | _Failure:
        from geod.pipeline.checks import value_problems

        try:
            out = build_targets(prediction, self.targets, pair_id)
        except GeodError as error:
            return _Failure(f"targets: {error}")
        problems = value_problems({k: v[None] for k, v in out.items()}, dims=self.dims, where="targets")
        if problems:
            return _Failure("targets break the format: " + "; ".join(problems[:3]))
        return out


class _Shas:
    """What the index needs of a loaded pair once its images are released."""

    __slots__ = ("image_a_sha256", "image_b_sha256", "row")

    def __init__(self, pair) -> None:
        self.row = pair.row
        self.image_a_sha256 = pair.view_a.image_sha256
        self.image_b_sha256 = pair.view_b.image_sha256


def _index_row(row, pair: _Shas | None, reason: str | None) -> dict:
    return {
        "pair_id": row.pair_id, "scene_id": row.scene_id, "split": row.split,
        "image_a": row.image_a, "image_b": row.image_b,
        "image_a_sha256": pair.image_a_sha256 if pair is not None else None,
        "image_b_sha256": pair.image_b_sha256 if pair is not None else None,
        "status": STATUS_OK if reason is None else STATUS_FAILED, "reason": reason,
    }


def _finalize(cfg: ExtractConfig, manifest, teacher: Teacher, *, n_shards: int):
    from geod.pipeline import shard_io
    from geod.pipeline.card import SourceInfo, TeacherInfo

    return shard_io.finalize_dataset(
        cfg.out, n_shards=n_shards, layout=cfg.layout,
        teacher=TeacherInfo(name=teacher.name, scene_units=teacher.scene_units, weights=teacher.identity(),
                            config=teacher.config()),
        dataset_version=cfg.dataset_version, preprocessing=teacher.preprocessing(),
        source=SourceInfo(manifest=str(manifest.path), manifest_sha256=manifest.sha256,
                          base_dir=str(manifest.base_dir)),
        licence=cfg.licence,
        extra={"targets": {"builder": "geod.stage1_extract.targets", "cv_sigma": cfg.cv_sigma, "seed": cfg.seed}},
    )
