"""The MASt3R network: a shared ViT encoder, two cross-attending decoders and two output heads, with the
decoder cross-attention cost volume computed on the side.

Precision: `amp_dtype=torch.bfloat16` runs the encoder and decoder under autocast with fused attention
(SDPA); the heads and the cost volume always run in float32 (float64 when the weights are float64, for
parity checks), as the official code runs its heads with autocast disabled. `head_tf32=True` lets the
heads' float32 products and convolutions use TF32 on CUDA, which is what the official code does there
(its import switches TF32 on for matrix products; cuDNN convolutions use it by default); the default,
False, keeps them exact. `head_precision="bf16"` runs the heads under bfloat16 autocast instead (their
activations and the descriptor normalisation stay float32): the fastest; "mixed" runs only the descriptor
MLP in bfloat16 and the DPT (points, depth) in TF32. Each is checked against float32 by
benchmarks/bench_mast3r.py.

`forward_teacher` is what the teacher needs of a symmetric pass: the (A, B) outputs plus B's points in its
own frame, without the parts of the (B, A) pass nobody reads (its cost volume, its second head, its
descriptors). `compile_blocks` and `heads_channels_last` are optional speed-ups for CUDA.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from geod.pipeline.errors import TeacherError
from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.heads import Mast3rHead, postprocess, postprocess_points
from geod.stage1_extract.mast3r.layers import ATTENTION_IMPLS, DecoderBlock, EncoderBlock, Rope
from geod.pipeline.precision import tf32

HEAD_PRECISIONS = ("fp32", "tf32", "mixed", "bf16")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass
class Mast3rOutput:
    """Outputs for a batch of B pairs (A, B) at the input resolution (H x W per view).

    pts3d_a:     [B, Ha, Wa, 3] view A's points in A's camera frame (scene units: metres for the metric
                 checkpoint; OpenCV axes).
    pts3d_b:     [B, Hb, Wb, 3] view B's points in A's camera frame (official `pts3d_in_other_view`).
    conf_a/b:    [B, H, W] confidence of the points, >= cfg.conf_vmin (1).
    desc_a/b:    [B, H, W, D] unit-norm local descriptors.
    desc_conf_a/b: [B, H, W] descriptor confidence, > cfg.desc_conf_vmin (0).
    cost_ab:     [B, Na, Nb] or None: for each patch of A (row-major patch grid), a distribution over B's
                 patches from the decoder cross-attention (see `cross_attention_cost`); rows sum to 1
                 before the sink suppression.
    cost_ba:     [B, Nb, Na] or None: the same symmetrised logits, normalised over A's patches.
    grid_a/b:    patch grid (rows, cols) of each view.
    """

    pts3d_a: torch.Tensor
    pts3d_b: torch.Tensor
    conf_a: torch.Tensor
    conf_b: torch.Tensor
    desc_a: torch.Tensor
    desc_b: torch.Tensor
    desc_conf_a: torch.Tensor
    desc_conf_b: torch.Tensor
    cost_ab: torch.Tensor | None
    cost_ba: torch.Tensor | None
    grid_a: tuple[int, int]
    grid_b: tuple[int, int]


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # row-major patch tokens


class Mast3rNet(nn.Module):
    """State-dict compatible with the official AsymmetricMASt3R (catmlp+dpt head)."""

    def __init__(self, cfg: Mast3rConfig | None = None, *, attn_impl: str = "sdpa") -> None:
        super().__init__()
        if attn_impl not in ATTENTION_IMPLS:
            raise TeacherError(f"attn_impl must be one of {ATTENTION_IMPLS}, got {attn_impl!r}")
        self.cfg = cfg = cfg or Mast3rConfig()
        self.attn_impl = attn_impl
        # Unused at inference (a pretraining leftover) but part of the checkpoint: kept for strict loading.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_embed_dim))
        self.patch_embed = _PatchEmbed(cfg.patch_size, cfg.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(EncoderBlock(cfg.enc_embed_dim, cfg.enc_num_heads, cfg.mlp_ratio,
                                                     cfg.norm_eps) for _ in range(cfg.enc_depth))
        self.enc_norm = nn.LayerNorm(cfg.enc_embed_dim, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(cfg.enc_embed_dim, cfg.dec_embed_dim)
        self.dec_blocks = self._decoder(cfg)
        self.dec_norm = nn.LayerNorm(cfg.dec_embed_dim, eps=cfg.norm_eps)
        self.dec_blocks2 = self._decoder(cfg)
        self.downstream_head1 = Mast3rHead(cfg)
        self.downstream_head2 = Mast3rHead(cfg)

    @staticmethod
    def _decoder(cfg: Mast3rConfig) -> nn.ModuleList:
        return nn.ModuleList(DecoderBlock(cfg.dec_embed_dim, cfg.dec_num_heads, cfg.mlp_ratio, cfg.norm_eps)
                             for _ in range(cfg.dec_depth))

    # ------------------------------------------------------------------ helpers
    def _grid(self, images: torch.Tensor, name: str) -> tuple[int, int]:
        p = self.cfg.patch_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise TeacherError(f"{name} must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[2] % p or images.shape[3] % p:
            raise TeacherError(f"{name}: height and width must be multiples of {p}, got {tuple(images.shape[2:])}")
        return images.shape[2] // p, images.shape[3] // p

    def _rope(self, grid: tuple[int, int], dim: int, heads: int, ref: torch.Tensor) -> Rope:
        return Rope(grid[0], grid[1], dim // heads, self.cfg.rope_base, device=ref.device, dtype=ref.dtype)

    def encode(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> encoder tokens [B, N, enc_dim] (after enc_norm)."""
        cfg = self.cfg
        x = self.patch_embed(images)
        rope = self._rope(grid, cfg.enc_embed_dim, cfg.enc_num_heads, images)
        for block in self.enc_blocks:
            x = block(x, rope, self.attn_impl)
        return self.enc_norm(x)

    def _encode_pair(self, img_a, img_b, grid_a, grid_b) -> tuple[torch.Tensor, torch.Tensor]:
        if grid_a == grid_b:  # one batch for both views: same result, better GPU use
            feats = self.encode(torch.cat((img_a, img_b)), grid_a)
            return feats[: len(img_a)], feats[len(img_a):]
        return self.encode(img_a, grid_a), self.encode(img_b, grid_b)

    def decode(self, feat_a, feat_b, grid_a, grid_b, cost_temperature: float | None,
               cost_rows: int | None = None):
        """Run both decoders. Returns the hooked tokens of each view ([encoder output] + decoder layers of
        cfg.dpt_hooks[1:], the last one normalised) and the cost volumes (or None, None) of the first
        `cost_rows` pairs of the batch (all when None)."""
        cfg = self.cfg
        hooks = set(cfg.dpt_hooks[1:])
        rope_a = self._rope(grid_a, cfg.dec_embed_dim, cfg.dec_num_heads, feat_a)
        rope_b = self._rope(grid_b, cfg.dec_embed_dim, cfg.dec_num_heads, feat_b)
        hooked_a, hooked_b = [feat_a], [feat_b]
        x_a, x_b = self.decoder_embed(feat_a), self.decoder_embed(feat_b)
        cost = _CostAccumulator(cost_temperature, cfg.dec_num_heads) if cost_temperature is not None else None
        for layer, (block_a, block_b) in enumerate(zip(self.dec_blocks, self.dec_blocks2), start=1):
            new_a, q_a, k_b = block_a(x_a, x_b, rope_a, rope_b, self.attn_impl)
            new_b, q_b, k_a = block_b(x_b, x_a, rope_b, rope_a, self.attn_impl)
            if cost is not None:
                rows = slice(None, cost_rows)
                cost.add(q_a[rows], k_b[rows], q_b[rows], k_a[rows])
            del q_a, k_b, q_b, k_a
            x_a, x_b = new_a, new_b
            if layer in hooks:
                last = layer == cfg.dec_depth
                hooked_a.append(self.dec_norm(x_a) if last else x_a)
                hooked_b.append(self.dec_norm(x_b) if last else x_b)
        return hooked_a, hooked_b, (cost.result() if cost is not None else (None, None))

    # ------------------------------------------------------------------ forward
    def forward(self, img_a: torch.Tensor, img_b: torch.Tensor, *, cost_temperature: float | None = None,
                amp_dtype: torch.dtype | None = None, head_tf32: bool = False,
                head_precision: str | None = None) -> Mast3rOutput:
        """Predict a batch of pairs. img_a [B,3,Ha,Wa], img_b [B,3,Hb,Wb]: normalised with cfg.image_mean/std,
        sides multiples of 16, in their true orientation (portrait images need no transposing).
        cost_temperature: compute the cross-attention cost volumes with this softmax temperature.
        amp_dtype: e.g. torch.bfloat16 to run encoder and decoder under autocast (heads stay float32).
        head_tf32: allow TF32 in the float32 heads on CUDA (see the module docstring).
        head_precision: "fp32", "tf32" or "bf16" (overrides head_tf32 when given)."""
        grid_a, grid_b = self._grid(img_a, "img_a"), self._grid(img_b, "img_b")
        if len(img_a) != len(img_b):
            raise TeacherError(f"img_a and img_b hold {len(img_a)} and {len(img_b)} images")
        with self._autocast(img_a, amp_dtype):
            feat_a, feat_b = self._encode_pair(img_a, img_b, grid_a, grid_b)
            hooked_a, hooked_b, (cost_ab, cost_ba) = self.decode(feat_a, feat_b, grid_a, grid_b,
                                                                 cost_temperature)
        return self._heads(hooked_a, hooked_b, grid_a, grid_b, cost_ab, cost_ba,
                           _head_precision(head_precision, head_tf32))

    def forward_symmetric(self, img_a: torch.Tensor, img_b: torch.Tensor, *,
                          cost_temperature: float | None = None,
                          amp_dtype: torch.dtype | None = None, head_tf32: bool = False,
                          head_precision: str | None = None) -> tuple[Mast3rOutput, Mast3rOutput]:
        """Predict (A, B) and (B, A) with one encoding of each image: the second output gives B's points in
        B's own frame (its depth), which an (A, B) pass alone cannot. Arguments as for `forward`."""
        grid_a, grid_b = self._grid(img_a, "img_a"), self._grid(img_b, "img_b")
        n = len(img_a)
        if len(img_b) != n:
            raise TeacherError(f"img_a and img_b hold {n} and {len(img_b)} images")
        with self._autocast(img_a, amp_dtype):
            feat_a, feat_b = self._encode_pair(img_a, img_b, grid_a, grid_b)
            if grid_a == grid_b:
                first, second, (cost_1, cost_2) = self.decode(torch.cat((feat_a, feat_b)),
                                                              torch.cat((feat_b, feat_a)), grid_a, grid_a,
                                                              cost_temperature)
                split = [([t[:n] for t in first], [t[:n] for t in second]),
                         ([t[n:] for t in first], [t[n:] for t in second])]
                costs = [(_slice(cost_1, 0, n), _slice(cost_2, 0, n)), (_slice(cost_1, n, 2 * n),
                                                                        _slice(cost_2, n, 2 * n))]
            else:
                ab = self.decode(feat_a, feat_b, grid_a, grid_b, cost_temperature)
                ba = self.decode(feat_b, feat_a, grid_b, grid_a, cost_temperature)
                split = [(ab[0], ab[1]), (ba[0], ba[1])]
                costs = [ab[2], ba[2]]
        precision = _head_precision(head_precision, head_tf32)
        return (self._heads(*split[0], grid_a, grid_b, *costs[0], precision),
                self._heads(*split[1], grid_b, grid_a, *costs[1], precision))

    def forward_teacher(self, img_a: torch.Tensor, img_b: torch.Tensor, *, cost_temperature: float | None = None,
                        amp_dtype: torch.dtype | None = None,
                        head_precision: str = "fp32") -> tuple[Mast3rOutput, torch.Tensor, torch.Tensor]:
        """The (A, B) output of `forward_symmetric` plus, of its (B, A) output, only pts3d_a and conf_a
        (B's points in B's own frame and their confidence): equal to those, with less work, since the
        (B, A) pass skips its cost volume, its second head and its descriptor branch."""
        grid_a, grid_b = self._grid(img_a, "img_a"), self._grid(img_b, "img_b")
        n = len(img_a)
        if len(img_b) != n:
            raise TeacherError(f"img_a and img_b hold {n} and {len(img_b)} images")
        _head_precision(head_precision, False)
        with self._autocast(img_a, amp_dtype):
            feat_a, feat_b = self._encode_pair(img_a, img_b, grid_a, grid_b)
            if grid_a == grid_b:  # both directions in one decoder batch; view 1 of it = [A of AB; B of BA]
                first, second, (cost_ab, cost_ba) = self.decode(torch.cat((feat_a, feat_b)),
                                                                torch.cat((feat_b, feat_a)), grid_a, grid_a,
                                                                cost_temperature, cost_rows=n)
                ab_a, ab_b = [t[:n] for t in first], [t[:n] for t in second]
            else:
                ab_a, ab_b, (cost_ab, cost_ba) = self.decode(feat_a, feat_b, grid_a, grid_b, cost_temperature)
                ba_b = self.decode(feat_b, feat_a, grid_b, grid_a, None)[0]
        head1, head2, cfg = self.downstream_head1, self.downstream_head2, self.cfg
        with self._head_context(head_precision, first[0] if grid_a == grid_b else ab_a[0]) as cast:
            if grid_a == grid_b:
                dense1 = head1.dpt(cast(first), grid_a)
                dense_a, dense_own_b = dense1[:n], dense1[n:]
            else:
                dense_a, dense_own_b = head1.dpt(cast(ab_a), grid_a), head1.dpt(cast(ba_b), grid_b)
            out_a = postprocess(dense_a, self._local(head1, cast(ab_a), grid_a, head_precision), cfg)
            out_b = postprocess(head2.dpt(cast(ab_b), grid_b), self._local(head2, cast(ab_b), grid_b, head_precision),
                                cfg)
            own_pts_b, own_conf_b = postprocess_points(dense_own_b, cfg)
        ab = Mast3rOutput(pts3d_a=out_a["pts3d"], pts3d_b=out_b["pts3d"], conf_a=out_a["conf"],
                          conf_b=out_b["conf"], desc_a=out_a["desc"], desc_b=out_b["desc"],
                          desc_conf_a=out_a["desc_conf"], desc_conf_b=out_b["desc_conf"],
                          cost_ab=cost_ab, cost_ba=cost_ba, grid_a=grid_a, grid_b=grid_b)
        return ab, own_pts_b, own_conf_b

    @staticmethod
    def _autocast(ref: torch.Tensor, amp_dtype: torch.dtype | None):
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=ref.device.type, dtype=amp_dtype)

    @contextlib.contextmanager
    def _head_context(self, precision: str, ref: torch.Tensor):
        """Precision scope of the heads; yields the function that prepares their input token lists."""
        device = ref.device
        if precision == "bf16":
            # autocast casts at each product; tokens pass unchanged (some are float32, some bfloat16)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16), tf32(device, True):
                yield list
            return
        head_dtype = self.downstream_head1.dpt.head[0].weight.dtype
        with torch.autocast(device_type=device.type, enabled=False), tf32(device, precision in ("tf32", "mixed")):
            yield lambda tokens: [t.to(head_dtype) for t in tokens]

    @staticmethod
    def _local(head: Mast3rHead, tokens, grid, precision: str) -> torch.Tensor:
        """The descriptor branch; under bfloat16 autocast for "mixed" (inside `_head_context`)."""
        if precision != "mixed":
            return head.local_raw(tokens, grid)
        with torch.autocast(device_type=tokens[0].device.type, dtype=torch.bfloat16):
            return head.local_raw(tokens, grid)

    def _heads(self, hooked_a, hooked_b, grid_a, grid_b, cost_ab, cost_ba, precision: str) -> Mast3rOutput:
        with self._head_context(precision, hooked_a[0]) as cast:
            outs = [postprocess(head.dpt(cast(hooked), grid), self._local(head, cast(hooked), grid, precision),
                                self.cfg)
                    for head, hooked, grid in ((self.downstream_head1, hooked_a, grid_a),
                                               (self.downstream_head2, hooked_b, grid_b))]
        out_a, out_b = outs
        return Mast3rOutput(pts3d_a=out_a["pts3d"], pts3d_b=out_b["pts3d"], conf_a=out_a["conf"],
                            conf_b=out_b["conf"], desc_a=out_a["desc"], desc_b=out_b["desc"],
                            desc_conf_a=out_a["desc_conf"], desc_conf_b=out_b["desc_conf"],
                            cost_ab=cost_ab, cost_ba=cost_ba, grid_a=grid_a, grid_b=grid_b)


