"""The training loader's image work: full against reduced JPEG decoding, per image and as a loader rate.

(a) per image, one process: read bytes -> decode -> resize to the student's size, as uint8 (what the workers
    send on CUDA), for photo-sized JPEGs (640x480 and ScanNet's 1296x968, quality 90, smooth colour noise with
    grain) at square student sizes; "full" decodes every pixel, "reduced" lets libjpeg's DCT scaling shrink
    the decode first (`data.reduced_decode`). Also how far apart the two results are, in uint8 levels.
(b) the DataLoader's rate in pairs/s, nothing on a GPU: `PairStream` over a synthetic target dataset with
    real JPEGs on disk (bench_distill_step's), packed uint8 batches of 16 pairs, with `--workers` workers
    (default: what `geod distill` chooses): full decoding, reduced decoding, and reduced decoding with the
    resize left to the consumer (`run.device_resize`; the consumer's GPU resize is not part of this rate).

    python benchmarks/bench_loader.py [--sizes 224,336,384,448] [--workers N] [--pairs 512] [--image 480x640]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _per_image(sources: list[tuple[int, int]], sizes: list[int], repeats: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from bench_distill_step import _image
    from geod.data_manifests.views import decode_image, open_rgb
    from geod.stage2_distill.students import Preprocessing

    rows = []
    for height, width in sources:
        data = [_image(seed, height, width) for seed in range(4)]
        for size in sizes:
            prep = Preprocessing(image_size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3)
            paths = {"full": lambda d: prep.resize_only(decode_image(d, "x.jpg")),
                     "reduced": lambda d: prep.resize_only(open_rgb(d, "x.jpg", at_least=prep.image_size))}
            row = {"source": f"{width}x{height}", "size": size}
            outputs = {}
            for name, fn in paths.items():
                outputs[name] = [fn(d).astype(np.int16) for d in data]  # also warms up
                start = time.perf_counter()
                for _ in range(repeats):
                    for d in data:
                        fn(d)
                row[f"{name}_ms"] = 1e3 * (time.perf_counter() - start) / (repeats * len(data))
            gaps = [np.abs(a - b) for a, b in zip(outputs["full"], outputs["reduced"])]
            row["speedup"] = row["full_ms"] / row["reduced_ms"]
            row["mean_levels"] = float(np.mean([g.mean() for g in gaps]))
            row["max_levels"] = int(max(g.max() for g in gaps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _loader_rate(dataset: Path, sizes: list[int], workers: int, batches: int) -> list[dict]:
    from geod.stage2_distill.config import DataConfig
    from geod.stage2_distill.data import PairStream, make_loader
    from geod.stage2_distill.students import Preprocessing

    rows = []
    for size in sizes:
        for reduced, deferred in ((False, False), (True, False), (True, True)):
            prep = Preprocessing(image_size=(size, size), mean=(0.5,) * 3, std=(0.5,) * 3)
            cfg = DataConfig(shards=str(dataset), batch_size=16, workers=workers, reduced_decode=reduced)
            stream = PairStream(cfg, prep, raw_pixels=True, pad_matches=True, pack=True, defer_resize=deferred)
            count = min(stream.batches_per_epoch(0), batches + workers)
            loader = iter(make_loader(stream))
            for _ in range(workers):  # the first round is made while the workers start
                next(loader)
            start = time.perf_counter()
            for _ in range(count - workers):
                next(loader)
            rate = 16 * (count - workers) / (time.perf_counter() - start)
            del loader
            row = {"size": size, "reduced_decode": reduced, "device_resize": deferred, "workers": workers,
                   "pairs_per_s": rate}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="224,336,384,448", help="square student sizes (pixels)")
    parser.add_argument("--repeats", type=int, default=5, help="(a): passes over 4 images per measurement")
    parser.add_argument("--workers", type=int, default=None, help="(b): loader workers (default: geod distill's)")
    parser.add_argument("--pairs", type=int, default=512, help="(b): pairs in the synthetic dataset")
    parser.add_argument("--loader-sizes", default="224,384", help="(b): student sizes to time the loader at")
    parser.add_argument("--image", default="480x640", help="(b): HxW of the dataset's JPEGs")
    parser.add_argument("--data-dir", default=None, help="(b): where to build (or reuse) the dataset")
    parser.add_argument("--out", default=None, help="results JSON")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from bench_distill_step import build_dataset
    from geod.stage2_distill.data import default_workers

    workers = default_workers() if args.workers is None else args.workers
    sizes = [int(v) for v in args.sizes.split(",")]
    results = {"per_image": _per_image([(480, 640), (968, 1296)], sizes, args.repeats)}
    root = Path(args.data_dir or Path(tempfile.gettempdir()) / "geod-bench-distill")
    height, width = (int(v) for v in args.image.split("x"))
    dataset = build_dataset(root, args.pairs, height, width)
    results["loader"] = _loader_rate(dataset, [int(v) for v in args.loader_sizes.split(",")], workers,
                                     batches=max(4 * workers, 16))
    print("\n| JPEG | student px | full ms | reduced ms | speed-up | mean / max levels apart |")
    print("|---|---|---|---|---|---|")
    for r in results["per_image"]:
        print(f"| {r['source']} | {r['size']} | {r['full_ms']:.2f} | {r['reduced_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['mean_levels']:.2f} / {r['max_levels']} |")
    print(f"\n| student px | loader pairs/s, {width}x{height} JPEGs, {workers} workers: full | reduced "
          "| reduced, resize deferred |")
    print("|---|---|---|---|")
    for size in sorted({r["size"] for r in results["loader"]}):
        rates = [next(r["pairs_per_s"] for r in results["loader"] if r["size"] == size
                      and (r["reduced_decode"], r["device_resize"]) == flags)
                 for flags in ((False, False), (True, False), (True, True))]
        print(f"| {size} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
