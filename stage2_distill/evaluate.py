"""`geod eval`: how much 3D a student's features carry, measured on held-out pairs with known geometry.

Metrics (the same procedure for a base student and a distilled one):
- correspondence PCK@t: for each teacher match of view A, the student's matching feature at the A point
  (bilinear) is compared (cosine) with B's dense matching features, bilinearly upsampled `upsample` times;
  the best cell's centre is the prediction. The error is the distance to the true B point in pixels of
  B's original image divided by its longer side; PCK@t is the fraction of matches with error <= t.
- depth-order accuracy: a linear probe on the depth features (mean of the depth blocks) at the match
  points predicts log depth up to a per-image offset (ridge regression, fitted on every other pair);
  on the remaining pairs, every two points of one image whose depths differ by more than `depth_min_gap`
  (scene-normalised) are scored: is the farther one predicted farther?
- for distilled runs also the depth head's own order accuracy on the same point pairs, and how far the
  image features the VLM consumes moved: the cosine similarity, patch token by patch token, between the
  distilled and the base encoder's output of the fed block (final-normed where the VLM does so, see
  `model.fed_view`) on every evaluated image (A and B). `feature_cosine_mean` averages all tokens;
  `feature_cosine_min` is the lowest per-image mean (the image that moved most); 1.0 = unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from geod.pipeline.errors import ConfigError
from geod.stage2_distill.config import EvalConfig, StudentConfig
from geod.stage2_distill.data import PairIndex, PairSource, scene_scale, subsample_matches
from geod.stage2_distill.model import DistillModel, fed_layer, sample_grid
from torch import nn


def load_eval_model(spec: str, *, image_size: tuple[int, int] | None = None, checkpoint: str | None = None,
                    device: torch.device | str = "cpu") -> tuple[DistillModel, bool]:
    """(model, is_distilled) for a run directory (optionally one of its checkpoints), or a base student by
    name / path / hub id. A base student gets no adapters and no refine head: its matching features are its
    final block's.
    """
    from geod.stage2_distill.checkpoint import is_run_dir, load_distilled
    from geod.stage2_distill.students import create_student

    if is_run_dir(spec):
        if image_size is not None:
            raise ConfigError(f"{spec}: a distilled run keeps the image size it was trained at; drop image_size")
        return load_distilled(spec, checkpoint=checkpoint, device=device), True
    if checkpoint is not None:
        raise ConfigError(f"{spec}: a checkpoint can only be chosen for a distillation run directory")
    cfg = StudentConfig(name_or_path=spec, image_size=image_size, lora_rank=0, adapter_dim=0, refine_head=False)
    student = create_student(cfg)
    model = DistillModel(student, cfg.resolved(student.num_layers, student.image_size), lora=False)
    model.requires_grad_(False)
    return model.to(device).eval(), False


def image_cosines(grid: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """Per-image mean over patch tokens of cos(distilled token, base token); grids [B, D, h, w] -> [B]."""
    cosine = nn.functional.cosine_similarity(grid.double(), base.double(), dim=1, eps=1e-8)
    return cosine.flatten(1).mean(1).cpu().numpy()


def _predict_matches(match_b: torch.Tensor, feat_a: torch.Tensor, upsample: int) -> torch.Tensor:
    """Normalised (u, v) in B of the best cosine match of each A feature [N, D] on B's grid [D, h, w]."""
    dense = nn.functional.interpolate(match_b[None], scale_factor=upsample, mode="bilinear",
                                      align_corners=False)[0] if upsample > 1 else match_b
    dim, height, width = dense.shape
    dense = nn.functional.normalize(dense.reshape(dim, -1), dim=0)
    best = (feat_a @ dense).argmax(dim=1)
    rows, cols = best // width, best % width
    return torch.stack([(cols + 0.5) / width, (rows + 0.5) / height], dim=-1)


def fit_depth_probe(features: list[np.ndarray], depths: list[np.ndarray], ridge: float) -> np.ndarray:
    """Ridge weights w with (f - mean_image f) . w ~ log d - mean_image log d; returned with the column scale."""
    x = np.concatenate([f - f.mean(0) for f in features])
    y = np.concatenate([np.log(d) - np.log(d).mean() for d in depths])
    scale = x.std(0) + 1e-8
    x = x / scale
    gram = x.T @ x
    lam = ridge * np.trace(gram) / gram.shape[0]
    weights = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), x.T @ y)
    return weights / scale


