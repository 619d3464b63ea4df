"""Loading one pair's inputs (images, depth, disparity, cameras) for a teacher.

References in a manifest are local paths (relative ones resolved against the manifest's directory) or URIs
with a scheme (``s3://``, ``https://``, ``memory://``, ...) read through fsspec. Every failure raises
InputReadError (or ManifestError for a row whose values contradict its files) naming the row, the field and
the file.

Decoding conventions:
- images: any format PIL reads, decoded fully (never lazily) to H x W x 3 uint8 RGB; EXIF orientation is
  NOT applied, so pixels stay registered to depth maps and intrinsics recorded by the sensor.
- depth: 16-bit PNG or TIFF divided by depth_scale (default 1000: millimetres -> metres), float32 TIFF or
  .npy in scene units. Unknown depth (0, negative, NaN, Inf) is returned as 0.
- disparity: float .npy, .pfm, or 16-bit PNG in the KITTI convention (value / 256). Unknown disparity
  (0, negative, NaN, Inf) is returned as 0.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from geod.data_manifests.manifest import PairRow
from geod.pipeline.errors import InputReadError, ManifestError
from geod.pipeline.hashing import sha256_bytes

DEFAULT_DEPTH_SCALE = 1000.0
# A depth map may be stored at another resolution than its image but must show the same field of view.
ASPECT_TOLERANCE = 0.01
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class ViewData:
    """One view: its image, and its geometry when the manifest gives it."""

    image: np.ndarray  # H x W x 3 uint8 RGB
    image_sha256: str  # of the image file's bytes
    depth: np.ndarray | None = None  # Hd x Wd float32 scene units, 0 = unknown
    intrinsics: np.ndarray | None = None  # 3x3 float64, in the depth map's pixels (image's if no depth)
    pose: np.ndarray | None = None  # 4x4 float64 camera-to-world


@dataclass
class PairData:
    """Everything a teacher needs for one manifest row."""

    row: PairRow
    view_a: ViewData
    view_b: ViewData
    disparity_a: np.ndarray | None = None  # H x W float32 in A's pixels, 0 = unknown; x_b = x_a - d
    baseline: float | None = None


def has_scheme(ref: str) -> bool:
    return bool(_SCHEME.match(ref))


def resolve_ref(ref: str, base_dir: str | Path) -> str:
    """Absolute local path of a reference, or the reference unchanged when it is a URI."""
    if has_scheme(ref):
        return ref
    local = os.path.expanduser(ref)
    if not os.path.isabs(local):
        local = os.path.join(os.fspath(base_dir), local)
    return os.path.normpath(os.path.abspath(local))


def read_bytes(ref: str, base_dir: str | Path) -> bytes:
    """The bytes of a referenced file (local or any fsspec URI)."""
    resolved = resolve_ref(ref, base_dir)
    if not has_scheme(resolved):
        try:
            with open(resolved, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise InputReadError(f"{resolved}: file not found") from None
        except OSError as exc:
            raise InputReadError(f"{resolved}: cannot read: {exc.strerror or exc}") from exc
    import fsspec

    try:
        with fsspec.open(resolved, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise InputReadError(f"{resolved}: file not found") from None
    except ImportError as exc:
        raise InputReadError(f"{resolved}: this URI needs an optional package ({exc}); for http(s) "
                             "install it with: pip install 'geod[remote]'") from exc
    except Exception as exc:  # fsspec backends raise many error types; all mean "cannot read this"
        raise InputReadError(f"{resolved}: cannot read: {type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes, ref: str) -> np.ndarray:
    """Decode an image fully into H x W x 3 uint8 RGB; corrupt or truncated files raise InputReadError."""
    return np.asarray(open_rgb(data, ref), dtype=np.uint8).copy()


def open_rgb(data: bytes, ref: str, *, at_least: tuple[int, int] | None = None):
    """Decode an image fully into an RGB PIL image; corrupt or truncated files raise InputReadError.

    at_least=(H, W): the caller will shrink the image to that size anyway, so a JPEG at least twice as large
    on both sides may be decoded at a reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that keeps both
    sides at or above the request. That decodes 4-64x fewer pixels and leaves the caller a smaller image to
    resample; the pixels differ from a full decode followed by the same resize by about one level in 255.
    Other formats, and JPEGs under twice the size, decode in full.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if at_least is not None:
                img.draft(None, (int(at_least[1]), int(at_least[0])))  # PIL sizes are (W, H)
            img.load()  # forces the whole decode now, so truncation is detected here
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputReadError(f"{ref}: cannot decode image: {exc}") from exc


