"""`export_run` on a tiny CLIP tower run: what is written, and that it loads back without geod."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.stage2_distill import export_vlm
from geod.stage2_distill.adapters import quiet_peft
from geod.stage2_distill.checkpoint import load_distilled
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.export_vlm import ExportError, export_run
from geod.stage2_distill.students import create_student
from geod.stage2_distill.train import run_distill

SIZE = (32, 48)
TARGETS = {f"encoder.layers.{layer}.self_attn.{p}.weight" for layer in (2, 3) for p in ("q_proj", "v_proj")}


def _run(dataset, out, *, adapter_dim: int, steps: int):
    # A high learning rate so that a few steps move the LoRA far from its zero start.
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        # the CPU whatever the machine: the comparisons below are about export, at float32 tolerances
        run=RunConfig(out=out, checkpoint_every=100, log_every=1, progress=False, device="cpu"),
        student=StudentConfig(image_size=SIZE, lora_layers=(2, 3), adapter_dim=adapter_dim),
        optim=OptimConfig(lr=2e-2, warmup_steps=0, max_steps=steps)))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=8)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    return _run(dataset, tmp_path_factory.mktemp("runs") / "lora", adapter_dim=0, steps=3)


def _images(count: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(rng.random((40, 50, 3)) * 255).astype(np.uint8) for _ in range(count)]


def test_tower_export_round_trip(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoImageProcessor, CLIPVisionModel

    out = tmp_path / "export"
    summary = export_run(run, out)
    assert summary.merged and summary.tower_path == "" and summary.lora_modules == 4
    assert summary.model_class == "CLIPVisionModel" and summary.bottlenecks_in_model is None
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "geod_export.json", "geod_modules.safetensors",
                                                     "merged"]
    assert not list(tmp_path.glob(".tmp-*"))
    record = json.loads((out / "geod_export.json").read_text())
    assert record["base_model"] == str(run / "base") and record["distilled_image_size"] == list(SIZE)
    assert record["lora"]["modules"] == sorted(t[:-len(".weight")] for t in TARGETS)

    # Only the LoRA-targeted weights changed; everything else is the base's, bit for bit.
    base = CLIPVisionModel.from_pretrained(run / "base").eval()
    merged = CLIPVisionModel.from_pretrained(out / "merged").eval()
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert base_state.keys() == merged_state.keys()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    assert changed == TARGETS

    # The merged tower, loaded by geod as a plain student, gives the distilled student's features.
    distilled = load_distilled(run)
    reloaded = create_student(StudentConfig(name_or_path=str(out / "merged"), image_size=SIZE))
    pixels = distilled.student.preprocess(_images())
    with torch.no_grad():
        expected, got = distilled.student(pixels), reloaded(pixels)
        base_grids = create_student(StudentConfig(name_or_path=str(run / "base"), image_size=SIZE))(pixels)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5)
    assert not torch.allclose(expected[-1], base_grids[-1], atol=1e-3)

    # The peft adapter on the plain base gives the merged model's outputs.
    with quiet_peft():
        with_adapter = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(run / "base"),
                                                 out / "adapter").eval()
    with torch.no_grad():
        a = with_adapter(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        b = merged(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)

    # The saved image processor reproduces the preprocessing the student was distilled with.
    processor = AutoImageProcessor.from_pretrained(out / "merged")
    processed = processor(images=_images(), return_tensors="pt")["pixel_values"]
    assert processed.shape == pixels.shape
    backends = {cls.__name__ for cls in type(processor).__mro__}
    if backends & {"TorchvisionBackend", "BaseImageProcessorFast"}:
        # Where torchvision is installed, transformers picks its torchvision-backed processor: the same resize,
        # no crop and normalisation, but torchvision's bicubic kernel, not PIL's, so values differ slightly.
        difference = (processed - pixels).abs()
        assert difference.mean() < 0.02, (type(processor).__name__, float(difference.mean()), float(difference.max()))
    else:
        assert torch.allclose(processed, pixels, atol=1e-4)

    from safetensors.torch import load_file

    assert {k.split(".")[0] for k in load_file(out / "geod_modules.safetensors")} == {"refine", "depth_head"}


def test_checkpoint_export_equals_final_and_adapter_only(run, tmp_path):
    from safetensors.torch import load_file

    final = export_run(run, tmp_path / "final")
    again = export_run(run, tmp_path / "ckpt", checkpoint=3, merged=False)
    assert final.lora_modules == again.lora_modules and not (tmp_path / "ckpt" / "merged").exists()
    a = load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ExportError, match="no checkpoint 7"):
        export_run(run, tmp_path / "x", checkpoint=7)


def test_existing_output_and_failures_leave_no_partial_export(run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_run(run, out, merged=False)
    with pytest.raises(ExportError, match="already exists"):
        export_run(run, out)
    export_run(run, out, overwrite=True)
    assert (out / "merged" / "model.safetensors").is_file()

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_vlm, "_tower_processor", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, tmp_path / "failed")
    with pytest.raises(OSError, match="disk full"):
        export_run(run, out, overwrite=True)
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".*"))
    assert (out / "merged" / "model.safetensors").is_file()  # the earlier export is untouched
    with pytest.raises(ExportError, match="not a distillation run"):
        export_run(tmp_path, tmp_path / "y")


def test_runs_without_lora_or_of_unsupported_families_are_refused(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    info = json.loads((copy / "student.json").read_text())
    (copy / "student.json").write_text(json.dumps({**info, "family": "dinov2"}))
    with pytest.raises(ExportError, match="exporting 'dinov2' students is not supported"):
        export_run(copy, tmp_path / "dinov2")
    (copy / "student.json").write_text(json.dumps({**info, "family": "timm"}))  # but the base is a CLIP tower
    with pytest.raises(ExportError, match="not a timm model folder"):
        export_run(copy, tmp_path / "timm")
    shutil.rmtree(copy / "adapter")
    with pytest.raises(ExportError, match="no LoRA weights"):
        export_run(copy, tmp_path / "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bottleneck_adapters_are_refused_unless_dropped(dataset, tmp_path):
    from safetensors.torch import load_file

    run = _run(dataset, tmp_path / "run", adapter_dim=4, steps=1)
    with pytest.raises(ExportError, match=r"blocks 2, 3 \(student.adapter_dim=4\).*adapter_dim=0"):
        export_run(run, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = export_run(run, tmp_path / "dropped", drop_bottlenecks=True)
    assert summary.bottlenecks_in_model is False and "NOT in the model" in summary.describe()
    record = json.loads((tmp_path / "dropped" / "geod_export.json").read_text())
    assert record["bottlenecks_in_model"] is False and record["bottleneck_blocks"] == [2, 3]
    modules = load_file(tmp_path / "dropped" / "geod_modules.safetensors")
    assert {k for k in modules if k.startswith("student.block_adapters.")} == {
        f"student.block_adapters.{b}.{layer}.{p}" for b in (2, 3) for layer in ("down", "up")
        for p in ("weight", "bias")}