def order_accuracy(scores: list[np.ndarray], depths: list[np.ndarray], scales: list[float],
                   min_gap: float) -> tuple[float, int]:
    """Fraction of point pairs (i < j, same image, |d_i - d_j| / scale > min_gap) ordered like the depths."""
    right, total = 0, 0
    for score, depth, scale in zip(scores, depths, scales):
        gap = (depth[None, :] - depth[:, None]) / scale
        pred = score[None, :] - score[:, None] if score.ndim == 1 else score
        keep = np.triu(np.abs(gap) > min_gap, k=1)
        right += int((np.sign(pred[keep]) == np.sign(gap[keep])).sum())
        total += int(keep.sum())
    return (right / total if total else float("nan")), total


def draw_matches(image_a: np.ndarray, image_b: np.ndarray, xy_a: np.ndarray, xy_b: np.ndarray,
                 correct: np.ndarray):
    """A PIL image: A beside B (same height), a line per match, green when `correct`, red otherwise."""
    from PIL import Image, ImageDraw

    # Small images (tiny test data) are scaled up so the lines stay readable.
    height = max(image_a.shape[0], image_b.shape[0], 240)
    sizes = [(round(im.shape[1] * height / im.shape[0]), height) for im in (image_a, image_b)]
    canvas = Image.new("RGB", (sizes[0][0] + sizes[1][0], height))
    canvas.paste(Image.fromarray(image_a).resize(sizes[0]), (0, 0))
    canvas.paste(Image.fromarray(image_b).resize(sizes[1]), (sizes[0][0], 0))
    pen = ImageDraw.Draw(canvas)
    radius = max(1, height // 100)
    for (ua, va), (ub, vb), ok in zip(xy_a, xy_b, correct):
        colour = (40, 220, 60) if ok else (230, 40, 40)
        start = (ua * sizes[0][0], va * height)
        end = (sizes[0][0] + ub * sizes[1][0], vb * height)
        pen.line([start, end], fill=colour, width=1)
        for x, y in (start, end):
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour)
    return canvas


