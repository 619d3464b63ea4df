"""Students: the vision encoders geod distils into, looked up by name in a small registry.

A `Student` wraps one vision tower and exposes what distillation needs, whatever the model family: the
output of every transformer block up to the one that matters as a patch grid [B, D, gh, gw] in raster
order, the final norm, the patch grid of an input size, and its own preprocessing (size, mean, std,
resampling) read from its own processor config.

Names understood by `create_student` (`supported_students()` says the same at run time):
- tiny random-initialised students (seeded) for tests and demos: tiny-clip, tiny-siglip, tiny-llava,
  tiny-llava-onevision, tiny-paligemma, tiny-idefics3, tiny-smolvlm, tiny-qwen2_5_vl, tiny-timm;
- a local directory or a hub id, its family read from config.json `model_type`:
  clip / siglip (a vision tower or a full two-tower model), llava, llava_onevision, paligemma, idefics3,
  smolvlm, qwen2_5_vl (the whole VLM is loaded; its vision tower is the student, see vlm_towers);
- timm ViTs: "timm" (the method's backbone), "timm:<name>", "timm/<name>", a saved timm folder.

For a VLM the student keeps the full model (`Student.vlm()`, `Student.tower_prefix`) so the distilled
tower can be merged back and saved as the VLM. `num_layers` counts the tower blocks up to and including the
one the VLM feeds to its projector (`fed_layer`); later blocks are neither run nor adapted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from geod.pipeline.errors import StudentError
from geod.stage2_distill.config import StudentConfig
from geod.stage2_distill.student_families import (
    PROCESSOR_FILE,
    TOWER_KINDS,
    TowerGeometry,
    TowerKind,
    processor_image_size,
    tower_kind_for,
)
from geod.stage2_distill.timm_student import build_timm, is_timm_dir, is_timm_name, save_timm
from geod.stage2_distill.tiny_students import TINY, build_tiny
from geod.stage2_distill.vlm_towers import VLM_FAMILIES, VlmHandle, load_vlm, vlm_family_for, vlm_handle
from torch import nn

# Bare towers: registry family -> (transformers class, config.json model_type values)
TOWER_FAMILIES = {"clip": ("CLIPVisionModel", ("clip", "clip_vision_model")),
                  "siglip": ("SiglipVisionModel", ("siglip", "siglip_vision_model"))}


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How an image becomes the student's input: resize the whole image (no crop, so normalised image
    coordinates keep their meaning) to `image_size` = (H, W), scale to [0, 1], normalise per channel."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL resampling filter code (3 = bicubic)
    rescale_factor: float = 1.0 / 255.0

    def __call__(self, image) -> np.ndarray:
        """HxWx3 RGB (a uint8 or float array, or an RGB PIL image) -> 3xHxW float32, ready for the student."""
        image = self._resized(image)
        if image.dtype != np.uint8:
            pixels = self._normalise(image.astype(np.float32))
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
        # A uint8 channel has 256 values: normalise those once (the same float32 operations, so the same
        # bits) and look every pixel up, about twice as fast as the arithmetic on the whole image.
        table = self.table()
        planes = np.ascontiguousarray(image.transpose(2, 0, 1))
        return np.stack([np.take(table[:, c], planes[c]) for c in range(3)])

    def resize_only(self, image) -> np.ndarray:
        """HxWx3 uint8 RGB (an array or an RGB PIL image) -> 3xHxW uint8 at the student's size, not yet
        normalised (see `normalise_tensor`)."""
        if isinstance(image, np.ndarray) and image.dtype != np.uint8:
            raise ValueError(f"Preprocessing.resize_only expects uint8 pixels, got {image.dtype}")
        return np.ascontiguousarray(self._resized(image).transpose(2, 0, 1))

    @property
    def resizes_on_device(self) -> bool:
        """Whether `geod.stage2_distill.resize.Resizer` reproduces this preprocessing's filter (all but NEAREST)."""
        from geod.stage2_distill.resize import FILTERS

        return self.resample in FILTERS

    def table(self) -> np.ndarray:
        """[256, 3] float32: the normalised value of each uint8 level per channel."""
        return self._normalise(np.arange(256, dtype=np.float32)[:, None])

    def device_table(self, device):
        """`table` as a torch tensor [3, 256] (channel-major) on `device`, for `normalise_tensor`. Build it once
        and reuse it: a copy from pageable host memory waits for all work queued on the device."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.table().T)).to(device)

    def normalise_tensor(self, pixels, table=None):
        """uint8 pixels [..., 3, H, W] (a torch tensor, any device) -> float32, bitwise equal to `__call__`:
        the same table (`device_table`, built here when not given), looked up where the pixels are."""
        import torch

        table = self.device_table(pixels.device) if table is None else table
        offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(3, 1, 1)
        return torch.take(table, pixels.long() + offsets)

    def _resized(self, image) -> np.ndarray:
        from PIL import Image

        height, width = self.image_size
        if isinstance(image, np.ndarray):
            if image.shape[:2] == (height, width):
                return image
            image = Image.fromarray(image)
        if image.size != (width, height):  # a PIL image is resized as it is: no array round trip first
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        return np.asarray(image)

    def _normalise(self, values: np.ndarray) -> np.ndarray:
        """float32 values [..., 3] -> (values * rescale_factor - mean) / std, per channel."""
        values = values * np.float32(self.rescale_factor)
        return (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                "resample": self.resample, "rescale_factor": self.rescale_factor}


@dataclass(frozen=True)
class BlockOutputs:
    """The outputs of a student's first blocks as its tower gives them (tokens, each after its bottleneck
    adapter), and `to_grid`, which makes one of them a raster grid [B, D, h, w]."""

    tokens: list[torch.Tensor]
    to_grid: Callable[[torch.Tensor], torch.Tensor]

    def grids(self) -> list[torch.Tensor]:
        return [self.to_grid(tokens) for tokens in self.tokens]


class _FedLayerReached(Exception):
    """Raised by the hook of the last block a student needs, to skip the blocks after it."""


class Student(nn.Module):
    """A vision tower seen as a stack of blocks whose outputs are patch grids.

    forward(pixel_values [B, 3, H, W]) -> list of `num_layers` tensors [B, D, H/p, W/p], the output of
    blocks 0 .. fed_layer (prefix tokens such as CLS dropped, raster order), each after the bottleneck
    adapter attached to that block if any.
    """

    def __init__(self, *, name: str, family: str, tower: nn.Module, kind: TowerKind, geometry: TowerGeometry,
                 num_layers: int, preprocessing: Preprocessing, processor_config: dict, source: dict,
                 vlm: VlmHandle | None = None) -> None:
        super().__init__()
        self.name = name
        self.family = family
        self.tower = tower  # what peft wraps; for a VLM the same object as vlm().get_submodule(tower_prefix)
        self.kind = kind
        self.geometry = geometry
        self.block_path = kind.block_path(tower)
        self.final_norm_path = kind.norm_path(tower)
        self.hidden_size = geometry.hidden_size
        self.patch_size = geometry.patch_size
        self.num_prefix_tokens = geometry.num_prefix_tokens
        self.native_size = geometry.native_size
        self.tower_layers = geometry.num_blocks
        self.num_layers = num_layers
        self.preprocessing = preprocessing
        self.processor_config = processor_config
        self.source = source
        self.vlm_handle = vlm  # a plain attribute: the language model is not part of this module's tree
        # Filled by geod.stage2_distill.adapters.attach_bottlenecks: block index (str) -> adapter.
        self.block_adapters = nn.ModuleDict()

    # -- structure -------------------------------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The tower under any peft wrapper."""
        return self.tower.get_base_model() if hasattr(self.tower, "get_base_model") else self.tower

    def blocks(self) -> nn.ModuleList:
        return self.base_model().get_submodule(self.block_path)

    def block_module_name(self, index: int) -> str:
        """Name of block `index` inside the tower (what peft's target names are relative to)."""
        return f"{self.block_path}.{index}"

    @property
    def fed_layer(self) -> int:
        """Index of the block whose output the VLM feeds its projector (the last block of a bare tower);
        always num_layers - 1: the student stops there."""
        return self.num_layers - 1

    @property
    def is_vlm(self) -> bool:
        return self.vlm_handle is not None

    def vlm(self) -> nn.Module:
        """The full VLM the tower belongs to. LoRA applied to the student is inside it (same modules); after
        `adapters.merge_lora(student)` its weights are the distilled ones and `save_pretrained` works. Its
        language model stays on the device it was loaded on (CPU); the tower moves with the student."""
        if self.vlm_handle is None:
            raise StudentError(f"student {self.name} ({self.family}) is a bare vision tower, not part of a VLM")
        return self.vlm_handle.model

    @property
    def tower_prefix(self) -> str | None:
        """Module path of the tower inside `vlm()` (e.g. "model.vision_tower"); None for a bare tower."""
        return None if self.vlm_handle is None else self.vlm_handle.tower_prefix

    def vlm_module_name(self, tower_name: str) -> str:
        """A module or parameter name inside the (unwrapped) tower, as named inside the VLM."""
        if self.vlm_handle is None:
            return tower_name
        return f"{self.vlm_handle.tower_prefix}.{tower_name}" if tower_name else self.vlm_handle.tower_prefix

    def final_norm(self, grid: torch.Tensor) -> torch.Tensor:
        """Apply the tower's final norm over the channel axis of a [B, D, h, w] grid."""
        return self.final_norm_last(grid).permute(0, 3, 1, 2)

    def final_norm_last(self, grid: torch.Tensor) -> torch.Tensor:
        """`final_norm` of a [B, D, h, w] grid, returned as [B, h, w, D]."""
        # Channels last as [B, h, w, D]: block grids are views of [B, h*w, D] tokens, so this is contiguous and
        # the norm reads it in place (a transpose of h and w would force a strided copy); the same values.
        channels_last = grid.permute(0, 2, 3, 1)
        if self.final_norm_path is None:
            return nn.functional.layer_norm(channels_last, (grid.shape[1],))
        return self.base_model().get_submodule(self.final_norm_path)(channels_last)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.image_size

    def patch_grid(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        height, width = image_size or self.image_size
        return height // self.patch_size, width // self.patch_size

    def describe(self) -> dict:
        """What `RUN/student.json` records about the base model."""
        return {"name": self.name, "family": self.family, "source": self.source, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "tower_layers": self.tower_layers, "fed_layer": self.fed_layer,
                "patch_size": self.patch_size, "size_multiple": self.geometry.size_multiple,
                "native_size": None if self.native_size is None else list(self.native_size),
                "grid": list(self.patch_grid()), "preprocessing": self.preprocessing.to_dict(),
                "vlm": None if self.vlm_handle is None else self.vlm_handle.describe()}

    # -- inference ---------------------------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 HxWx3 RGB images -> pixel_values [B, 3, H, W] at the student's size and normalisation."""
        return torch.from_numpy(np.stack([self.preprocessing(image) for image in images]))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The grids [B, D, h, w] of blocks 0 .. fed_layer."""
        return self.run_blocks(pixel_values).grids()

    def run_blocks(self, pixel_values: torch.Tensor,
                   after_block: Callable[[int, BlockOutputs], None] | None = None) -> BlockOutputs:
        """The outputs of blocks 0 .. fed_layer as the tower gives them, with the way to make them grids.
        `after_block(index, so_far)` is called as each block finishes, with the outputs of blocks 0 .. index:
        work on early blocks can be queued while the later ones run."""
        height, width = pixel_values.shape[-2:]
        multiple = self.geometry.size_multiple
        if height % multiple or width % multiple:
            raise StudentError(f"student {self.name}: input {height}x{width} is not a multiple of {multiple} "
                               f"(its patch size{' x merge size' if multiple != self.patch_size else ''})")
        call = self.kind.prepare(self.base_model(), pixel_values, self.geometry)
        outputs: list[torch.Tensor] = []
        last = self.num_layers - 1
        skip_rest = self.num_layers < self.tower_layers

        # Hooks (rather than output_hidden_states) so that adapters change what the next block sees and the
        # recorded outputs are post-adapter, for any tower that is a stack of blocks.
        adapters = {int(key): module for key, module in self.block_adapters.items()}

        def hook(index: int) -> Callable:
            def on_output(_module, _inputs, output):
                tokens = output if isinstance(output, torch.Tensor) else output[0]
                adapter = adapters.get(index)
                if adapter is not None:
                    tokens = adapter(tokens)
                if len(outputs) != index:  # the list's order is the blocks' order
                    raise StudentError(f"student {self.name}: block {index} ran out of order or twice")
                outputs.append(tokens)
                if after_block is not None:
                    after_block(index, BlockOutputs(list(outputs), call.to_grid))
                if skip_rest and index == last:
                    raise _FedLayerReached
                if adapter is None:
                    return None
                return tokens if isinstance(output, torch.Tensor) else (tokens, *output[1:])
            return on_output

        blocks = self.blocks()
        handles = [blocks[i].register_forward_hook(hook(i)) for i in range(self.num_layers)]
        try:
            self.tower(*call.args, **call.kwargs)
        except _FedLayerReached:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return BlockOutputs(outputs, call.to_grid)


# ---------------------------------------------------------------------------------------------------------
# registry


def student_names() -> list[str]:
    return sorted(TINY) + ["tiny-timm"] + sorted(TOWER_FAMILIES) + sorted(VLM_FAMILIES) + ["timm"]


def supported_students() -> str:
    """A one-paragraph list of what `create_student` accepts (used in error messages)."""
    types = [f"{name} ({', '.join(types)})" for name, (_, types) in sorted(TOWER_FAMILIES.items())]
    types += [f"{name} ({', '.join(family.model_types)})" for name, family in sorted(VLM_FAMILIES.items())]
    return (f"tiny students: {', '.join(sorted(TINY) + ['tiny-timm'])}; local directories or hub ids whose "
            f"config.json model_type is one of: {'; '.join(types)}; timm ViTs: 'timm', 'timm:<model name>', "
            f"'timm/<model name>' or a saved timm folder")


def _family_for_model_type(model_type: str, where: str) -> str:
    for family, (_, types) in TOWER_FAMILIES.items():
        if model_type in types:
            return family
    vlm = vlm_family_for(model_type)
    if vlm is not None:
        return vlm.name
    raise StudentError(f"{where}: model_type {model_type!r} is not a supported student (a vision tower or a "
                       f"vision-language model is needed). Supported: {supported_students()}")


def _preprocessing(processor: dict, image_size: tuple[int, int], where: str) -> Preprocessing:
    try:
        mean = tuple(float(v) for v in processor["image_mean"])
        std = tuple(float(v) for v in processor["image_std"])
    except (KeyError, TypeError, ValueError):
        raise StudentError(f"{where}: {PROCESSOR_FILE} lacks image_mean / image_std") from None
    return Preprocessing(image_size=tuple(int(v) for v in image_size), mean=mean, std=std,
                         resample=int(processor.get("resample", 3)),
                         rescale_factor=float(processor.get("rescale_factor", 1.0 / 255.0)))


def _load_pretrained(cfg: StudentConfig, where: str) -> tuple[nn.Module, str, dict, dict]:
    import transformers
    from transformers import AutoConfig
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        model_type = AutoConfig.from_pretrained(cfg.name_or_path).model_type
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: not a known student name and no readable model config at that path or "
                           f"hub id ({exc}). Supported: {supported_students()}") from None
    family = _family_for_model_type(model_type, where)
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(cfg.name_or_path)
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: no image processor config ({PROCESSOR_FILE}); the student's "
                           f"normalisation must come from it: {exc}") from None
    if family in VLM_FAMILIES:
        model = load_vlm(cfg.name_or_path, VLM_FAMILIES[family], where)
    else:
        model_class = getattr(transformers, TOWER_FAMILIES[family][0])
        try:
            model = model_class.from_pretrained(cfg.name_or_path)
        except (OSError, ValueError) as exc:
            raise StudentError(f"{where}: cannot load the {model_class.__name__}: {exc}") from None
    local = Path(cfg.name_or_path).is_dir()
    source = {"kind": "local" if local else "hub",
              "name_or_path": str(Path(cfg.name_or_path).resolve()) if local else cfg.name_or_path}
    return model, family, processor, source


def create_student(cfg: StudentConfig) -> Student:
    """Build the student named by `cfg.name_or_path` (frozen base weights, no adapters yet)."""
    name = cfg.name_or_path
    where = f"student {name!r}"
    if is_timm_name(name) or is_timm_dir(name):
        if cfg.attn_implementation is not None:
            raise StudentError(f"{where}: student.attn_implementation applies to transformers students; a timm "
                               f"ViT picks its own fused attention")
        model, processor, source = build_timm(name, seed=cfg.seed, overrides=cfg.tiny_overrides)
        family = "timm"
    elif name in TINY:
        model, spec, processor = build_tiny(name, cfg.seed, cfg.tiny_overrides)
        family = spec.family
        source = {"kind": "tiny", "name": name, "seed": cfg.seed, "overrides": dict(cfg.tiny_overrides)}
    elif name.startswith("tiny-"):
        raise StudentError(f"{where}: no such tiny student. Supported: {supported_students()}")
    else:
        model, family, processor, source = _load_pretrained(cfg, where)

    if cfg.attn_implementation is not None:
        use_attention(model, cfg.attn_implementation, where)
    handle = None
    if family in VLM_FAMILIES:
        tower, handle = vlm_handle(model, VLM_FAMILIES[family], where)
        model.requires_grad_(False)
        model.eval()
    else:
        tower = model.float()
    kind = TOWER_KINDS["timm"] if family == "timm" else tower_kind_for(tower, where)
    if kind.speed_up is not None:
        kind.speed_up(tower)
    geometry = kind.geometry(tower)
    multiple = geometry.size_multiple
    image_size = cfg.image_size
    if image_size is None:
        # A processor size that is no multiple of the patch (SigLIP so400m: 384 px, patch 14) makes the tower's
        # patch conv drop the last pixels; resizing to the multiple below keeps every pixel and exact coordinates.
        height, width = processor_image_size(processor, kind, geometry, where)
        image_size = (max(height // multiple, 1) * multiple, max(width // multiple, 1) * multiple)
    preprocessing = _preprocessing(processor, image_size, where)
    height, width = preprocessing.image_size
    if height % multiple or width % multiple:
        raise StudentError(f"{where}: image size {height}x{width} is not a multiple of its patch size "
                           f"{multiple}; choose student.image_size accordingly")
    tower.requires_grad_(False)
    tower.eval()
    num_layers = geometry.num_blocks if handle is None else handle.fed_layer + 1
    return Student(name=name, family=family, tower=tower, kind=kind, geometry=geometry, num_layers=num_layers,
                   preprocessing=preprocessing, processor_config=dict(processor), source=source, vlm=handle)


def use_attention(model: nn.Module, implementation: str, where: str) -> None:
    """Switch a transformers model (a VLM with its tower and language model alike) to another attention
    implementation, or fail naming the setting."""
    if not hasattr(model, "set_attn_implementation"):
        raise StudentError(f"{where}: student.attn_implementation needs a transformers release with "
                           f"set_attn_implementation")
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError, KeyError) as exc:
        first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise StudentError(f"{where}: student.attn_implementation={implementation!r}: {first_line}") from None
    if model.config._attn_implementation != implementation:  # the model only warned that it cannot switch
        raise StudentError(f"{where}: {type(model).__name__} cannot switch its attention to {implementation!r} "
                           f"(it stays {model.config._attn_implementation!r})")


def save_base(student: Student, directory: Path) -> None:
    """Save the student's base model (the full VLM for a VLM student) and its processor config, so that
    `create_student` loads it back from `directory` exactly as it would a hub id."""
    if hasattr(student.tower, "peft_config"):
        raise StudentError(f"student {student.name}: save_base saves the base model; call it before LoRA is "
                           f"applied (or merge the LoRA first with adapters.merge_lora)")
    directory.mkdir(parents=True, exist_ok=True)
    if student.family == "timm":
        save_timm(student.base_model(), student.source["timm"], directory)
    elif student.is_vlm:
        student.vlm().save_pretrained(directory)
    else:
        student.base_model().save_pretrained(directory)
    processor = dict(student.processor_config)
    if "image_processor_type" not in processor and student.family in TOWER_FAMILIES:
        processor["image_processor_type"] = TOWER_FAMILIES[student.family][0].replace("VisionModel",
                                                                                      "ImageProcessor")
    (directory / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
