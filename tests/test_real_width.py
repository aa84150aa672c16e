"""The paper configuration at real width: real configurations, tokenizers with the real Qwen2.5-VL / CLIP special-token
ids and chat template markers, CLIP's 77-position limit, and a 1-layer run of bench/paper_config.py (smaller decoder
vocabulary; the full-vocabulary 2-layer run is a bench, its output committed under docs/)."""

import json
import logging

import pytest
import torch

from tools.real_width_components import (
    CLIP_TOKEN_IDS,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN_TOKEN_IDS,
    build_real_tokenizers,
    clip_config,
    qwen_config,
)

REAL_QWEN_IDS = {  # Qwen2.5-VL-7B-Instruct's tokenizer.json
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656,
}
CHECKLIST = (  # a Derm7pt checklist report (dataset_scripts.derm7pt.checklist_report), ~45 CLIP tokens
    "Pigment network: atypical. Blue-whitish veil: present. Vascular structures: linear irregular. Pigmentation: "
    "diffuse irregular. Streaks: irregular. Dots and globules: irregular. Regression structures: combinations. "
    "Diagnosis: melanoma."
)
LONG_TEXT = CHECKLIST + " Follow-up: " + CHECKLIST  # over 77 CLIP tokens


@pytest.fixture(scope="module")
def real_tokenizers():
    return build_real_tokenizers()


@pytest.fixture(scope="module")
def real_processor(real_tokenizers):
    from transformers import CLIPImageProcessorPil

    from processing_skinclip_vl import SkinCLIPVLProcessor

    qwen, clip = real_tokenizers
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return SkinCLIPVLProcessor(image_processor=image_processor, tokenizer=qwen, align_tokenizer=clip, num_image_tokens=256)


def test_real_special_token_ids(real_tokenizers):
    qwen, clip = real_tokenizers
    assert {token: qwen.convert_tokens_to_ids(token) for token in REAL_QWEN_IDS} == REAL_QWEN_IDS
    assert {t: i for t, i in QWEN_TOKEN_IDS.items() if t in REAL_QWEN_IDS} == REAL_QWEN_IDS
    assert len(qwen) == 151665 and qwen.eos_token_id == 151645 and qwen.pad_token_id == 151643
    assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (49406, 49407, 49407) == (
        CLIP_TOKEN_IDS["<|startoftext|>"], CLIP_TOKEN_IDS["<|endoftext|>"], CLIP_TOKEN_IDS["<|endoftext|>"])
    assert len(clip) == 49408 and clip.model_max_length == 77
    # special tokens inside text are single ids, never split into bytes
    ids = qwen("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>", add_special_tokens=False)
    ids = ids["input_ids"]
    start = ids.index(151652)
    assert ids[0] == 151644 and ids[-1] == 151645 and ids[start - 1] == qwen.convert_tokens_to_ids("\u010a")  # "\n"
    assert ids[start : start + 3] == [151652, 151655, 151653]


