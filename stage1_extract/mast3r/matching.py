"""Exact reciprocal nearest-neighbour matching of dense descriptors, batched over pairs, on any device.

Semantics (MASt3R's fast reciprocal NN, as the method uses it):
- seeds: pixels of A on a regular grid (stride, first pixel at `offset`);
- iterate: each unconverged point of A takes its nearest neighbour in B (dot product of the descriptors),
  which takes its nearest neighbour back in A; a chain stops when a step returns to where it was (then
  the A point and its B neighbour are mutual nearest neighbours); at most `max_iter` rounds, unconverged
  chains are dropped; duplicates are merged (a reciprocal pair is unique given its A pixel);
- drop matches within `border` pixels of either image's edge;
- drop matches whose confidence is below the `conf_quantile` quantile of its image's confidence map, in
  EITHER image (the intersection of both tests: the reference code's union kept matches failing one).
  The quantile is the sorted map's element at index floor(q * n), as in the reference.

Nearest neighbours are exact: full float32 products. On CUDA a fused Triton kernel (`nn_triton`) screens
with float16 tensor-core products and re-checks the few candidates that can win in float32, never storing a
similarity row, and the rounds run without host syncs; elsewhere (and for float64) the products are formed
in blocks whose size is bounded by `block_elems` (TF32 switched off around them), so memory stays flat
whatever the image size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from geod.pipeline.errors import ConfigError, TeacherError
from geod.pipeline.precision import tf32


@dataclass(kw_only=True)
class MatchConfig:
    stride: int = 16                # seed grid step in pixels (the method's reference; MASt3R's default is 8)
    offset: int | None = None       # first seed pixel on each axis; None = stride // 2
    max_iter: int = 10
    border: int = 3                 # pixels
    conf_quantile: float = 0.10     # 0 disables the confidence test
    block_elems: int = 1 << 26      # similarity entries per block (x4 bytes), blocked torch path
    kernel: str = "auto"            # "auto": fused Triton kernel on CUDA for float32, else "torch"

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ConfigError(f"MatchConfig.stride must be >= 1, got {self.stride}")
        if self.offset is None:
            self.offset = self.stride // 2
        if self.offset < 0:
            raise ConfigError(f"MatchConfig.offset must be >= 0, got {self.offset}")
        if self.max_iter < 1 or self.border < 0 or self.block_elems < 1:
            raise ConfigError("MatchConfig: max_iter >= 1, border >= 0 and block_elems >= 1 required")
        if self.kernel not in ("auto", "torch", "triton"):
            raise ConfigError(f"MatchConfig.kernel must be auto, torch or triton, got {self.kernel!r}")
        if not 0.0 <= self.conf_quantile < 1.0:
            raise ConfigError(f"MatchConfig.conf_quantile must be in [0, 1), got {self.conf_quantile}")


@dataclass
class PairMatches:
    """Matches of one pair, sorted by A's pixel index. xy_*: [N, 2] int64 pixel (x, y); idx_*: [N] int64
    row-major pixel index."""

    xy_a: torch.Tensor
    xy_b: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor


def reciprocal_matches(desc_a: torch.Tensor, desc_b: torch.Tensor, conf_a: torch.Tensor | None = None,
                       conf_b: torch.Tensor | None = None, *, cfg: MatchConfig | None = None,
                       switch_guard=None) -> list[PairMatches]:
    """Match a batch of pairs. desc_a [B, Ha, Wa, D], desc_b [B, Hb, Wb, D] (any float dtype; compared in
    float32, or float64 when given float64); conf_a [B, Ha, Wa] and conf_b [B, Hb, Wb] for the confidence
    test (skipped when None). Returns one PairMatches per pair, on the descriptors' device.

    The fused kernel needs no TF32 switch; the torch path turns TF32 off, a process-wide setting, while it
    runs. `switch_guard` (a lock or other context manager) is held meanwhile, for callers running other
    device work in parallel threads."""
    cfg = cfg or MatchConfig()
    if desc_a.ndim != 4 or desc_b.ndim != 4 or desc_a.shape[0] != desc_b.shape[0] \
            or desc_a.shape[3] != desc_b.shape[3]:
        raise TeacherError(f"descriptors must be [B, H, W, D] with equal B and D, got {tuple(desc_a.shape)} "
                           f"and {tuple(desc_b.shape)}")
    batch, ha, wa, dim = desc_a.shape
    _, hb, wb, _ = desc_b.shape
    dtype = torch.float64 if desc_a.dtype == torch.float64 else torch.float32
    feats_a = desc_a.reshape(batch, ha * wa, dim).to(dtype)
    feats_b = desc_b.reshape(batch, hb * wb, dim).to(dtype)
    device = desc_a.device

    ys = torch.arange(min(cfg.offset, ha), ha, cfg.stride, device=device)
    xs = torch.arange(min(cfg.offset, wa), wa, cfg.stride, device=device)
    seeds = (ys[:, None] * wa + xs[None, :]).reshape(-1)
    search_b, search_a, fused = _searchers(feats_a, feats_b, cfg)
    if fused:
        switches = contextlib.nullcontext()
    else:  # exact products: TF32 could swap close neighbours
        switches = _both(switch_guard or contextlib.nullcontext(), tf32(device, enabled=False))
    with switches:
        idx_a, idx_b, ok = _iterate(feats_a, feats_b, seeds.expand(batch, -1).clone(), cfg, search_b, search_a,
                                    fused)
    ok &= _inside(idx_a, ha, wa, cfg.border) & _inside(idx_b, hb, wb, cfg.border)
    if cfg.conf_quantile > 0:
        for conf, idx, name in ((conf_a, idx_a, "conf_a"), (conf_b, idx_b, "conf_b")):
            if conf is not None:
                ok &= _conf_test(conf, idx, cfg.conf_quantile, name, batch)
    return _collect(idx_a, idx_b, ok, ha * wa, hb * wb, wa, wb)


@contextlib.contextmanager
def _both(outer, inner):
    with outer, inner:
        yield


def _searchers(feats_a, feats_b, cfg: MatchConfig):
    """(nearest-in-B, nearest-in-A, fused): functions of queries [B, S, D] -> indices [B, S], and whether
    they are the fused kernel's."""
    use_triton = cfg.kernel == "triton"
    if cfg.kernel == "auto" and feats_a.dtype == torch.float32 and feats_a.device.type == "cuda":
        # float16 screening needs finite values far from its range limit (descriptors are unit vectors);
        # one host sync for the whole test
        largest = torch.stack([feats_a.abs().amax(), feats_b.abs().amax()]).amax()
        use_triton = bool(largest.nan_to_num(nan=torch.inf) < 1e3)
    if use_triton:
        if feats_a.dtype != torch.float32:
            raise TeacherError("MatchConfig.kernel 'triton' needs float32 descriptors")
        from geod.stage1_extract.mast3r.nn_triton import TritonNN  # noqa: PLC0415 - needs triton (CUDA)

        in_b, in_a = TritonNN(feats_b), TritonNN(feats_a)
        return in_b.argmax, in_a.argmax, True
    return ((lambda q: _argmax_dot(q, feats_b, cfg.block_elems)), (lambda q: _argmax_dot(q, feats_a, cfg.block_elems)),
            False)


