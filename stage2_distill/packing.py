"""A training batch as two buffers, the form in which loader workers hand batches to the training process.

A collated batch holds sixteen tensors. Each tensor that leaves a worker process gets its own shared-memory
segment, a file descriptor sent over a socket and unpickled in the training process, a pinned copy and a
host-to-device copy. The unpickling is Python work under the GIL, done in the loader's pin-memory thread,
which competes with the thread launching the step's kernels. Packed, the fixed-size target arrays of a batch
travel as one uint8 buffer (each array at an aligned byte offset) and the images of both views as one pixel
tensor. The consumer copies the two buffers and takes typed views of them on the device; those views hold
bitwise the tensors of the collated batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

# Byte alignment of every array in the target buffer: a typed view needs its offset to be a multiple of its
# item size, and 64 also keeps each array on its own cache line.
ALIGN = 64
_TORCH_DTYPES = {"bool": torch.bool, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
                 "int64": torch.int64, "float16": torch.float16, "float32": torch.float32,
                 "float64": torch.float64}


@dataclass(frozen=True)
class PackedBatch:
    """One batch as a pixel tensor and a target buffer (see the module docstring).

    pixels: [2B, 3, H, W], the B images of view A then the B images of view B (uint8 or float32);
    targets: uint8 [bytes], the arrays listed in `fields`;
    fields: (key, numpy dtype name, shape, byte offset) of each target array, in the collated batch's order;
    pair_id: the B pair ids.
    """

    pixels: torch.Tensor
    targets: torch.Tensor
    fields: tuple[tuple[str, str, tuple[int, ...], int], ...]
    pair_id: list[str]

    def pin_memory(self) -> PackedBatch:
        """Both buffers in page-locked memory (what the DataLoader's pin-memory thread calls)."""
        return dataclasses.replace(self, pixels=self.pixels.pin_memory(), targets=self.targets.pin_memory())

    def unpack(self, device: torch.device | str, normalise=None) -> dict:
        """The collated batch on `device`: one asynchronous copy per buffer (from pinned memory), then views.

        normalise: applied once to the pixels of both views on the device (e.g. a uint8 lookup table), before
        they are split into pixel_a and pixel_b.
        """
        targets = self.targets.to(device, non_blocking=True)
        pixels = self.pixels.to(device, non_blocking=True)
        batch = {}
        for key, dtype_name, shape, offset in self.fields:
            size = math.prod(shape) * np.dtype(dtype_name).itemsize
            batch[key] = targets[offset:offset + size].view(_TORCH_DTYPES[dtype_name]).view(shape)
        if normalise is not None:
            pixels = normalise(pixels)
        half = pixels.shape[0] // 2
        batch["pixel_a"], batch["pixel_b"] = pixels[:half], pixels[half:]
        batch["pair_id"] = list(self.pair_id)
        return batch


def pack_batch(arrays: dict[str, np.ndarray], pixels: np.ndarray, pair_id: list[str]) -> PackedBatch:
    """Pack a batch's target arrays (any of the dtypes in _TORCH_DTYPES) and its stacked pixels [2B, 3, H, W]."""
    if pixels.ndim != 4 or pixels.shape[0] % 2:
        raise ValueError(f"pack_batch: pixels must be [2B, 3, H, W] (view A's then view B's), got {pixels.shape}")
    fields = []
    offset = 0
    for key, value in arrays.items():
        if value.dtype.name not in _TORCH_DTYPES:
            raise ValueError(f"pack_batch: {key} has dtype {value.dtype}, which has no place in a packed batch "
                             f"(supported: {', '.join(_TORCH_DTYPES)})")
        fields.append((key, value.dtype.name, tuple(int(n) for n in value.shape), offset))
        offset += -(-value.nbytes // ALIGN) * ALIGN
    buffer = np.zeros(offset, np.uint8)
    for (key, _, _, start), value in zip(fields, arrays.values()):
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        buffer[start:start + flat.size] = flat
    return PackedBatch(pixels=torch.from_numpy(np.ascontiguousarray(pixels)), targets=torch.from_numpy(buffer),
                       fields=tuple(fields), pair_id=list(pair_id))
