"""The scoped CUDA backend switches set their flag inside the block only, and leave it alone off CUDA."""

from __future__ import annotations

import pytest
import torch
from geod.pipeline.precision import cudnn_autotune, tf32


def test_cudnn_autotune_sets_the_flag_inside_the_block_and_restores_it_after_an_error():
    before = torch.backends.cudnn.benchmark
    cuda = torch.device("cuda")  # only the device type is read: the switch is a flag
    with cudnn_autotune(cuda, not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    with pytest.raises(RuntimeError, match="inside"):
        with cudnn_autotune(cuda, not before):
            raise RuntimeError("inside")
    assert torch.backends.cudnn.benchmark is before
    with cudnn_autotune(torch.device("cpu"), not before):
        assert torch.backends.cudnn.benchmark is before


def test_tf32_sets_float32_products_inside_the_block_only():
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    with tf32(torch.device("cuda"), True):
        assert getattr(matmul, name) in ("tf32", True)
    with tf32(torch.device("cuda"), False):
        assert getattr(matmul, name) in ("ieee", False)
    assert getattr(matmul, name) == before
