"""`Mast3rTeacher`: MASt3R behind the `geod.stage1_extract.teacher.Teacher` contract.

Per pair it runs the network on (A, B) and (B, A) with one encoding of each image (B's depth needs B's
points in B's own frame, which only the swapped pass gives), matches A's and B's descriptors with the
exact reciprocal-NN matcher, and resamples the decoder cross-attention cost volume onto the dataset grid.

Prediction fields (working resolution = the network input of each view, see `preprocess`):
- points_a / points_b: pts3d and pts3d_in_other_view of the (A, B) pass (both in A's frame);
- depth_a: z of points_a; depth_b: z of the (B, A) pass's pts3d (B in B's frame); non-positive z -> 0;
- conf_a: conf of the (A, B) pass; conf_b: conf of the (B, A) pass's view (that of depth_b); 0 where the
  depth is 0;
- matches: reciprocal NN of the descriptors (seed grid, border, confidence quantile of both views' 3D conf),
  conf = min of the two descriptor confidences;
- cost_ab / cost_ba: the layer-averaged cross-attention distributions, resampled to `cost_grid`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from geod.pipeline.errors import ConfigError, TeacherError
from geod.stage1_extract.teacher import Matches, Teacher, TeacherPrediction

if TYPE_CHECKING:
    from geod.data_manifests.views import PairData

RANDOM_WEIGHTS = "random"


@dataclass(kw_only=True)
class Mast3rTeacherConfig:
    """weights: a .safetensors/.pth file, a directory, a hub id, or "random" (seeded random weights of
    `size` "full" or "tiny": tests and benchmarks). precision "auto" = bf16 autocast on CUDA, fp32 on CPU.
    tf32_heads: let the float32 heads use TF32 on CUDA (as the official code does there; 2x faster).
    cost_grid: the dataset's cost-volume grid (rows, cols), i.e. the layout's (grid_h, grid_w)."""

    weights: str
    size: str = "full"
    seed: int = 0
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"
    attn_impl: str = "sdpa"
    tf32_heads: bool = True
    long_side: int = 512
    batch_size: int = 8
    cost_grid: tuple[int, int] = (24, 32)
    cost_temperature: float = 1.0
    match_stride: int = 16
    match_offset: int | None = None
    match_border: int = 3
    match_conf_quantile: float = 0.10
    match_max_iter: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights:
            raise ConfigError("mast3r teacher: option 'weights' (path, hub id or 'random') is required")
        if self.size not in ("full", "tiny"):
            raise ConfigError(f"mast3r teacher: size must be 'full' or 'tiny', got {self.size!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"mast3r teacher: precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.long_side < 16 or self.long_side % 16 or self.batch_size < 1:
            raise ConfigError("mast3r teacher: long_side must be a multiple of 16 and batch_size >= 1")
        self.cost_grid = tuple(int(v) for v in self.cost_grid)
        if len(self.cost_grid) != 2 or min(self.cost_grid) < 1:
            raise ConfigError(f"mast3r teacher: cost_grid must be (rows, cols) >= 1, got {self.cost_grid}")
        if not self.cost_temperature > 0:
            raise ConfigError(f"mast3r teacher: cost_temperature must be > 0, got {self.cost_temperature}")


class Mast3rTeacher(Teacher):
    name = "mast3r"
    scene_units = "metres"  # the published checkpoint regresses metric points

    def __init__(self, **options) -> None:
        import torch  # noqa: PLC0415

        from geod.stage1_extract.mast3r.matching import MatchConfig  # noqa: PLC0415

        self.cfg = cfg = Mast3rTeacherConfig(**options)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if cfg.device == "auto" else cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"mast3r teacher: device {cfg.device!r} asked for, but CUDA is not available")
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self.match_cfg = MatchConfig(stride=cfg.match_stride, offset=cfg.match_offset, border=cfg.match_border,
                                     conf_quantile=cfg.match_conf_quantile, max_iter=cfg.match_max_iter)
        self.model, self._weights_path = self._build_model()
        self._sha256 = None

    def _build_model(self):
        import torch  # noqa: PLC0415

        from geod.stage1_extract.mast3r.checkpoint import load_mast3r  # noqa: PLC0415
        from geod.stage1_extract.mast3r.config import Mast3rConfig  # noqa: PLC0415
        from geod.stage1_extract.mast3r.network import Mast3rNet, randomize_  # noqa: PLC0415

        cfg = self.cfg
        if cfg.weights == RANDOM_WEIGHTS:
            net_cfg = Mast3rConfig() if cfg.size == "full" else Mast3rConfig.tiny()
            model = randomize_(Mast3rNet(net_cfg, attn_impl=cfg.attn_impl), cfg.seed)
            return model.to(self.device).eval().requires_grad_(False), None
        loaded = load_mast3r(cfg.weights, device=self.device, dtype=torch.float32, attn_impl=cfg.attn_impl,
                             revision=cfg.revision)
        return loaded.model, loaded.weights_path

    # ------------------------------------------------------------------ contract
    def identity(self) -> dict:
        if self._weights_path is None:
            return {"id": f"random:{self.cfg.size}:seed{self.cfg.seed}", "sha256": None}
        if self._sha256 is None:
            from geod.pipeline.hashing import sha256_file  # noqa: PLC0415

            self._sha256 = sha256_file(self._weights_path)
        return {"id": self.cfg.weights, "sha256": self._sha256}

    def config(self) -> dict:
        out = asdict(self.cfg)
        out["cost_grid"] = list(self.cfg.cost_grid)
        out.update(device=self.device.type, precision=self.precision, network=self.model.cfg.to_dict(),
                   match=asdict(self.match_cfg))
        return out

    def preprocessing(self) -> dict:
        net = self.model.cfg
        return {"resize": f"long side {self.cfg.long_side}, both sides rounded to multiples of "
                          f"{net.patch_size}, aspect kept to within half a patch, no crop; PIL Lanczos when "
                          "shrinking, bicubic when enlarging",
                "normalisation": {"scale": 1 / 255, "mean": list(net.image_mean), "std": list(net.image_std)},
                "orientation": "as stored (portrait images are not transposed)"}

    def predict(self, pairs: list[PairData]) -> list[TeacherPrediction]:
        from geod.stage1_extract.mast3r.preprocess import resize_image, working_size  # noqa: PLC0415

        long_side = self.cfg.long_side
        inputs = []
        for pair in pairs:
            views = []
            for view in (pair.view_a, pair.view_b):
                size = working_size(*view.image.shape[:2], long_side=long_side, multiple=self.model.cfg.patch_size)
                views.append(resize_image(view.image, size))
            inputs.append(views)
        # pairs of the same sizes run together; results go back in input order
        groups: dict[tuple, list[int]] = {}
        for i, (img_a, img_b) in enumerate(inputs):
            groups.setdefault((img_a.shape, img_b.shape), []).append(i)
        results: list[TeacherPrediction | None] = [None] * len(pairs)
        for members in groups.values():
            for start in range(0, len(members), self.cfg.batch_size):
                chunk = members[start:start + self.cfg.batch_size]
                preds = self._predict_batch([inputs[i] for i in chunk], [pairs[i].row.pair_id for i in chunk])
                for i, pred in zip(chunk, preds):
                    results[i] = pred
        return results

    # ------------------------------------------------------------------ internals
    def _predict_batch(self, images: list, pair_ids: list[str]) -> list[TeacherPrediction]:
        import torch  # noqa: PLC0415

        from geod.stage1_extract.mast3r.matching import reciprocal_matches  # noqa: PLC0415
        from geod.stage1_extract.mast3r.preprocess import to_network_input  # noqa: PLC0415

        net = self.model.cfg
        img_a = to_network_input([a for a, _ in images], net.image_mean, net.image_std).to(self.device)
        img_b = to_network_input([b for _, b in images], net.image_mean, net.image_std).to(self.device)
        with torch.inference_mode():
            ab, ba = self.model.forward_symmetric(img_a, img_b, cost_temperature=self.cfg.cost_temperature,
                                                  amp_dtype=self.amp_dtype, head_tf32=self.cfg.tf32_heads)
            matches = reciprocal_matches(ab.desc_a, ab.desc_b, ab.conf_a, ab.conf_b, cfg=self.match_cfg)
            cost_ab = resample_cost(ab.cost_ab, ab.grid_a, ab.grid_b, self.cfg.cost_grid)
            cost_ba = resample_cost(ab.cost_ba, ab.grid_b, ab.grid_a, self.cfg.cost_grid)
            host = {name: t.float().cpu().numpy() for name, t in (
                ("pts_a", ab.pts3d_a), ("pts_b", ab.pts3d_b), ("conf_a", ab.conf_a), ("own_b", ba.pts3d_a),
                ("own_conf_b", ba.conf_a), ("dconf_a", ab.desc_conf_a), ("dconf_b", ab.desc_conf_b),
                ("cost_ab", cost_ab), ("cost_ba", cost_ba))}
        preds = []
        for i, pair_id in enumerate(pair_ids):
            depth_a, conf_a = _depth_and_conf(host["pts_a"][i], host["conf_a"][i])
            depth_b, conf_b = _depth_and_conf(host["own_b"][i], host["own_conf_b"][i])
            pred = TeacherPrediction(depth_a=depth_a, depth_b=depth_b, conf_a=conf_a, conf_b=conf_b,
                                     points_a=host["pts_a"][i], points_b=host["pts_b"][i],
                                     matches=_normalised_matches(matches[i], host["dconf_a"][i], host["dconf_b"][i]),
                                     cost_ab=host["cost_ab"][i], cost_ba=host["cost_ba"][i])
            for name in ("points_a", "points_b", "cost_ab", "cost_ba"):
                if not np.isfinite(getattr(pred, name)).all():
                    raise TeacherError(f"pair {pair_id!r}: mast3r output {name} has non-finite values")
            preds.append(pred)
        return preds


def _depth_and_conf(points: np.ndarray, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = points[..., 2]
    valid = np.isfinite(z) & (z > 0) & np.isfinite(conf)
    return (np.where(valid, z, 0.0).astype(np.float32), np.where(valid, conf, 0.0).astype(np.float32))


def _normalised_matches(match, desc_conf_a: np.ndarray, desc_conf_b: np.ndarray) -> Matches:
    """Pixel matches -> normalised (u, v) with pixel centres at (x + 0.5) / w."""
    xy_a = match.xy_a.cpu().numpy()
    xy_b = match.xy_b.cpu().numpy()
    (h_a, w_a), (h_b, w_b) = desc_conf_a.shape, desc_conf_b.shape
    uv_a = ((xy_a + 0.5) / np.array([w_a, h_a])).astype(np.float32)
    uv_b = ((xy_b + 0.5) / np.array([w_b, h_b])).astype(np.float32)
    conf = np.minimum(desc_conf_a[xy_a[:, 1], xy_a[:, 0]], desc_conf_b[xy_b[:, 1], xy_b[:, 0]])
    return Matches(xy_a=uv_a.reshape(-1, 2), xy_b=uv_b.reshape(-1, 2), conf=conf.astype(np.float32))


def resample_cost(cost, grid_q: tuple[int, int], grid_k: tuple[int, int], out_grid: tuple[int, int]):
    """[B, Nq, Nk] distributions on patch grids -> [B, P, P] on out_grid (bilinear over the query grid and
    over the key grid), rows renormalised to sum 1 (also when the grids already agree: the sink
    suppression leaves rows slightly short of 1)."""
    import torch.nn.functional as F  # noqa: PLC0415

    if grid_q == out_grid and grid_k == out_grid:
        return cost / cost.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    batch = cost.shape[0]
    gh, gw = out_grid
    x = cost.transpose(1, 2).reshape(batch, -1, *grid_q)                   # keys as channels
    x = F.interpolate(x, size=out_grid, mode="bilinear", align_corners=False, antialias=True)
    x = x.reshape(batch, -1, gh * gw).transpose(1, 2)                      # [B, P, Nk]
    x = x.reshape(batch * gh * gw, 1, *grid_k)
    x = F.interpolate(x, size=out_grid, mode="bilinear", align_corners=False, antialias=True)
    x = x.reshape(batch, gh * gw, gh * gw).clamp(min=0)
    return x / x.sum(dim=-1, keepdim=True).clamp(min=1e-12)
