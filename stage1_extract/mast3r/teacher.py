"""`Mast3rTeacher`: MASt3R behind the `geod.stage1_extract.teacher.Teacher` contract.

Per pair it runs the network on (A, B) and (B, A) with one encoding of each image (B's depth needs B's
points in B's own frame, which only the swapped pass gives; of that pass only those points are computed,
see `Mast3rNet.forward_teacher`), matches A's and B's descriptors with the exact reciprocal-NN matcher,
and resamples the decoder cross-attention cost volume onto the dataset grid.

Throughput: `input_preparer` resizes in the caller's loader processes; `predict` may run in several threads at
once: the networks run one at a time under a lock (in order, with the process-wide TF32 switches they
set), while on CUDA the matching, cost resampling and copies run on a side stream beside the next batch's
network. Results are those of a serial run.

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
from geod.stage1_extract.teacher import CostTopK, Matches, Teacher, TeacherPrediction

if TYPE_CHECKING:
    from geod.data_manifests.views import PairData

RANDOM_WEIGHTS = "random"


@dataclass(kw_only=True)
class Mast3rTeacherConfig:
    """weights: a .safetensors/.pth file, a directory, a hub id, or "random" (seeded random weights of
    `size` "full" or "tiny": tests and benchmarks). precision "auto" = bf16 autocast on CUDA, fp32 on CPU.
    tf32_heads: let the float32 heads use TF32 on CUDA (as the official code does there; 2x faster).
    head_precision: "auto" (on CUDA "mixed" when tf32_heads, else "fp32"; "fp32" elsewhere), "fp32", "tf32",
    "mixed" (descriptor MLP in bf16, DPT in TF32) or "bf16" (both heads under bf16 autocast; activations
    stay float32; fastest, but the furthest from float32 in depth).
    compile: "auto" (= "default" on CUDA), "none" or a torch.compile mode for the encoder/decoder blocks
    (CUDA only; the first batch of each input size pays the compilation, about 15 s).
    cost_grid: the dataset's cost-volume grid (rows, cols), i.e. the layout's (grid_h, grid_w).
    cost_topk: also reduce the cost volume to its quantised top-k on the device (the layout's topk; the
    target builder falls back to the dense rows when they differ); None, or more than the grid's patches
    (no such layout exists) = dense rows only."""

    weights: str
    size: str = "full"
    seed: int = 0
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"
    attn_impl: str = "sdpa"
    tf32_heads: bool = True
    head_precision: str = "auto"
    compile: str = "auto"
    long_side: int = 512
    batch_size: int = 8
    cost_grid: tuple[int, int] = (24, 32)
    cost_temperature: float = 1.0
    cost_topk: int | None = 32
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
        if self.head_precision not in ("auto", "fp32", "tf32", "mixed", "bf16"):
            raise ConfigError(f"mast3r teacher: head_precision must be auto, fp32, tf32, mixed or bf16, got "
                              f"{self.head_precision!r}")
        if self.compile not in ("auto", "none", "default", "max-autotune-no-cudagraphs", "max-autotune"):
            raise ConfigError(f"mast3r teacher: compile must be auto, none, default, max-autotune-no-cudagraphs "
                              f"or max-autotune, got {self.compile!r}")
        if self.long_side < 16 or self.long_side % 16 or self.batch_size < 1:
            raise ConfigError("mast3r teacher: long_side must be a multiple of 16 and batch_size >= 1")
        self.cost_grid = tuple(int(v) for v in self.cost_grid)
        if len(self.cost_grid) != 2 or min(self.cost_grid) < 1:
            raise ConfigError(f"mast3r teacher: cost_grid must be (rows, cols) >= 1, got {self.cost_grid}")
        if self.cost_topk is not None and self.cost_topk < 1:
            raise ConfigError(f"mast3r teacher: cost_topk must be >= 1 or None, got {self.cost_topk}")
        if not self.cost_temperature > 0:
            raise ConfigError(f"mast3r teacher: cost_temperature must be > 0, got {self.cost_temperature}")


class Mast3rTeacher(Teacher):
    name = "mast3r"
    scene_units = "metres"  # the published checkpoint regresses metric points
    concurrent_predict = True

    def __init__(self, **options) -> None:
        import threading  # noqa: PLC0415

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
        head_precision = cfg.head_precision
        if head_precision == "auto":  # measured choice on CUDA: see benchmarks/bench_mast3r.py
            head_precision = "mixed" if cfg.tf32_heads and self.device.type == "cuda" else "fp32"
        self.head_precision = head_precision
        self.model, self._weights_path = self._build_model()
        if self.device.type == "cuda":
            from geod.stage1_extract.mast3r.network import compile_blocks, heads_channels_last  # noqa: PLC0415

            heads_channels_last(self.model)
            if cfg.compile != "none":
                compile_blocks(self.model, "default" if cfg.compile == "auto" else cfg.compile)
        self._sha256 = None
        self._device_lock = threading.Lock()  # one batch's network at a time (TF32 switches are global)
        self._stream_lock = threading.Lock()
        self._post_stream = None  # created on first use (CUDA)

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
    @classmethod
    def layout_options(cls, layout) -> dict:
        return {"cost_grid": (layout.grid_h, layout.grid_w), "cost_topk": layout.topk}

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
        out.update(device=self.device.type, precision=self.precision, head_precision=self.head_precision,
                   network=self.model.cfg.to_dict(), match=asdict(self.match_cfg))
        return out

    def preprocessing(self) -> dict:
        net = self.model.cfg
        return {"resize": f"long side {self.cfg.long_side}, both sides rounded to multiples of "
                          f"{net.patch_size}, aspect kept to within half a patch, no crop; PIL Lanczos when "
                          "shrinking, bicubic when enlarging",
                "normalisation": {"scale": 1 / 255, "mean": list(net.image_mean), "std": list(net.image_std)},
                "orientation": "as stored (portrait images are not transposed)"}

    def input_preparer(self) -> ResizeToWorking:
        """Resizes both images of a pair to the working resolution (what `predict` would do)."""
        return ResizeToWorking(long_side=self.cfg.long_side, multiple=self.model.cfg.patch_size)

    def predict(self, pairs: list[PairData]) -> list[TeacherPrediction]:
        resize = self.input_preparer().image
        inputs = [(resize(pair.view_a.image), resize(pair.view_b.image)) for pair in pairs]
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

        from geod.stage1_extract.mast3r.preprocess import host_batch, normalise_batch  # noqa: PLC0415

        net = self.model.cfg
        cuda = self.device.type == "cuda"
        # stacking and pinning happen before taking the lock, while the other thread's batch runs
        host_a = host_batch([a for a, _ in images], self.device)
        host_b = host_batch([b for _, b in images], self.device)
        with self._device_lock, torch.inference_mode():
            img_a = normalise_batch(host_a, net.image_mean, net.image_std, self.device)
            img_b = normalise_batch(host_b, net.image_mean, net.image_std, self.device)
            network_out = self._network(img_a, img_b)
            if not cuda:
                host_t, match_t = self._to_host(*self._post_process(network_out, switch_guard=None), cuda=False)
            else:
                network_done = torch.cuda.Event()
                network_done.record()
        if cuda:
            # Matching, cost resampling and packing run on a side stream, after this batch's network but
            # beside the next batch's (the lock is free again), so the device is never left waiting for
            # this thread's host syncs. Values do not depend on the overlap.
            stream = self._side_stream()
            with torch.cuda.stream(stream), torch.inference_mode():
                stream.wait_event(network_done)
                for tensor in _tensors_of(network_out):
                    tensor.record_stream(stream)  # their memory is not reused before this stream is done
                host_t, match_t = self._to_host(*self._post_process(network_out, switch_guard=self._device_lock),
                                                cuda=True)
                done = torch.cuda.Event()
                done.record()
            done.synchronize()
        host = {name: (t.numpy().astype(np.uint16) if name.endswith(("_index", "_prob")) else t.numpy())
                for name, t in host_t.items()}
        preds = []
        for i, pair_id in enumerate(pair_ids):
            if not host["finite"][i]:
                bad = [name for name, flag in zip(_FINITE_CHECKED, host["finite_each"][i]) if not flag]
                raise TeacherError(f"pair {pair_id!r}: mast3r output {', '.join(bad)} has non-finite values")
            xy_a, xy_b = (t.numpy() for t in match_t[i])
            tops = {}
            if self._device_topk():
                tops = {f"cost_{d}_topk": CostTopK(index=host[f"top_{d}_index"][i], prob=host[f"top_{d}_prob"][i],
                                                   valid=host[f"top_{d}_valid"][i]) for d in ("ab", "ba")}
            pred = TeacherPrediction(**tops, depth_a=host["depth_a"][i], depth_b=host["depth_b"][i],
                                     conf_a=host["conf_a"][i], conf_b=host["conf_b"][i],
                                     points_a=host["pts_a"][i], points_b=host["pts_b"][i],
                                     matches=_normalised_matches(xy_a, xy_b, host["dconf_a"][i], host["dconf_b"][i]),
                                     cost_ab=host["cost_ab"][i] if "cost_ab" in host else None,
                                     cost_ba=host["cost_ba"][i] if "cost_ba" in host else None)
            preds.append(pred)
        return preds

    def _device_topk(self) -> bool:
        k = self.cfg.cost_topk
        return k is not None and k <= self.cfg.cost_grid[0] * self.cfg.cost_grid[1]

    def _side_stream(self):
        """The stream of the post-processing, shared by the predicting threads (their work interleaves on it;
        values do not depend on that) and kept for the teacher's life, so that the memory cached for it
        serves every batch and every run."""
        import torch  # noqa: PLC0415

        with self._stream_lock:
            if self._post_stream is None:
                self._post_stream = torch.cuda.Stream(self.device)
            return self._post_stream

    def _network(self, img_a, img_b) -> tuple:
        """forward_teacher: ((A, B) output, B's points in B's frame, their confidence)."""
        return self.model.forward_teacher(img_a, img_b, cost_temperature=self.cfg.cost_temperature,
                                          amp_dtype=self.amp_dtype, head_precision=self.head_precision)

    def _to_host(self, device_out: dict, matches: list, *, cuda: bool) -> tuple[dict, list]:
        """Copies into pinned host memory, queued behind the batch's kernels (valid once they are done)."""
        import torch  # noqa: PLC0415

        if self._device_topk():  # the host needs only the top-k rows: 2 x 2.4 MB less per pair to copy
            device_out = {name: t for name, t in device_out.items() if name not in ("cost_ab", "cost_ba")}
        if not cuda:
            return device_out, [(m.xy_a, m.xy_b) for m in matches]
        host_t = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                  for name, t in device_out.items()}
        match_t = [(m.xy_a.to("cpu", non_blocking=True), m.xy_b.to("cpu", non_blocking=True)) for m in matches]
        return host_t, match_t

    def _post_process(self, network_out: tuple, *, switch_guard):
        """Matcher, cost resampling and the per-pixel packing, on the device.
        Returns ({name: float32 tensor [B, ...]}, matches)."""
        import torch  # noqa: PLC0415

        from geod.stage1_extract.mast3r.matching import reciprocal_matches  # noqa: PLC0415

        ab, own_b, own_conf_b = network_out
        matches = reciprocal_matches(ab.desc_a, ab.desc_b, ab.conf_a, ab.conf_b, cfg=self.match_cfg,
                                     switch_guard=switch_guard)
        cost_ab = resample_cost(ab.cost_ab, ab.grid_a, ab.grid_b, self.cfg.cost_grid)
        cost_ba = resample_cost(ab.cost_ba, ab.grid_b, ab.grid_a, self.cfg.cost_grid)
        depth_a, conf_a = _depth_and_conf(ab.pts3d_a, ab.conf_a)
        depth_b, conf_b = _depth_and_conf(own_b, own_conf_b)
        out = {"pts_a": ab.pts3d_a, "pts_b": ab.pts3d_b, "depth_a": depth_a, "conf_a": conf_a,
               "depth_b": depth_b, "conf_b": conf_b, "dconf_a": ab.desc_conf_a, "dconf_b": ab.desc_conf_b,
               "cost_ab": cost_ab, "cost_ba": cost_ba}
        out = {name: t.float().contiguous() for name, t in out.items()}
        finite_each = torch.stack([out[name].flatten(1).isfinite().all(dim=1) for name in _FINITE_CHECKED], dim=1)
        out["finite_each"], out["finite"] = finite_each, finite_each.all(dim=1)
        if self._device_topk():
            for direction in ("ab", "ba"):
                index, prob, valid = topk_quantize_torch(out[f"cost_{direction}"], self.cfg.cost_topk)
                out.update({f"top_{direction}_index": index, f"top_{direction}_prob": prob,
                            f"top_{direction}_valid": valid})
        return out, matches


