"""Students: the vision encoders geod distils into, looked up by name in a small registry.

A `Student` wraps one transformer vision tower and exposes what distillation needs, whatever the model
family: the output of every transformer block as a patch grid, the final norm, the patch grid of an input
size, and its own preprocessing (size, mean, std, resampling) read from its processor config.

Names understood by `create_student`:
- "tiny-clip", "tiny-siglip": random-initialised tiny towers (seeded), for tests and demos;
- a local directory or a hub id holding a CLIP or SigLIP model (vision tower or full two-tower model);
  the family is read from its config.json `model_type`.
New families (e.g. the vision towers of LLaVA or Qwen2.5-VL) register a builder in `_FAMILY_BUILDERS`.
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
from torch import nn

PROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How an image becomes the student's input: resize the whole image (no crop, so normalised image
    coordinates keep their meaning) to `image_size` = (H, W), scale to [0, 1], normalise per channel."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL resampling filter code (3 = bicubic)
    rescale_factor: float = 1.0 / 255.0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> 3xHxW float32, ready for the student."""
        from PIL import Image

        height, width = self.image_size
        if image.shape[:2] != (height, width):
            resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling(self.resample))
            image = np.asarray(resized)
        pixels = image.astype(np.float32) * np.float32(self.rescale_factor)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                "resample": self.resample, "rescale_factor": self.rescale_factor}


class Student(nn.Module):
    """A vision tower seen as a stack of blocks whose outputs are patch grids.

    forward(pixel_values [B, 3, H, W]) -> list of L tensors [B, D, H/p, W/p], the output of every block
    (prefix tokens such as CLS dropped), after any bottleneck adapter attached to that block.
    """

    def __init__(self, *, name: str, family: str, tower: nn.Module, block_path: str, final_norm_path: str | None,
                 hidden_size: int, num_layers: int, patch_size: int, num_prefix_tokens: int,
                 native_size: tuple[int, int], preprocessing: Preprocessing, source: dict) -> None:
        super().__init__()
        self.name = name
        self.family = family
        self.tower = tower
        self.block_path = block_path
        self.final_norm_path = final_norm_path
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.patch_size = patch_size
        self.num_prefix_tokens = num_prefix_tokens
        self.native_size = native_size
        self.preprocessing = preprocessing
        self.source = source
        # Filled by geod.stage2_distill.adapters.attach_bottlenecks: block index (str) -> adapter.
        self.block_adapters = nn.ModuleDict()

    # -- structure -------------------------------------------------------------------------------------------
    def base_model(self) -> nn.Module:
        """The transformers model under any peft wrapper."""
        return self.tower.get_base_model() if hasattr(self.tower, "get_base_model") else self.tower

    def blocks(self) -> nn.ModuleList:
        return self.base_model().get_submodule(self.block_path)

    def block_module_name(self, index: int) -> str:
        """Name of block `index` inside the transformers model (what peft's target names are relative to)."""
        return f"{self.block_path}.{index}"

    def final_norm(self, grid: torch.Tensor) -> torch.Tensor:
        """Apply the tower's final LayerNorm over the channel axis of a [B, D, h, w] grid."""
        if self.final_norm_path is None:
            return nn.functional.layer_norm(grid.transpose(1, -1), (grid.shape[1],)).transpose(1, -1)
        norm = self.base_model().get_submodule(self.final_norm_path)
        return norm(grid.transpose(1, -1)).transpose(1, -1)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.image_size

    def patch_grid(self, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        height, width = image_size or self.image_size
        return height // self.patch_size, width // self.patch_size

    def describe(self) -> dict:
        """What `RUN/student.json` records about the base model."""
        return {"name": self.name, "family": self.family, "source": self.source, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "patch_size": self.patch_size,
                "native_size": list(self.native_size), "grid": list(self.patch_grid()),
                "preprocessing": self.preprocessing.to_dict()}

    # -- inference ---------------------------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 HxWx3 RGB images -> pixel_values [B, 3, H, W] at the student's size and normalisation."""
        return torch.from_numpy(np.stack([self.preprocessing(image) for image in images]))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise StudentError(f"student {self.name}: input {height}x{width} is not a multiple of the patch "
                               f"size {self.patch_size}")
        grid = (height // self.patch_size, width // self.patch_size)
        outputs: dict[int, torch.Tensor] = {}

        # Hooks (rather than output_hidden_states) so that adapters change what the next block sees and the
        # recorded grids are post-adapter, for any tower that is a plain stack of blocks.
        adapters = {int(key): module for key, module in self.block_adapters.items()}

        def hook(index: int) -> Callable:
            def on_output(_module, _inputs, output):
                tokens = output if isinstance(output, torch.Tensor) else output[0]
                adapter = adapters.get(index)
                if adapter is not None:
                    tokens = adapter(tokens)
                outputs[index] = tokens
                if adapter is None:
                    return None
                return tokens if isinstance(output, torch.Tensor) else (tokens, *output[1:])
            return on_output

        handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(self.blocks())]
        try:
            self.tower(pixel_values=pixel_values,
                       interpolate_pos_encoding=(height, width) != tuple(self.native_size))
        finally:
            for handle in handles:
                handle.remove()
        grids = []
        for index in range(self.num_layers):
            tokens = outputs[index][:, self.num_prefix_tokens:]
            batch, count, dim = tokens.shape
            if count != grid[0] * grid[1]:
                raise StudentError(f"student {self.name}: block {index} gave {count} patch tokens, "
                                   f"expected {grid[0]}x{grid[1]}")
            grids.append(tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1]))
        return grids


