"""Transformer pieces of MASt3R: 2D rotary position embedding, attention, encoder and decoder blocks.

Module and parameter names follow the official checkpoint (`attn.qkv`, `cross_attn.projq`, `norm_y`, ...)
so that its state dict loads with strict matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("sdpa", "math")


class Rope:
    """2D rotary position embedding tables for a row-major patch grid, built once per forward.

    The first half of a head's channels is rotated by the patch row y, the second half by the column x,
    each half in the rotate-half convention (channel i pairs with i + quarter), positions from 0. Angles
    are computed in float32 as the official code does; the tables are float64 for float64 inputs (exact
    parity checks) and float32 otherwise.

    The rotation is written as x * cos + x[perm] * signed_sin (perm swaps the two quarters of each half,
    signed_sin carries the minus sign): two products and a gather, bit-identical to the rotate-half form.
    """

    def __init__(self, grid_h: int, grid_w: int, head_dim: int, base: float, *, device, dtype) -> None:
        half, quarter = head_dim // 2, head_dim // 4
        inv_freq = 1.0 / torch.pow(base, torch.arange(0, half, 2, device=device, dtype=torch.float32) / half)
        ys = torch.arange(grid_h, device=device, dtype=torch.float32).repeat_interleave(grid_w)
        xs = torch.arange(grid_w, device=device, dtype=torch.float32).repeat(grid_h)
        angle_y = ys[:, None] * inv_freq[None, :]
        angle_x = xs[:, None] * inv_freq[None, :]
        angles = torch.cat((angle_y, angle_y, angle_x, angle_x), dim=-1)
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        angles = angles.to(table_dtype)
        sign = torch.tensor([-1.0, 1.0, -1.0, 1.0], device=device, dtype=table_dtype).repeat_interleave(quarter)
        self.cos = angles.cos()                      # [N, head_dim]
        self.signed_sin = angles.sin() * sign
        idx = torch.arange(head_dim, device=device)
        self.perm = torch.where((idx % half) < quarter, idx + quarter, idx - quarter)

    def apply(self, tokens: torch.Tensor, token_axis: int) -> torch.Tensor:
        """Rotate tokens whose last axis is the head channel and whose `token_axis` indexes the N patches.

        Half-precision tokens are rotated in float32 and rounded once at the end (as the official CUDA
        kernel does), which keeps the positional phase exact in the bf16 path.
        """
        shape = [1] * tokens.ndim
        shape[token_axis], shape[-1] = self.cos.shape
        cos, sin = self.cos.view(shape), self.signed_sin.view(shape)
        work = tokens if tokens.dtype == cos.dtype else tokens.to(cos.dtype)
        out = torch.addcmul(work * cos, work[..., self.perm], sin)
        return out if out.dtype == tokens.dtype else out.to(tokens.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d]; "sdpa" uses the fused kernel, "math" the plain
    formula (a reference for parity checks)."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return weights.softmax(dim=-1) @ v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope, impl: str) -> torch.Tensor:
        batch, n, dim = x.shape
        qkv = self.qkv(x).view(batch, n, 3, self.num_heads, dim // self.num_heads)
        qk = rope.apply(qkv[:, :, :2], token_axis=1)  # q and k rotated together: one pass over memory
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        out = attend(q, k, v, impl)
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        return x.view(batch, n, self.num_heads, dim // self.num_heads)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rope_x: Rope, rope_m: Rope,
                impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the attended output and the rotated q [B, h, Nx, d] and k [B, h, Nm, d]: the cost
        volume needs exactly these, so it never asks for the attention matrix itself."""
        q = rope_x.apply(self._heads(self.projq(x)), token_axis=1).transpose(1, 2)
        k = rope_m.apply(self._heads(self.projk(memory)), token_axis=1).transpose(1, 2)
        out = attend(q, k, self._heads(self.projv(memory)).transpose(1, 2), impl)
        batch, n, dim = x.shape
        return self.proj(out.transpose(1, 2).reshape(batch, n, dim)), q, k


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: Rope, impl: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, impl)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, then cross-attention on the other view's previous-layer states, then MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, other: torch.Tensor, rope_x: Rope, rope_other: Rope,
                impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm1(x), rope_x, impl)
        memory = self.norm_y(other)
        attended, q, k = self.cross_attn(self.norm2(x), memory, rope_x, rope_other, impl)
        x = x + attended
        return x + self.mlp(self.norm3(x)), q, k
