"""The training data stream: splitting, coverage, resume position, padding and errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.pipeline.errors import ConfigError, InputReadError
from geod.pipeline.format_spec import PROB_SCALE
from geod.pipeline.reader import TargetDataset
from geod.stage2_distill.config import DataConfig
from geod.stage2_distill.data import PairIndex, PairStream, make_loader, plan_stream
from geod.stage2_distill.students import Preprocessing

PREP = Preprocessing(image_size=(16, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resample=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 22 pairs in 3 shards of 8 (blocks of 4 rows): pair 5 failed, every 4th pair is "val".
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=22, failed=(5,), val_every=4)


def _config(dataset, **kwargs) -> DataConfig:
    return DataConfig(shards=str(dataset), **{"batch_size": 2, "workers": 0, "shuffle_blocks": 2,
                                              "max_matches": 6, **kwargs})


def test_blocks_split_disjointly_over_ranks_and_workers_and_cover_every_eligible_pair(dataset):
    index = PairIndex.from_dataset(TargetDataset.open(dataset), "train", str(dataset))
    eligible = set(np.flatnonzero(index.eligible).tolist())
    assert len(eligible) == 22 - 1 - 5  # failed pair 5, val pairs 3, 7, 11, 15, 19
    for epoch in (0, 1):
        seen: list[int] = []
        blocks_per_stream = []
        for stream in range(4):  # 2 ranks x 2 workers
            plan = plan_stream(index, epoch=epoch, seed=3, stream=stream, n_streams=4, shuffle_blocks=2,
                               batch_size=1)
            seen += [int(p) for positions, _ in plan for p in positions]
            blocks_per_stream.append({int(b) for _, blocks in plan for b in blocks})
        assert sorted(seen) == sorted(eligible)  # each eligible pair exactly once
        for i in range(4):
            for j in range(i + 1, 4):
                assert not blocks_per_stream[i] & blocks_per_stream[j]
    first = [p for positions, _ in plan_stream(index, epoch=0, seed=3, stream=0, n_streams=1, shuffle_blocks=2,
                                               batch_size=1) for p in positions]
    second = [p for positions, _ in plan_stream(index, epoch=1, seed=3, stream=0, n_streams=1, shuffle_blocks=2,
                                                batch_size=1) for p in positions]
    assert sorted(first) == sorted(second) and first != second  # a new order every epoch


def test_every_rank_yields_the_same_number_of_batches(dataset):
    counts = []
    for rank in range(2):
        stream = PairStream(_config(dataset, workers=2, batch_size=1), PREP, rank=rank, world_size=2)
        counts.append(stream.batches_per_epoch(0))
        ids = [tuple(b["pair_id"]) for b in make_loader(stream)]
        assert len(ids) == counts[-1]
    assert counts[0] == counts[1] > 0


def test_batches_are_padded_with_a_mask_and_hold_the_pairs_targets(dataset):
    stream = PairStream(_config(dataset, max_matches=6), PREP)
    ds = TargetDataset.open(dataset)
    batch = next(iter(make_loader(stream)))
    assert batch["pixel_a"].shape == (2, 3, 16, 24) and batch["pixel_a"].dtype == torch.float32
    assert batch["mask"].shape[0] == 2 and batch["mask"].sum(1).tolist() == [6, 6]
    for i, pair_id in enumerate(batch["pair_id"]):
        pair = ds.pair(pair_id)
        kept = batch["xy_a"][i][batch["mask"][i]].numpy()
        # every kept match is one of the pair's matches, with its own B point and depths
        rows = [int(np.flatnonzero((pair["match_xy_a"] == xy).all(1))[0]) for xy in kept]
        assert np.array_equal(batch["xy_b"][i][batch["mask"][i]].numpy(), pair["match_xy_b"][rows])
        assert np.array_equal(batch["depth_b"][i][batch["mask"][i]].numpy(), pair["match_depth_b"][rows])
        assert batch["scene_scale"][i].item() == pytest.approx(float(np.median(pair["match_depth_a"])))
        assert torch.allclose(batch["cv_ab_prob"][i], torch.from_numpy(pair["cv_ab_prob"]))
        assert torch.equal(batch["cv_ba_valid"][i], torch.from_numpy(pair["cv_ba_valid"]))
        assert batch["cv_ab_index"].dtype == torch.int64
    assert (batch["cv_ab_prob"].sum(-1) <= 1 + 1e-6).all() and PROB_SCALE == 65535


def test_padding_rows_are_zero_when_pairs_have_fewer_matches(tmp_path):
    path = make_target_dataset(tmp_path, pairs=4, layout={"max_matches": 8, "grid_h": 2, "grid_w": 3, "topk": 2,
                                                               "depth_h": 2, "depth_w": 3, "pairs_per_shard": 4,
                                                               "rows_per_chunk": 4},
                               height=16, width=16, max_shift=7)
    stream = PairStream(_config(path, batch_size=4, max_matches=50, split=None, shuffle_blocks=1), PREP)
    batch = next(iter(make_loader(stream)))
    counts = [int(TargetDataset.open(path).pair(pid)["match_count"]) for pid in batch["pair_id"]]
    assert batch["mask"].sum(1).tolist() == counts and batch["mask"].shape[1] == max(counts)
    assert (batch["xy_a"][~batch["mask"]] == 0).all() and (batch["points_b"][~batch["mask"]] == 0).all()


def test_padding_to_max_matches_keeps_the_same_matches(tmp_path):
    path = make_target_dataset(tmp_path, pairs=4, layout={"max_matches": 8, "grid_h": 2, "grid_w": 3, "topk": 2,
                                                               "depth_h": 2, "depth_w": 3, "pairs_per_shard": 4,
                                                               "rows_per_chunk": 4},
                               height=16, width=16, max_shift=7)
    cfg = _config(path, batch_size=4, max_matches=50, split=None, shuffle_blocks=1)
    tight = next(iter(make_loader(PairStream(cfg, PREP))))
    padded = next(iter(make_loader(PairStream(cfg, PREP, pad_matches=True))))
    width = tight["mask"].shape[1]
    assert width < 50 and padded["mask"].shape[1] == 50 and not padded["mask"][:, width:].any()
    for key in ("mask", "xy_a", "xy_b", "depth_a", "depth_b", "points_a", "points_b"):
        assert torch.equal(padded[key][:, :width], tight[key]), key
        assert not padded[key][:, width:].any(), key


@pytest.mark.parametrize("workers", [0, 2])
def test_raw_pixels_normalised_afterwards_equal_the_normalised_stream(dataset, workers):
    # The uint8 pixels a raw stream sends, normalised by the consumer (the GPU in training), are bitwise the
    # float32 pixels the workers would have sent; everything else in the batch is unchanged.
    plain = list(make_loader(PairStream(_config(dataset, workers=workers), PREP)))
    raw = list(make_loader(PairStream(_config(dataset, workers=workers), PREP, raw_pixels=True)))
    assert len(plain) == len(raw) > 0
    for a, b in zip(plain, raw):
        assert b["pixel_a"].dtype == torch.uint8 and b["pixel_a"].shape == a["pixel_a"].shape
        for key in ("pixel_a", "pixel_b"):
            assert torch.equal(PREP.normalise_tensor(b[key]), a[key])
        assert b["pair_id"] == a["pair_id"]
        assert all(torch.equal(a[k], b[k]) for k in a if k not in ("pixel_a", "pixel_b", "pair_id"))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("raw", [False, True])
def test_packed_batches_unpack_to_the_collated_ones(dataset, workers, raw):
    # What the workers send on CUDA: each batch as one pixel tensor and one target buffer. Unpacked (and, for
    # uint8 pixels, normalised) by the consumer it is bitwise the batch of the unpacked stream, key by key.
    from geod.stage2_distill.packing import PackedBatch
    from geod.stage2_distill.step import BatchMover

    cfg = _config(dataset, workers=workers, max_matches=5)
    plain = list(make_loader(PairStream(cfg, PREP, pad_matches=True)))
    packed = list(make_loader(PairStream(cfg, PREP, raw_pixels=raw, pad_matches=True, pack=True)))
    assert len(plain) == len(packed) > 0
    mover = BatchMover(torch.device("cpu"), PREP)
    for a, p in zip(plain, packed):
        assert isinstance(p, PackedBatch) and p.targets.dtype == torch.uint8
        assert p.pixels.dtype == (torch.uint8 if raw else torch.float32)
        b = mover(p)
        assert list(b) == list(a)  # same keys, same order
        assert b["pair_id"] == a["pair_id"]
        for key in a:
            if key != "pair_id":
                assert b[key].dtype == a[key].dtype and torch.equal(b[key], a[key]), key


@pytest.mark.parametrize("pack", [False, True])
def test_deferred_resize_sends_one_size_batches_as_decoded_and_the_mover_resizes_them(dataset, pack):
    # Every toy image decodes to 32x48: the workers send them at that size, and the mover's resize gives the
    # host path's batch bit for bit.
    from geod.stage2_distill.step import BatchMover

    cfg = _config(dataset, max_matches=5)
    host = list(make_loader(PairStream(cfg, PREP, raw_pixels=True, pad_matches=True, pack=pack)))
    deferred = list(make_loader(PairStream(cfg, PREP, raw_pixels=True, pad_matches=True, pack=pack,
                                           defer_resize=True)))
    assert len(host) == len(deferred) > 0
    mover = BatchMover(torch.device("cpu"), PREP)
    for h, d in zip(host, deferred):
        sent = d.pixels if pack else d["pixel_a"]
        assert sent.dtype == torch.uint8 and tuple(sent.shape[-2:]) == (32, 48)
        h, d = mover(h), mover(d)
        assert d["pixel_a"].shape == h["pixel_a"].shape == (2, 3, 16, 24)
        for key in h:
            if key != "pair_id":
                assert torch.equal(d[key], h[key]), key


def test_deferred_resize_resizes_a_batch_of_mixed_sizes_on_the_host(tmp_path):
    # One image of another size: that batch cannot travel as one tensor at the decoded size, so the workers
    # resize it as usual, bitwise the host path; deferral also needs a filter other than NEAREST.
    from PIL import Image

    path = make_target_dataset(tmp_path, pairs=4)
    odd = tmp_path / "images" / "0002_b.png"
    buffer = io.BytesIO()
    Image.open(odd).resize((40, 30)).save(buffer, format="PNG")
    odd.write_bytes(buffer.getvalue())
    cfg = _config(path, batch_size=4, shuffle_blocks=1, verify_images=False)
    host = next(iter(make_loader(PairStream(cfg, PREP, raw_pixels=True))))
    deferred = next(iter(make_loader(PairStream(cfg, PREP, raw_pixels=True, defer_resize=True))))
    for key in ("pixel_a", "pixel_b"):
        assert torch.equal(deferred[key], host[key]) and host[key].shape == (4, 3, 16, 24)
    nearest = Preprocessing(image_size=(16, 24), mean=(0.5,) * 3, std=(0.25,) * 3, resample=0)
    with pytest.raises(ConfigError, match="defer_resize"):
        PairStream(cfg, nearest, raw_pixels=True, defer_resize=True)
    with pytest.raises(ConfigError, match="defer_resize"):
        PairStream(cfg, PREP, defer_resize=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_copied_on_a_side_stream_are_complete_when_the_consumer_reads_them(dataset):
    # The mover copies and normalises on its own stream. Its copies are held back here behind a long kernel on
    # that stream; the consumer's stream must still see each whole batch, and the values equal the CPU path.
    from geod.stage2_distill.step import BatchMover

    cfg = _config(dataset, max_matches=5)
    plain = list(make_loader(PairStream(cfg, PREP, pad_matches=True)))
    packed = list(make_loader(PairStream(cfg, PREP, raw_pixels=True, pad_matches=True, pack=True),
                              pin_memory=True))
    mover = BatchMover(torch.device("cuda"), PREP)
    mover(packed[0])  # makes the copy stream
    for a, p in zip(plain, packed):
        with torch.cuda.stream(mover._copies):
            torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time before the copies can start
        b = mover(p)
        read = {key: b[key].clone() for key in a if key != "pair_id"}  # read on the consumer stream
        for key, value in read.items():
            assert value.dtype == a[key].dtype and torch.equal(value.cpu(), a[key]), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mover_resizes_deferred_batches_like_the_cpu(dataset):
    # On the GPU the deferred resize runs on the mover's side stream, compiled as `geod distill` runs it; it
    # must give the CPU's batch bit for bit.
    from geod.stage2_distill.step import BatchMover

    cfg = _config(dataset, max_matches=5)
    batches = list(make_loader(PairStream(cfg, PREP, raw_pixels=True, pad_matches=True, pack=True,
                                          defer_resize=True), pin_memory=True))
    on_gpu = BatchMover(torch.device("cuda"), PREP, compile=True)
    on_cpu = BatchMover(torch.device("cpu"), PREP)
    for packed in batches:
        assert tuple(packed.pixels.shape[-2:]) == (32, 48)
        gpu, cpu = on_gpu(packed), on_cpu(packed)
        assert gpu["pixel_a"].shape == (2, 3, 16, 24)
        for key in cpu:
            if key != "pair_id":
                assert torch.equal(gpu[key].cpu(), cpu[key]), key


def test_pack_batch_aligns_every_array_and_refuses_unknown_dtypes():
    from geod.stage2_distill.packing import ALIGN, pack_batch

    arrays = {"flag": np.array([True, False, True]), "index": np.arange(5, dtype=np.int64).reshape(1, 5),
              "empty": np.zeros((2, 0), np.float32), "half": np.array([1.5, -2.0], np.float16)}
    pixels = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    packed = pack_batch(arrays, pixels, ["p"])
    assert all(offset % ALIGN == 0 for _, _, _, offset in packed.fields)
    out = packed.unpack("cpu")
    for key, value in arrays.items():
        assert torch.equal(out[key], torch.from_numpy(value)), key
    assert torch.equal(out["pixel_a"], torch.from_numpy(pixels[:1]))
    assert torch.equal(out["pixel_b"], torch.from_numpy(pixels[1:]))
    with pytest.raises(ValueError, match="complex64"):
        pack_batch({"z": np.zeros(2, np.complex64)}, pixels, ["p"])
    with pytest.raises(ValueError, match=r"\[2B, 3, H, W\]"):
        pack_batch(arrays, pixels[:1], ["p"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_at_a_batch_gives_the_rest_of_the_epoch(dataset, workers):
    stream = PairStream(_config(dataset, workers=workers, batch_size=1, seed=5), PREP)
    stream.set_position(1, 0)
    full = list(make_loader(stream))
    for start in (3, 4):
        stream.set_position(1, start)
        tail = list(make_loader(stream))
        assert [b["pair_id"] for b in tail] == [b["pair_id"] for b in full[start:]]
        for ours, theirs in zip(tail, full[start:]):
            assert all(torch.equal(ours[k], theirs[k]) for k in ours if torch.is_tensor(ours[k]))


def test_skipped_batches_load_no_images(dataset, monkeypatch):
    stream = PairStream(_config(dataset, batch_size=2), PREP)
    total = stream.batches_per_epoch(0)
    calls = []
    original = type(stream.source)._verified_bytes
    monkeypatch.setattr(type(stream.source), "_verified_bytes", lambda self, ref, sha: calls.append(ref) or
                        original(self, ref, sha))
    stream.set_position(0, total - 1)
    assert len(list(make_loader(stream))) == 1
    assert len(calls) == 2 * 2  # one batch of two pairs, two images each


def test_changed_image_and_missing_split_are_clear_errors(tmp_path):
    path = make_target_dataset(tmp_path, pairs=4)
    with pytest.raises(ConfigError, match="no ok pairs with split 'val'.*'train'"):
        PairStream(_config(path, split="val"), PREP)
    (tmp_path / "images" / "0000_a.png").write_bytes((tmp_path / "images" / "0001_a.png").read_bytes())
    stream = PairStream(_config(path, batch_size=4, shuffle_blocks=1), PREP)
    with pytest.raises(InputReadError, match="0000_a.png"):
        list(make_loader(stream))


def test_reduced_decode_shrinks_jpegs_before_the_resize_and_full_decode_gives_the_processors_pixels(tmp_path):
    # The toy images are twice PREP's size: with reduced_decode (the default) view A's JPEGs decode at half
    # scale and then resize as usual; without it they decode in full. View B's PNGs are unaffected.
    from geod.data_manifests.views import decode_image, open_rgb
    from PIL import Image

    path = make_target_dataset(tmp_path, pairs=4)
    for png in (tmp_path / "images").glob("*_a.png"):
        buffer = io.BytesIO()
        Image.open(png).convert("RGB").save(buffer, format="JPEG", quality=95)
        png.write_bytes(buffer.getvalue())  # decoders go by content, not by name
    config = {"batch_size": 4, "shuffle_blocks": 1, "verify_images": False}
    full = next(iter(make_loader(PairStream(_config(path, reduced_decode=False, **config), PREP, raw_pixels=True))))
    fast = next(iter(make_loader(PairStream(_config(path, **config), PREP, raw_pixels=True))))
    assert torch.equal(full["pixel_b"], fast["pixel_b"])
    assert not torch.equal(full["pixel_a"], fast["pixel_a"])
    for row, pair_id in enumerate(full["pair_id"]):
        data = (tmp_path / "images" / f"{pair_id[1:]}_a.png").read_bytes()
        half = open_rgb(data, "a.jpg", at_least=PREP.image_size)
        assert half.size == (24, 16)  # (W, H): the 48x32 JPEG at 1/2
        assert torch.equal(fast["pixel_a"][row], torch.from_numpy(PREP.resize_only(half)))
        assert torch.equal(full["pixel_a"][row], torch.from_numpy(PREP.resize_only(decode_image(data, "a.jpg"))))
