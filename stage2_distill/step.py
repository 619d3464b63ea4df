"""One optimisation step of `geod distill`, and the batches it is fed.

A step queues the forward pass, the losses, backward, gradient clipping and the AdamW update on the device.
With fused AdamW (what `geod distill` uses on CUDA) the non-finite guard runs there as well: the update is
skipped by the optimizer's kernel when the loss or the gradient norm is not finite. The step's loss values,
gradient norm and guard decision come back in one small copy that the caller reads when it needs them
(`StepOutcome.result`). The training loop reads them a few steps late (`InFlight`): the host then never waits
for the device in the middle of the loop, fetching the next batch overlaps the device's work, and the device
keeps queued steps to run while the host waits for a batch that comes late.
"""

from __future__ import annotations

import collections
import math

import torch
from geod.stage2_distill.config import DistillConfig, OptimConfig
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.packing import PackedBatch
from geod.stage2_distill.resize import Resizer


def make_optimizer(params: list, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on `params`. On CUDA the fused implementation updates every tensor in one kernel launch instead
    of several per parameter (a step of a ViT-B student has about 70 trainable tensors) and can skip an update
    on the device (see `launch_step`); on CPU the default implementation is kept."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **fused)


class BatchMover:
    """Moves loader batches to `device`. uint8 pixels (a stream made with `raw_pixels`) are normalised there
    with `preprocessing`, bitwise what the workers would compute; the lookup table goes to the device once.
    uint8 pixels not at the student's size (a stream made with `defer_resize`) are resized there first, bit for
    bit as PIL resizes them on the host (`resize.Resizer`). `compile`: the resize and the normalisation run
    through torch.compile, one kernel per pass (the eager lookup writes two int64 index tensors first, several
    times the bytes of its result).

    side_stream (CUDA): the copies and the normalisation run on a stream of their own, and the stream that
    called waits for them: a batch fetched while the previous step is still running (the training loop queues
    a step and then fetches the next batch) is copied during that step instead of after it.
    """

    def __init__(self, device: torch.device, preprocessing=None, *, side_stream: bool = True,
                 compile: bool = False) -> None:
        self.device = device
        self.preprocessing = preprocessing
        self.side_stream = side_stream
        self.compile = compile
        self._table = None
        self._lookup = None  # the normalisation, compiled or not, made on the first uint8 batch
        self._resizer = None  # made on the first batch that needs it
        self._copies = None  # the copy stream, made on first use

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the student's float32 input (resized first if they are not at its size); other dtypes
        are already normalised."""
        if pixels.dtype != torch.uint8:
            return pixels
        if self.preprocessing is None:
            raise ValueError("the batch holds uint8 pixels; their Preprocessing is needed to normalise them")
        if tuple(pixels.shape[-2:]) != tuple(self.preprocessing.image_size):
            if self._resizer is None:
                self._resizer = Resizer(self.preprocessing.image_size, self.preprocessing.resample,
                                        compile=self.compile)
            pixels = self._resizer(pixels)
        if self._table is None:
            self._table = self.preprocessing.device_table(self.device)
            lookup = self.preprocessing.normalise_tensor
            self._lookup = torch.compile(lookup, dynamic=False) if self.compile else lookup
        return self._lookup(pixels, self._table)

    def __call__(self, batch: dict | PackedBatch) -> dict:
        """The batch on the device (asynchronous copies from pinned memory), ready for the calling stream."""
        if self.device.type != "cuda" or not self.side_stream:
            return self._move(batch)
        consumer = torch.cuda.current_stream(self.device)
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copies):
            moved = self._move(batch)
        consumer.wait_stream(self._copies)
        for value in moved.values():
            if torch.is_tensor(value):
                value.record_stream(consumer)  # made on the copy stream, used (and freed) on the consumer's
        return moved

    def _move(self, batch: dict | PackedBatch) -> dict:
        if isinstance(batch, PackedBatch):
            return batch.unpack(self.device, self.normalise)
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        for key in ("pixel_a", "pixel_b"):
            if key in moved:
                moved[key] = self.normalise(moved[key])
        return moved


class StepOutcome:
    """A queued step's loss values, gradient norm and whether its update was applied.

    `deferred`: the values are still on their way from the device; `result()` waits for them.
    """

    def __init__(self, names: list[str], stats: torch.Tensor, event=None, *, deferred: bool = False) -> None:
        self.names = names
        self.stats = stats  # [loss finite (0/1), gradient norm, *loss values]
        self.event = event
        self.deferred = deferred
        self._result = None

    @classmethod
    def done(cls, values: dict, grad_norm: float, applied: bool) -> StepOutcome:
        """An outcome already read."""
        outcome = cls(list(values), torch.empty(0))
        outcome._result = values, grad_norm, applied
        return outcome

    def result(self) -> tuple[dict, float, bool]:
        """(loss values, gradient norm (nan when the loss was not finite), update applied)."""
        if self._result is None:
            if self.event is not None:
                self.event.synchronize()
            fetched = self.stats.tolist()
            loss_ok, norm_value, values = fetched[0] > 0, fetched[1], fetched[2:]
            grad_norm = norm_value if loss_ok else float("nan")
            self._result = dict(zip(self.names, values)), grad_norm, loss_ok and math.isfinite(norm_value)
        return self._result


class InFlight:
    """The outcomes of queued steps, read `depth` steps late, in order.

    After queuing step N the loop reads the outcome of step N - depth, which waits for the device to finish
    that step; the device then still holds `depth` queued steps (`depth` = 1: the step just queued) while the
    host fetches the next batch. A batch that comes late from the loader (a worker descheduled, a slow image)
    leaves the device idle only when the wait is longer than those queued steps.
    """

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"InFlight: depth must be >= 1, got {depth}")
        self.depth = depth
        self._queue: collections.deque[tuple[int, StepOutcome]] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, step: int, outcome: StepOutcome) -> list[tuple[int, StepOutcome]]:
        """Queue step `step`'s outcome; returns the (step, outcome) pairs now due, oldest first. An outcome
        already read (not deferred) makes every queued one due with it."""
        self._queue.append((step, outcome))
        if not outcome.deferred:
            return self.drain()
        due = []
        while len(self._queue) > self.depth:
            due.append(self._queue.popleft())
        return due

    def drain(self) -> list[tuple[int, StepOutcome]]:
        """Every queued outcome, oldest first (before a checkpoint, or to stop)."""
        due = list(self._queue)
        self._queue.clear()
        return due


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes a device-side skip flag: fused AdamW reads `found_inf` (the protocol
    torch.amp.GradScaler uses) and then leaves parameters, moments and step count untouched."""
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def launch_step(model: DistillModel, batch: dict, optimizer: torch.optim.Optimizer, params: list,
                cfg: DistillConfig, cv_grid: tuple[int, int], device: torch.device, world: int, *,
                autocast_cache: bool = True) -> StepOutcome:
    """Queue one optimisation step. With a fused optimizer in a single process nothing waits for the device:
    the outcome is read later. Otherwise (CPU, several ranks) the step waits once, to decide on the update.
    `autocast_cache`: see `queue_update` (the fused single-process path only)."""
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        with _autocast(cfg, device):
            parts = model(batch, cfg.loss, cv_grid)
        return StepOutcome.done(*_distributed_step(parts, optimizer, params, _clip_norm(cfg), device, world))
    if not skips_on_device(optimizer):
        names, stats = _forward_backward(model, batch, params, cfg, cv_grid, device)
        outcome = StepOutcome(names, stats)
        if outcome.result()[2]:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outcome
    names, stats = queue_update(model, batch, optimizer, params, cfg, cv_grid, device, autocast_cache=autocast_cache)
    optimizer.zero_grad(set_to_none=True)
    return read_later(names, stats, device)


def queue_update(model: DistillModel, batch: dict, optimizer: torch.optim.Optimizer, params: list,
                 cfg: DistillConfig, cv_grid: tuple[int, int], device: torch.device, *,
                 autocast_cache: bool = True) -> tuple[list[str], torch.Tensor]:
    """Forward, losses, backward, clipping and the update, all queued on the device with nothing read back:
    a fused optimizer (`skips_on_device`) skips the update itself when the loss or the gradient norm is not
    finite. Gradients are left in place. Returns the loss names and the step's stats tensor on the device
    (see `StepOutcome`). `autocast_cache=False` recasts weights at each use (what CUDA graph capture needs)."""
    names, stats = _forward_backward(model, batch, params, cfg, cv_grid, device, autocast_cache=autocast_cache)
    skip = torch.logical_or(stats[0] == 0, ~torch.isfinite(stats[1])).float()
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return names, stats


def read_later(names: list[str], stats: torch.Tensor, device: torch.device) -> StepOutcome:
    """A deferred outcome: `stats` copied to pinned host memory behind the step's work, an event after it."""
    event = None
    if device.type == "cuda":
        host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
        host.copy_(stats, non_blocking=True)
        stats = host
        # Blocking: a host waiting for the step sleeps instead of spinning on a core the loader's workers need.
        event = torch.cuda.Event(blocking=True)
        event.record()
    return StepOutcome(names, stats, event, deferred=True)


def _clip_norm(cfg: DistillConfig) -> float:
    """The gradient-norm bound: optim.grad_clip, or none (infinite) when it is 0."""
    return cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")


def _autocast(cfg: DistillConfig, device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA when run.bf16 is set; `cache` False recasts weights at each use."""
    enabled = cfg.run.bf16 and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


def _forward_backward(model: DistillModel, batch: dict, params: list, cfg: DistillConfig, cv_grid: tuple[int, int],
                      device: torch.device, *, autocast_cache: bool = True) -> tuple[list[str], torch.Tensor]:
    """Losses, backward and clipping, queued; returns (loss names, stats [loss finite, gradient norm, *losses])."""
    with _autocast(cfg, device, autocast_cache):
        parts = model(batch, cfg.loss, cv_grid)
    names = list(parts)
    total = parts["total"]
    # Backward and clipping are queued without waiting for the loss; a non-finite loss makes the same decision
    # as checking it first (no update), its gradients are discarded.
    loss_finite = torch.isfinite(total.detach())
    total.backward()
    model.join_streams()
    norm = torch.nn.utils.clip_grad_norm_(params, _clip_norm(cfg))
    stats = torch.stack([loss_finite.float(), norm.detach().float(), *(parts[k].detach().float() for k in names)])
    return names, stats


def train_step(model: DistillModel, batch: dict, optimizer: torch.optim.Optimizer, params: list, cfg: DistillConfig,
               cv_grid: tuple[int, int], device: torch.device, world: int) -> tuple[dict, float, bool]:
    """One optimisation step, waited for; returns (loss values, gradient norm, whether the update was applied)."""
    return launch_step(model, batch, optimizer, params, cfg, cv_grid, device, world).result()


def _distributed_step(parts: dict, optimizer, params: list, clip: float, device: torch.device,
                      world: int) -> tuple[dict, float, bool]:
    """The step across ranks: all ranks skip together when any loss is not finite; gradients are averaged."""
    import torch.distributed as dist

    total = parts["total"]
    finite = bool(torch.isfinite(total))
    grad_norm = float("nan")
    if finite:
        total.backward()
    flag = torch.tensor([1.0 if finite else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finite = bool(flag.item() > 0)
    if finite:
        _all_reduce_grads(params, world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in parts.items()}, grad_norm, finite


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
