"""The per-view output head of MASt3R ("catmlp+dpt"): DPT for 3D points + confidence, and an MLP on the
concatenated encoder and last decoder tokens for dense local descriptors (+ their confidence), unfolded
from patches to pixels by a pixel shuffle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.dpt import DPTHead
from geod.stage1_extract.mast3r.layers import Mlp


class Mast3rHead(nn.Module):
    """Official name: `downstream_head1` (view A) / `downstream_head2` (view B)."""

    def __init__(self, cfg: Mast3rConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.enc_embed_dim, cfg.dec_embed_dim
        self.dpt = DPTHead(token_dims=(enc, dec, dec, dec), layer_dims=cfg.dpt_layer_dims,
                           features=cfg.dpt_feature_dim, num_channels=4, hooks=cfg.dpt_hooks)
        idim = enc + dec
        self.head_local_features = Mlp(idim, int(cfg.local_hidden_factor * idim), cfg.local_out_dim)

    def forward(self, hooked: list[torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """hooked: tokens of [encoder output, and the decoder layers named by cfg.dpt_hooks[1:]] (the last
        one normalised). Returns pts3d [B,H,W,3], conf [B,H,W], desc [B,H,W,D], desc_conf [B,H,W]."""
        return postprocess(self.dpt(hooked, grid), self.local_raw(hooked, grid), self.cfg)

    def local_raw(self, hooked: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """The descriptor branch before its activations: [B, desc_dim + 1, H, W]."""
        local = self.head_local_features(torch.cat((hooked[0], hooked[-1]), dim=-1))  # [B, N, C p^2]
        batch = local.shape[0]
        local = local.transpose(1, 2).reshape(batch, -1, grid[0], grid[1])
        return F.pixel_shuffle(local, self.cfg.patch_size)                  # [B, C, H, W]


def _output_dtype(t: torch.Tensor) -> torch.dtype:
    """Activations are applied in float32 (float64 stays float64), whatever precision the head ran in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def postprocess_points(dense: torch.Tensor, cfg: Mast3rConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw DPT channels [B, 4, H, W] -> points = direction * expm1(norm) [B,H,W,3], conf = vmin + exp [B,H,W]."""
    dense = dense.to(_output_dtype(dense)).permute(0, 2, 3, 1)
    xyz = dense[..., :3]
    dist = xyz.norm(dim=-1, keepdim=True)
    pts3d = xyz / dist.clamp(min=1e-8) * torch.expm1(dist)
    conf = cfg.conf_vmin + dense[..., 3].exp()
    return pts3d, conf


def postprocess(dense: torch.Tensor, local: torch.Tensor, cfg: Mast3rConfig) -> dict[str, torch.Tensor]:
    """Raw head channels -> outputs: points = direction * expm1(norm); conf = vmin + exp; descriptors
    L2-normalised (no epsilon, as trained); descriptor confidence = vmin + exp (or conf when the checkpoint
    has a single confidence)."""
    pts3d, conf = postprocess_points(dense, cfg)
    local = local.to(_output_dtype(local)).permute(0, 2, 3, 1)
    desc = local[..., :cfg.desc_dim]
    desc = desc / desc.norm(dim=-1, keepdim=True)
    if cfg.two_confs:
        desc_conf = cfg.desc_conf_vmin + local[..., cfg.desc_dim].exp()
    else:
        desc_conf = conf.clone()
    return {"pts3d": pts3d, "conf": conf, "desc": desc, "desc_conf": desc_conf}
