"""Scoped control of TF32 for float32 matrix products and convolutions on CUDA.

PyTorch only offers process-wide switches, so this sets them for the duration of a block and restores
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
