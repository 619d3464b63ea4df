"""The training step captured once as a CUDA graph and replayed for every batch of the same shapes.

A distillation step launches a few thousand kernels (encoder forward with LoRA and adapters, the heads and
losses, backward, clipping, the fused AdamW update). For a ViT-B student at batch sizes that fit its memory
most of those kernels are shorter than the host's time to launch them, so the step is bounded by Python and
the driver, not by the GPU. A CUDA graph records the whole step's kernels once; replaying it is one launch.

How a run uses it (`GraphedStep.__call__`):
- The first `warmup` steps of a batch shape run eagerly, as real training steps, on the side stream the
  capture will use (they compile the sections after the encoder, create the optimizer's state, initialise
  cuBLAS there).
- The next step of that shape is captured: the batch is copied into static input tensors, and forward,
  losses, backward, clipping and the update are recorded with `step.queue_update`. Nothing runs during
  capture; the graph is then replayed for that batch.
- Later batches of that shape are copied into the static inputs and the graph is replayed. Tensors that are
  views of one buffer (a packed batch's targets, both views' pixels) are copied as that buffer, one copy
  instead of one per tensor (`StaticInputs`). The learning rate is a device tensor the graph reads, refreshed
  from the optimizer's param group before each replay.
- A batch of another shape runs eagerly. So does every step when capture is not possible: students whose
  forward reads values back to the host (`TowerKind.graph_safe` False: Qwen2.5-VL's windows, Idefics3's
  patch positions), or a capture that fails (a warning says why).

A replay runs the kernels the eager step launches, on the same inputs (tests/test_graphed_step.py compares
losses, gradient norms and updates on a GPU). Weights are recast to bf16 at each use (autocast's cache off) in
every step this class runs, eager or replayed: a cache filled during capture would not survive it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from geod.stage2_distill.config import DistillConfig
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.step import StepOutcome, launch_step, queue_update, read_later, skips_on_device

WARMUP_STEPS = 2


def graph_step_possible(cfg: DistillConfig, device: torch.device, world: int, model: DistillModel,
                        optimizer: torch.optim.Optimizer) -> tuple[bool, str]:
    """Whether `geod distill` captures its step as a CUDA graph, and if not, why (for the log)."""
    if not cfg.run.cuda_graphs:
        return False, "run.cuda_graphs is off"
    if device.type != "cuda":
        return False, "not on CUDA"
    if world > 1:
        return False, "several ranks (the gradient all-reduce and the skip decision wait for the host)"
    if not skips_on_device(optimizer):
        return False, "the optimizer cannot skip a non-finite update on the device (fused AdamW is needed)"
    kind = model.student.kind
    if not kind.graph_safe:
        return False, f"the {kind.name} tower's forward reads values back to the host"
    return True, "captured after the first steps of each batch shape"


def batch_signature(batch: dict) -> tuple:
    """What a captured graph is specific to: the name, shape and dtype of every tensor in the batch, and how
    the tensors lie in shared buffers (`StaticInputs`)."""
    tensors = {key: value for key, value in sorted(batch.items()) if torch.is_tensor(value)}
    return (tuple((key, tuple(value.shape), value.dtype) for key, value in tensors.items()),
            _buffer_layout(tensors))


def _buffer_layout(tensors: dict) -> tuple:
    """For each tensor: the index of its buffer (storage) among the batch's, its byte offset in it and the
    buffer's size, when it is contiguous; Nones otherwise. Batches with the same layout share static buffers."""
    buffers: dict[int, int] = {}
    layout = []
    for value in tensors.values():
        if not value.is_contiguous():
            layout.append((None, None, None))
            continue
        storage = value.untyped_storage()
        index = buffers.setdefault(storage.data_ptr(), len(buffers))
        layout.append((index, value.storage_offset() * value.element_size(), storage.nbytes()))
    return tuple(layout)


class StaticInputs:
    """The graph's input tensors, laid out like the batch it was captured with: contiguous tensors that are
    views of one buffer become views of one static buffer, so that a later batch of the same layout is copied
    buffer by buffer (a packed batch: its target buffer and its pixels, two copies instead of sixteen)."""

    def __init__(self, batch: dict) -> None:
        self.values: dict = {}
        self._buffers: list[tuple[torch.Tensor, str]] = []  # (static buffer, a key whose tensor lies in it)
        self._separate: list[str] = []  # keys copied one by one
        statics: dict[int, torch.Tensor] = {}
        # A buffer the batch's tensors fill less than half of (a view into some larger tensor) is not copied
        # whole: its tensors are copied one by one.
        used: dict[int, int] = {}
        for value in batch.values():
            if torch.is_tensor(value) and value.is_contiguous():
                ptr = value.untyped_storage().data_ptr()
                used[ptr] = used.get(ptr, 0) + value.numel() * value.element_size()
        for key, value in batch.items():
            if not torch.is_tensor(value):
                self.values[key] = value
            elif not value.is_contiguous() or 2 * used[value.untyped_storage().data_ptr()] < \
                    value.untyped_storage().nbytes():
                self.values[key] = value.clone()
                self._separate.append(key)
            else:
                storage = value.untyped_storage()
                if storage.data_ptr() not in statics:
                    static = _whole_buffer(value).clone()
                    statics[storage.data_ptr()] = static
                    self._buffers.append((static, key))
                static = statics[storage.data_ptr()]
                self.values[key] = torch.empty(0, dtype=value.dtype, device=value.device).set_(
                    static.untyped_storage(), value.storage_offset(), value.shape, value.stride())

    def copy_from(self, batch: dict) -> None:
        """Copy `batch` (of the captured batch's signature) into the static tensors, asynchronously."""
        for static, key in self._buffers:
            static.copy_(_whole_buffer(batch[key]), non_blocking=True)
        for key in self._separate:
            self.values[key].copy_(batch[key], non_blocking=True)