_FINITE_CHECKED = ("pts_a", "pts_b", "cost_ab", "cost_ba")


def _tensors_of(network_out: tuple) -> list:
    """Every tensor of forward_teacher's output (the Mast3rOutput's fields and the two extra tensors)."""
    import torch  # noqa: PLC0415

    ab, *rest = network_out
    return [t for t in (*vars(ab).values(), *rest) if isinstance(t, torch.Tensor)]


@dataclass(frozen=True)
class ResizeToWorking:
    """Images resized to MASt3R's working resolution (see `preprocess`). Holds two integers, so loader
    processes receive it cheaply; an image already at that size is passed through."""

    long_side: int
    multiple: int

    def image(self, image: np.ndarray) -> np.ndarray:
        from geod.stage1_extract.mast3r.preprocess import resize_image, working_size  # noqa: PLC0415

        return resize_image(image, working_size(*image.shape[:2], long_side=self.long_side, multiple=self.multiple))

    def __call__(self, pair: PairData) -> PairData:
        from dataclasses import replace  # noqa: PLC0415

        return replace(pair, view_a=replace(pair.view_a, image=self.image(pair.view_a.image)),
                       view_b=replace(pair.view_b, image=self.image(pair.view_b.image)))


def _depth_and_conf(points, conf):
    """z of the points and their confidence, both 0 where z is not a finite positive number (or the
    confidence is not finite). Tensors [B, H, W, 3] and [B, H, W] -> two float32 [B, H, W]."""
    import torch  # noqa: PLC0415

    z = points[..., 2].float()
    conf = conf.float()
    valid = torch.isfinite(z) & (z > 0) & torch.isfinite(conf)
    zero = torch.zeros((), dtype=torch.float32, device=z.device)
    return torch.where(valid, z, zero), torch.where(valid, conf, zero)


