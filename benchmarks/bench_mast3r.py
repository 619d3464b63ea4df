"""Speed and memory of the MASt3R teacher network and matcher (random weights, no downloads).

    python benchmarks/bench_mast3r.py                      # full size, 512x384, batch 32, CUDA
    python benchmarks/bench_mast3r.py --forwards asym,teacher --modes bf16-bf16,bf16-tf32,fp32 \
        --compile default --compiled-modes bf16-bf16 --json out.json
    python benchmarks/bench_mast3r.py --device cpu --tiny --batch 2 --iters 1 --modes fp32,bf16-bf16 \
        --strides 4 --kernels torch                        # smoke test

Modes (precision of the encoder/decoder trunk - of the heads): bf16 (bf16 autocast trunk with SDPA, exact
float32 heads), bf16-tf32 (TF32 heads: what the official code does on CUDA), bf16-mixed (descriptor MLP
in bf16, DPT in TF32: the teacher's default on CUDA), bf16-bf16 (bf16 autocast heads, float32
activations), fp32 (everything exact float32), tf32 (float32 with TF32 everywhere).
Forwards: asym (one (A, B) forward with the cost volume: what the official 48 pairs/s measures), symmetric
(`forward_symmetric`: (A, B) and (B, A) in full) and teacher (`forward_teacher`: what the teacher runs,
the (A, B) outputs plus B's own-frame points). --compile MODE then torch.compiles the blocks and times
--compiled-modes again. The DPT heads are stored channels-last on CUDA, as the teacher does.

Reported per case: pairs/s, ms per batch, peak GPU memory, MFU (nominal 2.0 TFLOP per pair for asym,
3.0 for symmetric and teacher, against --peak-tflops); then each mode's agreement with fp32 (descriptor
cosine, point / depth / confidence relative error, cost-volume difference, match-set overlap) and the
matcher's time per pair amortised over the batch, per kernel (fused Triton / blocked torch), with the
number of pairs whose match sets differ between the kernels. Random weights make the agreement numbers
indicative only: rerun with --weights for the real checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.matching import MatchConfig, reciprocal_matches
from geod.stage1_extract.mast3r.network import Mast3rNet, compile_blocks, heads_channels_last

# mode -> (autocast dtype of the encoder/decoder, head precision, TF32 in a float32 trunk)
MODES = {"bf16": (torch.bfloat16, "fp32", False), "bf16-tf32": (torch.bfloat16, "tf32", False),
         "bf16-mixed": (torch.bfloat16, "mixed", False), "bf16-bf16": (torch.bfloat16, "bf16", False), "fp32": (None, "fp32", False),
         "tf32": (None, "tf32", True)}
FLOP_PER_PAIR = {"asym": 2.0e12, "symmetric": 3.0e12, "teacher": 3.0e12}


def build_model(args, device: torch.device) -> Mast3rNet:
    if args.weights:
        from geod.stage1_extract.mast3r.checkpoint import load_mast3r  # noqa: PLC0415

        return load_mast3r(args.weights, device=device).model
    cfg = Mast3rConfig.tiny() if args.tiny else Mast3rConfig()
    with torch.device("meta"):
        model = Mast3rNet(cfg)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():  # random weights drawn on the device (fast); scaled so activations stay O(1)
        for name, param in model.named_parameters():
            if param.ndim >= 2 and name != "mask_token":
                param.normal_(0.0, 1.0 / param[0].numel() ** 0.5, generator=gen)
            elif name.endswith("weight") and "norm" in name:
                param.normal_(1.0, 0.1, generator=gen)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for head in (model.downstream_head1, model.downstream_head2):
            head.dpt.head[-1].weight.mul_(0.2)  # raw point norms ~1-2: points of a few metres, as trained
    if device.type == "cuda":
        heads_channels_last(model)
    return model


def smooth_images(batch: int, height: int, width: int, seed: int, device) -> torch.Tensor:
    """Random images with structure at several scales (pure noise would make matching degenerate)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.zeros(batch, 3, height, width)
    for cells in (4, 16, 64):
        coarse = torch.rand(batch, 3, max(1, height // cells), max(1, width // cells), generator=gen)
        out += torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    out = out / 3 * 2 - 1
    return out.to(device)


def run_network(model, img_a, img_b, args, forward, amp_dtype, head_precision):
    kwargs = dict(cost_temperature=args.temperature, amp_dtype=amp_dtype, head_precision=head_precision)
    if forward == "symmetric":
        return model.forward_symmetric(img_a, img_b, **kwargs)[0]
    if forward == "teacher":
        return model.forward_teacher(img_a, img_b, **kwargs)[0]
    return model(img_a, img_b, **kwargs)


def timed(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, object]:
    for _ in range(warmup):
        result = fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        result = fn()
    sync(device)
    return (time.perf_counter() - start) / iters, result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(enabled: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def agreement(fast, ref, matches_fast, matches_ref) -> dict:
    cos = torch.nn.functional.cosine_similarity(fast.desc_a.float(), ref.desc_a.float(), dim=-1)
    rel_pts = ((fast.pts3d_a - ref.pts3d_a).norm(dim=-1) / ref.pts3d_a.norm(dim=-1).clamp(min=1e-6))
    rel_conf = ((fast.conf_a - ref.conf_a).abs() / ref.conf_a)
    z_ref = ref.pts3d_a[..., 2]
    rel_depth = (fast.pts3d_a[..., 2] - z_ref).abs() / z_ref.abs().clamp(min=1e-6)
    overlap = []
    for mf, mr in zip(matches_fast, matches_ref):
        ref_set = set(zip(mr.idx_a.tolist(), mr.idx_b.tolist()))
        fast_set = set(zip(mf.idx_a.tolist(), mf.idx_b.tolist()))
        overlap.append(len(ref_set & fast_set) / max(1, len(ref_set)))
    return {"desc_cosine_mean": float(cos.mean()), "desc_cosine_p01": float(cos.flatten().float().quantile(0.01)),
            "pts3d_median_rel_err": float(rel_pts.median()), "depth_median_rel_err": float(rel_depth.median()),
            "conf_median_rel_err": float(rel_conf.median()),
            "cost_max_abs_diff": float((fast.cost_ab - ref.cost_ab).abs().max()),
            "match_overlap_mean": sum(overlap) / len(overlap), "match_overlap_min": min(overlap)}


def time_case(model, img_a, img_b, args, device, forward: str, mode: str) -> tuple[dict, object]:
    amp_dtype, head_precision, trunk_tf32 = MODES[mode]
    if device.type == "cuda":
        set_tf32(trunk_tf32)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        start = time.perf_counter()
        run_network(model, img_a, img_b, args, forward, amp_dtype, head_precision)  # first call (compiles)
        sync(device)
        first = time.perf_counter() - start
        seconds, out = timed(lambda: run_network(model, img_a, img_b, args, forward, amp_dtype, head_precision),
                             args.iters, max(0, args.warmup - 1), device)
    batch = len(img_a)
    entry = {"forward": forward, "mode": mode, "batch": batch, "pairs_per_s": batch / seconds,
             "ms_per_batch": seconds * 1e3, "first_call_s": first,
             "mfu": batch / seconds * FLOP_PER_PAIR[forward] / (args.peak_tflops * 1e12)}
    if device.type == "cuda":
        entry["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        set_tf32(False)
    return entry, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--weights", default=None, help="real checkpoint instead of random weights")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--modes", default="bf16-tf32,bf16-bf16,fp32", help=f"comma list of {sorted(MODES)}")
    parser.add_argument("--forwards", default="asym,teacher", help="comma list of asym, symmetric, teacher")
    parser.add_argument("--compile", default=None, help="torch.compile mode for the blocks, then time "
                                                        "--compiled-modes again")
    parser.add_argument("--compiled-modes", default="bf16-bf16")
    parser.add_argument("--compiled-forwards", default=None, help="default: --forwards")
    parser.add_argument("--compiled-batches", default="", help="extra batch sizes for the compiled modes")
    parser.add_argument("--temperature", type=float, default=1.0, help="cost volume softmax temperature")
    parser.add_argument("--strides", default="16,8", help="matcher seed strides to time")
    parser.add_argument("--kernels", default="triton,torch", help="matcher kernels to time")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = build_model(args, device)

    def inputs(batch):
        img_a = smooth_images(batch, args.height, args.width, args.seed, device)
        return img_a, torch.roll(img_a, shifts=24, dims=3)

    img_a, img_b = inputs(args.batch)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": "tiny" if args.tiny else "full",
              "weights": args.weights or "random", "batch": args.batch, "size": [args.height, args.width],
              "network": []}
    outputs = {}
    for mode in args.modes.split(","):
        for forward in args.forwards.split(","):
            entry, out = time_case(model, img_a, img_b, args, device, forward, mode)
            report["network"].append(entry)
            outputs.setdefault(mode, out)
            print(f"network eager {json.dumps(entry)}", flush=True)
    if args.compile:
        start = time.perf_counter()
        compile_blocks(model, args.compile)
        for mode in args.compiled_modes.split(","):
            for batch in [args.batch, *(int(b) for b in args.compiled_batches.split(",") if b)]:
                a, b = (img_a, img_b) if batch == args.batch else inputs(batch)
                for forward in (args.compiled_forwards or args.forwards).split(","):
                    entry, out = time_case(model, a, b, args, device, forward, mode)
                    entry["compile"] = args.compile
                    report["network"].append(entry)
                    if batch == args.batch:
                        outputs.setdefault(f"{mode}+compile", out)
                    print(f"network compiled {json.dumps(entry)}", flush=True)
        report["compile_and_compiled_timing_s"] = time.perf_counter() - start

    report["matcher"] = {}
    base = next(iter(outputs.values()))
    for stride in (int(s) for s in args.strides.split(",")):
        results = {}
        for kernel in args.kernels.split(","):
            cfg = MatchConfig(stride=stride, kernel=kernel)
            with torch.inference_mode():
                seconds, matches = timed(lambda: reciprocal_matches(base.desc_a, base.desc_b, base.conf_a,
                                                                    base.conf_b, cfg=cfg), args.iters, 1, device)
            results[kernel] = matches
            counts = [len(m.idx_a) for m in matches]
            key = f"stride{stride}_{kernel}"
            report["matcher"][key] = {"ms_per_pair": seconds * 1e3 / len(matches),
                                      "matches_per_pair_mean": sum(counts) / len(counts)}
            print(f"matcher {key}: {report['matcher'][key]}", flush=True)
        if len(results) > 1:
            first, *others = results.values()
            differ = sum(any(not (torch.equal(m.idx_a, o[i].idx_a) and torch.equal(m.idx_b, o[i].idx_b))
                             for o in others) for i, m in enumerate(first))
            report["matcher"][f"stride{stride}_pairs_differing_between_kernels"] = differ
            print(f"matcher stride{stride}: pairs whose match sets differ between kernels: {differ}", flush=True)

    report["agreement_with_fp32"] = {}
    if "fp32" in outputs:
        cfg = MatchConfig()
        ref = outputs["fp32"]
        with torch.inference_mode():
            m_ref = reciprocal_matches(ref.desc_a, ref.desc_b, ref.conf_a, ref.conf_b, cfg=cfg)
            for mode, out in outputs.items():
                if mode == "fp32":
                    continue
                m_fast = reciprocal_matches(out.desc_a, out.desc_b, out.conf_a, out.conf_b, cfg=cfg)
                report["agreement_with_fp32"][mode] = agreement(out, ref, m_fast, m_ref)
                print(f"{mode} vs fp32: {report['agreement_with_fp32'][mode]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
