"""Source images -> MASt3R input tensors.

The official loader resizes the long side to 512 and then centre-crops each side to a multiple of 16.
Here the image is resized straight to the nearest multiple-of-16 size of the same aspect (e.g. 640x480 ->
512x384, 1296x968 -> 512x384) and never cropped: every output pixel then covers the whole source image,
so normalised coordinates mean the same in the teacher's maps and in the source image. The price is an
aspect change below half a patch (< 2 % at 512 px), which the official crop avoids.
"""

from __future__ import annotations

import numpy as np

from geod.pipeline.errors import TeacherError


def working_size(height: int, width: int, *, long_side: int = 512, multiple: int = 16) -> tuple[int, int]:
    """(h, w) at which the network sees an image of height x width: long side `long_side`, both sides
    rounded to multiples of `multiple` (at least one multiple)."""
    if height < 1 or width < 1:
        raise TeacherError(f"image of size {height}x{width} is empty")
    scale = long_side / max(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 -> size (h, w) uint8, Lanczos when shrinking, bicubic when enlarging (as official)."""
    from PIL import Image  # noqa: PLC0415

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise TeacherError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    h, w = size
    if (h, w) == image.shape[:2]:
        return image
    shrink = max(image.shape[:2]) > max(h, w)
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


def to_network_input(images: list[np.ndarray], mean, std, device=None):
    """Same-size uint8 images -> float32 tensor [B, 3, h, w] normalised as (x / 255 - mean) / std, on
    `device` (default CPU). The uint8 pixels travel (through pinned memory on CUDA) and are normalised
    there: the same correctly rounded operations in the same order, so the same values on every device."""
    return normalise_batch(host_batch(images, device), mean, std, device)


def host_batch(images: list[np.ndarray], device=None):
    """The host half of `to_network_input`: uint8 [B, h, w, 3], in pinned memory when `device` is CUDA
    (a caller driving the device from several threads does this outside its device lock)."""
    import torch  # noqa: PLC0415

    batch = torch.from_numpy(np.stack(images))
    if device is not None and torch.device(device).type == "cuda":
        batch = batch.pin_memory()
    return batch


def normalise_batch(batch, mean, std, device=None):
    """The device half of `to_network_input`: `host_batch`'s uint8 pixels -> normalised float32 [B, 3, h, w]."""
    import torch  # noqa: PLC0415

    if device is not None:
        batch = batch.to(device, non_blocking=batch.is_pinned())
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t
