"""Qwen2.5-VL's equal windows in one attention call: the same values and gradients as the tower's own code."""

from __future__ import annotations

import pytest
import torch
from geod.stage2_distill.config import StudentConfig
from geod.stage2_distill.qwen_windows import route_equal_windows
from geod.stage2_distill.students import create_student


def _students(size: tuple[int, int], device: str = "cpu"):
    """(routed, stock): the same seeded tiny Qwen2.5-VL, with and without the routing."""
    routed = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=size)).to(device)
    stock = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=size)).to(device)
    for block in stock.tower.blocks:
        del block.attn.forward  # back to the class's forward
    return routed, stock


def _run(student, pixels: torch.Tensor, weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    pixels = pixels.clone().requires_grad_()
    grids = student(pixels)
    sum((grid * weight).sum() for grid, weight in zip(grids, weights)).backward()
    return [grid.detach() for grid in grids], pixels.grad


@pytest.mark.parametrize("size, equal", [((64, 64), True), ((64, 96), True), ((32, 48), False)])
def test_routed_attention_equals_the_towers_own_in_value_and_gradient(size, equal, monkeypatch):
    # Tiny tower: 16-px merge units, 32-px windows, full attention in blocks 1 and 3. At 64x64 and 64x96 every
    # window has 2x2 units; at 32x48 each image has a 2x2 and a 2x1 window, which keep the tower's own code.
    routed, stock = _students(size)
    assert all("forward" in vars(block.attn) for block in routed.tower.blocks)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, *size, generator=generator)
    weights = [torch.randn(grid.shape, generator=generator) for grid in stock(pixels)]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0] * args[0].shape[2])  # sequences x length: the tokens of one call
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    got, got_grad = _run(routed, pixels, weights)
    routed_calls, calls[:] = list(calls), []
    want, want_grad = _run(stock, pixels, weights)
    stock_calls = list(calls)

    for x, y in zip(got, want):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    blocks = len(routed.tower.blocks)
    tokens = 3 * (size[0] // 8) * (size[1] // 8)
    if equal:  # one call per block, over all tokens, against one per window or image
        assert routed_calls == [tokens] * blocks and len(stock_calls) > blocks
    else:  # the full-attention blocks are batched, the windowed ones are not
        assert len(routed_calls) == len(stock_calls) - 2 * (3 - 1)


def test_routing_is_left_out_for_other_attention_and_applied_once():
    eager = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=(64, 64),
                                         attn_implementation="eager"))
    assert not any("forward" in vars(block.attn) for block in eager.tower.blocks)
    assert route_equal_windows(eager.tower) == 0
    routed = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=(64, 64)))
    assert route_equal_windows(routed.tower) == 0  # create_student routed every block already


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routed_attention_on_cuda_under_bf16_autocast_equals_the_towers_own():
    # On CUDA the one call and the per-window calls may pick different SDPA kernels: equal up to bf16 rounding.
    routed, stock = _students((64, 96), "cuda")
    pixels = torch.randn(4, 3, 64, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = routed(pixels), stock(pixels)
    for x, y in zip(got, want):
        scale = y.float().abs().max()
        assert (x.float() - y.float()).abs().max() <= 2e-2 * scale
