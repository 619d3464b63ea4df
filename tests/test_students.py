"""Students, LoRA/adapters/heads and the distillation config: structure and invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from geod.pipeline.errors import ConfigError, StudentError
from geod.stage2_distill.adapters import lora_target_names, trainable_parameter_names
from geod.stage2_distill.config import DataConfig, DistillConfig, LossConfig, RunConfig, StudentConfig, apply_overrides
from geod.stage2_distill.model import DistillModel, cell_centres, sample_grid
from geod.stage2_distill.students import create_student, save_base


@pytest.mark.parametrize("name, prefix", [("tiny-clip", 1), ("tiny-siglip", 0)])
def test_block_grids_are_the_towers_patch_tokens(name, prefix):
    student = create_student(StudentConfig(name_or_path=name))
    pixels = torch.randn(2, 3, 64, 64)
    grids = student(pixels)
    assert len(grids) == student.num_layers == 4
    assert all(g.shape == (2, 64, 8, 8) for g in grids)
    hidden = student.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    for layer, grid in enumerate(grids):
        tokens = hidden[layer + 1][:, prefix:]  # hidden_states[0] is the embedding output
        # Row-major token order: token r * w + c is grid cell (r, c).
        assert torch.allclose(grid[:, :, 2, 5], tokens[:, 2 * 8 + 5], atol=1e-6)
        assert torch.allclose(grid.flatten(2).transpose(1, 2), tokens, atol=1e-6)


def test_other_input_sizes_interpolate_position_embeddings():
    student = create_student(StudentConfig(name_or_path="tiny-clip", image_size=(48, 96)))
    assert student.patch_grid() == (6, 12)
    grids = student(torch.randn(1, 3, 48, 96))
    assert grids[-1].shape == (1, 64, 6, 12)
    with pytest.raises(StudentError, match="not a multiple of its patch size 8"):
        create_student(StudentConfig(name_or_path="tiny-clip", image_size=(50, 64)))


def test_tiny_students_are_seeded():
    a = create_student(StudentConfig(name_or_path="tiny-clip", seed=3))
    b = create_student(StudentConfig(name_or_path="tiny-clip", seed=3))
    c = create_student(StudentConfig(name_or_path="tiny-clip", seed=4))
    wa, wb, wc = (s.tower.encoder.layers[0].self_attn.q_proj.weight for s in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_preprocess_resizes_and_normalises_with_the_processor_config(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-siglip"))
    save_base(student, tmp_path / "model")
    processor = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.25, 0.5, 0.75]
    processor["image_std"] = [0.5, 0.25, 0.125]
    processor["size"] = {"height": 32, "width": 48}
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(processor))
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "model")))
    assert loaded.image_size == (32, 48) and loaded.family == "siglip"
    image = np.full((21, 37, 3), 102, np.uint8)  # 0.4 after rescaling
    pixels = loaded.preprocess([image, image])
    assert pixels.shape == (2, 3, 32, 48)
    expected = [(0.4 - 0.25) / 0.5, (0.4 - 0.5) / 0.25, (0.4 - 0.75) / 0.125]
    assert torch.allclose(pixels[0, :, 5, 7], torch.tensor(expected), atol=1e-5)


def test_a_processor_size_off_the_patch_grid_is_rounded_down_to_whole_patches(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-siglip"))
    save_base(student, tmp_path / "model")
    processor = json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())
    patch = student.patch_size
    processor["size"] = {"height": 4 * patch + patch // 2, "width": 6 * patch + patch - 1}
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(processor))
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "model")))
    assert loaded.image_size == (4 * patch, 6 * patch)
    assert loaded.preprocess([np.zeros((10, 10, 3), np.uint8)]).shape[-2:] == (4 * patch, 6 * patch)
    with pytest.raises(StudentError, match="not a multiple"):  # an explicit size is taken as given
        create_student(StudentConfig(name_or_path=str(tmp_path / "model"), image_size=(4 * patch + 1, 6 * patch)))


def test_saved_tower_loads_back_identically(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-clip", seed=7))
    save_base(student, tmp_path / "clip")
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "clip")))
    assert loaded.source["kind"] == "local" and loaded.preprocessing == student.preprocessing
    pixels = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(x, y) for x, y in zip(student(pixels), loaded(pixels)))


def test_bad_student_names_are_clear_errors(tmp_path):
    with pytest.raises(StudentError, match="not a known student"):
        create_student(StudentConfig(name_or_path=str(tmp_path / "missing")))
    student = create_student(StudentConfig(name_or_path="tiny-clip"))
    student.tower.save_pretrained(tmp_path / "no_processor")
    with pytest.raises(StudentError, match="preprocessor_config.json"):
        create_student(StudentConfig(name_or_path=str(tmp_path / "no_processor")))


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-qwen2_5_vl"])
def test_attention_implementation_applies_to_the_whole_model_and_keeps_the_features(name, tmp_path):
    from transformers import PretrainedConfig

    size = (32, 48)
    default = create_student(StudentConfig(name_or_path=name, image_size=size))
    eager = create_student(StudentConfig(name_or_path=name, image_size=size, attn_implementation="eager"))
    assert default.tower.config._attn_implementation == "sdpa"
    model = eager.vlm() if eager.is_vlm else eager.tower
    configs = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    assert len(configs) > 1 and all(c._attn_implementation == "eager" for c in configs)  # a VLM's LM too
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for x, y in zip(default(pixels), eager(pixels)):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    # The saved base does not carry the choice: an export, or a machine without the kernels, uses its default.
    save_base(eager, tmp_path / "base")
    assert "attn_implementation" not in (tmp_path / "base" / "config.json").read_text()


def test_bad_attention_settings_are_clear_errors():
    with pytest.raises(StudentError, match="student.attn_implementation='nonsense'"):
        create_student(StudentConfig(name_or_path="tiny-clip", attn_implementation="nonsense"))
    with pytest.raises(StudentError, match="timm ViT picks its own"):
        create_student(StudentConfig(name_or_path="tiny-timm", attn_implementation="sdpa"))
    with pytest.raises(ConfigError, match="student.attn_implementation"):
        StudentConfig(attn_implementation="")


def _resolved(**kwargs) -> tuple[StudentConfig, object]:
    cfg = StudentConfig(name_or_path="tiny-clip", **kwargs)
    student = create_student(cfg)
    return cfg.resolved(student.num_layers, student.image_size), student


def test_exactly_the_configured_parameters_are_trainable():
    cfg, student = _resolved(lora_layers=(1, -1), lora_targets=("q_proj", "v_proj"), adapter_dim=8,
                             lora_rank=2)
    assert cfg.lora_layers == (1, 3)
    model = DistillModel(student, cfg)
    lora = [f"student.tower.base_model.model.encoder.layers.{layer}.self_attn.{proj}.lora_{ab}.default.weight"
            for layer in (1, 3) for proj in ("q_proj", "v_proj") for ab in ("A", "B")]
    adapters = [f"student.block_adapters.{layer}.{part}.{kind}" for layer in (1, 3) for part in ("down", "up")
                for kind in ("weight", "bias")]
    heads = ["refine.conv.weight", "refine.conv.bias"] + [f"depth_head.{m}.{k}" for m in ("proj", "norm", "out")
                                                          for k in ("weight", "bias")]
    assert trainable_parameter_names(model) == sorted(lora + adapters + heads)
    # Base weights stay frozen, and LoRA has the configured rank.
    assert not model.student.base_model().encoder.layers[1].self_attn.q_proj.base_layer.weight.requires_grad
    assert model.student.base_model().encoder.layers[3].self_attn.v_proj.lora_A["default"].weight.shape == (2, 64)


def test_no_adapters_no_refine_and_k_proj_targets():
    cfg, student = _resolved(lora_layers=(0,), lora_targets=("k_proj",), adapter_dim=0, refine_head=False)
    names = trainable_parameter_names(DistillModel(student, cfg))
    assert [n for n in names if "lora" in n] == [
        "student.tower.base_model.model.encoder.layers.0.self_attn.k_proj.lora_A.default.weight",
        "student.tower.base_model.model.encoder.layers.0.self_attn.k_proj.lora_B.default.weight"]
    assert not any("block_adapters" in n or n.startswith("refine") for n in names)


def test_unknown_lora_target_is_an_error():
    cfg, student = _resolved(lora_targets=("qkv",))
    with pytest.raises(ConfigError, match="qkv"):
        lora_target_names(student, cfg.lora_layers, cfg.lora_targets)


def test_step_zero_features_equal_the_base_model_and_lora_acts_only_from_its_first_block():
    cfg, student = _resolved(lora_layers=(2, 3), adapter_dim=16)
    base_cfg, base_student = _resolved(lora_rank=0, adapter_dim=0, refine_head=False)
    model, base = DistillModel(student, cfg).eval(), DistillModel(base_student, base_cfg, lora=False).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.features(pixels), base.features(pixels)
        for key in ("match", "depth", "cost"):
            assert torch.equal(ours[key], theirs[key]), key
        for name, parameter in model.named_parameters():
            if "lora_B" in name or ".up." in name:
                parameter.normal_(std=0.5)
        grids, base_grids = model.student(pixels), base.student(pixels)
    assert torch.equal(grids[0], base_grids[0]) and torch.equal(grids[1], base_grids[1])
    assert not torch.allclose(grids[2], base_grids[2]) and not torch.allclose(grids[3], base_grids[3])


def test_sampling_at_cell_centres_returns_the_cells():
    grid = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    samples = sample_grid(grid, cell_centres(3, 4)[None])
    assert torch.allclose(samples[0], grid[0].flatten(1).T, atol=1e-5)


def test_layer_defaults_follow_the_method_for_a_12_block_encoder():
    cfg = StudentConfig().resolved(12, (224, 224))
    assert cfg.lora_layers == tuple(range(4, 12))
    assert cfg.depth_layers == cfg.cost_layers == (4, 5, 6, 7)
    assert cfg.match_layer == 11
    with pytest.raises(ConfigError, match="block 12 does not exist"):
        StudentConfig(depth_layers=(12,)).resolved(12, (224, 224))


def test_config_round_trip_overrides_and_validation(tmp_path):
    cfg = DistillConfig(data=DataConfig(shards="d"), run=RunConfig(out=tmp_path),
                        student=StudentConfig(image_size=(32, 48), lora_layers=(1, 2)), loss=LossConfig(w_kl=0.5))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DistillConfig.from_dict(data) == cfg
    changed = DistillConfig.from_dict(apply_overrides(data, ["optim.lr=0.001", "student.lora_targets=[\"q_proj\"]",
                                                            "data.split=val"]))
    assert changed.optim.lr == 0.001 and changed.student.lora_targets == ("q_proj",) and changed.data.split == "val"
    with pytest.raises(ConfigError, match="unknown keys"):
        DistillConfig.from_dict({**data, "optim": {**data["optim"], "learning_rate": 1}})
    with pytest.raises(ConfigError, match="batch_size"):
        DataConfig(shards="d", batch_size=0)
    with pytest.raises(ConfigError, match="tiny_overrides"):
        StudentConfig(tiny_overrides={"depth": 3})


def test_uint8_pixels_normalised_as_tensors_equal_the_array_path_bitwise():
    from geod.stage2_distill.students import Preprocessing

    # CLIP's mean and std: values whose float32 arithmetic rounds differently from a float64 one.
    prep = Preprocessing(image_size=(12, 20), mean=(0.48145466, 0.4578275, 0.40821073),
                         std=(0.26862954, 0.26130258, 0.27577711))
    images = [np.random.default_rng(seed).integers(0, 256, (15, 17, 3), dtype=np.uint8) for seed in range(3)]
    raw = torch.from_numpy(np.stack([prep.resize_only(image) for image in images]))
    assert raw.dtype == torch.uint8 and raw.shape == (3, 3, 12, 20)
    expected = torch.from_numpy(np.stack([prep(image) for image in images]))
    assert torch.equal(prep.normalise_tensor(raw), expected)
    assert torch.equal(prep.normalise_tensor(raw[0]), expected[0])
    with pytest.raises(ValueError, match="uint8"):
        prep.resize_only(images[0].astype(np.float32))
