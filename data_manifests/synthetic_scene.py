"""Procedural textured rooms and an exact numpy ray caster for them (used by `synthetic`).

A scene is an axis-aligned room [0, Lx] x [0, Ly] x [0, Lz] (world z up, metres) holding boxes that stand on
the floor and may be rotated about the vertical axis. Every surface carries its own solid texture: several
octaves of smooth value noise (each octave rotated and offset differently, so the sum is not periodic),
colour mixing between a per-surface palette, soft coloured discs, and floor/wall tiles with grout lines.
Shading is Lambertian-like and view independent, so a surface point looks the same from every camera.

Camera conventions (the manifest's, see `geod.data_manifests.schema`): OpenCV axes (x right, y down,
z forward); poses are camera-to-world; K maps camera points to pixel-index coordinates whose pixel centres
are at integers, so pixel (column i, row j) is rendered along the ray K^-1 [i, j, 1] (z component 1, hence
the ray parameter t of a hit IS its depth z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROOM_SURFACES = 6  # surface ids 0..5: x=0, x=Lx, y=0, y=Ly, floor z=0, ceiling z=Lz; boxes follow
_NOISE_TABLE = 32  # lattice period of the value-noise table, in cells of the octave using it
_LIGHT = np.array([0.35, -0.45, 0.82]) / np.linalg.norm([0.35, -0.45, 0.82])


@dataclass(frozen=True, eq=False)
class Box:
    """A box standing in the room: centre (world), half extents (box frame) and yaw about world z."""

    centre: np.ndarray
    half: np.ndarray
    yaw: float

    @property
    def rotation(self) -> np.ndarray:
        """World-from-box rotation."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True, eq=False)
class SurfaceTexture:
    """Parameters of one surface's solid texture."""

    palette: np.ndarray  # 3 x RGB
    octaves: np.ndarray  # O x 3 x 3, world -> lattice (rotation / cell size)
    offsets: np.ndarray  # O x 3, lattice offsets
    blob_centres: np.ndarray  # B x 3
    blob_radii: np.ndarray  # B
    blob_colours: np.ndarray  # B x RGB
    tile_size: float  # 0 = no tiles
    tile_axes: tuple[int, int]  # world axes spanning the tiled plane


@dataclass(frozen=True, eq=False)
class SceneGeometry:
    """A room with boxes and textures; `cast` and `shade` render it."""

    room: np.ndarray  # (Lx, Ly, Lz)
    boxes: tuple[Box, ...]
    textures: tuple[SurfaceTexture, ...]  # one per surface id
    noise_table: np.ndarray  # T^3 x 4 float32 lattice values in [0, 1)

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First hit of rays o + t d (t > 0): returns t [N], surface id [N] (-1 = none), unit normal [N, 3]."""
        origins = np.broadcast_to(origins, directions.shape)
        t, surface, normal = _cast_room(self.room, origins, directions)
        for k, box in enumerate(self.boxes):
            t_box, n_box = _cast_box(box, origins, directions)
            closer = t_box < t
            t = np.where(closer, t_box, t)
            surface = np.where(closer, ROOM_SURFACES + k, surface)
            normal = np.where(closer[:, None], n_box, normal)
        return t, surface, normal

    def shade(self, points: np.ndarray, surface: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """RGB in [0, 1] of surface points (view independent)."""
        colour = np.zeros(points.shape, dtype=np.float64)
        for sid in np.unique(surface[surface >= 0]):
            mask = surface == sid
            colour[mask] = _texture_colour(self.textures[sid], self.noise_table, points[mask])
        light = 0.55 + 0.45 * (0.5 + 0.5 * (normal @ _LIGHT))
        return np.clip(colour * light[:, None], 0.0, 1.0)


def camera_rays(intrinsics: np.ndarray, pose: np.ndarray, xy_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World origin and direction (z component 1 in the camera frame) of rays at pixel-index points [N, 2]."""
    homog = np.concatenate([xy_index, np.ones((len(xy_index), 1))], axis=1)
    d_cam = homog @ np.linalg.inv(intrinsics).T
    d_cam = d_cam / d_cam[:, 2:3]  # exact z = 1 so that t is the depth
    return pose[:3, 3], d_cam @ pose[:3, :3].T


