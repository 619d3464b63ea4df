"""The command line: instant help, clear errors for bad input, and the README's commands."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geod.pipeline.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch_or_zarr():
    code = ("import sys; from geod.pipeline.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'transformers', 'zarr') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_has_help():
    runner = CliRunner()
    for command in (["pairs", "scannet"], ["pairs", "folder"], ["demo-data"], ["extract"], ["info"],
                    ["validate"], ["export-targets"], ["distill"], ["eval"], ["export"], ["demo"]):
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def _geod(*args, cwd):
    return subprocess.run([sys.executable, "-m", "geod.pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True)


def test_bad_manifest_gives_a_clear_error_and_no_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pair_id": ["p0", "p0"], "scene_id": ["s", "s"], "image_a": ["a.jpg", "a.jpg"],
                             "image_b": ["b.jpg", "b.jpg"]}), tmp_path / "pairs.parquet")
    result = _geod("extract", "--pairs", "pairs.parquet", "--out", "targets", cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and "pair_id" in result.stderr and "row 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "targets" / "card.json").exists()


def test_pipeline_commands_chain_and_validate_catches_damage(tmp_path):
    assert _geod("demo-data", "scenes", "--scenes", "2", "--frames", "6", cwd=tmp_path).returncode == 0
    made = _geod("pairs", "scannet", "scenes", "--out", "pairs.parquet", "--frame-stride", "1",
                 "--frame-gap", "1x3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    extracted = _geod("extract", "--pairs", "pairs.parquet", "--out", "targets", "--grid", "6x8",
                      "--depth-map", "12x16", "--topk", "8", "--max-matches", "64", "--pairs-per-shard", "8",
                      "--rows-per-chunk", "4", "--load-processes", "1", cwd=tmp_path)
    assert extracted.returncode == 0, extracted.stderr
    assert "waited on: inputs" in extracted.stdout and "writes" in extracted.stdout
    assert _geod("validate", "targets", cwd=tmp_path).returncode == 0
    info = _geod("info", "targets", cwd=tmp_path)
    assert '"format": "geod-targets"' in info.stdout

    chunk = sorted((tmp_path / "targets" / "shards").glob("shard-00000.zarr/match_xy_a/c/*/*/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    checked = _geod("validate", "targets", cwd=tmp_path)
    assert checked.returncode == 1
    assert "shard-00000" in checked.stderr and "match_xy_a" in checked.stderr


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_commands = re.findall(r"^python -m pytest.*$", readme, flags=re.M)
    assert test_commands, "README shows no test command"
    assert test_commands[0] in ci.splitlines()
    assert re.search(r"^pip install -e '\.\[dev\]' && geod demo", readme, flags=re.M)


@pytest.mark.parametrize("bad", ["24", "24xa", "x"])
def test_grid_option_must_be_two_integers(tmp_path, bad):
    result = CliRunner().invoke(app, ["extract", "--pairs", "p.parquet", "--out", "o", "--grid", bad])
    assert result.exit_code != 0
    assert "--grid" in result.output


def test_extract_exits_non_zero_when_every_pair_failed(tmp_path):
    from geod.data_manifests.manifest import write_manifest

    write_manifest([{"pair_id": f"p{i}", "scene_id": "s", "image_a": f"missing_{i}_a.jpg",
                     "image_b": f"missing_{i}_b.jpg"} for i in range(3)], tmp_path / "pairs.parquet")
    result = _geod("extract", "--pairs", "pairs.parquet", "--out", "targets", "--grid", "6x8", "--topk", "8",
                   cwd=tmp_path)
    assert result.returncode == 1
    assert "every pair failed" in result.stderr and "3 pair(s) failed" in result.stderr
    assert (tmp_path / "targets" / "index.parquet").exists()  # the failures themselves are recorded


def _run_stopped_after_two_of_four_steps(tmp_path) -> list[str]:
    """`geod distill` of a toy dataset into tmp_path/run, stopped with a checkpoint after 2 of 4 steps; returns
    the --shards / --out arguments to resume it with."""
    from distill_helpers import make_target_dataset

    shards = make_target_dataset(tmp_path / "targets")
    common = ["--shards", str(shards), "--out", "run"]
    first = _geod("distill", *common, "--steps", "4", "--workers", "0", "--device", "cpu",
                  "--set", "run.stop_after_steps=2", "--set", "run.checkpoint_every=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "2 steps" in first.stdout
    return common


def test_distill_resume_continues_the_run_with_its_own_config(tmp_path):
    common = _run_stopped_after_two_of_four_steps(tmp_path)
    resumed = _geod("distill", *common, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 steps" in resumed.stdout
    assert "data: the steps waited for batches" in resumed.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_resuming_a_run_saved_before_a_setting_existed_keeps_how_it_ran(tmp_path):
    # A run saved without data.reduced_decode decoded every image in full: its resume continues that way, and
    # asking it to decode otherwise is refused as a configuration change.
    import json

    common = _run_stopped_after_two_of_four_steps(tmp_path)
    run_config = tmp_path / "run" / "config.json"
    state = tmp_path / "run" / "checkpoints" / "step-000002" / "state.json"
    saved, checkpoint = json.loads(run_config.read_text()), json.loads(state.read_text())
    del saved["data"]["reduced_decode"], checkpoint["config"]["data"]["reduced_decode"]  # as an older geod wrote
    run_config.write_text(json.dumps(saved))
    state.write_text(json.dumps(checkpoint))
    changed = _geod("distill", *common, "--resume", "--set", "data.reduced_decode=true", cwd=tmp_path)
    assert changed.returncode != 0 and "data.reduced_decode" in changed.stderr
    resumed = _geod("distill", *common, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 steps" in resumed.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["reduced_decode"] is False


def test_eval_like_takes_the_image_size_of_a_run(tmp_path):
    import json

    from distill_helpers import make_target_dataset
    from geod.pipeline.errors import ConfigError
    from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
    from geod.stage2_distill.train import run_distill

    shards = make_target_dataset(tmp_path / "targets", pairs=8, val_every=2)
    run = tmp_path / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(shards), batch_size=4, workers=0, max_matches=24),
        run=RunConfig(out=run, checkpoint_every=1000, log_every=10, progress=False),
        student=StudentConfig(image_size=(32, 48)), optim=OptimConfig(warmup_steps=0, max_steps=1)))
    runner = CliRunner()
    common = ["eval", "--shards", str(shards), "--student", "tiny-clip", "--max-pairs", "2", "--device", "cpu"]
    plain = runner.invoke(app, common)
    assert plain.exit_code == 0, plain.output
    like = runner.invoke(app, [*common, "--like", str(run)])
    assert like.exit_code == 0, like.output
    # tiny-clip's own input is 64x64; --like evaluates the base student at the run's 32x48 instead.
    assert json.loads(plain.stdout)["image_size"] == [64, 64]
    assert json.loads(like.stdout)["image_size"] == [32, 48]
    assert not json.loads(like.stdout)["distilled"]

    both = runner.invoke(app, [*common, "--like", str(run), "--image-size", "32x48"])
    assert both.exit_code == 2 and "either --like or --image-size" in both.output
    not_a_run = runner.invoke(app, [*common, "--like", str(tmp_path / "targets")])
    assert isinstance(not_a_run.exception, ConfigError)
    assert str(not_a_run.exception) == f"{tmp_path / 'targets' / 'student.json'}: missing; --like takes a " \
                                       f"distillation run directory"
