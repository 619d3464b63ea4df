"""MASt3R network: official key list, RoPE convention, output invariants, cost volume, batching, precision."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from geod.pipeline.errors import TeacherError
from geod.stage1_extract.mast3r.checkpoint import canonicalise
from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.layers import CrossAttention, Rope
from geod.stage1_extract.mast3r.network import Mast3rNet, randomize_

OFFICIAL_KEYS = Path(__file__).resolve().parents[1] / "stage1_extract" / "mast3r" / "official_keys.json"


@pytest.fixture(scope="module")
def tiny():
    return randomize_(Mast3rNet(Mast3rConfig.tiny()), seed=1).eval()


@pytest.fixture(scope="module")
def tiny64(tiny):
    """float64 copy: equalities that only reorder arithmetic then hold to ~1e-12."""
    return copy.deepcopy(tiny).double()


def images(batch, h, w, seed, dtype=torch.float32):
    return (torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
            - 1).to(dtype)


def assert_same(got, want, names):
    for name in names:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-10, rtol=1e-10)


def test_full_size_state_dict_equals_the_official_key_list():
    official = json.loads(OFFICIAL_KEYS.read_text())
    with torch.device("meta"):
        model = Mast3rNet(Mast3rConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == official["keys"]
    assert sum(p.numel() for p in model.parameters()) == official["n_parameters"] == 688_638_856
    # every official alias folds onto a key of ours
    for alias, canonical in official["aliases"].items():
        t = torch.zeros(1)
        assert canonicalise({canonical: t, alias: t}, "x") == {canonical: t}
        assert canonical in ours
    # the committed constructor arguments translate to our default configuration
    kwargs = {k: [float(x) if x in ("inf", "-inf") else x for x in v] if isinstance(v, list) else v
              for k, v in official["constructor"].items()}
    assert Mast3rConfig.from_official_kwargs(kwargs).to_dict() == {**Mast3rConfig().to_dict(), "name": "official"}


def test_rope_rotates_halves_by_row_and_column():
    rope = Rope(2, 3, 4, 100.0, device="cpu", dtype=torch.float32)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 6, 4)
    out = rope.apply(t, token_axis=2)[0, 0]
    y, x = 1, 2  # token 5 of the 2x3 grid; head width 4 -> one frequency, 1 / 100^0 = 1
    expect = torch.tensor([1 * math.cos(y) - 2 * math.sin(y), 2 * math.cos(y) + 1 * math.sin(y),
                           3 * math.cos(x) - 4 * math.sin(x), 4 * math.cos(x) + 3 * math.sin(x)])
    torch.testing.assert_close(out[5], expect)
    # [B, N, heads, d] layout and half precision give the same rotation
    t2 = torch.randn(2, 6, 3, 4)
    swapped = rope.apply(t2.transpose(1, 2), token_axis=2).transpose(1, 2)
    torch.testing.assert_close(rope.apply(t2, token_axis=1), swapped)
    half = rope.apply(t2.bfloat16(), token_axis=1)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), rope.apply(t2.bfloat16().float(), token_axis=1), atol=2e-2, rtol=1e-2)


def test_rope_logits_depend_on_relative_position_only():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    rope = Rope(6, 6, 16, 100.0, device="cpu", dtype=torch.float64)
    rq, rk = rope.apply(q.expand(36, 16), token_axis=0), rope.apply(k.expand(36, 16), token_axis=0)

    def logit(pq, pk):
        return float((rq[pq[0] * 6 + pq[1]] * rk[pk[0] * 6 + pk[1]]).sum())

    # angles are float32 (as in the official code), hence the tolerance
    assert logit((0, 1), (2, 3)) == pytest.approx(logit((3, 2), (5, 4)), abs=1e-5)
    assert logit((0, 1), (2, 3)) != pytest.approx(logit((0, 1), (3, 2)), abs=1e-3)


def test_outputs_shapes_and_invariants(tiny):
    out = tiny(images(2, 32, 48, 0), images(2, 48, 32, 1), cost_temperature=0.5)
    assert out.pts3d_a.shape == (2, 32, 48, 3) and out.pts3d_b.shape == (2, 48, 32, 3)
    assert out.desc_a.shape == (2, 32, 48, 8) and out.desc_conf_b.shape == (2, 48, 32)
    torch.testing.assert_close(out.desc_a.norm(dim=-1), torch.ones(2, 32, 48))
    assert (out.conf_a >= 1).all() and (out.conf_b >= 1).all() and (out.desc_conf_a > 0).all()
    assert out.grid_a == (2, 3) and out.grid_b == (3, 2)
    assert out.cost_ab.shape == (2, 6, 6) and out.cost_ba.shape == (2, 6, 6)
    assert (out.cost_ab >= 0).all() and (out.cost_ab.sum(-1) <= 1 + 1e-6).all()


def test_cost_volume_equals_the_per_head_definition(tiny):
    """Capture every cross-attention's q and k and rebuild the cost volume the plain way (per-head logits
    averaged, symmetrised, softmax with temperature, sink column set to the map's minimum, layer mean)."""
    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append((out[1], out[2])))
             for m in tiny.modules() if isinstance(m, CrossAttention)]
    temperature = 0.3
    try:
        out = tiny(images(2, 32, 48, 2), images(2, 32, 32, 3), cost_temperature=temperature)
    finally:
        for h in hooks:
            h.remove()
    per_layer_ab, per_layer_ba = [], []
    for (q_a, k_b), (q_b, k_a) in zip(captured[0::2], captured[1::2]):
        scale = q_a.shape[-1] ** -0.5
        l_ab = (q_a @ k_b.transpose(-1, -2) * scale).mean(dim=1)
        l_ba = (q_b @ k_a.transpose(-1, -2) * scale).mean(dim=1)
        sym = (l_ab + l_ba.transpose(1, 2)) / 2
        for logits, sink in ((sym, per_layer_ab), (sym.transpose(1, 2), per_layer_ba)):
            p = (logits / temperature).softmax(-1)
            for b in range(len(p)):
                p[b, :, 0] = p[b].min()
            sink.append(p)
    torch.testing.assert_close(out.cost_ab, torch.stack(per_layer_ab).mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.cost_ba, torch.stack(per_layer_ba).mean(0), atol=1e-6, rtol=1e-5)
    assert len(captured) == 2 * tiny.cfg.dec_depth


