"""The training step captured as a CUDA graph: when it is used, and that replays train as the eager step does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset, random_batch
from geod.stage2_distill import step, train
from geod.stage2_distill.checkpoint import list_checkpoints
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.graphed_step import GraphedStep, StaticInputs, batch_signature, graph_step_possible
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.packing import pack_batch
from geod.stage2_distill.students import create_student
from safetensors.torch import load_file

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(name: str = "tiny-clip", device: str = "cpu", **student) -> tuple[DistillModel, DistillConfig]:
    scfg = StudentConfig(name_or_path=name, image_size=(32, 48) if name == "tiny-clip" else None,
                         lora_layers=(2, 3), adapter_dim=8, **student)
    cfg = DistillConfig(data=DataConfig(shards="unused"), run=RunConfig(out="unused"), student=scfg,
                        optim=OptimConfig(lr=1e-3, warmup_steps=0))
    torch.manual_seed(0)
    model = create_student(scfg)
    resolved = scfg.resolved(model.num_layers, model.image_size, is_vlm=model.is_vlm)
    distill = DistillModel(model, resolved).to(device).train()
    with torch.no_grad():  # non-zero heads, so every trainable tensor gets a gradient from the first step
        distill.refine.conv.weight.normal_(std=0.05)
    return distill, cfg


def _fused(params, device="cpu"):
    return torch.optim.AdamW(params, lr=1e-3, fused=True) if device == "cpu" else \
        step.make_optimizer(params, OptimConfig(lr=1e-3, warmup_steps=0), torch.device(device))


def test_graph_capture_is_chosen_only_where_the_whole_step_stays_on_the_device():
    model, cfg = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    fused, plain = _fused(params), torch.optim.AdamW(params, lr=1e-3)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graph_step_possible(cfg, cuda, 1, model, fused)[0]  # decided from the settings; nothing runs
    assert graph_step_possible(cfg, cpu, 1, model, fused) == (False, "not on CUDA")
    assert "several ranks" in graph_step_possible(cfg, cuda, 2, model, fused)[1]
    assert "fused AdamW" in graph_step_possible(cfg, cuda, 1, model, plain)[1]
    off = DistillConfig(data=cfg.data, run=RunConfig(out="unused", cuda_graphs=False), student=cfg.student)
    assert graph_step_possible(off, cuda, 1, model, fused) == (False, "run.cuda_graphs is off")
    qwen, qcfg = _model("tiny-qwen2_5_vl")
    qparams = [p for p in qwen.parameters() if p.requires_grad]
    possible, why = graph_step_possible(qcfg, cuda, 1, qwen, _fused(qparams))
    assert not possible and "qwen2_5_vl" in why
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStep(model, fused, params, cfg, (4, 6), cpu)


def test_batch_signature_names_every_tensor_shape_and_dtype():
    batch = random_batch(2, 6, 24, 4, "cpu")
    batch["pair_id"] = ["a", "b"]
    signature = batch_signature(batch)
    assert [key for key, _, _ in signature[0]] == sorted(k for k in batch if k != "pair_id")
    assert batch_signature({**batch, "pair_id": ["c", "d"]}) == signature
    assert batch_signature(random_batch(2, 7, 24, 4, "cpu")) != signature
    assert batch_signature({**batch, "mask": batch["mask"].to(torch.uint8)}) != signature
    # The same tensors laid out otherwise (one of two views of a buffer now a tensor of its own) is another batch.
    assert batch_signature({**batch, "cv_ba_prob": batch["cv_ba_prob"].clone()}) != signature


def _packed(seed: int) -> dict:
    arrays = {k: v.numpy() for k, v in random_batch(2, 6, 24, 4, "cpu", seed=seed).items() if k not in
              ("pixel_a", "pixel_b")}
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 3, 8, 12), dtype=np.uint8)
    return pack_batch(arrays, pixels, ["a", "b"]).unpack("cpu")


def test_static_inputs_copy_a_packed_batch_buffer_by_buffer():
    first, second = _packed(0), _packed(1)
    assert batch_signature(first) == batch_signature(second)
    static = StaticInputs(first)
    # The sixteen tensors of a packed batch lie in two buffers (targets, pixels); so do their static copies.
    assert len(static._buffers) == 2 and static._separate == []
    tensors = [k for k in first if torch.is_tensor(first[k])]
    assert len(tensors) == 16 and len({static.values[k].untyped_storage().data_ptr() for k in tensors}) == 2
    assert all(torch.equal(static.values[k], first[k]) for k in tensors) and static.values["pair_id"] == ["a", "b"]
    assert all(static.values[k].data_ptr() != first[k].data_ptr() for k in tensors)  # copies, not the batch
    static.copy_from(second)
    assert all(torch.equal(static.values[k], second[k]) for k in tensors)
    assert not torch.equal(static.values["pixel_a"], first["pixel_a"])

    # A tensor that is not contiguous gets a static tensor of its own, copied by itself.
    strided = {"grid": torch.arange(24.0).reshape(4, 6).t(), "mask": torch.ones(3, dtype=torch.bool)}
    static = StaticInputs(strided)
    assert static._separate == ["grid"] and len(static._buffers) == 1
    static.copy_from({"grid": -strided["grid"], "mask": torch.zeros(3, dtype=torch.bool)})
    assert torch.equal(static.values["grid"], -strided["grid"]) and not static.values["mask"].any()
    # Nor is a small view of a large buffer copied with the whole buffer.
    large = torch.arange(100.0)
    static = StaticInputs({"few": large[10:20]})
    assert static._separate == ["few"] and static.values["few"].untyped_storage().nbytes() == 40
    static.copy_from({"few": large[30:40]})
    assert torch.equal(static.values["few"], large[30:40])


def _model_and_twin():
    """A CUDA model, an identical copy, the config, and each one's trainable parameters with a fused AdamW."""
    model, cfg = _model(device="cuda")
    twin = copy.deepcopy(model)
    trained = []
    for each in (model, twin):
        params = [p for p in each.parameters() if p.requires_grad]
        trained.append((params, _fused(params, "cuda")))
    return model, twin, cfg, *trained


