"""Tiny random-initialised students (seeded), one per family, for tests and demos.

Each is built in code from a small config and a processor config of the family's own kind. Saving one with
`students.save_base` and loading the folder back exercises the same `from_pretrained` path that a hub id
takes. The vision towers match the original tiny-clip / tiny-siglip (width 64, 4 blocks, patch 8, 64x64);
the language models are one-layer toys that still run a full image+text forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from geod.pipeline.errors import StudentError
from torch import nn

_VISION = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
           "image_size": 64, "patch_size": 8}
_TEXT = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 0}
IMAGE_TOKEN_ID = 100  # the tiny VLMs' image placeholder token
_QWEN_TOKENS = {"image_token_id": IMAGE_TOKEN_ID, "vision_start_token_id": 101, "vision_end_token_id": 102,
                "video_token_id": 103}
_CLIP_NORM = ("OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD")
_HALF_NORM = ("IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD")


@dataclass(frozen=True, kw_only=True)
class TinySpec:
    family: str  # a tower family ("clip", "siglip") or a VLM family name
    vision_type: str  # vision config model_type
    norm: tuple[str, str]  # transformers.image_utils constants for mean / std
    resample: int
    processor_type: str
    text_type: str | None = None  # None: a bare tower
    vision_extra: dict = field(default_factory=dict)
    vlm_extra: dict = field(default_factory=dict)


TINY: dict[str, TinySpec] = {
    "tiny-clip": TinySpec(family="clip", vision_type="clip_vision_model", norm=_CLIP_NORM, resample=3,
                          processor_type="CLIPImageProcessor"),
    "tiny-siglip": TinySpec(family="siglip", vision_type="siglip_vision_model", norm=_HALF_NORM, resample=2,
                            processor_type="SiglipImageProcessor", vision_extra={"vision_use_head": False}),
    "tiny-llava": TinySpec(family="llava", vision_type="clip_vision_model", norm=_CLIP_NORM, resample=3,
                           processor_type="CLIPImageProcessor", text_type="llama",
                           vlm_extra={"image_token_id": IMAGE_TOKEN_ID, "vision_feature_layer": -2}),
    "tiny-llava-onevision": TinySpec(family="llava_onevision", vision_type="siglip_vision_model", norm=_HALF_NORM,
                                     resample=3, processor_type="LlavaOnevisionImageProcessor", text_type="qwen2",
                                     vision_extra={"vision_use_head": False},
                                     vlm_extra={"image_token_id": IMAGE_TOKEN_ID}),
    "tiny-paligemma": TinySpec(family="paligemma", vision_type="siglip_vision_model", norm=_HALF_NORM, resample=3,
                               processor_type="SiglipImageProcessor", text_type="gemma",
                               vision_extra={"vision_use_head": False},
                               vlm_extra={"image_token_id": IMAGE_TOKEN_ID, "projection_dim": 32,
                                          "hidden_size": 32}),
    "tiny-idefics3": TinySpec(family="idefics3", vision_type="idefics3_vision", norm=_HALF_NORM, resample=1,
                              processor_type="Idefics3ImageProcessor", text_type="llama",
                              vlm_extra={"image_token_id": IMAGE_TOKEN_ID, "scale_factor": 2}),
    "tiny-smolvlm": TinySpec(family="smolvlm", vision_type="smolvlm_vision", norm=_HALF_NORM, resample=1,
                             processor_type="SmolVLMImageProcessor", text_type="llama",
                             vlm_extra={"image_token_id": IMAGE_TOKEN_ID, "scale_factor": 2}),
    "tiny-qwen2_5_vl": TinySpec(family="qwen2_5_vl", vision_type="qwen2_5_vl_vision", norm=_CLIP_NORM, resample=3,
                                processor_type="Qwen2VLImageProcessor", text_type="qwen2_5_vl_text",
                                vision_extra={"out_hidden_size": 32, "spatial_merge_size": 2, "window_size": 32,
                                              "fullatt_block_indexes": [1, 3], "temporal_patch_size": 2},
                                vlm_extra=_QWEN_TOKENS),
}

# Qwen2.5-VL's vision config names depth and heads differently and has no fixed image size.
_QWEN_NAMES = {"num_hidden_layers": "depth", "num_attention_heads": "num_heads"}


def _vision_config(spec: TinySpec, overrides: dict) -> dict:
    vision = {**_VISION, **overrides}
    if spec.vision_type != "qwen2_5_vl_vision":
        return {**vision, **spec.vision_extra}
    side = vision.pop("image_size")
    if "image_size" in overrides:
        raise StudentError("tiny-qwen2_5_vl has no fixed image size: set student.image_size instead of "
                           f"tiny_overrides.image_size={side}")
    return {_QWEN_NAMES.get(k, k): v for k, v in vision.items()} | dict(spec.vision_extra)


def _text_config(spec: TinySpec) -> dict:
    text = {"model_type": spec.text_type, **_TEXT}
    if spec.text_type == "qwen2_5_vl_text":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    return text


def tiny_processor(spec: TinySpec, vision: dict) -> dict:
    """The image processor config of a tiny student, shaped like its family's real one."""
    from transformers import image_utils

    processor = {"image_mean": list(getattr(image_utils, spec.norm[0])),
                 "image_std": list(getattr(image_utils, spec.norm[1])), "resample": spec.resample,
                 "rescale_factor": 1.0 / 255.0, "do_resize": True, "do_rescale": True, "do_normalize": True,
                 "image_processor_type": spec.processor_type}
    if spec.vision_type == "qwen2_5_vl_vision":
        unit = vision["patch_size"] * vision["spatial_merge_size"]
        return processor | {"size": {"shortest_edge": (2 * unit) ** 2, "longest_edge": (4 * unit) ** 2},
                            "patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
                            "temporal_patch_size": vision["temporal_patch_size"]}
    side = vision["image_size"]
    if spec.processor_type in ("Idefics3ImageProcessor", "SmolVLMImageProcessor"):
        return processor | {"size": {"longest_edge": 4 * side}, "max_image_size": {"longest_edge": side},
                            "do_image_splitting": True}
    if spec.processor_type == "CLIPImageProcessor" and spec.text_type is not None:  # LLaVA: resize + crop
        return processor | {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                            "do_center_crop": True}
    return processor | {"size": {"height": side, "width": side}}


def build_tiny(name: str, seed: int, overrides: dict) -> tuple[nn.Module, TinySpec, dict]:
    """(model, spec, processor config): a bare tower for tiny-clip / tiny-siglip, the full VLM otherwise."""
    import transformers
    from transformers import AutoConfig

    spec = TINY[name]
    vision = _vision_config(spec, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.text_type is None:
            config_class = AutoConfig.for_model(spec.vision_type).__class__
            model_class = getattr(transformers, config_class.__name__.replace("Config", "Model"))
            model = model_class(config_class(**vision))
        else:
            from geod.stage2_distill.vlm_towers import VLM_FAMILIES

            family = VLM_FAMILIES[spec.family]
            config = AutoConfig.for_model(family.model_types[0], vision_config={"model_type": spec.vision_type,
                                          **vision}, text_config=_text_config(spec), **spec.vlm_extra)
            model = getattr(transformers, family.model_class)(config)
    return model, spec, tiny_processor(spec, vision)
