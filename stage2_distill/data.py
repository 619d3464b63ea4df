"""Streaming training batches from a target dataset.

Order of one epoch, computed from index.parquet alone (no array or image is read to plan it):
1. the dataset's blocks (chunk-aligned row ranges) are permuted with a generator seeded by (seed, epoch);
2. stream s of S = world_size x num_workers takes blocks s, s + S, s + 2S, ... of that permutation;
3. the stream walks its blocks in groups of `shuffle_blocks`, shuffles the eligible rows of each group
   (status ok, split filter) and cuts them into batches, carrying the remainder to the next group;
4. every stream is truncated to the shortest stream's batch count, so every rank yields the same number of
   batches (DDP needs that) and the DataLoader's round-robin over workers is a fixed interleaving.
Batch k of a rank comes from its worker k % W. Resuming at batch b of epoch e re-plans the epoch and starts
each stream at its own offset; worker ids are rotated by b so the DataLoader's first fetch (worker 0) is
batch b. Skipped batches read nothing. All randomness (row shuffle, match subsets) is seeded by position.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from geod.pipeline.errors import ConfigError, InputReadError
from geod.pipeline.format_spec import PROB_SCALE, STATUS_OK
from geod.stage2_distill.config import DataConfig
from geod.stage2_distill.packing import PackedBatch, pack_batch
from geod.stage2_distill.students import Preprocessing
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

TARGET_ARRAYS = (
    "match_count", "match_xy_a", "match_xy_b", "match_depth_a", "match_depth_b", "match_points_a",
    "match_points_b", "cv_ab_index", "cv_ab_prob", "cv_ab_valid", "cv_ba_index", "cv_ba_prob", "cv_ba_valid",
)
_SHUFFLE, _MATCHES = 1, 2  # tags separating the random streams drawn from one seed


@dataclass(frozen=True)
class PairIndex:
    """What planning and image loading need from index.parquet, as plain arrays (cheap to send to workers)."""

    pair_id: list[str]
    image_a: list[str]
    image_b: list[str]
    sha_a: list[str | None]
    sha_b: list[str | None]
    shard: np.ndarray
    row: np.ndarray
    eligible: np.ndarray  # bool per index row
    blocks: list[tuple[int, int, int]]  # (shard, start, stop)
    block_rows: list[np.ndarray]  # eligible index positions inside each block, by row

    @classmethod
    def from_dataset(cls, dataset, split: str | None, where: str) -> PairIndex:
        table = dataset.index.to_pydict()
        status = np.asarray(table["status"], dtype=object)
        splits = np.asarray(table["split"], dtype=object)
        eligible = status == STATUS_OK
        if split is not None:
            eligible &= splits == split
        if not eligible.any():
            present = sorted({str(s) for s, ok in zip(splits, status == STATUS_OK) if ok})
            raise ConfigError(f"{where}: no ok pairs with split {split!r} (ok pairs have splits {present})")
        shard = np.asarray(table["shard"], dtype=np.int64)
        row = np.asarray(table["row"], dtype=np.int64)
        blocks = [tuple(int(v) for v in block) for block in dataset.iter_blocks()]
        block_rows = []
        for block_shard, start, stop in blocks:
            inside = np.flatnonzero(eligible & (shard == block_shard) & (row >= start) & (row < stop))
            block_rows.append(inside[np.argsort(row[inside], kind="stable")])
        return cls(pair_id=list(table["pair_id"]), image_a=list(table["image_a"]), image_b=list(table["image_b"]),
                   sha_a=list(table["image_a_sha256"]), sha_b=list(table["image_b_sha256"]), shard=shard,
                   row=row, eligible=eligible, blocks=blocks, block_rows=block_rows)


def plan_stream(index: PairIndex, *, epoch: int, seed: int, stream: int, n_streams: int, shuffle_blocks: int,
                batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of one stream for one epoch: [(index positions [batch_size], block ids [batch_size])]."""
    order = np.random.default_rng([seed, epoch]).permutation(len(index.blocks))
    mine = order[stream::n_streams]
    batches = []
    pending = np.zeros(0, np.int64)
    pending_blocks = np.zeros(0, np.int64)
    for group, first in enumerate(range(0, len(mine), shuffle_blocks)):
        chosen = mine[first:first + shuffle_blocks]
        rows = np.concatenate([index.block_rows[b] for b in chosen])
        blocks = np.concatenate([np.full(len(index.block_rows[b]), b) for b in chosen])
        perm = np.random.default_rng([seed, epoch, _SHUFFLE, stream, group]).permutation(len(rows))
        pending = np.concatenate([pending, rows[perm]])
        pending_blocks = np.concatenate([pending_blocks, blocks[perm]])
        while len(pending) >= batch_size:
            batches.append((pending[:batch_size], pending_blocks[:batch_size]))
            pending, pending_blocks = pending[batch_size:], pending_blocks[batch_size:]
    return batches


