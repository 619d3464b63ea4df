"""Scoped control of CUDA backend switches: TF32 for float32 matrix products and convolutions, and cuDNN's
convolution autotuning.

PyTorch only offers process-wide switches, so these set them for the duration of a block and restore
them after (not thread-safe: the extraction runner calls the network from one thread, and `geod distill` runs
its steps from one thread). Uses the
`fp32_precision` settings where they exist (torch >= 2.9) and `allow_tf32` otherwise.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool):
    """float32 products (and convolutions) of the block use TF32 iff `enabled`; a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        targets = ((matmul, "fp32_precision"), (conv.conv, "fp32_precision"))
        value = "tf32" if enabled else "ieee"
    else:
        targets = ((matmul, "allow_tf32"), (conv, "allow_tf32"))
        value = enabled
    previous = [getattr(obj, name) for obj, name in targets]
    try:
        for obj, name in targets:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name), old in zip(targets, previous):
            setattr(obj, name, old)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device, enabled: bool):
    """cuDNN times its algorithms for each new convolution shape in the block and keeps the fastest
    (`torch.backends.cudnn.benchmark`) iff `enabled`; a no-op off CUDA. Worth it where the shapes repeat, as in a
    training loop of fixed-size batches; the first call of each shape pays for the timing."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