def _save_png(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _choose(index: PairIndex, max_pairs: int) -> tuple[np.ndarray, dict[int, int]]:
    """Eligible index positions (evenly spread when there are more than max_pairs) and their block ids."""
    block_of = {int(p): b for b, rows in enumerate(index.block_rows) for p in rows}
    positions = np.array(sorted(block_of), dtype=np.int64)
    if len(positions) > max_pairs:
        positions = positions[np.unique(np.linspace(0, len(positions) - 1, max_pairs).round().astype(int))]
    return positions, block_of


@torch.no_grad()
def evaluate_model(model: DistillModel, source: PairSource, index: PairIndex, cfg: EvalConfig, *,
                   distilled: bool = False, device: torch.device | str = "cpu") -> dict:
    """Metrics of `model` on the eligible pairs of `index` (see the module docstring)."""
    from tqdm import tqdm

    positions, block_of = _choose(index, cfg.max_pairs)
    if len(positions) < 2:
        raise ConfigError(f"{cfg.shards}: {len(positions)} evaluable pair(s); the depth probe needs at least 2")
    cache: dict[int, dict] = {}
    errors, views, drawings, cosines = [], [], [], []
    layer = fed_layer(model.student) if distilled else None
    for first in tqdm(range(0, len(positions), cfg.batch_size), disable=not cfg.progress, desc="eval",
                      unit="batch"):
        chunk = positions[first:first + cfg.batch_size].tolist()
        rows, raw_a, raw_b = [], [], []
        for position in chunk:
            block = block_of[position]
            if block not in cache:
                cache.clear()  # pairs come in index order: one block at a time
                cache[block] = source.read_block(index.blocks[block])
            offset = int(index.row[position]) - index.blocks[block][1]
            rows.append({k: v[offset] for k, v in cache[block].items()})
            raw_a.append(source.image(index.image_a[position], index.sha_a[position]))
            raw_b.append(source.image(index.image_b[position], index.sha_b[position]))
        pixels = torch.from_numpy(np.stack([source.preprocessing(im) for im in raw_a + raw_b])).to(device)
        feats = model.features(pixels, match=True, depth=True, cost=False, preserve=layer)
        if layer is not None:
            cosines.append(image_cosines(feats["preserve"], model.base_grid(pixels, layer)))
        match = feats["match"].float()  # sampled (A) or upsampled (B) first, then normalised, as in training
        depth = feats["depth"].float()
        for i, (row, position) in enumerate(zip(rows, chunk)):
            count = int(row["match_count"])
            if count == 0:
                continue
            pick = subsample_matches(count, cfg.max_matches, np.random.default_rng([cfg.seed, position]))
            xy_a = torch.from_numpy(row["match_xy_a"][pick]).to(device)
            xy_b = row["match_xy_b"][pick].astype(np.float64)
            fa = nn.functional.normalize(sample_grid(match[i:i + 1], xy_a[None])[0], dim=-1)
            pred = _predict_matches(match[len(chunk) + i], fa, cfg.upsample).cpu().numpy().astype(np.float64)
            height, width = raw_b[i].shape[:2]
            err = np.hypot((pred[:, 0] - xy_b[:, 0]) * width, (pred[:, 1] - xy_b[:, 1]) * height) / max(height, width)
            errors.append(err)
            scale = scene_scale(row["match_depth_a"][:count])
            for side, grid, xy in (("a", depth[i], xy_a), ("b", depth[len(chunk) + i],
                                                           torch.from_numpy(row["match_xy_b"][pick]).to(device))):
                d = row[f"match_depth_{side}"][pick].astype(np.float64)
                ok = d > 0
                if ok.sum() >= 2:
                    f = sample_grid(grid[None], xy[None])[0][torch.from_numpy(ok).to(device)]
                    views.append({"pair": len(errors) - 1, "features": f.cpu().numpy().astype(np.float64),
                                  "torch": f, "depth": d[ok], "scale": scale})
            if cfg.draw is not None and len(drawings) < cfg.draw_pairs:
                shown = slice(0, cfg.draw_matches)
                drawings.append(draw_matches(raw_a[i], raw_b[i], row["match_xy_a"][pick][shown], pred[shown],
                                             err[shown] <= max(cfg.thresholds)))
    if not errors:
        raise ConfigError(f"{cfg.shards}: none of the chosen pairs has matches")
    all_errors = np.concatenate(errors)
    metrics = {"pairs": len(errors), "matches": int(all_errors.size),
               "median_error": float(np.median(all_errors))}
    for t in cfg.thresholds:
        metrics[f"pck@{t:.2f}"] = float((all_errors <= t).mean())

    fit = [v for v in views if v["pair"] % 2 == 0]
    test = [v for v in views if v["pair"] % 2 == 1]
    metrics["depth_order_acc"], metrics["depth_order_pairs"] = float("nan"), 0
    if fit and test:
        weights = fit_depth_probe([v["features"] for v in fit], [v["depth"] for v in fit], cfg.probe_ridge)
        acc, total = order_accuracy([v["features"] @ weights for v in test], [v["depth"] for v in test],
                                    [v["scale"] for v in test], cfg.depth_min_gap)
        metrics["depth_order_acc"], metrics["depth_order_pairs"] = acc, total
        if distilled:
            head = model.depth_head
            scores = [head(v["torch"][None, :, :] - v["torch"][:, None, :]).float().cpu().numpy() for v in test]
            metrics["depth_order_head_acc"] = order_accuracy(scores, [v["depth"] for v in test],
                                                             [v["scale"] for v in test], cfg.depth_min_gap)[0]
    if cosines:
        per_image = np.concatenate(cosines)
        metrics["feature_cosine_mean"] = float(per_image.mean())
        metrics["feature_cosine_min"] = float(per_image.min())
        metrics["feature_cosine_layer"] = layer
    if drawings:
        from PIL import Image

        width = max(d.width for d in drawings)
        sheet = Image.new("RGB", (width, sum(d.height for d in drawings)))
        y = 0
        for drawing in drawings:
            sheet.paste(drawing, (0, y))
            y += drawing.height
        _save_png(sheet, cfg.draw)
        metrics["drawing"] = str(cfg.draw)
    return metrics


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate the student named by cfg.student on cfg.shards; writes cfg.out (JSON) and cfg.draw (PNG)."""
    import json

    from geod.stage2_distill.train import resolve_device

    device = resolve_device(cfg.device)
    model, distilled = load_eval_model(cfg.student, image_size=cfg.image_size, checkpoint=cfg.checkpoint,
                                       device=device)
    source = PairSource(cfg.shards, cfg.storage_options, cfg.image_root, model.student.preprocessing)
    index = PairIndex.from_dataset(source.dataset(), cfg.split, cfg.shards)
    metrics = evaluate_model(model, source, index, cfg, distilled=distilled, device=device)
    result = {"student": cfg.student, "checkpoint": cfg.checkpoint, "distilled": distilled, "split": cfg.split,
              "image_size": list(model.student.image_size), "dataset": cfg.shards,
              **metrics}
    if cfg.out is not None:
        tmp = cfg.out.with_name(f".tmp-{cfg.out.name}-{os.getpid()}")
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, cfg.out)
    return result
