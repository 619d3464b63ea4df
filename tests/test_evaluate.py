"""Evaluation: the metric pieces on hand-made inputs, and `evaluate` on base and distilled students."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.pipeline.errors import ConfigError
from geod.stage2_distill.config import DataConfig, DistillConfig, EvalConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.evaluate import _predict_matches, draw_matches, evaluate, fit_depth_probe, order_accuracy
from geod.stage2_distill.train import run_distill
from PIL import Image


def test_match_prediction_is_the_best_cells_centre():
    grid = torch.eye(12).reshape(12, 3, 4)  # cell (r, c) holds one-hot r * 4 + c
    queries = torch.eye(12)[[6, 0, 11]]  # cells (1, 2), (0, 0), (2, 3)
    pred = _predict_matches(grid, queries, upsample=1)
    expected = torch.tensor([[2.5 / 4, 1.5 / 3], [0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]])
    assert torch.allclose(pred, expected)
    # Upsampled 2x, the prediction is one of the four sub-cells around the peak cell's centre.
    fine = _predict_matches(grid, queries[:1], upsample=2)[0]
    assert abs(fine[0] - 2.5 / 4) == pytest.approx(1 / 16) and abs(fine[1] - 1.5 / 3) == pytest.approx(1 / 12)


def test_order_accuracy_by_hand():
    depth = np.array([1.0, 2.0, 3.0, 3.02])
    score = np.array([0.1, 0.5, 0.3, 0.9])
    # pairs with a gap > 0.05 (scale 1): (0,1) ok, (0,2) ok, (0,3) ok, (1,2) wrong, (1,3) ok; (2,3) too close
    acc, total = order_accuracy([score], [depth], [1.0], 0.05)
    assert total == 5 and acc == pytest.approx(4 / 5)
    # the gap is scene-normalised: with scale 100 every gap is below 0.05
    assert order_accuracy([score], [depth], [100.0], 0.05)[1] == 0


def test_depth_probe_recovers_a_linear_code_up_to_per_image_offsets():
    rng = np.random.default_rng(0)
    features, depths = [], []
    for _ in range(6):
        depth = rng.uniform(1, 5, 30)
        noise = rng.normal(size=(30, 3))
        offset = rng.normal(size=4) * 10  # per-image offsets must not matter
        features.append(np.column_stack([np.log(depth), noise]) + offset)
        depths.append(depth)
    weights = fit_depth_probe(features[:3], depths[:3], ridge=1e-6)
    acc, total = order_accuracy([f @ weights for f in features[3:]], depths[3:], [1.0] * 3, 0.05)
    assert total > 1000 and acc == 1.0


def test_draw_matches_colours_right_and_wrong():
    a = np.zeros((20, 30, 3), np.uint8)
    b = np.zeros((20, 30, 3), np.uint8)
    image = draw_matches(a, b, np.array([[0.5, 0.5], [0.2, 0.2]]), np.array([[0.5, 0.5], [0.8, 0.9]]),
                         np.array([True, False]))
    pixels = np.asarray(image)
    assert image.size == (2 * 360, 240)
    assert ((pixels[..., 1] > 200) & (pixels[..., 0] < 100)).any()  # green line
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 100)).any()  # red line


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=40, val_every=4)


def test_evaluate_base_and_distilled_and_distillation_improves_pck(dataset, tmp_path):
    base = evaluate(EvalConfig(shards=str(dataset), student="tiny-clip", image_size=(32, 48), progress=False,
                               out=tmp_path / "base.json"))
    assert base["pairs"] == 10 and base["split"] == "val" and not base["distilled"]
    assert json.loads((tmp_path / "base.json").read_text()) == base
    for key in ("pck@0.05", "pck@0.10", "depth_order_acc"):
        assert 0.0 <= base[key] <= 1.0
    assert base["pck@0.05"] <= base["pck@0.10"]

    run = tmp_path / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=4, workers=0, max_matches=24),
        run=RunConfig(out=run, checkpoint_every=1000, log_every=10, progress=False),
        student=StudentConfig(image_size=(32, 48)), optim=OptimConfig(lr=2e-3, warmup_steps=5, max_steps=40)))
    tuned = evaluate(EvalConfig(shards=str(dataset), student=str(run), progress=False,
                                draw=tmp_path / "matches.png", draw_pairs=2))
    assert tuned["distilled"] and tuned["image_size"] == [32, 48] and 0 <= tuned["depth_order_head_acc"] <= 1
    # 40 steps on the shifted-texture pairs move correspondence clearly above the random base student.
    assert tuned["pck@0.05"] > base["pck@0.05"] + 0.1
    drawing = Image.open(tmp_path / "matches.png")
    assert drawing.size == (2 * 360, 2 * 240)
    # The last checkpoint holds the same weights as the final outputs.
    last = evaluate(EvalConfig(shards=str(dataset), student=str(run), checkpoint="40", progress=False))
    assert last["pck@0.05"] == tuned["pck@0.05"] and last["checkpoint"] == "40"

    # The run's saved base tower evaluates exactly like the base student it was built from.
    again = evaluate(EvalConfig(shards=str(dataset), student=str(run / "base"), image_size=(32, 48),
                                progress=False))
    assert {k: again[k] for k in ("pck@0.05", "pck@0.10", "depth_order_acc")} == \
           {k: base[k] for k in ("pck@0.05", "pck@0.10", "depth_order_acc")}
    with pytest.raises(ConfigError, match="image size it was trained at"):
        evaluate(EvalConfig(shards=str(dataset), student=str(run), image_size=(64, 64), progress=False))
