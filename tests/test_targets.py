"""Target builders on hand-made teacher outputs: values, invariants, determinism, format conformity."""

from __future__ import annotations

import numpy as np
import pytest

from geod.pipeline.errors import ConfigError, TeacherError
from geod.pipeline.format_spec import FEATURES, PROB_SCALE
from geod.stage1_extract.cost_volume import (
    cost_volume_from_dense,
    cost_volume_from_flow,
    gaussian_rows,
    grid_centres,
    topk_quantize,
)
from geod.stage1_extract.targets import (
    TargetConfig,
    build_targets,
    downsample_depth,
    pair_rng,
    spread_select,
    window_mean,
    zero_targets,
)
from geod.stage1_extract.teacher import Matches, TeacherPrediction, create_teacher, teacher_names

SMALL = TargetConfig(max_matches=64, grid_h=6, grid_w=8, topk=5, depth_h=6, depth_w=8)


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:h, 0:w]
    return (xs + 0.5) / w, (ys + 0.5) / h


def shifted_prediction(h: int = 30, w: int = 40, shift_px: float = 4.0, depth: float = 2.0) -> TeacherPrediction:
    """A fronto-parallel plane seen by two cameras `shift_px` apart: B sees A's pixel x at x - shift_px."""
    u, v = _pixel_grid(h, w)
    flow_ab = np.stack([u - shift_px / w, v], axis=-1).astype(np.float32)
    flow_ab[flow_ab[..., 0] < 0] = np.nan
    flow_ba = np.stack([u + shift_px / w, v], axis=-1).astype(np.float32)
    flow_ba[flow_ba[..., 0] > 1] = np.nan
    depth_map = np.full((h, w), depth, np.float32)
    points = np.zeros((h, w, 3), np.float32)
    points[..., 0] = u * w
    points[..., 2] = depth
    return TeacherPrediction(depth_a=depth_map, depth_b=depth_map.copy(), conf_a=np.ones((h, w), np.float32),
                             conf_b=np.ones((h, w), np.float32), points_a=points, points_b=points.copy(),
                             flow_ab=flow_ab, flow_ba=flow_ba)


def test_pair_rng_depends_on_pair_and_seed_only():
    assert pair_rng("p1", 0).random() == pair_rng("p1", 0).random()
    assert pair_rng("p1", 0).random() != pair_rng("p2", 0).random()
    assert pair_rng("p1", 0).random() != pair_rng("p1", 1).random()


def test_spread_select_covers_every_region_evenly():
    rng = np.random.default_rng(0)
    xy = rng.random((20000, 2))
    chosen = spread_select(xy, 256, pair_rng("x"))
    assert len(chosen) == 256 and len(np.unique(chosen)) == 256
    assert np.all(np.diff(chosen) > 0)
    counts = np.histogram2d(xy[chosen, 0], xy[chosen, 1], bins=4, range=[[0, 1], [0, 1]])[0]
    # 16 points per quarter-by-quarter block when perfectly even; a uniform random draw would often stray
    # far further (its standard deviation is 4).
    assert counts.min() >= 13 and counts.max() <= 19
    np.testing.assert_array_equal(chosen, spread_select(xy, 256, pair_rng("x")))
    assert not np.array_equal(chosen, spread_select(xy, 256, pair_rng("y")))


def test_spread_select_spreads_inside_a_partial_region():
    rng = np.random.default_rng(1)
    xy = rng.random((8000, 2)) * [0.25, 1.0]  # only the left quarter has candidates
    chosen = spread_select(xy, 128, pair_rng("x"))
    counts = np.histogram2d(xy[chosen, 0], xy[chosen, 1], bins=(2, 8), range=[[0, 0.25], [0, 1]])[0]
    assert counts.min() >= 5  # 8 per cell when even: no cell of the covered strip is left empty


def test_spread_select_keeps_everything_when_few():
    xy = np.random.default_rng(0).random((10, 2))
    np.testing.assert_array_equal(spread_select(xy, 64, pair_rng("x")), np.arange(10))


def test_window_mean_averages_valid_neighbours_only():
    depth = np.array([[1.0, 2.0, 0.0], [4.0, 5.0, 6.0], [7.0, np.nan, 9.0]], np.float32)
    u = np.array([[0.5, 0.5], [1 / 6, 1 / 6], [5 / 6, 5 / 6]])  # centre, top-left, bottom-right pixel
    np.testing.assert_allclose(window_mean(depth, u), [(1 + 2 + 4 + 5 + 6 + 7 + 9) / 7, 3.0, 20 / 3], rtol=1e-6)
    assert window_mean(np.zeros((3, 3), np.float32), u[:1])[0] == 0.0


