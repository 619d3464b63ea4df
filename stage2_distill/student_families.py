"""Tower kinds: how each vision-tower architecture is called and how its block outputs become patch grids.

A `TowerKind` knows, for one architecture (whatever model holds the tower: a bare CLIP, the tower inside
LLaVA, the `visual` module of Qwen2.5-VL, a timm ViT):
- where its transformer blocks and its final norm are (module paths inside the tower),
- its geometry (width, depth, patch size, prefix tokens such as CLS, native input size),
- how to call it on normalised images [B, 3, H, W] and turn one block's output back into a raster grid
  [B, D, H/p, W/p] (`TowerCall`),
- how its processor config sizes the input when the user sets no `student.image_size`,
- which Linear layers LoRA's "q_proj" / "k_proj" / "v_proj" mean in its blocks. Towers with one fused
  qkv projection (Qwen2.5-VL, timm) map all three to it, so LoRA there adapts q, k and v together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from geod.pipeline.errors import StudentError
from geod.stage2_distill.qwen_windows import route_equal_windows
from torch import nn

PROCESSOR_FILE = "preprocessor_config.json"
# Qwen2.5-VL takes any size (multiples of 28); without student.image_size it is distilled at about this many
# pixels (kept inside the processor's own min_pixels / max_pixels).
DYNAMIC_DEFAULT_PIXELS = 448 * 448


@dataclass(frozen=True, kw_only=True)
class TowerGeometry:
    hidden_size: int
    num_blocks: int
    patch_size: int
    num_prefix_tokens: int  # tokens before the patches in each block's output (CLS, registers)
    native_size: tuple[int, int] | None  # input size of the position embeddings; None = any size natively
    size_multiple: int  # input sides must be multiples of this (patch size, or patch x merge for Qwen)


@dataclass(frozen=True)
class TowerCall:
    """One prepared tower call: `tower(*args, **kwargs)`, and how a block's output becomes [B, D, gh, gw]."""

    args: tuple
    kwargs: dict
    to_grid: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TowerKind:
    name: str
    model_types: tuple[str, ...]  # the tower config's model_type values of this kind
    block_paths: tuple[str, ...]  # candidate paths of the block ModuleList (first that exists wins)
    norm_paths: tuple[str, ...]  # candidate paths of the final norm (empty: a parameter-free LayerNorm)
    geometry: Callable[[nn.Module], TowerGeometry]
    prepare: Callable[[nn.Module, torch.Tensor, TowerGeometry], TowerCall]
    lora_aliases: dict[str, str] = field(default_factory=dict)
    dynamic_size: bool = False  # the processor sizes images dynamically (min/max pixels), not to one size
    # The forward issues no read-back to the host, so a whole training step can be captured as a CUDA graph
    # (geod.stage2_distill.graphed_step). Idefics3 counts each image's patches and Qwen2.5-VL builds its
    # window indices on the host.
    graph_safe: bool = True
    # Applied once to a loaded tower: faster paths with the same values (Qwen2.5-VL: equal windows in one
    # attention call, see qwen_windows); returns how many modules it changed.
    speed_up: Callable[[nn.Module], int] | None = None

    def block_path(self, tower: nn.Module) -> str:
        return _first_path(tower, self.block_paths, f"{self.name} tower blocks")

    def norm_path(self, tower: nn.Module) -> str | None:
        return _first_path(tower, self.norm_paths, f"{self.name} final norm") if self.norm_paths else None


def _first_path(module: nn.Module, paths: tuple[str, ...], what: str) -> str:
    for path in paths:
        try:
            module.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise StudentError(f"cannot find the {what} (looked for {', '.join(paths)}) in {type(module).__name__}")


# ---------------------------------------------------------------------------------------------------------
# sequence towers: [B, prefix + h*w, D] tokens in raster order


@dataclass(frozen=True)
class RasterGrid:
    """A sequence tower's block output [B, prefix + h * w, D] (patches in raster order after `prefix` tokens)
    -> its patch grid [B, D, h, w], a view. A plain value: a compiled section can take it as an argument (its
    fields are guarded as constants) and cut the grids from the tokens itself."""

    prefix: int
    grid: tuple[int, int]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix:]
        batch, count, dim = patches.shape
        height, width = self.grid
        if count != height * width:
            raise StudentError(f"a block gave {count} patch tokens, expected {height}x{width}")
        return patches.transpose(1, 2).reshape(batch, dim, height, width)


