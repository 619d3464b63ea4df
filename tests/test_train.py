"""The training loop: schedule, exact resume, non-finite guard, outputs and loading them back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset, random_batch
from geod.pipeline.errors import ConfigError
from geod.stage2_distill import train
from geod.stage2_distill.checkpoint import list_checkpoints, load_distilled
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.adapters import bottleneck_residual
from geod.stage2_distill.model import DistillModel
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=16)


def _config(dataset, out, *, steps=6, **run) -> DistillConfig:
    return DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=3, workers=0, shuffle_blocks=2, max_matches=12),
        # the CPU whatever the machine: these tests pin bitwise results, which CUDA's atomics do not give
        run=RunConfig(out=out, **{"checkpoint_every": 100, "log_every": 1, "progress": False, "device": "cpu",
                                  **run}),
        student=StudentConfig(image_size=(32, 48), lora_layers=(2, 3), adapter_dim=8, lora_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=steps))


def test_learning_rate_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [train.learning_rate(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.learning_rate(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.learning_rate(14, cfg) == pytest.approx(0.1)
    assert train.learning_rate(7, OptimConfig(lr=0.5, warmup_steps=0, max_steps=9, schedule="constant")) == 0.5


def _trainable(path):
    return load_file(path / "trainable.safetensors")


def test_resume_continues_the_unbroken_trajectory(dataset, tmp_path):
    # 16 pairs in batches of 3: 5 batches per epoch, so the 6 steps cross an epoch boundary and the break
    # falls mid-epoch. LoRA dropout makes the RNG state matter too.
    unbroken = train.run_distill(_config(dataset, tmp_path / "a"))
    state = json.loads((list_checkpoints(tmp_path / "a")[-1] / "state.json").read_text())["train"]
    assert (state["epoch"], state["batch"]) == (1, 1)
    first = train.run_distill(_config(dataset, tmp_path / "b", stop_after_steps=3))
    assert first.steps == 3 and not first.finished and not (tmp_path / "b" / "adapter").exists()
    second = train.run_distill(_config(dataset, tmp_path / "b", resume=True))
    assert unbroken.finished and second.finished and second.steps == 6
    a, b = _trainable(list_checkpoints(tmp_path / "a")[-1]), _trainable(list_checkpoints(tmp_path / "b")[-1])
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert unbroken.last_losses == second.last_losses
    # training moved the weights away from their zero initialisation
    assert any(a[n].abs().max() > 0 for n in a if "lora_B" in n)

    # the final outputs load back into the same model as the last checkpoint
    final = load_distilled(tmp_path / "a")
    from_checkpoint = load_distilled(tmp_path / "a", checkpoint=6)
    pixels = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        x, y = final.features(pixels), from_checkpoint.features(pixels)
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    adapter = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == [f"encoder.layers.{layer}.self_attn.{p}" for layer in (2, 3)
                                                 for p in ("q_proj", "v_proj")]
    modules = load_file(tmp_path / "a" / "geod_modules.safetensors")
    assert {k.split(".")[0] for k in modules} == {"student", "refine", "depth_head"}
    student = json.loads((tmp_path / "a" / "student.json").read_text())
    assert student["grid"] == [4, 6] and student["base_in_run"] is True
    assert json.loads((tmp_path / "a" / "config.json").read_text())["student"]["lora_layers"] == [2, 3]
    assert any((tmp_path / "a" / "tb").iterdir())


def test_the_share_of_time_spent_waiting_for_data_is_measured_and_logged(dataset, tmp_path, monkeypatch):
    # A loader slowed to 0.1 s per image (6 images per batch, in this process) dominates each step: the run
    # reports that most of its time went to waiting, and logs the share per window to TensorBoard.
    import time

    from geod.stage2_distill.data import PairSource
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pixels = PairSource.pixels

    def slow(self, *args, **kwargs):
        time.sleep(0.1)
        return pixels(self, *args, **kwargs)

    monkeypatch.setattr(PairSource, "pixels", slow)
    summary = train.run_distill(_config(dataset, tmp_path / "slow", steps=4))
    assert 0.5 < summary.data_wait_share <= 1.0
    events = EventAccumulator(str(tmp_path / "slow" / "tb"))
    events.Reload()
    shares = [event.value for event in events.Scalars("data/wait_share")]
    assert len(shares) == 4 and shares[0] == 0.0  # the first step's wait (starting the loader) is left out
    assert all(0.5 < share <= 1.0 for share in shares[1:])


def test_non_finite_steps_are_skipped_then_abort(dataset, tmp_path, monkeypatch):
    forward = DistillModel.forward
    calls = []

    def poisoned(self, batch, loss_cfg, cv_grid):
        parts = forward(self, batch, loss_cfg, cv_grid)
        calls.append(1)
        if len(calls) == 2:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(DistillModel, "forward", poisoned)
    cfg = _config(dataset, tmp_path / "nan", steps=2)
    summary = train.run_distill(cfg)
    assert summary.steps == 2 and summary.skipped_steps == 1
    # Only step 1 was applied: the optimizer holds one step of state, and it is step 1's.
    state = json.loads((list_checkpoints(tmp_path / "nan")[-1] / "state.json").read_text())
    assert state["train"]["skipped"] == 1
    optim = load_file(list_checkpoints(tmp_path / "nan")[-1] / "optimizer.safetensors")
    assert all(v.item() == 1.0 for k, v in optim.items() if k.endswith(".step"))

    monkeypatch.setattr(DistillModel, "forward", lambda self, batch, loss_cfg, cv_grid: {
        **forward(self, batch, loss_cfg, cv_grid), "total": torch.tensor(float("inf"), requires_grad=True)})
    cfg = _config(dataset, tmp_path / "inf", steps=5)
    cfg.optim.max_nonfinite = 2
    with pytest.raises(train.TrainingDiverged, match="2 consecutive"):
        train.run_distill(cfg)


def test_existing_run_needs_resume_or_overwrite_and_resume_checks_the_config(dataset, tmp_path):
    train.run_distill(_config(dataset, tmp_path / "r", steps=2))
    with pytest.raises(ConfigError, match="already holds a run"):
        train.run_distill(_config(dataset, tmp_path / "r", steps=2))
    changed = _config(dataset, tmp_path / "r", steps=2, resume=True)
    changed.optim.lr = 5e-4
    with pytest.raises(ConfigError, match="optim.lr"):
        train.run_distill(changed)
    again = train.run_distill(_config(dataset, tmp_path / "r", steps=2, overwrite=True))
    assert again.steps == 2 and len(list_checkpoints(tmp_path / "r")) == 1


def test_unset_worker_count_is_chosen_once_recorded_and_kept_by_a_resume(dataset, tmp_path, monkeypatch):
    # data.workers=None takes the machine's count when the run starts; the run's config records it, and a
    # resume on a machine that would choose differently keeps the recorded one (it is part of the data order).
    def unset(**run):
        cfg = _config(dataset, tmp_path / "w", steps=4, **run)
        cfg.data.workers = None
        return cfg

    monkeypatch.setattr(train, "default_workers", lambda world: 2)
    first = train.run_distill(unset(stop_after_steps=2))
    assert first.steps == 2
    assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["workers"] == 2
    monkeypatch.setattr(train, "default_workers", lambda world: 1)
    second = train.run_distill(unset(resume=True))
    assert second.finished and second.steps == 4
    saved = json.loads((list_checkpoints(tmp_path / "w")[-1] / "state.json").read_text())["config"]["data"]
    assert saved["workers"] == 2
    assert train.run_distill(unset(overwrite=True, stop_after_steps=1)).steps == 1
    assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["workers"] == 1


def test_default_workers_leave_two_cpus_and_stay_between_1_and_16(monkeypatch):
    from geod.stage2_distill import data

    for cpus, world, expected in ((2, 1, 1), (16, 1, 14), (16, 2, 6), (128, 1, 16), (64, 8, 6)):
        monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert data.default_workers(world) == expected, (cpus, world)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_on_cuda_matches_fp32_and_trains(tmp_path):
    from geod.stage2_distill.students import create_student

    device = torch.device("cuda")
    cfg = DistillConfig(data=DataConfig(shards="unused"), run=RunConfig(out=tmp_path, bf16=True),
                        student=StudentConfig(image_size=(32, 48)), optim=OptimConfig(lr=1e-3, warmup_steps=0))
    student = create_student(cfg.student)
    model = DistillModel(student, cfg.student.resolved(student.num_layers, student.image_size)).to(device)
    batch = random_batch(4, 32, 24, 4, device)
    with torch.no_grad():
        exact = model(batch, cfg.loss, (4, 6))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = model(batch, cfg.loss, (4, 6))
    for name in ("ap", "depth", "rank", "kl"):
        assert fast[name].dtype == torch.float32
        assert fast[name].item() == pytest.approx(exact[name].item(), rel=0.05, abs=1e-3), name
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [p.detach().clone() for p in params]
    values, grad_norm, applied = train.train_step(model, batch, optimizer, params, cfg, (4, 6), device, 1)
    assert applied and math.isfinite(grad_norm) and math.isfinite(values["total"])
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def _padded(batch: dict, width: int) -> dict:
    """The batch with its matches padded (masked, zero) to `width`, as PairStream's pad_matches sends them."""
    out = dict(batch)
    for key in ("mask", "xy_a", "xy_b", "depth_a", "depth_b", "points_a", "points_b"):
        value = batch[key]
        pad = torch.zeros((value.shape[0], width - value.shape[1], *value.shape[2:]), dtype=value.dtype)
        out[key] = torch.cat([value, pad], dim=1)
    return out


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-qwen2_5_vl"])
def test_compiled_sections_on_padded_matches_equal_the_eager_ones(name):
    # run.compile on CUDA: the section after the encoder (norms, layer means, heads, losses) and the adapters
    # go through torch.compile and every batch is padded to data.max_matches. Checked on CPU with the
    # aot_eager backend (the same captured graphs, each in one piece), for a tower with a class token and one
    # with flat tokens in window order.
    from geod.stage2_distill.config import LossConfig
    from geod.stage2_distill.students import create_student

    torch.manual_seed(0)
    student = create_student(StudentConfig(name_or_path=name, image_size=(32, 48)))
    cfg = StudentConfig(name_or_path=name, image_size=(32, 48), lora_layers=(1, 2), adapter_dim=8)
    model = DistillModel(student, cfg.resolved(student.num_layers, student.image_size)).train()
    with torch.no_grad():
        model.refine.conv.weight.normal_(std=0.1)
        for adapter in model.student.block_adapters.values():
            adapter.up.weight.normal_(std=0.1)
    loss_cfg = LossConfig(rank_points=4, w_preserve=0.5)
    batch = random_batch(2, 6, 24, 4, torch.device("cpu"))
    batch["mask"][1, 4:] = False

    def run(b: dict) -> tuple[dict, dict]:
        model.zero_grad(set_to_none=True)
        parts = model(b, loss_cfg, (4, 6))
        parts["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in parts.items()}, grads

    eager, eager_grads = run(batch)
    padded, padded_grads = run(_padded(batch, 10))
    model.compile_sections(backend="aot_eager", fullgraph=True)
    assert all(a.residual is not bottleneck_residual for a in model.student.block_adapters.values())
    compiled, compiled_grads = run(_padded(batch, 10))
    assert all(compiled[k] > 0 for k in ("ap", "depth", "rank", "kl", "preserve"))
    for got, got_grads in ((padded, padded_grads), (compiled, compiled_grads)):
        for name in eager:
            assert torch.allclose(got[name], eager[name], rtol=1e-5, atol=1e-7), name
        assert got_grads.keys() == eager_grads.keys() and len(eager_grads) > 0
        for name in eager_grads:
            assert torch.allclose(got_grads[name], eager_grads[name], rtol=1e-4, atol=1e-7), name


def test_cpu_runs_neither_compile_nor_fuse_and_uint8_pixels_are_normalised_on_arrival(dataset, tmp_path,
                                                                                      monkeypatch):
    from geod.stage2_distill.students import Preprocessing

    def refuse(self, **options):
        raise AssertionError("nothing may be compiled on CPU")

    monkeypatch.setattr(DistillModel, "compile_sections", refuse)
    summary = train.run_distill(_config(dataset, tmp_path / "run", steps=2))  # run.compile defaults to True
    assert summary.finished
    params = [torch.nn.Parameter(torch.ones(3))]
    assert not train.make_optimizer(params, OptimConfig(), torch.device("cpu")).defaults.get("fused")
    prep = Preprocessing(image_size=(2, 3), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    batch = {"pixel_a": torch.from_numpy(prep.resize_only(image))[None], "pair_id": ["p"],
             "mask": torch.ones(1, 2, dtype=torch.bool)}
    moved = train._to_device(batch, torch.device("cpu"), prep)
    assert moved["pixel_a"].dtype == torch.float32 and torch.equal(moved["pixel_a"][0], torch.from_numpy(prep(image)))
    assert torch.equal(moved["mask"], batch["mask"]) and moved["pair_id"] == ["p"]
    with pytest.raises(ValueError, match="Preprocessing"):
        train._to_device(batch, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_with_compiled_losses_fused_adamw_and_uint8_pixels(tmp_path):
    # What `geod distill` sets up on CUDA, against the eager float path on the same batch.
    from geod.stage2_distill.students import create_student

    device = torch.device("cuda")
    cfg = DistillConfig(data=DataConfig(shards="unused"), run=RunConfig(out=tmp_path),
                        student=StudentConfig(image_size=(32, 48)), optim=OptimConfig(lr=1e-3, warmup_steps=0))
    torch.manual_seed(0)
    student = create_student(cfg.student)
    model = DistillModel(student, cfg.student.resolved(student.num_layers, student.image_size)).to(device)
    batch = random_batch(4, 32, 24, 4, torch.device("cpu"))
    batch["mask"][1, 20:] = False
    raw = (torch.rand(2, 4, 3, 32, 48) * 256).to(torch.uint8)
    batch["pixel_a"], batch["pixel_b"] = raw[0], raw[1]
    eager_batch = train._to_device(batch, device, student.preprocessing)
    assert eager_batch["pixel_a"].dtype == torch.float32
    with torch.no_grad():
        eager = model(eager_batch, cfg.loss, (4, 6))
        model.compile_sections()
        compiled = model(train._to_device(_padded(batch, 40), device, student.preprocessing), cfg.loss, (4, 6))
    for name in ("ap", "depth", "rank", "kl"):
        assert compiled[name].item() == pytest.approx(eager[name].item(), rel=1e-4, abs=1e-6), name
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(params, cfg.optim, device)
    assert optimizer.defaults["fused"]
    before = [p.detach().clone() for p in params]
    values, grad_norm, applied = train.train_step(model, train._to_device(_padded(batch, 40), device,
                                                                          student.preprocessing),
                                                  optimizer, params, cfg, (4, 6), device, 1)
    assert applied and math.isfinite(grad_norm) and math.isfinite(values["total"])
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def _fused_cpu_optimizer(params, cfg, device):
    # Fused AdamW exists on CPU too: it takes the same device-side skip flag as on CUDA.
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


def test_a_step_skipped_on_the_device_leaves_the_optimizer_untouched_and_a_finite_one_is_the_waited_step():
    import copy

    from geod.stage2_distill import step
    from geod.stage2_distill.students import create_student

    torch.manual_seed(0)
    student = create_student(StudentConfig(image_size=(32, 48)))
    scfg = StudentConfig(image_size=(32, 48), lora_layers=(2, 3), adapter_dim=8)
    cfg = DistillConfig(data=DataConfig(shards="unused"), run=RunConfig(out="unused"), student=scfg,
                        optim=OptimConfig(lr=1e-3, warmup_steps=0))
    model = DistillModel(student, scfg.resolved(student.num_layers, student.image_size)).train()
    twin = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = _fused_cpu_optimizer(params, cfg.optim, None)
    twin_optimizer = _fused_cpu_optimizer(twin_params, cfg.optim, None)
    batch = random_batch(2, 6, 24, 4, torch.device("cpu"))
    cpu = torch.device("cpu")

    outcome = step.launch_step(model, batch, optimizer, params, cfg, (4, 6), cpu, 1)
    assert outcome.deferred
    # The same step the way it is taken without the device-side flag: check first, then update.
    parts = twin(batch, cfg.loss, (4, 6))
    parts["total"].backward()
    norm = torch.nn.utils.clip_grad_norm_(twin_params, cfg.optim.grad_clip)
    twin_optimizer.step()
    values, grad_norm, applied = outcome.result()
    assert applied and grad_norm == pytest.approx(float(norm), rel=1e-6)
    assert values == {k: float(v.detach()) for k, v in parts.items()}
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))

    state = copy.deepcopy(optimizer.state_dict())
    before = [p.detach().clone() for p in params]
    forward = DistillModel.forward
    try:
        DistillModel.forward = lambda self, b, loss_cfg, grid: {**forward(self, b, loss_cfg, grid),
                                                                "total": forward(self, b, loss_cfg, grid)["total"]
                                                                * float("nan")}
        skipped = step.launch_step(model, batch, optimizer, params, cfg, (4, 6), cpu, 1).result()
    finally:
        DistillModel.forward = forward
    assert skipped[2] is False and math.isnan(skipped[1])
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    after = optimizer.state_dict()
    for key, value in state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after["state"][key][name], value[name]), name


