"""timm ViTs as students (the method's reference backbone is a timm CLIP ViT-B/16 at 384 px).

Names:
- "timm": `vit_base_patch16_clip_384.laion2b_ft_in12k_in1k`, pretrained (the method's backbone);
- "timm:<model name>" or the hub id "timm/<model name>": any timm ViT, pretrained;
- "tiny-timm": that architecture at width 64, 4 blocks, patch 8, 64x64, random weights (seeded);
- a local directory whose config.json has timm's "architecture" key (what `save_timm` writes, and the
  layout of timm's own hub snapshots).
Every model is created with `dynamic_img_size=True` (position embeddings interpolated for any input size)
and `num_classes=0` (no classifier). Normalisation and input size come from the model's `pretrained_cfg`,
the preprocessing metadata timm ships with its weights. timm is an optional extra: `pip install 'geod[timm]'`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from geod.pipeline.errors import StudentError
from torch import nn

TIMM_HINT = "pip install 'geod[timm]'"
DEFAULT_TIMM = "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k"
TINY_TIMM_ARCH = "vit_base_patch16_clip_384"
TINY_TIMM_ARGS = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
WEIGHTS_FILE = "model.safetensors"
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_OVERRIDE_NAMES = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
                   "patch_size": "patch_size", "image_size": "img_size"}


def is_timm_name(name: str) -> bool:
    return name in ("timm", "tiny-timm") or name.startswith(("timm:", "timm/"))


def is_timm_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "architecture" in data and "model_type" not in data


def import_timm():
    """timm, or a StudentError with the install hint (a timm whose torchvision is broken fails at import
    with a RuntimeError rather than an ImportError)."""
    try:
        import timm
    except (ImportError, RuntimeError) as exc:
        raise StudentError(f"timm students need the optional timm package (with a torchvision that matches "
                           f"torch): {TIMM_HINT} ({type(exc).__name__}: {exc})") from None
    return timm


def _create(timm, arch: str, *, pretrained: bool, **kwargs) -> nn.Module:
    try:
        options = {"num_classes": 0, "dynamic_img_size": True, **kwargs}  # a saved folder may name either
        return timm.create_model(arch, pretrained=pretrained, **options)
    except (RuntimeError, ValueError, OSError) as exc:
        raise StudentError(f"timm student {arch!r}: cannot create the model: {exc}") from None


def processor_from_pretrained_cfg(model: nn.Module, cfg: dict | None = None) -> dict:
    """A processor config (same keys as transformers') from timm's pretrained_cfg: mean, std, size, filter.

    The size is the model's own input size, unless `cfg` (a saved folder's pretrained_cfg) gives an input_size.
    """
    saved = cfg is not None
    cfg = dict(cfg if saved else getattr(model, "pretrained_cfg", {}) or {})
    if "mean" not in cfg or "std" not in cfg:
        raise StudentError(f"timm model {type(model).__name__}: its pretrained_cfg has no mean / std")
    height, width = (int(v) for v in model.patch_embed.img_size)
    if saved and len(cfg.get("input_size") or ()) == 3:
        height, width = (int(v) for v in cfg["input_size"][1:])
    return {"image_mean": [float(v) for v in cfg["mean"]], "image_std": [float(v) for v in cfg["std"]],
            "size": {"height": height, "width": width},
            "resample": _RESAMPLE.get(str(cfg.get("interpolation", "bicubic")), 3), "rescale_factor": 1.0 / 255.0,
            "image_processor_type": "timm"}


def build_timm(name: str, *, seed: int, overrides: dict) -> tuple[nn.Module, dict, dict]:
    """(model, processor config, source) for a timm student name or directory."""
    timm = import_timm()
    if name == "tiny-timm":
        args = {**TINY_TIMM_ARGS, **{_OVERRIDE_NAMES[k]: v for k, v in overrides.items() if k in _OVERRIDE_NAMES}}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _create(timm, TINY_TIMM_ARCH, pretrained=False, **args)
        source = {"kind": "tiny", "name": name, "seed": seed, "overrides": dict(overrides),
                  "timm": {"architecture": TINY_TIMM_ARCH, "model_args": args}}
        return model, processor_from_pretrained_cfg(model), source
    if is_timm_dir(name):
        return _load_dir(timm, Path(name))
    arch = DEFAULT_TIMM if name == "timm" else name.split(":", 1)[1] if name.startswith("timm:") else name[5:]
    model = _create(timm, arch, pretrained=True)
    source = {"kind": "timm", "name_or_path": f"timm:{arch}", "timm": {"architecture": arch, "model_args": {}}}
    return model, processor_from_pretrained_cfg(model), source


def _load_dir(timm, path: Path) -> tuple[nn.Module, dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((path / "config.json").read_text())
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise StudentError(f"timm student {path}: no {WEIGHTS_FILE}")
    arch, args = config["architecture"], dict(config.get("model_args") or {})
    model = _create(timm, arch, pretrained=False, **args)
    # Full timm checkpoints carry a classifier; the student has none (num_classes=0).
    state = {k: v for k, v in load_file(weights).items() if not k.startswith(("head.", "fc_norm."))
             or k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StudentError(f"timm student {path}: weights do not fit {arch} (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    processor = processor_from_pretrained_cfg(model, config.get("pretrained_cfg") or None)
    return model, processor, {"kind": "local", "name_or_path": str(path.resolve()),
                              "timm": {"architecture": arch, "model_args": args}}


def save_timm(model: nn.Module, spec: dict, directory: Path, *, pretrained_cfg: dict | None = None) -> None:
    """Write config.json (timm's hub layout: architecture, model_args, pretrained_cfg) and the weights;
    `spec` is the student's source["timm"] ({"architecture", "model_args"}). `pretrained_cfg` replaces the
    model's own. timm loads the folder with `timm.create_model("local-dir:<directory>", pretrained=True)`."""
    from safetensors.torch import save_file
    if pretrained_cfg is None:  # the model's own, with the input size the model was built for
        pretrained_cfg = {**(getattr(model, "pretrained_cfg", {}) or {}),
                          "input_size": [3, *(int(v) for v in model.patch_embed.img_size)]}
    chosen = pretrained_cfg
    cfg = {k: v for k, v in (chosen or {}).items() if isinstance(v, (str, int, float, bool, list, tuple)) or v is None}
    config = {"architecture": spec["architecture"], "num_classes": 0, "model_args": spec["model_args"],
              "pretrained_cfg": cfg}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE)


def squash_pretrained_cfg(pretrained_cfg: dict, preprocessing: dict) -> dict:
    """`pretrained_cfg` changed so that timm's own data pipeline (`resolve_data_config` + `create_transform`)
    prepares images as geod distilled them: the whole image resized to the distillation size ("squash" crop
    mode at crop_pct 1), the same interpolation, mean and std."""
    height, width = (int(v) for v in preprocessing["image_size"])
    names = {code: name for name, code in _RESAMPLE.items()}
    return {**dict(pretrained_cfg or {}), "input_size": [3, height, width], "crop_pct": 1.0, "crop_mode": "squash",
            "interpolation": names.get(int(preprocessing["resample"]), "bicubic"),
            "mean": [float(v) for v in preprocessing["mean"]], "std": [float(v) for v in preprocessing["std"]],
            "fixed_input_size": False}