def test_batch_equals_single_pairs_and_sdpa_equals_math(tiny64):
    a, b = images(3, 32, 48, 4, torch.float64), images(3, 32, 48, 5, torch.float64)
    batched = tiny64(a, b, cost_temperature=1.0)
    for i in range(3):
        single = tiny64(a[i:i + 1], b[i:i + 1], cost_temperature=1.0)
        for name in ("pts3d_a", "pts3d_b", "desc_b", "conf_b", "cost_ab"):
            torch.testing.assert_close(getattr(single, name)[0], getattr(batched, name)[i], atol=1e-10, rtol=1e-10)
    tiny64.attn_impl = "math"
    try:
        plain = tiny64(a, b, cost_temperature=1.0)
    finally:
        tiny64.attn_impl = "sdpa"
    assert_same(plain, batched, ("pts3d_a", "desc_a", "conf_b", "cost_ba"))


def test_symmetric_forward_equals_two_plain_passes(tiny64):
    a, b = images(2, 32, 48, 6, torch.float64), images(2, 48, 32, 7, torch.float64)
    first, second = tiny64.forward_symmetric(a, b, cost_temperature=1.0)
    fields = ("pts3d_a", "pts3d_b", "desc_a", "conf_b", "cost_ab", "cost_ba")
    assert_same(first, tiny64(a, b, cost_temperature=1.0), fields)
    assert_same(second, tiny64(b, a, cost_temperature=1.0), fields)
    same_a, same_b = images(2, 32, 48, 8, torch.float64), images(2, 32, 48, 9, torch.float64)
    first, second = tiny64.forward_symmetric(same_a, same_b)  # same grids: one batched decoder pass
    assert_same(second, tiny64(same_b, same_a), ("pts3d_a", "pts3d_b", "desc_b"))
    assert first.cost_ab is None


def test_bf16_autocast_keeps_heads_in_float32(tiny):
    a, b = images(2, 32, 48, 10), images(2, 32, 48, 11)
    ref = tiny(a, b, cost_temperature=1.0)
    fast = tiny(a, b, cost_temperature=1.0, amp_dtype=torch.bfloat16)
    assert fast.pts3d_a.dtype == torch.float32 and fast.cost_ab.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fast.desc_a, ref.desc_a, dim=-1)
    assert cos.mean() > 0.99
    assert (fast.cost_ab - ref.cost_ab).abs().max() < 0.05


def test_bad_inputs_are_named(tiny):
    with pytest.raises(TeacherError, match="multiples of 16"):
        tiny(images(1, 30, 48, 0), images(1, 32, 48, 0))
    with pytest.raises(TeacherError, match="img_b"):
        tiny(images(1, 32, 48, 0), torch.zeros(1, 32, 48))
    with pytest.raises(TeacherError, match="temperature"):
        tiny(images(1, 32, 48, 0), images(1, 32, 48, 0), cost_temperature=0.0)


@pytest.mark.parametrize("size_b", [(32, 48), (48, 32)])
def test_teacher_forward_equals_the_symmetric_forward(tiny64, size_b):
    a, b = images(2, 32, 48, 12, torch.float64), images(2, *size_b, 13, torch.float64)
    first, second = tiny64.forward_symmetric(a, b, cost_temperature=0.7)
    ab, own_pts_b, own_conf_b = tiny64.forward_teacher(a, b, cost_temperature=0.7)
    assert_same(first, ab, ("pts3d_a", "pts3d_b", "conf_a", "conf_b", "desc_a", "desc_b", "desc_conf_a",
                            "desc_conf_b", "cost_ab", "cost_ba"))
    assert torch.equal(own_pts_b, second.pts3d_a) and torch.equal(own_conf_b, second.conf_a)


def test_bf16_heads_stay_close_and_return_float32(tiny):
    a, b = images(2, 32, 48, 14), images(2, 32, 48, 15)
    ref = tiny(a, b, cost_temperature=1.0)
    fast = tiny(a, b, cost_temperature=1.0, amp_dtype=torch.bfloat16, head_precision="bf16")
    assert fast.pts3d_a.dtype == torch.float32 and fast.desc_a.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fast.desc_a, ref.desc_a, dim=-1)
    assert cos.mean() > 0.99
    with pytest.raises(TeacherError, match="head_precision"):
        tiny(a, b, head_precision="fp8")
