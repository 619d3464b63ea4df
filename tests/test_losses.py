"""Each loss against a value computed by hand (plain Python floats) on a tiny input."""

from __future__ import annotations

import math

import pytest
import torch
from geod.stage2_distill import losses
from geod.stage2_distill.adapters import DepthHead


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_smooth_ap_matches_hand_computation():
    # Three real matches and one padded one; match 2's 3D point is within neg_distance of match 0's in B,
    # so (0, 2) and (2, 0) are not negatives.
    t = 0.5
    angles_a = [0.0, 1.0, 2.0]
    angles_b = [0.3, 1.2, 2.5]
    pts_a = [[0, 0, 1], [1, 0, 1], [0.05, 0, 1]]
    pts_b = [[0, 0, 1], [1, 0, 1], [0.05, 0, 1]]
    negative = {(0, 1), (1, 0), (1, 2), (2, 1)}

    def s(i, j):
        return math.cos(angles_a[i] - angles_b[j])

    def sig(x):
        return sigmoid(x / t)

    expected = 0.0
    for i in range(3):
        top1 = 1 + sig(s(i, i) - 1)
        ap1 = top1 / (top1 + sum(sig(s(i, j) - 1) for j in range(3) if (i, j) in negative))
        top2 = 1 + sig(1 - s(i, i))
        ap2 = top2 / (top2 + sum(sig(s(i, j) - s(i, i)) for j in range(3) if (i, j) in negative))
        expected += (1 - (ap1 + ap2) / 2) / 3

    fa = torch.tensor([[unit(a) for a in angles_a] + [unit(0.3)]], dtype=torch.float64)
    fb = torch.tensor([[unit(a) for a in angles_b] + [unit(0.3)]], dtype=torch.float64)
    pa = torch.tensor([pts_a + [[9, 9, 9]]], dtype=torch.float64)
    pb = torch.tensor([pts_b + [[5, 5, 5]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    value = losses.smooth_ap_loss(fa, fb, pa, pb, mask, temperature=t, neg_distance=0.1)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_smooth_ap_batch_is_mean_over_pairs_and_padding_is_ignored():
    torch.manual_seed(0)
    fa = torch.nn.functional.normalize(torch.randn(2, 5, 4), dim=-1)
    fb = torch.nn.functional.normalize(torch.randn(2, 5, 4), dim=-1)
    pa, pb = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    both = losses.smooth_ap_loss(fa, fb, pa, pb, mask, temperature=0.1)
    first = losses.smooth_ap_loss(fa[:1], fb[:1], pa[:1], pb[:1], mask[:1], temperature=0.1)
    second = losses.smooth_ap_loss(fa[1:, :3], fb[1:, :3], pa[1:, :3], pb[1:, :3], mask[1:, :3], temperature=0.1)
    assert both.item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-6)


def _tiny_head() -> DepthHead:
    # D = 2, hidden = 2: proj = identity without bias, LayerNorm(2) plain, out picks the first unit.
    head = DepthHead(2, hidden=2).double()
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.copy_(torch.tensor([0.5, -0.25]))
        head.norm.weight.fill_(1.0)
        head.norm.bias.zero_()
        head.out.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.out.bias.fill_(0.1)
    return head


def head_by_hand(x: list[float]) -> float:
    z = [x[0] + 0.5, x[1] - 0.25]
    mean = (z[0] + z[1]) / 2
    var = ((z[0] - mean) ** 2 + (z[1] - mean) ** 2) / 2
    normed = [(v - mean) / math.sqrt(var + 1e-5) for v in z]
    return math.tanh(gelu(normed[0]) + 0.1)


def test_cross_view_depth_matches_hand_computation():
    fa = [[1.0, 2.0], [0.5, -1.0], [3.0, 3.0]]
    fb = [[0.0, 1.5], [1.5, 0.0], [0.0, 0.0]]
    da, db = [1.0, 2.0, 5.0], [1.5, 1.0, 1.0]
    mask = [True, True, False]
    terms = [abs(head_by_hand([fa[i][0] - fb[i][0], fa[i][1] - fb[i][1]]) - math.tanh(da[i] - db[i]))
             for i in range(2)]
    expected = sum(terms) / 2
    value = losses.cross_view_depth_loss(_tiny_head(), torch.tensor([fa], dtype=torch.float64),
                                         torch.tensor([fb], dtype=torch.float64), torch.tensor([da]),
                                         torch.tensor([db]), torch.tensor([mask]))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_ranking_matches_hand_computation():
    f = [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.5], [0.3, 0.3]]
    d = [1.0, 1.2, 1.03, 0.5]
    mask = [True, True, True, False]  # the fourth point is padding
    terms = []
    for i in range(3):
        for j in range(3):
            gap = d[j] - d[i]
            if abs(gap) > 0.05:  # (0, 2) and (2, 0) are too close in depth
                h = head_by_hand([f[j][0] - f[i][0], f[j][1] - f[i][1]])
                terms.append(math.log(1 + math.exp(-math.copysign(1.0, gap) * h)))
    assert len(terms) == 4
    value = losses.ranking_loss(_tiny_head(), torch.tensor([f], dtype=torch.float64), torch.tensor([d]),
                                torch.tensor([mask]), min_gap=0.05)
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_depth_head_equals_its_layers_in_sequence_in_value_and_gradient():
    # The output unit is computed as a weighted sum (fused by the compiler); it must be the method's
    # Linear(D, H) - LayerNorm - GELU - Linear(H, 1) - tanh, parameters' gradients included.
    torch.manual_seed(3)
    head = DepthHead(12, hidden=16).double()
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    weights = torch.randn(3, 5, dtype=torch.float64)
    layers = [head.proj, head.norm, torch.nn.GELU(), head.out, torch.nn.Tanh()]
    results = []
    for run in (head, lambda v: torch.nn.Sequential(*layers)(v).squeeze(-1)):
        head.zero_grad()
        out = run(x)
        (out * weights).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in head.parameters()]))
    (got, got_grads), (want, want_grads) = results
    assert got.shape == (3, 5)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-12)