def _iterate(feats_a, feats_b, xy1, cfg: MatchConfig, search_b, search_a, fused: bool):
    """The seeded A -> B -> A iteration, all pairs at once. Returns (idx_a, idx_b, converged) [B, S].

    Each round searches only the unconverged chains, packed to the front. The fused kernel takes their
    number per pair from device memory, so the rounds run without a host sync (each sync would idle the
    device until the host launched the next kernels; a converged batch's remaining rounds cost a few
    empty launches). The torch path sizes its products on the host: one sync per round."""
    xy2 = torch.full_like(xy1, -1)
    old1, old2 = xy1.clone(), xy2.clone()
    notyet = torch.ones_like(xy1, dtype=torch.bool)
    for step in range(cfg.max_iter):
        if fused:
            count = notyet.sum(dim=1, dtype=torch.int32)  # stays on the device
        else:
            count = int(notyet.sum(dim=1).max()) if step else xy1.shape[1]
            if count == 0:
                break
        # the second search's active set is a subset of the first's, so `count` bounds both
        xy2 = torch.where(notyet, _nn_of(feats_a, xy1, search_b, notyet, count), xy2)
        notyet &= old2 != xy2
        xy1 = torch.where(notyet, _nn_of(feats_b, xy2, search_a, notyet, count), xy1)
        notyet &= old1 != xy1
        old1, old2 = xy1.clone(), xy2.clone()
    return xy1, xy2, ~notyet