def test_prompt_is_the_chat_template_with_n_image_tokens(real_tokenizers, real_processor):
    """The processor's prompt is what Qwen2.5-VL's chat template writes for (system, user: image + text), with the one
    <|image_pad|> expanded to N = 256 patches, and the CLS placeholder after the assistant header."""
    qwen, _ = real_tokenizers
    assert qwen.chat_template == QWEN2_5_VL_CHAT_TEMPLATE
    meta = {"age_approx": 55, "sex": "female", "anatom_site_general": "anterior torso"}
    from processing_skinclip_vl import serialize_metadata

    rendered = qwen.apply_chat_template(
        [{"role": "system", "content": real_processor.system_prompt},
         {"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": f"{serialize_metadata(meta)} {real_processor.instruction}"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    expected = rendered.replace("<|image_pad|>", "<|image_pad|>" * 256) + "<|vision_pad|>"
    assert real_processor.build_prompt(meta) == expected
    # and with no system turn the template adds Qwen's default one, which the processor replaces by its own
    default = qwen.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nx")

    batch = real_processor(metadata=[meta, None], reports=["Streaks: irregular. Diagnosis: melanoma.", "nevus"])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row in range(2):
        real = ids[row][mask[row].bool()]
        assert int((real == 151655).sum()) == 256
        assert int((real == 151654).sum()) == 1
        start, end = (real == 151652).nonzero().item(), (real == 151653).nonzero().item()
        assert end - start == 257 and bool((real[start + 1 : end] == 151655).all())
        cls = (real == 151654).nonzero().item()
        header = qwen("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        assert real[cls - len(header) : cls].tolist() == header and header[0] == 151644
        assert int(real[-1]) == 151645  # the rationale ends with <|im_end|>
        assert bool((labels[row][: mask.shape[1] - len(real) + cls + 1] == -100).all())
    assert int(ids[1, 0]) == 151643 and int(mask[1, 0]) == 0  # left padding with <|endoftext|>


def test_alignment_truncation_is_warned_once_per_dataset_and_counted(real_processor, caplog):
    """CLIP has 77 positions: long alignment texts are truncated (keeping <|endoftext|>), one warning per dataset with
    the count, and the processor itself warns only once however many batches truncate."""
    from datasets import Dataset, DatasetDict

    from train import align_truncation_report
    from trainer.collator import count_align_truncations

    clip = real_processor.align_tokenizer
    assert len(clip(LONG_TEXT)["input_ids"]) > 77 >= len(clip(CHECKLIST)["input_ids"])
    short = "A dermoscopic image of melanoma."
    data = DatasetDict({
        "train": Dataset.from_dict({"align_text": [LONG_TEXT] * 5 + [CHECKLIST] * 3}),
        "test": Dataset.from_dict({"align_text": [LONG_TEXT, short]}),
    })
    assert count_align_truncations(real_processor, data["train"]["align_text"]) == 5
    logger = logging.getLogger("train")
    with caplog.at_level(logging.WARNING, logger="train"):
        counts = align_truncation_report(real_processor, data, "derm7pt")
    assert counts == {"train": 5, "test": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert len(warnings) == 1 and "derm7pt: 6 of 10 alignment texts exceed 77 CLIP tokens" in warnings[0]

    caplog.clear()
    hf_logger = logging.getLogger("transformers")
    propagate, hf_logger.propagate = hf_logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                batch = real_processor(metadata=[None, None], align_texts=[LONG_TEXT, short])
    finally:
        hf_logger.propagate = propagate
    assert real_processor.truncation_count == 3
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1
    assert batch["align_input_ids"].shape == (2, 77) and int(batch["align_input_ids"][0, -1]) == 49407


def test_real_configurations_and_trainable_count():
    """The written configurations are the paper's; LoRA + new modules on them is the meta-device count."""
    from adapters_skinclip_vl import apply_lora, count_parameters
    from configuration_skinclip_vl import SkinCLIPVLConfig
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    clip, qwen = clip_config(24), qwen_config(28)
    v, t, a = clip.vision_config, qwen.text_config, clip.text_config
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size, v.patch_size, v.image_size) == (1024, 16, 4096, 14, 224)
    assert (a.hidden_size, a.num_attention_heads, a.max_position_embeddings, a.vocab_size, clip.projection_dim) == (
        768, 12, 77, 49408, 768)
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.vocab_size) == (
        3584, 28, 4, 18944, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and not qwen.tie_word_embeddings
    assert qwen.image_token_id == 151655 and qwen.vision_start_token_id == 151652
    config = SkinCLIPVLConfig(vision_config=v, text_config=t, align_config=a)
    assert config.image_seq_length == 256
    with torch.device("meta"):
        trainable, _ = count_parameters(apply_lora(SkinCLIPVLForDiagnosis(config), verbose=False))
    assert trainable == 52_345_097


def test_paper_config_bench_one_layer(tmp_path):
    """bench/paper_config.py end to end at real width (1 layer per tower, decoder vocabulary 4096): 4-bit NF4 decoder,
    LoRA r=64 on q/v, gradient checkpointing, bf16 (or float32 on CPUs without native bf16), CFA loss, one AdamW step,
    adapter reload in a fresh process,
    diagnose() with a rationale; the LM head never sees the prompt; the counts extrapolate to the meta-device figure."""
    from bench.paper_config import main

    result = main([
        "--layers", "1", "--vocab_size", "4096", "--batch_size", "2", "--steps", "1", "--num_images", "40",
        "--max_new_tokens", "4", "--components_dir", str(tmp_path / "components"), "--run_dir", str(tmp_path / "run"),
        "--output_json", str(tmp_path / "result.json"),
    ])
    assert json.loads((tmp_path / "result.json").read_text())["parameters"] == result["parameters"]
    assert result["settings"]["load_in_4bit"] and result["settings"]["gradient_checkpointing"]
    # bf16 as configs/paper.yaml says, except on CPUs without native bf16 matmuls (float32 compute there)
    assert result["settings"]["bf16"] == (result["precision"] == "bf16")
    assert result["dtypes"]["quant_type"] == "nf4" and result["decoder_linear_4bit_modules"] == 7
    counts = result["parameters"]["extrapolated_to_real_layers"]
    assert counts["trainable"] == 52_345_097 and counts["trainable_equals_meta_count"]
    assert result["parameters"]["per_layer"]["decoder"]["trainable"] == 64 * (3584 + 3584) + 64 * (3584 + 512)
    assert result["parameters"]["per_layer"]["clip_vision"]["total"] == 12_596_224  # one ViT-L/14 layer
    assert result["parameters"]["per_layer"]["clip_text"]["total"] == 7_087_872
    batch = result["batch"]
    train_shapes = result["lm_head_input_shapes"]
    assert train_shapes and all(shape == [2, batch["logit_positions"], 3584] for shape in train_shapes)
    assert batch["logit_positions"] < batch["shape"][1] - 256
    assert result["steps"] == 1 and result["step_time_s"] > 0 and result["losses"]
    reload = result["reload"]
    assert reload["trained_weights_compared"] > 0 and reload["trained_weights_mismatched"] == []
    assert reload["prediction"] in {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"}
    assert reload["generation_latency_s"] > 0
    assert result["peak_memory_step_bytes"] > 0 and result["memory_model"]["peak"] > 0


@pytest.mark.parametrize("fsdp", [False, True])
def test_fsdp_stores_4bit_weights_in_the_compute_dtype(tiny_components, monkeypatch, tmp_path, fsdp):
    """Under FSDP (accelerate sets ACCELERATE_USE_FSDP) train.py stores the packed NF4 weights in the bf16 compute
    dtype so FSDP can flatten them with the other parameters; otherwise in uint8. Both train (LoRA gets gradients)."""
    from test_quantization import _bitsandbytes_cpu_reason

    reason = _bitsandbytes_cpu_reason()
    if reason:
        pytest.skip(reason)
    import numpy as np
    from PIL import Image

    import train
    from trainer.arguments import CFATrainingArguments, ModelArguments

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if fsdp else "false")
    model_args = ModelArguments(vision_model_name_or_path=tiny_components["vision"],
                                decoder_name_or_path=tiny_components["decoder"], load_in_4bit=True, lora_r=4)
    training_args = CFATrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")
    assert train.fsdp_enabled(training_args) == fsdp
    peft_model, model, processor = train.build_model(model_args, training_args, tiny_components["vision"],
                                                     tiny_components["decoder"])
    storage = torch.bfloat16 if fsdp else torch.uint8
    assert model.config.decoder_quantization_config["bnb_4bit_quant_storage"] == str(storage).replace("torch.", "")
    weight = model.language_model.layers[0].mlp.gate_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == storage
    batch = processor(images=[Image.fromarray(np.zeros((64, 64, 3), np.uint8))] * 2, metadata=[None, None],
                      reports=["melanoma", "benign keratosis"])
    peft_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # (lora_A: zero, B starts at 0)
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