# ---------------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Family:
    """How to load one transformers model family as a Student."""

    model_class: str  # transformers class of the vision tower
    model_types: tuple[str, ...]  # config.json model_type values that map to this family
    block_path: str
    final_norm_path: str | None
    num_prefix_tokens: int


_FAMILIES: dict[str, _Family] = {
    "clip": _Family("CLIPVisionModel", ("clip", "clip_vision_model"), "encoder.layers", "post_layernorm", 1),
    "siglip": _Family("SiglipVisionModel", ("siglip", "siglip_vision_model"), "encoder.layers",
                      "post_layernorm", 0),
}

_TINY: dict[str, tuple[str, dict, dict]] = {
    # name -> (family, vision config, processor config); sized so that a few minutes of CPU training move it
    "tiny-clip": ("clip",
                  {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "image_size": 64, "patch_size": 8},
                  {"mean": "OPENAI_CLIP_MEAN", "std": "OPENAI_CLIP_STD", "resample": 3}),
    "tiny-siglip": ("siglip",
                    {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "image_size": 64, "patch_size": 8, "vision_use_head": False},
                    {"mean": "IMAGENET_STANDARD_MEAN", "std": "IMAGENET_STANDARD_STD", "resample": 2}),
}


def student_names() -> list[str]:
    return sorted(_TINY) + sorted(_FAMILIES)


def _family_for_model_type(model_type: str, where: str) -> str:
    for family, spec in _FAMILIES.items():
        if model_type in spec.model_types:
            return family
    known = sorted(t for spec in _FAMILIES.values() for t in spec.model_types)
    raise StudentError(f"{where}: model_type {model_type!r} is not a supported student (known: {known})")


