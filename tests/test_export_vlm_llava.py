"""End to end on a tiny LLaVA saved like a hub model (tokenizer trained here): distil its vision tower,
export, and load the result with transformers alone to generate from image + text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distill_helpers import make_target_dataset
from geod.stage2_distill.checkpoint import load_distilled
from geod.stage2_distill.config import DataConfig, DistillConfig, EvalConfig, OptimConfig, RunConfig, StudentConfig
from geod.stage2_distill.evaluate import evaluate
from geod.stage2_distill.export_vlm import export_run
from geod.stage2_distill.train import run_distill

PROMPT = "USER: <image>\nwhat is in the image? ASSISTANT:"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([PROMPT, "a red box on a wooden floor", "two chairs beside a table"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def save_tiny_llava(directory) -> None:
    """A random LLaVA (CLIP tower 4 blocks, patch 8, 32 px; 1-layer Llama) with its processor, as on a hub."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=128,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    # The CLS token counts among the tower's outputs, so the processor must add one (CLIP towers).
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    save_tiny_llava(root / "base")
    dataset = make_target_dataset(root, pairs=8, val_every=4)
    run = root / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=run, checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(name_or_path=str(root / "base"), image_size=(32, 48), adapter_dim=0),
        optim=OptimConfig(lr=2e-2, warmup_steps=0, max_steps=3)))
    return root, dataset, run


def test_llava_export_generates_and_changes_only_the_tower(llava_run, tmp_path):
    from geod.stage2_distill.adapters import quiet_peft
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    root, _, run = llava_run
    info = json.loads((run / "student.json").read_text())
    assert info["fed_layer"] == 2  # vision_feature_layer -2 of a 4-block tower
    out = tmp_path / "export"
    summary = export_run(run, out)
    assert summary.tower_path == "model.vision_tower" and summary.model_class == "LlavaForConditionalGeneration"
    record = json.loads((out / "geod_export.json").read_text())
    assert record["processor"] == "the VLM's processor"

    base = AutoModelForImageTextToText.from_pretrained(root / "base").eval()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    assert isinstance(merged, LlavaForConditionalGeneration)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert base_state.keys() == merged_state.keys()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged_state[k])}
    # LoRA on blocks 1 and 2 (block 3 never reaches the language model), q and v.
    assert changed == {f"model.vision_tower.encoder.layers.{b}.self_attn.{p}.weight" for b in (1, 2)
                       for p in ("q_proj", "v_proj")}
    assert all(k.startswith("model.vision_tower.") for k in changed)

    # The processor saved beside the model drives generate from image + text.
    processor = AutoProcessor.from_pretrained(out / "merged")
    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert int((inputs["input_ids"] == merged.config.image_token_id).sum()) == 16  # 4x4 patches, CLS dropped
    generated = merged.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(processor.decode(generated[0, inputs["input_ids"].shape[1]:]), str)

    # Same logits from the peft adapter on the base; different from the base itself (the tower moved).
    with quiet_peft():
        adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(root / "base"),
                                            out / "adapter").eval()
    with torch.no_grad():
        logits = merged(**inputs).logits
        assert torch.allclose(adapted(**inputs).logits, logits, atol=1e-5)
        assert not torch.allclose(base(**inputs).logits, logits, atol=1e-4)

    # The merged VLM's fed vision features are the distilled student's.
    distilled = load_distilled(run)
    pixels = distilled.student.preprocess([image])
    with torch.no_grad():
        expected = distilled.student(pixels)[-1]
        hidden = merged.model.vision_tower(pixel_values=pixels, interpolate_pos_encoding=True,
                                           output_hidden_states=True).hidden_states[3][:, 1:]
    assert torch.allclose(hidden.transpose(1, 2).reshape(expected.shape), expected, atol=1e-5)


def test_llava_eval_reports_feature_drift(llava_run):
    _, dataset, run = llava_run
    metrics = evaluate(EvalConfig(shards=str(dataset), student=str(run), progress=False))
    assert metrics["feature_cosine_layer"] == 2
    assert 0 < metrics["feature_cosine_min"] <= metrics["feature_cosine_mean"] < 1


def test_bf16_base_keeps_its_dtype_and_untouched_tensors_exactly(llava_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root, dataset, _ = llava_run
    AutoModelForImageTextToText.from_pretrained(root / "base", dtype=torch.bfloat16).save_pretrained(tmp_path / "b16")
    AutoProcessor.from_pretrained(root / "base").save_pretrained(tmp_path / "b16")
    run = tmp_path / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=run, checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(name_or_path=str(tmp_path / "b16"), image_size=(32, 48), adapter_dim=0),
        optim=OptimConfig(lr=2e-2, warmup_steps=0, max_steps=1)))
    export_run(run, tmp_path / "export")
    modules = json.loads((tmp_path / "export" / "geod_export.json").read_text())["lora"]["modules"]
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "b16").state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "export" / "merged").state_dict()
    assert all(merged[k].dtype == base[k].dtype == torch.bfloat16 for k in base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"{module}.weight" for module in modules} and len(changed) == 4


@pytest.mark.parametrize("name", ["tiny-llava-onevision", "tiny-paligemma", "tiny-idefics3", "tiny-smolvlm",
                                  "tiny-qwen2_5_vl"])
def test_every_tiny_vlm_family_exports_a_loadable_vlm(name, llava_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, dataset, _ = llava_run
    run = tmp_path / "run"
    run_distill(DistillConfig(
        data=DataConfig(shards=str(dataset), batch_size=2, workers=0, shuffle_blocks=1, max_matches=12),
        run=RunConfig(out=run, checkpoint_every=100, log_every=1, progress=False),
        student=StudentConfig(name_or_path=name, image_size=(32, 48), adapter_dim=0),
        optim=OptimConfig(lr=2e-2, warmup_steps=0, max_steps=1)))
    summary = export_run(run, tmp_path / "export")
    record = json.loads((tmp_path / "export" / "geod_export.json").read_text())
    assert summary.tower_path == json.loads((run / "student.json").read_text())["vlm"]["tower_prefix"]
    # geod's tiny VLMs are saved without a tokenizer: only their image processor can travel, unless the
    # installed transformers builds the family's whole processor anyway. The note must say which happened.
    merged_files = {p.name for p in (tmp_path / "export" / "merged").iterdir()}
    has_tokenizer = bool(merged_files & {"tokenizer.json", "tokenizer_config.json", "vocab.json"})
    assert record["processor"].startswith("the VLM's processor" if has_tokenizer else "image processor only")
    assert "preprocessor_config.json" in merged_files or "processor_config.json" in merged_files
    base = AutoModelForImageTextToText.from_pretrained(run / "base").state_dict()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "export" / "merged").state_dict()
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"{module}.weight" for module in record["lora"]["modules"]}
    assert all(k.startswith(summary.tower_path + ".") for k in changed)