def test_projected_ranking_equals_unprojected_in_value_and_gradient():
    torch.manual_seed(1)
    head = DepthHead(48, hidden=128).double()
    for parameter in head.parameters():  # non-trivial LayerNorm affine too
        torch.nn.init.normal_(parameter, std=0.3)
    features = torch.randn(3, 9, 48, dtype=torch.float64)
    depth = torch.rand(3, 9, dtype=torch.float64) * 2
    mask = torch.rand(3, 9) > 0.2
    mask[1] = False  # an image without pairs
    features.requires_grad_()
    inputs = [features, *head.parameters()]
    projected = losses.ranking_loss(head, features, depth, mask, min_gap=0.05)
    grads = torch.autograd.grad(projected * 1.7, inputs)

    # Direct form, through autograd: the head applied to every N x N x D feature difference.
    diff = features[:, None, :, :] - features[:, :, None, :]  # [b, i, j] = f_j - f_i
    score = head(diff)
    gap = depth[:, None, :] - depth[:, :, None]
    keep = (gap.abs() > 0.05) & mask[:, :, None] & mask[:, None, :]
    per_pair = [torch.nn.functional.softplus(-torch.sign(gap[b]) * score[b])[keep[b]].mean() for b in (0, 2)]
    direct = torch.stack(per_pair).mean()
    want = torch.autograd.grad(direct * 1.7, inputs)
    assert projected.item() == pytest.approx(direct.item(), rel=1e-10, abs=1e-12)
    for name, got, expected in zip(["features", *(n for n, _ in head.named_parameters())], grads, want):
        assert expected.abs().max() > 0, name
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), name


