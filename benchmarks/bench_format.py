"""Size and speed of the targets format on realistic synthetic targets.

    python benchmarks/bench_format.py                    # geod's writer/reader: MB/pair, pairs/s
    python benchmarks/bench_format.py --compare-codecs   # also the codec candidates, per array group

The synthetic pairs look like a teacher's output at the default layout: about 300 of 512 match slots used,
piecewise-smooth float16 depth maps (48x64) with holes, and top-32 cost volumes (768 patches) that are
Gaussians of half a patch (--cv-sigma) around a smoothly moving target, as the flow-derived builder makes
them. Reads
are chunk-aligned block reads in shuffled block order, from the page cache.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from geod.pipeline.card import DatasetLayout
from geod.pipeline.format_spec import FEATURES, PROB_SCALE


def _smooth(rng, h: int, w: int, cells: int = 6) -> np.ndarray:
    """Bilinearly upsampled noise: a smooth field of unit scale."""
    coarse = rng.normal(size=(cells + 1, cells + 1))
    y = np.linspace(0, cells, h, endpoint=False)
    x = np.linspace(0, cells, w, endpoint=False)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _cost_volume(rng, layout: DatasetLayout, shift: np.ndarray, sigma: float):
    gh, gw, k = layout.grid_h, layout.grid_w, layout.topk
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    target_c = cols + shift[0] * gw + 0.4 * _smooth(rng, gh, gw, 3)
    target_r = rows + shift[1] * gh + 0.4 * _smooth(rng, gh, gw, 3)
    valid = ((target_c > -0.5) & (target_c < gw - 0.5) & (target_r > -0.5) & (target_r < gh - 0.5)).ravel()
    gx = np.exp(-0.5 * ((np.arange(gw)[None, :] - target_c.reshape(-1, 1)) / sigma) ** 2)
    gy = np.exp(-0.5 * ((np.arange(gh)[None, :] - target_r.reshape(-1, 1)) / sigma) ** 2)
    prob = (gy[:, :, None] * gx[:, None, :]).reshape(gh * gw, gh * gw)
    prob /= prob.sum(1, keepdims=True)
    top = np.argpartition(-prob, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(prob, top, 1), axis=1, kind="stable")
    index = np.take_along_axis(top, order, 1)
    quantised = np.floor(np.take_along_axis(prob, index, 1) * PROB_SCALE)
    return (np.where(valid[:, None], index, 0).astype(np.uint16),
            np.where(valid[:, None], quantised, 0).astype(np.uint16), valid)


def synthetic_pair(rng, layout: DatasetLayout, cv_sigma: float = 0.5) -> dict[str, np.ndarray]:
    """One pair of realistic targets (see the module docstring)."""
    m = layout.max_matches
    n = int(rng.integers(250, 350))
    out = {f.name: np.zeros(f.resolved_shape(layout.dims()), f.dtype) for f in FEATURES}
    out["match_count"] = np.int32(n)
    shift = rng.uniform(-0.1, 0.1, 2)
    xy_a = rng.uniform(0.02, 0.98, (n, 2))
    xy_b = np.clip(xy_a + shift + rng.normal(scale=0.005, size=(n, 2)), 0, 1)
    depth_a = rng.uniform(0.8, 5.0, n)
    points = np.stack([(xy_a[:, 0] - 0.5) * 1.3 * depth_a, (xy_a[:, 1] - 0.5) * depth_a, depth_a], 1)
    out["match_xy_a"][:n], out["match_xy_b"][:n] = xy_a, xy_b
    out["match_conf"][:n] = 1 + np.exp(rng.normal(1.5, 0.5, n))
    out["match_depth_a"][:n] = depth_a
    out["match_depth_b"][:n] = depth_a * rng.uniform(0.95, 1.05, n)
    out["match_points_a"][:n] = points
    out["match_points_b"][:n] = points + rng.normal(scale=0.005, size=points.shape)
    assert m >= n
    v, u = np.meshgrid((np.arange(layout.depth_h) + 0.5) / layout.depth_h,
                       (np.arange(layout.depth_w) + 0.5) / layout.depth_w, indexing="ij")
    for view in "ab":
        depth = 1 / (0.2 + 0.3 * v + 0.1 * u * rng.uniform(0.5, 1.5)) + 0.2 * _smooth(rng, *v.shape)
        box = (u > rng.uniform(0.2, 0.5)) & (u < rng.uniform(0.6, 0.9)) & (v > 0.5)
        depth[box] = rng.uniform(1.0, 2.0)
        hole = _smooth(rng, *v.shape, 4) > 1.2
        depth[hole] = 0
        conf = np.where(hole, 0, 1 + np.exp(1.5 + 0.5 * _smooth(rng, *v.shape)))
        out[f"depth_{view}"][:], out[f"depth_conf_{view}"][:] = depth, conf
    for name, sign in (("ab", 1), ("ba", -1)):
        out[f"cv_{name}_index"], out[f"cv_{name}_prob"], out[f"cv_{name}_valid"] = \
            _cost_volume(rng, layout, sign * shift, cv_sigma)
    return out


def synthetic_block(layout: DatasetLayout, n: int, seed: int = 0, cv_sigma: float = 0.5
                    ) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    pairs = [synthetic_pair(rng, layout, cv_sigma) for _ in range(n)]
    arrays = {name: np.stack([p[name] for p in pairs]) for name in pairs[0]}
    rows = [{"pair_id": f"p{i:05d}", "scene_id": "s", "image_a": f"{i}a.jpg", "image_b": f"{i}b.jpg",
             "status": "ok"} for i in range(n)]
    return arrays, rows


def _group(name: str) -> str:
    if name.startswith("match"):
        return "matches"
    if name.startswith("depth"):
        return "depth maps"
    return "cv index" if name.endswith("index") else "cv prob" if name.endswith("prob") else "cv valid"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_geod(arrays: dict, rows: list[dict], layout: DatasetLayout, work: Path, repeats: int) -> None:
    from geod.pipeline.reader import TargetDataset
    from geod.pipeline.shard_io import finalize_dataset, write_shard
    from geod.pipeline.validate import validate_dataset

    n = len(rows)
    raw = sum(a.nbytes for a in arrays.values()) / n
    write_times = []
    for repeat in range(repeats):
        root = work / f"geod-{repeat}"
        start = time.perf_counter()
        write_shard(root, 0, arrays, rows, layout)
        write_times.append(time.perf_counter() - start)
    finalize_dataset(root, n_shards=1, layout=layout, teacher={"name": "bench", "scene_units": "metres"})
    stored = _size(root / "shards" / "shard-00000.zarr") / n
    data = TargetDataset.open(root)
    blocks = list(data.iter_blocks())
    read_times = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(len(blocks))
        start = time.perf_counter()
        for b in order:
            data.read_rows(*blocks[b])
        read_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    assert validate_dataset(root) == []
    validate_time = time.perf_counter() - start
    per_group: dict[str, int] = {}
    for name in arrays:
        per_group[_group(name)] = per_group.get(_group(name), 0) + _size(root / "shards" / "shard-00000.zarr" / name)
    print(f"geod format: {n} pairs, raw {raw / 1e6:.3f} MB/pair, stored {stored / 1e6:.4f} MB/pair "
          f"(ratio {raw / stored:.2f})")
    print("  stored per group (KB/pair): " + ", ".join(f"{g} {s / n / 1e3:.1f}" for g, s in per_group.items()))
    print(f"  write_shard (checks + zarr + sha256): {n / min(write_times):.0f} pairs/s (best of {repeats})")
    print(f"  block reads (read_rows, {layout.rows_per_chunk}-row blocks, shuffled): "
          f"{n / min(read_times):.0f} pairs/s (best of {repeats})")
    print(f"  validate_dataset (checksums + values): {n / validate_time:.0f} pairs/s")


def _candidates() -> dict:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    def blosc(shuffle, level=5):
        return lambda f: [BloscCodec(cname="zstd", clevel=level, shuffle=shuffle)]
    return {
        "zstd-3": lambda f: [ZstdCodec(level=3)],
        "blosc-zstd-3 shuffle": blosc("shuffle", 3),
        "blosc-zstd-5 shuffle": blosc("shuffle"),
        "blosc-zstd-5 bitshuffle": blosc("bitshuffle"),
        "chosen: blosc-zstd-5 bit(index)/byte shuffle + crc32c": lambda f: [
            BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle" if f.index_into else "shuffle"), Crc32cCodec()],
    }


def compare_codecs(arrays: dict, layout: DatasetLayout, work: Path) -> None:
    import zarr

    n = len(arrays["match_count"])
    print(f"codec candidates ({n} pairs, KB/pair per group; write and block-read pairs/s):")
    for number, (label, codecs) in enumerate(_candidates().items()):
        path = work / f"codec-{number}"
        start = time.perf_counter()
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w")
        handles = {}
        for f in FEATURES:
            data = arrays[f.name]
            handles[f.name] = group.create_array(f.name, shape=data.shape, dtype=data.dtype,
                                                 chunks=(layout.rows_per_chunk, *data.shape[1:]),
                                                 compressors=codecs(f), fill_value=0)
            handles[f.name][...] = data
        write = time.perf_counter() - start
        start = time.perf_counter()
        for first in range(0, n, layout.rows_per_chunk):
            for handle in handles.values():
                handle[first:first + layout.rows_per_chunk]
        read = time.perf_counter() - start
        per_group: dict[str, int] = {}
        for f in FEATURES:
            per_group[_group(f.name)] = per_group.get(_group(f.name), 0) + _size(path / f.name)
        total = sum(per_group.values()) / n / 1e3
        print(f"  {label:55s} total {total:6.1f} | " + " ".join(f"{g} {s / n / 1e3:5.1f}" for g, s in
                                                              per_group.items())
              + f" | write {n / write:5.0f} read {n / read:5.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256, help="pairs in the benchmark shard (<= 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-codecs", action="store_true")
    parser.add_argument("--cv-sigma", type=float, default=0.5,
                        help="width of the cost-volume Gaussians in patches (larger = flatter rows)")
    args = parser.parse_args()
    layout = DatasetLayout()
    start = time.perf_counter()
    arrays, rows = synthetic_block(layout, args.pairs, cv_sigma=args.cv_sigma)
    print(f"generated {args.pairs} synthetic pairs in {time.perf_counter() - start:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="geod-bench-"))
    try:
        bench_geod(arrays, rows, layout, work, args.repeats)
        if args.compare_codecs:
            compare_codecs(arrays, layout, work)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