def pixel_grid(width: int, height: int) -> np.ndarray:
    """Pixel-index coordinates (x, y) of every pixel centre, row-major [H*W, 2]."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)


def render(geometry: SceneGeometry, intrinsics: np.ndarray, poses: np.ndarray, width: int,
           height: int) -> tuple[np.ndarray, np.ndarray]:
    """Render views at poses [F, 4, 4]: RGB float [F, H, W, 3] in [0, 1] and depth z [F, H, W] in metres
    (inf where no hit)."""
    grid = pixel_grid(width, height)
    rays = [camera_rays(intrinsics, pose, grid) for pose in poses]
    origins = np.concatenate([np.broadcast_to(o, d.shape) for o, d in rays])
    dirs = np.concatenate([d for _, d in rays])
    t, surface, normal = geometry.cast(origins, dirs)
    hit = surface >= 0
    rgb = np.zeros((len(t), 3))
    rgb[hit] = geometry.shade(origins[hit] + t[hit, None] * dirs[hit], surface[hit], normal[hit])
    shape = (len(poses), height, width)
    return rgb.reshape(*shape, 3), np.where(hit, t, np.inf).reshape(shape)


def make_geometry(room: np.ndarray, boxes: tuple[Box, ...], rng: np.random.Generator) -> SceneGeometry:
    """Draw a distinct texture for every surface of the room and its boxes."""
    table = rng.random((_NOISE_TABLE ** 3, 4), dtype=np.float32)
    textures = []
    for sid in range(ROOM_SURFACES + len(boxes)):
        if sid < ROOM_SURFACES:
            axis, high = divmod(sid, 2)
            tile_axes = tuple(a for a in range(3) if a != axis)
            # Floors are mostly tiled, walls sometimes; grout lines give sharp, learnable corners.
            tiled = rng.random() < (0.8 if sid == 4 else 0.35)
            area = float(np.prod([room[a] for a in tile_axes]))
            blob_points = _plane_samples(room, axis, float(high) * room[axis], rng, _blob_count(area))
        else:
            tile_axes, tiled = (0, 1), False
            half = boxes[sid - ROOM_SURFACES].half
            area = 8.0 * float(half[0] * half[1] + half[1] * half[2] + half[0] * half[2])
            blob_points = _box_samples(boxes[sid - ROOM_SURFACES], rng, _blob_count(area))
        textures.append(_random_texture(rng, blob_points, tile_axes, tiled))
    return SceneGeometry(room=room, boxes=boxes, textures=tuple(textures), noise_table=table)


def _random_texture(rng: np.random.Generator, blob_points: np.ndarray, tile_axes: tuple[int, int],
                    tiled: bool) -> SurfaceTexture:
    base_hue = rng.random()
    hues = (base_hue + np.array([0.0, rng.uniform(0.08, 0.3), rng.uniform(0.35, 0.65)])) % 1.0
    palette = np.stack([_hsv(h, rng.uniform(0.15, 0.7), rng.uniform(0.35, 0.9)) for h in hues])
    cells = np.array([1.1, 0.5, 0.23, 0.1, 0.045]) * rng.uniform(0.8, 1.25)
    octaves = np.stack([_random_rotation(rng) / c for c in cells])
    offsets = rng.uniform(0, _NOISE_TABLE, size=(len(cells), 3))
    n_blobs = len(blob_points)
    blob_colours = np.stack([_hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.15, 1.0))
                             for _ in range(n_blobs)])
    return SurfaceTexture(palette=palette, octaves=octaves, offsets=offsets, blob_centres=blob_points,
                          blob_radii=rng.uniform(0.03, 0.15, size=n_blobs), blob_colours=blob_colours,
                          tile_size=float(rng.uniform(0.3, 0.6)) if tiled else 0.0, tile_axes=tile_axes)


def _texture_colour(tex: SurfaceTexture, table: np.ndarray, points: np.ndarray) -> np.ndarray:
    noise = [_value_noise(table, points @ m.T + off) for m, off in zip(tex.octaves, tex.offsets)]
    points = points.astype(np.float32)
    mix1 = _smoothstep(0.3, 0.7, noise[0][:, 0])
    mix2 = _smoothstep(0.45, 0.75, noise[1][:, 1]) * 0.85
    colour = tex.palette[0] + mix1[:, None] * (tex.palette[1] - tex.palette[0])
    colour = colour + mix2[:, None] * (tex.palette[2] - colour)
    colour = colour + 0.22 * (noise[2][:, :3] - 0.5) + 0.15 * (noise[3][:, :3] - 0.5)
    colour = colour + (0.45 * (noise[3][:, 3] - 0.5) + 0.35 * (noise[4][:, 3] - 0.5))[:, None]
    if tex.tile_size > 0:
        a, b = tex.tile_axes
        coords = points[:, [a, b]] / tex.tile_size
        cell = np.floor(coords)
        # A per-tile brightness/colour jitter read from the noise table: tiles are alike but never identical.
        cells3 = np.concatenate([cell, np.zeros((len(cell), 1))], axis=1).astype(np.int64)
        jitter = np.take(table, _lattice_index(cells3), axis=0)
        colour = colour * (0.8 + 0.4 * jitter[:, :3])
        edge = np.min(np.minimum(coords - cell, cell + 1 - coords), axis=1) * tex.tile_size
        grout = _smoothstep(0.012, 0.006, edge)
        colour = colour + grout[:, None] * (0.18 - colour)
    sq = (points ** 2).sum(axis=1)[:, None] - 2.0 * points @ tex.blob_centres.T \
        + (tex.blob_centres ** 2).sum(axis=1)[None]
    dist = np.sqrt(np.maximum(sq, 0.0))
    alpha = np.clip((tex.blob_radii - dist) / 0.012, 0.0, 1.0)
    for k in np.flatnonzero(alpha.any(axis=0)):  # in order: later discs are painted over earlier ones
        rows = np.flatnonzero(alpha[:, k])
        colour[rows] += alpha[rows, k, None] * (tex.blob_colours[k] - colour[rows])
    return colour


def _value_noise(table: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Smooth (smoothstep-weighted trilinear) value noise at lattice coordinates q [N, 3] -> [N, 4]."""
    base = np.floor(q)
    w = (q - base).astype(np.float32)
    w = w * w * (3.0 - 2.0 * w)
    low = base.astype(np.int32) & (_NOISE_TABLE - 1)  # the table size is a power of two
    high = (low + 1) & (_NOISE_TABLE - 1)
    ix = np.stack([low[:, 0], high[:, 0]], axis=1) * (_NOISE_TABLE * _NOISE_TABLE)
    iy = np.stack([low[:, 1], high[:, 1]], axis=1) * _NOISE_TABLE
    iz = np.stack([low[:, 2], high[:, 2]], axis=1)
    index = ix[:, :, None, None] + iy[:, None, :, None] + iz[:, None, None, :]
    wx, wy, wz = (np.stack([1.0 - w[:, a], w[:, a]], axis=1) for a in range(3))
    weight = wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]
    n = len(q)
    values = np.take(table, index.reshape(n * 8), axis=0).reshape(n, 8, -1)
    return np.einsum("nk,nkc->nc", weight.reshape(n, 8), values)


