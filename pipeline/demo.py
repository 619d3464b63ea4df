"""`geod demo`: the whole pipeline on synthetic data, with no downloads.

Synthetic textured RGB-D scenes -> a pair manifest (scenes split into train and val) -> geometry-teacher
targets -> distillation of a small random-initialised student -> evaluation of the base and the distilled
student on the held-out scenes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from geod.pipeline.errors import ConfigError


@dataclass(kw_only=True)
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on 2 CPU cores."""

    out: Path
    scenes: int = 8
    frames_per_scene: int = 12
    val_fraction: float = 0.25
    student: str = "tiny-clip"
    image_size: tuple[int, int] = (96, 128)
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 8
    workers: int = 2
    seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.image_size = tuple(int(v) for v in self.image_size)
        if self.scenes < 2:
            raise ConfigError(f"demo needs at least 2 scenes (one held out), got {self.scenes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"demo val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.steps < 1:
            raise ConfigError(f"demo steps must be >= 1, got {self.steps}")


def _prepare_out(cfg: DemoConfig) -> None:
    if cfg.out.exists() and any(cfg.out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{cfg.out} is not empty; pass --overwrite to replace the demo there")
        import shutil

        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)


def _build_targets(cfg: DemoConfig) -> Path:
    from geod.data_manifests.manifest import write_manifest
    from geod.data_manifests.scannet import ScanNetPairConfig, build_scannet_pairs
    from geod.data_manifests.synthetic import SyntheticConfig, write_synthetic_scenes
    from geod.pipeline.card import DatasetLayout
    from geod.stage1_extract.runner import ExtractConfig, run_extract

    scenes = cfg.out / "scenes"
    write_synthetic_scenes(scenes, SyntheticConfig(scenes=cfg.scenes, frames_per_scene=cfg.frames_per_scene,
                                                   seed=cfg.seed))
    # Synthetic scenes are short: every frame is a candidate and close frames still differ enough.
    pair_cfg = ScanNetPairConfig(frame_stride=1, frame_gap=(1, 6), overlap=(0.3, 0.95),
                                 val_fraction=cfg.val_fraction, seed=cfg.seed)
    manifest = cfg.out / "pairs.parquet"
    write_manifest(build_scannet_pairs(scenes, pair_cfg, manifest_dir=manifest.parent), manifest)
    targets = cfg.out / "targets"
    layout = DatasetLayout(max_matches=256, grid_h=24, grid_w=32, topk=32, depth_h=48, depth_w=64,
                           pairs_per_shard=64, rows_per_chunk=16)
    run_extract(ExtractConfig(pairs=manifest, out=targets, layout=layout, workers=max(cfg.workers, 1), seed=cfg.seed,
                              progress=cfg.progress))
    return targets


def _evaluate(cfg: DemoConfig, targets: Path, student: str, name: str, image_size=None) -> dict:
    from geod.stage2_distill.config import EvalConfig
    from geod.stage2_distill.evaluate import evaluate

    return evaluate(EvalConfig(shards=str(targets), student=student, split="val", image_size=image_size,
                               device="cpu", seed=cfg.seed, out=cfg.out / f"eval_{name}.json",
                               draw=cfg.out / f"matches_{name}.png", progress=cfg.progress))


def _distill(cfg: DemoConfig, targets: Path) -> Path:
    from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
    from geod.stage2_distill.train import run_distill

    run_dir = cfg.out / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(targets), split="train", batch_size=cfg.batch_size, workers=cfg.workers,
                        seed=cfg.seed),
        run=RunConfig(out=run_dir, device="cpu", checkpoint_every=max(cfg.steps // 2, 1),
                      progress=cfg.progress),
        student=StudentConfig(name_or_path=cfg.student, image_size=cfg.image_size, seed=cfg.seed),
        optim=OptimConfig(lr=cfg.lr, warmup_steps=min(15, cfg.steps), max_steps=cfg.steps),
    ))
    return run_dir


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo into cfg.out; returns (and writes to report.json) the before/after metrics."""
    _prepare_out(cfg)
    targets = _build_targets(cfg)
    # The base student is evaluated at the size the run trains at; a run keeps its own size.
    before = _evaluate(cfg, targets, cfg.student, "base", image_size=cfg.image_size)
    run_dir = _distill(cfg, targets)
    after = _evaluate(cfg, targets, str(run_dir), "distilled")
    keys = ("pck@0.05", "pck@0.10", "median_error", "depth_order_acc")
    report = {
        "student": cfg.student,
        "image_size": list(cfg.image_size),
        "steps": cfg.steps,
        "targets": str(targets),
        "run": str(run_dir),
        "base": {k: before[k] for k in keys},
        "distilled": {k: after[k] for k in keys},
        "improved_pck": after["pck@0.05"] > before["pck@0.05"],
    }
    tmp = cfg.out / f".tmp-report-{os.getpid()}.json"
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg.out / "report.json")
    return report


def format_report(report: dict) -> str:
    """A small before/after table for the terminal."""
    lines = [f"{'metric':<18}{'base':>10}{'distilled':>12}"]
    for key in report["base"]:
        lines.append(f"{key:<18}{report['base'][key]:>10.3f}{report['distilled'][key]:>12.3f}")
    return "\n".join(lines)