def decode_depth(data: bytes, ref: str, depth_scale: float | None = None) -> np.ndarray:
    """Decode a depth map into float32 scene units (0 = unknown)."""
    suffix = _suffix(ref)
    if suffix == ".npy":
        depth = _load_npy(data, ref)
    elif suffix in (".png", ".tif", ".tiff"):
        raw = _load_pil_2d(data, ref)
        if raw.dtype.kind == "f":
            depth = raw  # float TIFF: already scene units
        elif raw.dtype.kind in "iu" and raw.dtype.itemsize >= 2:
            scale = DEFAULT_DEPTH_SCALE if depth_scale is None else float(depth_scale)
            depth = raw.astype(np.float64) / scale
        else:
            raise InputReadError(f"{ref}: depth PNG must be 16-bit single-channel, got {raw.dtype} values "
                                 "(8-bit images cannot hold depth)")
    else:
        raise InputReadError(f"{ref}: unsupported depth format '{suffix}' (expected .png or .tif with 16-bit "
                             "values, float .tif, or float .npy)")
    return _clean(depth, ref, "depth")


def decode_disparity(data: bytes, ref: str) -> np.ndarray:
    """Decode a disparity map into float32 pixels (0 = unknown)."""
    suffix = _suffix(ref)
    if suffix == ".npy":
        disparity = _load_npy(data, ref)
    elif suffix == ".pfm":
        disparity = _load_pfm(data, ref)
    elif suffix == ".png":
        raw = _load_pil_2d(data, ref)
        if raw.dtype.kind not in "iu" or raw.dtype.itemsize < 2:
            raise InputReadError(f"{ref}: disparity PNG must be 16-bit (KITTI convention, value / 256)")
        disparity = raw.astype(np.float64) / 256.0
    else:
        raise InputReadError(f"{ref}: unsupported disparity format '{suffix}' (expected .npy, .pfm or "
                             "16-bit .png)")
    return _clean(disparity, ref, "disparity")


def load_pair(row: PairRow, base_dir: str | Path) -> PairData:
    """Read and decode one pair's files; errors name the row, the field and the file."""
    view_a = _load_view(row, "a", base_dir)
    view_b = _load_view(row, "b", base_dir)
    disparity = None
    if row.disparity_a is not None:
        with _context(row, "disparity_a"):
            ref = resolve_ref(row.disparity_a, base_dir)
            disparity = decode_disparity(read_bytes(row.disparity_a, base_dir), ref)
            if disparity.shape != view_a.image.shape[:2]:
                raise InputReadError(f"{ref}: disparity is {_size(disparity)} but image_a is "
                                     f"{_size(view_a.image)}; they must be equal")
        with _context(row, "image_b"):
            # A rectified stereo row maps x_b = x_a - d on the same rows: both images share one size.
            if view_b.image.shape[:2] != view_a.image.shape[:2]:
                raise InputReadError(
                    f"{resolve_ref(row.image_b, base_dir)} is {_size(view_b.image)} but "
                    f"{resolve_ref(row.image_a, base_dir)} (image_a) is {_size(view_a.image)}; a rectified "
                    f"stereo pair (disparity_a given) needs images of the same size")
    return PairData(row=row, view_a=view_a, view_b=view_b, disparity_a=disparity, baseline=row.baseline)


