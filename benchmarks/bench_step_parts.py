"""GPU time of single parts of a distillation step, forward + backward, each replayed as a CUDA graph.

The parts a ViT-B step spends its extra time on, each beside the way geod computed it before:
- bottleneck adapter on a float32 residual stream [32, 577, 768] under bf16 autocast: eager, and compiled
  (what `DistillModel.compile_sections` installs);
- bilinear sampling of [32, h, h, 768] channels-last grids at N points: one grid_sample per channel (geod's
  previous sampler) against `model.sample_grid` (four-row gather), eager and compiled; N = 128 keypoints and
  N = 768 cost-volume cells;
- the cost-volume KL in both directions (16 pairs, P = 768, D = 768, K = 32): two `cost_volume_kl` calls
  against `two_way_cost_volume_kl`, eager and compiled;
- the GPU resize of a batch of 32 decoded images (`run.device_resize`), forward only: torch's antialiased
  bicubic `interpolate` against `resize.Resizer` (PIL's bits), eager and compiled, and the lookup-table
  normalisation that follows it, eager and compiled (what `step.BatchMover` runs in a compiled run).

    python benchmarks/bench_step_parts.py [adapters] [sampling] [kl] [resize]
"""

from __future__ import annotations

import sys
import time

import torch
from geod.stage2_distill import losses
from geod.stage2_distill.adapters import Bottleneck
from geod.stage2_distill.model import sample_grid
from geod.stage2_distill.resize import Resizer
from geod.stage2_distill.students import Preprocessing
from torch import nn


def per_channel_grid_sample(grid: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """geod's previous sampler: every channel as its own single-channel image through grid_sample."""
    batch, dim, height, width = grid.shape
    points = xy.shape[1]
    coords = xy.to(grid.dtype) * 2 - 1
    flat = grid.reshape(batch * dim, 1, height, width)
    flat_coords = coords[:, None, :, None, :].expand(batch, dim, points, 1, 2).reshape(batch * dim, points, 1, 2)
    sampled = nn.functional.grid_sample(flat, flat_coords, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    return sampled.reshape(batch, dim, points).transpose(1, 2)


def graph_ms(fn, iters: int = 40) -> float:
    """Milliseconds per replay of fn captured as a CUDA graph (after three eager calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def report(name: str, fn) -> None:
    print(f"| {name} | {graph_ms(fn):.3f} |", flush=True)


def adapters(device: torch.device) -> None:
    tokens = torch.randn(32, 577, 768, device=device, requires_grad=True)
    upstream = torch.randn_like(tokens)
    adapter = Bottleneck(768, 64).to(device)
    nn.init.normal_(adapter.up.weight, std=0.02)

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = adapter(tokens)
        out.backward(upstream)

    def floor() -> None:
        (tokens * 1.0).backward(upstream)

    report("one float32 pass over the residual, fwd+bwd (a floor)", floor)
    report("bottleneck adapter, eager", run)
    adapter.residual = torch.compile(adapter.residual, dynamic=False)
    report("bottleneck adapter, compiled", run)


def sampling(device: torch.device) -> None:
    for points in (128, 768):
        for side in (24, 14):
            grid = torch.randn(32, side, side, 768, device=device, requires_grad=True)
            xy = torch.rand(32, points, 2, device=device)
            upstream = torch.randn(32, points, 768, device=device)
            with torch.no_grad():
                gap = (sample_grid(grid.permute(0, 3, 1, 2), xy)
                       - per_channel_grid_sample(grid.permute(0, 3, 1, 2), xy)).abs().max().item()
            print(f"| N={points}, grid {side}x{side}: max difference {gap:.1e} | |")
            for label, sampler in (("grid_sample per channel", per_channel_grid_sample), ("sample_grid", sample_grid)):
                def run(sampler=sampler) -> None:
                    sampler(grid.permute(0, 3, 1, 2), xy).backward(upstream)
                report(f"N={points}, {side}x{side}, {label}, eager", run)
                report(f"N={points}, {side}x{side}, {label}, compiled", torch.compile(run))


def kl(device: torch.device) -> None:
    pairs, cells, dim, kept = 16, 768, 768, 32
    a = nn.functional.normalize(torch.randn(pairs, cells, dim, device=device), dim=-1).requires_grad_(True)
    b = nn.functional.normalize(torch.randn(pairs, cells, dim, device=device), dim=-1).requires_grad_(True)
    ab = (torch.randint(0, cells, (pairs, cells, kept), device=device),
          torch.rand(pairs, cells, kept, device=device).softmax(-1), torch.rand(pairs, cells, device=device) > 0.2)
    ba = (torch.randint(0, cells, (pairs, cells, kept), device=device),
          torch.rand(pairs, cells, kept, device=device).softmax(-1), torch.rand(pairs, cells, device=device) > 0.2)

    def two_calls() -> None:
        kl_ab = losses.cost_volume_kl(a, b, *ab, temperature=0.05)
        kl_ba = losses.cost_volume_kl(b, a, *ba, temperature=0.05)
        ((kl_ab + kl_ba) / 2).backward()

    def two_way() -> None:
        kl_ab, kl_ba = losses.two_way_cost_volume_kl(a, b, ab, ba, temperature=0.05)
        ((kl_ab + kl_ba) / 2).backward()

    report("KL, two cost_volume_kl calls, eager", two_calls)
    report("KL, two cost_volume_kl calls, compiled", torch.compile(two_calls))
    report("KL, two_way_cost_volume_kl, eager", two_way)
    report("KL, two_way_cost_volume_kl, compiled", torch.compile(two_way))


def resize(device: torch.device) -> None:
    for size, source in ((224, (240, 320)), (384, (480, 640))):
        decoded = torch.randint(0, 256, (32, 3, *source), dtype=torch.uint8, device=device)
        resized = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, device=device)
        prep = Preprocessing(image_size=(size, size), mean=(0.5,) * 3, std=(0.25,) * 3, resample=3)
        table = prep.device_table(device)
        eager, compiled = Resizer((size, size), 3), Resizer((size, size), 3, compile=True)
        equal = torch.equal(compiled(decoded[:2]).cpu(), Resizer((size, size), 3)(decoded[:2].cpu()))
        print(f"| {size} from {source[1]}x{source[0]}: compiled GPU resize equals the CPU's: {equal} | |")
        report(f"{size} from {source[1]}x{source[0]}, interpolate bicubic antialiased (float)",
               lambda: nn.functional.interpolate(decoded.float(), size=(size, size), mode="bicubic", antialias=True))
        report(f"{size} from {source[1]}x{source[0]}, Resizer, eager", lambda: eager(decoded))
        report(f"{size} from {source[1]}x{source[0]}, Resizer, compiled", lambda: compiled(decoded))
        lookup = torch.compile(prep.normalise_tensor, dynamic=False)
        print(f"| {size}: compiled normalisation equals the eager one: "
              f"{torch.equal(lookup(resized, table), prep.normalise_tensor(resized, table))} | |")
        report(f"{size}: lookup-table normalisation, eager", lambda: prep.normalise_tensor(resized, table))
        report(f"{size}: lookup-table normalisation, compiled", lambda: lookup(resized, table))


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_step_parts needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # as `geod distill` runs its loop (run.tf32)
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| part, forward + backward | ms |\n|---|---|")
    for part in sys.argv[1:] or ["adapters", "sampling", "kl", "resize"]:
        started = time.perf_counter()
        {"adapters": adapters, "sampling": sampling, "kl": kl, "resize": resize}[part](device)
        print(f"({part}: {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