class PairSource:
    """Reads target rows and the images they refer to; opens the dataset lazily (once per process).

    reduced_decode: JPEGs at least twice the student's input size are decoded at a reduced scale before
    the resize (`open_rgb`'s `at_least`), for training streams; evaluation keeps full decodes.
    """

    def __init__(self, shards: str, storage_options: dict, image_root: str | None,
                 preprocessing: Preprocessing, verify_images: bool = True, *, reduced_decode: bool = False) -> None:
        self.shards = shards
        self.storage_options = storage_options
        self.preprocessing = preprocessing
        self.verify_images = verify_images
        self.reduced_decode = reduced_decode
        self._dataset = None
        self.layout = self.dataset().layout
        self.base_dir = _image_base(self.dataset(), shards, image_root)

    def dataset(self):
        if self._dataset is None:
            from geod.pipeline.reader import TargetDataset

            self._dataset = TargetDataset.open(self.shards, storage_options=self.storage_options or None)
        return self._dataset

    def close(self) -> None:
        """Drop the open dataset, e.g. before worker processes are forked (each reopens its own)."""
        self._dataset = None

    def read_block(self, block: tuple[int, int, int]) -> dict[str, np.ndarray]:
        shard, start, stop = block
        return self.dataset().read_rows(shard, start, stop, names=list(TARGET_ARRAYS))

    def image(self, ref: str, sha256: str | None) -> np.ndarray:
        """The fully decoded image (HxWx3 uint8), checked against the sha256 the targets were built from."""
        from geod.data_manifests.views import decode_image

        return decode_image(self._verified_bytes(ref, sha256), ref)

    def pixels(self, ref: str, sha256: str | None, *, raw: bool = False) -> np.ndarray:
        """3xHxW float32 normalised pixels, or (raw) the resized 3xHxW uint8 ones for `normalise_tensor`."""
        image = self.decoded(ref, sha256)  # resized as the PIL image it is, without an array round trip
        return self.preprocessing.resize_only(image) if raw else self.preprocessing(image)

    def decoded(self, ref: str, sha256: str | None):
        """The RGB PIL image as decoded, before any resize (at a reduced scale where `reduced_decode` allows)."""
        from geod.data_manifests.views import open_rgb

        at_least = self.preprocessing.image_size if self.reduced_decode else None
        return open_rgb(self._verified_bytes(ref, sha256), ref, at_least=at_least)

    def _verified_bytes(self, ref: str, sha256: str | None) -> bytes:
        from geod.data_manifests.views import read_bytes
        from geod.pipeline.hashing import sha256_bytes

        data = read_bytes(ref, self.base_dir)
        if self.verify_images and sha256 and sha256_bytes(data) != sha256:
            raise InputReadError(f"image {ref!r} (under {self.base_dir}) changed since the targets were built: "
                                 f"sha256 differs from the index")
        return data


def _image_base(dataset, shards: str, image_root: str | None) -> str:
    if image_root is not None:
        return str(image_root)
    source = dataset.card.source
    base = source.get("base_dir") if isinstance(source, dict) else getattr(source, "base_dir", None)
    if not base:
        raise ConfigError(f"{shards}: the card records no image base_dir; pass the image root (data.image_root)")
    if "://" not in base and not base.startswith("/") and "://" not in str(shards):
        from pathlib import Path

        base = str(Path(shards) / base)
    return base


