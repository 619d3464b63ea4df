"""The `geod` command line. It only parses arguments and calls library functions.

Heavy modules (torch, transformers, zarr) are imported inside the commands so that `geod --help` stays
instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from geod.pipeline.errors import GeodError

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
    frame_gap: str = typer.Option("5x40", help="Allowed frame-index gap between the two views, MINxMAX."),
    overlap_min: float = typer.Option(0.3, help="Least fraction of A's pixels visible in B."),
    overlap_max: float = typer.Option(0.85, help="Largest fraction of A's pixels visible in B."),
    max_pairs_per_scene: int = typer.Option(200, help="Cap on pairs kept per scene."),
    val_fraction: float = typer.Option(0.0, help="Fraction of scenes put in the 'val' split."),
    seed: int = typer.Option(0, help="Seed of the pair sampling."),
) -> None:
    """Pick co-visible view pairs of ScanNet-layout RGB-D scenes from their poses and depth."""
    from geod.data_manifests.manifest import write_manifest
    from geod.data_manifests.scannet import ScanNetPairConfig, build_scannet_pairs

    cfg = ScanNetPairConfig(
        frame_gap=_parse_pair(frame_gap, "--frame-gap"), overlap=(overlap_min, overlap_max),
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
) -> None:
    """Pair neighbouring images of plain image folders (no geometry: for learned teachers)."""
    from geod.data_manifests.folder import build_folder_pairs
    from geod.data_manifests.manifest import write_manifest

    rows = build_folder_pairs(root, max_gap=max_gap, manifest_dir=out.parent)
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except GeodError as error:  # bad input: a clear message, no traceback
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
