"""Loading a pair's files: decoding conventions, and errors naming the row, field and file."""

from __future__ import annotations

import hashlib
import io
import os

import fsspec
import numpy as np
import pytest
from PIL import Image

from geod.data_manifests.manifest import load_manifest, write_manifest
from geod.data_manifests.views import (decode_depth, decode_disparity, decode_image, load_pair, open_rgb, read_bytes,
                                       resolve_ref)
from geod.pipeline.errors import InputReadError, ManifestError

K = [50.0, 0.0, 15.5, 0.0, 50.0, 11.5, 0.0, 0.0, 1.0]
POSE = np.eye(4).reshape(-1).tolist()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def a_pair_dir(tmp_path):
    """A 32x24 RGB-D pair and a stereo pair on disk, with a manifest referring to them relatively."""
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    (tmp_path / "data" / "a.png").write_bytes(_png(image))
    (tmp_path / "data" / "b.jpg").write_bytes(_jpeg(image[:, ::-1].copy()))
    depth = rng.integers(500, 4000, size=(12, 16)).astype(np.uint16)
    depth[0, 0] = 0
    (tmp_path / "data" / "da.png").write_bytes(_png(depth))
    (tmp_path / "data" / "db.png").write_bytes(_png(depth[::-1].copy()))
    np.save(tmp_path / "data" / "disp.npy", np.full((24, 32), 3.5, dtype=np.float32))
    rows = [
        {"pair_id": "rgbd", "scene_id": "s", "image_a": "data/a.png", "image_b": "data/b.jpg",
         "depth_a": "data/da.png", "depth_b": "data/db.png", "depth_scale": 1000.0, "intrinsics_a": K,
         "intrinsics_b": K, "pose_a": POSE, "pose_b": POSE},
        {"pair_id": "stereo", "scene_id": "s", "image_a": "data/a.png", "image_b": "data/b.jpg",
         "disparity_a": "data/disp.npy", "baseline": 0.2},
    ]
    write_manifest(rows, tmp_path / "pairs.parquet")
    return tmp_path, image, depth


def test_resolve_ref(tmp_path):
    assert resolve_ref("x/y.jpg", tmp_path) == os.path.join(str(tmp_path), "x", "y.jpg")
    assert resolve_ref("../y.jpg", tmp_path / "sub") == os.path.join(str(tmp_path), "y.jpg")
    assert resolve_ref("/abs/y.jpg", tmp_path) == "/abs/y.jpg"
    for uri in ("s3://bucket/k.jpg", "https://example.org/a.png", "memory://x/y.png", "file:///tmp/z.png"):
        assert resolve_ref(uri, tmp_path) == uri


def test_read_bytes_local_and_fsspec(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"abc")
    assert read_bytes("f.bin", tmp_path) == b"abc"
    with fsspec.open("memory://geod-views-test/g.bin", "wb") as handle:
        handle.write(b"xyz")
    assert read_bytes("memory://geod-views-test/g.bin", tmp_path) == b"xyz"
    with pytest.raises(InputReadError, match=r"memory://geod-views-test/none\.bin: file not found"):
        read_bytes("memory://geod-views-test/none.bin", tmp_path)
    with pytest.raises(InputReadError, match=r"missing\.jpg: file not found"):
        read_bytes("missing.jpg", tmp_path)


def test_decode_image_is_exact_and_rejects_corrupt_files():
    image = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(image), "x.png"), image)
    gray = decode_image(_png(image[:, :, 0].copy()), "g.png")
    assert gray.shape == (5, 7, 3) and gray.dtype == np.uint8
    truncated = _jpeg(np.zeros((64, 64, 3), np.uint8) + 90)[:-200]
    with pytest.raises(InputReadError, match=r"^broken\.jpg: cannot decode image"):
        decode_image(truncated, "broken.jpg")
    with pytest.raises(InputReadError, match=r"^junk\.png: cannot decode image"):
        decode_image(b"\x89PNG not really", "junk.png")