def subsample_matches(count: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most `keep` of the first `count` matches, chosen at random and in random order (so
    any prefix is a uniform random subset too: the ranking loss uses one)."""
    return rng.permutation(count)[:keep]


def scene_scale(depth_a: np.ndarray) -> float:
    """The pair's depth unit for scene-normalised thresholds: median positive match depth of view A."""
    positive = depth_a[depth_a > 0]
    return float(np.median(positive)) if positive.size else 1.0


def collate_arrays(rows: list[dict[str, np.ndarray]], max_matches: int, rng: np.random.Generator, *,
                   pad_to_max: bool = False) -> dict[str, np.ndarray]:
    """The target arrays of one batch (numpy), keyed and typed as `collate_pairs` returns them."""
    picks = [subsample_matches(int(r["match_count"]), max_matches, rng) for r in rows]
    width = max_matches if pad_to_max else max(1, max(len(p) for p in picks))
    size = len(rows)
    out = {"mask": np.zeros((size, width), bool)}
    shapes = {"xy_a": ("match_xy_a", 2), "xy_b": ("match_xy_b", 2), "depth_a": ("match_depth_a", None),
              "depth_b": ("match_depth_b", None), "points_a": ("match_points_a", 3),
              "points_b": ("match_points_b", 3)}
    for key, (_, last) in shapes.items():
        out[key] = np.zeros((size, width) if last is None else (size, width, last), np.float32)
    scales = np.ones(size, np.float32)
    for i, (r, pick) in enumerate(zip(rows, picks)):
        out["mask"][i, :len(pick)] = True
        for key, (name, _) in shapes.items():
            out[key][i, :len(pick)] = r[name][pick]
        scales[i] = scene_scale(r["match_depth_a"][:int(r["match_count"])])
    out["scene_scale"] = scales
    for side in ("ab", "ba"):
        out[f"cv_{side}_index"] = np.stack([r[f"cv_{side}_index"] for r in rows]).astype(np.int64)
        out[f"cv_{side}_prob"] = np.stack([r[f"cv_{side}_prob"] for r in rows]).astype(np.float32) / np.float32(
            PROB_SCALE)
        out[f"cv_{side}_valid"] = np.stack([r[f"cv_{side}_valid"] for r in rows]).astype(bool)
    return out


def collate_pairs(rows: list[dict[str, np.ndarray]], pixels_a: list[np.ndarray], pixels_b: list[np.ndarray],
                  max_matches: int, rng: np.random.Generator, *, pad_to_max: bool = False) -> dict:
    """One batch: pixel tensors, matches padded to the batch's largest kept count (or, with `pad_to_max`, to
    `max_matches`: the same shapes every step) with `mask`, cost volumes.

    Every pair keeps a random subset of at most `max_matches` of its valid matches, in random order.
    """
    batch = {key: torch.from_numpy(value)
             for key, value in collate_arrays(rows, max_matches, rng, pad_to_max=pad_to_max).items()}
    batch["pixel_a"] = torch.from_numpy(np.stack(pixels_a))
    batch["pixel_b"] = torch.from_numpy(np.stack(pixels_b))
    return batch


def defers_resize(device_resize: bool, preprocessing: Preprocessing, device: torch.device) -> bool:
    """Whether a training stream for `device` leaves the resize to the consumer (`PairStream`'s defer_resize):
    on CUDA, with run.device_resize, for any filter but NEAREST."""
    return device.type == "cuda" and device_resize and preprocessing.resizes_on_device


def default_workers(world_size: int = 1) -> int:
    """Loader workers for `data.workers=None`: this rank's share of the CPUs available to the process, less
    two (the training process and its pin-memory thread), between 1 and 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // max(world_size, 1) - 2))


class PairStream(IterableDataset):
    """Seeded, resumable, rank- and worker-split stream of collated batches (use with batch_size=None).

    raw_pixels: batches carry the resized images as uint8 [B, 3, H, W] instead of normalised float32; the
    consumer normalises them with `preprocessing.normalise_tensor` (same values), e.g. on the GPU.
    pad_matches: matches are padded to cfg.max_matches in every batch (static shapes for a compiled step;
    the losses are the same, padding is masked).
    pack: each batch is a `PackedBatch` (two buffers instead of sixteen tensors, see geod.stage2_distill.packing);
    its `unpack` gives the same batch on the consumer's device.
    defer_resize (with raw_pixels; any PIL filter but NEAREST): when a batch's images all decode to one size,
    they travel at that size and the consumer resizes them (`step.BatchMover`, on the GPU, with the same
    result); a batch of mixed sizes is resized here as usual.
    """

    def __init__(self, cfg: DataConfig, preprocessing: Preprocessing, *, rank: int = 0, world_size: int = 1,
                 raw_pixels: bool = False, pad_matches: bool = False, pack: bool = False,
                 defer_resize: bool = False) -> None:
        super().__init__()
        if defer_resize and not (raw_pixels and preprocessing.resizes_on_device):
            raise ConfigError("PairStream: defer_resize needs raw_pixels and a resize filter other than NEAREST "
                              f"(the student's is PIL filter {preprocessing.resample})")
        self.raw_pixels = raw_pixels
        self.defer_resize = defer_resize
        self.pad_matches = pad_matches
        self.pack = pack
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if cfg.workers is None:
            cfg = dataclasses.replace(cfg, workers=default_workers(world_size))
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.workers = max(cfg.workers, 1)
        self.source = PairSource(cfg.shards, cfg.storage_options, cfg.image_root, preprocessing,
                                 cfg.verify_images, reduced_decode=cfg.reduced_decode)
        self.index = PairIndex.from_dataset(self.source.dataset(), cfg.split, cfg.shards)
        self.source.close()
        self.cv_grid = (self.source.layout.grid_h, self.source.layout.grid_w)
        self.epoch = 0
        self.start_batch = 0

    @property
    def n_streams(self) -> int:
        return self.world_size * self.workers

    def _plan(self, epoch: int, stream: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return plan_stream(self.index, epoch=epoch, seed=self.cfg.seed, stream=stream, n_streams=self.n_streams,
                           shuffle_blocks=self.cfg.shuffle_blocks, batch_size=self.cfg.batch_size)

    def batches_per_stream(self, epoch: int) -> int:
        return min(len(self._plan(epoch, s)) for s in range(self.n_streams))

    def batches_per_epoch(self, epoch: int) -> int:
        """Batches one rank yields in `epoch` (the same on every rank)."""
        count = self.batches_per_stream(epoch) * self.workers
        if count == 0:
            raise ConfigError(f"{self.cfg.shards}: too little data for {self.world_size} rank(s) x {self.workers} "
                              f"worker(s) at batch size {self.cfg.batch_size} ({len(self.index.blocks)} blocks, "
                              f"{int(self.index.eligible.sum())} eligible pairs)")
        return count

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next iteration start at batch `batch` of epoch `epoch` (of this rank)."""
        self.epoch, self.start_batch = int(epoch), int(batch)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ConfigError(f"PairStream planned for {self.workers} workers, DataLoader has {info.num_workers}")
        logical = (worker + self.start_batch) % self.workers
        stream = self.rank * self.workers + logical
        plan = self._plan(self.epoch, stream)[:self.batches_per_stream(self.epoch)]
        first = len(range(logical, self.start_batch, self.workers))
        cache: dict[int, dict[str, np.ndarray]] = {}
        for local in range(first, len(plan)):
            positions, blocks = plan[local]
            yield self._batch(positions, blocks, cache, stream, local)
            # Blocks of a group are used by consecutive batches only; keep just those the next batch needs.
            following = set(plan[local + 1][1].tolist()) if local + 1 < len(plan) else set()
            for block in [b for b in cache if b not in following]:
                cache.pop(block)

    def _batch(self, positions: np.ndarray, blocks: np.ndarray, cache: dict, stream: int,
               local: int) -> dict | PackedBatch:
        rows, refs_a, refs_b = [], [], []
        index = self.index
        for position, block in zip(positions.tolist(), blocks.tolist()):
            if block not in cache:
                cache[block] = self.source.read_block(index.blocks[block])
            offset = int(index.row[position]) - index.blocks[block][1]
            rows.append({name: values[offset] for name, values in cache[block].items()})
            refs_a.append((index.image_a[position], index.sha_a[position]))
            refs_b.append((index.image_b[position], index.sha_b[position]))
        pixels = self._pixels(refs_a + refs_b)  # view A's images, then view B's
        rng = np.random.default_rng([self.cfg.seed, self.epoch, _MATCHES, stream, local])
        pair_id = [index.pair_id[p] for p in positions.tolist()]
        if self.pack:
            arrays = collate_arrays(rows, self.cfg.max_matches, rng, pad_to_max=self.pad_matches)
            return pack_batch(arrays, np.stack(pixels), pair_id)
        half = len(rows)
        batch = collate_pairs(rows, pixels[:half], pixels[half:], self.cfg.max_matches, rng,
                              pad_to_max=self.pad_matches)
        batch["pair_id"] = pair_id
        return batch

    def _pixels(self, refs: list[tuple[str, str | None]]) -> list[np.ndarray]:
        """Each image's 3xHxW pixels: normalised, resized uint8 (raw_pixels), or, when the resize is deferred
        and every image decoded to one size, uint8 at that size."""
        if not self.defer_resize:
            return [self.source.pixels(ref, sha, raw=self.raw_pixels) for ref, sha in refs]
        images = [self.source.decoded(ref, sha) for ref, sha in refs]
        if len({image.size for image in images}) == 1:
            return [np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)) for image in images]
        return [self.source.preprocessing.resize_only(image) for image in images]


def make_loader(stream: PairStream, *, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the stream at its current position (create a new one per epoch)."""
    workers = stream.cfg.workers
    # A private generator: creating a loader must not draw from the global RNG, or a resumed run (which
    # creates its loader mid-epoch) would see different random numbers than an unbroken one.
    generator = torch.Generator().manual_seed(stream.cfg.seed)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers > 0 else None, persistent_workers=False, generator=generator)
