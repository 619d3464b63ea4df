"""`geod distill`: the training loop.

One step: learning rate from a pure schedule, forward under bf16 autocast on CUDA, the four losses,
backward, gradient all-reduce across ranks (torchrun), clipping, and a non-finite guard that skips the
update (and aborts after `optim.max_nonfinite` skips in a row). Checkpoints every `run.checkpoint_every`
steps restore exactly: weights, optimizer, RNG, step and data position. The step itself lives in
geod.stage2_distill.step (`train_step` and `make_optimizer` are importable from here too); on one GPU it is
captured as a CUDA graph after the first steps and replayed (geod.stage2_distill.graphed_step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from geod.pipeline.errors import ConfigError, GeodError
from geod.pipeline.precision import cudnn_autotune, tf32
from geod.stage2_distill.checkpoint import (
    BASE_DIR,
    CHECKPOINTS,
    TrainState,
    checkpoint_config,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_outputs,
    write_run_info,
)
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig
from geod.stage2_distill.data import PairStream, default_workers, defers_resize, make_loader
from geod.stage2_distill.graphed_step import GraphedStep, graph_step_possible
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.step import (  # noqa: F401
    BatchMover,
    InFlight,
    StepOutcome,
    launch_step,
    make_optimizer,
    train_step,
)
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
    step_mode: str  # how steps ran: replayed CUDA graph or eager, and why
    # Share of the training loop's time (after its first step, which waits for the workers to start) spent
    # waiting for the next batch: near 0 when the loader keeps up, large when it holds the steps back.
    data_wait_share: float = 0.0


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


def _data_resolved(cfg: DistillConfig, world: int, device: torch.device) -> DataConfig:
    """cfg.data with its worker count fixed: as configured, else as the run being resumed chose it, else from
    this machine's CPUs (`default_workers`). The count is part of the data order."""
    if cfg.data.workers is not None:
        return cfg.data
    checkpoints = list_checkpoints(cfg.run.out) if cfg.run.resume else []
    saved = checkpoint_config(checkpoints[-1]).get("data", {}).get("workers") if checkpoints else None
    if saved is not None:
        return dataclasses.replace(cfg.data, workers=int(saved))
    return dataclasses.replace(cfg.data, workers=_fewest_over_ranks(default_workers(world), device, world))


def _fewest_over_ranks(count: int, device: torch.device, world: int) -> int:
    """The smallest `count` of all ranks: every rank must split the data into the same streams, and ranks
    bound to different CPU sets would each choose their own number."""
    if world <= 1:
        return count
    value = torch.tensor([count], device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return int(value.item())


def _student_info(cfg: DistillConfig, student, base_in_run: bool, run_dir: Path) -> dict:
    info = student.describe()
    info["image_size"] = list(cfg.student.image_size)
    info["base_in_run"] = base_in_run
    info["base_model"] = str((run_dir / BASE_DIR).resolve()) if base_in_run else student.source.get(
        "name_or_path", cfg.student.name_or_path)
    return info


def _to_device(batch, device: torch.device, preprocessing=None) -> dict:
    """`batch` on `device`, uint8 pixels normalised there (a one-off `BatchMover`)."""
    return BatchMover(device, preprocessing)(batch)


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
    graphed: bool  # steps are captured as a CUDA graph (graph_step_possible)
    graph_note: str  # why or why not


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
                                                                         is_vlm=student.is_vlm),
                                   data=_data_resolved(cfg, world, device))
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
    compiled = prepare_for_device(model, cfg, device, world)
    # On CUDA the workers send uint8 pixels (a quarter of the bytes to make, pin and copy) and the
    # normalisation runs on the GPU, with the same float32 values; each batch travels packed in two buffers.
    # With run.device_resize the GPU also resizes batches of one decoded size. A compiled section or a
    # captured step gets every batch padded to data.max_matches, so it is compiled or captured once.
    cuda = device.type == "cuda"
    graphed, graph_note = graph_step_possible(cfg, device, world, model, optimizer)
    stream = PairStream(resolved.data, student.preprocessing, rank=rank, world_size=world, raw_pixels=cuda,
                        pad_matches=compiled or graphed, pack=cuda,
                        defer_resize=defers_resize(resolved.run.device_resize, student.preprocessing, device))
    return _Session(cfg=cfg, config=resolved.to_dict(), model=model, params=params, optimizer=optimizer,
                    stream=stream, student_info=_student_info(resolved, student, base_in_run, run_dir),
                    device=device, rank=rank, world=world, graphed=graphed, graph_note=graph_note)


def prepare_for_device(model: DistillModel, cfg: DistillConfig, device: torch.device, world: int) -> bool:
    """Compile the sections after the encoder (run.compile) and overlap the early losses with the later blocks
    (run.overlap_losses), as far as the device allows; returns whether the sections are compiled."""
    compiled = device.type == "cuda" and cfg.run.compile
    if compiled:
        model.compile_sections()
    if device.type == "cuda" and world == 1 and cfg.run.overlap_losses:
        model.overlap_early_losses(torch.cuda.Stream(device))
    return compiled


def _log(writer, step: int, losses: dict, lr: float, grad_norm: float, skipped: int, wait_share: float) -> None:
    for name, value in losses.items():
        writer.add_scalar(f"loss/{name}", value, step)
    writer.add_scalar("optim/lr", lr, step)
    writer.add_scalar("optim/grad_norm", grad_norm, step)
    writer.add_scalar("optim/skipped_steps", skipped, step)
    writer.add_scalar("data/wait_share", wait_share, step)


