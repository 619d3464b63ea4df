"""What is trained on a frozen student: LoRA (peft) on chosen blocks, bottleneck adapters, and two heads.

Every new module starts as the identity on the student's features (LoRA's B matrix, the adapters'
up-projection and the refine conv are zero-initialised), so at step 0 the distilled student equals its base
model exactly; the reference code does not do this for its adapters.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from geod.pipeline.errors import ConfigError
from geod.stage2_distill.config import StudentConfig
from geod.stage2_distill.students import Student
from torch import nn

LORA_ADAPTER_NAME = "default"


def bottleneck_residual(tokens: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor,
                        up_weight: torch.Tensor, up_bias: torch.Tensor) -> torch.Tensor:
    """tokens + up(gelu(down(tokens))), as a function of the weights so that one compiled version serves
    every adapter of a model."""
    hidden = nn.functional.gelu(nn.functional.linear(tokens, down_weight, down_bias))
    return tokens + nn.functional.linear(hidden, up_weight, up_bias)


class Bottleneck(nn.Module):
    """Residual bottleneck on token features: h + up(gelu(down(h))), `up` zero-initialised.

    `residual` computes it; DistillModel.compile_sections swaps in a compiled version, which fuses the
    casts, the GELU and the residual add around the two products (the residual stream is float32, so each
    unfused elementwise pass over it costs as much as a small matrix product).
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.residual = bottleneck_residual

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.residual(tokens, self.down.weight, self.down.bias, self.up.weight, self.up.bias)


class RefineHead(nn.Module):
    """3x3 convolution on the final patch grid for matching, residual and zero-initialised."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.conv(grid)


class DepthHead(nn.Module):
    """Depth-difference head: Linear(D, hidden) - LayerNorm - GELU - Linear(hidden, 1) - tanh.

    Applied to a feature difference f_j - f_i it predicts which point is farther (positive: j). Its first
    layer is linear, so `project` (without bias) commutes with differences: head(f_j - f_i) ==
    from_projected(project(f_j) - project(f_i)); the ranking loss uses this to avoid N^2 x D tensors.
    """

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.proj.weight)

    def from_projected(self, projected_difference: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(self.norm(projected_difference + self.proj.bias))
        # The single output unit as a weighted sum over the hidden features (Linear(hidden, 1)'s value): the
        # compiler fuses it into the norm's kernel, where a Linear would write the N^2 x hidden activations
        # out for a matrix-vector product and read them back, forward and backward.
        return torch.tanh((hidden * self.out.weight[0]).sum(-1) + self.out.bias[0])

    def forward(self, difference: torch.Tensor) -> torch.Tensor:
        return self.from_projected(self.project(difference))


def lora_target_names(student: Student, layers: tuple[int, ...], targets: tuple[str, ...]) -> list[str]:
    """Full module names (inside the tower, what peft's target names are relative to) of the Linear layers
    LoRA adapts.

    A target matches a Linear inside a block whose own name ends with it ("q_proj" -> "self_attn.q_proj").
    Towers with a fused qkv projection (Qwen2.5-VL, timm) map "q_proj" / "k_proj" / "v_proj" to it, so LoRA
    there adapts q, k and v together. Only blocks 0 .. student.fed_layer can be adapted: for a VLM the later
    blocks never reach the language model (LLaVA feeds the second-to-last block), and nothing outside the
    vision tower is ever a target.
    """
    blocks = student.blocks()
    names: list[str] = []
    for layer in layers:
        if not 0 <= layer < student.num_layers:
            why = f"; its VLM feeds block {student.fed_layer} to the projector" if student.is_vlm else ""
            raise ConfigError(f"student.lora_layers: block {layer} is not one the student uses (blocks 0.."
                              f"{student.fed_layer}{why})")
        block = blocks[layer]
        for target in targets:
            wanted = student.kind.lora_aliases.get(target, target)
            found = [name for name, module in block.named_modules()
                     if isinstance(module, nn.Linear) and (name == wanted or name.endswith("." + wanted))]
            if not found:
                raise ConfigError(f"student.lora_targets: no Linear named {target!r} in block {layer} of "
                                  f"{student.name}")
            names.extend(f"{student.block_module_name(layer)}.{name}" for name in found)
    return list(dict.fromkeys(names))  # fused aliases repeat a module; keep the first of each


def apply_lora(student: Student, cfg: StudentConfig) -> None:
    """Wrap the student's tower in a peft LoRA model on exactly cfg.lora_layers x cfg.lora_targets.

    peft wraps the tower only (never a VLM's language model); for a VLM the injected LoRA layers sit in the
    modules that `student.vlm()` holds too.
    """
    from peft import LoraConfig, get_peft_model

    if cfg.lora_rank == 0 or not cfg.lora_layers:
        return
    targets = lora_target_names(student, cfg.lora_layers, cfg.lora_targets)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", init_lora_weights=True)
    with quiet_peft():
        student.tower = get_peft_model(student.tower, lora, adapter_name=LORA_ADAPTER_NAME)


def merge_lora(student: Student) -> None:
    """Merge the LoRA into the tower's weights in place and drop the peft wrapper.

    Afterwards `student.tower` is the plain tower with the distilled weights, and so is the tower inside
    `student.vlm()` (the same modules). Bottleneck adapters are not touched (no architecture has a place for
    them). A student without LoRA is left as it is.
    """
    if not hasattr(student.tower, "merge_and_unload"):
        return
    with quiet_peft():
        student.tower = student.tower.merge_and_unload()


def load_lora(student: Student, adapter_dir) -> None:
    """Wrap the student's tower with a saved peft LoRA adapter (inference: weights frozen)."""
    from peft import PeftModel

    with quiet_peft():
        student.tower = PeftModel.from_pretrained(student.tower, adapter_dir)


@contextlib.contextmanager
def quiet_peft():
    """peft queries a transformers attribute that transformers 5 marks deprecated; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_bottlenecks(student: Student, cfg: StudentConfig) -> None:
    """One zero-initialised bottleneck after each adapted block (applied by Student.forward's hooks)."""
    if cfg.adapter_dim == 0:
        return
    for layer in cfg.lora_layers:
        student.block_adapters[str(layer)] = Bottleneck(student.hidden_size, cfg.adapter_dim)


def build_heads(student: Student, cfg: StudentConfig) -> tuple[RefineHead | None, DepthHead]:
    refine = RefineHead(student.hidden_size) if cfg.refine_head else None
    return refine, DepthHead(student.hidden_size, cfg.depth_head_dim)


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything except LoRA weights, the bottleneck adapters and the heads."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable_name(name))


def is_trainable_name(name: str) -> bool:
    parts = name.split(".")
    if "lora_A" in parts or "lora_B" in parts:
        return True
    return "block_adapters" in parts or parts[0] in ("refine", "depth_head")


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Sorted names of the parameters that require gradients."""
    return sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
