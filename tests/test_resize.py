"""PIL's resize as torch operations: bit for bit PIL's output, for every filter, size pair and pass order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from geod.stage2_distill.resize import FILTERS, Resizer, taps
from PIL import Image


def _pil(image: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size[::-1], resample))


def _resized(resizer: Resizer, image: np.ndarray) -> np.ndarray:
    return resizer(torch.from_numpy(image).permute(2, 0, 1)[None].contiguous())[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("resample", sorted(FILTERS))
def test_resizer_equals_pil_bit_for_bit(resample):
    # Shrinking, enlarging, one axis only, and one axis each way (where Pillow versions differ in which pass
    # comes first), on noise, the hardest case for rounding.
    rng = np.random.default_rng(resample)
    cases = [((48, 64), (16, 24)), ((16, 24), (48, 64)), ((30, 20), (16, 24)), ((20, 30), (24, 16)),
             ((17, 41), (17, 13)), ((17, 41), (40, 41)), ((5, 7), (3, 2)), ((240, 320), (224, 224))]
    for source, size in cases:
        image = rng.integers(0, 256, (*source, 3), dtype=np.uint8)
        assert np.array_equal(_resized(Resizer(size, resample), image), _pil(image, size, resample)), (source, size)


def test_one_resizer_serves_several_input_sizes_and_keeps_a_plan_per_size():
    resizer = Resizer((16, 24), 3)
    rng = np.random.default_rng(0)
    for source in [(32, 48), (24, 20), (32, 48), (16, 24)]:
        image = rng.integers(0, 256, (*source, 3), dtype=np.uint8)
        assert np.array_equal(_resized(resizer, image), _pil(image, (16, 24), 3)), source
    assert len(resizer._plans) == 3


def test_taps_are_normalised_fixed_point_weights_within_the_input():
    for resample in FILTERS:
        for in_size, out_size in [(320, 224), (224, 320), (7, 7), (100, 3)]:
            index, weight = taps(in_size, out_size, resample)
            assert index.min() >= 0 and index.max() < in_size
            # each row's weights sum to one unit of PIL's 22-bit fixed point, up to the rounding of each tap
            assert np.all(np.abs(weight.sum(1) - (1 << 22)) <= weight.shape[1])


def test_resizer_refuses_nearest_and_other_inputs():
    with pytest.raises(ValueError, match="filter 0"):
        Resizer((16, 24), 0)
    with pytest.raises(ValueError, match="uint8"):
        Resizer((16, 24), 3)(torch.zeros(1, 3, 32, 48))