def _load_view(row: PairRow, side: str, base_dir: str | Path) -> ViewData:
    image_ref = getattr(row, f"image_{side}")
    with _context(row, f"image_{side}"):
        data = read_bytes(image_ref, base_dir)
        image = decode_image(data, resolve_ref(image_ref, base_dir))
    view = ViewData(image=image, image_sha256=sha256_bytes(data), intrinsics=getattr(row, f"intrinsics_{side}"),
                    pose=getattr(row, f"pose_{side}"))
    depth_ref = getattr(row, f"depth_{side}")
    if depth_ref is None:
        return view
    with _context(row, f"depth_{side}"):
        resolved = resolve_ref(depth_ref, base_dir)
        depth = decode_depth(read_bytes(depth_ref, base_dir), resolved, row.depth_scale)
        image_aspect = image.shape[1] / image.shape[0]
        depth_aspect = depth.shape[1] / depth.shape[0]
        if abs(depth_aspect / image_aspect - 1.0) > ASPECT_TOLERANCE:
            raise InputReadError(f"{resolved}: depth map is {_size(depth)} but image_{side} is {_size(image)}: "
                                 f"aspect ratios differ by more than {ASPECT_TOLERANCE:.0%}")
    k = view.intrinsics
    if k is not None:
        height, width = depth.shape
        if not (0.0 < k[0, 2] < width and 0.0 < k[1, 2] < height):
            # Typical cause: colour intrinsics given for a depth map of another resolution.
            raise ManifestError(f"row {row.index} (pair_id {row.pair_id!r}), field 'intrinsics_{side}': "
                                f"principal point ({k[0, 2]:g}, {k[1, 2]:g}) lies outside the {width}x{height} "
                                f"depth map {resolved}; intrinsics must be in the depth map's pixels")
    view.depth = depth
    return view


@contextmanager
def _context(row: PairRow, field_name: str) -> Iterator[None]:
    try:
        yield
    except InputReadError as exc:
        raise InputReadError(f"row {row.index} (pair_id {row.pair_id!r}), field '{field_name}': {exc}") from exc


def _suffix(ref: str) -> str:
    path = urlsplit(ref).path if has_scheme(ref) else ref
    return os.path.splitext(path)[1].lower()


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _load_npy(data: bytes, ref: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputReadError(f"{ref}: cannot read .npy (pickled or corrupt files are refused): {exc}") from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 or array.dtype.kind not in "fiu":
        raise InputReadError(f"{ref}: expected a 2-D numeric array, got shape {array.shape} dtype {array.dtype}")
    return array


def _load_pil_2d(data: bytes, ref: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputReadError(f"{ref}: cannot decode: {exc}") from exc
    if array.ndim != 2:
        raise InputReadError(f"{ref}: expected a single-channel image, got mode '{mode}'")
    if mode in _SIXTEEN_BIT_MODES and array.dtype.kind in "iu":
        array = array.astype(np.int64)
    return array


def _load_pfm(data: bytes, ref: str) -> np.ndarray:
    stream = io.BytesIO(data)
    try:
        kind = stream.readline().strip()
        width, height = (int(v) for v in stream.readline().split())
        scale = float(stream.readline().strip())
    except ValueError as exc:
        raise InputReadError(f"{ref}: malformed PFM header: {exc}") from exc
    if kind not in (b"Pf", b"PF"):
        raise InputReadError(f"{ref}: not a PFM file (header {kind[:8]!r})")
    channels = 3 if kind == b"PF" else 1
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    count = width * height * channels
    values = np.frombuffer(stream.read(), dtype=dtype)
    if values.size < count:
        raise InputReadError(f"{ref}: truncated PFM file ({values.size} of {count} values)")
    image = values[:count].reshape(height, width, channels)[::-1]  # PFM rows run bottom to top
    return image[:, :, 0]


def _clean(values: np.ndarray, ref: str, what: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    if out.size == 0:
        raise InputReadError(f"{ref}: empty {what} map")
    out = np.where(np.isfinite(out) & (out > 0), out, 0.0)
    return out.astype(np.float32)
