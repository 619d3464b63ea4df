"""Training on two ranks (torchrun, gloo on the CPU): the ranks stay in step, and a resumed run equals the
unbroken one bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import make_target_dataset

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# Each rank trains, then writes the sha256 of its trainable weights (in parameter order) and its summary.
_RANK_SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path

from geod.stage2_distill import train
from geod.stage2_distill.config import DataConfig, DistillConfig, OptimConfig, RunConfig, StudentConfig

if __name__ == "__main__":
    dataset, out, steps, stop, resume = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    workers = 0
    if sys.argv[6:] == ["auto-workers"]:  # left unset, with ranks that would choose differently
        workers = None
        train.default_workers = lambda world: 1 + int(os.environ["RANK"])
    sessions = []
    setup = train._setup
    train._setup = lambda cfg: sessions.append(setup(cfg)) or sessions[-1]  # keep the rank's model to hash it
    cfg = DistillConfig(
        data=DataConfig(shards=dataset, batch_size=2, workers=workers, shuffle_blocks=2, max_matches=12),
        run=RunConfig(out=out, checkpoint_every=100, log_every=1, progress=False, device="cpu",
                      resume=resume == "resume", stop_after_steps=None if stop == "none" else int(stop)),
        student=StudentConfig(image_size=(32, 48), lora_layers=(2, 3), adapter_dim=8, lora_dropout=0.1),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=steps))
    summary = train.run_distill(cfg)
    digest = hashlib.sha256()
    for param in sessions[-1].params:
        digest.update(param.detach().contiguous().numpy().tobytes())
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": summary.steps, "sha256": digest.hexdigest(),
                                                      "losses": summary.last_losses,
                                                      "workers": sessions[-1].stream.cfg.workers}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(script: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), *args],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_ranks_stay_in_step_and_resume_exactly(tmp_path):
    dataset = make_target_dataset(tmp_path / "targets", pairs=16)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)

    _torchrun(script, str(dataset), str(tmp_path / "unbroken"), "6", "none", "fresh")
    unbroken = _ranks(tmp_path / "unbroken")
    assert unbroken[0]["steps"] == unbroken[1]["steps"] == 6
    assert unbroken[0]["sha256"] == unbroken[1]["sha256"]  # averaged gradients: the ranks never drift apart
    assert (tmp_path / "unbroken" / "adapter").is_dir()  # rank 0 wrote the outputs

    _torchrun(script, str(dataset), str(tmp_path / "broken"), "6", "3", "fresh")
    assert _ranks(tmp_path / "broken")[0]["steps"] == 3
    _torchrun(script, str(dataset), str(tmp_path / "broken"), "6", "none", "resume")
    resumed = _ranks(tmp_path / "broken")
    assert resumed[0]["sha256"] == resumed[1]["sha256"] == unbroken[0]["sha256"]
    assert resumed[0]["losses"] == unbroken[0]["losses"]


@pytest.mark.slow
def test_ranks_agree_on_an_unset_worker_count(tmp_path):
    # Each rank would choose its own count from its CPUs; the data split needs one, so they take the smallest.
    dataset = make_target_dataset(tmp_path / "targets", pairs=16)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    _torchrun(script, str(dataset), str(tmp_path / "auto"), "2", "none", "fresh", "auto-workers")
    ranks = _ranks(tmp_path / "auto")
    assert ranks[0]["workers"] == ranks[1]["workers"] == 1
    assert ranks[0]["sha256"] == ranks[1]["sha256"] and ranks[0]["steps"] == 2
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["data"]["workers"] == 1
