"""The `geod` command line. It only parses arguments and calls library functions.

Heavy modules (torch, transformers, zarr) are imported inside the commands so that `geod --help` stays
instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from geod.pipeline.errors import ConfigError, GeodError

app = typer.Typer(
    help="geod: distil 3D geometry from a frozen 3D teacher into a VLM's vision encoder, via cached targets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pairs_app = typer.Typer(help="Build a pair manifest (parquet) from a dataset on disk.", no_args_is_help=True)
app.add_typer(pairs_app, name="pairs")


def _parse_pair(text: str, option: str) -> tuple[int, int]:
    try:
        first, second = (int(part) for part in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise typer.BadParameter(f"{option} takes two integers like 24x32, got {text!r}") from None
    return first, second


@pairs_app.command("scannet")
def pairs_scannet(
    root: Path = typer.Argument(..., help="Folder of ScanNet-layout scenes (color/, depth/, pose/, intrinsic/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet)."),
    frame_stride: int = typer.Option(5, help="Consider every FRAME_STRIDE-th frame."),
    frame_gap: str = typer.Option("5x60", help="Allowed frame-number gap between the two views, MINxMAX."),
    overlap_min: float = typer.Option(0.3, help="Least co-visibility (smaller of the A->B and B->A fractions)."),
    overlap_max: float = typer.Option(0.8, help="Largest co-visibility."),
    max_pairs_per_scene: int = typer.Option(200, help="Cap on pairs kept per scene."),
    val_fraction: float = typer.Option(0.0, help="Fraction of scenes put in the 'val' split."),
    seed: int = typer.Option(0, help="Seed of the pair sampling."),
) -> None:
    """Pick co-visible view pairs of ScanNet-layout RGB-D scenes from their poses and depth."""
    from geod.data_manifests.manifest import write_manifest
    from geod.data_manifests.scannet import ScanNetPairConfig, build_scannet_pairs

    cfg = ScanNetPairConfig(
        frame_stride=frame_stride, frame_gap=_parse_pair(frame_gap, "--frame-gap"), overlap=(overlap_min, overlap_max),
        max_pairs_per_scene=max_pairs_per_scene, val_fraction=val_fraction, seed=seed,
    )
    rows = build_scannet_pairs(root, cfg, manifest_dir=out.parent)
    write_manifest(rows, out)
    typer.echo(f"wrote {len(rows)} pairs to {out}")


@pairs_app.command("folder")
def pairs_folder(
    root: Path = typer.Argument(..., help="Folder with one sub-folder of images per scene."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet)."),
    max_gap: int = typer.Option(3, help="Pair each image with the next MAX_GAP images of its scene."),
    val_fraction: float = typer.Option(0.0, help="Fraction of scenes put in the 'val' split."),
) -> None:
    """Pair neighbouring images of plain image folders (no geometry: for learned teachers)."""
    from geod.data_manifests.folder import build_folder_pairs
    from geod.data_manifests.manifest import write_manifest

    rows = build_folder_pairs(root, max_gap=max_gap, val_fraction=val_fraction, manifest_dir=out.parent)
    write_manifest(rows, out)
    typer.echo(f"wrote {len(rows)} pairs to {out}")


@app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Folder to write the synthetic scenes to."),
    scenes: int = typer.Option(4, help="Number of scenes."),
    frames: int = typer.Option(12, help="Frames per scene."),
    width: int = typer.Option(160, help="Image width in pixels."),
    height: int = typer.Option(120, help="Image height in pixels."),
    seed: int = typer.Option(0, help="Seed of the scene generator."),
) -> None:
    """Write textured synthetic RGB-D scenes with exact depth and poses in the ScanNet layout."""
    from geod.data_manifests.synthetic import SyntheticConfig, write_synthetic_scenes

    cfg = SyntheticConfig(scenes=scenes, frames_per_scene=frames, width=width, height=height, seed=seed)
    written = write_synthetic_scenes(out, cfg)
    typer.echo(f"wrote {len(written)} scenes to {out}")


def _parse_options(items: list[str], option: str) -> dict:
    """KEY=VALUE strings to a dict; values are parsed as JSON when they parse, else kept as strings."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{option} takes KEY=VALUE, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


