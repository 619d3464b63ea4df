"""Checkpoint RNG handling: only the current CUDA device's generator is saved and restored."""

from __future__ import annotations

import torch
from geod.stage2_distill.checkpoint import TrainState, load_checkpoint, save_checkpoint
from geod.stage2_distill.config import StudentConfig
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.students import create_student


def test_checkpoint_touches_only_the_current_cuda_device(tmp_path, monkeypatch):
    # get/set_rng_state_all would open a CUDA context on every visible GPU (every other rank's, under
    # torchrun); a checkpoint must use the current device's generator alone, and restore it exactly.
    def forbidden(*args, **kwargs):
        raise AssertionError("touches every CUDA device")

    saved_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", forbidden)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))

    student = create_student(StudentConfig(name_or_path="tiny-clip"))
    cfg = StudentConfig(lora_layers=(3,), adapter_dim=4).resolved(student.num_layers, student.image_size)
    model = DistillModel(student, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    config = {"student": {"lora_layers": [3]}}
    path = save_checkpoint(tmp_path, model, optimizer, TrainState(step=3, epoch=1, batch=2), config, keep=1)
    state = load_checkpoint(path, model, optimizer, config)
    assert (state.step, state.epoch, state.batch) == (3, 1, 2)
    assert len(restored) == 1 and torch.equal(restored[0], saved_state)
