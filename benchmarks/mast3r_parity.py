"""Parity of geod's MASt3R network with the official implementation (not run in CI).

Needs a clone of naver/mast3r with its submodules (dust3r, dust3r/croco) and einops installed. The official
code is imported from that clone only for the duration of this tool.

    # write the committed list of official keys and shapes (built on the meta device, no weights needed)
    python benchmarks/mast3r_parity.py keys --official /path/to/mast3r

    # compare outputs on random weights, float64 on CPU (needs ~6 GB of RAM at full size)
    python benchmarks/mast3r_parity.py compare --official /path/to/mast3r --sizes 64x96,96x64,64x64

    # or on real weights (a .safetensors / .pth file, a directory or a hub id)
    python benchmarks/mast3r_parity.py compare --official /path/to/mast3r --weights naver/MASt3R_...

Both models hold the very same tensors (ours is loaded from the official state dict with assign=True). The
official forward is composed from its own methods (encode, decode, heads) because its `forward` casts the
head inputs to float32, which would hide float64 differences. The reference cost volume is computed the
plain way, from the per-head attention logits of the official cross-attention modules.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KEYS_PATH = REPO / "stage1_extract" / "mast3r" / "official_keys.json"
INF = math.inf
# The published checkpoint's constructor arguments (mast3r README), as the official loader rewrites them
# for inference: PatchEmbedDust3R and landscape_only=False (images in their true orientation).
OFFICIAL_KWARGS = dict(pos_embed="RoPE100", patch_embed_cls="PatchEmbedDust3R", img_size=(512, 512),
                       head_type="catmlp+dpt", output_mode="pts3d+desc24", depth_mode=("exp", -INF, INF),
                       conf_mode=("exp", 1, INF), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16,
                       dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True,
                       desc_conf_mode=("exp", 0, INF), landscape_only=False)
# A smaller configuration the official code also accepts (its head factory wants dec_depth > 9).
SMALL_KWARGS = {**OFFICIAL_KWARGS, "enc_embed_dim": 128, "enc_depth": 3, "enc_num_heads": 4,
                "dec_embed_dim": 96, "dec_depth": 10, "dec_num_heads": 3}


def import_official(root: Path):
    root = root.resolve()
    if not (root / "mast3r" / "model.py").is_file():
        sys.exit(f"{root} is not a clone of naver/mast3r (mast3r/model.py missing)")
    sys.path.insert(0, str(root))
    from mast3r.model import AsymmetricMASt3R  # noqa: PLC0415 - the user's clone, imported on demand
    return AsymmetricMASt3R


def official_state_keys(model) -> tuple[list, dict]:
    """Canonical (name, shape) list and the alias map of the official state dict: `scratch.layer_rn.i` is
    a second name of `scratch.layer{i+1}_rn` (a ModuleList over the same convolutions)."""
    entries, aliases, seen = [], {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        entries.append([name, list(tensor.shape)])
    return entries, aliases


def cmd_keys(args) -> None:
    official_cls = import_official(args.official)
    with torch.device("meta"):
        model = official_cls(**OFFICIAL_KWARGS)
    entries, aliases = official_state_keys(model)
    payload = {
        "checkpoint": "naver/MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric",
        "source": args.source_note,
        "constructor": {k: _jsonable(v) for k, v in OFFICIAL_KWARGS.items()},
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "keys": dict(entries),
        "aliases": aliases,
    }
    text = json.dumps(payload, indent=1, allow_nan=False)
    # one line per list of scalars (shapes, modes), so the file reads as one key per line
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + ", ".join(
        part.strip() for part in m.group(1).split(",")) + "]", text)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}: {len(entries)} keys, {len(aliases)} aliases, {payload['n_parameters']:,} parameters")


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def build_pair(official_cls, kwargs: dict, weights: str | None, seed: int, dtype: torch.dtype):
    from geod.stage1_extract.mast3r.checkpoint import load_state_dict_from  # noqa: PLC0415
    from geod.stage1_extract.mast3r.config import Mast3rConfig  # noqa: PLC0415
    from geod.stage1_extract.mast3r.network import Mast3rNet, randomize_  # noqa: PLC0415

    with torch.device("meta"):
        official = official_cls(**kwargs)
    official = official.to(dtype).to_empty(device="cpu").eval()
    if weights:
        state, _, _ = load_state_dict_from(weights)
        _, aliases = official_state_keys(official)
        state = {k: v.to(dtype) for k, v in state.items()}
        state.update({alias: state[canon] for alias, canon in aliases.items()})
        official.load_state_dict(state, strict=True)
    else:
        randomize_(official, seed)
        with torch.no_grad():  # raw point norms of a few units, as trained, so expm1 stays in range
            for head in (official.downstream_head1, official.downstream_head2):
                head.dpt.head[-1].weight.mul_(0.2)
    cfg_kwargs = {k: v for k, v in kwargs.items() if k not in ("landscape_only",)}
    cfg = Mast3rConfig.from_official_kwargs(cfg_kwargs)
    entries, aliases = official_state_keys(official)
    shared = {k: v for k, v in official.state_dict().items() if k not in aliases}
    models = {}
    for impl in ("math", "sdpa"):
        with torch.device("meta"):
            ours = Mast3rNet(cfg, attn_impl=impl)
        ours.load_state_dict(shared, strict=True, assign=True)
        models[impl] = ours.eval()
    return official, models


def official_forward(official, img_a, img_b, temperature: float) -> dict:
    """The official outputs plus the plain-formula cost volume from its own cross-attention q and k."""
    captured = {1: [], 2: []}

    def hook(side):
        def fn(module, inputs, _output):
            query, key, _value, qpos, kpos = inputs
            batch, nq, dim = query.shape
            heads = module.num_heads
            q = module.projq(query).reshape(batch, nq, heads, dim // heads).permute(0, 2, 1, 3)
            k = module.projk(key).reshape(batch, key.shape[1], heads, dim // heads).permute(0, 2, 1, 3)
            q, k = module.rope(q, qpos), module.rope(k, kpos)
            captured[side].append(((q @ k.transpose(-2, -1)) * module.scale).mean(dim=1))
        return fn

    handles = [blk.cross_attn.register_forward_hook(hook(1)) for blk in official.dec_blocks]
    handles += [blk.cross_attn.register_forward_hook(hook(2)) for blk in official.dec_blocks2]
    batch = len(img_a)
    view1 = {"img": img_a, "true_shape": torch.tensor([img_a.shape[-2:]] * batch),
             "instance": [str(i) for i in range(batch)]}
    view2 = {"img": img_b, "true_shape": torch.tensor([img_b.shape[-2:]] * batch),
             "instance": [str(batch + i) for i in range(batch)]}
    try:
        (shape1, shape2), (feat1, feat2), (pos1, pos2) = official._encode_symmetrized(view1, view2)
        dec1, dec2 = official._decoder(feat1, pos1, feat2, pos2)
        res1 = official._downstream_head(1, list(dec1), shape1)
        res2 = official._downstream_head(2, list(dec2), shape2)
    finally:
        for handle in handles:
            handle.remove()
    maps_ab, maps_ba = [], []
    for l_ab, l_ba in zip(captured[1], captured[2]):
        sym = (l_ab + l_ba.transpose(1, 2)) / 2
        for sym_dir, out in ((sym, maps_ab), (sym.transpose(1, 2), maps_ba)):
            probs = (sym_dir / temperature).softmax(dim=-1)
            for b in range(len(probs)):
                probs[b, :, 0] = probs[b].min()
            out.append(probs)
    return {"pts3d_a": res1["pts3d"], "conf_a": res1["conf"], "desc_a": res1["desc"],
            "desc_conf_a": res1["desc_conf"], "pts3d_b": res2["pts3d"], "conf_b": res2["conf"],
            "desc_b": res2["desc"], "desc_conf_b": res2["desc_conf"],
            "cost_ab": torch.stack(maps_ab).mean(0), "cost_ba": torch.stack(maps_ba).mean(0)}


def parse_sizes(text: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """'64x96,96x64,64x96+96x64' -> [((h_a, w_a), (h_b, w_b)), ...] (one size = both views)."""
    cases = []
    for item in text.split(","):
        views = [tuple(int(v) for v in part.split("x")) for part in item.split("+")]
        cases.append((views[0], views[-1]))
    return cases


def cmd_compare(args) -> None:
    torch.manual_seed(args.seed)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    kwargs = SMALL_KWARGS if args.config == "small" else OFFICIAL_KWARGS
    official_cls = import_official(args.official)
    official, models = build_pair(official_cls, kwargs, args.weights, args.seed, dtype)
    lines = [f"| size A / B | row | {' | '.join(FIELDS)} |", "|" + "---|" * (len(FIELDS) + 2)]
    worst = 0.0
    with torch.no_grad():
        for (size_a, size_b) in parse_sizes(args.sizes):
            img_a = torch.rand(args.batch, 3, *size_a, dtype=dtype) * 2 - 1
            img_b = torch.rand(args.batch, 3, *size_b, dtype=dtype) * 2 - 1
            ref = official_forward(official, img_a, img_b, args.temperature)
            scale = " | ".join(f"{float(ref[f].abs().max()):.1e}" for f in FIELDS)
            lines.append(f"| {size_a[0]}x{size_a[1]} / {size_b[0]}x{size_b[1]} | max abs official | {scale} |")
            for impl, model in models.items():
                out = vars(model(img_a, img_b, cost_temperature=args.temperature))
                diffs = [max_rel_diff(out[f], ref[f]) for f in FIELDS]
                worst = max(worst, *diffs)
                lines.append(f"| {size_a[0]}x{size_a[1]} / {size_b[0]}x{size_b[1]} | ours ({impl}) | "
                             + " | ".join(f"{d:.1e}" for d in diffs) + " |")
    header = (f"MASt3R parity, config={args.config}, weights={args.weights or f'random seed {args.seed}'}, "
              f"{args.dtype} on CPU, batch {args.batch}, cost temperature {args.temperature}.\n"
              "Rows 'ours': max over elements of |ours - official| / (1 + |official|) per output; rows "
              "'max abs official' give the scale.\n")
    report = header + "\n".join(lines) + f"\n\nworst: {worst:.2e}\n"
    print(report)
    if args.report:
        args.report.write_text(report)


FIELDS = ("pts3d_a", "conf_a", "desc_a", "desc_conf_a", "pts3d_b", "conf_b", "desc_b", "desc_conf_b",
          "cost_ab", "cost_ba")


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over elements of |ours - ref| / (1 + |ref|): absolute for small values, relative for large."""
    if ours.shape != ref.shape:
        raise SystemExit(f"shape mismatch: ours {tuple(ours.shape)} vs official {tuple(ref.shape)}")
    return float(((ours - ref).abs() / (1 + ref.abs())).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    keys = sub.add_parser("keys", help="write official_keys.json from the official architecture")
    keys.add_argument("--official", type=Path, required=True, help="clone of naver/mast3r (with submodules)")
    keys.add_argument("--out", type=Path, default=KEYS_PATH)
    keys.add_argument("--source-note", default="", help="e.g. the commits of mast3r/dust3r/croco used")
    cmp_ = sub.add_parser("compare", help="compare outputs with the official implementation")
    cmp_.add_argument("--official", type=Path, required=True)
    cmp_.add_argument("--weights", default=None, help="checkpoint file, directory or hub id (default: random)")
    cmp_.add_argument("--config", choices=("full", "small"), default="full")
    cmp_.add_argument("--sizes", default="64x96,96x64,64x64,64x96+96x64")
    cmp_.add_argument("--batch", type=int, default=2)
    cmp_.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    cmp_.add_argument("--temperature", type=float, default=0.7)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--report", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    {"keys": cmd_keys, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
