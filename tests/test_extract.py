"""The extraction runner: output validity, failed pairs, resume after SIGKILL, refusal to mix settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from geod.data_manifests.manifest import write_manifest
from geod.data_manifests.synthetic import SyntheticConfig, write_synthetic_scenes
from geod.pipeline.card import DatasetLayout
from geod.pipeline.errors import ConfigError
from geod.stage1_extract.runner import ExtractConfig, run_extract

LAYOUT = {"max_matches": 32, "grid_h": 6, "grid_w": 8, "topk": 4, "depth_h": 12, "depth_w": 16,
          "pairs_per_shard": 2, "rows_per_chunk": 2}


def _matrix(path: Path) -> list[float]:
    return np.loadtxt(path).reshape(-1).tolist()


def make_manifest(root: Path, *, frames: int = 7, extra_rows: tuple[dict, ...] = ()) -> Path:
    """A synthetic scene in the ScanNet layout and a manifest pairing each frame with the next two."""
    write_synthetic_scenes(root / "scenes", SyntheticConfig(scenes=1, frames_per_scene=frames, width=48,
                                                            height=36, seed=5, boxes=(2, 3)))
    scene = root / "scenes" / "scene0000_00"
    k = np.loadtxt(scene / "intrinsic" / "intrinsic_depth.txt")[:3, :3].reshape(-1).tolist()
    rows = []
    for a in range(frames):
        for b in (a + 1, a + 2):
            if b >= frames:
                continue
            rows.append({
                "pair_id": f"p{a:02d}-{b:02d}", "scene_id": "scene0000_00",
                "image_a": f"scenes/scene0000_00/color/{a}.jpg", "image_b": f"scenes/scene0000_00/color/{b}.jpg",
                "depth_a": f"scenes/scene0000_00/depth/{a}.png", "depth_b": f"scenes/scene0000_00/depth/{b}.png",
                "depth_scale": 1000.0, "intrinsics_a": k, "intrinsics_b": k,
                "pose_a": _matrix(scene / "pose" / f"{a}.txt"), "pose_b": _matrix(scene / "pose" / f"{b}.txt"),
                "split": "train",
            })
    rows.extend(extra_rows)
    return write_manifest(rows, root / "pairs.parquet")


def _config(manifest: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(pairs=manifest, out=out, layout=DatasetLayout(**LAYOUT), batch_size=3, workers=2,
                         progress=False, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_extract_writes_a_valid_dataset_and_records_failed_pairs(tmp_path):
    scene = "scenes/scene0000_00"
    bad_rows = (
        {"pair_id": "missing", "scene_id": "s", "image_a": "nowhere/0.jpg", "image_b": f"{scene}/color/1.jpg"},
        {"pair_id": "corrupt", "scene_id": "s", "image_a": f"{scene}/color/0.jpg", "image_b": "broken.jpg"},
        {"pair_id": "no-geometry", "scene_id": "s", "image_a": f"{scene}/color/0.jpg",
         "image_b": f"{scene}/color/1.jpg"},
    )
    manifest = make_manifest(tmp_path, frames=4, extra_rows=bad_rows)
    jpeg = (tmp_path / scene / "color" / "1.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated mid-scan
    summary = run_extract(_config(manifest, tmp_path / "out"))
    assert (summary.pairs, summary.failed, summary.ok) == (8, 3, 5)
    assert summary.shards == 4 and summary.shards_written == 4

    from geod.pipeline.reader import TargetDataset

    data = TargetDataset.open(tmp_path / "out")
    index = {row["pair_id"]: row for row in data.index.to_pylist()}
    assert index["missing"]["status"] == "failed" and "nowhere/0.jpg" in index["missing"]["reason"]
    assert "not found" in index["missing"]["reason"]
    assert index["corrupt"]["status"] == "failed" and "broken.jpg" in index["corrupt"]["reason"]
    assert index["no-geometry"]["status"] == "failed" and index["no-geometry"]["reason"].startswith("teacher:")
    assert index["no-geometry"]["image_a_sha256"] is not None  # its images were read fine
    ok = data.pair("p00-01")
    assert ok["status"] == "ok" and ok["reason"] is None and 16 <= len(ok["match_xy_a"]) <= 32
    assert ok["cv_ab_valid"].any() and ok["depth_a"].max() > 0
    failed = data.pair("corrupt")
    assert len(failed["match_xy_a"]) == 0 and not failed["depth_a"].any() and not failed["cv_ab_valid"].any()
    assert data.card.teacher.name == "geometry" and data.card.teacher.scene_units == "metres"
    assert data.card.counts.failed == 3

    from geod.pipeline.validate import validate_dataset

    assert validate_dataset(tmp_path / "out") == []


_KILLED_RUN = """
import sys, time
from pathlib import Path
from geod.pipeline.card import DatasetLayout
from geod.stage1_extract.geometry import GeometryTeacher
from geod.stage1_extract.runner import ExtractConfig, run_extract

