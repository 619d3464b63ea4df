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
- Later batches of that shape are copied into the static inputs and the graph is replayed. The learning rate
  is a device tensor the graph reads, refreshed from the optimizer's param group before each replay.
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
    """What a captured graph is specific to: the name, shape and dtype of every tensor in the batch."""
    return tuple((key, tuple(value.shape), value.dtype) for key, value in sorted(batch.items())
                 if torch.is_tensor(value))


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    signature: tuple
    inputs: dict  # static input tensors the graph reads
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
        inputs = {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
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
                names, stats = queue_update(self.model, inputs, self.optimizer, self.params, self.cfg, self.cv_grid,
                                            self.device, autocast_cache=False)
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
        for key, static in captured.inputs.items():
            if torch.is_tensor(static):
                static.copy_(batch[key], non_blocking=True)
        for rate, group in zip(captured.learning_rates, self.optimizer.param_groups):
            rate.fill_(float(group["lr"]))
        captured.graph.replay()
        self.replays += 1
        return read_later(captured.names, captured.stats, self.device)
