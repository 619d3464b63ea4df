"""The DPT head of MASt3R: four token maps -> a dense map at the input resolution.

Token maps (patch grid N = H/16 x W/16) are brought to 4 scales (x4, x2, x1, /2), projected to a common
width, fused coarse to fine by residual refinement blocks (each upsamples x2, bilinear, corners aligned)
and a final conv stack (with one more x2) gives `num_channels` channels at H x W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)


class _Upsample2x(nn.Module):
    """Parameter-free x2 bilinear upsampling with aligned corners (keeps the head's layer indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = _conv(features, features, 3)
        self.conv2 = _conv(features, features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The official activation is not in place: the skip adds x itself, not relu(x).
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = _conv(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Scratch(nn.Module):
    """Projections to the common width and the fusion blocks (official names `layerK_rn`, `refinenetK`)."""

    def __init__(self, layer_dims: tuple[int, ...], features: int) -> None:
        super().__init__()
        for i, dim in enumerate(layer_dims, start=1):
            setattr(self, f"layer{i}_rn", _conv(dim, features, 3, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(features))


class DPTHead(nn.Module):
    def __init__(self, *, token_dims: tuple[int, ...], layer_dims: tuple[int, ...], features: int,
                 num_channels: int, hooks: tuple[int, ...]) -> None:
        super().__init__()
        self.hooks = tuple(hooks)
        d0, d1, d2, d3 = layer_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(_conv(token_dims[0], d0, 1), nn.ConvTranspose2d(d0, d0, 4, stride=4)),
            nn.Sequential(_conv(token_dims[1], d1, 1), nn.ConvTranspose2d(d1, d1, 2, stride=2)),
            nn.Sequential(_conv(token_dims[2], d2, 1)),
            nn.Sequential(_conv(token_dims[3], d3, 1), _conv(d3, d3, 3, stride=2)),
        ])
        self.scratch = _Scratch(layer_dims, features)
        last = features // 2
        self.head = nn.Sequential(
            _conv(features, features // 2, 3), _Upsample2x(), _conv(features // 2, last, 3), nn.ReLU(),
            _conv(last, num_channels, 1),
        )

    def forward(self, tokens: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """tokens: the 4 hooked token maps [B, N, C_i] (N = grid_h * grid_w, row-major) -> [B, ch, H, W]."""
        # Some CUDA kernels (channels-last bilinear upsampling) index with 32-bit integers: split batches
        # whose largest map, [B, features / 2, H, W] at full resolution, would pass 2^31 elements.
        per_pair = self.head[0].out_channels * grid[0] * grid[1] * 16 ** 2
        step = max(1, (2 ** 31 - 1) // per_pair)
        if len(tokens[0]) > step:
            return torch.cat([self._forward([t[i:i + step] for t in tokens], grid)
                              for i in range(0, len(tokens[0]), step)])
        return self._forward(tokens, grid)

    def _forward(self, tokens: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        grid_h, grid_w = grid
        scratch = self.scratch
        maps = []
        for i, (tok, post) in enumerate(zip(tokens, self.act_postprocess)):
            x = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], grid_h, grid_w)
            maps.append(getattr(scratch, f"layer{i + 1}_rn")(post(x)))
        # The /2 map comes back x2 one row/column too large when the grid side is odd: crop it.
        path = scratch.refinenet4(maps[3])[:, :, :grid_h, :grid_w]
        path = scratch.refinenet3(path, maps[2])
        path = scratch.refinenet2(path, maps[1])
        path = scratch.refinenet1(path, maps[0])
        return self.head(path)