def test_downsample_depth_averages_valid_pixels_per_cell():
    depth = np.array([[1, 3, 0, 0], [1, 3, 8, 0], [2, 2, 5, 5], [2, 2, 5, 7]], np.float32)
    conf = (depth > 0).astype(np.float32)
    out, out_conf = downsample_depth(depth, conf, 2, 2)
    np.testing.assert_allclose(out, [[2.0, 8.0], [2.0, 5.5]])
    np.testing.assert_allclose(out_conf, [[1.0, 0.25], [1.0, 1.0]])
    empty, empty_conf = downsample_depth(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 2, 2)
    assert not empty.any() and not empty_conf.any()


def test_downsample_depth_upsamples_by_nearest_pixel():
    depth = np.array([[1, 2], [0, 4]], np.float32)
    out, conf = downsample_depth(depth, (depth > 0).astype(np.float32), 4, 4)
    np.testing.assert_array_equal(out, np.kron(depth, np.ones((2, 2))))
    np.testing.assert_array_equal(conf > 0, out > 0)


def test_topk_quantize_orders_and_bounds_rows():
    rows = np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0], [1.0, np.nan, 0, 0]])
    index, prob, valid = topk_quantize(rows, 2)
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_array_equal(index[0], [1, 3])
    np.testing.assert_array_equal(prob[0], [np.floor(0.4 * PROB_SCALE), np.floor(0.3 * PROB_SCALE)])
    np.testing.assert_array_equal(index[1], [0, 1])  # ties: lowest indices, in increasing order
    assert not index[2:].any() and not prob[2:].any()
    assert index.dtype == np.uint16 and prob.dtype == np.uint16


def test_topk_quantize_renormalises_and_never_exceeds_scale():
    rows = np.random.default_rng(0).random((50, 40)) * 7.0
    _, prob, valid = topk_quantize(rows, 40)
    assert valid.all() and np.all(prob.astype(np.int64).sum(axis=1) <= PROB_SCALE)
    assert np.all(prob.astype(np.int64).sum(axis=1) >= PROB_SCALE - 40)  # floor loses < 1 per entry
    assert np.all(np.diff(prob.astype(np.int64), axis=1) <= 0)


def test_gaussian_rows_peak_on_the_target_patch():
    u, v = grid_centres(6, 8)
    rows = gaussian_rows(np.stack([u, v], axis=1), 6, 8, 0.5)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)
    assert np.all(rows.argmax(axis=1) == np.arange(48))
    # An interior patch: exp(-2) on each side neighbour relative to the centre, separable.
    centre = 2 * 8 + 3
    assert rows[centre, centre + 1] / rows[centre, centre] == pytest.approx(np.exp(-2.0))
    assert rows[centre, centre + 8 + 1] / rows[centre, centre] == pytest.approx(np.exp(-4.0))


def test_gaussian_rows_stay_valid_for_a_narrow_sigma():
    # Regression: with sigma 0.005 patch every exp() of a target half-way between two patches underflowed
    # to 0, the normalisation gave NaN rows, and topk_quantize silently marked them invalid.
    between = np.array([[2.0 / 8, 1.0 / 6], [(3 + 0.5) / 8, (2 + 0.5) / 6]])  # a patch corner; a centre
    with np.errstate(invalid="raise", divide="raise"):
        rows = gaussian_rows(between, 6, 8, 0.005)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)
    # The corner target splits its mass over the four patches around it; the centre keeps all of it.
    np.testing.assert_allclose(rows[0, [8 * 0 + 1, 8 * 0 + 2, 8 * 1 + 1, 8 * 1 + 2]], 0.25)
    assert rows[1, 2 * 8 + 3] == pytest.approx(1.0)
    _, prob, valid = topk_quantize(rows, 4)
    assert valid.all() and prob[0].tolist() == [16383] * 4


