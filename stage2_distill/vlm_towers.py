"""Vision-language models as students: load the whole VLM, find its vision tower, and know which block of
that tower the VLM feeds to its projector.

Only the tower is distilled: the Student runs and trains `vlm.<tower_prefix>`, and keeps the full VLM in a
`VlmHandle` (outside the torch module tree, so moving the student to a GPU moves the tower only and the
language model stays where it was loaded). LoRA injected into the tower lives in the same module objects
the VLM holds, so merging it and calling `vlm.save_pretrained` gives the distilled VLM.

The fed layer: LLaVA-style models feed `hidden_states[vision_feature_layer]` (LLaVA: -2, the output of the
second-to-last block) to the projector; blocks after it never reach the language model. The student exposes
the blocks up to and including the fed one (`Student.num_layers`), so layer settings resolve relative to it
and LoRA cannot land on a block the VLM ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from geod.pipeline.errors import StudentError
from torch import nn


@dataclass(frozen=True, kw_only=True)
class VlmFamily:
    name: str
    model_class: str  # transformers class of the full model
    model_types: tuple[str, ...]  # config.json model_type values
    feature_layer_attr: str | None  # config attribute naming the hidden-state index fed to the projector
    feeds_final_norm: bool  # the VLM applies the tower's final norm to what it feeds (else raw block output)


VLM_FAMILIES: dict[str, VlmFamily] = {family.name: family for family in (
    VlmFamily(name="llava", model_class="LlavaForConditionalGeneration", model_types=("llava",),
              feature_layer_attr="vision_feature_layer", feeds_final_norm=False),
    VlmFamily(name="llava_onevision", model_class="LlavaOnevisionForConditionalGeneration",
              model_types=("llava_onevision",), feature_layer_attr="vision_feature_layer", feeds_final_norm=False),
    VlmFamily(name="paligemma", model_class="PaliGemmaForConditionalGeneration", model_types=("paligemma",),
              feature_layer_attr=None, feeds_final_norm=True),
    VlmFamily(name="idefics3", model_class="Idefics3ForConditionalGeneration", model_types=("idefics3",),
              feature_layer_attr=None, feeds_final_norm=True),
    VlmFamily(name="smolvlm", model_class="SmolVLMForConditionalGeneration", model_types=("smolvlm",),
              feature_layer_attr=None, feeds_final_norm=True),
    # The merger normalises (ln_q, the student's final norm) before it merges 2x2 patches.
    VlmFamily(name="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration", model_types=("qwen2_5_vl",),
              feature_layer_attr=None, feeds_final_norm=True),
)}

_TOWER_ATTRIBUTES = ("vision_tower", "visual", "vision_model")


@dataclass(kw_only=True, eq=False)
class VlmHandle:
    """The full VLM behind a student (not a torch submodule of the Student, on purpose).

    model: the transformers VLM; `model.get_submodule(tower_prefix)` is the student's tower (same object).
    tower_prefix: module path of the vision tower inside `model`, e.g. "model.vision_tower".
    fed_layer: 0-based tower block whose output the VLM feeds its projector (the deepest one if several).
    feeds_final_norm: whether the VLM applies the tower's final norm to that output first.
    dtype: the dtype the VLM was loaded in; the tower itself is kept in float32 for training.
    """

    family: str
    model: nn.Module
    tower_prefix: str
    fed_layer: int
    feeds_final_norm: bool
    dtype: torch.dtype

    def describe(self) -> dict:
        return {"family": self.family, "class": type(self.model).__name__,
                "model_type": self.model.config.model_type, "tower_prefix": self.tower_prefix,
                "fed_layer": self.fed_layer, "feeds_final_norm": self.feeds_final_norm, "dtype": str(self.dtype)}


def vlm_family_for(model_type: str) -> VlmFamily | None:
    for family in VLM_FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def find_tower(model: nn.Module, where: str) -> tuple[nn.Module, str]:
    """(vision tower, its module path) through the model's own accessors: `get_encoder(modality="image")`
    where transformers has it, else the attributes VLMs name their tower by."""
    tower = None
    if hasattr(model, "get_encoder"):
        try:
            found = model.get_encoder(modality="image")
        except (TypeError, ValueError):  # releases without the modality argument
            found = None
        if found is not None and found is not model and found is not getattr(model, "model", None):
            tower = found
    if tower is None:
        for owner in (model, getattr(model, "model", None)):
            for name in _TOWER_ATTRIBUTES:
                if owner is not None and isinstance(getattr(owner, name, None), nn.Module):
                    tower = getattr(owner, name)
                    break
            if tower is not None:
                break
    if tower is None:
        raise StudentError(f"{where}: {type(model).__name__} has no vision tower (looked for "
                           f"{', '.join(_TOWER_ATTRIBUTES)})")
    prefix = next((name for name, module in model.named_modules() if module is tower), None)
    if not prefix:
        raise StudentError(f"{where}: the vision tower is not a submodule of {type(model).__name__}")
    return tower, prefix


def fed_block(model: nn.Module, family: VlmFamily, num_blocks: int, where: str) -> int:
    """0-based index of the tower block the VLM feeds to its projector."""
    if family.feature_layer_attr is None:
        return num_blocks - 1
    value = getattr(model.config, family.feature_layer_attr, -1)
    layers = list(value) if isinstance(value, (list, tuple)) else [value]
    blocks = []
    for layer in layers:
        # hidden_states has num_blocks + 1 entries: [0] is the embedding output, [i] block i - 1's output.
        index = int(layer) % (num_blocks + 1) - 1 if -(num_blocks + 1) <= int(layer) <= num_blocks else None
        if index is None or index < 0:
            raise StudentError(f"{where}: {family.feature_layer_attr}={value} does not name a block output of "
                               f"its {num_blocks}-block vision tower")
        blocks.append(index)
    return max(blocks)


def load_vlm(name_or_path: str, family: VlmFamily, where: str) -> nn.Module:
    """The full VLM of `family` from a local directory or hub id, in its stored dtype."""
    import transformers

    model_class = getattr(transformers, family.model_class, None)
    if model_class is None:
        raise StudentError(f"{where}: this transformers ({transformers.__version__}) has no {family.model_class}")
    try:
        # The stored dtype (often bf16): the language model is only carried along, never run.
        return model_class.from_pretrained(name_or_path, dtype="auto")
    except (OSError, ValueError) as exc:
        raise StudentError(f"{where}: cannot load the {family.model_class}: {exc}") from None


def vlm_handle(model: nn.Module, family: VlmFamily, where: str) -> tuple[nn.Module, VlmHandle]:
    """(tower, handle) for a loaded VLM; the tower is made float32 (the language model keeps its dtype)."""
    from geod.stage2_distill.student_families import tower_kind_for

    tower, prefix = find_tower(model, where)
    kind = tower_kind_for(tower, where)
    blocks = kind.geometry(tower).num_blocks
    dtype = next(model.parameters()).dtype
    tower.float()
    handle = VlmHandle(family=family.name, model=model, tower_prefix=prefix,
                       fed_layer=fed_block(model, family, blocks, where), feeds_final_norm=family.feeds_final_norm,
                       dtype=dtype)
    return tower, handle
