"""`geod distill`: the training loop.

One step: learning rate from a pure schedule, forward under bf16 autocast on CUDA, the four losses,
backward, gradient all-reduce across ranks (torchrun), clipping, and a non-finite guard that skips the
update (and aborts after `optim.max_nonfinite` skips in a row). Checkpoints every `run.checkpoint_every`
steps restore exactly: weights, optimizer, RNG, step and data position.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from geod.pipeline.errors import ConfigError, GeodError
from geod.stage2_distill.checkpoint import (
    BASE_DIR,
    CHECKPOINTS,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_outputs,
    write_run_info,
)
from geod.stage2_distill.config import DistillConfig, OptimConfig
from geod.stage2_distill.data import PairStream, make_loader
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.students import create_student, save_base

LOSS_NAMES = ("total", "ap", "depth", "rank", "kl", "preserve")
_RUN_ENTRIES = ("config.json", "student.json", "adapter", "geod_modules.safetensors", CHECKPOINTS, "tb", BASE_DIR)


class TrainingDiverged(GeodError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass(kw_only=True)
class RunSummary:
    run_dir: Path
    steps: int  # optimizer steps done so far (skipped ones included)
    skipped_steps: int
    finished: bool  # max_steps reached and final outputs written
    last_losses: dict  # mean of each loss over the last logging window
    checkpoint: Path | None
    seconds: float


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine (or constant) down to `min_lr_ratio * lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device is {name!r} but CUDA is not available")
    return torch.device(name)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _prepare_run_dir(cfg: DistillConfig, rank: int) -> None:
    out = cfg.run.out
    existing = [name for name in _RUN_ENTRIES if (out / name).exists()]
    if rank != 0 or not existing or cfg.run.resume:
        return
    if not cfg.run.overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); pass resume or overwrite")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _student_info(cfg: DistillConfig, student, base_in_run: bool, run_dir: Path) -> dict:
    info = student.describe()
    info["image_size"] = list(cfg.student.image_size)
    info["base_in_run"] = base_in_run
    info["base_model"] = str((run_dir / BASE_DIR).resolve()) if base_in_run else student.source.get(
        "name_or_path", cfg.student.name_or_path)
    return info


def make_optimizer(params: list, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on `params`. On CUDA the fused implementation updates every tensor in one kernel launch instead
    of several per parameter (a step of a ViT-B student has about 70 trainable tensors); on CPU the default
    implementation is kept."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused)


def _to_device(batch: dict, device: torch.device, preprocessing=None) -> dict:
    """The batch on `device` (asynchronous copies from pinned memory); uint8 pixels, as a stream made with
    `raw_pixels` sends them, are normalised there with `preprocessing` (bitwise what the workers would do)."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in ("pixel_a", "pixel_b"):
        if key in moved and moved[key].dtype == torch.uint8:
            if preprocessing is None:
                raise ValueError(f"batch[{key!r}] holds uint8 pixels; their Preprocessing is needed to normalise")
            moved[key] = preprocessing.normalise_tensor(moved[key])
    return moved


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        count = p.numel()
        p.grad = flat[offset:offset + count].view_as(p).clone()
        offset += count


def train_step(model: DistillModel, batch: dict, optimizer: torch.optim.Optimizer, params: list, cfg: DistillConfig,
               cv_grid: tuple[int, int], device: torch.device, world: int) -> tuple[dict, float, bool]:
    """One optimisation step; returns (loss values, gradient norm, whether the update was applied)."""
    use_bf16 = cfg.run.bf16 and device.type == "cuda"
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        parts = model(batch, cfg.loss, cv_grid)
    total = parts["total"]
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    names = list(parts)
    if world == 1:
        # One host-device synchronisation per step: backward and clipping are queued without waiting for the
        # loss, and the loss check, the gradient norm and the logged values come back together. A non-finite
        # loss makes the same decision as checking it first (no update); its gradients are discarded.
        loss_finite = torch.isfinite(total.detach())
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        fetched = torch.stack([loss_finite.float(), norm.detach().float(),
                               *(parts[k].detach().float() for k in names)]).tolist()
        loss_ok, norm_value, values = fetched[0] > 0, fetched[1], fetched[2:]
        grad_norm = norm_value if loss_ok else float("nan")
        finite = loss_ok and math.isfinite(norm_value)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return dict(zip(names, values)), grad_norm, finite
    finite = bool(torch.isfinite(total))
    grad_norm = float("nan")
    if finite:
        total.backward()
    import torch.distributed as dist

    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finite = bool(flag.item() > 0)
    if finite:
        _all_reduce_grads(params, world)
    if finite:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in parts.items()}, grad_norm, finite


@dataclass
class _Session:
    """Everything one training invocation works with."""

    cfg: DistillConfig
    config: dict  # resolved, as saved
    model: DistillModel
    params: list
    optimizer: torch.optim.Optimizer
    stream: PairStream
    student_info: dict
    device: torch.device
    rank: int
    world: int