def test_in_flight_reads_outcomes_depth_steps_late_in_order():
    from geod.stage2_distill import step

    def deferred(value):
        return step.StepOutcome(["total"], torch.tensor([1.0, 0.5, value]), deferred=True)

    queue = step.InFlight(2)
    assert queue.add(1, deferred(1.0)) == [] and queue.add(2, deferred(2.0)) == []
    due = queue.add(3, deferred(3.0))
    assert [s for s, _ in due] == [1] and due[0][1].result() == ({"total": 1.0}, 0.5, True)
    assert [s for s, _ in queue.add(4, deferred(4.0))] == [2] and len(queue) == 2
    # An outcome already read (a CPU or multi-rank step) brings every queued one with it, in order.
    done = step.StepOutcome.done({"total": 5.0}, 0.5, True)
    assert [s for s, _ in queue.add(5, done)] == [3, 4, 5] and len(queue) == 0
    queue.add(6, deferred(6.0))
    assert [s for s, _ in queue.drain()] == [6] and queue.drain() == []
    with pytest.raises(ValueError, match="depth"):
        step.InFlight(0)


def test_outcomes_read_late_give_the_same_run(dataset, tmp_path, monkeypatch):
    # With fused AdamW the loop reads a step's outcome run.steps_in_flight steps after queuing it (all of them
    # at checkpoint steps), and logs as it reads them. Reading three steps late and reading at once must end in
    # the same weights and logged losses, count the same skipped step and still abort on a streak of
    # non-finite steps.
    monkeypatch.setattr(train, "make_optimizer", _fused_cpu_optimizer)
    forward = DistillModel.forward
    calls = []

    def poisoned(self, batch, loss_cfg, cv_grid):
        parts = forward(self, batch, loss_cfg, cv_grid)
        calls.append(1)
        if len(calls) % 6 == 3:  # the third step of each run
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(DistillModel, "forward", poisoned)
    late = train.run_distill(_config(dataset, tmp_path / "late", log_every=4, steps_in_flight=3))
    at_once = train.run_distill(_config(dataset, tmp_path / "at-once", log_every=4, steps_in_flight=1))
    assert late.steps == at_once.steps == 6 and late.skipped_steps == at_once.skipped_steps == 1
    assert late.last_losses == at_once.last_losses and set(late.last_losses) == set(train.LOSS_NAMES)
    a, b = (_trainable(list_checkpoints(tmp_path / name)[-1]) for name in ("late", "at-once"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[name], b[name]) for name in a)
    optim = load_file(list_checkpoints(tmp_path / "late")[-1] / "optimizer.safetensors")
    assert all(v.item() == 5.0 for k, v in optim.items() if k.endswith(".step"))

    monkeypatch.setattr(DistillModel, "forward", lambda self, batch, loss_cfg, cv_grid: {
        **forward(self, batch, loss_cfg, cv_grid), "total": torch.tensor(float("inf"), requires_grad=True)})
    cfg = _config(dataset, tmp_path / "inf", steps=5, log_every=10, steps_in_flight=3)
    cfg.optim.max_nonfinite = 2
    with pytest.raises(train.TrainingDiverged, match="2 consecutive"):
        train.run_distill(cfg)