def _whole_buffer(value: torch.Tensor) -> torch.Tensor:
    """The whole storage under `value`, as a flat uint8 tensor."""
    storage = value.untyped_storage()
    return torch.empty(0, dtype=torch.uint8, device=value.device).set_(storage, 0, (storage.nbytes(),))


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    signature: tuple
    inputs: StaticInputs  # static input tensors the graph reads
    names: list
    stats: torch.Tensor  # the step's stats, written by each replay
    learning_rates: list  # one device scalar per param group, read by the update kernel


class GraphedStep:
    """Runs training steps, replaying a captured CUDA graph where it can (see the module docstring).

    Calling it queues one step and returns its deferred `StepOutcome`, like `step.launch_step`.
    """

    def __init__(self, model: DistillModel, optimizer: torch.optim.Optimizer, params: list, cfg: DistillConfig,
                 cv_grid: tuple[int, int], device: torch.device, *, warmup: int = WARMUP_STEPS) -> None:
        if device.type != "cuda" or not skips_on_device(optimizer):
            raise ValueError("GraphedStep needs CUDA and a fused optimizer that skips updates on the device")
        self.model, self.optimizer, self.params = model, optimizer, params
        self.cfg, self.cv_grid, self.device = cfg, cv_grid, device
        self.warmup = warmup
        self.stream = torch.cuda.Stream(device)
        self.captured: _Captured | None = None
        self.failure: str | None = None  # why capture failed (then every step runs eagerly)
        self.replays = 0
        self.eager_steps = 0
        self._seen: dict[tuple, int] = {}

    def __call__(self, batch: dict) -> StepOutcome:
        signature = batch_signature(batch)
        if self.captured is not None and signature == self.captured.signature:
            return self._replay(batch)
        seen = self._seen.get(signature, 0)
        if self.captured is None and self.failure is None and seen >= self.warmup:
            self.captured = self._capture(batch, signature)
            if self.captured is not None:
                return self._replay(batch)
        self._seen[signature] = seen + 1
        return self._eager(batch)

    # -- eager steps, on the capture stream -------------------------------------------------------------------
    def _eager(self, batch: dict) -> StepOutcome:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # the batch was copied and normalised on the current stream
        with torch.cuda.stream(self.stream):
            outcome = launch_step(self.model, batch, self.optimizer, self.params, self.cfg, self.cv_grid,
                                  self.device, 1, autocast_cache=False)
        current.wait_stream(self.stream)
        self.eager_steps += 1
        return outcome

    # -- capture and replay ---------------------------------------------------------------------------------
    def _capture(self, batch: dict, signature: tuple) -> _Captured | None:
        inputs = StaticInputs(batch)
        groups = self.optimizer.param_groups
        rates = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device) for group in groups]
        saved = [(group["lr"], group["capturable"]) for group in groups]
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's memory
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            # The update kernel reads the learning rate from a tensor (a float would be frozen into the graph);
            # `capturable` only tells the optimizer that capture is intended (fused AdamW needs nothing else).
            for group, rate in zip(groups, rates):
                group["lr"], group["capturable"] = rate, True
            # thread_local: the loader's pin-memory thread may keep calling CUDA while this thread captures.
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                names, stats = queue_update(self.model, inputs.values, self.optimizer, self.params, self.cfg,
                                            self.cv_grid, self.device, autocast_cache=False)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the run on the eager step
            self.failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"geod distill: the training step could not be captured as a CUDA graph; every step "
                          f"runs eagerly ({self.failure})", RuntimeWarning, stacklevel=3)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        finally:
            for group, (rate, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = rate, capturable
        return _Captured(graph=graph, signature=signature, inputs=inputs, names=names, stats=stats,
                         learning_rates=rates)

    def _replay(self, batch: dict) -> StepOutcome:
        captured = self.captured
        captured.inputs.copy_from(batch)
        for rate, group in zip(captured.learning_rates, self.optimizer.param_groups):
            rate.fill_(float(group["lr"]))
        captured.graph.replay()
        self.replays += 1
        return read_later(captured.names, captured.stats, self.device)