def _updates(after: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(a - b).reshape(-1).float() for a, b in zip(after, before)])


@pytest.mark.gpu
@needs_cuda
def test_replayed_steps_train_as_the_eager_steps_do_and_skip_non_finite_batches():
    device = torch.device("cuda")
    model, twin, cfg, (params, optimizer), (twin_params, twin_optimizer) = _model_and_twin()
    start = [p.detach().clone() for p in params]
    graphed = GraphedStep(model, optimizer, params, cfg, (4, 6), device, warmup=2)
    batches = [random_batch(3, 16, 24, 4, device, seed=i) for i in range(7)]
    odd = random_batch(3, 12, 24, 4, device, seed=99)  # another match count: eager, the graph is kept
    poisoned = dict(random_batch(3, 16, 24, 4, device, seed=50))
    poisoned["depth_a"] = poisoned["depth_a"] * float("nan")
    order = batches[:4] + [odd] + batches[4:6] + [poisoned] + batches[6:]
    outcomes, twin_outcomes = [], []
    for number, batch in enumerate(order):
        rate = 1e-3 * (number + 1) / len(order)  # a changing learning rate reaches the graph
        for group in optimizer.param_groups + twin_optimizer.param_groups:
            group["lr"] = rate
        outcomes.append(graphed(batch))
        twin_outcomes.append(step.launch_step(twin, batch, twin_optimizer, twin_params, cfg, (4, 6), device, 1))
    assert graphed.failure is None
    assert graphed.replays == 6 and graphed.eager_steps == 3  # 2 warm-up steps, the odd batch
    for ours, theirs in zip(outcomes, twin_outcomes):
        values, norm, applied = ours.result()
        twin_values, twin_norm, twin_applied = theirs.result()
        assert applied == twin_applied
        if applied:
            assert norm == pytest.approx(twin_norm, rel=1e-3)
            for name, value in values.items():
                assert value == pytest.approx(twin_values[name], rel=1e-3, abs=1e-5), name
    assert [o.result()[2] for o in outcomes] == [True] * 7 + [False] + [True]
    moved, twin_moved = _updates(params, start), _updates(twin_params, start)
    assert moved.abs().max() > 0
    assert (moved - twin_moved).norm() <= 1e-3 * twin_moved.norm()
    for ours, theirs in zip(optimizer.state_dict()["state"].values(), twin_optimizer.state_dict()["state"].values()):
        assert float(ours["step"]) == float(theirs["step"]) == 8  # the skipped step did not count
    assert all(group["lr"] == 1e-3 * 9 / 9 and group["capturable"] is False for group in optimizer.param_groups)


@pytest.mark.gpu
@needs_cuda
def test_geod_distill_on_cuda_replays_its_step_and_matches_the_eager_run(tmp_path):
    dataset = make_target_dataset(tmp_path / "targets", pairs=16)

    def run(name: str, graphs: bool):
        cfg = DistillConfig(
            # Loader workers: the capture happens while the pin-memory thread is busy with the next batches.
            data=DataConfig(shards=str(dataset), batch_size=3, workers=2, shuffle_blocks=2, max_matches=12),
            run=RunConfig(out=tmp_path / name, checkpoint_every=100, log_every=4, progress=False,
                          cuda_graphs=graphs),
            student=StudentConfig(image_size=(32, 48), lora_layers=(2, 3), adapter_dim=8),
            optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=8))
        return train.run_distill(cfg)

    graphed, eager = run("graphed", True), run("eager", False)
    assert graphed.step_mode.startswith("CUDA graph, 6 replayed and 2 eager")
    assert eager.step_mode == "eager (run.cuda_graphs is off)"
    assert graphed.steps == eager.steps == 8 and graphed.skipped_steps == eager.skipped_steps == 0
    a, b = (load_file(list_checkpoints(tmp_path / name)[-1] / "trainable.safetensors") for name in ("graphed", "eager"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key


@pytest.mark.gpu
@needs_cuda
def test_early_losses_on_a_side_stream_train_as_one_section_does_eager_and_replayed():
    device = torch.device("cuda")
    model, twin, cfg, (params, optimizer), (twin_params, twin_optimizer) = _model_and_twin()
    model.overlap_early_losses(torch.cuda.Stream(device))
    assert model._early_block(cfg.loss) == 1 and twin._early_block(cfg.loss) is None
    start = [p.detach().clone() for p in params]
    graphed = GraphedStep(model, optimizer, params, cfg, (4, 6), device, warmup=2)
    for seed in range(6):
        batch = random_batch(3, 16, 24, 4, device, seed=seed)
        ours, theirs = graphed(batch).result(), step.launch_step(twin, batch, twin_optimizer, twin_params, cfg,
                                                                 (4, 6), device, 1).result()
        assert ours[2] and theirs[2]
        assert ours[1] == pytest.approx(theirs[1], rel=1e-4)
        for name, value in ours[0].items():
            assert value == pytest.approx(theirs[0][name], rel=1e-4, abs=1e-6), name
    assert graphed.failure is None and graphed.replays == 4 and graphed.eager_steps == 2
    moved, twin_moved = _updates(params, start), _updates(twin_params, start)
    assert moved.abs().max() > 0
    assert (moved - twin_moved).norm() <= 1e-4 * twin_moved.norm()
