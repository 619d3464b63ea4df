"""Loading MASt3R weights: safetensors dirs/files, official-style .pth (safely), hub ids, strict errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import pytest
import torch

from geod.pipeline.errors import TeacherError
from geod.stage1_extract.mast3r.checkpoint import (
    load_mast3r, parse_model_string, read_config_json, save_mast3r,
)
from geod.stage1_extract.mast3r.config import Mast3rConfig
from geod.stage1_extract.mast3r.network import Mast3rNet, randomize_

# The published checkpoint's training argument string (naver/mast3r README).
OFFICIAL_MODEL = ("AsymmetricMASt3R(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
                  "head_type='catmlp+dpt', output_mode='pts3d+desc24', depth_mode=('exp', -inf, inf), "
                  "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
                  "dec_embed_dim=768, dec_depth=12, dec_num_heads=12, two_confs=True, "
                  "desc_conf_mode=('exp', 0, inf))")


@pytest.fixture(scope="module")
def tiny():
    return randomize_(Mast3rNet(Mast3rConfig.tiny()), seed=3).eval()


def outputs_equal(a, b):
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        oa, ob = a(x, y, cost_temperature=1.0), b(x, y, cost_temperature=1.0)
    return all(torch.equal(getattr(oa, k), getattr(ob, k)) for k in ("pts3d_a", "desc_b", "cost_ab"))


def official_style_state(model):
    """The state dict as the official .pth holds it: with the `scratch.layer_rn.i` aliases."""
    state = dict(model.state_dict())
    for head in ("downstream_head1", "downstream_head2"):
        for i in range(4):
            state[f"{head}.dpt.scratch.layer_rn.{i}.weight"] = state[f"{head}.dpt.scratch.layer{i + 1}_rn.weight"]
    return state


def test_safetensors_directory_and_file_round_trip(tiny, tmp_path):
    weights = save_mast3r(tiny, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    for source in (tmp_path / "ckpt", weights):
        loaded = load_mast3r(source)
        assert loaded.config == tiny.cfg and loaded.weights_path == weights
        assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
        assert outputs_equal(tiny, loaded.model)


def test_official_pth_loads_without_unpickling_code(tiny, tmp_path):
    folder = tmp_path / "pth"
    folder.mkdir()
    args = argparse.Namespace(model=OFFICIAL_MODEL, lr=1e-4, epochs=50, output_dir="checkpoints/x")
    torch.save({"model": official_style_state(tiny), "args": args, "epoch": 49}, folder / "ckpt.pth")
    (folder / "config.json").write_text(json.dumps({"geod_mast3r": tiny.cfg.to_dict()}))
    loaded = load_mast3r(folder / "ckpt.pth")  # aliases dropped, strict match, config from config.json
    assert outputs_equal(tiny, loaded.model)


def test_official_model_string_parses_to_the_published_architecture():
    kwargs = parse_model_string(OFFICIAL_MODEL)
    assert kwargs["depth_mode"] == ("exp", -float("inf"), float("inf"))
    cfg = Mast3rConfig.from_official_kwargs(kwargs)
    assert cfg.to_dict() == {**Mast3rConfig().to_dict(), "name": "official"}
    with pytest.raises(TeacherError, match="not a literal|unexpected name"):
        parse_model_string("AsymmetricMASt3R(enc_depth=__import__('os').getpid())")
    with pytest.raises(TeacherError, match="head_type"):
        Mast3rConfig.from_official_kwargs({**kwargs, "head_type": "linear"})
    with pytest.raises(TeacherError, match="unsupported constructor arguments"):
        Mast3rConfig.from_official_kwargs({**kwargs, "wpose": True})


def test_official_config_json_form(tmp_path):
    path = tmp_path / "config.json"
    kwargs = {**parse_model_string(OFFICIAL_MODEL), "landscape_only": False}
    path.write_text(json.dumps(kwargs))  # the hub stores -Infinity / Infinity
    assert read_config_json(path).enc_depth == 24
    path.write_text("[1, 2]")
    with pytest.raises(TeacherError, match="config.json"):
        read_config_json(path)


def test_pickled_code_is_refused(tiny, tmp_path):
    marker = tmp_path / "was-unpickled"

    class Trap:  # unpickling this would call os.makedirs(marker)
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    torch.save({"model": dict(tiny.state_dict()), "args": Trap()}, tmp_path / "evil.pth")
    with pytest.raises(TeacherError, match="safetensors"):
        load_mast3r(tmp_path / "evil.pth")
    assert not marker.exists()


def test_mismatches_are_named(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["dec_blocks2.3.norm_y.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["enc_norm.weight"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    (tmp_path / "config.json").write_text(json.dumps({"geod_mast3r": tiny.cfg.to_dict()}))
    with pytest.raises(TeacherError) as error:
        load_mast3r(tmp_path / "bad.pth")
    message = str(error.value)
    assert "dec_blocks2.3.norm_y.bias" in message and "extra.weight" in message
    assert "enc_norm.weight: checkpoint (5,), model (32,)" in message

    aliased = official_style_state(tiny)
    aliased["downstream_head2.dpt.scratch.layer_rn.1.weight"] = torch.zeros_like(
        aliased["downstream_head2.dpt.scratch.layer2_rn.weight"])
    torch.save({"model": aliased}, tmp_path / "bad.pth")
    with pytest.raises(TeacherError, match="alias of downstream_head2.dpt.scratch.layer2_rn.weight"):
        load_mast3r(tmp_path / "bad.pth")


def test_hub_id_goes_through_snapshot_download(tiny, tmp_path, monkeypatch):
    save_mast3r(tiny, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=fake_snapshot_download))
    loaded = load_mast3r("someone/mast3r-tiny", revision="v1")
    assert outputs_equal(tiny, loaded.model)
    assert calls == [("someone/mast3r-tiny", "v1", ("*.safetensors", "config.json"))]
    with pytest.raises(TeacherError, match="no such file"):
        load_mast3r(tmp_path / "missing" / "model.safetensors")