def test_cost_volume_kl_matches_hand_computation():
    # Two cells per view; teacher row 0 of A keeps cells (1, 0) of B with stored mass 0.6 + 0.2 (the rest
    # was cut by top-k): renormalised to 0.75, 0.25. Row 1 is invalid.
    t = 0.5
    a = [unit(0.0), unit(1.0)]
    b = [unit(0.4), unit(2.0)]
    logits = [math.cos(0.0 - 0.4) / t, math.cos(0.0 - 2.0) / t]
    norm = math.log(math.exp(logits[0]) + math.exp(logits[1]))
    log_s = [v - norm for v in logits]
    expected = 0.75 * (math.log(0.75) - log_s[1]) + 0.25 * (math.log(0.25) - log_s[0])

    cells_a = torch.tensor([a], dtype=torch.float64)
    cells_b = torch.tensor([b], dtype=torch.float64)
    index = torch.tensor([[[1, 0], [0, 1]]])
    prob = torch.tensor([[[0.6, 0.2], [0.9, 0.1]]], dtype=torch.float64)
    valid = torch.tensor([[True, False]])
    value = losses.cost_volume_kl(cells_a, cells_b, index, prob, valid, temperature=t)
    assert value.item() == pytest.approx(expected, rel=1e-9)

    # A second pair with no valid row does not change the batch value; a zero-mass row is skipped.
    value2 = losses.cost_volume_kl(torch.cat([cells_a, cells_b]), torch.cat([cells_b, cells_a]),
                                   torch.cat([index, index]), torch.cat([prob, torch.zeros_like(prob)]),
                                   torch.tensor([[True, False], [True, True]]), temperature=t)
    assert value2.item() == pytest.approx(expected, rel=1e-9)


def test_two_way_kl_equals_two_one_way_calls_in_value_and_gradient():
    # Different numbers of cells per view (P_a != P_b), zero-mass and invalid rows, repeated indices.
    torch.manual_seed(5)
    cells_a = torch.nn.functional.normalize(torch.randn(3, 6, 5, dtype=torch.float64), dim=-1).requires_grad_()
    cells_b = torch.nn.functional.normalize(torch.randn(3, 4, 5, dtype=torch.float64), dim=-1).requires_grad_()
    ab = (torch.randint(0, 4, (3, 6, 3)), torch.rand(3, 6, 3, dtype=torch.float64), torch.rand(3, 6) > 0.3)
    ba = (torch.randint(0, 6, (3, 4, 3)), torch.rand(3, 4, 3, dtype=torch.float64), torch.rand(3, 4) > 0.3)
    ab[1][0, 2] = 0.0
    ba[2][1] = False  # pair 1 has no valid B->A row
    weights = torch.tensor([0.7, 1.3], dtype=torch.float64)

    reference = torch.stack([losses.cost_volume_kl(cells_a, cells_b, *ab, temperature=0.1),
                             losses.cost_volume_kl(cells_b, cells_a, *ba, temperature=0.1)])
    grads_ref = torch.autograd.grad((reference * weights).sum(), (cells_a, cells_b))
    fused = torch.stack(losses.two_way_cost_volume_kl(cells_a, cells_b, ab, ba, temperature=0.1))
    grads = torch.autograd.grad((fused * weights).sum(), (cells_a, cells_b))

    assert torch.allclose(fused, reference, rtol=1e-12, atol=1e-12)
    assert reference.min() > 0
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_kl_is_zero_when_student_equals_teacher():
    # Student with temperature t over cosines, teacher set to exactly that distribution (K = P).
    torch.manual_seed(2)
    cells_a = torch.nn.functional.normalize(torch.randn(1, 4, 3, dtype=torch.float64), dim=-1)
    cells_b = torch.nn.functional.normalize(torch.randn(1, 4, 3, dtype=torch.float64), dim=-1)
    student = torch.softmax(cells_a @ cells_b.transpose(1, 2) / 0.2, dim=-1)
    prob, index = student.sort(dim=-1, descending=True)
    value = losses.cost_volume_kl(cells_a, cells_b, index, prob, torch.ones(1, 4, dtype=torch.bool),
                                  temperature=0.2)
    assert abs(value.item()) < 1e-12


def test_empty_batch_gives_zero_with_gradient():
    features = torch.randn(2, 3, 4, requires_grad=True)
    head = DepthHead(4, hidden=8)
    value = losses.ranking_loss(head, features, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert features.grad is not None and torch.all(features.grad == 0)
