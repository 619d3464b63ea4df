"""PIL's resize of 8-bit images as torch operations on any device, bit for bit PIL's output.

PIL (`Image.resize` with a resampling filter) works in two separable passes and rounds to 8 bits after each.
Every output pixel of a pass is a weighted sum of input pixels under the filter, widened by the scale when
shrinking; the weights are normalised per output pixel and rounded to 22-bit fixed point, and the sum (plus
half a unit) is shifted back and clipped to 0-255. This module computes the same integer weights and the same
int32 sums, so its results equal PIL's exactly. It serves `run.device_resize`: the loader's workers then only
decode, and the GPU resizes each batch.

Which pass comes first has changed between Pillow versions, and the order changes the rounding. For each
pair of sizes the resizer therefore asks the installed PIL once: it resizes a random image of that size both
ways on the CPU and keeps the order whose result equals PIL's (and refuses the sizes if neither does).

NEAREST (filter 0) takes another path in PIL and is not reproduced here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 bits less 8 for the value and 2 for headroom
_HAMMING_A, _HAMMING_B = float(np.float32(0.54)), float(np.float32(0.46))  # single-precision constants in PIL


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# PIL's filter codes (Image.Resampling) -> (filter, support in input pixels at scale 1)
FILTERS: dict[int, tuple[Callable[[float], float], float]] = {
    1: (_lanczos, 3.0), 2: (_bilinear, 1.0), 3: (_bicubic, 2.0), 4: (_box, 0.5), 5: (_hamming, 1.0)}


def taps(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """The input positions [out_size, K] (int64) and fixed-point weights [out_size, K] (int32) of one pass from
    `in_size` to `out_size` pixels; unused taps point at a used position with weight 0."""
    if resample not in FILTERS:
        raise ValueError(f"no PIL-exact resize for filter {resample} (supported: {sorted(FILTERS)})")
    kernel, support = FILTERS[resample]
    scale = in_size / out_size
    widen = max(scale, 1.0)
    inverse = 1.0 / widen  # PIL multiplies by the inverse (rounding differs from a division)
    support *= widen
    width = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, width), np.int64)
    weight = np.zeros((out_size, width), np.int32)
    unit = 1 << PRECISION_BITS
    for out in range(out_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)  # int() truncates, as PIL's C cast does
        count = min(int(centre + support + 0.5), in_size) - first
        values = [kernel((i + first - centre + 0.5) * inverse) for i in range(count)]
        total = sum(values)
        for i, value in enumerate(values):
            value = value / total if total != 0.0 else value
            weight[out, i] = int(value * unit - 0.5) if value < 0 else int(value * unit + 0.5)
        index[out, :] = first
        index[out, :count] = np.arange(first, first + count)
    return index, weight


class Resizer:
    """PIL's resize of uint8 pixels [N, C, h, w] (torch, any device) to `size` = (H, W) with PIL filter
    `resample`. The plan of each input size (taps on the device, pass order) is made once; `compile` runs the
    passes through torch.compile, which turns each into one kernel (eager, each pass gathers its K taps as a
    tensor K times the size of its output first). Each input size is compiled once; past torch's recompile
    limit (8 by default) further sizes run eagerly, with the same results.
    """

    def __init__(self, size: tuple[int, int], resample: int, *, compile: bool = False) -> None:
        if resample not in FILTERS:
            raise ValueError(f"no PIL-exact resize for filter {resample} (supported: {sorted(FILTERS)})")
        self.size = (int(size[0]), int(size[1]))
        self.resample = resample
        self._plans: dict[tuple, tuple] = {}
        self._resize = torch.compile(_resize, dynamic=False) if compile else _resize

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.dim() != 4:
            raise ValueError(f"Resizer expects uint8 pixels [N, C, h, w], got {pixels.dtype} {tuple(pixels.shape)}")
        return self._resize(pixels, self._plan(*pixels.shape[-2:], pixels.device))

    def _plan(self, height: int, width: int, device: torch.device) -> tuple:
        """The passes ((vertical, index, weight), ...) from (height, width), in the installed PIL's order."""
        key = (height, width, str(device))
        if key not in self._plans:
            out_h, out_w = self.size
            passes = [(False, *taps(width, out_w, self.resample))] if width != out_w else []
            if height != out_h:
                passes.append((True, *taps(height, out_h, self.resample)))
            if len(passes) == 2:
                passes = self._pil_order(height, width, passes)
            self._plans[key] = tuple((vertical, torch.from_numpy(index).to(device),
                                      torch.from_numpy(weight).to(device)) for vertical, index, weight in passes)
        return self._plans[key]

    def _pil_order(self, height: int, width: int, passes: list) -> list:
        from PIL import Image

        probe = np.random.default_rng([height, width, *self.size]).integers(0, 256, (height, width), np.uint8)
        want = torch.from_numpy(np.array(Image.fromarray(probe).resize(self.size[::-1], self.resample)))
        for order in (passes, passes[::-1]):
            plan = tuple((vertical, torch.from_numpy(index), torch.from_numpy(weight))
                         for vertical, index, weight in order)
            if torch.equal(_resize(torch.from_numpy(probe)[None, None], plan)[0, 0], want):
                return order
        raise ValueError(f"cannot reproduce the installed PIL's resize from {height}x{width} to "
                         f"{self.size[0]}x{self.size[1]} (filter {self.resample}); resize on the host instead "
                         "(run.device_resize=false)")


def _resize(pixels: torch.Tensor, plan: tuple) -> torch.Tensor:
    """uint8 [..., h, w] through the passes of `plan` (see `Resizer._plan`), as uint8."""
    values = pixels.to(torch.int32)
    for vertical, index, weight in plan:
        values = _resample(values, index, weight, vertical)
    return values.to(torch.uint8)


def _resample(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, vertical: bool) -> torch.Tensor:
    """One PIL pass over int32 values in 0-255, along the rows (vertical) or the columns: each output is
    sum_k value[index[:, k]] * weight[:, k] plus half a unit, shifted back to 8 bits and clipped (PIL's
    clip8). Every sum fits in int32, as in PIL."""
    if vertical:
        total = (values[..., index, :] * weight[..., None]).sum(-2, dtype=torch.int32)  # gathers [..., H, K, w]
    else:
        total = (values[..., index] * weight).sum(-1, dtype=torch.int32)  # gathers [..., W, K]
    return ((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp(0, 255)