def _lattice_index(cells: np.ndarray) -> np.ndarray:
    c = cells & (_NOISE_TABLE - 1)
    return (c[:, 0] * _NOISE_TABLE + c[:, 1]) * _NOISE_TABLE + c[:, 2]


def _cast_room(room: np.ndarray, origins: np.ndarray, dirs: np.ndarray):
    # The camera is inside the room, so each ray leaves it through exactly one wall: the nearest exit.
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)
    exits = np.where(safe > 0, (room - origins) / safe, -origins / safe)
    axis = np.argmin(exits, axis=1)
    rows = np.arange(len(dirs))
    t = exits[rows, axis]
    positive = safe[rows, axis] > 0
    surface = 2 * axis + positive
    normal = np.zeros_like(dirs)
    normal[rows, axis] = np.where(positive, -1.0, 1.0)
    return t, surface, normal


def _cast_box(box: Box, origins: np.ndarray, dirs: np.ndarray):
    t = np.full(len(dirs), np.inf)
    normal = np.zeros_like(dirs)
    # Cheap bounding-sphere rejection first; the slab test then runs only on rays that may hit.
    v = box.centre - origins
    vd = np.einsum("ij,ij->i", v, dirs)
    dist2 = np.einsum("ij,ij->i", v, v) - vd * vd / np.einsum("ij,ij->i", dirs, dirs)
    rays = np.flatnonzero(dist2 <= float(box.half @ box.half))
    if rays.size == 0:
        return t, normal
    rot = box.rotation
    o = -v[rays] @ rot
    d = dirs[rays] @ rot
    d = np.where(np.abs(d) < 1e-12, 1e-12, d)
    t1 = (-box.half - o) / d
    t2 = (box.half - o) / d
    t_enter = np.minimum(t1, t2)
    t_near = t_enter.max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    hit = (t_near <= t_far) & (t_near > 1e-9)
    axis = np.argmax(t_enter, axis=1)
    rows = np.arange(len(rays))
    local = np.zeros_like(d)
    local[rows, axis] = -np.sign(d[rows, axis])
    t[rays] = np.where(hit, t_near, np.inf)
    normal[rays] = local @ rot.T
    return t, normal


def _blob_count(area: float) -> int:
    return int(np.clip(round(1.5 * area), 3, 40))


def _plane_samples(room, axis, value, rng, n):
    points = rng.uniform(0, 1, size=(n, 3)) * room
    points[:, axis] = value
    return points


def _box_samples(box: Box, rng, n):
    local = rng.uniform(-1, 1, size=(n, 3)) * box.half
    face = rng.integers(0, 3, size=n)
    rows = np.arange(n)
    local[rows, face] = np.sign(local[rows, face]) * box.half[face]
    return local @ box.rotation.T + box.centre


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
