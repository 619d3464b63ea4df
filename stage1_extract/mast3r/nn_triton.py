"""Exact float32 nearest neighbours by dot product on CUDA, fused in Triton (the matcher's hot loop).

The plain way forms every query's similarity row in memory and reduces it: for 768 seeds against a
512x384 image that is 150 M float32 values per pair and round, which makes matching memory-bound. Here
the row never leaves the chip, and the tensor cores do the bulk of the arithmetic in half precision
without giving up exactness:

1. pass 1 streams the database in tiles of `block_n` entries and stores, per query and tile, the maximum
   of the float16 products (float32 accumulation); their maximum over tiles is M ~ max_j <q, d_j>;
2. the float16 products differ from the float32 ones by at most `eps` (a bound from the rounding of q and
   d to float16 and the accumulation errors of both computations), so the exact winner j* satisfies
   approx(j*) >= exact(j*) - eps >= approx(j_M) - 2 eps = M - 2 eps: a tile whose stored maximum is below
   M - margin (margin > 2 eps) cannot hold it, nor any entry tied with it;
3. pass 2 reads the stored tile maxima and visits only the tiles that can hold a query's winner (a few
   of about 1,500 at 512x384), computing their float32 products (one FMA per channel in channel order,
   no TF32) and keeping the largest, the first index on ties. Every entry of a visited tile takes part:
   the winner and its ties are among them, so the result is the same.
The result equals an exact float32 argmax (up to the summation order of the 24-term products, as any two
float32 implementations do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from geod.pipeline.errors import TeacherError

_HALF_UNIT = 2.0 ** -11       # float16 unit roundoff
_F32_UNIT = 2.0 ** -24
_HALF_SUBNORMAL = 2.0 ** -25  # half the float16 subnormal spacing: absolute rounding error near 0
_TILE_MAX_BYTES = 1 << 29     # bound on pass 1's per-tile maxima: queries are taken in chunks beyond it


@triton.jit
def _tile_max_kernel(q_ptr, db_ptr, tile_ptr, active_ptr, n_q, n_db, n_tiles, stride_qb, stride_dbb,
                     tiles_per_split, DP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)  # this program's tiles: [split * tiles_per_split, + tiles_per_split)
    if pid_q * BLOCK_Q >= tl.load(active_ptr + b):  # only inactive queries here: nothing to do
        return
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, DP)
    q = tl.load(q_ptr + b * stride_qb + rows[:, None] * DP + dims[None, :], mask=rows[:, None] < n_q, other=0.0)
    for i in range(0, tiles_per_split):  # the last split may run past the database: masked
        t = split * tiles_per_split + i
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.load(db_ptr + b * stride_dbb + cols[:, None] * DP + dims[None, :], mask=cols[:, None] < n_db,
                    other=0.0)
        s = tl.dot(q, tl.trans(d))
        s = tl.where(cols[None, :] < n_db, s, float("-inf"))
        # layout [B, tiles, queries]: a program's stores are contiguous
        tl.store(tile_ptr + (b * n_tiles + t) * n_q + rows, tl.max(s, axis=1), mask=(rows < n_q) & (t < n_tiles))


@triton.jit
def _exact_argmax_kernel(q32_ptr, db32_ptr, tile_ptr, thr_ptr, active_ptr, val_ptr, idx_ptr, n_q, n_db, n_tiles,
                         stride_qb, stride_dbb, tiles_per_split, n_batch, DIM: tl.constexpr, DP: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_q = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    if pid_q * BLOCK_Q >= tl.load(active_ptr + b):  # its outputs keep their initial values (ignored)
        return
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    thr = tl.load(thr_ptr + b * n_q + rows, mask=rows < n_q, other=float("inf"))
    best = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_Q,), tl.int32)
    for i in range(0, tiles_per_split):
        t = split * tiles_per_split + i
        tile_max = tl.load(tile_ptr + (b * n_tiles + t) * n_q + rows, mask=(rows < n_q) & (t < n_tiles),
                           other=float("-inf"))
        if tl.max((tile_max >= thr).to(tl.int32)) > 0:  # rare: only tiles near a query's best match
            cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
            # float32 products summed in a fixed order (channel 0 first, one FMA per channel), so a
            # value does not depend on where its entry falls in a tile
            exact = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
            for k in range(DIM):
                qk = tl.load(q32_ptr + b * stride_qb + rows * DP + k, mask=rows < n_q, other=0.0)
                dk = tl.load(db32_ptr + b * stride_dbb + cols * DP + k, mask=cols < n_db, other=0.0)
                exact = tl.fma(qk[:, None], dk[None, :], exact)
            exact = tl.where(cols[None, :] < n_db, exact, float("-inf"))
            tile_best = tl.max(exact, axis=1)
            tile_idx = tl.argmax(exact, axis=1, tie_break_left=True).to(tl.int32) + t * BLOCK_N
            better = tile_best > best  # strict: an equal value in a later tile keeps the first index
            best = tl.where(better, tile_best, best)
            best_idx = tl.where(better, tile_idx, best_idx)
    out = (split * n_batch + b) * n_q + rows
    tl.store(val_ptr + out, best, mask=rows < n_q)
    tl.store(idx_ptr + out, best_idx, mask=rows < n_q)


def padded_dim(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


class TritonNN:
    """Nearest neighbours of queries in one database per pair. Built once per database (the padded float16
    and float32 copies and the largest row norms), queried every round."""

    def __init__(self, db: torch.Tensor, *, block_q: int = 64, block_n: int = 128) -> None:
        if db.dtype != torch.float32 or not db.is_cuda and not _interpreting():
            raise TeacherError("the fused nearest-neighbour kernel needs float32 CUDA tensors")
        self.batch, self.n_db, self.dim = db.shape
        self.dp = padded_dim(self.dim)
        self.db32 = _pad(db, self.dp, torch.float32)
        self.db16 = self.db32.to(torch.float16)
        norms = db.norm(dim=-1)
        self.db_norm = norms.amax(dim=1)                                   # [B]
        self.db_l1 = db.abs().sum(dim=-1).amax(dim=1)                      # [B]
        self.block_q, self.block_n = block_q, block_n

    def margin(self, queries: torch.Tensor) -> torch.Tensor:
        """2 x the bound on |float16 product - float32 product| for each query, with a 1 % safety factor."""
        dim = self.dim
        rel = 2 * _HALF_UNIT + _HALF_UNIT ** 2 + 2 * (dim + 1) * _F32_UNIT * (1 + 2 * _HALF_UNIT)
        q_norm, q_l1 = queries.norm(dim=-1), queries.abs().sum(dim=-1)
        eps = rel * q_norm * self.db_norm[:, None] + _HALF_SUBNORMAL * (q_l1 + self.db_l1[:, None]) * 1.01
        return 2.02 * eps + 1e-30

    def argmax(self, queries: torch.Tensor, n_active: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] int64 index of the largest float32 dot product in the database (first index on ties) of
        each query of [B, S, D] float32 `queries`. With `n_active` (int32 [B], on the device), only the first
        n_active[b] queries of row b are searched: the others get an arbitrary index, and no host sync is
        needed to size the launch (the matcher's iteration runs without any)."""
        batch, n_q, _ = queries.shape
        if n_q == 0:
            return torch.zeros(batch, 0, dtype=torch.int64, device=queries.device)
        if n_active is None:
            n_active = torch.full((batch,), n_q, dtype=torch.int32, device=queries.device)
        n_tiles = triton.cdiv(self.n_db, self.block_n)
        chunk = max(self.block_q, _TILE_MAX_BYTES // (4 * batch * n_tiles) // self.block_q * self.block_q)
        if n_q > chunk:
            return torch.cat([self.argmax(queries[:, start:start + chunk], (n_active - start).clamp(min=0))
                              for start in range(0, n_q, chunk)], 1)
        q32 = _pad(queries, self.dp, torch.float32)
        q16 = q32.to(torch.float16)
        grid_q = triton.cdiv(n_q, self.block_q)
        # Late rounds have few unconverged queries: split the database across programs as well, so that
        # the GPU stays full (about 4 programs per multiprocessor), then reduce over the splits.
        splits = max(1, min(n_tiles, -(-4 * _multiprocessors(queries.device) // (grid_q * batch))))
        tiles_per_split = triton.cdiv(n_tiles, splits)
        splits = triton.cdiv(n_tiles, tiles_per_split)
        grid = (grid_q, batch, splits)
        tile_max = torch.empty(batch, n_tiles, n_q, dtype=torch.float32, device=queries.device)
        n_active = n_active.to(torch.int32).contiguous()
        _tile_max_kernel[grid](q16, self.db16, tile_max, n_active, n_q, self.n_db, n_tiles, n_q * self.dp,
                               self.n_db * self.dp, tiles_per_split, DP=self.dp, BLOCK_Q=self.block_q,
                               BLOCK_N=self.block_n)
        threshold = tile_max.amax(dim=1) - self.margin(queries)
        vals = torch.zeros(splits, batch, n_q, dtype=torch.float32, device=queries.device)
        idx = torch.zeros(splits, batch, n_q, dtype=torch.int32, device=queries.device)
        _exact_argmax_kernel[grid](q32, self.db32, tile_max, threshold, n_active, vals, idx, n_q, self.n_db, n_tiles,
                                   n_q * self.dp, self.n_db * self.dp, tiles_per_split, batch, DIM=self.dim,
                                   DP=self.dp, BLOCK_Q=self.block_q, BLOCK_N=self.block_n)
        if splits == 1:
            return idx[0].to(torch.int64)
        # the best value; on ties the first split (lower indices), as one sequential scan would keep
        first = (vals == vals.amax(dim=0, keepdim=True)).to(torch.int8).argmax(dim=0, keepdim=True)
        return idx.gather(0, first)[0].to(torch.int64)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pad(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros(*t.shape[:-1], width, dtype=dtype, device=t.device)
    out[..., : t.shape[-1]] = t
    return out


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
