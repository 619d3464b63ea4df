"""Stage 1: run a teacher over a pair manifest and write a target dataset, resumably.

Shards are consecutive blocks of `layout.pairs_per_shard` manifest rows. A rerun skips shards whose record
and checksum are complete, deletes torn ones and rebuilds them; since targets depend only on the inputs,
the teacher and the pair_id-seeded sampling, the result is byte-identical to an uninterrupted run.

Work is pipelined: loader processes (or threads) read, decode and prepare (`teacher.input_preparer`, e.g.
resizing) the next pairs, a thread pool builds targets while `teacher.predict` runs on a batch (two
batches at once for teachers that allow it, so one batch's host-side work overlaps the next one's device
work), the next shard's batches start before the previous shard's last ones are done, and
`write_workers` threads or processes compress, hash and write finished shards (each shard on its own, so
the bytes do not depend on how many run at once). Worker processes are spawned: a script calling
`run_extract` needs the usual `if __name__ == "__main__":` guard. A pair whose inputs cannot be read, that
the teacher rejects or whose targets break the format is recorded as failed (zero arrays, its reason in
the index) and the run goes on.

`OUT/extract.json` records what determines the shards' content (manifest checksum, teacher identity and
options, layout, target options); extracting into a directory made with different values is refused unless
`overwrite` is set, so a resume never mixes two configurations.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
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
    workers: threads building targets (and reading inputs when there are no loader processes);
    load_processes: processes reading, decoding and preparing inputs (0: threads do it; None: half the
    usable CPUs, at most 8, or 0 below 4 CPUs) - decoding in threads competes for the interpreter lock with
    the thread driving the GPU; write_workers: shards compressed and written at once (each holds one
    finished shard in memory), in processes when `write_in_processes` (None: on Linux when there are loader
    processes; zarr's writes need the interpreter lock often, and starve the GPU thread of it; elsewhere a
    writer process could outlive a killed run);
    predict_in_flight: batches handed to the teacher at once (None: 3 for teachers that allow concurrent
    calls, so that one batch's network is queued while another's results come back; else 1);
    seed: mixed into each pair's match sampling;
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
    load_processes: int | None = None
    write_workers: int = 2
    write_in_processes: bool | None = None
    predict_in_flight: int | None = None
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
        if self.predict_in_flight is not None and self.predict_in_flight < 1:
            raise ConfigError(f"predict_in_flight must be >= 1 or None (automatic), got {self.predict_in_flight}")
        if self.load_processes is not None and self.load_processes < 0:
            raise ConfigError(f"load_processes must be >= 0 or None (automatic), got {self.load_processes}")
        TargetConfig.from_layout(self.layout, cv_sigma=self.cv_sigma, seed=self.seed)  # validates cv_sigma
        if self.switch_interval_ms is not None and not self.switch_interval_ms > 0:
            raise ConfigError(f"switch_interval_ms must be > 0 or None, got {self.switch_interval_ms}")

    def resolved_load_processes(self) -> int:
        """Loader processes to start (`load_processes`, or the automatic choice)."""
        if self.load_processes is not None:
            return self.load_processes
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 0 if usable < 4 else min(8, usable // 2)


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
    # seconds the run's main loop spent blocked on each stage ("inputs", "teacher", "targets", "writes"):
    # the stage that dominates is the one to give more workers
    waits: dict[str, float] = field(default_factory=dict)


def run_extract(cfg: ExtractConfig, *, teacher: Teacher | None = None) -> ExtractSummary:
    """Extract targets for every pair of `cfg.pairs` into `cfg.out` (resuming a previous run there).

    `teacher` overrides the registry lookup of `cfg.teacher` (e.g. an already loaded model).
    """
    from geod.data_manifests.manifest import load_manifest

    manifest = load_manifest(cfg.pairs)
    if teacher is None:
        teacher = create_teacher(cfg.teacher, layout=cfg.layout, **cfg.teacher_options)
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

    n_predict = cfg.predict_in_flight or (3 if getattr(teacher, "concurrent_predict", False) else 1)
    previous_interval = sys.getswitchinterval()
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    try:
        waits = _run_shards(cfg, teacher, targets, manifest, blocks, todo, done, n_predict, shard_io, tqdm)
    finally:
        sys.setswitchinterval(previous_interval)

    card = _finalize(cfg, manifest, teacher, n_shards=len(blocks))
    return ExtractSummary(out=cfg.out, pairs=card.counts.pairs, ok=card.counts.ok, failed=card.counts.failed,
                          shards=card.counts.shards, shards_written=len(todo),
                          shards_skipped=len(blocks) - len(todo), waits=waits)


def _run_shards(cfg: ExtractConfig, teacher: Teacher, targets: TargetConfig, manifest, blocks: list, todo: list,
                done: int, n_predict: int, shard_io, tqdm) -> dict[str, float]:
    processes = cfg.resolved_load_processes()
    write_in_processes = cfg.write_in_processes
    if write_in_processes is None:  # only where a killed run takes its writers with it (`_die_with_parent`)
        write_in_processes = bool(processes) and sys.platform.startswith("linux")
    with tqdm(total=len(manifest.rows), initial=done, unit="pair", desc=f"extract ({teacher.name})",
              disable=not cfg.progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="geod-extract") as pool, \
            _process_pool(processes) as loader, \
            ThreadPoolExecutor(max_workers=n_predict, thread_name_prefix="geod-predict") as predictor, \
            (_process_pool(cfg.write_workers) if write_in_processes else
             ThreadPoolExecutor(max_workers=cfg.write_workers, thread_name_prefix="geod-write")) as writer:
        stage = _ShardStage(teacher=teacher, targets=targets, pool=pool, predictor=predictor, in_flight=n_predict,
                            batch_size=cfg.batch_size, bar=bar)
        # In processes the teacher's picklable preparer runs next to decoding; in threads its own `prepare`.
        prepare = teacher.input_preparer() if processes else teacher.prepare
        load = partial(load_prepared, base_dir=manifest.base_dir, prepare=prepare)
        loads = _prefetch(loader or pool, load, (row for shard in todo for row in blocks[shard]),
                          depth=(n_predict + 1) * cfg.batch_size + max(cfg.workers, processes))
        writes: deque[Future] = deque()

        def write(shard: int, arrays: dict, rows: list) -> None:
            while len(writes) >= cfg.write_workers:  # bounded: each waiting shard is held in memory
                stage.waited("writes", writes.popleft().result)
            writes.append(writer.submit(shard_io.write_shard, cfg.out, shard, arrays, rows, cfg.layout))

        stage.run([(shard, blocks[shard]) for shard in todo], loads, write)
        while writes:
            stage.waited("writes", writes.popleft().result)
        return {name: round(seconds, 3) for name, seconds in stage.waits.items()}


@contextmanager
def _process_pool(processes: int):
    """A pool of `processes` spawned worker processes, or None for 0. Spawned, not forked: the parent may
    already hold a CUDA context, which a forked child must not touch."""
    if not processes:
        yield None
        return
    import multiprocessing  # noqa: PLC0415

    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        yield pool


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: on Linux, be killed when the extracting process dies. A writer orphaned by a
    killed run would otherwise go on publishing a shard that the rerun is rebuilding at the same time."""
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415
        import signal  # noqa: PLC0415

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)