def _processor_preprocessing(processor: dict, image_size: tuple[int, int] | None, where: str) -> Preprocessing:
    try:
        mean = tuple(float(v) for v in processor["image_mean"])
        std = tuple(float(v) for v in processor["image_std"])
    except (KeyError, TypeError, ValueError):
        raise StudentError(f"{where}: {PROCESSOR_FILE} lacks image_mean / image_std") from None
    if image_size is None:
        size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
        size = size or processor.get("size") or {}
        if "height" in size and "width" in size:
            image_size = (int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            image_size = (int(size["shortest_edge"]),) * 2
        else:
            raise StudentError(f"{where}: cannot tell the input size from {PROCESSOR_FILE} ({size}); "
                               f"set student.image_size")
    return Preprocessing(image_size=tuple(image_size), mean=mean, std=std,
                         resample=int(processor.get("resample", 3)),
                         rescale_factor=float(processor.get("rescale_factor", 1.0 / 255.0)))


def _build_tiny(cfg: StudentConfig) -> tuple[nn.Module, str, dict, dict]:
    import transformers
    from transformers import image_utils

    family, vision, proc = _TINY[cfg.name_or_path]
    vision = {**vision, **cfg.tiny_overrides}
    spec = _FAMILIES[family]
    config_class = getattr(transformers, spec.model_class.replace("Model", "Config"))
    model_class = getattr(transformers, spec.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = model_class(config_class(**vision))
    side = vision["image_size"]
    processor = {"image_mean": list(getattr(image_utils, proc["mean"])),
                 "image_std": list(getattr(image_utils, proc["std"])), "resample": proc["resample"],
                 "rescale_factor": 1.0 / 255.0, "size": {"height": side, "width": side}}
    source = {"kind": "tiny", "name": cfg.name_or_path, "seed": cfg.seed, "overrides": dict(cfg.tiny_overrides)}
    return tower, family, processor, source


def _build_pretrained(cfg: StudentConfig) -> tuple[nn.Module, str, dict, dict]:
    import transformers
    from transformers import AutoConfig
    from transformers.image_processing_base import ImageProcessingMixin

    where = f"student {cfg.name_or_path!r}"
    try:
        model_type = AutoConfig.from_pretrained(cfg.name_or_path).model_type
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: not a known student name ({', '.join(student_names())}) and no readable "
                           f"model config at that path or hub id: {exc}") from None
    family = _family_for_model_type(model_type, where)
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(cfg.name_or_path)
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: no image processor config ({PROCESSOR_FILE}); the student's "
                           f"normalisation must come from it: {exc}") from None
    model_class = getattr(transformers, _FAMILIES[family].model_class)
    try:
        tower = model_class.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: cannot load the {model_class.__name__}: {exc}") from None
    local = Path(cfg.name_or_path).is_dir()
    source = {"kind": "local" if local else "hub", "name_or_path": str(Path(cfg.name_or_path).resolve())
              if local else cfg.name_or_path}
    return tower, family, processor, source


def create_student(cfg: StudentConfig) -> Student:
    """Build the student named by `cfg.name_or_path` (frozen base weights, no adapters yet)."""
    if cfg.name_or_path in _TINY:
        tower, family, processor, source = _build_tiny(cfg)
    else:
        tower, family, processor, source = _build_pretrained(cfg)
    spec = _FAMILIES[family]
    vision = tower.config
    preprocessing = _processor_preprocessing(processor, cfg.image_size, f"student {cfg.name_or_path!r}")
    patch = int(vision.patch_size)
    height, width = preprocessing.image_size
    if height % patch or width % patch:
        raise StudentError(f"student {cfg.name_or_path!r}: image size {height}x{width} is not a multiple of its "
                           f"patch size {patch}; choose student.image_size accordingly")
    tower.requires_grad_(False)
    tower.eval()
    return Student(name=cfg.name_or_path, family=family, tower=tower, block_path=spec.block_path,
                   final_norm_path=spec.final_norm_path, hidden_size=int(vision.hidden_size),
                   num_layers=int(vision.num_hidden_layers), patch_size=patch,
                   num_prefix_tokens=spec.num_prefix_tokens, native_size=(int(vision.image_size),) * 2,
                   preprocessing=preprocessing, source=source)


def save_base(student: Student, directory: Path) -> None:
    """Save the student's base tower and processor config so `create_student` can load it from `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    student.base_model().save_pretrained(directory)
    prep = student.preprocessing
    processor = {"image_mean": list(prep.mean), "image_std": list(prep.std), "resample": prep.resample,
                 "rescale_factor": prep.rescale_factor, "do_resize": True, "do_normalize": True,
                 "do_rescale": True, "size": {"height": prep.image_size[0], "width": prep.image_size[1]},
                 "image_processor_type": f"{_FAMILIES[student.family].model_class[:-len('VisionModel')]}"
                                         f"ImageProcessor"}
    (directory / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
