"""How DistillModel turns feature grids into the losses' inputs, checked against the method's recipe."""

from __future__ import annotations

import torch
from geod.stage2_distill import losses
from geod.stage2_distill.config import LossConfig, StudentConfig
from geod.stage2_distill.model import DistillModel, sample_grid
from geod.stage2_distill.students import create_student


def _model() -> DistillModel:
    torch.manual_seed(0)
    student = create_student(StudentConfig(name_or_path="tiny-clip", image_size=(32, 48)))
    cfg = StudentConfig(image_size=(32, 48), lora_layers=(2, 3), adapter_dim=8)
    model = DistillModel(student, cfg.resolved(student.num_layers, student.image_size))
    with torch.no_grad():  # a trained-looking refine head: cells of the matching grid get unequal norms
        model.refine.conv.weight.normal_(std=0.2)
        model.refine.conv.bias.normal_(std=0.5)
    return model.eval()


def _batch(pairs: int = 2, matches: int = 6) -> dict:
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(pairs, matches, 3, generator=generator) + torch.tensor([0.0, 0.0, 1.0])
    return {"pixel_a": torch.randn(pairs, 3, 32, 48, generator=generator),
            "pixel_b": torch.randn(pairs, 3, 32, 48, generator=generator),
            "xy_a": torch.rand(pairs, matches, 2, generator=generator),
            "xy_b": torch.rand(pairs, matches, 2, generator=generator),
            "mask": torch.ones(pairs, matches, dtype=torch.bool),
            "points_a": points, "points_b": points + 0.01, "depth_a": points[..., 2], "depth_b": points[..., 2],
            "scene_scale": torch.ones(pairs)}


def test_matching_features_are_sampled_from_the_refined_grid_then_normalised():
    # method.md: final-layer tokens -> refine conv -> bilinear sample at keypoints -> L2 normalise.
    model, batch = _model(), _batch()
    cfg = LossConfig(w_ap=1, w_depth=0, w_rank=0, w_kl=0, ap_temperature=0.1, neg_distance=0.1)
    with torch.no_grad():
        got = model(batch, cfg, (4, 6))["ap"]
        grid = model.features(torch.cat([batch["pixel_a"], batch["pixel_b"]]), depth=False, cost=False)["match"]

        def ap(grid_a, grid_b):
            fa = torch.nn.functional.normalize(sample_grid(grid_a, batch["xy_a"]), dim=-1)
            fb = torch.nn.functional.normalize(sample_grid(grid_b, batch["xy_b"]), dim=-1)
            return losses.smooth_ap_loss(fa, fb, batch["points_a"], batch["points_b"], batch["mask"],
                                         temperature=0.1, neg_distance=0.1)

        expected = ap(grid[:2], grid[2:])
        unit = torch.nn.functional.normalize(grid, dim=1)  # normalising before sampling is a different loss
        other = ap(unit[:2], unit[2:])
    assert torch.allclose(got, expected, atol=1e-7)
    assert not torch.allclose(got, other, atol=1e-5)