class SlowTeacher(GeometryTeacher):
    def predict(self, pairs):
        time.sleep(0.15)
        return super().predict(pairs)

layout = DatasetLayout(**{layout!r})
if __name__ == "__main__":
    run_extract(ExtractConfig(pairs=Path({manifest!r}), out=Path({out!r}), layout=layout, batch_size=1, workers=2,
                              load_processes={processes}, progress=False), teacher=SlowTeacher())
"""


def _children(pid: int) -> set[int]:
    """Live child processes of `pid` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


@pytest.mark.parametrize("processes", [0, pytest.param(2, marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc"))])
def test_sigkill_then_rerun_is_byte_identical(tmp_path, processes):
    """Also with loader and writer processes: they die with the killed run (a surviving writer could
    publish a shard while the rerun rebuilds it)."""
    manifest = make_manifest(tmp_path, frames=8)  # 13 pairs -> 7 shards of 2
    reference = tmp_path / "reference"
    run_extract(_config(manifest, reference))

    out = tmp_path / "killed"
    script = _KILLED_RUN.format(layout=LAYOUT, manifest=str(manifest), out=str(out), processes=processes)
    (tmp_path / "killed_run.py").write_text(script)
    process = subprocess.Popen([sys.executable, str(tmp_path / "killed_run.py")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    # writers finish in any order: wait for the first two records
    while not all((out / "shards" / f"shard-0000{n}.json").exists() for n in (0, 1)):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the extraction never published a shard"
        time.sleep(0.01)
    workers = _children(process.pid) if processes else set()
    assert len(workers) >= processes  # the loaders and writers were running
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()
                   for pid in workers), "worker processes outlived the killed run"
    assert not (out / "card.json").exists()

    shards = out / "shards"
    published = _files(shards / "shard-00000.zarr")
    mtimes = {p: p.stat().st_mtime_ns for p in (shards / "shard-00000.zarr").rglob("*")}
    # Leftovers of other crash points: a shard published without record, a half-written temporary
    # directory and a record whose shard directory is gone.
    (shards / "shard-00005.zarr").mkdir(exist_ok=True)
    (shards / "shard-00005.zarr" / "zarr.json").write_text("{}")
    (shards / f".tmp-shard-00006-{process.pid}.zarr").mkdir(exist_ok=True)
    (shards / "shard-00004.json").write_text('{"shard": 4}')

    summary = run_extract(_config(manifest, out))
    assert summary.shards_skipped >= 2 and summary.shards_written == summary.shards - summary.shards_skipped
    assert _files(out) == _files(reference)
    assert _files(shards / "shard-00000.zarr") == published
    assert {p: p.stat().st_mtime_ns for p in (shards / "shard-00000.zarr").rglob("*")} == mtimes  # not rewritten

    again = run_extract(_config(manifest, out))  # a finished dataset: nothing to do, same bytes
    assert again.shards_written == 0 and _files(out) == _files(reference)


def test_rerun_removes_temporaries_of_a_run_killed_while_finalizing(tmp_path):
    # Regression: a SIGKILL inside write_card / write_index / the extract.json write left `.tmp-<file>-<pid>`
    # in OUT, which no rerun removed, so the resumed dataset never equalled an uninterrupted one.
    manifest = make_manifest(tmp_path, frames=3)
    reference, out = tmp_path / "reference", tmp_path / "out"
    run_extract(_config(manifest, reference))
    run_extract(_config(manifest, out))
    for name in ("card.json", "index.parquet", "extract.json"):
        (out / f".tmp-{name}-99999").write_bytes(b"torn")
    (out / ".tmp-notes-mine").write_text("not geod's")  # not one of the run's files: left alone
    assert run_extract(_config(manifest, out)).shards_written == 0
    (out / ".tmp-notes-mine").unlink()
    assert _files(out) == _files(reference)


def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path):
    manifest = make_manifest(tmp_path, frames=3)
    out = tmp_path / "out"
    run_extract(_config(manifest, out))
    with pytest.raises(ConfigError, match="targets"):
        run_extract(_config(manifest, out, seed=1))
    with pytest.raises(ConfigError, match="teacher"):
        run_extract(_config(manifest, out, teacher_options={"rel_tol": 0.1}))
    summary = run_extract(_config(manifest, out, seed=1, overwrite=True))
    assert summary.shards_written == summary.shards == 2

    # A different release version only rewrites the card.
    summary = run_extract(_config(manifest, out, seed=1, dataset_version="0.2.0"))
    assert summary.shards_written == 0
    from geod.pipeline.card import read_card

    assert read_card(out).dataset_version == "0.2.0"

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_extract(_config(manifest, stranger))


def test_teacher_grid_must_match_the_layout(tmp_path):
    from geod.stage1_extract.geometry import GeometryTeacher

    class GridTeacher(GeometryTeacher):
        def config(self) -> dict:
            return {**super().config(), "cost_grid": [24, 32]}

    manifest = make_manifest(tmp_path, frames=3)
    with pytest.raises(ConfigError, match="24x32 grid but the layout's grid is 6x8"):
        run_extract(_config(manifest, tmp_path / "out"), teacher=GridTeacher())
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_network_teacher_with_matches_and_dense_cost_goes_through_the_runner(tmp_path):
    """The tiny random-weight MASt3R (own matches, dense cost rows) gives a valid dataset: the builders
    handle the teacher-matched / dense-cost path end to end."""
    pytest.importorskip("torch")
    manifest = make_manifest(tmp_path, frames=3)
    options = {"weights": "random", "size": "tiny", "cost_grid": [LAYOUT["grid_h"], LAYOUT["grid_w"]],
               "long_side": 64}
    summary = run_extract(_config(manifest, tmp_path / "out", teacher="mast3r", teacher_options=options))
    assert summary.ok == summary.pairs == 3

    from geod.pipeline.reader import TargetDataset
    from geod.pipeline.validate import validate_dataset

    assert validate_dataset(tmp_path / "out") == []
    data = TargetDataset.open(tmp_path / "out")
    assert data.card.teacher.name == "mast3r"
    pair = data.pair("p00-01")
    assert pair["cv_ab_valid"].all() and pair["cv_ba_valid"].all()  # dense attention rows are never empty


def test_a_second_extraction_into_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    from geod.pipeline.locking import LOCK_FILE, exclusive_directory_lock

    out = tmp_path / "targets"
    with exclusive_directory_lock(out, what="geod extract"):
        # flock locks belong to open file descriptions: a second open in this process conflicts like another
        # process would.
        handle = os.open(out / LOCK_FILE, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ConfigError, match="another geod extract is writing"):
                with exclusive_directory_lock(out, what="geod extract"):
                    pass
            manifest = make_manifest(tmp_path / "data", frames=3)
            with pytest.raises(ConfigError, match="another geod extract is writing"):
                run_extract(_config(manifest, out))
            assert not (out / "extract.json").exists()  # refused before touching the directory
        finally:
            os.close(handle)
    with exclusive_directory_lock(out, what="geod extract"):  # released: free again
        pass


@pytest.mark.parametrize("field, value, message", [
    ("dataset_version", 1, "dataset_version must be a non-empty string"),
    ("dataset_version", "  ", "dataset_version must be a non-empty string"),
    ("licence", 3, "licence must be a string or None"),
])
def test_release_fields_are_checked_before_extraction(tmp_path, field, value, message):
    # Checked in the config, so a bad value fails before any pair is read or written.
    with pytest.raises(ConfigError, match=message):
        ExtractConfig(pairs=tmp_path / "pairs.parquet", out=tmp_path / "out", layout=DatasetLayout(**LAYOUT),
                      **{field: value})
    assert not (tmp_path / "out").exists()


def test_loader_processes_give_the_same_dataset_as_threads(tmp_path):
    """Decoding in spawned processes changes where the work runs, not the bytes; failures are still
    recorded pair by pair, and shards keep flowing across shard boundaries."""
    bad = ({"pair_id": "missing", "scene_id": "s", "image_a": "nowhere/0.jpg",
            "image_b": "scenes/scene0000_00/color/1.jpg"},)
    manifest = make_manifest(tmp_path, frames=5, extra_rows=bad)
    threads = run_extract(_config(manifest, tmp_path / "threads", load_processes=0))
    processes = run_extract(_config(manifest, tmp_path / "processes", load_processes=2))
    assert (threads.pairs, threads.failed, threads.shards) == (processes.pairs, processes.failed, 4) == (8, 1, 4)
    assert _files(tmp_path / "threads") == _files(tmp_path / "processes")
    assert set(processes.waits) == {"inputs", "teacher", "targets", "writes"}
    assert all(seconds >= 0 for seconds in processes.waits.values())
    with pytest.raises(ConfigError, match="load_processes"):
        _config(manifest, tmp_path / "x", load_processes=-1)


@pytest.mark.slow
def test_mast3r_takes_its_cost_grid_and_topk_from_the_layout(tmp_path):
    pytest.importorskip("torch")
    manifest = make_manifest(tmp_path, frames=3)
    options = {"weights": "random", "size": "tiny", "long_side": 64}
    summary = run_extract(_config(manifest, tmp_path / "out", teacher="mast3r", teacher_options=options))
    assert summary.ok == summary.pairs == 3
    from geod.pipeline.card import read_card_json

    config = read_card_json(tmp_path / "out")["teacher"]["config"]
    assert config["cost_grid"] == [LAYOUT["grid_h"], LAYOUT["grid_w"]] and config["cost_topk"] == LAYOUT["topk"]
    with pytest.raises(ConfigError, match="keeps the top 5 cost entries per row but the layout keeps 4"):
        run_extract(_config(manifest, tmp_path / "other", teacher="mast3r",
                            teacher_options={**options, "cost_topk": 5}))
