"""Checkpoints (exact resume) and the final outputs of a distillation run, and loading them back.

A checkpoint is a directory ``RUN/checkpoints/step-000100/`` written under a temporary name and renamed
into place, so one that exists is complete:
  trainable.safetensors   every trainable tensor by parameter name
  optimizer.safetensors   the optimizer's tensor state ("<param index>.<key>")
  state.json              step, data position, counters, optimizer param groups and scalar state, the
                          resolved config (checked on resume)
  rng.safetensors         torch RNG states (CPU, and the current CUDA device's when CUDA is in use)
No pickle: tensors go to safetensors, everything else to JSON.

Final outputs of a finished run:
  RUN/adapter/                   peft LoRA adapter (adapter_config.json + adapter_model.safetensors)
  RUN/geod_modules.safetensors   bottleneck adapters + refine head + depth head
  RUN/config.json                the resolved DistillConfig
  RUN/student.json               the base model (name, source, sizes, preprocessing, where to load it)
  RUN/base/                      the base tower itself, for tiny random students only
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from geod.pipeline.errors import ConfigError, StudentError
from geod.stage2_distill.adapters import load_lora
from geod.stage2_distill.config import DistillConfig
from geod.stage2_distill.model import DistillModel
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
MODULES_FILE = "geod_modules.safetensors"
CONFIG_FILE = "config.json"
STUDENT_FILE = "student.json"
BASE_DIR = "base"
_MODULE_PREFIXES = ("student.block_adapters.", "refine.", "depth_head.")


@dataclass(kw_only=True)
class TrainState:
    """Where training stands: optimizer steps taken (skipped ones included) and the data position."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next batch of `epoch` (per rank)
    skipped: int = 0
    nonfinite_streak: int = 0


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _trainable_state(model: DistillModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


# Settings introduced after runs could already be saved, with the value that reproduces how a run saved
# without them behaved; a resume of such a run takes that value (see `with_added_settings`).
ADDED_SETTINGS = {("data", "reduced_decode"): False}


def with_added_settings(config: dict) -> dict:
    """A saved config dict with every setting of ADDED_SETTINGS it lacks filled in as the run behaved."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in config.items()}
    for (section, key), value in ADDED_SETTINGS.items():
        out.setdefault(section, {}).setdefault(key, value)
    return out


def _comparable(config: dict) -> dict:
    """The parts of a config that must not change across a resume (the run section may)."""
    return {key: value for key, value in with_added_settings(config).items() if key != "run"}


def save_checkpoint(run_dir: Path, model: DistillModel, optimizer: torch.optim.Optimizer, state: TrainState,
                    config: dict, keep: int) -> Path:
    """Write checkpoint `step-<state.step>` atomically and keep only the newest `keep`."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_trainable_state(model), tmp / "trainable.safetensors")
    optim = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, tmp / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only: get_rng_state_all would open a CUDA context on every visible
        # GPU from this one process (under torchrun, on every other rank's GPU).
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    _write_json(tmp / "state.json", {"train": dataclasses.asdict(state), "param_groups": optim["param_groups"],
                                     "optimizer_scalars": scalars, "config": config})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def checkpoint_config(path: Path) -> dict:
    """The resolved config a checkpoint was written with."""
    return json.loads((Path(path) / "state.json").read_text())["config"]


def load_checkpoint(path: Path, model: DistillModel, optimizer: torch.optim.Optimizer, config: dict) -> TrainState:
    """Restore weights, optimizer, RNG and position from checkpoint `path`; the config must match."""
    meta = json.loads((path / "state.json").read_text())
    saved, current = _comparable(meta["config"]), _comparable(config)
    if saved != current:
        changed = sorted(f"{section}.{key}" for section in set(saved) | set(current)
                         for key in set(saved.get(section, {})) | set(current.get(section, {}))
                         if saved.get(section, {}).get(key) != current.get(section, {}).get(key))
        raise ConfigError(f"{path}: cannot resume, the configuration changed: {', '.join(changed)}")
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise ConfigError(f"{path}: trainable parameters differ from this model's "
                          f"({len(set(weights) ^ expected)} names differ)")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = load_file(path / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])  # the current device, as saved
    return TrainState(**meta["train"])