@app.command("extract")
def extract(
    pairs: Path = typer.Option(..., "--pairs", "-p", help="Pair manifest (.parquet)."),
    out: Path = typer.Option(..., "--out", "-o", help="Target dataset directory to write (or resume)."),
    teacher: str = typer.Option("geometry", help="Teacher name (geometry, mast3r)."),
    teacher_option: list[str] = typer.Option([], "--teacher-option", "-t",
                                             help="Teacher option KEY=VALUE (repeatable), e.g. -t rel_tol=0.05."),
    weights: Optional[str] = typer.Option(None, help="Teacher weights: local path or hub id (learned teachers)."),
    grid: str = typer.Option("24x32", help="Cost-volume patch grid, HxW."),
    depth_map: str = typer.Option("48x64", help="Low-resolution depth map size, HxW."),
    max_matches: int = typer.Option(512, help="Match capacity per pair."),
    topk: int = typer.Option(32, help="Cost-volume entries kept per row."),
    pairs_per_shard: int = typer.Option(256, help="Pairs per shard."),
    rows_per_chunk: int = typer.Option(32, help="Pairs per zarr chunk (the streaming read unit)."),
    batch_size: int = typer.Option(8, help="Pairs per teacher call."),
    workers: int = typer.Option(2, help="Threads building targets (and reading inputs without loader processes)."),
    load_processes: Optional[int] = typer.Option(
        None, help="Processes reading, decoding and resizing inputs (0: threads; default: half the CPUs, at most 8, "
                   "or 0 below 4 CPUs)."),
    write_workers: int = typer.Option(2, help="Shards compressed and written at once."),
    seed: int = typer.Option(0, help="Seed of the match sampling."),
    cv_sigma: float = typer.Option(0.5, help="Width (patches) of cost-volume rows derived from correspondences."),
    dataset_version: str = typer.Option("0.1.0", help="Release version written to the card."),
    licence: Optional[str] = typer.Option(None, help="Licence of the targets, written to the card."),
    overwrite: bool = typer.Option(False, help="Replace a dataset made with other settings."),
) -> None:
    """Run the teacher over a pair manifest and write a sharded target dataset (resumable)."""
    from geod.pipeline.card import DatasetLayout
    from geod.stage1_extract.runner import ExtractConfig, run_extract

    grid_h, grid_w = _parse_pair(grid, "--grid")
    depth_h, depth_w = _parse_pair(depth_map, "--depth-map")
    options = _parse_options(teacher_option, "--teacher-option")
    if weights is not None:
        options["weights"] = weights
    layout = DatasetLayout(
        max_matches=max_matches, grid_h=grid_h, grid_w=grid_w, topk=topk, depth_h=depth_h, depth_w=depth_w,
        pairs_per_shard=pairs_per_shard, rows_per_chunk=rows_per_chunk,
    )
    cfg = ExtractConfig(
        pairs=pairs, out=out, teacher=teacher, teacher_options=options, layout=layout, batch_size=batch_size,
        workers=workers, load_processes=load_processes, write_workers=write_workers, seed=seed, cv_sigma=cv_sigma,
        dataset_version=dataset_version, licence=licence, overwrite=overwrite,
    )
    summary = run_extract(cfg)
    typer.echo(
        f"{summary.out}: {summary.pairs} pairs ({summary.ok} ok, {summary.failed} failed) in {summary.shards} "
        f"shards; {summary.shards_written} written now, {summary.shards_skipped} already complete"
    )
    if summary.shards_written:
        typer.echo("waited on: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in summary.waits.items()))
    if summary.failed:
        typer.secho(f"{summary.failed} pair(s) failed: their reasons are in the 'reason' column of "
                    f"{summary.out / 'index.parquet'}", fg=typer.colors.YELLOW, err=True)
    if summary.pairs and not summary.ok:
        # Every pair failing points at a systematic problem (wrong paths, wrong teacher), not bad samples.
        typer.secho("error: every pair failed; nothing usable was extracted", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command("info")
def info(dataset: str = typer.Argument(..., help="Target dataset directory or URL.")) -> None:
    """Print a target dataset's card."""
    from geod.pipeline.card import read_card_json

    typer.echo(json.dumps(read_card_json(dataset), indent=2, sort_keys=True))


@app.command("validate")
def validate(
    dataset: str = typer.Argument(..., help="Target dataset directory or URL."),
    checksums: bool = typer.Option(True, help="Also verify every shard's sha256."),
) -> None:
    """Re-check a target dataset: schema, dtypes, value ranges and checksums. Exits 1 on any problem."""
    from geod.pipeline.validate import validate_dataset

    problems = validate_dataset(dataset, checksums=checksums)
    if problems:
        for problem in problems:
            typer.secho(f"problem: {problem}", fg=typer.colors.RED, err=True)
        typer.secho(f"{dataset}: {len(problems)} problem(s)", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    typer.secho(f"{dataset}: valid", fg=typer.colors.GREEN)


def _config_dict(config: Optional[Path]) -> dict:
    if config is None:
        return {}
    from geod.stage2_distill.config import load_config_file

    return load_config_file(config)


def _set_missing(data: dict, section: str, key: str, value) -> None:
    """Fill a config value from a command-line option unless the option was left at None."""
    if value is not None:
        data.setdefault(section, {})[key] = value


@app.command("distill")
def distill(
    shards: str = typer.Option(..., "--shards", "-s", help="Target dataset directory or URL."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (adapters, heads, config, checkpoints)."),
    student: Optional[str] = typer.Option(None, help="Student name (tiny-clip, clip, ...), local path or hub id."),
    image_size: Optional[str] = typer.Option(None, help="Student input size HxW (default: its processor's)."),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps (default 1000)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-4)."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per step (default 8)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: the CPUs this process may "
                                                     "use, less two, at most 16). Part of the data order: "
                                                     "recorded, and kept by --resume."),
    split: Optional[str] = typer.Option(None, help="Split to train on (default train; 'all' = every ok pair)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    config: Optional[Path] = typer.Option(None, help="JSON config (sections as in RUN/config.json)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config value: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an existing run in --out."),
) -> None:
    """Stage 2: fine-tune a student's vision encoder from a target dataset (no 3D model is loaded)."""
    from geod.stage2_distill.checkpoint import with_added_settings
    from geod.stage2_distill.config import DistillConfig, apply_overrides
    from geod.stage2_distill.train import run_distill

    own_config = config is None and resume and (out / "config.json").exists()
    if own_config:
        config = out / "config.json"  # resume with the run's own resolved config unless told otherwise
    data = _config_dict(config)
    if own_config:
        data = with_added_settings(data)  # settings newer than the run take the value it ran with
    data.get("run", {}).pop("stop_after_steps", None)  # a per-invocation limit: never inherited on resume
    data.setdefault("data", {})["shards"] = shards
    data.setdefault("run", {}).update(out=str(out), resume=resume, overwrite=overwrite)
    _set_missing(data, "student", "name_or_path", student)
    _set_missing(data, "student", "image_size", image_size and list(_parse_pair(image_size, "--image-size")))
    _set_missing(data, "optim", "max_steps", steps)
    _set_missing(data, "optim", "lr", lr)
    _set_missing(data, "data", "batch_size", batch_size)
    _set_missing(data, "data", "workers", workers)
    if split is not None:
        data["data"]["split"] = None if split == "all" else split
    _set_missing(data, "run", "device", device)
    optim = data.get("optim", {})
    if "warmup_steps" not in optim and "max_steps" in optim:
        optim["warmup_steps"] = min(100, max(optim["max_steps"] // 10, 1))
    cfg = DistillConfig.from_dict(apply_overrides(data, set_))
    summary = run_distill(cfg)
    typer.echo(f"{summary.run_dir}: {summary.steps} steps ({summary.skipped_steps} skipped) in "
               f"{summary.seconds:.0f} s; last losses {summary.last_losses}")
    typer.echo(f"steps: {summary.step_mode}")
    typer.echo(f"data: the steps waited for batches {100 * summary.data_wait_share:.0f}% of the time")
    if summary.data_wait_share > 0.1:
        typer.secho("the loader held the steps back: give each GPU more CPUs (data.workers); keep "
                    "data.reduced_decode and, on CUDA, run.device_resize on; or store the images smaller",
                    fg=typer.colors.YELLOW, err=True)


@app.command("eval")
def evaluate(
    shards: str = typer.Option(..., "--shards", "-s", help="Target dataset with held-out pairs."),
    student: str = typer.Option("tiny-clip", help="Run directory, student name, local path or hub id."),
    split: str = typer.Option("val", help="Split to evaluate ('all' = every ok pair)."),
    checkpoint: Optional[str] = typer.Option(None, help="With a run directory: a checkpoint step or path."),
    image_size: Optional[str] = typer.Option(None, help="Input size HxW for a base student (runs keep theirs)."),
    like: Optional[Path] = typer.Option(None, help="Distillation run directory: evaluate a base student at that "
                                        "run's input size (image_size from RUN/student.json, nothing else), so "
                                        "base and distilled scores compare like with like."),
    max_pairs: int = typer.Option(200, help="Pairs evaluated, spread over the split."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    draw: Optional[Path] = typer.Option(None, help="Write a PNG of predicted matches (green within 0.10)."),
    out: Optional[Path] = typer.Option(None, help="Write the metrics as JSON."),
) -> None:
    """PCK@0.05/0.10 of correspondences and depth-order accuracy of a student on held-out pairs."""
    from geod.stage2_distill.config import EvalConfig
    from geod.stage2_distill.evaluate import evaluate as run_eval

    if like is not None and image_size:
        raise typer.BadParameter("give either --like or --image-size, not both")
    size = _parse_pair(image_size, "--image-size") if image_size else None
    if like is not None:
        size = _run_image_size(like)
    result = run_eval(EvalConfig(
        shards=shards, student=student, split=None if split == "all" else split, checkpoint=checkpoint,
        image_size=size, max_pairs=max_pairs, device=device, draw=draw, out=out,
    ))
    typer.echo(json.dumps(result, indent=2, sort_keys=True))


def _run_image_size(run: Path) -> tuple[int, int]:
    """(H, W) a distillation run was trained at, read from its student.json (plain JSON: no torch needed)."""
    info_file = run / "student.json"
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{info_file}: missing; --like takes a distillation run directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{info_file}: cannot be read ({error})") from None
    size = info.get("image_size") if isinstance(info, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ConfigError(f"{info_file}: 'image_size' must be two positive integers [H, W], got {size!r}")
    return size[0], size[1]


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Distillation run directory (what `geod distill --out` wrote)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: adapter/, merged/, "
                             "geod_modules.safetensors, geod_export.json."),
    merged: bool = typer.Option(True, "--merged/--adapter-only",
                                help="Also save the base model (the full VLM for VLM students) with the LoRA "
                                     "merged in, and its processor."),
    checkpoint: Optional[str] = typer.Option(None, help="Export this checkpoint (step number or path) instead "
                                                        "of the run's final outputs."),
    drop_bottlenecks: bool = typer.Option(False, help="Export a run trained with bottleneck adapters anyway: the "
                                          "exported model gets the LoRA only; the adapters are kept in "
                                          "geod_modules.safetensors."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export at --out."),
) -> None:
    """Export a distilled run as a peft adapter and a merged model that transformers loads without geod."""
    from geod.stage2_distill.export_vlm import export_run

    summary = export_run(run, out, merged=merged, checkpoint=checkpoint, drop_bottlenecks=drop_bottlenecks,
                         overwrite=overwrite)
    typer.echo(summary.describe())


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Folder for scenes, targets, run, report."),
    steps: int = typer.Option(150, help="Distillation steps."),
    scenes: int = typer.Option(8, help="Synthetic scenes (a quarter held out for evaluation)."),
    seed: int = typer.Option(0, help="Seed of scenes, pairs, student and training."),
    overwrite: bool = typer.Option(False, help="Replace an earlier demo in --out."),
) -> None:
    """End to end on synthetic data: scenes, targets, distillation, before/after evaluation."""
    from geod.pipeline.demo import DemoConfig, format_report, run_demo

    report = run_demo(DemoConfig(out=out, steps=steps, scenes=scenes, seed=seed, overwrite=overwrite))
    typer.echo(format_report(report))
    verdict = "improved" if report["improved_pck"] else "did NOT improve"
    typer.echo(f"distillation {verdict} PCK@0.05; report: {out / 'report.json'}")
    if not report["improved_pck"]:
        raise typer.Exit(code=1)


@app.command("export-targets")
def export_targets(
    dataset: str = typer.Argument(..., help="Target dataset directory or URL."),
    to: str = typer.Option(..., "--to", help="Export format: webdataset or hdf5."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="Output: a directory of tars (webdataset) or one .h5 file (hdf5)."),
    split: Optional[str] = typer.Option(None, help="Export only this split (default: every split)."),
    include_failed: bool = typer.Option(False, help="Also export failed pairs (status 'failed', all-zero targets)."),
    samples_per_tar: Optional[int] = typer.Option(None, help="Pairs per tar (webdataset only; default 1000)."),
    compression: Optional[str] = typer.Option(None, help="gzip (default), lzf or none (hdf5 only)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export at --out."),
) -> None:
    """Export a target dataset as webdataset tar shards or one HDF5 file, for other teams' loaders."""
    from geod.pipeline.export import export_command

    summary = export_command(dataset, out, to, split=split, include_failed=include_failed,
                             samples_per_tar=samples_per_tar, compression=compression, overwrite=overwrite)
    typer.echo(summary.describe())


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GeodError as error:  # bad input: a clear message, no traceback
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
