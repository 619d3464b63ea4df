"""Configuration of `geod distill` and `geod eval`: plain dataclasses, validated on construction.

The resolved `DistillConfig` (every default made explicit, layer lists filled in from the student's depth)
is written to `RUN/config.json`; `DistillConfig.from_dict` reads it back. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geod.pipeline.errors import ConfigError

PRESERVE_DISTANCES = ("cosine", "relative_mse")
TINY_OVERRIDE_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "image_size",
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(kw_only=True)
class StudentConfig:
    """Which encoder is distilled and what is trained on it.

    Layer indices count the encoder's transformer blocks from 0; negative indices count from the end.
    `None` layer lists are resolved from the student's depth L: LoRA and adapters on blocks L//3 .. L-1
    (4-11 for a 12-block ViT-B, as in the method), depth and cost-volume features from the mean of blocks
    L//3 .. 2L//3 - 1 (4-7 for ViT-B).
    """

    name_or_path: str = "tiny-clip"
    image_size: tuple[int, int] | None = None  # (H, W) fed to the student; None = its processor's size
    seed: int = 0  # initialises tiny random students
    tiny_overrides: dict = field(default_factory=dict)  # config changes for tiny-* students
    lora_rank: int = 4
    lora_alpha: float | None = None  # None = rank, i.e. a LoRA scale of 1
    lora_dropout: float = 0.0
    lora_layers: tuple[int, ...] | None = None
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Bottleneck width of the adapters after each LoRA block; 0 = none. None = 64 for a bare tower (the
    # method's default) and 0 for a VLM student, whose merged export must keep the VLM's architecture.
    adapter_dim: int | None = None
    # transformers students: the attention kernels, e.g. "sdpa", "eager" or "flash_attention_2" (with the
    # flash-attn package: one varlen call per layer for Qwen2.5-VL's windows); None = transformers' default.
    attn_implementation: str | None = None
    refine_head: bool = True
    depth_head_dim: int = 128
    match_layer: int = -1
    depth_layers: tuple[int, ...] | None = None
    cost_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _require(bool(self.name_or_path), "student.name_or_path must not be empty")
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)
            _require(len(self.image_size) == 2 and min(self.image_size) > 0,
                     f"student.image_size must be two positive integers (H, W), got {self.image_size}")
        _require(self.lora_rank >= 0, f"student.lora_rank must be >= 0, got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, "student.lora_alpha must be > 0")
        _require(0.0 <= self.lora_dropout < 1.0, "student.lora_dropout must be in [0, 1)")
        _require(self.adapter_dim is None or self.adapter_dim >= 0,
                 f"student.adapter_dim must be >= 0, got {self.adapter_dim}")
        _require(self.depth_head_dim > 0, "student.depth_head_dim must be > 0")
        _require(self.attn_implementation is None or bool(self.attn_implementation),
                 "student.attn_implementation must be a name or null")
        for name in ("lora_layers", "depth_layers", "cost_layers"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)
                _require(len(value) > 0 or name == "lora_layers", f"student.{name} must not be empty")
                _require(len(set(value)) == len(value), f"student.{name} has duplicates: {value}")
                setattr(self, name, value)
        self.lora_targets = tuple(self.lora_targets)
        _require(len(self.lora_targets) > 0 or self.lora_rank == 0, "student.lora_targets must not be empty")
        unknown = sorted(set(self.tiny_overrides) - set(TINY_OVERRIDE_KEYS))
        _require(not unknown, f"student.tiny_overrides: unknown keys {unknown}; allowed: {TINY_OVERRIDE_KEYS}")

    def resolved(self, num_layers: int, image_size: tuple[int, int], *, is_vlm: bool = False) -> StudentConfig:
        """A copy with every layer list explicit (non-negative, sorted), the image size and adapter width set."""

        def fix(name: str, layers: tuple[int, ...] | None, default: range) -> tuple[int, ...]:
            chosen = tuple(default) if layers is None else layers
            out = []
            for layer in chosen:
                index = layer + num_layers if layer < 0 else layer
                _require(0 <= index < num_layers,
                         f"student.{name}: block {layer} does not exist (the student has {num_layers} blocks)")
                out.append(index)
            return tuple(sorted(set(out)))

        third = max(num_layers // 3, 0)
        middle = range(third, max(2 * num_layers // 3, third + 1))
        match = self.match_layer + num_layers if self.match_layer < 0 else self.match_layer
        _require(0 <= match < num_layers, f"student.match_layer {self.match_layer} does not exist "
                                          f"(the student has {num_layers} blocks)")
        return dataclasses.replace(
            self,
            image_size=tuple(image_size),
            adapter_dim=(0 if is_vlm else 64) if self.adapter_dim is None else self.adapter_dim,
            lora_layers=fix("lora_layers", self.lora_layers, range(third, num_layers)),
            depth_layers=fix("depth_layers", self.depth_layers, middle),
            cost_layers=fix("cost_layers", self.cost_layers, middle),
            match_layer=match,
        )


@dataclass(kw_only=True)
class LossConfig:
    """Weights and constants of the four losses and the optional feature-preservation term
    (see geod.stage2_distill.losses).

    Distances and depth gaps are in scene-normalised units: every pair's depths and 3D points are divided
    by the median depth of its matches in view A, so `neg_distance=0.1` means 10% of the scene depth
    whatever the teacher's units.
    """

    w_ap: float = 1.0
    w_depth: float = 1.0
    w_rank: float = 1.0
    w_kl: float = 1.0
    ap_temperature: float = 0.01
    neg_distance: float = 0.1
    rank_min_gap: float = 0.05
    rank_points: int = 64  # matches per image used by the ranking loss (its cost grows as N^2); 0 = all
    cv_temperature: float = 0.05  # softmax temperature of the student's cosine cost volume
    # Feature preservation: keep the encoder's features at `preserve_layer` close to the frozen base model's
    # (computed in the same step with LoRA and adapters switched off), so the VLM the encoder feeds keeps
    # seeing features it knows. 0 = off (no extra forward pass).
    w_preserve: float = 0.0
    preserve_distance: str = "cosine"  # "cosine" (1 - cos per patch) | "relative_mse" (see losses.py)
    preserve_layer: int | None = None  # block index (negative from the end); None = the layer the VLM is fed

    def __post_init__(self) -> None:
        for name in ("w_ap", "w_depth", "w_rank", "w_kl", "w_preserve"):
            _require(getattr(self, name) >= 0, f"loss.{name} must be >= 0")
        _require(self.w_ap + self.w_depth + self.w_rank + self.w_kl > 0, "all loss weights are zero")
        _require(self.preserve_distance in PRESERVE_DISTANCES,
                 f"loss.preserve_distance: unknown {self.preserve_distance!r}; choose one of {PRESERVE_DISTANCES}")
        for name in ("ap_temperature", "cv_temperature"):
            _require(getattr(self, name) > 0, f"loss.{name} must be > 0")
        _require(self.neg_distance >= 0 and self.rank_min_gap >= 0, "loss thresholds must be >= 0")
        _require(self.rank_points == 0 or self.rank_points >= 2, "loss.rank_points must be 0 (all) or >= 2")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW on the trainable parameters, linear warm-up then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-4  # the reference uses 1e-5 at batch size 1; batches of 8 pairs take a larger step
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0 = no clipping
    warmup_steps: int = 100
    max_steps: int = 1000
    schedule: str = "cosine"  # "cosine" | "constant"
    min_lr_ratio: float = 0.0
    max_nonfinite: int = 10  # abort after this many consecutive non-finite steps

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be 2 in [0,1)")
        _require(self.grad_clip >= 0, "optim.grad_clip must be >= 0")
        _require(self.max_steps > 0, f"optim.max_steps must be > 0, got {self.max_steps}")
        _require(0 <= self.warmup_steps <= self.max_steps, "optim.warmup_steps must be in [0, max_steps]")
        _require(self.schedule in ("cosine", "constant"), f"optim.schedule: unknown {self.schedule!r}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")
        _require(self.max_nonfinite >= 1, "optim.max_nonfinite must be >= 1")


@dataclass(kw_only=True)
class DataConfig:
    """The streamed target dataset and how it is batched."""

    shards: str  # target dataset directory or fsspec URL
    storage_options: dict = field(default_factory=dict)
    image_root: str | None = None  # where image refs resolve; None = the card's source base_dir
    split: str | None = "train"  # None = every ok pair
    batch_size: int = 8
    # DataLoader worker processes. None: chosen when a run starts from the CPUs this process may use (its
    # rank's share less two, for the training process and the pin-memory thread; at most 16). The number is
    # part of the data order, so the run's config records the chosen one and a resume keeps it.
    workers: int | None = None
    shuffle_blocks: int = 4  # blocks (chunks of pairs) shuffled together in memory
    max_matches: int = 128  # matches kept per pair per step (random subset)
    verify_images: bool = True  # check each image's sha256 against the index
    # JPEGs at least twice the student's input size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    # scaling, never below the input size) and then resized as usual: decoding and resizing take a third to
    # three fifths of the time, and the pixels are about one level in 255 from a full decode's. False: full
    # decodes, the processor's pixels exactly.
    reduced_decode: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _require(bool(self.shards), "data.shards must name a target dataset")
        _require(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _require(self.workers is None or self.workers >= 0, "data.workers must be >= 0 (or null: chosen from "
                                                             "the CPUs)")
        _require(self.shuffle_blocks >= 1, "data.shuffle_blocks must be >= 1")
        _require(self.max_matches >= 2, "data.max_matches must be >= 2")


@dataclass(kw_only=True)
class RunConfig:
    """Where the run writes, how often it logs and checkpoints, and on which device."""

    out: Path
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    compile: bool = True  # on CUDA, torch.compile norms + heads + losses and the adapters (static shapes); CPU: off
    # On CUDA in one process, capture the whole step as a CUDA graph and replay it (graphed_step.py); ignored on
    # CPU, with several ranks, and for towers whose forward reads values back to the host.
    cuda_graphs: bool = True
    # On CUDA, when a batch's images all decode to one size (one camera), the workers send them at that size
    # and the GPU resizes them, bit for bit as PIL does on the host (geod.stage2_distill.resize): the same
    # batches, with a sixth to two fifths of the workers' time moved to the GPU, where it costs 0.08-0.6 ms per
    # step of 32 images (compiled, with run.compile; eager it is several times slower). False: the workers
    # resize (best when they keep up anyway; `geod distill` reports the share of time the steps waited for
    # batches).
    device_resize: bool = True
    # On CUDA in one process, the depth, ranking and cost-volume losses (which read the middle blocks) run on a
    # second stream beside the encoder's later blocks, forward and backward: the same values, less time for
    # small students, whose loss kernels are too short to fill the GPU.
    overlap_losses: bool = True
    # Steps queued on the device ahead of the host: after queuing a step the loop reads the outcome (losses,
    # gradient norm, skip) of the step this many before it. Deeper lets the device run through a batch that
    # comes late from the loader; a non-finite streak is then noticed that many steps later (the skipped updates
    # themselves are decided on the device).
    steps_in_flight: int = 2
    # float32 matrix products on CUDA use TF32 tensor cores: the loss section's cosine similarities (the encoder
    # runs in bf16 under autocast). Their error (about 1e-4 on a cosine) is far below the losses' temperatures.
    tf32: bool = True
    # cuDNN times its convolution algorithms for each shape on first use and keeps the fastest (the refine head's
    # 3x3 conv and the patch embedding; batches keep one shape through a run).
    cudnn_benchmark: bool = True
    resume: bool = False
    overwrite: bool = False
    stop_after_steps: int | None = None  # end this invocation early (with a checkpoint), e.g. for job limits
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        _require(self.checkpoint_every >= 1, "run.checkpoint_every must be >= 1")
        _require(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _require(self.log_every >= 1, "run.log_every must be >= 1")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"run.device: expected auto, cpu or cuda[:N], got {self.device!r}")
        _require(self.stop_after_steps is None or self.stop_after_steps >= 1, "run.stop_after_steps must be >= 1")
        _require(self.steps_in_flight >= 1, "run.steps_in_flight must be >= 1")
        _require(not (self.resume and self.overwrite), "run.resume and run.overwrite exclude each other")


@dataclass(kw_only=True)
class DistillConfig:
    """Everything `geod distill` needs."""

    data: DataConfig
    run: RunConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        return from_dict(cls, data)


@dataclass(kw_only=True)
class EvalConfig:
    """`geod eval`: correspondence PCK and depth-order accuracy of one student on held-out pairs."""

    shards: str
    student: str = "tiny-clip"  # a distilled run directory, a student name, a local path or a hub id
    checkpoint: str | None = None  # with a run directory: evaluate this checkpoint (step number or path)
    storage_options: dict = field(default_factory=dict)
    image_root: str | None = None
    split: str | None = "val"  # None = every ok pair
    image_size: tuple[int, int] | None = None  # override the student's input size (H, W)
    max_pairs: int = 200
    max_matches: int = 256  # matches evaluated per pair (deterministic subset)
    batch_size: int = 8
    upsample: int = 4  # B's feature map is bilinearly upsampled this much before the argmax
    thresholds: tuple[float, ...] = (0.05, 0.10)
    depth_min_gap: float = 0.05  # scene-normalised depth gap below which a point pair is not scored
    probe_ridge: float = 1e-2  # ridge strength of the depth-order linear probe (relative to feature scale)
    device: str = "auto"
    seed: int = 0
    draw: Path | None = None  # PNG of the matches of the first `draw_pairs` pairs
    draw_pairs: int = 4
    draw_matches: int = 40
    out: Path | None = None  # metrics JSON
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_size is not None:
            self.image_size = tuple(int(v) for v in self.image_size)
            _require(len(self.image_size) == 2 and min(self.image_size) > 0, "eval image_size must be (H, W) > 0")
        self.thresholds = tuple(float(t) for t in self.thresholds)
        self.draw = None if self.draw is None else Path(self.draw)
        self.out = None if self.out is None else Path(self.out)
        _require(bool(self.shards), "eval shards must name a target dataset")
        _require(self.max_pairs >= 2, "eval max_pairs must be >= 2 (the depth probe needs two halves)")
        _require(self.max_matches >= 2 and self.batch_size >= 1 and self.upsample >= 1, "eval sizes must be >= 1")
        _require(len(self.thresholds) > 0 and all(t > 0 for t in self.thresholds), "eval thresholds must be > 0")
        _require(self.probe_ridge > 0, "eval probe_ridge must be > 0")
        _require(self.draw_pairs >= 1 and self.draw_matches >= 1, "eval draw counts must be >= 1")

    def to_dict(self) -> dict:
        return to_dict(self)


# ---------------------------------------------------------------------------------------------------------
# dict / JSON conversion


def to_dict(obj: Any) -> Any:
    """JSON-ready form of a config dataclass (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, options[0], where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config field {where!r}: expected an object, got {value!r}")
        return from_dict(hint, value, prefix=f"{where}.")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if hint is Path and value is not None:
        return Path(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build config dataclass `cls` from a dict; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {prefix or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"config {prefix.rstrip('.') or cls.__name__}: unknown keys {unknown}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config {prefix.rstrip('.') or cls.__name__}: {exc}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as JSON, else kept as a string) to a config dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def load_config_file(path: str | Path) -> dict:
    """Read a JSON config file into a dict (sections as in RUN/config.json)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
