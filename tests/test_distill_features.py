"""How DistillModel turns feature grids into the losses' inputs, checked against the method's recipe."""

from __future__ import annotations

import pytest
import torch
from geod.stage2_distill import losses
from geod.stage2_distill.config import LossConfig, StudentConfig
from geod.stage2_distill.model import DistillModel, cell_centres, resample_to_cells, sample_grid
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


def _previous_features(model: DistillModel, pixels: torch.Tensor) -> dict:
    """The recipe as first written: each block normed as a [B, D, h, w] grid, the grids stacked, then averaged."""
    student = model.student
    grids = student(pixels)

    def norm(index: int) -> torch.Tensor:
        channels_last = grids[index].permute(0, 2, 3, 1)
        module = student.base_model().get_submodule(student.final_norm_path)
        return module(channels_last).permute(0, 3, 1, 2)

    final = norm(model.cfg.match_layer)
    return {"match": final + model.refine.conv(final),
            "depth": torch.stack([norm(i) for i in model.cfg.depth_layers]).mean(0),
            "cost": torch.stack([norm(i) for i in model.cfg.cost_layers]).mean(0)}


@pytest.mark.parametrize("name, size", [("tiny-clip", (32, 48)), ("tiny-siglip", (32, 48)),
                                        ("tiny-timm", (32, 48)), ("tiny-qwen2_5_vl", (32, 48))])
def test_features_and_their_gradients_equal_the_first_recipe(name, size):
    if name == "tiny-timm":
        pytest.importorskip("timm")
    # The layer means and norms are laid out for speed (channels-last, one shared gradient for the mean); the
    # values and every trainable parameter's gradient must stay those of the straightforward computation.
    torch.manual_seed(0)
    student = create_student(StudentConfig(name_or_path=name, image_size=size))
    layers = student.num_layers
    cfg = StudentConfig(image_size=size, lora_layers=tuple(range(1, layers)), adapter_dim=8,
                        depth_layers=(1, 2), cost_layers=(0, 2, layers - 1))
    model = DistillModel(student, cfg.resolved(layers, student.image_size)).train()
    with torch.no_grad():  # trained-looking adapters, LoRA and refine head: none of them the identity
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.05)
    pixels = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(2))
    weights = {}

    def run(features) -> tuple[dict, dict]:
        model.zero_grad(set_to_none=True)
        feats = features()
        for key, value in feats.items():  # a loss that weighs every value differently
            weights.setdefault(key, torch.randn(value.shape, generator=torch.Generator().manual_seed(3)))
        sum((value * weights[key]).sum() for key, value in feats.items()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in feats.items()}, grads

    new_feats, new_grads = run(lambda: model.features(pixels))
    old_feats, old_grads = run(lambda: _previous_features(model, pixels))
    assert set(new_feats) == set(old_feats)
    for key in old_feats:
        assert torch.equal(new_feats[key], old_feats[key]), key
    assert set(new_grads) == set(old_grads) and len(new_grads) > 4
    for key in old_grads:
        # Gradients sum the same terms, accumulated in another order: equal up to float rounding.
        scale = old_grads[key].abs().max()
        assert (new_grads[key] - old_grads[key]).abs().max() <= 1e-5 * scale, key


