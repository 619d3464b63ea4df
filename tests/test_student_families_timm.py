"""timm students: the install hint when timm is missing (always tested, by hiding the module), and, where
timm and torchvision import, a tiny random timm ViT built with timm.create_model(pretrained=False)."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from geod.pipeline.errors import StudentError
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.students import create_student, save_base


def _timm_imports() -> bool:
    try:
        import timm  # noqa: F401
    except (ImportError, RuntimeError):  # missing, or a torchvision that does not match torch
        return False
    return True


HAVE_TIMM = _timm_imports()
HINT = re.escape("pip install 'geod[timm]'")


def test_without_timm_every_timm_name_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_384", "num_classes": 0}))
    for name in ("tiny-timm", "timm", "timm:vit_small_patch16_224", "timm/vit_base_patch16_clip_384.openai",
                 str(folder)):
        with pytest.raises(StudentError, match=HINT):
            create_student(StudentConfig(name_or_path=name))


@pytest.mark.skipif(not HAVE_TIMM, reason="timm (with a matching torchvision) is not importable here")
def test_tiny_timm_vit_is_a_student(tmp_path):
    from geod.stage2_distill.adapters import lora_target_names
    from geod.stage2_distill.model import DistillModel
    from transformers.image_utils import OPENAI_CLIP_MEAN

    student = create_student(StudentConfig(name_or_path="tiny-timm", image_size=(32, 48)))
    assert (student.family, student.num_layers, student.patch_size, student.num_prefix_tokens) == ("timm", 4, 8, 1)
    # Normalisation from the model's pretrained_cfg (the method's CLIP ViT: OpenAI CLIP statistics).
    assert student.preprocessing.mean == pytest.approx(tuple(OPENAI_CLIP_MEAN))
    pixels = torch.randn(2, 3, 32, 48)  # not the native 64x64: dynamic_img_size interpolates positions
    with torch.no_grad():
        grids = student(pixels)
        tokens = student.base_model().forward_features(pixels)[:, 1:]
    assert all(g.shape == (2, 64, 4, 6) for g in grids)
    assert torch.allclose(student.final_norm(grids[-1]).flatten(2).transpose(1, 2), tokens, atol=1e-5)
    # q_proj / v_proj name the fused qkv projection of timm blocks.
    assert lora_target_names(student, (2, 3), ("q_proj", "v_proj")) == ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]

    save_base(student, tmp_path / "timm")
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "timm"), image_size=(32, 48)))
    assert loaded.family == "timm" and loaded.source["kind"] == "local"
    assert loaded.preprocessing == student.preprocessing
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(grids, loaded(pixels), strict=True))
    cfg = StudentConfig(name_or_path="tiny-timm", lora_layers=(2, 3)).resolved(4, (32, 48))
    names = [n for n, p in DistillModel(student, cfg).named_parameters() if p.requires_grad and "lora" in n]
    assert len(names) == 4 and all(".attn.qkv.lora_" in n for n in names)


@pytest.mark.skipif(not HAVE_TIMM, reason="timm (with a matching torchvision) is not importable here")
def test_tiny_timm_trains_and_loads_back(tmp_path):
    from distill_helpers import make_target_dataset
    from geod.stage2_distill import train
    from geod.stage2_distill.checkpoint import load_distilled

    dataset = make_target_dataset(tmp_path / "data", pairs=8)
    cfg = DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=tmp_path / "run", checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(name_or_path="tiny-timm", image_size=(32, 48), adapter_dim=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, max_steps=3))
    summary = train.run_distill(cfg)
    assert summary.finished and summary.skipped_steps == 0
    final, from_checkpoint = load_distilled(tmp_path / "run"), load_distilled(tmp_path / "run", checkpoint=3)
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        x, y = final.features(pixels), from_checkpoint.features(pixels)
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.skipif(not HAVE_TIMM, reason="timm (with a matching torchvision) is not importable here")
def test_tiny_timm_run_exports_a_timm_folder_and_a_peft_adapter(tmp_path):
    # The merged folder loads with timm alone (local-dir:), its pretrained_cfg gives timm's own transform the
    # distillation preprocessing, and the peft adapter on the base model computes the same features.
    import timm
    from distill_helpers import make_target_dataset
    from geod.stage2_distill import train
    from geod.stage2_distill.export_vlm import export_run
    from peft import PeftModel
    from PIL import Image
    from safetensors.torch import load_file

    dataset = make_target_dataset(tmp_path / "data", pairs=8)
    cfg = DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=tmp_path / "run", checkpoint_every=100, log_every=1, progress=False, device="cpu"),
        student=StudentConfig(name_or_path="tiny-timm", image_size=(32, 48), lora_layers=(2, 3), adapter_dim=0),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, max_steps=3))
    assert train.run_distill(cfg).finished
    summary = export_run(tmp_path / "run", tmp_path / "export")
    assert summary.merged and summary.lora_modules == 2 and summary.tower_path == ""
    merged_dir = tmp_path / "export" / "merged"

    merged = timm.create_model(f"local-dir:{merged_dir}", pretrained=True).eval()
    base = create_student(StudentConfig(name_or_path=str(tmp_path / "run" / "base"), image_size=(32, 48)))
    before, after = base.base_model().state_dict(), load_file(merged_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["blocks.2.attn.qkv.weight", "blocks.3.attn.qkv.weight"]

    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        base_features = base.base_model().eval().forward_features(pixels)
        # peft injects the LoRA into the module it is given: from here on it is the adapted model
        adapted = PeftModel.from_pretrained(base.base_model(), tmp_path / "export" / "adapter").eval()
        assert torch.allclose(merged.forward_features(pixels), adapted.forward_features(pixels), atol=1e-5)
        assert not torch.allclose(merged.forward_features(pixels), base_features, atol=1e-5)

    reloaded = create_student(StudentConfig(name_or_path=str(merged_dir)))
    assert reloaded.image_size == (32, 48)
    image = (np.random.default_rng(0).random((60, 70, 3)) * 255).astype(np.uint8)
    data_cfg = timm.data.resolve_data_config({}, model=merged)
    transform = timm.data.create_transform(**data_cfg)
    expected = torch.from_numpy(reloaded.preprocessing(image))
    assert torch.allclose(transform(Image.fromarray(image)), expected, atol=1e-5)