def _head_precision(precision: str | None, head_tf32: bool) -> str:
    if precision is None:
        return "tf32" if head_tf32 else "fp32"
    if precision not in HEAD_PRECISIONS:
        raise TeacherError(f"head_precision must be one of {HEAD_PRECISIONS}, got {precision!r}")
    return precision


def compile_blocks(model: Mast3rNet, mode: str = "default", *, heads: bool = False) -> Mast3rNet:
    """torch.compile every encoder and decoder block (and with `heads`, the DPT heads) in place. Blocks of
    one kind share their compiled code, so the cost is one compilation per kind and input shape; LayerNorm,
    RoPE, GELU and residual additions fuse around the matrix products. Outputs equal the eager ones up to
    floating-point reassociation."""
    if mode not in COMPILE_MODES:
        raise TeacherError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    import torch._dynamo  # noqa: PLC0415

    # 24 + 2 x 12 block instances of two classes, each a few shapes: leave room in the compile cache
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in (*model.enc_blocks, *model.dec_blocks, *model.dec_blocks2):
        block.compile(mode=mode, dynamic=False)
    if heads:
        for head in (model.downstream_head1, model.downstream_head2):
            head.dpt.compile(mode=mode, dynamic=False)
    return model


def heads_channels_last(model: Mast3rNet) -> Mast3rNet:
    """Store the DPT heads' convolution weights channels-last (the token maps entering them already are),
    so cuDNN runs NHWC kernels without layout conversions. Values, names and shapes are unchanged."""
    for head in (model.downstream_head1, model.downstream_head2):
        head.dpt.to(memory_format=torch.channels_last)
    return model