def _grid_of(pixel_values: torch.Tensor, geometry: TowerGeometry) -> tuple[int, int]:
    height, width = pixel_values.shape[-2:]
    return height // geometry.patch_size, width // geometry.patch_size


def _hf_geometry(prefix: int) -> Callable[[nn.Module], TowerGeometry]:
    def geometry(tower: nn.Module) -> TowerGeometry:
        config = tower.config
        side = int(config.image_size)
        return TowerGeometry(hidden_size=int(config.hidden_size), num_blocks=int(config.num_hidden_layers),
                             patch_size=int(config.patch_size), num_prefix_tokens=prefix, native_size=(side, side),
                             size_multiple=int(config.patch_size))
    return geometry


def _prepare_interpolating(tower: nn.Module, pixel_values: torch.Tensor, geometry: TowerGeometry) -> TowerCall:
    """CLIP / SigLIP: position embeddings are interpolated when the input is not the native size."""
    grid = _grid_of(pixel_values, geometry)
    interpolate = tuple(pixel_values.shape[-2:]) != geometry.native_size
    return TowerCall((), {"pixel_values": pixel_values, "interpolate_pos_encoding": interpolate},
                     RasterGrid(geometry.num_prefix_tokens, grid))


def _prepare_navit(tower: nn.Module, pixel_values: torch.Tensor, geometry: TowerGeometry) -> TowerCall:
    """Idefics3 / SmolVLM: positions are bucketed fractional coordinates, so any size works as is."""
    grid = _grid_of(pixel_values, geometry)
    return TowerCall((), {"pixel_values": pixel_values}, RasterGrid(0, grid))


# ---------------------------------------------------------------------------------------------------------
# Qwen2.5-VL: flattened patches, 2x2 merge units, window-permuted token order


def _qwen_geometry(tower: nn.Module) -> TowerGeometry:
    config = tower.config
    return TowerGeometry(hidden_size=int(config.hidden_size), num_blocks=int(config.depth),
                         patch_size=int(config.patch_size), num_prefix_tokens=0, native_size=None,
                         size_multiple=int(config.patch_size) * int(config.spatial_merge_size))