@pytest.mark.parametrize("grid_hw", [(3, 5), (6, 9), (1, 4), (2, 1)])
def test_point_samples_equal_grid_sample_in_value_and_gradient(grid_hw):
    # sample_grid gathers four channels-last rows per point; its values and gradients must be those of
    # grid_sample (bilinear, align_corners=False, border padding) on the [B, D, h, w] grid, for points inside,
    # on the edges and outside, on grids of one row or column, given channels-last (the layers' layout).
    torch.manual_seed(4)
    values = torch.randn(2, *grid_hw, 5, dtype=torch.float64)
    xy = torch.rand(2, 40, 2, dtype=torch.float64) * 1.4 - 0.2
    xy[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5 / grid_hw[1], 0.5], [0.5, 1 - 0.5 / grid_hw[0]]])
    weights = torch.randn(2, 40, 5, dtype=torch.float64)

    def reference(grid: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.grid_sample(grid, (xy * 2 - 1)[:, :, None], mode="bilinear",
                                              padding_mode="border", align_corners=False)
        return out[..., 0].transpose(1, 2)

    results = []
    for sample in (lambda g: sample_grid(g, xy), reference):
        grid = values.clone().requires_grad_()
        out = sample(grid.permute(0, 3, 1, 2))
        (out * weights).sum().backward()
        results.append((out.detach(), grid.grad))
    (got, got_grad), (want, want_grad) = results
    assert got.shape == (2, 40, 5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("grid_hw", "cells"), [((14, 14), (24, 32)), ((3, 5), (2, 7)), ((1, 4), (3, 3)),
                                                 ((6, 9), (6, 9))])
def test_cell_resampling_equals_point_samples_at_cell_centres(grid_hw, cells):
    # The cost volume's cells are read through one fixed weight matrix; its values and gradients must be
    # sample_grid's at every cell centre (finer, coarser and equal cell grids, one-row student grids).
    torch.manual_seed(6)
    values = torch.randn(3, *grid_hw, 5, dtype=torch.float64)
    weights = torch.randn(3, cells[0] * cells[1], 5, dtype=torch.float64)
    centres = cell_centres(*cells).double()[None].expand(3, -1, -1)
    results = []
    for sample in (lambda g: resample_to_cells(g, cells), lambda g: sample_grid(g, centres)):
        grid = values.clone().requires_grad_()
        out = sample(grid.permute(0, 3, 1, 2))
        (out * weights).sum().backward()
        results.append((out.detach(), grid.grad))
    (got, got_grad), (want, want_grad) = results
    assert got.shape == (3, cells[0] * cells[1], 5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_the_student_reports_each_block_as_it_finishes_with_the_outputs_so_far():
    model = _model()
    pixels = torch.cat([_batch()["pixel_a"], _batch()["pixel_b"]])
    seen = []

    def after_block(index, so_far):
        seen.append((index, [grid.clone() for grid in so_far.grids()]))

    with torch.no_grad():
        blocks = model.student.run_blocks(pixels, after_block)
        grids = model.student(pixels)
    assert [index for index, _ in seen] == list(range(model.student.num_layers))
    for index, so_far in seen:  # what a caller sees mid-forward is what the forward returns
        assert len(so_far) == index + 1
        assert all(torch.equal(early, grids[i]) for i, early in enumerate(so_far))
    assert all(torch.equal(grid, want) for grid, want in zip(blocks.grids(), grids, strict=True))


def test_early_and_late_loss_parts_add_up_to_the_whole_section_in_value_and_gradient():
    # The split `forward` uses when it overlaps the early losses with the later blocks on CUDA.
    from distill_helpers import random_batch

    model = _model().train()
    batch = random_batch(2, 6, 24, 4, "cpu", seed=3)
    cfg = LossConfig(w_preserve=0.5)
    assert model._early_block(cfg) is None  # no side stream: one section

    def run(parts: tuple[str, ...]):
        model.zero_grad(set_to_none=True)
        pixels = torch.cat([batch["pixel_a"], batch["pixel_b"]])
        blocks, base = model.student.run_blocks(pixels), model._base(pixels, cfg)
        sections = [model.losses_of(blocks, base, batch, cfg, (4, 6), part) for part in parts]
        values = {name: sum(section[name] for section in sections) for name in sections[0]}
        values["total"].backward()
        return values, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = run(("all",))
    split, split_grads = run(("early", "late"))
    early, _ = run(("early",))
    assert early["ap"] == 0 and early["preserve"] == 0 and early["kl"] > 0 and early["rank"] > 0
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.allclose(split[name], whole[name], rtol=1e-6, atol=1e-7), name
    assert whole_grads.keys() == split_grads.keys()
    for name in whole_grads:
        assert torch.allclose(split_grads[name], whole_grads[name], rtol=1e-5, atol=1e-7), name


def test_early_losses_overlap_only_when_they_read_blocks_before_the_matching_block():
    model = _model()
    model.overlap_early_losses(object())  # only the decision is checked here; the streams need CUDA
    assert model.overlaps_losses
    layers = (model.cfg.depth_layers, model.cfg.cost_layers, model.cfg.match_layer)
    assert model._early_block(LossConfig()) == max(layers[0] + layers[1]) < layers[2]
    assert model._early_block(LossConfig(w_ap=0)) is None  # nothing runs after them
    assert model._early_block(LossConfig(w_depth=0, w_rank=0, w_kl=0)) is None  # no early losses
    late = _model()
    late.cfg.cost_layers = (late.cfg.match_layer,)  # a cost volume read from the last block cannot overlap it
    late.overlap_early_losses(object())
    assert late._early_block(LossConfig(w_depth=0, w_rank=0)) is None
    assert late._early_block(LossConfig(w_kl=0)) == max(late.cfg.depth_layers)
    model.overlap_early_losses(None)
    assert not model.overlaps_losses and model._early_block(LossConfig()) is None


def _section_gradients(model: DistillModel, batch: dict, cfg: LossConfig, as_grids: bool) -> tuple[dict, list]:
    """Loss values, and the gradient of the loss section alone on each block's tokens (the tokens are
    detached copies, so nothing flows back into the encoder), fed as tokens or as grids."""
    from geod.stage2_distill.students import BlockOutputs

    pixels = torch.cat([batch["pixel_a"], batch["pixel_b"]])
    with torch.no_grad():
        blocks = model.student.run_blocks(pixels)
    tokens = [t.detach().clone().requires_grad_() for t in blocks.tokens]
    # A to_grid that is no RasterGrid (as Qwen2.5-VL's): the section is handed grids.
    to_grid = (lambda t: blocks.to_grid(t)) if as_grids else blocks.to_grid
    parts = model.losses_of(BlockOutputs(tokens, to_grid), None, batch, cfg, (4, 6))
    parts["total"].backward()
    return {k: v.detach() for k, v in parts.items()}, [t.grad for t in tokens]


def test_sequence_tower_tokens_enter_the_section_whole_with_the_values_and_gradients_of_grids():
    from distill_helpers import random_batch

    model, batch = _model().train(), random_batch(2, 6, 24, 4, "cpu", seed=3)
    cfg = LossConfig(rank_points=4)
    as_tokens, token_grads = _section_gradients(model, batch, cfg, as_grids=False)
    as_grids, grid_grads = _section_gradients(model, batch, cfg, as_grids=True)
    assert as_tokens.keys() == as_grids.keys()
    for name in as_tokens:
        assert torch.allclose(as_tokens[name], as_grids[name], rtol=1e-6, atol=1e-7), name
    read = set(model.cfg.depth_layers) | set(model.cfg.cost_layers) | {model.cfg.match_layer}
    prefix = model.student.num_prefix_tokens
    assert prefix == 1  # tiny-clip's CLS token
    for index, (got, want) in enumerate(zip(token_grads, grid_grads, strict=True)):
        if index not in read:
            assert got is None and want is None, index
            continue
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8), index
        assert torch.count_nonzero(got[:, prefix:]) > 0 and torch.count_nonzero(got[:, :prefix]) == 0


def test_a_compiled_section_takes_each_steps_raster_layout_without_recompiling():
    from distill_helpers import random_batch
    from torch._dynamo.testing import CompileCounterWithBackend

    # Entries compiled by earlier tests for other models count towards the compiler's cache limit.
    torch._dynamo.reset()
    try:
        model, cfg = _model().train(), LossConfig(rank_points=4)
        counter = CompileCounterWithBackend("aot_eager")
        model.compile_sections(backend=counter, fullgraph=True)
        eager = _model().train()
        for seed in range(3):  # each forward prepares a new RasterGrid (an equal value)
            batch = random_batch(2, 6, 24, 4, "cpu", seed=seed)
            got = model(batch, cfg, (4, 6))
            want = eager(batch, cfg, (4, 6))
            assert torch.allclose(got["total"], want["total"], rtol=1e-5, atol=1e-7)
        frames = counter.frame_count
        assert 1 <= frames <= 1 + len(model.student.block_adapters)  # the section, and the adapters' residual
        model(random_batch(2, 6, 24, 4, "cpu", seed=9), cfg, (4, 6))
        assert counter.frame_count == frames
    finally:
        torch._dynamo.reset()