def _slice(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if t is None else t[start:stop]


class _CostAccumulator:
    """Layer average of the cross-attention probability maps of the method (see method.md):

    per decoder layer, logits q.k / sqrt(d) (RoPE applied) of A's queries on B's keys, averaged over heads;
    symmetrised with the transposed B->A logits; softmax with temperature over the other view's patches;
    the attention-sink column 0 set to the map's minimum; then the mean over layers.

    The head average of q_h . k_h is one product of the concatenated heads divided by the number of heads,
    so no per-head attention matrix is ever formed: one [Na, Nb] product per layer and direction.
    The sink minimum is taken per pair (the reference takes it over its whole batch, which would make a
    pair's target depend on its batch companions).
    """

    def __init__(self, temperature: float, num_heads: int) -> None:
        if not temperature > 0:
            raise TeacherError(f"cost-volume temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.num_heads = num_heads
        self.sum_ab = self.sum_ba = None
        self.layers = 0

    def add(self, q_a, k_b, q_b, k_a) -> None:
        dtype = torch.float64 if q_a.dtype == torch.float64 else torch.float32
        scale = 1.0 / (self.num_heads * math.sqrt(q_a.shape[-1]))
        # bf16/fp16 values are exact in TF32, so TF32 products of them lose nothing (and are much faster);
        # float32 inputs get exact float32 products.
        exact_in_tf32 = q_a.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(device_type=q_a.device.type, enabled=False), tf32(q_a.device, exact_in_tf32):
            logits_ab = _flat(q_a, dtype) @ _flat(k_b, dtype).transpose(1, 2)
            logits_ba = _flat(q_b, dtype) @ _flat(k_a, dtype).transpose(1, 2)
            sym = (logits_ab + logits_ba.transpose(1, 2)) * (scale / 2)
            p_ab = _suppress_sink((sym / self.temperature).softmax(dim=-1))
            p_ba = _suppress_sink((sym.transpose(1, 2) / self.temperature).softmax(dim=-1))
        self.sum_ab = p_ab if self.sum_ab is None else self.sum_ab + p_ab
        self.sum_ba = p_ba if self.sum_ba is None else self.sum_ba + p_ba
        self.layers += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sum_ab / self.layers, self.sum_ba / self.layers


def _flat(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads * d]."""
    return t.transpose(1, 2).flatten(2).to(dtype)


def _suppress_sink(probs: torch.Tensor) -> torch.Tensor:
    probs = probs.clone()
    probs[..., 0] = probs.amin(dim=(1, 2))[:, None]
    return probs


def randomize_(model: nn.Module, seed: int = 0, *, gain: float = 1.0) -> nn.Module:
    """Fill every parameter with seeded random values (tests, parity checks, benchmarks without weights):
    weights ~ N(0, gain^2 / fan_in), LayerNorm scales 1 + N(0, 0.1^2), biases and the rest N(0, 0.1^2).
    Values are drawn on the CPU in parameter order, so they are the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            if name in norms:
                values = 1.0 + 0.1 * values
            elif param.ndim >= 2 and name != "mask_token":
                values = values * (gain / math.sqrt(param[0].numel()))
            else:
                values = 0.1 * values
            param.copy_(values.to(param.dtype))
    return model
