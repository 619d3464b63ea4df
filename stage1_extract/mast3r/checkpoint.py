"""Loading (and saving) MASt3R weights: a .safetensors file, a directory (config.json + *.safetensors), a
hub id, or the official .pth.

Nothing arbitrary is ever unpickled. A .pth is read with `torch.load(weights_only=True)`, allowing one extra
class, argparse.Namespace (the official file stores its training arguments in one); the architecture is
read from the Namespace's `model` string by parsing it as a Python call expression, never evaluating it.
The official state dict names each DPT projection twice (`scratch.layer_rn.i` is an alias of
`scratch.layer{i+1}_rn`); aliases are checked to hold the same values and dropped. Loading is strict: any
missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from geod.pipeline.errors import TeacherError
from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.network import Mast3rNet

GEOD_CONFIG_KEY = "geod_mast3r"
_ALIAS = re.compile(r"^(?P<prefix>.*\.scratch\.)layer_rn\.(?P<index>\d+)\.weight$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadedMast3r:
    model: Mast3rNet
    config: Mast3rConfig
    weights_path: Path   # the file the tensors came from (hash it for the dataset card)
    source: str          # what the user gave: path or hub id


def load_mast3r(source: str | os.PathLike, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, attn_impl: str = "sdpa", revision: str | None = None,
                cache_dir: str | None = None) -> LoadedMast3r:
    """Build the network from a checkpoint with strict key and shape matching, in eval mode."""
    state, config, weights_path = load_state_dict_from(source, revision=revision, cache_dir=cache_dir)
    with torch.device("meta"):
        model = Mast3rNet(config, attn_impl=attn_impl)
    check_state_dict(state, model, weights_path)
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LoadedMast3r(model=model, config=config, weights_path=weights_path, source=str(source))


def load_state_dict_from(source: str | os.PathLike, *, revision: str | None = None,
                         cache_dir: str | None = None) -> tuple[dict, Mast3rConfig, Path]:
    """(canonical state dict on the CPU, architecture config, weights file) for a path or hub id."""
    weights, config_file = resolve_checkpoint(source, revision=revision, cache_dir=cache_dir)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            state = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise TeacherError(f"{weights}: not a readable safetensors file: {error}") from None
        official_kwargs = None
    else:
        state, official_kwargs = read_pth(weights)
    if config_file is not None:
        config = read_config_json(config_file)
    elif official_kwargs is not None:
        config = Mast3rConfig.from_official_kwargs(official_kwargs, source=str(weights))
    else:
        config = Mast3rConfig()  # no description beside the weights: the published architecture
    return canonicalise(state, str(weights)), config, weights


def resolve_checkpoint(source: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | None = None) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file, a directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        # a config.json beside the weights describes them (it wins over a .pth's own argument string)
        sibling = path.parent / "config.json"
        return path, (sibling if sibling.is_file() else None)
    if path.is_dir():
        return _weights_in_dir(path), (path / "config.json" if (path / "config.json").is_file() else None)
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        folder = _hub_snapshot(str(source), revision, cache_dir)
        config = folder / "config.json"
        return _weights_in_dir(folder, hub_id=str(source)), (config if config.is_file() else None)
    raise TeacherError(f"MASt3R weights {str(source)!r}: no such file or directory, and not a hub id "
                       "(owner/name)")


def _weights_in_dir(folder: Path, hub_id: str | None = None) -> Path:
    where = f"hub repository {hub_id!r}" if hub_id else str(folder)
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise TeacherError(f"{where}: several .safetensors files {[p.name for p in found]}; give one file")
    pth = sorted(p for p in folder.iterdir() if p.suffix in _PTH_SUFFIXES) if folder.is_dir() else []
    if len(pth) == 1 and hub_id is None:
        return pth[0]
    raise TeacherError(f"{where}: expected exactly one .safetensors file (or one .pth) with the weights")


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
    except ImportError:
        raise TeacherError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=["*.safetensors", "config.json"]))
    except Exception as error:  # network, authentication or missing repository
        raise TeacherError(f"hub repository {repo_id!r}: download failed: {error}") from None


def read_config_json(path: Path) -> Mast3rConfig:
    """config.json in either form: geod's own ({"geod_mast3r": {...}}) or the official constructor
    arguments (what the official hub upload stores)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TeacherError(f"{path}: unreadable config.json: {error}") from None
    if not isinstance(data, dict):
        raise TeacherError(f"{path}: config.json must hold an object")
    if GEOD_CONFIG_KEY in data:
        try:
            return Mast3rConfig.from_dict(data[GEOD_CONFIG_KEY])
        except Exception as error:
            raise TeacherError(f"{path}: {error}") from None
    return Mast3rConfig.from_official_kwargs(data, source=str(path))


