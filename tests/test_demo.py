"""The demo pipeline end to end at a reduced size: distillation must beat the base student."""

import json

import pytest

from geod.pipeline.demo import DemoConfig, format_report, run_demo
from geod.pipeline.errors import ConfigError


@pytest.mark.slow
def test_demo_improves_correspondence_over_the_base_student(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", scenes=4, frames_per_scene=10, steps=60, workers=0, seed=0,
                     progress=False)
    report = run_demo(cfg)

    assert report["distilled"]["pck@0.05"] > report["base"]["pck@0.05"] + 0.05
    assert report["distilled"]["median_error"] < report["base"]["median_error"]
    assert report["improved_pck"] is True
    on_disk = json.loads((cfg.out / "report.json").read_text())
    assert on_disk == report
    for name in ("eval_base.json", "eval_distilled.json", "matches_base.png", "matches_distilled.png"):
        assert (cfg.out / name).stat().st_size > 0
    assert (cfg.out / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert "pck@0.05" in format_report(report)


def test_demo_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not empty"):
        run_demo(DemoConfig(out=tmp_path, progress=False))
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_demo_config_rejects_sizes_that_cannot_hold_out_a_scene(tmp_path):
    with pytest.raises(ConfigError, match="at least 2 scenes"):
        DemoConfig(out=tmp_path, scenes=1)
    with pytest.raises(ConfigError, match="val_fraction"):
        DemoConfig(out=tmp_path, val_fraction=1.0)
