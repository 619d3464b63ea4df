"""Throughput of a geod distillation step beside the same student's plain forward + backward.

    python benchmarks/bench_distill_step.py                       # every student, on CUDA
    python benchmarks/bench_distill_step.py --students clip-b16 --batch 32
    python benchmarks/bench_distill_step.py --smoke               # tiny students, any device (a check)

Students are built at their real size with random weights from transformers (or timm) configs, through
geod's own tiny-student path with size overrides, so nothing is downloaded:
- clip-b16: CLIP ViT-B/16 at 224 (a bare tower; the method's backbone family);
- llava-l14-336: CLIP ViT-L/14-336 inside a LLaVA-1.5 with a one-layer toy language model (LLaVA feeds
  block 22 of 24, so geod runs 23 blocks);
- siglip-so400m: SigLIP so400m-patch14-384 (the PaliGemma / LLaVA-OneVision tower), bare, fed 378x378
  (27x27 patches, what its own patch embedding keeps of a 384 image; geod needs a multiple of the patch);
- qwen2_5_vl: Qwen2.5-VL's vision tower (depth 32, width 1280, window 112 px, full attention in blocks
  7/15/23/31) inside a toy Qwen2.5-VL, at 448x448;
- timm-b16-384: timm vit_base_patch16_clip_384 (skipped when timm does not import).

Per student, with bf16 autocast on CUDA as geod trains, B pairs = 2B images per step:
(a) plain: the student with geod's LoRA (same target modules and layers) but no bottleneck adapters or
    heads, forward + backward of mean(square(fed-layer features)) on 2B images already on the GPU; with
    `--graphs on` (the default) also the same pass captured as one CUDA graph and replayed ("plain graph");
(b) geod compute: the step as `geod distill` runs it (DistillModel forward with all four losses, heads,
    backward, grad clip, AdamW step) on one real batch already on the GPU, repeated; set up as `geod distill`
    does on CUDA: fused AdamW with the non-finite guard on the GPU, each step's outcome read run.steps_in_flight
    steps after it is queued, cuDNN autotuning (`--cudnn-benchmark`), the sections after the encoder and the
    adapters compiled (`--compile off`: eager) on batches padded to data.max_matches, the losses of the middle
    blocks on a second stream (`run.overlap_losses`), and the whole step captured as a CUDA graph after two
    eager steps where the student allows it (`graphed_step.GraphedStep`; `--graphs off`: eager
    `step.launch_step`). Also timed with the outcome read at once (one wait for the GPU per step);
(c) geod step: the same, fed by geod's PairStream / DataLoader (pinned memory, workers) from a synthetic
    target dataset on local disk (640x480 JPEGs; targets from bench_format.synthetic_pair through the
    shard writer), as `geod distill` feeds it (workers send uint8 pixels, normalised on the GPU, each batch
    packed in two buffers); `--fed` adds variants (separate tensors per array, outcome read every step);
(d) data alone: the DataLoader's rate with nothing on the GPU (at --workers and at --workers-max).
The overhead reported is (c) / (a) - 1 and (b) / (a) - 1 in time per step, against the eager plain pass
and, with graphs, against the graphed one. A breakdown of (b) with CUDA
events (encoder blocks with adapters; norms, layer means, heads and losses; backward; clip + optimizer)
shows where the geod-only time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path
from unittest import mock

import numpy as np

HERE = Path(__file__).resolve().parent

# name -> (registry name, size overrides, image size, TinySpec field changes, default pairs per step)
STUDENTS = {
    "clip-b16": ("tiny-clip", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                               "intermediate_size": 3072, "patch_size": 16, "image_size": 224}, (224, 224), {}, 16),
    "llava-l14-336": ("tiny-llava", {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                     "intermediate_size": 4096, "patch_size": 14, "image_size": 336},
                      (336, 336), {}, 16),
    "siglip-so400m": ("tiny-siglip", {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                                      "intermediate_size": 4304, "patch_size": 14, "image_size": 384},
                      (378, 378), {}, 16),
    "qwen2_5_vl": ("tiny-qwen2_5_vl", {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                       "intermediate_size": 3420, "patch_size": 14}, (448, 448),
                   {"vision_extra": {"out_hidden_size": 32, "spatial_merge_size": 2, "window_size": 112,
                                     "fullatt_block_indexes": [7, 15, 23, 31], "temporal_patch_size": 2}}, 8),
    "timm-b16-384": ("tiny-timm", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                   "patch_size": 16, "image_size": 384}, (384, 384), {}, 16),
}
SMOKE_SIZE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


# ---------------------------------------------------------------------------------------------------------
# synthetic target dataset with real images on disk


def _image(seed: int, height: int, width: int) -> bytes:
    """A JPEG (quality 90) of smooth colour noise plus grain, about the size of a photo's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.integers(-24, 25, (height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_image(job: tuple[Path, int, int, int]) -> str:
    from geod.pipeline.hashing import sha256_bytes

    path, seed, height, width = job
    data = _image(seed, height, width)
    path.write_bytes(data)
    return sha256_bytes(data)