def test_cost_volume_from_flow_follows_the_flow():
    pred = shifted_prediction(h=24, w=32, shift_px=4.0)  # 4 px = one patch of an 8-wide grid
    index, prob, valid = cost_volume_from_flow(pred.flow_ab, grid_h=6, grid_w=8, topk=5, sigma=0.5)
    cols = np.arange(48) % 8
    np.testing.assert_array_equal(valid, cols >= 1)
    np.testing.assert_array_equal(index[valid, 0], np.arange(48)[valid] - 1)
    assert not index[~valid].any() and not prob[~valid].any()
    dense = gaussian_rows(np.stack(grid_centres(6, 8), axis=1), 6, 8, 0.5)
    index2, _, valid2 = cost_volume_from_dense(dense, topk=5)
    assert valid2.all() and np.array_equal(index2[:, 0], np.arange(48))


def test_build_targets_matches_format_and_flow():
    cfg = SMALL
    pred = shifted_prediction()
    out = build_targets(pred, cfg, "pair-1")
    dims = cfg.dims()
    assert set(out) == {f.name for f in FEATURES}
    for feature in FEATURES:
        assert out[feature.name].dtype == np.dtype(feature.dtype), feature.name
        assert out[feature.name].shape == feature.resolved_shape(dims), feature.name
    n = int(out["match_count"])
    assert n == cfg.max_matches
    xy_a, xy_b = out["match_xy_a"], out["match_xy_b"]
    np.testing.assert_allclose((xy_a[:, 0] - xy_b[:, 0]) * 40, 4.0, atol=1e-4)
    np.testing.assert_allclose(xy_a[:, 1], xy_b[:, 1])
    np.testing.assert_allclose(out["match_depth_a"], 2.0)
    np.testing.assert_allclose(out["depth_a"], 2.0)
    np.testing.assert_allclose(out["depth_conf_a"], 1.0)
    assert np.all((xy_a >= 0) & (xy_a <= 1)) and np.all(out["match_conf"] == 1.0)
    again = build_targets(pred, cfg, "pair-1")
    assert all(np.array_equal(out[k], again[k]) for k in out)
    other = build_targets(pred, cfg, "pair-2")
    assert not np.array_equal(out["match_xy_a"], other["match_xy_a"])


def test_build_targets_pads_when_few_matches():
    pred = shifted_prediction(h=6, w=8, shift_px=2.0)
    cfg = TargetConfig(max_matches=64, grid_h=3, grid_w=4, topk=4, depth_h=3, depth_w=4)
    out = build_targets(pred, cfg, "p")
    n = int(out["match_count"])
    assert n == 6 * 6  # the two right-most columns of A fall outside B
    for name in ("match_xy_a", "match_xy_b", "match_conf", "match_depth_a", "match_points_b"):
        assert not out[name][n:].any()
        assert out[name][:n].any()


def test_build_targets_prefers_teacher_matches_and_dense_cost():
    pred = shifted_prediction()
    rng = np.random.default_rng(0)
    xy_a = rng.uniform(0.2, 0.8, (10, 2))
    xy_b = xy_a - [0.05, 0.0]
    conf = np.linspace(1, 2, 10)
    pred.matches = Matches(xy_a=xy_a.astype(np.float32), xy_b=xy_b.astype(np.float32), conf=conf.astype(np.float32))
    dense = np.full((48, 48), 1.0 / 48, np.float32)
    pred.cost_ab = dense
    out = build_targets(pred, SMALL, "p")
    assert int(out["match_count"]) == 10
    order = np.argsort(conf)  # conf is distinct per match: pair the stored rows with the given ones
    stored = np.argsort(out["match_conf"][:10])
    np.testing.assert_allclose(out["match_xy_a"][stored], xy_a[order], atol=1e-6)
    np.testing.assert_allclose(out["match_xy_b"][stored], xy_b[order], atol=1e-6)
    np.testing.assert_array_equal(np.sort(out["match_conf"][:10]), np.sort(conf.astype(np.float32)))
    assert out["cv_ab_valid"].all()
    np.testing.assert_array_equal(out["cv_ab_index"][0], np.arange(5))  # uniform row: lowest indices
    assert np.all(out["cv_ab_prob"] == np.floor(PROB_SCALE / 48))


def test_build_targets_rejects_broken_predictions():
    pred = shifted_prediction()
    pred.points_b = pred.points_b[:, :-1]
    with pytest.raises(TeacherError, match="points_b"):
        build_targets(pred, SMALL, "p")
    pred = shifted_prediction()
    pred.flow_ab = None
    with pytest.raises(TeacherError, match="neither matches nor flow_ab"):
        build_targets(pred, SMALL, "p")
    pred = shifted_prediction()
    pred.points_a[:] = np.nan
    with pytest.raises(TeacherError, match="non-finite"):
        build_targets(pred, SMALL, "p")