def topk_quantize_torch(rows, topk: int):
    """`geod.stage1_extract.cost_volume.topk_quantize` for a batch [B, P, P] of rows, on the rows' device:
    float64 renormalisation, floor quantisation, distinct keys (value, then lower index), top-k in
    decreasing order. Returns index uint16 [B, P, k], prob uint16 [B, P, k], valid bool [B, P] (int32
    carriers on the device, converted on the host side by numpy views). The row sums are reduced in
    another order than numpy's, so a value lying exactly on a quantisation step within float64 rounding
    could come out one step apart; the result is deterministic for a device."""
    import torch  # noqa: PLC0415

    from geod.pipeline.format_spec import PROB_SCALE  # noqa: PLC0415

    rows = rows.double()
    n_cols = rows.shape[-1]
    if n_cols > 1 << 16:
        raise TeacherError(f"{n_cols} patches: indices must fit in uint16")
    total = rows.sum(dim=-1)
    valid = torch.isfinite(total) & (total > 0) & (rows.amin(dim=-1) >= 0)
    scale = torch.where(valid, 1.0 / torch.where(valid, total, torch.ones_like(total)), torch.zeros_like(total))
    prob = torch.where(valid[..., None], rows * scale[..., None], torch.zeros_like(rows))
    quantised = torch.clamp(torch.floor(prob * PROB_SCALE), max=PROB_SCALE).to(torch.int64)
    key = (quantised << 16) | ((1 << 16) - 1 - torch.arange(n_cols, device=rows.device))
    top_keys = torch.topk(key, topk, dim=-1, largest=True, sorted=True).values
    index = (1 << 16) - 1 - (top_keys & 0xFFFF)
    values = top_keys >> 16
    bump = valid & (values[..., 0] == 0)  # a valid row keeps some mass (as the numpy version)
    values[..., 0] = torch.where(bump, torch.ones_like(values[..., 0]), values[..., 0])
    index = torch.where(valid[..., None], index, torch.zeros_like(index))
    values = torch.where(valid[..., None], values, torch.zeros_like(values))
    # uint16 has few device kernels: carry as int32 and narrow on the host
    return index.to(torch.int32), values.to(torch.int32), valid


def _normalised_matches(xy_a: np.ndarray, xy_b: np.ndarray, desc_conf_a: np.ndarray,
                        desc_conf_b: np.ndarray) -> Matches:
    """Pixel matches -> normalised (u, v) with pixel centres at (x + 0.5) / w."""
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