def _targets(seed: int) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_format import synthetic_pair
    from geod.pipeline.card import DatasetLayout

    return synthetic_pair(np.random.default_rng(seed), DatasetLayout())


def build_dataset(root: Path, pairs: int, height: int, width: int) -> Path:
    """root/targets (default layout) over root/images; reused when already complete."""
    from geod.pipeline.card import DatasetLayout
    from geod.pipeline.shard_io import write_dataset

    out = root / "targets"
    stamp = root / f"built-{pairs}-{height}x{width}.json"
    if stamp.is_file() and (out / "card.json").is_file():
        return out
    if out.exists():  # a dataset of another size, or an interrupted build: rebuilt from scratch
        shutil.rmtree(out)
    for old in root.glob("built-*.json"):
        old.unlink()
    layout = DatasetLayout()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(images / f"{i:05d}_{v}.jpg", 2 * i + (v == "b"), height, width) for i in range(pairs) for v in "ab"]
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        shas = pool.map(_write_image, jobs, chunksize=8)
        arrays = pool.map(_targets, range(pairs), chunksize=8)
    rows = [{"pair_id": f"p{i:05d}", "scene_id": f"s{i // 16}", "split": "train",
             "image_a": f"images/{i:05d}_a.jpg", "image_b": f"images/{i:05d}_b.jpg",
             "image_a_sha256": shas[2 * i], "image_b_sha256": shas[2 * i + 1], "status": "ok", "reason": None}
            for i in range(pairs)]
    write_dataset(out, arrays, rows, layout, teacher={"name": "bench", "scene_units": "metres"},
                  source={"manifest": None, "manifest_sha256": None, "base_dir": str(root)})
    stamp.write_text("{}")
    return out


# ---------------------------------------------------------------------------------------------------------
# one student


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _build(name: str, args, device, batch: int):
    """(DistillModel, resolved DistillConfig) for a benchmark student, built on `device`."""
    import torch
    from geod.stage2_distill import tiny_students
    from geod.stage2_distill.config import (
        DataConfig,
        DistillConfig,
        OptimConfig,
        RunConfig,
        StudentConfig,
        apply_overrides,
    )
    from geod.stage2_distill.model import DistillModel
    from geod.stage2_distill.students import create_student

    registry, overrides, image_size, spec_changes, _ = STUDENTS[name]
    if args.smoke:
        qwen = registry == "tiny-qwen2_5_vl"
        overrides = {**overrides, **SMOKE_SIZE, "patch_size": 14 if qwen else 8}
        image_size = (56, 56) if qwen else (64, 64)
        if "image_size" in overrides:
            overrides["image_size"] = 64
    if registry == "tiny-timm":
        overrides = {k: v for k, v in overrides.items() if k != "intermediate_size"}
    cfg = DistillConfig(
        data=DataConfig(shards=str(args.dataset), batch_size=batch, workers=args.workers,
                        shuffle_blocks=2),
        run=RunConfig(out=Path(tempfile.gettempdir()) / "geod-bench-run", progress=False,
                      cuda_graphs=args.graphs == "on", tf32=args.tf32 == "on", compile=args.compile == "on",
                      cudnn_benchmark=args.cudnn_benchmark == "on"),
        student=StudentConfig(name_or_path=registry, image_size=image_size, tiny_overrides=overrides),
        optim=OptimConfig(warmup_steps=10, max_steps=1000))
    if args.set:  # e.g. student.adapter_dim=0 to time the step without a part
        cfg = DistillConfig.from_dict(apply_overrides(cfg.to_dict(), args.set))
    # Size overrides cover width, depth and patch; settings they do not reach (Qwen's window and full-attention
    # blocks) are changed in a patched copy of the tiny registry, for this process only.
    specs = dict(tiny_students.TINY)
    if spec_changes:
        specs[registry] = dataclasses.replace(specs[registry], **spec_changes)
    torch.manual_seed(0)
    # Random initialisation straight on the GPU: real-size towers take minutes to initialise on a CPU.
    with mock.patch.dict(tiny_students.TINY, specs), torch.device(device):
        student = create_student(cfg.student)
        resolved = dataclasses.replace(cfg, student=cfg.student.resolved(student.num_layers, student.image_size,
                                                                         is_vlm=student.is_vlm))
        model = DistillModel(student, resolved.student).to(device)
    model.train()
    return model, resolved