class _WaitClock:
    """Time spent waiting for batches, as a share of the loop's time: over the whole invocation and over the
    current logging window. The clocks start after the first wait, which includes starting the workers."""

    def __init__(self) -> None:
        self.total = self.window = 0.0
        self.started = self.window_started = None

    def waited(self, seconds: float) -> None:
        if self.started is None:
            self.started = self.window_started = time.monotonic()
            return
        self.total += seconds
        self.window += seconds

    def window_share(self) -> float:
        """The current window's share; a new window starts now."""
        share = _share(self.window, self.window_started)
        self.window, self.window_started = 0.0, time.monotonic()
        return share

    def share(self) -> float:
        return _share(self.total, self.started)


def _share(waited: float, since: float | None) -> float:
    elapsed = time.monotonic() - since if since is not None else 0.0
    return min(waited / elapsed, 1.0) if elapsed > 0 else 0.0


def _batches(run: _Session, state: TrainState):
    """Batches from the current data position on, across epochs, forever, on the device."""
    mover = BatchMover(run.device, run.stream.source.preprocessing,
                       compile=run.cfg.run.compile and run.device.type == "cuda")
    while True:
        if state.batch >= run.stream.batches_per_epoch(state.epoch):
            state.epoch, state.batch = state.epoch + 1, 0
        run.stream.set_position(state.epoch, state.batch)
        yielded = 0
        for batch in make_loader(run.stream, pin_memory=run.device.type == "cuda"):
            yielded += 1
            yield mover(batch)
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
    waits = _WaitClock()
    precision_scope = contextlib.ExitStack()  # TF32 and cuDNN autotuning as run says, restored at the end
    in_flight = InFlight(cfg.run.steps_in_flight)  # queued steps whose outcomes are read later
    graphed = GraphedStep(run.model, run.optimizer, run.params, cfg, run.stream.cv_grid, run.device) \
        if run.graphed else None

    def account(step: int, outcome: StepOutcome) -> None:
        """Fold a step's outcome into the state and the loss window, and log when the step is a logging step.
        Logging follows the outcomes as they are read, so it never makes the loop wait for the device."""
        nonlocal window, last_losses
        values, grad_norm, applied = outcome.result()
        state.nonfinite_streak = 0 if applied else state.nonfinite_streak + 1
        if applied:
            for name in LOSS_NAMES:
                window[name].append(values[name])
        else:
            state.skipped += 1
            if state.nonfinite_streak >= cfg.optim.max_nonfinite:
                raise TrainingDiverged(f"{state.nonfinite_streak} consecutive steps with a non-finite loss or "
                                       f"gradient (last at step {step}); lower optim.lr")
        if step % cfg.run.log_every == 0 or step == stop_at:
            last_losses = {k: sum(v) / len(v) for k, v in window.items() if v}
            window = {name: [] for name in LOSS_NAMES}
            wait_share = waits.window_share()
            lr = learning_rate(step - 1, cfg.optim)  # the rate step `step` ran with
            if writer is not None:
                _log(writer, step, last_losses, lr, grad_norm, state.skipped, wait_share)
            bar.set_postfix(loss=f"{last_losses.get('total', float('nan')):.4f}", lr=f"{lr:.2e}",
                            data_wait=f"{100 * wait_share:.0f}%")

    try:
        precision_scope.enter_context(tf32(run.device, cfg.run.tf32))
        precision_scope.enter_context(cudnn_autotune(run.device, cfg.run.cudnn_benchmark))
        while state.step < stop_at:
            asked = time.monotonic()
            batch = next(batches)
            waits.waited(time.monotonic() - asked)
            lr = learning_rate(state.step, cfg.optim)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            if graphed is not None:
                outcome = graphed(batch)
            else:
                outcome = launch_step(run.model, batch, run.optimizer, run.params, cfg, run.stream.cv_grid,
                                      run.device, run.world)
            state.step += 1
            state.batch += 1
            save_now = state.step % cfg.run.checkpoint_every == 0 or state.step == stop_at
            due = in_flight.add(state.step, outcome)
            if save_now:
                due += in_flight.drain()  # the checkpoint holds every step so far, outcomes included
            for step, done in due:
                account(step, done)
            bar.update(1)
            if save_now:
                if run.rank == 0:
                    last_checkpoint = save_checkpoint(run_dir, run.model, run.optimizer, state, run.config,
                                                      cfg.run.keep_checkpoints)
                if run.world > 1:
                    torch.distributed.barrier()
    finally:
        precision_scope.close()
        batches.close()  # shuts the DataLoader workers down
        bar.close()
        if writer is not None:
            writer.close()
    finished = state.step >= cfg.optim.max_steps
    if finished and run.rank == 0:
        save_outputs(run_dir, run.model, run.config, run.student_info)
    return RunSummary(run_dir=run_dir, steps=state.step, skipped_steps=state.skipped, finished=finished,
                      last_losses=last_losses, checkpoint=last_checkpoint, seconds=time.monotonic() - started,
                      step_mode=_step_mode(run, graphed), data_wait_share=waits.share())


def _step_mode(run: _Session, graphed: GraphedStep | None) -> str:
    """How this invocation's steps ran, for the summary line."""
    if graphed is None:
        return f"eager ({run.graph_note})"
    if graphed.failure is not None:
        return f"eager (CUDA graph capture failed: {graphed.failure})"
    return f"CUDA graph, {graphed.replays} replayed and {graphed.eager_steps} eager"