def _smooth(height: int, width: int) -> np.ndarray:
    coarse = np.random.default_rng(3).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def test_open_rgb_decodes_large_jpegs_at_the_smallest_scale_that_keeps_the_requested_size():
    data = _jpeg(_smooth(96, 128))
    assert open_rgb(data, "x.jpg").size == (128, 96)
    # (W, H) of the decode: the largest of 1/8, 1/4, 1/2 that keeps both sides at or above the request
    assert open_rgb(data, "x.jpg", at_least=(12, 16)).size == (16, 12)
    assert open_rgb(data, "x.jpg", at_least=(24, 30)).size == (32, 24)
    assert open_rgb(data, "x.jpg", at_least=(40, 40)).size == (64, 48)
    assert open_rgb(data, "x.jpg", at_least=(60, 70)).size == (128, 96)  # under 2x on one side: full decode
    # Other formats decode in full; gray JPEGs still come back RGB.
    assert open_rgb(_png(_smooth(96, 128)), "x.png", at_least=(12, 16)).size == (128, 96)
    gray = open_rgb(_jpeg(_smooth(96, 128)[:, :, 0].copy()), "g.jpg", at_least=(24, 30))
    assert gray.mode == "RGB" and gray.size == (32, 24)
    truncated = _jpeg(_smooth(96, 128))[:-300]
    with pytest.raises(InputReadError, match=r"^broken\.jpg: cannot decode image"):
        open_rgb(truncated, "broken.jpg", at_least=(24, 30))


def test_reduced_decode_then_resize_stays_within_a_level_or_two_of_the_full_decode():
    data = _jpeg(_smooth(480, 640))
    full = np.asarray(Image.fromarray(decode_image(data, "x.jpg")).resize((224, 168), Image.Resampling.BICUBIC),
                      np.int16)
    reduced = np.asarray(open_rgb(data, "x.jpg", at_least=(168, 224)).resize((224, 168), Image.Resampling.BICUBIC),
                         np.int16)
    difference = np.abs(full - reduced)
    assert difference.mean() < 1.0 and difference.max() <= 8


def test_decode_depth_units_and_unknowns():
    raw = np.array([[0, 1000], [2500, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(decode_depth(_png(raw), "d.png", None), [[0, 1.0], [2.5, 65.535]], rtol=1e-6)
    np.testing.assert_allclose(decode_depth(_png(raw), "d.png", 100.0), [[0, 10.0], [25.0, 655.35]], rtol=1e-6)
    buffer = io.BytesIO()
    np.save(buffer, np.array([[1.5, np.nan], [-1.0, np.inf]], dtype=np.float32))
    out = decode_depth(buffer.getvalue(), "d.npy", 1000.0)  # .npy is in scene units: no scaling
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.5, 0], [0, 0]])
    with pytest.raises(InputReadError, match=r"8\.png: depth PNG must be 16-bit"):
        decode_depth(_png(np.zeros((4, 4), np.uint8)), "8.png", None)
    with pytest.raises(InputReadError, match=r"d\.jpg: unsupported depth format '\.jpg'"):
        decode_depth(b"", "d.jpg", None)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputReadError, match=r"evil\.npy: cannot read \.npy"):
        decode_depth(pickled.getvalue(), "evil.npy", None)


def test_decode_disparity_formats():
    values = np.array([[1.0, 2.0, 0.0], [4.5, np.inf, 6.0]], dtype=np.float32)
    expected = np.array([[1.0, 2.0, 0.0], [4.5, 0.0, 6.0]], dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, values)
    np.testing.assert_array_equal(decode_disparity(buffer.getvalue(), "d.npy"), expected)
    # PFM: little-endian (negative scale), rows stored bottom to top.
    pfm = b"Pf\n3 2\n-1.0\n" + values[::-1].astype("<f4").tobytes()
    np.testing.assert_array_equal(decode_disparity(pfm, "d.pfm"), expected)
    kitti = np.array([[256, 512], [0, 1000]], dtype=np.uint16)
    np.testing.assert_allclose(decode_disparity(_png(kitti), "d.png"), kitti / 256.0)
    with pytest.raises(InputReadError, match=r"d\.pfm: truncated PFM file"):
        decode_disparity(pfm[:-4], "d.pfm")