def _time_loop(fn, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _graphed_plain(student, pixels, params, use_bf16: bool, device, *, adapters_on: bool = False):
    """The plain forward + backward captured as a CUDA graph (after three eager passes on the capture stream);
    returns a function that replays it. `adapters_on`: with the bottleneck adapters (else LoRA only)."""
    import torch
    from torch import nn

    adapters = student.block_adapters
    side = torch.cuda.Stream(device)

    def body() -> None:
        student.block_adapters = adapters if adapters_on else nn.ModuleDict()
        try:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16, cache_enabled=False):
                loss = student(pixels)[-1].float().square().mean()
            loss.backward()
        finally:
            student.block_adapters = adapters

    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        body()
    return graph.replay


def _epochs(stream, device):
    """Batches across epochs, a new DataLoader per epoch, as `geod distill` reads them."""
    from geod.stage2_distill.data import make_loader

    epoch = 0
    while True:
        stream.set_position(epoch, 0)
        yield from make_loader(stream, pin_memory=device.type == "cuda")
        epoch += 1


def bench_student(label: str, args, device) -> dict:
    import torch
    from geod.stage2_distill import step, train
    from geod.stage2_distill.data import PairStream, defers_resize, make_loader
    from geod.stage2_distill.graphed_step import GraphedStep, graph_step_possible
    from torch import nn

    name, _, batch_text = label.partition("@")
    started = time.perf_counter()
    model, cfg = _build(name, args, device, int(batch_text or args.batch or STUDENTS[name][4]))
    student = model.student
    pairs = cfg.data.batch_size
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    optimizer = step.make_optimizer(params, cfg.optim, device)
    use_bf16 = device.type == "cuda"
    # As `geod distill` sets it up on CUDA: compiled sections fed batches padded to data.max_matches, and
    # uint8 pixels from the workers normalised (and, with run.device_resize, resized) on the GPU.
    compiled = train.prepare_for_device(model, cfg, device, world=1)
    raw = device.type == "cuda"
    defer = defers_resize(cfg.run.device_resize, student.preprocessing, device)
    height, width = student.image_size
    result = {"student": label, "pairs_per_step": pairs, "images_per_step": 2 * pairs, "image_size": [height, width],
              "encoder_blocks_run": student.num_layers, "tower_blocks": student.tower_layers,
              "lora_layers": list(cfg.student.lora_layers), "adapter_dim": cfg.student.adapter_dim,
              "trainable_params": sum(p.numel() for p in params),
              "tower_params": sum(p.numel() for p in student.base_model().parameters()),
              "compiled_losses": compiled, "fused_adamw": bool(optimizer.defaults.get("fused")),
              "uint8_pixels": raw, "overlapped_losses": model.overlaps_losses, "loader_workers": cfg.data.workers,
              "reduced_decode": cfg.data.reduced_decode, "device_resize": defer}
    print(f"[{label}] built in {time.perf_counter() - started:.1f}s: {result}", flush=True)

    # (a) plain: LoRA only (the bottleneck adapters are bypassed), trivial loss on the fed layer; also with the
    # adapters, the student architecture the step trains, to separate their cost from that of the losses,
    # heads and data.
    pixels = torch.randn(2 * pairs, 3, height, width, device=device)
    adapters = student.block_adapters
    plain_adapters = [False]

    def plain() -> None:
        student.block_adapters = adapters if plain_adapters[0] else nn.ModuleDict()
        try:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                grids = student(pixels)
                loss = grids[-1].float().square().mean()
            loss.backward()
        finally:
            student.block_adapters = adapters
        for p in params:
            p.grad = None

    _peak_reset(device)
    result["plain_ms"] = 1e3 * _time_loop(plain, args.warmup, args.steps, device)
    result["plain_peak_gib"] = _peak_gib(device)
    if adapters:
        plain_adapters[0] = True
        result["plain_adapters_ms"] = 1e3 * _time_loop(plain, args.warmup, args.steps, device)
        plain_adapters[0] = False
    if device.type == "cuda" and args.graphs == "on" and student.kind.graph_safe:
        # The same plain pass captured as one CUDA graph: the baseline without the host's launch cost.
        result["plain_graph_ms"] = 1e3 * _time_loop(_graphed_plain(student, pixels, params, use_bf16, device),
                                                    args.warmup, args.steps, device)
        if adapters:
            replay = _graphed_plain(student, pixels, params, use_bf16, device, adapters_on=True)
            result["plain_adapters_graph_ms"] = 1e3 * _time_loop(replay, args.warmup, args.steps, device)

    # One real batch from geod's loader, kept on the GPU for (b).
    stream = PairStream(cfg.data, student.preprocessing, raw_pixels=raw, pad_matches=True, pack=raw,
                        defer_resize=defer)
    stream.set_position(0, 0)
    first = iter(make_loader(stream, pin_memory=device.type == "cuda"))
    batch = step.BatchMover(device, student.preprocessing, compile=compiled)(next(first))
    del first  # shuts its workers down before anything is timed
    step_no = [0]
    in_flight = step.InFlight(cfg.run.steps_in_flight)  # queued steps whose outcomes are read later
    # As `geod distill` runs steps: captured as a CUDA graph where possible (after two eager steps), else eager.
    graphs, result["step_mode"] = graph_step_possible(cfg, device, 1, model, optimizer)
    runner = GraphedStep(model, optimizer, params, cfg, stream.cv_grid, device) if graphs else None

    def check(outcome) -> dict:
        values, _, applied = outcome.result()
        if not applied:
            raise RuntimeError(f"{name}: a step was skipped as non-finite: {values}")
        return values

    def geod_step(b, deferred: bool = True) -> None:
        """A step as `geod distill` runs it: its outcome is read run.steps_in_flight steps later (deferred), or
        (deferred=False) read at once, one wait for the GPU per step."""
        lr = train.learning_rate(step_no[0], cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if runner is not None:
            outcome = runner(b)
        else:
            outcome = step.launch_step(model, b, optimizer, params, cfg, stream.cv_grid, device, 1)
        step_no[0] += 1
        due = in_flight.add(step_no[0], outcome)
        if not deferred:
            due += in_flight.drain()
        for _, done in due:
            check(done)

    def flush() -> dict:
        values = {}
        for _, done in in_flight.drain():
            values = check(done)
        return values

    _peak_reset(device)
    t0 = time.perf_counter()
    geod_step(batch)  # the compiled sections are compiled here
    flush()
    _sync(device)
    result["first_step_s"] = time.perf_counter() - t0
    result["geod_compute_ms"] = 1e3 * _time_loop(lambda: geod_step(batch), args.warmup, args.steps, device)
    flush()
    result["geod_compute_sync_ms"] = 1e3 * _time_loop(lambda: geod_step(batch, deferred=False), args.warmup,
                                                      args.steps, device)
    result["geod_peak_gib"] = _peak_gib(device)
    geod_step(batch)
    result["losses"] = flush()
    result["breakdown_ms"] = _breakdown(model, batch, optimizer, params, cfg, stream.cv_grid, device, use_bf16)
    if label in args.profile.split(","):
        plain_adapters[0] = bool(adapters)  # the student the step trains
        _profile(label, plain, lambda: (geod_step(batch), flush()), device)
        plain_adapters[0] = False

    # (c) the step as `geod distill` runs it: batches from the DataLoader (new loader, batch 0 of epoch 0);
    # FED variants: packed (two buffers per batch) or separate tensors, outcome deferred or read every step.
    fed_variants = [] if args.fed == "none" else args.fed.split(",")
    # A variant named again (to interleave repeats) is recorded as NAME#2, NAME#3, ...
    fed_variants = [v if fed_variants[:i].count(v) == 0 else f"{v}#{fed_variants[:i].count(v) + 1}"
                    for i, v in enumerate(fed_variants)]
    # A new loader's workers fill a buffer of two batches each before and while the first steps run; timing
    # only a few steps after it reads that buffer and hides a loader slower than the step. So the warm-up
    # takes at least three batches per worker and the timed steps at least four.
    fed_warmup, fed_steps = max(args.warmup, 3 * cfg.data.workers), max(args.steps, 4 * cfg.data.workers)
    if fed_variants:
        result["fed_warmup_steps"], result["fed_timed_steps"] = fed_warmup, fed_steps
    for variant in fed_variants:
        transport, readout, *copies = variant.partition("#")[0].split("-")
        fed_stream = PairStream(cfg.data, student.preprocessing, raw_pixels=raw, pad_matches=compiled or graphs,
                                pack=raw and transport == "packed", defer_resize=defer)
        mover = step.BatchMover(device, student.preprocessing, side_stream=copies != ["inline"],
                                compile=compiled)
        batches = _epochs(fed_stream, device)
        waits = []

        def fed_step(mover=mover, batches=batches, waits=waits, deferred=readout == "deferred") -> None:
            t0 = time.perf_counter()
            b = mover(next(batches))
            waits.append(time.perf_counter() - t0)
            geod_step(b, deferred=deferred)

        result[f"geod_step_ms_{variant}"] = 1e3 * _time_loop(fed_step, fed_warmup, fed_steps, device)
        flush()
        timed_waits = 1e3 * np.asarray(waits[fed_warmup:])
        result[f"data_wait_ms_{variant}"] = float(timed_waits.mean())
        # The tail matters more than the mean: the GPU idles only when a wait outlasts the steps queued on it.
        result[f"data_wait_p90_ms_{variant}"] = float(np.percentile(timed_waits, 90))
        result[f"data_wait_max_ms_{variant}"] = float(timed_waits.max())
        batches.close()  # shuts the DataLoader workers down
    # Without a fed variant (--fed none) the step figures are the compute step's.
    main_variant = fed_variants[0] if fed_variants else None
    result["geod_step_ms"] = result.get(f"geod_step_ms_{main_variant}", result["geod_compute_ms"])
    result["data_wait_ms"] = result.get(f"data_wait_ms_{main_variant}", 0.0)
    result["overhead_compute_pct"] = 100 * (result["geod_compute_ms"] / result["plain_ms"] - 1)
    result["overhead_step_pct"] = 100 * (result["geod_step_ms"] / result["plain_ms"] - 1)
    if "plain_graph_ms" in result:
        graphed_plain = result["plain_graph_ms"]
        result["overhead_compute_vs_graphed_plain_pct"] = 100 * (result["geod_compute_ms"] / graphed_plain - 1)
        result["overhead_step_vs_graphed_plain_pct"] = 100 * (result["geod_step_ms"] / graphed_plain - 1)
    with_adapters = result.get("plain_adapters_graph_ms", result.get("plain_adapters_ms"))
    if with_adapters:
        result["overhead_compute_vs_plain_adapters_pct"] = 100 * (result["geod_compute_ms"] / with_adapters - 1)
        result["overhead_step_vs_plain_adapters_pct"] = 100 * (result["geod_step_ms"] / with_adapters - 1)
    if runner is not None:
        result["graph_replays"], result["graph_failure"] = runner.replays, runner.failure
    result["pairs_per_s_plain"] = 1e3 * pairs / result["plain_ms"]
    result["pairs_per_s_step"] = 1e3 * pairs / result["geod_step_ms"]

    # (d) the data alone, nothing on the GPU: one process's cost per image and per batch, then DataLoaders.
    if not args.skip_data:
        result.update(_data_alone(cfg, student.preprocessing, args, device))
    result["seconds"] = time.perf_counter() - started
    print(f"[{label}] {json.dumps(result)}", flush=True)
    return result


def _data_alone(cfg, preprocessing, args, device) -> dict:
    from geod.stage2_distill.data import PairStream, defers_resize, make_loader
    from PIL import Image

    out = {}
    raw = device.type == "cuda"  # what the workers send on CUDA: uint8 pixels
    defer = defers_resize(cfg.run.device_resize, preprocessing, device)
    stream = PairStream(cfg.data, preprocessing, raw_pixels=raw, defer_resize=defer)
    index, source = stream.index, stream.source
    # Per image: a full decode and resize; the worker's path with the resize (`PairSource.pixels`: read,
    # verify, decode at a reduced scale where data.reduced_decode allows, resize; uint8 on CUDA, normalised on
    # the CPU); and without it (what a deferred resize leaves to the workers).
    parts = {"full_decode_resize": [], "worker_pixels": [], "worker_decode_only": []}
    height, width = preprocessing.image_size
    for position in np.flatnonzero(index.eligible)[:8].tolist():
        ref, sha = index.image_a[position], index.sha_a[position]
        t0 = time.perf_counter()
        image = source.image(ref, sha)
        np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling(preprocessing.resample)))
        t1 = time.perf_counter()
        source.pixels(ref, sha, raw=raw)
        t2 = time.perf_counter()
        np.ascontiguousarray(np.asarray(source.decoded(ref, sha)).transpose(2, 0, 1))
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key].append(1e3 * value)
    out["data_ms_per_image"] = {k: float(np.median(v)) for k, v in parts.items()}
    it = iter(stream)  # in this process: stream 0's batches (at least two)
    next(it)
    start = time.perf_counter()
    timed = 0
    for _ in range(3):
        if next(it, None) is None:
            break
        timed += 1
    out["data_ms_per_batch_one_process"] = 1e3 * (time.perf_counter() - start) / max(timed, 1)
    del it
    for workers in sorted({args.workers, args.workers_max}):
        alone = PairStream(dataclasses.replace(cfg.data, workers=workers), preprocessing, raw_pixels=raw,
                           defer_resize=defer)
        alone.set_position(0, 0)
        count = alone.batches_per_epoch(0)
        loader = iter(make_loader(alone, pin_memory=device.type == "cuda"))
        # Timed from the second round of batches on: the first round was made while the workers started.
        for _ in range(workers):
            next(loader)
        start = time.perf_counter()
        for _ in range(count - workers):
            next(loader)
        out[f"data_pairs_per_s_w{workers}"] = cfg.data.batch_size * (count - workers) / (time.perf_counter() - start)
        del loader
    return out


