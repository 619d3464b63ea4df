"""`geod export`: turn a distillation run into artefacts other tools load without geod.

OUT/ (written under a temporary name beside it, then renamed, so an OUT that exists is complete):
  adapter/                   peft LoRA adapter on the BASE MODEL: the full VLM for a VLM student (target
                             modules prefixed with the vision tower's path), the bare tower for a CLIP /
                             SigLIP student. `PeftModel.from_pretrained(base, OUT/adapter)`.
  merged/                    (merged=True) the base model with the LoRA merged into its weights, saved with
                             `save_pretrained`, and its processor beside it: for a VLM the full model
                             (`AutoModelForImageTextToText.from_pretrained(OUT/merged)`) with the VLM's own
                             processor, so `generate` on image + text works; for a tower the tower with an
                             image processor that reproduces the preprocessing used in distillation (whole
                             image resized to the training size, no crop). Only the LoRA-targeted Linear
                             weights of the vision tower differ from the base; every other tensor is the
                             base's, bit for bit, in its stored dtype.
  geod_modules.safetensors   what is not part of the architecture: the refine and depth heads, and the
                             bottleneck adapters when they were dropped (below).
  geod_export.json           what was exported from what (run, checkpoint, base, tower path, LoRA, classes).

Bottleneck adapters (student.adapter_dim > 0) are extra modules after transformer blocks: no transformers
architecture has a place for them, so neither the peft adapter nor the merged model can carry them. Export
refuses such a run unless `drop_bottlenecks=True`; then the exported model has the LoRA only (its features
differ from the distilled student's), the adapters are kept in geod_modules.safetensors, and
geod_export.json says `"bottlenecks_in_model": false`. For an exact export, train with adapter_dim=0.

Students that can be exported: bare CLIP / SigLIP towers, the VLM families of geod.stage2_distill.vlm_towers
(the base VLM is loaded once, in its stored dtype, and its tower found with `vlm_towers.find_tower`), and timm
ViTs. For a timm student, adapter/ is the peft adapter on the timm model, and merged/ is a timm folder
(config.json with architecture, model_args and a pretrained_cfg whose input size, mean, std, interpolation and
"squash" crop mode reproduce the distillation preprocessing; model.safetensors):
`timm.create_model("local-dir:OUT/merged", pretrained=True)`, or a geod student by its path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geod.pipeline.errors import GeodError

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
MODULES_FILE = "geod_modules.safetensors"
EXPORT_FILE = "geod_export.json"
_TOWER_CLASSES = {"clip": ("CLIPVisionModel", "CLIPImageProcessor"),
                  "siglip": ("SiglipVisionModel", "SiglipImageProcessor")}
_PEFT_PREFIX = "base_model.model."
_BOTTLENECK_PREFIX = "student.block_adapters."
_HEAD_PREFIXES = ("refine.", "depth_head.")


class ExportError(GeodError):
    """A run cannot be exported as asked."""


@dataclass(kw_only=True)
class ExportSummary:
    out_dir: Path
    base_model: str
    model_class: str
    tower_path: str  # the vision tower's module path inside the exported model ("" = the model is the tower)
    lora_modules: int
    merged: bool
    bottlenecks_in_model: bool | None  # None: the run has no bottleneck adapters

    def describe(self) -> str:
        what = f"adapter + merged {self.model_class}" if self.merged else "adapter"
        note = "" if self.bottlenecks_in_model is not False else \
            " (bottleneck adapters NOT in the model; kept in geod_modules.safetensors)"
        return (f"exported {what} of {self.base_model} with LoRA on {self.lora_modules} modules to "
                f"{self.out_dir}{note}")


@dataclass(kw_only=True)
class _Trained:
    """The trained tensors of a run, tower-relative LoRA names ("encoder.layers.2.self_attn.q_proj")."""

    lora: dict  # module name -> {"lora_A": tensor, "lora_B": tensor}
    modules: dict  # heads and bottleneck adapters, named as in the run's geod_modules.safetensors
    source: str  # what they were read from


def _read_trained(run_dir: Path, checkpoint: str | int | Path | None) -> _Trained:
    """LoRA, head and adapter tensors of the run's final outputs, or of one of its checkpoints."""
    from geod.stage2_distill.checkpoint import ADAPTER_DIR as RUN_ADAPTER
    from geod.stage2_distill.checkpoint import CHECKPOINTS
    from geod.stage2_distill.checkpoint import MODULES_FILE as RUN_MODULES
    from safetensors.torch import load_file

    lora: dict[str, dict] = {}

    def add(name: str, value, where: Path) -> None:
        # name: "<module>.lora_A[.default].weight" below the tower
        parts = name.split(".")
        kind = next((p for p in parts if p in ("lora_A", "lora_B")), None)
        if kind is None or parts[-1] != "weight":
            raise ExportError(f"{where}: unexpected LoRA tensor {name!r}")
        module = ".".join(parts[:parts.index(kind)])
        lora.setdefault(module, {})[kind] = value

    if checkpoint is not None:
        path = Path(str(checkpoint))
        if not path.is_dir() and str(checkpoint).isdigit():
            path = run_dir / CHECKPOINTS / f"step-{int(checkpoint):06d}"
        weights_file = path / "trainable.safetensors"
        if not weights_file.is_file():
            raise ExportError(f"{run_dir}: no checkpoint {checkpoint} ({weights_file} missing)")
        weights = load_file(weights_file)
        modules = {k: v for k, v in weights.items() if k.startswith((_BOTTLENECK_PREFIX, *_HEAD_PREFIXES))}
        tower_prefix = "student.tower." + _PEFT_PREFIX
        for name, value in weights.items():
            if name.startswith(tower_prefix) and (".lora_A." in name or ".lora_B." in name):
                add(name[len(tower_prefix):], value, weights_file)
        source = str(path)
    else:
        modules_file = run_dir / RUN_MODULES
        if not modules_file.is_file():
            raise ExportError(f"{run_dir}: no {RUN_MODULES} (did the run finish? pass a checkpoint to export "
                              f"an unfinished run)")
        modules = load_file(modules_file)
        adapter_file = run_dir / RUN_ADAPTER / "adapter_model.safetensors"
        if adapter_file.is_file():
            for name, value in load_file(adapter_file).items():
                if not name.startswith(_PEFT_PREFIX):
                    raise ExportError(f"{adapter_file}: unexpected tensor {name!r}")
                add(name[len(_PEFT_PREFIX):], value, adapter_file)
        source = str(run_dir)
    incomplete = sorted(m for m, pair in lora.items() if set(pair) != {"lora_A", "lora_B"})
    if incomplete:
        raise ExportError(f"{source}: LoRA module {incomplete[0]} lacks its A or B matrix")
    return _Trained(lora=lora, modules=modules, source=source)


