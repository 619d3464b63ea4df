"""Throughput of a whole `geod extract --teacher mast3r` run against the network alone (random weights by
default or `--weights`; synthetic images).

    python benchmarks/bench_extract_mast3r.py --json out.json                   # full size on CUDA
    python benchmarks/bench_extract_mast3r.py --device cpu --tiny --pairs 24 --batch 4 --long-side 64 \
        --variants none:2:2 --check-pairs 12                                     # smoke test

Steps, in one process with one teacher:
1. writes `--images` smooth random 640x480 JPEGs (quality 95) and a manifest of `--pairs` pairs of them
   into a temporary directory;
2. network only: `forward_teacher` (what the teacher runs) on one batch of the prepared images;
3. teacher only: `Mast3rTeacher.predict` on prepared pairs (network + matching + cost volume + copies);
4. the whole extraction (`run_extract`: decode, prepare, predict, build targets, compress, hash, write,
   finalise) with the default layout (256 pairs per shard), wall-clock from start to card;
   --variants COMPILE:WORKERS:LOADERS[:IN_FLIGHT],... repeats 2-4 per variant, in order (compiling the blocks in
   place when a variant names a torch.compile mode; "none" variants must come first; WORKERS target-building
   threads, LOADERS loader processes, 0 = loading in the threads);
5. with --check-pairs N: extracts the first N pairs twice, serially (one loader, one predict at a time, one
   writer) and with the benchmark's parallel settings, and checks that every file is byte-identical.
Reports pairs/s of each, the extraction's share of the network-only throughput, and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_images(root: Path, count: int, width: int, height: int, seed: int) -> list[str]:
    """Smooth random RGB images with detail at a few scales, as JPEG; returns paths relative to root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    refs = []
    for i in range(count):
        image = np.zeros((height, width, 3), np.float32)
        for cells, weight in ((8, 0.5), (32, 0.3), (128, 0.2)):
            coarse = rng.uniform(0, 255, (max(1, height * cells // width), cells, 3)).astype(np.uint8)
            image += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                                         np.float32)
        ref = f"scene{i // 16:02d}/color/{i % 16}.jpg"
        (root / ref).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / ref, quality=95)
        refs.append(ref)
    return refs


def write_pairs(root: Path, refs: list[str], n_pairs: int, name: str) -> Path:
    from geod.data_manifests.manifest import write_manifest

    rows = []
    for n in range(n_pairs):
        a = n % len(refs)
        b = (a // 16) * 16 + (a % 16 + 1 + (n // len(refs)) % 15) % 16  # another frame of the same scene
        b = min(b, len(refs) - 1) if b != a else (a + 1) % len(refs)
        rows.append({"pair_id": f"p{n:05d}", "scene_id": refs[a].split("/")[0], "image_a": refs[a],
                     "image_b": refs[b], "split": "train"})
    return write_manifest(rows, root / name)


def record_times(out: Path) -> list[float]:
    """When each shard record was written, in order."""
    return sorted(p.stat().st_mtime for p in (out / "shards").glob("shard-*.json"))


def steady_rate(stamps: list[float], pairs_per_shard: int) -> float | None:
    """Pairs/s between the first and the last shard record written (start-up and the tail left out)."""
    if len(stamps) < 3 or stamps[-1] <= stamps[0]:
        return None
    return (len(stamps) - 1) * pairs_per_shard / (stamps[-1] - stamps[0])


class UtilisationSampler:
    """Mean GPU utilisation (NVML's share of time a kernel ran) sampled every 0.1 s in a thread."""

    def __init__(self, device) -> None:
        import threading

        import torch

        self.samples: list[int] = []
        self.done = threading.Event()

        def sample() -> None:
            while not self.done.wait(0.1):
                try:
                    self.samples.append(torch.cuda.utilization(device))
                except Exception:  # noqa: BLE001 - no NVML: report None
                    return

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        return sum(self.samples) / len(self.samples) if self.samples else None


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--weights", default="random",
                        help="the teacher's weights: a checkpoint file, folder or hub id (default: seeded random)")
    parser.add_argument("--pairs", type=int, default=1536)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument("--write-workers", type=int, default=3)
    parser.add_argument("--head-precision", default="auto", help="the teacher option (auto = mixed on CUDA)")
    parser.add_argument("--variants", default="default:4:6",
                        help="comma list of COMPILE:WORKERS:LOADERS[:IN_FLIGHT] (COMPILE none or a torch.compile "
                             "mode; LOADERS the runner's load_processes; IN_FLIGHT its predict_in_flight)")
    parser.add_argument("--match-stride", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--check-pairs", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from geod.data_manifests.manifest import load_manifest
    from geod.data_manifests.views import load_pair
    from geod.pipeline.card import DatasetLayout
    from geod.stage1_extract.mast3r.network import compile_blocks
    from geod.stage1_extract.mast3r.preprocess import to_network_input
    from geod.stage1_extract.mast3r.teacher import Mast3rTeacher
    from geod.stage1_extract.runner import ExtractConfig, run_extract

    device = torch.device(args.device)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="geod-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "cpus": os.cpu_count(), "config": vars(args) | {"workdir": str(work)}}
    cuda = device.type == "cuda"

    start = time.perf_counter()
    refs = write_images(work, args.images, 640, 480, seed=0)
    manifest_path = write_pairs(work, refs, args.pairs, "pairs.parquet")
    report["inputs_s"] = time.perf_counter() - start

    layout = DatasetLayout()
    teacher = Mast3rTeacher(weights=args.weights, size="tiny" if args.tiny else "full", device=args.device,
                            batch_size=args.batch, long_side=args.long_side, head_precision=args.head_precision,
                            match_stride=args.match_stride, compile="none",  # compiled per variant below
                            **Mast3rTeacher.layout_options(layout))
    if args.weights == "random":
        with torch.no_grad():  # raw point norms ~1-2: points of a few metres, as the trained heads give
            for head in (teacher.model.downstream_head1, teacher.model.downstream_head2):
                head.dpt.head[-1].weight.mul_(0.2)
    manifest = load_manifest(manifest_path)
    pairs = [teacher.prepare(load_pair(row, manifest.base_dir)) for row in manifest.rows[:args.batch]]
    start = time.perf_counter()
    for row in manifest.rows[:args.batch]:
        teacher.prepare(load_pair(row, manifest.base_dir))
    report["load_and_prepare_ms_per_pair_one_thread"] = (time.perf_counter() - start) / args.batch * 1e3

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    net = teacher.model.cfg
    img_a = to_network_input([p.view_a.image for p in pairs], net.image_mean, net.image_std, device)
    img_b = to_network_input([p.view_b.image for p in pairs], net.image_mean, net.image_std, device)
    kwargs = dict(cost_temperature=teacher.cfg.cost_temperature, amp_dtype=teacher.amp_dtype,
                  head_precision=teacher.head_precision)

    def extract(manifest_file: Path, out: Path, *, workers: int, loaders: int = 0, serial: bool = False,
                pairs_per_shard: int | None = None, in_flight: int | None = None) -> float:
        shutil.rmtree(out, ignore_errors=True)
        shard_layout = layout if pairs_per_shard is None else DatasetLayout(pairs_per_shard=pairs_per_shard)
        cfg = ExtractConfig(pairs=manifest_file, out=out, teacher="mast3r", layout=shard_layout,
                            batch_size=args.batch, workers=1 if serial else workers,
                            load_processes=0 if serial else loaders,
                            write_workers=1 if serial else args.write_workers, progress=False,
                            predict_in_flight=in_flight)
        teacher.concurrent_predict = not serial  # instance attribute: the runner reads it
        sampler = UtilisationSampler(device) if cuda else None
        begin, begin_wall = time.perf_counter(), time.time()
        summary = run_extract(cfg, teacher=teacher)
        seconds, end_wall = time.perf_counter() - begin, time.time()
        if sampler is not None:
            last_gpu_utilisation[:] = [sampler.stop()]
        stamps = record_times(out)
        last_waits[:] = [summary.waits, steady_rate(stamps, shard_layout.pairs_per_shard),
                         {"first_shard_s": stamps[0] - begin_wall, "after_last_shard_s": end_wall - stamps[-1]}
                         if stamps else None]
        del teacher.concurrent_predict
        if summary.ok != summary.pairs:
            raise SystemExit(f"{summary.failed} pairs failed")
        return seconds

    last_gpu_utilisation: list[float | None] = [None]
    last_waits: list = [None, None, None]
    report["variants"] = []
    compiled = "none"
    for variant in args.variants.split(","):
        mode, workers, loaders, *in_flight = variant.split(":")
        workers, loaders, in_flight = int(workers), int(loaders), (int(in_flight[0]) if in_flight else None)
        entry = {"compile": mode, "workers": workers, "load_processes": loaders, "write_workers": args.write_workers,
                 "predict_in_flight": in_flight}
        if mode != compiled:
            if compiled != "none":
                raise SystemExit("--variants: list the 'none' variants first, then one compile mode")
            compile_blocks(teacher.model, mode)
            compiled = mode
        # warm-up (compilation, kernel selection), then the network alone on one batch
        start = time.perf_counter()
        teacher.predict(pairs)
        sync()
        entry["first_predict_s"] = time.perf_counter() - start
        with torch.inference_mode():
            teacher.model.forward_teacher(img_a, img_b, **kwargs)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                teacher.model.forward_teacher(img_a, img_b, **kwargs)
            sync()
        network = args.batch * args.iters / (time.perf_counter() - start)
        entry["network_pairs_per_s"] = network
        start = time.perf_counter()
        for _ in range(args.iters):
            teacher.predict(pairs)
        entry["predict_pairs_per_s"] = args.batch * args.iters / (time.perf_counter() - start)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = extract(manifest_path, work / "out", workers=workers, loaders=loaders, in_flight=in_flight)
        entry.update(extract_pairs_per_s=args.pairs / seconds, extract_s=seconds,
                     gpu_utilisation_mean=last_gpu_utilisation[0], main_loop_waits_s=last_waits[0],
                     steady_pairs_per_s=last_waits[1], start_and_end=last_waits[2],
                     extract_over_network=args.pairs / seconds / network,
                     dataset_bytes=sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file()))
        if cuda:
            entry["extract_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        report["variants"].append(entry)
        print(f"variant {variant}: network only (forward_teacher) {network:.1f} pairs/s, teacher.predict "
              f"{entry['predict_pairs_per_s']:.1f} pairs/s, whole extraction {entry['extract_pairs_per_s']:.1f} "
              f"pairs/s ({seconds:.1f} s for {args.pairs} pairs) = {100 * entry['extract_over_network']:.1f} % "
              f"of the network-only throughput; GPU busy {entry['gpu_utilisation_mean']}; between the first and "
              f"the last shard published {entry['steady_pairs_per_s']} pairs/s; main loop waits "
              f"{entry['main_loop_waits_s']}; {entry['start_and_end']}", flush=True)
        print(json.dumps(entry), flush=True)

    if args.check_pairs:
        from geod.pipeline.validate import validate_dataset

        small = write_pairs(work, refs, args.check_pairs, "check.parquet")
        per_shard = max(layout.rows_per_chunk, args.check_pairs // 3 // layout.rows_per_chunk * layout.rows_per_chunk)
        serial_s = extract(small, work / "serial", workers=1, serial=True, pairs_per_shard=per_shard)
        parallel_s = extract(small, work / "parallel", workers=workers, loaders=loaders, pairs_per_shard=per_shard,
                             in_flight=in_flight)
        same = files_of(work / "serial") == files_of(work / "parallel")
        problems = validate_dataset(work / "parallel")
        report["check"] = {"pairs": args.check_pairs, "pairs_per_shard": per_shard, "byte_identical": same,
                           "validate_problems": problems[:5], "serial_pairs_per_s": args.check_pairs / serial_s,
                           "parallel_pairs_per_s": args.check_pairs / parallel_s}
        print(f"serial vs parallel extraction byte-identical: {same}; validate problems: {len(problems)}; "
              f"serial {args.check_pairs / serial_s:.1f} pairs/s, parallel {args.check_pairs / parallel_s:.1f}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
