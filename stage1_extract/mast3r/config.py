"""Architecture configuration of the MASt3R network (catmlp+dpt head), and its translation from the official
checkpoint's constructor arguments.

The defaults are the published checkpoint `MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric`; `tiny()` is the
same architecture at toy width for tests. This module imports no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from geod.pipeline.errors import ConfigError, TeacherError

# Constructor arguments of the official class that do not change the network we build: the image size only
# sized a position grid the RoPE variant never uses, the patch-embedding class only decides whether
# portrait images arrive transposed (we always take images in their true orientation), and the rest are
# training switches.
_IGNORED_OFFICIAL_ARGS = frozenset({
    "img_size", "patch_embed_cls", "landscape_only", "freeze", "mask_ratio", "output_width_ratio",
})

# Defaults of the official constructors (CroCoNet, AsymmetricCroCo3DStereo, AsymmetricMASt3R), applied when a
# checkpoint's argument list leaves one out, exactly as the official code would.
_OFFICIAL_DEFAULTS = {
    "patch_size": 16, "enc_embed_dim": 768, "enc_depth": 12, "enc_num_heads": 12, "dec_embed_dim": 512,
    "dec_depth": 8, "dec_num_heads": 16, "mlp_ratio": 4, "norm_im2_in_dec": True, "pos_embed": "cosine",
    "output_mode": "pts3d", "head_type": "linear", "depth_mode": ("exp", -math.inf, math.inf),
    "conf_mode": ("exp", 1, math.inf), "desc_mode": "norm", "two_confs": False, "desc_conf_mode": None,
}


@dataclass(kw_only=True)
class Mast3rConfig:
    """Sizes and output conventions of the network. Every field changes either the weights' shapes or the
    outputs, so the resolved config travels with every dataset a teacher builds."""

    patch_size: int = 16
    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    rope_base: float = 100.0
    desc_dim: int = 24
    two_confs: bool = True            # a separate confidence channel for the descriptors
    conf_vmin: float = 1.0            # conf = conf_vmin + exp(x)
    desc_conf_vmin: float = 0.0       # desc_conf = desc_conf_vmin + exp(x)
    dpt_feature_dim: int = 256
    dpt_layer_dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    local_hidden_factor: float = 4.0  # hidden width of the local-feature MLP, times its input width
    # Input normalisation of the network: (pixel / 255 - mean) / std, i.e. [-1, 1].
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    name: str = field(default="vitlarge-basedecoder-512-catmlpdpt")

    def __post_init__(self) -> None:
        self.dpt_layer_dims = tuple(int(d) for d in self.dpt_layer_dims)
        self.image_mean = tuple(float(m) for m in self.image_mean)
        self.image_std = tuple(float(s) for s in self.image_std)
        if self.patch_size != 16:
            # The DPT head upsamples by a fixed 16 (two x2 fusions after x4 and a final x2).
            raise ConfigError(f"Mast3rConfig.patch_size must be 16, got {self.patch_size}")
        for prefix in ("enc", "dec"):
            dim, heads = getattr(self, f"{prefix}_embed_dim"), getattr(self, f"{prefix}_num_heads")
            if heads < 1 or dim % heads:
                raise ConfigError(f"Mast3rConfig.{prefix}_embed_dim {dim} is not divisible by "
                                  f"{prefix}_num_heads {heads}")
            if (dim // heads) % 4:
                raise ConfigError(f"Mast3rConfig: {prefix} head width {dim // heads} must be a multiple of 4 "
                                  "(2D RoPE rotates two halves, each in pairs)")
        if self.enc_depth < 1:
            raise ConfigError(f"Mast3rConfig.enc_depth must be >= 1, got {self.enc_depth}")
        if self.dec_depth < 4:
            raise ConfigError(f"Mast3rConfig.dec_depth must be >= 4 (the DPT head reads 3 decoder layers), "
                              f"got {self.dec_depth}")
        if len(self.dpt_layer_dims) != 4 or min(self.dpt_layer_dims) < 1:
            raise ConfigError(f"Mast3rConfig.dpt_layer_dims must be 4 positive ints, got {self.dpt_layer_dims}")
        if self.desc_dim < 1 or self.dpt_feature_dim < 2 or self.mlp_ratio <= 0:
            raise ConfigError("Mast3rConfig: desc_dim, dpt_feature_dim and mlp_ratio must be positive")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError("Mast3rConfig.image_mean/image_std must be 3 values, std > 0")

    @property
    def dpt_hooks(self) -> tuple[int, int, int, int]:
        """Which of [encoder output, decoder layer 1..L] feed the DPT head (official: [0, L/2, 3L/4, L])."""
        depth = self.dec_depth
        return (0, depth * 2 // 4, depth * 3 // 4, depth)

    @property
    def local_out_dim(self) -> int:
        """Output width of the local-feature MLP: (desc + desc conf) channels per pixel of a patch."""
        return (self.desc_dim + int(self.two_confs)) * self.patch_size ** 2

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("dpt_layer_dims", "image_mean", "image_std"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Mast3rConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Mast3rConfig: unknown keys {unknown}")
        return cls(**data)

    @classmethod
    def tiny(cls) -> Mast3rConfig:
        """The same architecture at toy width, for tests (about 1 M parameters)."""
        return cls(enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=4,
                   dec_num_heads=2, desc_dim=8, dpt_feature_dim=16, dpt_layer_dims=(8, 8, 16, 16),
                   local_hidden_factor=1.0, name="tiny")

    @classmethod
    def from_official_kwargs(cls, kwargs: dict, *, source: str = "checkpoint") -> Mast3rConfig:
        """Translate the official constructor's keyword arguments (a checkpoint's config.json, or the
        arguments in a .pth's model string) into a config; unsupported values raise TeacherError."""
        args = {**_OFFICIAL_DEFAULTS, **kwargs}

        def fail(key: str, why: str) -> TeacherError:
            return TeacherError(f"{source}: argument {key}={args.get(key)!r}: {why}")

        if args["head_type"] != "catmlp+dpt":
            raise fail("head_type", "only the 'catmlp+dpt' head is implemented")
        match = re.fullmatch(r"pts3d\+desc(\d+)", str(args["output_mode"]))
        if not match:
            raise fail("output_mode", "expected 'pts3d+desc<N>'")
        rope = re.fullmatch(r"RoPE(\d+(?:\.\d*)?)", str(args["pos_embed"]))
        if not rope:
            raise fail("pos_embed", "only RoPE position embeddings are implemented")
        if "norm" not in str(args["desc_mode"]):
            raise fail("desc_mode", "only L2-normalised descriptors are implemented")
        if not args["norm_im2_in_dec"]:
            raise fail("norm_im2_in_dec", "only the normalised-memory decoder is implemented")
        if _mode(args["depth_mode"]) != ("exp", -math.inf, math.inf):
            raise fail("depth_mode", "only ('exp', -inf, inf) is implemented")
        conf_mode = _mode(args["conf_mode"])
        if conf_mode[0] != "exp" or conf_mode[2] != math.inf:
            raise fail("conf_mode", "only ('exp', vmin, inf) is implemented")
        desc_conf_mode = conf_mode if args["desc_conf_mode"] is None else _mode(args["desc_conf_mode"])
        if desc_conf_mode[0] != "exp" or desc_conf_mode[2] != math.inf:
            raise fail("desc_conf_mode", "only ('exp', vmin, inf) is implemented")
        unknown = sorted(set(kwargs) - set(_OFFICIAL_DEFAULTS) - _IGNORED_OFFICIAL_ARGS)
        if unknown:
            raise TeacherError(f"{source}: unsupported constructor arguments {unknown}")
        try:
            return cls(patch_size=int(args["patch_size"]), enc_embed_dim=int(args["enc_embed_dim"]),
                       enc_depth=int(args["enc_depth"]), enc_num_heads=int(args["enc_num_heads"]),
                       dec_embed_dim=int(args["dec_embed_dim"]), dec_depth=int(args["dec_depth"]),
                       dec_num_heads=int(args["dec_num_heads"]), mlp_ratio=float(args["mlp_ratio"]),
                       rope_base=float(rope.group(1)), desc_dim=int(match.group(1)),
                       two_confs=bool(args["two_confs"]), conf_vmin=float(conf_mode[1]),
                       desc_conf_vmin=float(desc_conf_mode[1]), name="official")
        except ConfigError as error:
            raise TeacherError(f"{source}: {error}") from None


def _mode(value) -> tuple:
    """A (mode, vmin, vmax) triple as read from JSON (list, maybe with 'inf' strings) or a literal."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return (value,)
    name, vmin, vmax = value
    return (str(name), float(vmin), float(vmax))