def _base_location(run_dir: Path, config, info: dict) -> str:
    from geod.stage2_distill.checkpoint import BASE_DIR

    if info.get("base_in_run"):
        return str(run_dir / BASE_DIR)
    return info.get("base_model") or config.student.name_or_path


@dataclass(kw_only=True)
class _Base:
    """The base model an export starts from."""

    model: object  # the nn.Module the LoRA is installed on: the VLM, or the tower itself
    tower_path: str  # the vision tower's module path inside `model` ("" = the model is the tower)
    write_merged: Callable  # (merged model, directory) -> None: the model and its processor, loadable as is
    processor_note: str


def _load_base(base: str, family: str | None, info: dict) -> _Base:
    import transformers

    where = f"base model {base!r}"
    if family == "timm":
        return _load_timm_base(base, info, where)
    if family in _TOWER_CLASSES:
        model_class = getattr(transformers, _TOWER_CLASSES[family][0])
        try:
            model = model_class.from_pretrained(base)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{where}: cannot load its {model_class.__name__}: {exc}") from None

        def write_tower(merged, directory: Path) -> None:
            merged.save_pretrained(directory)
            _tower_processor(directory, family, info["preprocessing"])

        return _Base(model=model, tower_path="", write_merged=write_tower,
                     processor_note="image processor reproducing the distillation preprocessing")
    from geod.stage2_distill.vlm_towers import VLM_FAMILIES, find_tower, load_vlm

    if family not in VLM_FAMILIES:
        raise ExportError(f"{where}: exporting {family!r} students is not supported (supported: "
                          f"{', '.join(sorted(_TOWER_CLASSES) + sorted(VLM_FAMILIES) + ['timm'])}); the run's own "
                          f"adapter/ and {MODULES_FILE} load with geod.stage2_distill.checkpoint.load_distilled")
    model = load_vlm(base, VLM_FAMILIES[family], where)  # in its stored dtype: untouched tensors stay exact
    _tower, prefix = find_tower(model, where)
    recorded = (info.get("vlm") or {}).get("tower_prefix")
    if recorded is not None and recorded != prefix:
        raise ExportError(f"{where}: its vision tower is at {prefix!r} but the run recorded {recorded!r}")
    save_processor, note = _vlm_processor(base, where)

    def write_vlm(merged, directory: Path) -> None:
        merged.save_pretrained(directory)
        save_processor(directory)

    return _Base(model=model, tower_path=prefix, write_merged=write_vlm, processor_note=note)