# ---------------------------------------------------------------------------------------------------------
# final outputs


def save_outputs(run_dir: Path, model: DistillModel, config: dict, student_info: dict) -> None:
    """Write the run's final outputs (adapter, modules, config, student); each file or folder atomically."""
    tower = model.student.tower
    if hasattr(tower, "save_pretrained") and hasattr(tower, "peft_config"):
        tmp = run_dir / f".tmp-{ADAPTER_DIR}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tower.peft_config["default"].base_model_name_or_path = student_info["base_model"]
        tower.save_pretrained(tmp)
        final = run_dir / ADAPTER_DIR
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    modules = {name: p.detach().cpu().contiguous() for name, p in model.state_dict().items()
               if name.startswith(_MODULE_PREFIXES)}
    tmp_file = run_dir / f".tmp-{MODULES_FILE}-{os.getpid()}"
    save_file(modules, tmp_file, metadata={"format": "geod-modules", "version": "1"})
    os.replace(tmp_file, run_dir / MODULES_FILE)
    write_run_info(run_dir, config, student_info)


def write_run_info(run_dir: Path, config: dict, student_info: dict) -> None:
    _write_json(run_dir / CONFIG_FILE, config)
    _write_json(run_dir / STUDENT_FILE, student_info)


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / STUDENT_FILE).is_file()


def load_distilled(run_dir: str | Path, *, checkpoint: str | int | Path | None = None,
                   device: str | torch.device = "cpu") -> DistillModel:
    """The distilled model of a run (eval mode): its base student with the trained LoRA, adapters and heads.

    Reads the final outputs, or with `checkpoint` (a path, or a step number as text) a training checkpoint.
    """
    from geod.stage2_distill.students import create_student

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise StudentError(f"{run_dir}: not a distillation run (no {CONFIG_FILE} and {STUDENT_FILE})")
    config = DistillConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    info = json.loads((run_dir / STUDENT_FILE).read_text())
    student_cfg = config.student
    base = info.get("base_model") or student_cfg.name_or_path
    if info.get("base_in_run"):
        base = str(run_dir / BASE_DIR)
    student = create_student(dataclasses.replace(student_cfg, name_or_path=base))
    if checkpoint is not None:
        path = Path(str(checkpoint))
        if not path.is_dir() and str(checkpoint).isdigit():
            path = run_dir / CHECKPOINTS / f"step-{int(checkpoint):06d}"
        if not path.is_dir():
            raise StudentError(f"{run_dir}: no checkpoint {checkpoint}")
        model = DistillModel(student, student_cfg)
        weights = load_file(path / "trainable.safetensors")
        missing = {name for name, p in model.named_parameters() if p.requires_grad} - set(weights)
        if missing:
            raise StudentError(f"{path}: checkpoint lacks {len(missing)} trainable tensors, e.g. {min(missing)}")
        model.load_state_dict(weights, strict=False)
    else:
        if (run_dir / ADAPTER_DIR).is_dir():
            load_lora(student, run_dir / ADAPTER_DIR)
        elif student_cfg.lora_rank > 0 and student_cfg.lora_layers:
            raise StudentError(f"{run_dir}: no {ADAPTER_DIR}/ (did the run finish?)")
        if not (run_dir / MODULES_FILE).is_file():
            raise StudentError(f"{run_dir}: no {MODULES_FILE} (did the run finish?)")
        model = DistillModel(student, student_cfg, lora=False)
        modules = load_file(run_dir / MODULES_FILE)
        expected = {name for name in model.state_dict() if name.startswith(_MODULE_PREFIXES)}
        if set(modules) != expected:
            raise StudentError(f"{run_dir / MODULES_FILE}: tensors do not match the run's config "
                               f"({len(set(modules) ^ expected)} names differ)")
        model.load_state_dict(modules, strict=False)
    model.requires_grad_(False)
    return model.to(device).eval()