def _setup(cfg: DistillConfig) -> _Session:
    rank, world = _distributed()
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    run_dir = cfg.run.out
    _prepare_run_dir(cfg, rank)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.data.seed)  # head initialisation
    student = create_student(cfg.student)
    resolved = dataclasses.replace(cfg, student=cfg.student.resolved(student.num_layers, student.image_size,
                                                                         is_vlm=student.is_vlm))
    base_in_run = student.source.get("kind") == "tiny"
    if rank == 0 and base_in_run and not (run_dir / BASE_DIR).is_dir():
        tmp = run_dir / f".tmp-{BASE_DIR}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_base(student, tmp)  # before LoRA is applied: the plain base tower
        os.rename(tmp, run_dir / BASE_DIR)
    if world > 1:
        torch.distributed.barrier()  # rank 0 has cleared or prepared the run directory
    model = DistillModel(student, resolved.student).to(device)
    model.train()
    params = [p for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)]
    optimizer = make_optimizer(params, cfg.optim, device)
    compiled = device.type == "cuda" and cfg.run.compile
    if compiled:
        model.compile_losses()
    # On CUDA the workers send resized uint8 pixels (a quarter of the bytes to make, pin and copy) and the
    # normalisation runs on the GPU, with the same float32 values. A compiled loss section gets every batch
    # padded to data.max_matches, so it is compiled once.
    stream = PairStream(cfg.data, student.preprocessing, rank=rank, world_size=world,
                        raw_pixels=device.type == "cuda", pad_matches=compiled)
    return _Session(cfg=cfg, config=resolved.to_dict(), model=model, params=params, optimizer=optimizer,
                    stream=stream, student_info=_student_info(resolved, student, base_in_run, run_dir),
                    device=device, rank=rank, world=world)


def _log(writer, losses: dict, lr: float, grad_norm: float, state: TrainState) -> None:
    for name, value in losses.items():
        writer.add_scalar(f"loss/{name}", value, state.step)
    writer.add_scalar("optim/lr", lr, state.step)
    writer.add_scalar("optim/grad_norm", grad_norm, state.step)
    writer.add_scalar("optim/skipped_steps", state.skipped, state.step)


def _batches(run: _Session, state: TrainState):
    """Batches from the current data position on, across epochs, forever."""
    while True:
        if state.batch >= run.stream.batches_per_epoch(state.epoch):
            state.epoch, state.batch = state.epoch + 1, 0
        run.stream.set_position(state.epoch, state.batch)
        yielded = 0
        for batch in make_loader(run.stream, pin_memory=run.device.type == "cuda"):
            yielded += 1
            yield _to_device(batch, run.device, run.stream.source.preprocessing)
        if yielded == 0:
            raise ConfigError(f"{run.cfg.data.shards}: the data stream yielded nothing at epoch {state.epoch}, "
                              f"batch {state.batch}")


def run_distill(cfg: DistillConfig) -> RunSummary:
    """Distil the targets in cfg.data.shards into cfg.student; writes checkpoints and outputs under cfg.run.out."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    started = time.monotonic()
    run = _setup(cfg)
    run_dir = cfg.run.out
    state = TrainState()
    checkpoints = list_checkpoints(run_dir) if cfg.run.resume else []
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], run.model, run.optimizer, run.config)
    if run.rank == 0:
        write_run_info(run_dir, run.config, run.student_info)
    stop_at = cfg.optim.max_steps
    if cfg.run.stop_after_steps is not None:
        stop_at = min(stop_at, state.step + cfg.run.stop_after_steps)

    writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=state.step) if run.rank == 0 else None
    bar = tqdm(total=cfg.optim.max_steps, initial=state.step, disable=not cfg.run.progress or run.rank != 0,
               desc="distill", unit="step", dynamic_ncols=True)
    window: dict[str, list[float]] = {name: [] for name in LOSS_NAMES}
    last_losses: dict = {}
    last_checkpoint = checkpoints[-1] if checkpoints else None
    batches = _batches(run, state)
    try:
        while state.step < stop_at:
            batch = next(batches)
            lr = learning_rate(state.step, cfg.optim)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            values, grad_norm, applied = train_step(run.model, batch, run.optimizer, run.params, cfg,
                                                    run.stream.cv_grid, run.device, run.world)
            state.step += 1
            state.batch += 1
            state.nonfinite_streak = 0 if applied else state.nonfinite_streak + 1
            if applied:
                for name in LOSS_NAMES:
                    window[name].append(values[name])
            else:
                state.skipped += 1
                if state.nonfinite_streak >= cfg.optim.max_nonfinite:
                    raise TrainingDiverged(f"{state.nonfinite_streak} consecutive steps with a non-finite loss or "
                                           f"gradient (last at step {state.step}); lower optim.lr")
            bar.update(1)
            if state.step % cfg.run.log_every == 0 or state.step == stop_at:
                last_losses = {k: sum(v) / len(v) for k, v in window.items() if v}
                window = {name: [] for name in LOSS_NAMES}
                if writer is not None:
                    _log(writer, last_losses, lr, grad_norm, state)
                bar.set_postfix(loss=f"{last_losses.get('total', float('nan')):.4f}", lr=f"{lr:.2e}")
            if state.step % cfg.run.checkpoint_every == 0 or state.step == stop_at:
                if run.rank == 0:
                    last_checkpoint = save_checkpoint(run_dir, run.model, run.optimizer, state, run.config,
                                                      cfg.run.keep_checkpoints)
                if run.world > 1:
                    torch.distributed.barrier()
    finally:
        batches.close()  # shuts the DataLoader workers down
        bar.close()
        if writer is not None:
            writer.close()
    finished = state.step >= cfg.optim.max_steps
    if finished and run.rank == 0:
        save_outputs(run_dir, run.model, run.config, run.student_info)
    return RunSummary(run_dir=run_dir, steps=state.step, skipped_steps=state.skipped, finished=finished,
                      last_losses=last_losses, checkpoint=last_checkpoint, seconds=time.monotonic() - started)