def _vlm_processor(base: str, where: str) -> tuple[Callable, str]:
    """(a function saving the VLM's processor into a directory, a note on what it saves)."""
    import transformers
    # Not transformers.AutoImageProcessor: without torchvision, transformers 5.17 makes that top-level name a
    # dummy raising ImportError (its lazy import table puts all of image_processing_auto under torchvision).
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    try:
        processor = transformers.AutoProcessor.from_pretrained(base)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:  # ImportError: optional backends
        processor = None
        first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        reason = f"{type(exc).__name__}: {first_line}"
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        return processor.save_pretrained, "the VLM's processor"
    # A base without a tokenizer (e.g. a tiny random VLM saved by geod) can only get its image processor.
    try:
        image_processor = AutoImageProcessor.from_pretrained(base)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        raise ExportError(f"{where}: neither a processor nor an image processor loads from it: {exc}") from None
    note = "image processor only: the base model has no loadable text processor"
    if processor is None:
        note += f" ({reason})"
    return image_processor.save_pretrained, note


def _load_timm_base(base: str, info: dict, where: str) -> _Base:
    """The timm ViT the run started from (a saved timm folder, or a timm name whose weights timm fetches)."""
    from geod.pipeline.errors import StudentError
    from geod.stage2_distill.timm_student import build_timm, is_timm_dir, save_timm, squash_pretrained_cfg

    if Path(base).exists() and not is_timm_dir(base):
        raise ExportError(f"{where}: not a timm model folder (its config.json has no timm 'architecture')")
    try:
        model, _processor, source = build_timm(base, seed=0, overrides={})
    except StudentError as exc:
        raise ExportError(f"{where}: {exc}") from None
    spec = source["timm"]
    recorded = (info.get("source") or {}).get("timm") or {}
    if recorded and recorded.get("architecture") != spec["architecture"]:
        raise ExportError(f"{where}: it is a {spec['architecture']}, but the run distilled a "
                          f"{recorded.get('architecture')}")

    def write_timm(merged, directory: Path) -> None:
        # dynamic_img_size in model_args: timm alone then builds the ViT for any input size, as geod runs it.
        save_timm(merged, {**spec, "model_args": {**spec["model_args"], "dynamic_img_size": True}}, directory,
                  pretrained_cfg=squash_pretrained_cfg(getattr(merged, "pretrained_cfg", {}), info["preprocessing"]))

    return _Base(model=model, tower_path="", write_merged=write_timm,
                 processor_note="timm pretrained_cfg reproducing the distillation preprocessing")