def test_zero_targets_and_config_validation():
    zeros = zero_targets(SMALL)
    assert all(not a.any() for a in zeros.values())
    with pytest.raises(ConfigError, match="topk"):
        TargetConfig(grid_h=2, grid_w=2, topk=5)
    with pytest.raises(ConfigError, match="cv_sigma"):
        TargetConfig(cv_sigma=0.0)


def test_teacher_registry():
    assert "geometry" in teacher_names()
    assert create_teacher("geometry").name == "geometry"
    with pytest.raises(TeacherError, match="unknown teacher 'nope'"):
        create_teacher("nope")
    with pytest.raises(TeacherError, match="bad options"):
        create_teacher("geometry", not_an_option=1)


def test_flow_is_read_at_the_exact_patch_centre_not_the_nearest_pixel():
    from geod.stage1_extract.cost_volume import sample_flow

    # An affine flow over a 4x6 map: the patch centre (0.5, 0.5) lies between pixels 2 and 3 of each axis.
    h, w = 4, 6
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    flow = np.stack([(xs + 0.5) / w * 0.5 + 0.1, (ys + 0.5) / h * 0.5 + 0.2], axis=-1).astype(np.float32)
    got = sample_flow(flow, np.array([0.5]), np.array([0.5]), max_spread=1.0)
    np.testing.assert_allclose(got[0], [0.5 * 0.5 + 0.1, 0.5 * 0.5 + 0.2], atol=1e-6)

    # Across an edge (neighbours far apart) or next to a hole, the nearest pixel is used, never a blend.
    edge = flow.copy()
    edge[:, 3:, 0] += 0.4
    got = sample_flow(edge, np.array([0.5]), np.array([0.5]), max_spread=0.05)
    np.testing.assert_allclose(got[0], edge[2, 3], atol=1e-6)
    hole = flow.copy()
    hole[1, 2] = np.nan
    got = sample_flow(hole, np.array([0.5]), np.array([0.5]), max_spread=1.0)
    np.testing.assert_allclose(got[0], hole[2, 3], atol=1e-6)


def _downsample_by_loops(depth, conf, out_h, out_w):
    """Reference: each cell's pixels gathered one by one (slow, obviously right)."""
    h, w = depth.shape
    out_d, out_c = np.zeros((out_h, out_w)), np.zeros((out_h, out_w))
    cells: dict = {}
    for y in range(h):
        for x in range(w):
            cells.setdefault((min(int((y + 0.5) / h * out_h), out_h - 1),
                              min(int((x + 0.5) / w * out_w), out_w - 1)), []).append((y, x))
    for (r, c), pixels in cells.items():
        good = [(y, x) for y, x in pixels if np.isfinite(depth[y, x]) and depth[y, x] > 0 and conf[y, x] > 0]
        out_d[r, c] = np.mean([depth[p] for p in good]) if good else 0.0
        out_c[r, c] = sum(float(conf[p]) for p in good) / len(pixels)
    for r in range(out_h):
        for c in range(out_w):
            if (r, c) not in cells:
                y, x = min(int((r + 0.5) / out_h * h), h - 1), min(int((c + 0.5) / out_w * w), w - 1)
                ok = np.isfinite(depth[y, x]) and depth[y, x] > 0 and conf[y, x] > 0
                out_d[r, c], out_c[r, c] = (depth[y, x], conf[y, x]) if ok else (0.0, 0.0)
    return out_d, out_c


@pytest.mark.parametrize("h, w, out_h, out_w", [(24, 32, 6, 8), (23, 37, 5, 7), (7, 9, 12, 4), (5, 5, 5, 5),
                                                (3, 40, 6, 9)])
def test_downsample_depth_matches_a_per_pixel_reference(h, w, out_h, out_w):
    rng = np.random.default_rng(h * 100 + w)
    depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
    depth[rng.random((h, w)) < 0.2] = 0.0
    depth[rng.random((h, w)) < 0.05] = np.nan
    conf = rng.uniform(0.0, 3.0, (h, w)).astype(np.float32)
    conf[rng.random((h, w)) < 0.1] = 0.0
    out, out_conf = downsample_depth(depth, conf, out_h, out_w)
    ref, ref_conf = _downsample_by_loops(depth, conf, out_h, out_w)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(out_conf, ref_conf, rtol=1e-6)
    np.testing.assert_array_equal(out > 0, out_conf > 0)