def load_prepared(row, *, base_dir: Path, prepare) -> tuple:
    """(row, prepared PairData) or (row, _Failure): one pair's inputs, in a loader thread or process."""
    from geod.data_manifests.views import load_pair

    try:
        pair = load_pair(row, base_dir)
    except GeodError as error:
        return row, _Failure(f"inputs: {error}")
    except Exception as error:  # noqa: BLE001 - a decoder choking on a hostile file must not stop a long run
        return row, _Failure(f"inputs: unexpected {type(error).__name__} while reading: {error}")
    if prepare is None:
        return row, pair
    try:
        return row, prepare(pair)
    except Exception:  # noqa: BLE001 - `predict` meets the same problem and reports it, pair by pair
        return row, pair


def _check_teacher_grid(teacher: Teacher, layout: DatasetLayout) -> None:
    """A teacher giving its own cost rows must give them on the layout's grid and, when it reduces them to
    top-k itself, with the layout's k, or every pair would fail."""
    config = teacher.config()
    grid, topk = config.get("cost_grid"), config.get("cost_topk")
    if grid is not None and [int(v) for v in grid] != [layout.grid_h, layout.grid_w]:
        raise ConfigError(f"teacher {teacher.name!r} builds cost volumes on a {grid[0]}x{grid[1]} grid but the "
                          f"layout's grid is {layout.grid_h}x{layout.grid_w}; set the teacher option cost_grid "
                          "or the layout's grid_h/grid_w so that they agree")
    if grid is not None and topk is not None and int(topk) != layout.topk:
        raise ConfigError(f"teacher {teacher.name!r} keeps the top {topk} cost entries per row but the layout "
                          f"keeps {layout.topk}; set the teacher option cost_topk or the layout's topk so that "
                          "they agree")


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


def _prefetch(pool: Executor, fn, items: Iterable, *, depth: int) -> Iterator:
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