def _tower_processor(directory: Path, family: str, preprocessing: dict) -> None:
    """Image processor config reproducing geod's preprocessing (resize the whole image, no crop, normalise)."""
    height, width = preprocessing["image_size"]
    config = {"image_processor_type": _TOWER_CLASSES[family][1], "do_resize": True, "do_center_crop": False,
              "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
              "size": {"height": int(height), "width": int(width)}, "resample": int(preprocessing["resample"]),
              "rescale_factor": float(preprocessing["rescale_factor"]),
              "image_mean": list(preprocessing["mean"]), "image_std": list(preprocessing["std"])}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _install_lora(model, tower_path: str, trained: _Trained, student_cfg, where: str):
    """Wrap `model` with peft LoRA on the tower's trained modules and load the trained matrices."""
    import torch
    from geod.stage2_distill.adapters import LORA_ADAPTER_NAME, quiet_peft
    from peft import LoraConfig, get_peft_model

    prefix = f"{tower_path}." if tower_path else ""
    names = dict(model.named_modules())
    missing = sorted(m for m in trained.lora if prefix + m not in names)
    if missing:
        raise ExportError(f"{where}: the base model has no module {prefix + missing[0]} that the run's LoRA "
                          f"adapts; was the run trained on this base?")
    config = LoraConfig(r=student_cfg.lora_rank, lora_alpha=student_cfg.lora_alpha or student_cfg.lora_rank,
                        lora_dropout=student_cfg.lora_dropout, bias="none",
                        target_modules=sorted(prefix + m for m in trained.lora))
    with quiet_peft():
        peft_model = get_peft_model(model, config, adapter_name=LORA_ADAPTER_NAME)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for module, pair in trained.lora.items():
            for kind, value in pair.items():
                target = params[f"{_PEFT_PREFIX}{prefix}{module}.{kind}.{LORA_ADAPTER_NAME}.weight"]
                if target.shape != value.shape:
                    raise ExportError(f"{where}: LoRA {module}.{kind} has shape {tuple(value.shape)}, the base "
                                      f"model expects {tuple(target.shape)} (student.lora_rank mismatch?)")
                target.copy_(value.to(target.dtype))
    return peft_model


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished tmp directory at `out`; an existing `out` is removed only after tmp is complete."""
    old = None
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists; pass overwrite to replace it")
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: str | Path, out_dir: str | Path, *, merged: bool = True,
               checkpoint: str | int | Path | None = None, drop_bottlenecks: bool = False,
               overwrite: bool = False) -> ExportSummary:
    """Export a distillation run (its final outputs, or `checkpoint`) to `out_dir`: the peft adapter on the
    base model and, with `merged`, the base model with the LoRA merged in plus its processor. See the module
    docstring for the layout and for runs with bottleneck adapters."""
    from geod.stage2_distill.adapters import LORA_ADAPTER_NAME
    from geod.stage2_distill.checkpoint import CONFIG_FILE, STUDENT_FILE, is_run_dir
    from geod.stage2_distill.config import DistillConfig
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not is_run_dir(run_dir):
        raise ExportError(f"{run_dir}: not a distillation run (no {CONFIG_FILE} and {STUDENT_FILE})")
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass overwrite to replace it")
    config = DistillConfig.from_dict(json.loads((run_dir / CONFIG_FILE).read_text()))
    info = json.loads((run_dir / STUDENT_FILE).read_text())
    trained = _read_trained(run_dir, checkpoint)
    if not trained.lora:
        raise ExportError(f"{trained.source}: the run has no LoRA weights (student.lora_rank="
                          f"{config.student.lora_rank}), so exporting would reproduce the base model")
    bottlenecks = sorted({k.split(".")[2] for k in trained.modules if k.startswith(_BOTTLENECK_PREFIX)}, key=int)
    if bottlenecks and not drop_bottlenecks:
        raise ExportError(
            f"{run_dir}: the run has bottleneck adapters after blocks {', '.join(bottlenecks)} "
            f"(student.adapter_dim={config.student.adapter_dim}); they are not part of the "
            f"{info.get('family', '?')} architecture, so the exported adapter and merged model cannot carry "
            f"them. Train with student.adapter_dim=0 for an exact export, or pass drop_bottlenecks "
            f"(--drop-bottlenecks) to export the LoRA alone (the model's features then differ from the "
            f"distilled student's; the adapters are kept in {MODULES_FILE})")

    base = _base_location(run_dir, config, info)
    family = info.get("family")
    loaded = _load_base(base, family, info)
    tower_path = loaded.tower_path
    peft_model = _install_lora(loaded.model, tower_path, trained, config.student, str(run_dir))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        peft_model.peft_config[LORA_ADAPTER_NAME].base_model_name_or_path = base
        peft_model.save_pretrained(tmp / ADAPTER_DIR)
        model_class = type(peft_model.get_base_model()).__name__
        if merged:
            loaded.write_merged(peft_model.merge_and_unload(), tmp / MERGED_DIR)
        modules = {k: v.contiguous() for k, v in trained.modules.items()}
        save_file(modules, tmp / MODULES_FILE, metadata={"format": "geod-modules", "version": "1"})
        record = {
            "format": "geod-export", "version": 1, "run": str(run_dir.resolve()), "source": trained.source,
            "checkpoint": None if checkpoint is None else str(checkpoint), "base_model": base,
            "family": family, "model_class": model_class, "tower_path": tower_path, "merged": merged,
            "lora": {"rank": config.student.lora_rank,
                     "alpha": config.student.lora_alpha or config.student.lora_rank,
                     "modules": sorted((f"{tower_path}." if tower_path else "") + m for m in trained.lora)},
            "bottlenecks_in_model": None if not bottlenecks else False,
            "bottleneck_blocks": [int(b) for b in bottlenecks],
            "distilled_image_size": info.get("image_size"), "native_image_size": info.get("native_size"),
            "preprocessing": info.get("preprocessing"), "processor": loaded.processor_note if merged else None,
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportSummary(out_dir=out_dir, base_model=base, model_class=model_class, tower_path=tower_path,
                         lora_modules=len(trained.lora), merged=merged,
                         bottlenecks_in_model=None if not bottlenecks else False)