def _profile(label: str, plain, step, device, *, rows: int = 30) -> None:
    """torch.profiler over two plain passes (with the adapters where the student has them) and two geod
    steps: device events per step, each pass's top kernels, then the kernels the geod step spends more time
    in than the plain pass (by full kernel name, ms per step), which is where its extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    per_kernel = {}
    for what, fn in (("plain", plain), ("geod", step)):
        fn()
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(2):
                fn()
            _sync(device)
        events = prof.key_averages()
        device_events = [e for e in events if getattr(e, "device_type", None) is not None
                         and "CUDA" in str(e.device_type)]
        kernels = sum(e.count for e in device_events)
        print(f"[{label}] profile {what}: {kernels / 2:.0f} device events per step", flush=True)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60), flush=True)
        per_kernel[what] = {e.key: (e.self_device_time_total / 2e3, e.count / 2) for e in device_events}
    plain_k, geod_k = per_kernel["plain"], per_kernel["geod"]
    names = set(plain_k) | set(geod_k)
    gaps = sorted(((geod_k.get(n, (0, 0))[0] - plain_k.get(n, (0, 0))[0], n) for n in names), reverse=True)
    total = sum(v[0] for v in geod_k.values()) - sum(v[0] for v in plain_k.values())
    print(f"[{label}] profile geod - plain: {total:+.3f} ms of device time per step; largest differences:")
    shown = gaps if len(gaps) <= rows + 8 else gaps[:rows] + gaps[-8:]  # the largest, then the most negative
    for gap, name in shown:
        print(f"  {gap:+.3f} ms  x{geod_k.get(name, (0, 0))[1]:.0f}/{plain_k.get(name, (0, 0))[1]:.0f}  {name[:150]}")


def _breakdown(model, batch, optimizer, params, cfg, cv_grid, device, use_bf16, repeats: int = 3) -> dict:
    """GPU time of the parts of one step (CUDA events; CPU clock elsewhere), median of `repeats`."""
    import torch

    names = ("encoder", "losses", "backward", "clip_opt")
    samples = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for _ in range(repeats):
        _sync(device)
        marks, clock = [], []

        def mark() -> None:
            clock.append(time.perf_counter())
            if device.type == "cuda":
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append(event)

        optimizer.zero_grad(set_to_none=True)
        mark()
        loss_cfg = cfg.loss
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            blocks = model.student.run_blocks(torch.cat([batch["pixel_a"], batch["pixel_b"]]))
            mark()
            parts = model.losses_of(blocks, None, batch, loss_cfg, cv_grid)
        mark()
        parts["total"].backward()
        mark()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark()
        _sync(device)
        for i, n in enumerate(names):
            cpu[n].append(1e3 * (clock[i + 1] - clock[i]))
            if marks:
                samples[n].append(marks[i].elapsed_time(marks[i + 1]))
    out = {f"gpu_{n}": float(np.median(v)) for n, v in samples.items() if v}
    out.update({f"cpu_{n}": float(np.median(v)) for n, v in cpu.items()})
    return out


# ---------------------------------------------------------------------------------------------------------


def _table(results: list[dict]) -> str:
    lines = ["| student | pairs/step | steps | plain ms (graph) | geod compute ms (+% vs plain, vs graph) "
             "| geod step ms (+%, vs graph) | pairs/s step | data wait ms | data alone pairs/s (w) "
             "| ms/image full decode + resize, worker path, decode only | peak GiB plain / geod |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['student']} | error: {r['error']} ||||||||| ")
            continue
        data = ", ".join(f"{v:.0f} (w{k.rsplit('w', 1)[1]})" for k, v in r.items() if k.startswith("data_pairs"))
        per_image = ", ".join(f"{v:.1f}" for v in r.get("data_ms_per_image", {}).values()) or "-"
        graph = "plain_graph_ms" in r
        plain = f"{r['plain_ms']:.1f}" + (f" ({r['plain_graph_ms']:.1f})" if graph else "")
        if "overhead_compute_vs_plain_adapters_pct" in r:
            plain += (f"; with adapters {r.get('plain_adapters_graph_ms', r['plain_adapters_ms']):.1f}: geod "
                      f"{r['overhead_compute_vs_plain_adapters_pct']:+.1f}% compute, "
                      f"{r['overhead_step_vs_plain_adapters_pct']:+.1f}% step")
        vs_graph = (lambda key: f", {r[key]:+.1f}%" if graph else "")
        mode = "graph" if r.get("graph_replays") else "eager"
        lines.append(f"| {r['student']} {r['image_size'][0]}px | {r['pairs_per_step']} | {mode} | {plain} | "
                     f"{r['geod_compute_ms']:.1f} ({r['overhead_compute_pct']:+.1f}%"
                     f"{vs_graph('overhead_compute_vs_graphed_plain_pct')}) | {r['geod_step_ms']:.1f} "
                     f"({r['overhead_step_pct']:+.1f}%{vs_graph('overhead_step_vs_graphed_plain_pct')}) | "
                     f"{r['pairs_per_s_step']:.0f} | {r['data_wait_ms']:.1f} | {data} | {per_image} | "
                     f"{r['plain_peak_gib']:.1f} / {r['geod_peak_gib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default=",".join(STUDENTS), help="comma-separated, from: " + ", ".join(STUDENTS)
                        + "; NAME@N runs NAME at N pairs per step")
    parser.add_argument("--batch", type=int, default=0, help="pairs per step (0 = each student's default)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: what geod distill chooses, data.workers unset)")
    parser.add_argument("--workers-max", type=int, default=0, help="also time the loader alone with this many")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=1024, help="pairs in the synthetic dataset")
    parser.add_argument("--image", default="480x640", help="HxW of the JPEGs on disk")
    parser.add_argument("--data-dir", default=None, help="where to build (or reuse) the dataset")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--profile", default="", help="students to run torch.profiler on (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and sizes, to check the script")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=("on", "off"), default="on",
                        help="torch.compile the sections after the encoder and the adapters on CUDA "
                             "(geod distill's run.compile)")
    parser.add_argument("--graphs", choices=("on", "off"), default="on",
                        help="capture the step as a CUDA graph where geod distill would (run.cuda_graphs); also times "
                             "the plain pass captured the same way")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the distillation config of every student (repeatable), e.g. "
                             "student.adapter_dim=0 or loss.w_kl=0, to time the step without a part")
    parser.add_argument("--inductor-options", default=None, metavar="JSON",
                        help="inductor options of the compiled section and adapters instead of geod's "
                             "(model.INDUCTOR_OPTIONS), e.g. '{}' for torch's defaults")
    parser.add_argument("--tf32", choices=("on", "off"), default="on",
                        help="float32 products in TF32 on CUDA (geod distill's run.tf32)")
    parser.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                        help="cuDNN autotunes its convolutions on CUDA (geod distill's run.cudnn_benchmark)")
    parser.add_argument("--skip-data", action="store_true", help="leave out (d), the loader timed alone")
    parser.add_argument("--fed", default="packed-deferred,separate-sync",
                        help="variants of (c), comma-separated TRANSPORT-READOUT, the first reported as the step: "
                             "TRANSPORT packed (two buffers per batch, as geod distill sends them on CUDA) or "
                             "separate (one tensor per array); READOUT deferred (the step's outcome is read after "
                             "the next step is queued, as geod distill does) or sync (read at once); a third part "
                             "-inline copies each batch on the step's stream instead of a side stream; "
                             "none: leave (c) out")
    args = parser.parse_args()

    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.workers is None:
        from geod.stage2_distill.data import default_workers

        args.workers = default_workers()
    print(f"loader workers {args.workers}", flush=True)
    args.workers_max = args.workers_max or args.workers
    height, width = (int(v) for v in args.image.split("x"))
    root = Path(args.data_dir or Path(tempfile.gettempdir()) / "geod-bench-distill")
    start = time.perf_counter()
    args.dataset = build_dataset(root, args.pairs, height, width)
    print(f"dataset {args.dataset} ready in {time.perf_counter() - start:.1f}s", flush=True)
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    import transformers
    from geod.pipeline.precision import cudnn_autotune, tf32

    print(f"transformers {transformers.__version__}", flush=True)
    from geod.stage2_distill import model as model_module

    # A copy: patch.dict clears the dict before it fills it from these values.
    chosen = json.loads(args.inductor_options) if args.inductor_options is not None else model_module.INDUCTOR_OPTIONS
    options = dict(chosen)
    results = []
    for name in args.students.split(","):
        try:
            # TF32 and cuDNN autotuning as geod distill sets them for its loop (run.tf32, run.cudnn_benchmark); the
            # inductor options hold for this process only
            with tf32(device, args.tf32 == "on"), cudnn_autotune(device, args.cudnn_benchmark == "on"), \
                    mock.patch.dict(model_module.INDUCTOR_OPTIONS, options, clear=True):
                results.append(bench_student(name, args, device))
        except Exception as exc:  # a missing optional package or an OOM must not lose the other students
            print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            results.append({"student": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        gc.collect()  # the student's model and optimizer go before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = _table(results)
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