class _ShardBuffer:
    """One shard being assembled: its arrays (zero rows until filled) and index rows."""

    def __init__(self, shard: int, n_rows: int, zero: dict[str, np.ndarray]) -> None:
        self.shard = shard
        self.arrays = {name: np.zeros((n_rows, *a.shape), a.dtype) for name, a in zero.items()}
        self.rows: list[dict | None] = [None] * n_rows
        self.missing = n_rows

    def fill(self, position: int, index_row: dict, values: dict[str, np.ndarray] | None = None) -> None:
        for name, value in (values or {}).items():
            self.arrays[name][position] = value
        self.rows[position] = index_row
        self.missing -= 1


class _ShardStage:
    """Turns shards' manifest rows into their arrays and index rows (load -> predict -> build).

    The stream never drains at a shard boundary: the next shard's batches go to the teacher while the last
    ones of the previous shard are still being predicted and built. A batch never spans two shards, so a
    shard's batches (and therefore its bytes) are the same whether it is extracted alone or in a run.
    """

    def __init__(self, *, teacher: Teacher, targets: TargetConfig, pool: ThreadPoolExecutor,
                 predictor: ThreadPoolExecutor, in_flight: int, batch_size: int, bar) -> None:
        self.teacher, self.targets = teacher, targets
        self.pool, self.batch_size, self.bar = pool, batch_size, bar
        self.predictor, self.in_flight = predictor, in_flight
        self.dims = targets.dims()
        self.zero = zero_targets(targets)
        self.failures = 0
        self.waits = {"inputs": 0.0, "teacher": 0.0, "targets": 0.0, "writes": 0.0}
        self.predicting: deque[tuple[list, Future]] = deque()
        self.builds: deque[tuple[_ShardBuffer, int, _Shas, Future | _Failure]] = deque()

    def waited(self, stage: str, wait):
        """wait(), its blocking time counted against `stage`."""
        start = time.perf_counter()
        try:
            return wait()
        finally:
            self.waits[stage] += time.perf_counter() - start

    def run(self, shards: list[tuple[int, list]], loads: Iterator, emit) -> None:
        """Every shard's (shard, arrays, rows) goes to `emit` once complete, in order."""
        open_shards: deque[_ShardBuffer] = deque()
        for shard, block in shards:
            buffer = _ShardBuffer(shard, len(block), self.zero)
            open_shards.append(buffer)
            batch: list[tuple[_ShardBuffer, int, object]] = []
            for position in range(len(block)):
                row, loaded = self.waited("inputs", partial(next, loads))
                if isinstance(loaded, _Failure):
                    buffer.fill(position, self._failed(row, None, loaded.reason))
                    self.bar.update(1)
                    continue
                batch.append((buffer, position, loaded))
                if len(batch) == self.batch_size:
                    self._submit(batch)
                    batch = []
            if batch:
                self._submit(batch)
            self._emit_complete(open_shards, emit)
        self._predicted(wait_all=True)
        self._collect(wait=True)
        self._emit_complete(open_shards, emit)
        assert not open_shards, "every shard is complete once all builds are collected"

    @staticmethod
    def _emit_complete(open_shards: deque[_ShardBuffer], emit) -> None:
        while open_shards and open_shards[0].missing == 0:
            done = open_shards.popleft()
            emit(done.shard, done.arrays, done.rows)

    def _submit(self, batch: list) -> None:
        self._predicted(wait_all=False)
        self.predicting.append((batch, self.predictor.submit(self._predict_isolating, [p for *_, p in batch])))

    def _predicted(self, wait_all: bool) -> None:
        # batches finish in submission order; at most `in_flight` run at once
        while self.predicting and (wait_all or len(self.predicting) >= self.in_flight):
            done_batch, future = self.predicting.popleft()
            self.builds.extend(self._submit_builds(done_batch, self.waited("teacher", future.result)))
            self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        # Finished builds are copied into their shard's arrays at once, so their memory is freed early.
        builds = self.builds
        while builds and (wait or isinstance(builds[0][3], _Failure) or builds[0][3].done()):
            buffer, position, shas, outcome = builds.popleft()
            if not isinstance(outcome, _Failure):
                outcome = self.waited("targets", outcome.result)
            if isinstance(outcome, _Failure):
                buffer.fill(position, self._failed(shas.row, shas, outcome.reason))
            else:
                buffer.fill(position, _index_row(shas.row, shas, None), outcome)

    def _failed(self, row, shas: _Shas | None, reason: str) -> dict:
        self.failures += 1
        self.bar.set_postfix(failed=self.failures, refresh=False)
        return _index_row(row, shas, reason)

    def _submit_builds(self, batch: list, outcomes: list) -> list:
        self.bar.update(len(batch))
        result = []
        for (buffer, position, pair), outcome in zip(batch, outcomes, strict=True):
            if not isinstance(outcome, _Failure):
                outcome = self.pool.submit(self._build, outcome, pair.row.pair_id)
            result.append((buffer, position, _Shas(pair), outcome))
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
