"""The MASt3R teacher adapter on a tiny random network: contract, batching, resampling, targets."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from geod.data_manifests.views import PairData, ViewData
from geod.pipeline.errors import ConfigError, TeacherError
from geod.stage1_extract.mast3r.preprocess import working_size
from geod.stage1_extract.mast3r.teacher import Mast3rTeacher, resample_cost
from geod.stage1_extract.targets import TargetConfig, build_targets

# float32 on the CPU everywhere: these tests pin exact values and the CPU defaults (precision, heads)
OPTIONS = dict(weights="random", size="tiny", long_side=64, cost_grid=(3, 4), match_stride=4, device="cpu")


@pytest.fixture(scope="module")
def teacher():
    return Mast3rTeacher(**OPTIONS)


def make_pairs(sizes, seed=0):
    rng = np.random.default_rng(seed)

    def view(h, w):
        # smooth random images: neighbouring pixels alike, so descriptors are not pure noise
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        image = np.kron(small, np.ones((8, 8, 1)))[:h, :w]
        return ViewData(image=image.astype(np.uint8), image_sha256="0" * 64)

    return [PairData(row=types.SimpleNamespace(pair_id=f"pair-{i}"), view_a=view(*a), view_b=view(*b))
            for i, (a, b) in enumerate(sizes)]


def test_predictions_follow_the_contract(teacher):
    pairs = make_pairs([((60, 80), (60, 80)), ((60, 80), (80, 60)), ((90, 120), (60, 80))])
    preds = teacher.predict(pairs)
    assert len(preds) == 3
    shapes_b = [(48, 64), (64, 48), (48, 64)]
    for pred, shape_b in zip(preds, shapes_b):
        pred.check(n_patches=12)
        assert pred.depth_a.shape == (48, 64) and pred.depth_b.shape == shape_b
        assert pred.points_b.shape == (*shape_b, 3) and pred.points_b.dtype == np.float32
        assert (pred.depth_a >= 0).all() and (pred.conf_b >= 0).all()
        assert ((pred.conf_a == 0) == (pred.depth_a == 0)).all()
        m = pred.matches
        assert len(m.conf) > 0 and (m.conf >= 0).all()
        assert (m.xy_a > 0).all() and (m.xy_a < 1).all() and (m.xy_b > 0).all() and (m.xy_b < 1).all()
        np.testing.assert_allclose(pred.cost_ab.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(pred.cost_ba.sum(axis=1), 1.0, atol=1e-5)
    assert teacher.identity() == {"id": "random:tiny:seed0", "sha256": None}
    assert teacher.config()["match"]["stride"] == 4 and teacher.config()["precision"] == "fp32"
    assert teacher.config()["head_precision"] == "fp32"  # "auto" off CUDA


def test_batching_and_grouping_do_not_change_results(teacher):
    pairs = make_pairs([((60, 80), (60, 80)), ((80, 60), (60, 80)), ((60, 80), (60, 80))], seed=1)
    together = teacher.predict(pairs)
    alone = Mast3rTeacher(**OPTIONS, batch_size=1).predict(pairs)
    for a, b in zip(together, alone):
        for name in ("depth_a", "depth_b", "points_b", "cost_ab"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a.matches.xy_a, b.matches.xy_a)


def test_prepared_pairs_give_the_same_predictions(teacher):
    pairs = make_pairs([((90, 120), (60, 80)), ((60, 80), (80, 60))], seed=3)
    prepared = [teacher.prepare(pair) for pair in pairs]
    assert prepared[0].view_a.image.shape == (48, 64, 3) and pairs[0].view_a.image.shape == (90, 120, 3)
    for a, b in zip(teacher.predict(pairs), teacher.predict(prepared)):
        for name in ("depth_a", "depth_b", "conf_b", "points_b", "cost_ab", "cost_ba"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.matches.xy_b, b.matches.xy_b)


def test_targets_build_from_the_prediction(teacher):
    (pred,) = teacher.predict(make_pairs([((60, 80), (60, 80))], seed=2))
    cfg = TargetConfig(max_matches=16, grid_h=3, grid_w=4, topk=4, depth_h=6, depth_w=8)
    targets = build_targets(pred, cfg, "pair-0")
    assert 0 < targets["match_count"] <= 16
    assert targets["cv_ab_valid"].all() and targets["cv_ba_valid"].all()


def test_resample_cost():
    cost = torch.rand(2, 6, 6)
    torch.testing.assert_close(resample_cost(cost, (2, 3), (2, 3), (2, 3)), cost / cost.sum(-1, keepdim=True))
    # a distribution peaked on one patch stays peaked at the same place of the finer grid
    peaked = torch.zeros(1, 4, 4)
    peaked[0, :, 3] = 1.0                     # every query of a 2x2 grid points at key patch (1, 1)
    out = resample_cost(peaked, (2, 2), (2, 2), (4, 4)).reshape(16, 4, 4)
    torch.testing.assert_close(out.sum((1, 2)), torch.ones(16))
    assert (out[:, 2:, 2:].sum((1, 2)) > 0.7).all()


def test_working_size_and_options():
    assert working_size(480, 640) == (384, 512)
    assert working_size(968, 1296) == (384, 512)
    assert working_size(1296, 968) == (512, 384)
    assert working_size(10, 1000, long_side=64) == (16, 64)
    with pytest.raises(ConfigError, match="weights"):
        Mast3rTeacher(weights="")
    with pytest.raises(ConfigError, match="precision"):
        Mast3rTeacher(weights="random", size="tiny", precision="fp16")
    with pytest.raises(TypeError):
        Mast3rTeacher(weights="random", size="tiny", colour="blue")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            Mast3rTeacher(weights="random", size="tiny", device="cuda")


def test_device_topk_equals_the_builders_topk():
    from geod.stage1_extract.cost_volume import topk_quantize
    from geod.stage1_extract.mast3r.teacher import topk_quantize_torch

    rng = np.random.default_rng(4)
    rows = rng.uniform(0, 1, (2, 20, 20)) ** 4
    rows[0, 3] = 0.0                      # no mass: invalid
    rows[1, 5, 2] = -1e-3                 # negative: invalid
    rows[1, 7] = 1.0                      # all tied: lowest indices first
    rows = rows.astype(np.float32)
    index, prob, valid = (t.numpy() for t in topk_quantize_torch(torch.from_numpy(rows), 6))
    for b in range(2):
        want = topk_quantize(rows[b], 6)
        np.testing.assert_array_equal(index[b], want[0])
        np.testing.assert_array_equal(prob[b], want[1])
        np.testing.assert_array_equal(valid[b], want[2])


def test_teacher_topk_gives_the_same_targets_as_the_dense_rows(teacher):
    (pred,) = teacher.predict(make_pairs([((60, 80), (60, 80))], seed=5))
    assert pred.cost_ab_topk is None  # k 32 > 12 patches of the tiny grid: not computed
    small = Mast3rTeacher(**OPTIONS, cost_topk=4)
    (pred,) = small.predict(make_pairs([((60, 80), (60, 80))], seed=5))
    assert pred.cost_ab is None and pred.cost_ba is None  # reduced on the device: the dense rows stay there
    cfg = TargetConfig(max_matches=16, grid_h=3, grid_w=4, topk=4, depth_h=6, depth_w=8)
    with_top = build_targets(pred, cfg, "pair-0")
    (pred,) = Mast3rTeacher(**OPTIONS, cost_topk=None).predict(make_pairs([((60, 80), (60, 80))], seed=5))
    assert pred.cost_ab_topk is None and pred.cost_ab is not None
    dense = build_targets(pred, cfg, "pair-0")
    with pytest.raises(TeacherError, match="top-4 rows only"):
        build_targets(small.predict(make_pairs([((60, 80), (60, 80))], seed=5))[0],
                      TargetConfig(max_matches=16, grid_h=3, grid_w=4, topk=3, depth_h=6, depth_w=8), "pair-0")
    for name in with_top:
        np.testing.assert_array_equal(with_top[name], dense[name])