def test_load_pair_rgbd_and_stereo(a_pair_dir):
    root, image, depth = a_pair_dir
    manifest = load_manifest(root / "pairs.parquet")
    pair = load_pair(manifest.rows[0], manifest.base_dir)
    np.testing.assert_array_equal(pair.view_a.image, image)
    assert pair.view_b.image.shape == (24, 32, 3)
    assert pair.view_a.image_sha256 == hashlib.sha256((root / "data" / "a.png").read_bytes()).hexdigest()
    np.testing.assert_allclose(pair.view_a.depth, depth / 1000.0, rtol=1e-6)
    assert pair.view_a.depth[0, 0] == 0.0
    np.testing.assert_array_equal(pair.view_b.intrinsics.reshape(-1), K)
    np.testing.assert_array_equal(pair.view_a.pose, np.eye(4))
    assert pair.disparity_a is None and pair.baseline is None

    stereo = load_pair(manifest.rows[1], manifest.base_dir)
    assert stereo.view_a.depth is None and stereo.baseline == 0.2
    np.testing.assert_array_equal(stereo.disparity_a, np.full((24, 32), 3.5, np.float32))


def test_load_pair_errors_name_row_field_and_file(a_pair_dir):
    root, image, _ = a_pair_dir
    manifest = load_manifest(root / "pairs.parquet")
    rgbd, stereo = manifest.rows
    data = root / "data"

    os.remove(data / "b.jpg")
    with pytest.raises(InputReadError) as info:
        load_pair(rgbd, manifest.base_dir)
    assert str(info.value) == f"row 0 (pair_id 'rgbd'), field 'image_b': {data / 'b.jpg'}: file not found"

    (data / "b.jpg").write_bytes(_jpeg(image)[:-300])  # truncated JPEG
    with pytest.raises(InputReadError, match=r"row 0 \(pair_id 'rgbd'\), field 'image_b': .*b\.jpg: cannot decode"):
        load_pair(rgbd, manifest.base_dir)
    (data / "b.jpg").write_bytes(_jpeg(image))

    (data / "db.png").write_bytes(_png(np.ones((10, 16), np.uint16)))  # wrong aspect ratio
    with pytest.raises(InputReadError, match=r"field 'depth_b': .*db\.png: depth map is 16x10 but image_b is 32x24"):
        load_pair(rgbd, manifest.base_dir)
    (data / "db.png").write_bytes(_png(np.ones((6, 8), np.uint16)))  # same aspect, principal point outside
    with pytest.raises(ManifestError, match=r"field 'intrinsics_b': principal point \(15\.5, 11\.5\) lies outside "
                                            r"the 8x6 depth map"):
        load_pair(rgbd, manifest.base_dir)

    np.save(data / "disp.npy", np.ones((24, 31), np.float32))
    with pytest.raises(InputReadError, match=r"field 'disparity_a': .*disp\.npy: disparity is 31x24 but image_a "
                                             r"is 32x24"):
        load_pair(stereo, manifest.base_dir)


def test_stereo_images_must_share_one_size(a_pair_dir):
    root, image, _ = a_pair_dir
    manifest = load_manifest(root / "pairs.parquet")
    stereo = manifest.rows[1]
    data = root / "data"
    (data / "b.jpg").write_bytes(_jpeg(image[:20]))  # 32x20 next to a 32x24 image_a
    with pytest.raises(InputReadError) as info:
        load_pair(stereo, manifest.base_dir)
    assert str(info.value) == (
        f"row 1 (pair_id 'stereo'), field 'image_b': {data / 'b.jpg'} is 32x20 but {data / 'a.png'} (image_a) "
        f"is 32x24; a rectified stereo pair (disparity_a given) needs images of the same size")