def qwen_flatten(pixel_values: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[B, C, H, W] images -> Qwen2-VL's flat patch rows [B*gh*gw, C*temporal*patch*patch].

    Rows come merge unit by merge unit (units in raster order, the merge x merge patches of a unit in raster
    order inside it), each patch repeated `temporal` times as a still image is; the layout of
    Qwen2VLImageProcessor.
    """
    batch, channels, height, width = pixel_values.shape
    gh, gw = height // patch, width // patch
    x = pixel_values.reshape(batch, channels, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, m, m, C, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(batch * gh * gw, channels * temporal * patch * patch)


def qwen_window_index(tower: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The permutation of merge units the tower applies for window attention (the tower's own code)."""
    if hasattr(tower, "get_window_index"):  # transformers releases that keep it on the tower
        return tower.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

    config = tower.config
    return get_vision_window_index(grid_thw, spatial_merge_size=config.spatial_merge_size,
                                   window_size=config.window_size, patch_size=config.patch_size)[0]


def qwen_units_to_grid(units: torch.Tensor, batch: int, grid: tuple[int, int], merge: int) -> torch.Tensor:
    """Tokens in processor order (merge units in raster order) [B*gh*gw, D] -> raster grid [B, D, gh, gw]."""
    gh, gw = grid
    dim = units.shape[-1]
    x = units.reshape(batch, gh // merge, gw // merge, merge, merge, dim)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, dim, gh, gw)


def _prepare_qwen(tower: nn.Module, pixel_values: torch.Tensor, geometry: TowerGeometry) -> TowerCall:
    config = tower.config
    merge = int(config.spatial_merge_size)
    batch = pixel_values.shape[0]
    grid = _grid_of(pixel_values, geometry)
    flat = qwen_flatten(pixel_values, geometry.patch_size, merge, int(config.temporal_patch_size))
    grid_thw = torch.tensor([[1, grid[0], grid[1]]] * batch, device=pixel_values.device)
    window = qwen_window_index(tower, grid_thw).to(pixel_values.device)
    restore = torch.argsort(window)
    unit = merge * merge

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        # Block outputs are [B*gh*gw, D] with merge units in window order: undo that, then the unit layout.
        units = tokens.reshape(-1, unit, tokens.shape[-1])[restore]
        return qwen_units_to_grid(units.reshape(-1, tokens.shape[-1]), batch, grid, merge)

    return TowerCall((), {"hidden_states": flat, "grid_thw": grid_thw}, to_grid)


# ---------------------------------------------------------------------------------------------------------
# timm ViT (dynamic_img_size=True)


def _timm_geometry(tower: nn.Module) -> TowerGeometry:
    patch = tower.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    native = tuple(int(v) for v in tower.patch_embed.img_size)
    return TowerGeometry(hidden_size=int(tower.embed_dim), num_blocks=len(tower.blocks), patch_size=patch,
                         num_prefix_tokens=int(tower.num_prefix_tokens), native_size=native, size_multiple=patch)


def _prepare_timm(tower: nn.Module, pixel_values: torch.Tensor, geometry: TowerGeometry) -> TowerCall:
    grid = _grid_of(pixel_values, geometry)
    return TowerCall((pixel_values,), {}, RasterGrid(geometry.num_prefix_tokens, grid))


_FUSED_QKV = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv"}

TOWER_KINDS: dict[str, TowerKind] = {kind.name: kind for kind in (
    TowerKind(name="clip", model_types=("clip_vision_model",), block_paths=("encoder.layers",
              "vision_model.encoder.layers"), norm_paths=("post_layernorm", "vision_model.post_layernorm"),
              geometry=_hf_geometry(1), prepare=_prepare_interpolating),
    TowerKind(name="siglip", model_types=("siglip_vision_model",), block_paths=("encoder.layers",
              "vision_model.encoder.layers"), norm_paths=("post_layernorm", "vision_model.post_layernorm"),
              geometry=_hf_geometry(0), prepare=_prepare_interpolating),
    TowerKind(name="idefics3", model_types=("idefics3_vision", "smolvlm_vision"), block_paths=("encoder.layers",),
              norm_paths=("post_layernorm",), geometry=_hf_geometry(0), prepare=_prepare_navit, graph_safe=False),
    TowerKind(name="qwen2_5_vl", model_types=("qwen2_5_vl_vision",), block_paths=("blocks",),
              norm_paths=("merger.ln_q",), geometry=_qwen_geometry, prepare=_prepare_qwen,
              lora_aliases=_FUSED_QKV, dynamic_size=True, graph_safe=False, speed_up=route_equal_windows),
    TowerKind(name="timm", model_types=(), block_paths=("blocks",), norm_paths=("norm",), geometry=_timm_geometry,
              prepare=_prepare_timm, lora_aliases=_FUSED_QKV),
)}


def tower_kind_for(tower: nn.Module, where: str) -> TowerKind:
    """The kind of a transformers vision tower, from its config's model_type."""
    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    for kind in TOWER_KINDS.values():
        if model_type in kind.model_types:
            return kind
    known = sorted(t for kind in TOWER_KINDS.values() for t in kind.model_types)
    raise StudentError(f"{where}: its vision tower {type(tower).__name__} (model_type {model_type!r}) is not a "
                       f"supported tower; supported tower model_types: {known}")


# ---------------------------------------------------------------------------------------------------------
# input size from a processor config


def _fixed_size(processor: dict) -> tuple[int, int] | None:
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    size = size or processor.get("size") or {}
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return (int(size["shortest_edge"]),) * 2
    # Idefics3 / SmolVLM split large images into tiles of max_image_size; the tower sees one tile.
    tile = processor.get("max_image_size") or {}
    if "longest_edge" in tile:
        return (int(tile["longest_edge"]),) * 2
    if "longest_edge" in size:
        return (int(size["longest_edge"]),) * 2
    return None


def _dynamic_size(processor: dict, multiple: int) -> tuple[int, int]:
    """A square of about DYNAMIC_DEFAULT_PIXELS, kept within the processor's min / max pixels."""
    size = processor.get("size") or {}
    low = int(processor.get("min_pixels") or size.get("shortest_edge") or 0)
    high = int(processor.get("max_pixels") or size.get("longest_edge") or DYNAMIC_DEFAULT_PIXELS)
    pixels = min(max(DYNAMIC_DEFAULT_PIXELS, low), high)
    side = max(multiple, int(math.sqrt(pixels)) // multiple * multiple)
    if side * side < low:
        side += multiple
    return side, side


def processor_image_size(processor: dict, kind: TowerKind, geometry: TowerGeometry, where: str) -> tuple[int, int]:
    """The input size a processor config implies for this tower (used when student.image_size is unset)."""
    if kind.dynamic_size:
        return _dynamic_size(processor, geometry.size_multiple)
    size = _fixed_size(processor)
    if size is None:
        raise StudentError(f"{where}: cannot tell the input size from {PROCESSOR_FILE} "
                           f"({processor.get('size')}); set student.image_size")
    return size
