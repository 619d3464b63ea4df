"""The distilled model: a student with LoRA and adapters, plus the refine and depth heads.

One student forward per image gives every feature the losses need:
- matching features: final block, final norm, refine conv, sampled bilinearly at keypoints, L2-normalised;
- depth features: mean of the depth blocks (each final-normed), sampled at keypoints;
- cost-volume features: mean of the cost blocks (final-normed), sampled at the teacher grid's cell centres,
  L2-normalised;
- preservation features (only when loss.w_preserve > 0): the patch grid the VLM consumes (the fed block's
  output, after the final norm for VLMs that apply it, see `fed_view`), compared with the same grid of the
  untouched base encoder. The base grid comes from a second, gradient-free pass of the same modules with
  LoRA and the bottleneck adapters switched off (`adapters_disabled`), so no copy of the encoder is kept.
"""

from __future__ import annotations

import contextlib

import torch
from geod.pipeline.errors import ConfigError
from geod.stage2_distill import losses
from geod.stage2_distill.adapters import (apply_lora, attach_bottlenecks, bottleneck_residual, build_heads,
                                          mark_trainable)
from geod.stage2_distill.config import LossConfig, StudentConfig
from geod.stage2_distill.student_families import RasterGrid
from geod.stage2_distill.students import BlockOutputs, Student
from torch import nn


# Inductor settings for `DistillModel.compile_sections`. Combo kernels run independent small kernels (the
# losses' reductions, the pieces of their backward, bias gradients) as one launch: on a ViT-B step the gaps
# between a few hundred short kernels are a measurable share of the loss section (benchmarks/RESULTS.md).
INDUCTOR_OPTIONS = {"combo_kernels": True}

# What the losses read from a batch (pixels and pair ids stay outside the compiled section).
LOSS_INPUTS = ("mask", "xy_a", "xy_b", "depth_a", "depth_b", "points_a", "points_b", "scene_scale",
               "cv_ab_index", "cv_ab_prob", "cv_ab_valid", "cv_ba_index", "cv_ba_prob", "cv_ba_valid")


def sample_grid(grid: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a [B, D, h, w] grid at normalised (u, v) points [B, N, 2] -> [B, N, D].

    u = x / W with pixel centres at i + 0.5 matches align_corners=False: cell j's centre is (j + 0.5) / w;
    points beyond the outer centres take the edge values (grid_sample's "border" padding), and the values
    are grid_sample's. Each point reads its four neighbours as whole D-vectors of the grid laid out channels
    last (the layout the norms and the refine conv leave), a weighted sum of four rows; grid_sample instead
    runs a thread per point looping over channels, and its backward was several times slower than this
    gather's.
    """
    batch, dim, height, width = grid.shape
    rows = grid.permute(0, 2, 3, 1).reshape(batch * height * width, dim)
    index, weight = _bilinear_corners(xy.to(grid.dtype), height, width)
    index = index + (torch.arange(batch, device=grid.device) * (height * width))[:, None, None]
    corners = rows[index.reshape(-1)].view(batch, xy.shape[1], 4, dim)
    return (corners * weight[..., None]).sum(2)


def _bilinear_corners(xy: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major cell indices [..., 4] of the four neighbours of normalised points [..., 2] on a
    height x width grid, and their bilinear weights [..., 4] (see `sample_grid` for the conventions)."""
    x = (xy[..., 0] * width - 0.5).clamp(0, width - 1)  # in cells, clamped to the outer centres
    y = (xy[..., 1] * height - 0.5).clamp(0, height - 1)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    index = torch.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], dim=-1)
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=-1)
    return index, weight