def read_pth(path: Path) -> tuple[dict, dict | None]:
    """(state dict, official constructor kwargs or None) from a .pth without unpickling code objects."""
    import argparse  # noqa: PLC0415

    if not hasattr(torch.serialization, "safe_globals"):
        raise TeacherError(f"{path}: reading .pth checkpoints safely needs torch >= 2.5; convert it to "
                           ".safetensors with a newer torch (geod.stage1_extract.mast3r.checkpoint."
                           "convert_checkpoint) or upgrade")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for forbidden objects, RuntimeError for corrupt archives
        raise TeacherError(f"{path}: refused or failed to load safely (only tensors and an argparse "
                           f"Namespace are allowed): {str(error).splitlines()[0]}. Use a .safetensors "
                           "checkpoint instead.") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state, args = ckpt["model"], ckpt.get("args")
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, args = ckpt, None
    else:
        raise TeacherError(f"{path}: expected a state dict or a dict with a 'model' state dict")
    model_string = getattr(args, "model", None)
    kwargs = parse_model_string(model_string, str(path)) if isinstance(model_string, str) else None
    return state, kwargs


def parse_model_string(text: str, where: str = "checkpoint") -> dict:
    """Keyword arguments of "AsymmetricMASt3R(k=v, ...)" from literals only (inf allowed), never eval."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise TeacherError(f"{where}: cannot parse the model description {text!r}") from None
    if not isinstance(call, ast.Call) or call.args:
        raise TeacherError(f"{where}: model description must be a call with keyword arguments: {text!r}")

    class _Inf(ast.NodeTransformer):
        def visit_Name(self, node):  # noqa: N802 - ast API
            if node.id == "inf":
                return ast.copy_location(ast.Constant(math.inf), node)
            raise TeacherError(f"{where}: unexpected name {node.id!r} in the model description")

    kwargs = {}
    for keyword in call.keywords:
        try:
            kwargs[keyword.arg] = ast.literal_eval(_Inf().visit(keyword.value))
        except ValueError:
            raise TeacherError(f"{where}: argument {keyword.arg!r} is not a literal") from None
    return kwargs


def canonicalise(state: dict, where: str) -> dict:
    """Drop `scratch.layer_rn.i` aliases after checking they equal `scratch.layer{i+1}_rn` (or rename them
    when only the alias is present)."""
    out = {}
    for key, tensor in state.items():
        match = _ALIAS.match(key)
        if match is None:
            out.setdefault(key, tensor)
            continue
        canonical = f"{match['prefix']}layer{int(match['index']) + 1}_rn.weight"
        if canonical in state:
            if state[canonical].shape != tensor.shape or not torch.equal(state[canonical], tensor):
                raise TeacherError(f"{where}: {key} should be an alias of {canonical} but differs")
        else:
            out[canonical] = tensor
    return out


def check_state_dict(state: dict, model: torch.nn.Module, where: str) -> None:
    """Raise TeacherError naming every missing, unexpected or mis-shaped tensor (first 20 of each)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {expected[k]}"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 20} more)" if len(items) > 20 else ""
            problems.append(f"{len(items)} {title}: " + ", ".join(items[:20]) + more)
    if problems:
        raise TeacherError(f"{where}: checkpoint does not match the MASt3R architecture: " + "; ".join(problems))


def save_mast3r(model: Mast3rNet, folder: str | os.PathLike) -> Path:
    """Write model.safetensors + config.json (geod's form) into `folder`, each file atomically.
    Returns the weights path."""
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = folder / "model.safetensors"
    tmp = folder / f".model.safetensors.tmp-{os.getpid()}"
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    config = {GEOD_CONFIG_KEY: model.cfg.to_dict()}
    tmp = folder / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "config.json")
    return weights


def convert_checkpoint(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Convert any supported checkpoint (e.g. the official .pth) into a safetensors directory."""
    loaded = load_mast3r(source)
    return save_mast3r(loaded.model, folder)
