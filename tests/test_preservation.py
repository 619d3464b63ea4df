"""Feature preservation: the loss by hand, the base features inside the same model, and the eval metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.pipeline.errors import ConfigError
from geod.stage2_distill import losses
from geod.stage2_distill.checkpoint import load_distilled
from geod.stage2_distill.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    StudentConfig,
)
from geod.stage2_distill.evaluate import evaluate
from geod.stage2_distill.model import DistillModel, adapters_disabled, preserve_layer_index
from geod.stage2_distill.students import create_student
from geod.stage2_distill.train import run_distill

SIZE = (32, 48)


def test_preservation_loss_by_hand():
    # Two images, D = 2, a 1x2 grid: tokens as 2-vectors.
    student = [[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [-1.0, 1.0]]]  # image, token, channel
    base = [[[3.0, 4.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 1.0]]]

    def cos(a, b):
        return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))

    # image 0: tokens unchanged (1 - 1 = 0) and orthogonal (1); image 1: opposite (2) and orthogonal (1)
    expected_cos = ((0 + 1) / 2 + (2 + 1) / 2) / 2
    assert expected_cos == pytest.approx(sum(1 - cos(s, b) for img_s, img_b in zip(student, base)
                                             for s, b in zip(img_s, img_b)) / 4)
    # relative MSE: |s - b|^2 over the image's mean |b|^2 (13 for image 0, 1.5 for image 1)
    expected_mse = ((0 / 13.0 + 2 / 13.0) / 2 + (9 / 1.5 + 4 / 1.5) / 2) / 2

    def grid(values):
        return torch.tensor(values, dtype=torch.float64).permute(0, 2, 1).reshape(2, 2, 1, 2)

    s, b = grid(student), grid(base)
    assert losses.feature_preservation_loss(s, b).item() == pytest.approx(expected_cos, rel=1e-12)
    assert losses.feature_preservation_loss(s, b, distance="relative_mse").item() == pytest.approx(
        expected_mse, rel=1e-12)
    assert losses.feature_preservation_loss(b, b).item() == pytest.approx(0.0, abs=1e-12)
    # Scale-free: scaling both grids leaves either distance unchanged.
    assert losses.feature_preservation_loss(7 * s, 7 * b, distance="relative_mse").item() == pytest.approx(
        expected_mse, rel=1e-12)
    with pytest.raises(ValueError, match="unknown distance"):
        losses.feature_preservation_loss(s, b, distance="l1")


def test_loss_config_fields_are_validated():
    assert LossConfig().w_preserve == 0.0 and LossConfig().preserve_layer is None
    with pytest.raises(ConfigError, match="w_preserve"):
        LossConfig(w_preserve=-1.0)
    with pytest.raises(ConfigError, match="preserve_distance"):
        LossConfig(preserve_distance="l2")


def _model(adapter_dim: int = 4) -> DistillModel:
    cfg = StudentConfig(image_size=SIZE, lora_layers=(1, 2), adapter_dim=adapter_dim)
    student = create_student(cfg)
    return DistillModel(student, cfg.resolved(student.num_layers, student.image_size))


def _batch(pairs: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * pairs, 3, *SIZE, generator=generator) * 2 - 1
    matches, cells = 6, 24
    batch = {"pixel_a": pixels[:pairs], "pixel_b": pixels[pairs:], "mask": torch.ones(pairs, matches, dtype=torch.bool),
             "xy_a": torch.rand(pairs, matches, 2, generator=generator),
             "xy_b": torch.rand(pairs, matches, 2, generator=generator),
             "depth_a": 1 + torch.rand(pairs, matches, generator=generator),
             "depth_b": 1 + torch.rand(pairs, matches, generator=generator),
             "points_a": torch.rand(pairs, matches, 3, generator=generator),
             "points_b": torch.rand(pairs, matches, 3, generator=generator), "scene_scale": torch.ones(pairs)}
    for side in ("ab", "ba"):
        batch[f"cv_{side}_index"] = torch.arange(4).expand(pairs, cells, 4).clone()
        batch[f"cv_{side}_prob"] = torch.full((pairs, cells, 4), 0.25)
        batch[f"cv_{side}_valid"] = torch.ones(pairs, cells, dtype=torch.bool)
    return batch


def test_base_features_come_from_the_same_model_with_adapters_off():
    model = _model()
    batch = _batch()
    pixels = torch.cat([batch["pixel_a"], batch["pixel_b"]])
    cfg = LossConfig(w_preserve=2.0)
    # Zero-initialised LoRA and adapters: the student is its base model, nothing to preserve yet.
    assert model(batch, cfg, (4, 6))["preserve"].item() == pytest.approx(0.0, abs=1e-7)

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or ".up." in name:
                parameter.normal_(std=0.5)
    fresh = create_student(StudentConfig(image_size=SIZE))  # same seed: the same base weights
    with torch.no_grad():
        truth = fresh(pixels)[3]
    layer = preserve_layer_index(model.student, None)
    assert layer == 3  # a bare CLIP tower feeds its last block
    assert torch.equal(model.base_grid(pixels, layer), truth)
    assert len(model.student.block_adapters) == 2  # restored after the base pass
    with adapters_disabled(model.student):
        assert len(model.student.block_adapters) == 0

    parts = model(batch, cfg, (4, 6))
    moved = model.features(pixels, match=False, depth=False, cost=False, preserve=3)["preserve"]
    expected = losses.feature_preservation_loss(moved, truth)
    assert parts["preserve"].item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 1e-3
    others = sum(w * parts[k] for w, k in ((1, "ap"), (1, "depth"), (1, "rank"), (1, "kl")))
    assert parts["total"].item() == pytest.approx(others.item() + 2.0 * expected.item(), rel=1e-6)

    # Gradients of the preservation term reach LoRA and the adapters, never the frozen base.
    model.zero_grad()
    model(batch, LossConfig(w_ap=1e-12, w_depth=0, w_rank=0, w_kl=0, w_preserve=1.0), (4, 6))["total"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_A" in n for n in grads) and any("block_adapters" in n for n in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # An explicit layer, negative from the end; out of range is a config error naming the field.
    assert preserve_layer_index(model.student, -2) == 2
    with pytest.raises(ConfigError, match="loss.preserve_layer 9"):
        model(batch, LossConfig(w_preserve=1.0, preserve_layer=9), (4, 6))


@pytest.mark.parametrize(("name", "normed"), [("tiny-llava", False), ("tiny-paligemma", True)])
def test_vlm_students_preserve_what_their_language_model_is_fed(name, normed):
    cfg = StudentConfig(name_or_path=name, image_size=SIZE, adapter_dim=4)
    student = create_student(cfg)
    model = DistillModel(student, cfg.resolved(student.num_layers, student.image_size))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name or ".up." in parameter_name:
                parameter.normal_(std=0.5)
    pixels = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fresh = create_student(StudentConfig(name_or_path=name, image_size=SIZE))
    layer = preserve_layer_index(model.student, None)
    assert layer == fresh.fed_layer == fresh.num_layers - 1
    with torch.no_grad():
        raw = fresh(pixels)[layer]
        seen = fresh.final_norm(raw) if normed else raw  # LLaVA takes the block raw, PaliGemma after post_layernorm
        assert torch.allclose(model.base_grid(pixels, layer), seen, atol=1e-6)
        moved = model.features(pixels, match=False, depth=False, cost=False, preserve=layer)["preserve"]
    assert not torch.allclose(moved, seen, atol=1e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=12, val_every=3)


def _train(dataset, out, w_preserve: float):
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=out, checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(image_size=SIZE, lora_layers=(2, 3), adapter_dim=4),
        loss=LossConfig(w_preserve=w_preserve),
        optim=OptimConfig(lr=3e-2, warmup_steps=0, max_steps=4)))
    return out


def test_eval_reports_feature_drift_and_preservation_reduces_it(dataset, tmp_path):
    free = _train(dataset, tmp_path / "free", 0.0)
    kept = _train(dataset, tmp_path / "kept", 20.0)
    # On the CPU, like the independent computation below (CUDA convolutions differ in the last digits)
    metrics = evaluate(EvalConfig(shards=str(dataset), student=str(free), progress=False, device="cpu"))
    assert metrics["feature_cosine_layer"] == 3
    assert 0.0 < metrics["feature_cosine_min"] <= metrics["feature_cosine_mean"] < 0.999

    # The same numbers computed independently: distilled vs freshly built base tower, per val image.
    from geod.stage2_distill.data import PairIndex, PairSource

    distilled = load_distilled(free)
    source = PairSource(str(dataset), {}, None, distilled.student.preprocessing)
    index = PairIndex.from_dataset(source.dataset(), "val", str(dataset))
    positions = sorted(int(p) for rows in index.block_rows for p in rows)
    images = [source.image(index.image_a[p], index.sha_a[p]) for p in positions] + \
             [source.image(index.image_b[p], index.sha_b[p]) for p in positions]
    pixels = distilled.student.preprocess(images)
    base = create_student(StudentConfig(name_or_path=str(free / "base"), image_size=SIZE))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(distilled.student(pixels)[3].double(),
                                                    base(pixels)[3].double(), dim=1).flatten(1).mean(1).numpy()
    assert metrics["feature_cosine_mean"] == pytest.approx(float(np.mean(cos)), abs=1e-6)
    assert metrics["feature_cosine_min"] == pytest.approx(float(np.min(cos)), abs=1e-6)

    # A base student is not distilled: no drift metric.
    assert "feature_cosine_mean" not in evaluate(EvalConfig(shards=str(dataset), student="tiny-clip",
                                                            image_size=SIZE, progress=False))
    # A strong preservation weight keeps the fed features closer to the base.
    preserved = evaluate(EvalConfig(shards=str(dataset), student=str(kept), progress=False))
    assert preserved["feature_cosine_mean"] > metrics["feature_cosine_mean"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_preservation_under_bf16_autocast_on_cuda():
    model = _model().cuda()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or ".up." in name:
                parameter.normal_(std=0.5)
    batch = {k: v.cuda() for k, v in _batch().items()}
    cfg = LossConfig(w_preserve=1.0)
    with torch.no_grad():
        exact = model(batch, cfg, (4, 6))["preserve"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(batch, cfg, (4, 6))["preserve"]
    assert fast.dtype == torch.float32 and exact.item() > 1e-3
    assert fast.item() == pytest.approx(exact.item(), rel=0.05, abs=1e-3)