def resample_to_cells(grid: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """`sample_grid` at the centres of every cell of a cells = (h, w) grid, [B, D, h', w'] -> [B, h * w, D].

    The points are the same for every image, so the bilinear weights form one fixed [h * w, h' * w']
    matrix and the resampling is a matrix product (its backward another one). A gather at hundreds of points
    per image reads each grid row many times over and its backward scatters with atomic adds; the product
    reads the grid once.
    """
    batch, dim, height, width = grid.shape
    index, weight = _bilinear_corners(cell_centres(*cells, device=grid.device).to(grid.dtype), height, width)
    weights = grid.new_zeros(index.shape[0], height * width).scatter_add_(1, index, weight)
    return torch.matmul(weights, grid.permute(0, 2, 3, 1).reshape(batch, height * width, dim))


def cell_centres(grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Normalised centres of a row-major grid, [grid_h * grid_w, 2] as (u, v)."""
    v, u = torch.meshgrid((torch.arange(grid_h, device=device) + 0.5) / grid_h,
                          (torch.arange(grid_w, device=device) + 0.5) / grid_w, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)


def fed_layer(student: Student) -> int:
    """Index of the block whose output the student's VLM consumes (the last block for a bare tower)."""
    return int(student.fed_layer)


def fed_view(student: Student, grid: torch.Tensor, layer: int) -> torch.Tensor:
    """Block `layer`'s grid as the VLM sees it: the fed block goes through the tower's final norm when the
    VLM applies it (PaliGemma, Idefics3, Qwen2.5-VL); LLaVA-style models and other blocks take it raw."""
    handle = student.vlm_handle
    if layer == fed_layer(student) and handle is not None and handle.feeds_final_norm:
        return student.final_norm(grid)
    return grid


def preserve_layer_index(student: Student, layer: int | None) -> int:
    """loss.preserve_layer made a non-negative block index (None = `fed_layer`)."""
    chosen = fed_layer(student) if layer is None else layer
    index = chosen + student.num_layers if chosen < 0 else chosen
    if not 0 <= index < student.num_layers:
        raise ConfigError(f"loss.preserve_layer {layer} does not exist (the student has {student.num_layers} "
                          f"blocks)")
    return index


@contextlib.contextmanager
def adapters_disabled(student: Student):
    """Run the student as its base model: peft's LoRA switched off and no bottleneck adapters applied.

    The adapters stay in memory (and keep their gradients); they are only bypassed inside the block.
    """
    adapters = student.block_adapters
    lora_off = student.tower.disable_adapter() if hasattr(student.tower, "disable_adapter") \
        else contextlib.nullcontext()
    student.block_adapters = nn.ModuleDict()  # Student.forward applies what this holds
    try:
        with lora_off:
            yield student
    finally:
        student.block_adapters = adapters


class LayerMean(torch.autograd.Function):
    """torch.stack(grids).mean(0), with the backward autograd would compute for it (each grid's gradient is
    grad / len(grids)) but without materialising it once per grid: every grid gets the same tensor, so a
    step writes one gradient-sized tensor here instead of a stack of them (about 1 GB for SigLIP so400m)."""

    @staticmethod
    def forward(ctx, *grids: torch.Tensor) -> torch.Tensor:
        ctx.count = len(grids)
        return torch.stack(grids).mean(0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Contiguous: the norm's backward reads its output gradient contiguously and would copy it per grid.
        share = grad.contiguous() / ctx.count
        return (share,) * ctx.count


class DistillModel(nn.Module):
    """Student + LoRA + bottleneck adapters + heads; `cfg` must be resolved (explicit layer lists)."""

    def __init__(self, student: Student, cfg: StudentConfig, *, lora: bool = True) -> None:
        super().__init__()
        if cfg.lora_layers is None or cfg.depth_layers is None or cfg.cost_layers is None:
            raise ValueError("DistillModel needs a resolved StudentConfig (StudentConfig.resolved)")
        if lora:
            apply_lora(student, cfg)
        attach_bottlenecks(student, cfg)
        self.student = student
        self.cfg = cfg
        self.refine, self.depth_head = build_heads(student, cfg)
        mark_trainable(self)
        self._compiled_section = None
        self._side_stream: torch.cuda.Stream | None = None
        self._held_for_side = None  # the side stream's inputs, until `join_streams`

    def features(self, pixel_values: torch.Tensor, *, match: bool = True, depth: bool = True,
                 cost: bool = True, preserve: int | None = None) -> dict[str, torch.Tensor]:
        """Dense feature grids [B, D, h, w] of the requested kinds; `preserve`: also that block's grid as the
        VLM sees it (key "preserve", see `fed_view`)."""
        return self.features_of(self.student(pixel_values), match=match, depth=depth, cost=cost, preserve=preserve)

    def features_of(self, grids: list[torch.Tensor], *, match: bool = True, depth: bool = True, cost: bool = True,
                    preserve: int | None = None) -> dict[str, torch.Tensor]:
        """`features` from the student's block grids (`Student.forward` output)."""
        normed: dict[int, torch.Tensor] = {}
        means: dict[tuple[int, ...], torch.Tensor] = {}

        # Each block is normalised once, and a layer mean shared by the depth and cost features (the default
        # layer lists coincide) is computed once: fewer kernels per step, the same values. Normed blocks stay
        # channels-last [B, h, w, D], the layout the norm writes: stacking them for the mean is then a plain
        # copy, and their gradients reach the norm's backward without a transpose (stacking the [B, D, h, w]
        # views forced a strided copy of every block forward, and another one backward).
        def norm(index: int) -> torch.Tensor:
            if index not in normed:
                normed[index] = self.student.final_norm_last(grids[index])
            return normed[index]

        def layer_mean(layers: tuple[int, ...]) -> torch.Tensor:
            if layers not in means:
                blocks = [norm(i) for i in layers]
                # Compiled, a plain sum lets the compiler compute the mean in the norms' own kernel, without
                # writing each normed block out; eager, LayerMean keeps the backward to one gradient tensor.
                if torch.compiler.is_compiling():
                    mean = sum(blocks[1:], blocks[0]) / len(blocks)
                else:
                    mean = LayerMean.apply(*blocks)
                means[layers] = mean.permute(0, 3, 1, 2)
            return means[layers]

        out = {}
        if preserve is not None:
            out["preserve"] = fed_view(self.student, grids[preserve], preserve)
        if match:
            final = norm(self.cfg.match_layer).permute(0, 3, 1, 2)
            out["match"] = final if self.refine is None else self.refine(final)
        if depth:
            out["depth"] = layer_mean(tuple(self.cfg.depth_layers))
        if cost:
            out["cost"] = layer_mean(tuple(self.cfg.cost_layers))
        return out

    def base_grid(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Block `layer`'s grid [B, D, h, w] of the base encoder (adapters off, `fed_view`), without gradient."""
        with torch.no_grad(), adapters_disabled(self.student):
            return fed_view(self.student, self.student(pixel_values)[layer], layer).detach()

    def forward(self, batch: dict, loss_cfg: LossConfig, cv_grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Losses of one batch: {"total", "ap", "depth", "rank", "kl", "preserve"} (unweighted parts, weighted
        total)."""
        pixels = torch.cat([batch["pixel_a"], batch["pixel_b"]])
        early_block = self._early_block(loss_cfg)
        if early_block is None:
            blocks = self.student.run_blocks(pixels)
            return self.losses_of(blocks, self._base(pixels, loss_cfg), batch, loss_cfg, cv_grid)

        # The depth, ranking and cost-volume losses read blocks up to `early_block` only: they are queued on the
        # side stream as soon as that block has run, and overlap the encoder's later blocks, forward and
        # backward (autograd runs a backward on the stream of its forward, and joins the streams where
        # gradients meet). The streams join again before the parts are summed and after backward
        # (`join_streams`). The side stream's inputs, made on the main stream, are held until that last join,
        # so the allocator cannot hand their memory to main-stream work while the side stream may still read it.
        main, side = torch.cuda.current_stream(pixels.device), self._side_stream
        early: dict[str, torch.Tensor] = {}

        def after_block(index: int, so_far: BlockOutputs) -> None:
            if index == early_block:
                self._held_for_side = (so_far, batch)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    early.update(self.losses_of(so_far, None, batch, loss_cfg, cv_grid, "early"))

        blocks = self.student.run_blocks(pixels, after_block)
        late = self.losses_of(blocks, self._base(pixels, loss_cfg), batch, loss_cfg, cv_grid, "late")
        main.wait_stream(side)
        return {name: late[name] + early[name] for name in late}

    def overlap_early_losses(self, stream: torch.cuda.Stream | None) -> None:
        """On CUDA, compute the losses of the early blocks on `stream`, beside the encoder's later blocks
        (`forward`); None: all losses after the encoder, on the current stream."""
        self._side_stream = stream

    @property
    def overlaps_losses(self) -> bool:
        return self._side_stream is not None

    def join_streams(self) -> None:
        """Make the current stream wait for the side stream's work (call after backward, before the update)."""
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)
            self._held_for_side = None

    def _early_block(self, loss_cfg: LossConfig) -> int | None:
        """The last block the early losses read when they can overlap later blocks, else None."""
        if self._side_stream is None or loss_cfg.w_ap <= 0:
            return None
        layers = []
        if loss_cfg.w_depth > 0 or loss_cfg.w_rank > 0:
            layers += self.cfg.depth_layers
        if loss_cfg.w_kl > 0:
            layers += self.cfg.cost_layers
        if not layers or max(layers) >= self.cfg.match_layer:
            return None
        return max(layers)

    def _base(self, pixels: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor | None:
        """The base encoder's grid for the preservation loss, or None when it is off."""
        if loss_cfg.w_preserve <= 0:
            return None
        return self.base_grid(pixels, preserve_layer_index(self.student, loss_cfg.preserve_layer))

    def losses_of(self, blocks: BlockOutputs, base: torch.Tensor | None, batch: dict, loss_cfg: LossConfig,
                  cv_grid: tuple[int, int], part: str = "all") -> dict:
        """The loss parts from the student's block outputs (`Student.run_blocks`): norms, layer means, heads and
        losses (compiled after `compile_sections`). `base`: the base encoder's grid for the preservation loss,
        or None. `part`: see `_heads_and_losses`."""
        targets = {k: v for k, v in batch.items() if k in LOSS_INPUTS}
        section = self._compiled_section or self._heads_and_losses
        # A sequence tower's tokens enter the section whole and are cut into grids inside it. Compiled, its
        # backward then writes each block's token gradient at once (prefix rows zero); handed grids, it would
        # write grid gradients that autograd copies into zero-filled token-sized tensors, two more passes over
        # each block's gradient per step.
        if isinstance(blocks.to_grid, RasterGrid):
            return section(blocks.tokens, blocks.to_grid, base, targets, loss_cfg, cv_grid, part)
        return section(blocks.grids(), None, base, targets, loss_cfg, cv_grid, part)

    def compile_sections(self, backend: str = "inductor", **options) -> None:
        """Run the section after the encoder (norms, layer means, heads, losses) and the bottleneck adapters
        through torch.compile (static shapes: feed batches padded to one match count, see PairStream's
        pad_matches). Eager, they launch a few hundred small kernels per step and make several float32 passes
        over each feature grid, which bounds small students by the host or by memory traffic. The inductor
        backend gets `INDUCTOR_OPTIONS` unless the caller passes a mode or options of its own."""
        if backend == "inductor" and "mode" not in options:
            options.setdefault("options", dict(INDUCTOR_OPTIONS))
        self._compiled_section = torch.compile(self._heads_and_losses, backend=backend, dynamic=False, **options)
        if self.student.block_adapters:
            residual = torch.compile(bottleneck_residual, backend=backend, dynamic=False, **options)
            for adapter in self.student.block_adapters.values():
                adapter.residual = residual

    def _heads_and_losses(self, blocks: list[torch.Tensor], to_grid: RasterGrid | None, base: torch.Tensor | None,
                          batch: dict, loss_cfg: LossConfig, cv_grid: tuple[int, int], part: str = "all") -> dict:
        """The loss parts of the features in `part`: "all", "early" (depth, ranking, cost volume) or "late"
        (matching, preservation); the parts left out are zero. `blocks`: the blocks' grids, or their tokens
        when `to_grid` is given."""
        grids = blocks if to_grid is None else [to_grid(tokens) for tokens in blocks]
        layer = preserve_layer_index(self.student, loss_cfg.preserve_layer) if base is not None else None
        early, late = part != "late", part != "early"
        feats = self.features_of(grids, match=late and loss_cfg.w_ap > 0,
                                 depth=early and (loss_cfg.w_depth > 0 or loss_cfg.w_rank > 0),
                                 cost=early and loss_cfg.w_kl > 0, preserve=layer if late else None)
        if base is not None:
            feats["preserve_base"] = base
        return self._float_losses(feats, batch, loss_cfg, cv_grid)

    def _float_losses(self, feats: dict, batch: dict, loss_cfg: LossConfig, cv_grid: tuple[int, int]) -> dict:
        # The encoder may run under bf16 autocast; the losses (sharp temperatures, 0.01 on cosines) may not.
        with torch.autocast(device_type=batch["mask"].device.type, enabled=False):
            return self._losses({k: v.float() for k, v in feats.items()}, batch, loss_cfg, cv_grid)

    def _losses(self, feats: dict, batch: dict, loss_cfg: LossConfig, cv_grid: tuple[int, int]) -> dict:
        pairs = batch["mask"].shape[0]
        mask = batch["mask"]
        # Scene normalisation: 0.1 then means 10% of the pair's median match depth, for any teacher's units.
        scale = batch["scene_scale"].float()[:, None]
        depth_a, depth_b = batch["depth_a"] / scale, batch["depth_b"] / scale
        points_a, points_b = batch["points_a"] / scale[..., None], batch["points_b"] / scale[..., None]
        zero = next(p for p in self.parameters() if p.requires_grad).sum() * 0
        parts = {"ap": zero, "depth": zero, "rank": zero, "kl": zero, "preserve": zero}

        # Both views are sampled in one call each (the grids hold A's images then B's, in the same order as
        # the keypoints): half the kernel launches, the same per-point values.
        xy = torch.cat([batch["xy_a"], batch["xy_b"]])
        if "match" in feats:
            # The method's order: refined grid -> bilinear sample -> L2-normalise (normalising the grid first
            # would reweight the bilinear neighbours by their norms).
            matched = nn.functional.normalize(sample_grid(feats["match"], xy), dim=-1)
            fa, fb = matched[:pairs], matched[pairs:]
            parts["ap"] = losses.smooth_ap_loss(fa, fb, points_a, points_b, mask,
                                                temperature=loss_cfg.ap_temperature,
                                                neg_distance=loss_cfg.neg_distance)
        if "depth" in feats:
            sampled = sample_grid(feats["depth"], xy)
            da, db = sampled[:pairs], sampled[pairs:]
            if loss_cfg.w_depth > 0:
                parts["depth"] = losses.cross_view_depth_loss(self.depth_head, da, db, depth_a, depth_b, mask)
            if loss_cfg.w_rank > 0:
                # Matches come in random order, so a prefix is a random subset (the loss is N^2 in memory).
                keep = slice(0, loss_cfg.rank_points or None)
                parts["rank"] = losses.ranking_loss(self.depth_head, sampled[:, keep],
                                                    torch.cat([depth_a[:, keep], depth_b[:, keep]]),
                                                    torch.cat([mask[:, keep], mask[:, keep]]),
                                                    min_gap=loss_cfg.rank_min_gap)
        if "cost" in feats:
            cells = nn.functional.normalize(resample_to_cells(feats["cost"], cv_grid), dim=-1)
            kl_ab, kl_ba = losses.two_way_cost_volume_kl(
                cells[:pairs], cells[pairs:], (batch["cv_ab_index"], batch["cv_ab_prob"], batch["cv_ab_valid"]),
                (batch["cv_ba_index"], batch["cv_ba_prob"], batch["cv_ba_valid"]), temperature=loss_cfg.cv_temperature)
            parts["kl"] = (kl_ab + kl_ba) / 2
        if "preserve" in feats:
            parts["preserve"] = losses.feature_preservation_loss(feats["preserve"], feats["preserve_base"],
                                                                 distance=loss_cfg.preserve_distance)
        parts["total"] = (loss_cfg.w_ap * parts["ap"] + loss_cfg.w_depth * parts["depth"]
                          + loss_cfg.w_rank * parts["rank"] + loss_cfg.w_kl * parts["kl"]
                          + loss_cfg.w_preserve * parts["preserve"])
        return parts