def _nn_of(src: torch.Tensor, src_idx: torch.Tensor, search, active: torch.Tensor, count) -> torch.Tensor:
    """Nearest neighbour (`search`: queries -> database indices) of src[b, src_idx[b, s]] for the active
    entries [B, S]; inactive entries get an arbitrary value. Active entries are packed to the front so that
    a late round, where few chains remain, costs little. `count`: an int bounding every row's active
    entries (only that many columns are searched), or an int32 [B] device tensor of them (the fused
    kernel's searches then skip the rest themselves)."""
    out = torch.zeros_like(src_idx)
    if isinstance(count, int) and count == 0:
        return out
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)
    if isinstance(count, int):
        order = order[:, :count]
    query_idx = src_idx.gather(1, order).clamp(min=0)
    queries = src.gather(1, query_idx[..., None].expand(-1, -1, src.shape[2]))
    found = search(queries) if isinstance(count, int) else search(queries, count)
    return out.scatter_(1, order, found)


def _argmax_dot(queries: torch.Tensor, db: torch.Tensor, block_elems: int) -> torch.Tensor:
    """argmax_j <q_i, db_j> per batch row, first index on ties, in blocks of at most block_elems."""
    batch, n_q, _ = queries.shape
    n_db = db.shape[1]
    q_block = max(1, min(n_q, block_elems // max(1, batch * n_db)))
    db_block = max(1, min(n_db, block_elems // max(1, batch * q_block)))
    result = []
    for q0 in range(0, n_q, q_block):
        q = queries[:, q0:q0 + q_block]
        best_val = best_idx = None
        for d0 in range(0, n_db, db_block):
            vals, idx = torch.bmm(q, db[:, d0:d0 + db_block].transpose(1, 2)).max(dim=2)
            if best_val is None:
                best_val, best_idx = vals, idx
            else:
                better = vals > best_val  # strict: an equal value in a later block keeps the first index
                best_val = torch.where(better, vals, best_val)
                best_idx = torch.where(better, idx + d0, best_idx)
        result.append(best_idx)
    return torch.cat(result, dim=1)


def _inside(idx: torch.Tensor, height: int, width: int, border: int) -> torch.Tensor:
    x, y = idx % width, idx // width
    return (idx >= 0) & (x >= border) & (x < width - border) & (y >= border) & (y < height - border)


def _conf_test(conf: torch.Tensor, idx: torch.Tensor, quantile: float, name: str, batch: int) -> torch.Tensor:
    flat = conf.reshape(batch, -1)
    if flat.shape[1] == 0:
        raise TeacherError(f"{name} is empty")
    k = min(int(flat.shape[1] * quantile), flat.shape[1] - 1)
    threshold = flat.kthvalue(k + 1, dim=1).values
    return flat.gather(1, idx.clamp(min=0)) >= threshold[:, None]


def _collect(idx_a, idx_b, ok, n_a: int, n_b: int, w_a: int, w_b: int) -> list[PairMatches]:
    """Per-pair unique matches sorted by A's index (one `unique` over the whole batch)."""
    batch = idx_a.shape[0]
    rows = torch.arange(batch, device=idx_a.device)[:, None].expand_as(idx_a)
    keys = torch.unique(((rows * n_a + idx_a) * n_b + idx_b)[ok])  # sorted: by pair, then A, then B
    pair, rest = keys // (n_a * n_b), keys % (n_a * n_b)
    all_a, all_b = rest // n_b, rest % n_b
    counts = torch.bincount(pair, minlength=batch).tolist()
    out = []
    for ia, ib in zip(all_a.split(counts), all_b.split(counts)):
        out.append(PairMatches(xy_a=torch.stack((ia % w_a, ia // w_a), dim=1),
                               xy_b=torch.stack((ib % w_b, ib // w_b), dim=1), idx_a=ia, idx_b=ib))
    return out
