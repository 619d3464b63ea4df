"""The batched reciprocal-NN matcher against a brute-force numpy implementation of the same semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geod.pipeline.errors import ConfigError
from geod.stage1_extract.mast3r.matching import MatchConfig, reciprocal_matches


def brute_force(desc_a, desc_b, conf_a, conf_b, *, stride, offset, max_iter, border, quantile):
    """One pair, plain numpy: full similarity matrix, per-seed chains, then the filters."""
    ha, wa, dim = desc_a.shape
    hb, wb, _ = desc_b.shape
    sim = desc_a.reshape(-1, dim).astype(np.float64) @ desc_b.reshape(-1, dim).astype(np.float64).T
    nn_ab, nn_ba = sim.argmax(axis=1), sim.argmax(axis=0)
    found = set()
    for y in range(offset, ha, stride):
        for x in range(offset, wa, stride):
            a, prev_b = y * wa + x, -1
            for _ in range(max_iter):
                b = nn_ab[a]
                if b == prev_b:
                    found.add((a, b))
                    break
                back = nn_ba[b]
                if back == a:
                    found.add((a, b))
                    break
                a, prev_b = back, b

    def inside(idx, h, w):
        return border <= idx % w < w - border and border <= idx // w < h - border

    def threshold(conf):
        values = np.sort(conf.ravel())
        return values[min(int(len(values) * quantile), len(values) - 1)]

    keep = []
    for a, b in sorted(found):
        if not (inside(a, ha, wa) and inside(b, hb, wb)):
            continue
        if quantile > 0 and (conf_a.ravel()[a] < threshold(conf_a) or conf_b.ravel()[b] < threshold(conf_b)):
            continue
        keep.append((a, b))
    return keep


def unit(rng, *shape):
    desc = rng.standard_normal(shape).astype(np.float32)
    return desc / np.linalg.norm(desc, axis=-1, keepdims=True)


def as_pairs(match):
    return list(zip(match.idx_a.tolist(), match.idx_b.tolist()))


@pytest.mark.parametrize("stride,offset,max_iter,border,quantile", [
    (4, 2, 10, 3, 0.1),
    (3, 0, 2, 0, 0.0),
    (5, 1, 10, 2, 0.3),
])
def test_matches_equal_brute_force(stride, offset, max_iter, border, quantile):
    rng = np.random.default_rng(stride)
    batch, (ha, wa), (hb, wb), dim = 3, (20, 28), (24, 18), 8
    desc_a, desc_b = unit(rng, batch, ha, wa, dim), unit(rng, batch, hb, wb, dim)
    conf_a = rng.uniform(1, 5, (batch, ha, wa)).astype(np.float32)
    conf_b = rng.uniform(1, 5, (batch, hb, wb)).astype(np.float32)
    cfg = MatchConfig(stride=stride, offset=offset, max_iter=max_iter, border=border, conf_quantile=quantile)
    got = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b), torch.from_numpy(conf_a),
                             torch.from_numpy(conf_b), cfg=cfg)
    assert len(got) == batch
    total = 0
    for i, match in enumerate(got):
        want = brute_force(desc_a[i], desc_b[i], conf_a[i], conf_b[i], stride=stride, offset=offset,
                           max_iter=max_iter, border=border, quantile=quantile)
        assert as_pairs(match) == want  # same set, same order (by A's index)
        np.testing.assert_array_equal(match.xy_a.numpy(), np.stack([match.idx_a % wa, match.idx_a // wa], 1))
        np.testing.assert_array_equal(match.xy_b.numpy(), np.stack([match.idx_b % wb, match.idx_b // wb], 1))
        total += len(want)
    assert total > 0


def test_dense_seeds_give_every_mutual_nearest_neighbour():
    rng = np.random.default_rng(7)
    desc_a, desc_b = unit(rng, 1, 12, 16, 6), unit(rng, 1, 14, 10, 6)
    sim = desc_a[0].reshape(-1, 6).astype(np.float64) @ desc_b[0].reshape(-1, 6).astype(np.float64).T
    mutual = [(a, b) for a, b in enumerate(sim.argmax(1)) if sim[:, b].argmax() == a]
    cfg = MatchConfig(stride=1, offset=0, max_iter=1, border=0, conf_quantile=0.0)
    (match,) = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b), cfg=cfg)
    assert as_pairs(match) == mutual


def test_planted_shift_is_recovered_and_blocking_changes_nothing():
    rng = np.random.default_rng(3)
    base = unit(rng, 2, 30, 40, 16)
    desc_a = base[:, 4:24, 5:33]                                # A sees a window of the scene ...
    desc_b = base[:, 6:26, 2:30] + 1e-3 * rng.standard_normal((2, 20, 28, 16)).astype(np.float32)
    shift = np.array([5 - 2, 4 - 6])                            # ... B the same scene moved by (x+3, y-2)
    cfg = MatchConfig(stride=4, border=3, conf_quantile=0.0)
    whole = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b), cfg=cfg)
    tiny_blocks = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b),
                                     cfg=MatchConfig(stride=4, border=3, conf_quantile=0.0, block_elems=37))
    for full, blocked in zip(whole, tiny_blocks):
        assert len(full.idx_a) > 10
        np.testing.assert_array_equal(full.xy_b.numpy() - full.xy_a.numpy(), np.broadcast_to(shift, full.xy_a.shape))
        assert torch.equal(full.idx_a, blocked.idx_a) and torch.equal(full.idx_b, blocked.idx_b)


def test_confidence_test_is_an_intersection():
    rng = np.random.default_rng(11)
    base = unit(rng, 1, 16, 16, 8)
    desc = torch.from_numpy(base)
    conf_a = torch.ones(1, 16, 16)
    conf_b = torch.ones(1, 16, 16)
    conf_a[0, :, :8] = torch.linspace(0.1, 0.5, 128).reshape(16, 8)
    conf_b[0, :8, :] = torch.linspace(0.1, 0.5, 128).reshape(8, 16)
    cfg = MatchConfig(stride=1, offset=0, border=0, conf_quantile=0.25)
    (match,) = reciprocal_matches(desc, desc, conf_a, conf_b, cfg=cfg)
    thr_a = torch.sort(conf_a.flatten()).values[64]
    thr_b = torch.sort(conf_b.flatten()).values[64]
    assert (conf_a.flatten()[match.idx_a] >= thr_a).all()
    assert (conf_b.flatten()[match.idx_b] >= thr_b).all()
    # identical descriptors: every pixel matches itself, so exactly the pixels passing both tests remain
    passing = (conf_a.flatten() >= thr_a) & (conf_b.flatten() >= thr_b)
    assert match.idx_a.tolist() == torch.nonzero(passing).flatten().tolist()
    assert torch.equal(match.idx_a, match.idx_b)


def test_float64_and_empty_cases():
    rng = np.random.default_rng(5)
    desc_a, desc_b = unit(rng, 2, 10, 12, 4).astype(np.float64), unit(rng, 2, 10, 12, 4).astype(np.float64)
    cfg = MatchConfig(stride=2, border=0, conf_quantile=0.0)
    got = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b), cfg=cfg)
    for i, match in enumerate(got):
        want = brute_force(desc_a[i], desc_b[i], None, None, stride=2, offset=1, max_iter=10, border=0,
                           quantile=0.0)
        assert as_pairs(match) == want
    empty = reciprocal_matches(torch.from_numpy(desc_a), torch.from_numpy(desc_b),
                               cfg=MatchConfig(stride=4, offset=50))
    assert [len(m.idx_a) for m in empty] == [0, 0]
    assert empty[0].xy_a.shape == (0, 2)


def test_config_validation():
    with pytest.raises(ConfigError, match="stride"):
        MatchConfig(stride=0)
    with pytest.raises(ConfigError, match="conf_quantile"):
        MatchConfig(conf_quantile=1.0)
    assert MatchConfig(stride=8).offset == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel runs on CUDA")
def test_fused_kernel_equals_the_blocked_products():
    pytest.importorskip("triton")
    rng = np.random.default_rng(13)
    base = unit(rng, 3, 40, 56, 24)
    desc_a = torch.from_numpy(base).cuda()
    desc_b = torch.from_numpy(np.roll(base, 3, axis=2) + 0.05 * unit(rng, 3, 40, 56, 24)).cuda()
    desc_b = desc_b / desc_b.norm(dim=-1, keepdim=True)
    desc_b[:, 5, 7] = desc_b[:, 5, 9]  # exact ties: the first index must win
    for stride in (1, 4):
        cfg = dict(stride=stride, border=0, conf_quantile=0.0)
        fused = reciprocal_matches(desc_a, desc_b, cfg=MatchConfig(kernel="triton", **cfg))
        plain = reciprocal_matches(desc_a, desc_b, cfg=MatchConfig(kernel="torch", **cfg))
        for f, p in zip(fused, plain):
            assert torch.equal(f.idx_a, p.idx_a) and torch.equal(f.idx_b, p.idx_b)


def test_kernel_option_is_validated():
    with pytest.raises(ConfigError, match="kernel"):
        MatchConfig(kernel="cuda")
