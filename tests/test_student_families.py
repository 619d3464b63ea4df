"""Student families: VLM vision towers (LLaVA, LLaVA-OneVision, PaliGemma, Idefics3, SmolVLM, Qwen2.5-VL)
as students, built from tiny random configs: which block the VLM feeds, raster order, save/load through
from_pretrained, LoRA confined to the tower, training, merging back into the VLM, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.pipeline.errors import ConfigError, StudentError
from geod.stage2_distill import train
from geod.stage2_distill.adapters import merge_lora
from geod.stage2_distill.checkpoint import load_distilled
from geod.stage2_distill.config import DataConfig, DistillConfig, LossConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.data import PairStream, make_loader
from geod.stage2_distill.model import DistillModel
from geod.stage2_distill.students import create_student, save_base
from safetensors.torch import load_file

VLMS = ["tiny-llava", "tiny-llava-onevision", "tiny-paligemma", "tiny-idefics3", "tiny-smolvlm", "tiny-qwen2_5_vl"]
SIZE = (32, 48)  # the toy dataset's image size; a multiple of 16 (Qwen: patch 8 x merge 2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_target_dataset(tmp_path_factory.mktemp("targets"), pairs=8)


def _student(name: str, **kwargs):
    return create_student(StudentConfig(name_or_path=name, image_size=SIZE, **kwargs))


def _resolved(student, **kwargs) -> StudentConfig:
    return StudentConfig(name_or_path=student.name, image_size=SIZE, **kwargs).resolved(student.num_layers,
                                                                                       student.image_size)


@pytest.mark.parametrize("name", VLMS)
def test_the_student_is_the_vlms_own_tower_up_to_the_block_it_feeds(name):
    student = _student(name)
    vlm = student.vlm()
    assert vlm.get_submodule(student.tower_prefix) is student.tower
    assert student.fed_layer == student.num_layers - 1
    # LLaVA feeds hidden_states[-2] (block L-2); the others feed their last block.
    assert student.num_layers == (3 if name == "tiny-llava" else 4) and student.tower_layers == 4
    pixels = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        grids = student(pixels)
    assert len(grids) == student.num_layers and all(g.shape == (2, 64, 4, 6) for g in grids)
    if name == "tiny-qwen2_5_vl":
        return  # window-permuted hidden states: see the raster-order test
    with torch.no_grad():
        extra = {} if student.kind.name == "idefics3" else {"interpolate_pos_encoding": True}
        out = student.tower(pixel_values=pixels, output_hidden_states=True, **extra)
        for layer, grid in enumerate(grids):
            tokens = out.hidden_states[layer + 1][:, student.num_prefix_tokens:]
            assert torch.allclose(grid.flatten(2).transpose(1, 2), tokens, atol=1e-5), layer
        if student.vlm_handle.feeds_final_norm:  # PaliGemma / Idefics3 / SmolVLM feed the normed last block
            assert torch.allclose(student.final_norm(grids[-1]).flatten(2).transpose(1, 2),
                                  out.last_hidden_state, atol=1e-5)


def test_llava_projector_receives_exactly_the_fed_grid(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-llava"))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fed = student(pixels)[student.fed_layer].flatten(2).transpose(1, 2)
        ours = student.vlm().model.multi_modal_projector(fed)
        theirs = torch.stack(list(student.vlm().model.get_image_features(pixel_values=pixels).pooler_output))
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Another vision_feature_layer in the checkpoint moves the fed block, and LoRA cannot go past it.
    save_base(student, tmp_path / "llava")
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    (tmp_path / "llava" / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -3}))
    shallow = create_student(StudentConfig(name_or_path=str(tmp_path / "llava")))
    assert shallow.num_layers == 2 and shallow.describe()["vlm"]["fed_layer"] == 1
    with pytest.raises(ConfigError, match="block 3 does not exist"):
        StudentConfig(lora_layers=(3,)).resolved(shallow.num_layers, shallow.image_size)
    cfg = StudentConfig(lora_layers=(0,)).resolved(shallow.num_layers, shallow.image_size)
    with pytest.raises(ConfigError, match="block 2 is not one the student uses"):
        DistillModel(shallow, dataclasses.replace(cfg, lora_layers=(2,)))


def test_qwen_dense_features_come_back_in_raster_order():
    student = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=(64, 96)))
    visual = student.vlm().model.visual
    assert student.patch_grid() == (8, 12)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        grid = student(pixels)[student.fed_layer]
        out = student.vlm().model.get_image_features(pixel_values=_qwen_rows(pixels),
                                                     image_grid_thw=torch.tensor([[1, 8, 12]] * 2))
        pooled = torch.cat(out.pooler_output)
        # Regroup the raster grid into 2x2 merge units in raster order and merge them as the VLM does.
        batch, dim = grid.shape[:2]
        units = grid.reshape(batch, dim, 4, 2, 6, 2).permute(0, 2, 4, 3, 5, 1).reshape(-1, dim)
        assert torch.allclose(visual.merger(units), pooled, atol=1e-5)
        # The tower's own last_hidden_state is window-permuted: merging it in place gives another order.
        assert not torch.allclose(visual.merger(out.last_hidden_state), pooled, atol=1e-3)
    # In raster order, block 0 (window attention over 4x4-patch windows) is local: changing the top-left
    # 2x2 patches of image 0 moves exactly the cells of the top-left window.
    changed = pixels.clone()
    changed[0, :, :16, :16] += 1.0
    with torch.no_grad():
        moved = (student(changed)[0] - student(pixels)[0]).abs().sum(1)
    window = torch.zeros(8, 12, dtype=torch.bool)
    window[:4, :4] = True
    assert moved[0][window].min() > 0 and moved[0][~window].max() == 0 and moved[1].max() == 0


def _qwen_rows(pixels: torch.Tensor) -> torch.Tensor:
    from geod.stage2_distill.student_families import qwen_flatten

    return qwen_flatten(pixels, patch=8, merge=2, temporal=2)


def test_qwen_patch_rows_match_its_image_processor(tmp_path):
    from transformers import AutoImageProcessor

    student = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=(48, 64)))
    save_base(student, tmp_path / "qwen")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "qwen")
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    theirs = processor(images=[image], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [[1, 6, 8]]
    assert torch.allclose(_qwen_rows(student.preprocess([image])), theirs["pixel_values"], atol=1e-5)


@pytest.mark.parametrize("name", VLMS)
def test_saved_vlm_loads_back_through_from_pretrained(name, tmp_path):
    from transformers import AutoImageProcessor

    student = create_student(StudentConfig(name_or_path=name, seed=3))
    save_base(student, tmp_path / "vlm")
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "vlm")))
    assert (loaded.family, loaded.source["kind"], loaded.tower_prefix) == (student.family, "local",
                                                                           student.tower_prefix)
    assert loaded.preprocessing == student.preprocessing and loaded.num_layers == student.num_layers
    pixels = torch.randn(1, 3, *student.image_size)
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(student(pixels), loaded(pixels), strict=True))
    # The saved processor config is the family's real one (loadable by transformers).
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vlm")
    assert type(processor).__name__.startswith(student.processor_config["image_processor_type"])


def test_a_bf16_checkpoint_keeps_its_language_model_dtype_and_runs_its_tower_in_float32(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl"))
    student.vlm().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # how hub VLMs are usually stored
    (tmp_path / "bf16" / "preprocessor_config.json").write_text(json.dumps(student.processor_config))
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "bf16"), image_size=SIZE))
    tower = {id(p) for p in loaded.tower.parameters()}
    assert loaded.vlm_handle.dtype == torch.bfloat16 and loaded.describe()["vlm"]["dtype"] == "torch.bfloat16"
    assert all(p.dtype == torch.float32 for p in loaded.tower.parameters())
    assert all(p.dtype == torch.bfloat16 for p in loaded.vlm().parameters() if id(p) not in tower)
    with torch.no_grad():
        grids = loaded(torch.randn(1, 3, *SIZE))
    assert grids[-1].dtype == torch.float32 and torch.isfinite(grids[-1]).all()


def test_preprocessing_comes_from_the_vlms_processor_config(tmp_path):
    student = create_student(StudentConfig(name_or_path="tiny-idefics3"))
    assert student.image_size == (64, 64)  # Idefics3 tiles: max_image_size.longest_edge
    save_base(student, tmp_path / "idefics3")
    path = tmp_path / "idefics3" / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    path.write_text(json.dumps({**processor, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.25],
                                "max_image_size": {"longest_edge": 48}}))
    loaded = create_student(StudentConfig(name_or_path=str(tmp_path / "idefics3")))
    assert loaded.image_size == (48, 48)
    assert loaded.preprocessing.mean == (0.1, 0.2, 0.3) and loaded.preprocessing.std == (0.5, 0.5, 0.25)
    # Qwen2.5-VL has no fixed size: about 448^2 pixels, kept inside the processor's min / max pixels.
    qwen = create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl"))
    assert qwen.image_size == (64, 64)  # max_pixels 64^2 in the tiny processor
    with pytest.raises(StudentError, match="not a multiple of its patch size 16"):
        create_student(StudentConfig(name_or_path="tiny-qwen2_5_vl", image_size=(40, 48)))


def _one_batch(dataset, student) -> tuple[dict, tuple[int, int]]:
    data = DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12)
    stream = PairStream(data, student.preprocessing)
    return next(iter(make_loader(stream))), stream.cv_grid


@pytest.mark.parametrize("name", VLMS)
def test_lora_stays_in_the_tower_and_every_lora_weight_gets_gradient(name, dataset):
    from peft.tuners.lora import LoraLayer

    student = _student(name)
    cfg = _resolved(student, lora_rank=2, adapter_dim=0)
    model = DistillModel(student, cfg)
    vlm = student.vlm()
    lora_modules = [n for n, m in vlm.named_modules() if isinstance(m, LoraLayer)]
    fused = name == "tiny-qwen2_5_vl"  # q_proj / v_proj name the fused qkv there
    assert len(lora_modules) == len(cfg.lora_layers) * (1 if fused else 2)
    assert all(n.startswith(student.tower_prefix + ".") for n in lora_modules)
    assert not any(max(cfg.lora_layers) < int(n.split(".")[-3]) for n in lora_modules)
    tower_params = {id(p) for p in student.tower.parameters()}
    outside = [n for n, p in vlm.named_parameters() if id(p) not in tower_params]
    assert outside and not any("lora" in n for n in outside)  # the language model and projector: untouched
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # B is zero at init, which would leave A without gradient
    batch, cv_grid = _one_batch(dataset, student)
    model(batch, LossConfig(), cv_grid)["total"].backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(lora_modules)
    for n, p in lora.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in vlm.named_parameters() if id(p) not in tower_params)


@pytest.mark.parametrize("name", VLMS)
def test_each_family_trains_a_few_steps_and_loads_back(name, dataset, tmp_path):
    cfg = DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=tmp_path / "run", checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(name_or_path=name, image_size=SIZE, adapter_dim=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, max_steps=3))
    summary = train.run_distill(cfg)
    assert summary.finished and summary.skipped_steps == 0
    assert all(np.isfinite(v) for v in summary.last_losses.values())
    info = json.loads((tmp_path / "run" / "student.json").read_text())
    assert info["family"] == name[len("tiny-"):].replace("-", "_") and info["base_in_run"]
    assert info["vlm"]["tower_prefix"] and info["fed_layer"] == info["num_layers"] - 1
    weights = load_file(summary.checkpoint / "trainable.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert all(int(t.split(".")[1 if t.startswith("blocks") else 2]) <= info["fed_layer"]
               for t in adapter["target_modules"])
    final, from_checkpoint = load_distilled(tmp_path / "run"), load_distilled(tmp_path / "run", checkpoint=3)
    assert final.student.is_vlm and final.student.family == info["family"]
    pixels = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        x, y = final.features(pixels), from_checkpoint.features(pixels)
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2_5_vl"])
def test_merged_lora_saves_as_a_plain_vlm_with_the_distilled_tower(name, tmp_path):
    student = _student(name)
    cfg = _resolved(student, lora_rank=2, adapter_dim=0, refine_head=False)
    model = DistillModel(student, cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    pixels = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        distilled = student(pixels)
        merge_lora(student)
        merged = student(pixels)
    assert not hasattr(student.tower, "peft_config")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(distilled, merged, strict=True))
    student.vlm().save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "preprocessor_config.json").write_text(json.dumps(student.processor_config))
    reloaded = create_student(StudentConfig(name_or_path=str(tmp_path / "merged"), image_size=SIZE))
    with torch.no_grad():
        again = reloaded(pixels)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(distilled, again, strict=True))
    assert not torch.allclose(again[-1], create_student(StudentConfig(name_or_path=name, image_size=SIZE))(
        pixels)[-1].detach(), atol=1e-3)


def test_wrong_names_and_incompatible_checkpoints_are_clear_errors(tmp_path):
    import transformers

    with pytest.raises(StudentError, match="no such tiny student.*tiny-llava.*tiny-qwen2_5_vl"):
        create_student(StudentConfig(name_or_path="tiny-llama"))
    text_only = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    text_only.save_pretrained(tmp_path / "llama")
    with pytest.raises(StudentError, match=r"model_type 'llama' is not a supported student.*llava \(llava\)"
                                           r".*qwen2_5_vl \(qwen2_5_vl\).*timm"):
        create_student(StudentConfig(name_or_path=str(tmp_path / "llama")))
    # A LLaVA whose tower is an architecture geod cannot run block by block.
    odd = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "head_dim": 8},
        text_config={"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2}, image_token_id=5))
    odd.save_pretrained(tmp_path / "odd")
    (tmp_path / "odd" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 32, "width": 32}}))
    with pytest.raises(StudentError, match="model_type 'pixtral'.*not a supported tower.*clip_vision_model"):
        create_student(StudentConfig(name_or_path=str(tmp_path / "odd")))
    with pytest.raises(StudentError, match="bare vision tower"):
        create_student(StudentConfig(name_or_path="tiny-clip")).vlm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2_5_vl"])
def test_on_cuda_only_the_tower_moves_and_bf16_training_runs(name, dataset, tmp_path):
    student = _student(name)
    DistillModel(student, _resolved(student)).to("cuda")
    tower = {id(p) for p in student.tower.parameters()}
    assert all(p.device.type == "cuda" for p in student.tower.parameters())
    assert all(p.device.type == "cpu" for p in student.vlm().parameters() if id(p) not in tower)
    cfg = DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=tmp_path / "run", checkpoint_every=100, log_every=1, progress=False, device="cuda",
                      bf16=True),
        student=StudentConfig(name_or_path=name, image_size=SIZE, adapter_dim=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, max_steps=3))
    summary = train.run_distill(cfg)
    assert summary.finished and summary.skipped_steps == 0
    assert all(np.isfinite(v) for v in summary.last_losses.values())
