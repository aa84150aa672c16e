#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""The paper configuration at real width, end to end, with random weights, and its memory model.

    python -m bench.paper_config --layers 2                                # CPU (from the repository root)
    python -m bench.paper_config --layers 28 --device cuda --batch_size 8  # one GPU
    python -m bench.paper_config --memory_model                            # the model's table, nothing run

1. `tools/real_width_components.py` writes (or reuses) random-weight checkpoints with the exact configurations of
   `openai/clip-vit-large-patch14` and `Qwen/Qwen2.5-VL-7B-Instruct` and their tokenizers' special-token ids, with
   `--layers` layers kept per tower (widths, heads, vocabularies, embeddings real).
2. `train.build_trainer` runs the paper path with `configs/paper.yaml`'s settings (decoder in 4-bit NF4 through
   `from_components`, LoRA r=64 alpha=16 on q/v, gradient checkpointing, bf16, CFA loss, frozen-feature cache, AdamW
   1e-4) on a small synthetic set, for `--steps` optimiser steps (batch `--batch_size`).
3. The adapter is saved (`model/`), and a fresh process loads it (`from_pretrained`), checks that the trained weights
   came back, and runs `diagnose()` with a rationale.

Prints and writes JSON (`--output_json`): parameter counts (trainable / total, measured and extrapolated to the real
layer counts), peak memory of the training step (RSS on CPU, `torch.cuda.max_memory_allocated` on GPU), the memory
model's prediction for the same run and their ratio, step time, tokens per second, generation latency, and the
alignment-text truncation counts per dataset under the CLIP tokenizer's 77 positions.

No GPU is needed for the CPU mode; nothing is downloaded (the random checkpoints are written under
`outputs/paper_components/layersN`, about 3.4 GB at 2 layers, and reused).
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PAPER_TRAINABLE = 52_345_097  # docs/benchmarks.md, meta device
GIB = 1024**3


# ---------------------------------------------------------------------------------------------------------------------
# process memory (CPU): peak RSS since the last reset (Linux /proc; VmHWM is reset by writing 5 to clear_refs)
# ---------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it (then peaks are since start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: RSS on CPU, `torch.cuda.max_memory_allocated` on GPU."""

    def __init__(self, device: str):
        self.device = device
        self.reset_ok = True

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.reset_ok = reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = peak_rss_bytes()


# ---------------------------------------------------------------------------------------------------------------------
# parameter counts and their extrapolation to the real depths
# ---------------------------------------------------------------------------------------------------------------------

TOWER_PATTERNS = {  # tower -> regex of its per-layer parameter names (PEFT prefixes allowed)
    "clip_vision": r"vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)\.",
    "clip_text": r"align_tower\.(?:text_model\.)?encoder\.layers\.(\d+)\.",
    "decoder": r"language_model\.layers\.(\d+)\.",
}


def _numel(param) -> int:
    """Number of values (a 4-bit weight counts its logical shape, not its packed bytes), as `count_parameters` does."""
    n = param.numel()
    if type(param).__name__ == "Params4bit":
        state = getattr(param, "quant_state", None)
        n = int(state.shape.numel()) if state is not None else 2 * n
    return n


def parameter_counts(peft_model, layers: int) -> dict:
    """Trainable / total parameters measured at `layers`, and extrapolated to the real depths (each missing layer
    counted as the model's layer 0 of the same tower)."""
    from tools.real_width_components import REAL_LAYERS

    trainable = total = originals = 0
    layer0 = {tower: {"trainable": 0, "total": 0} for tower in TOWER_PATTERNS}
    for name, param in peft_model.named_parameters():
        n = _numel(param)
        total += n
        trainable += n if param.requires_grad else 0
        originals += n if ".original_module." in name else 0
        for tower, pattern in TOWER_PATTERNS.items():
            match = re.search(pattern, name)
            if match and match.group(1) == "0":
                layer0[tower]["total"] += n
                layer0[tower]["trainable"] += n if param.requires_grad else 0
    extra = {tower: REAL_LAYERS[tower] - min(layers, REAL_LAYERS[tower]) for tower in TOWER_PATTERNS}
    real_trainable = trainable + sum(extra[t] * layer0[t]["trainable"] for t in TOWER_PATTERNS)
    real_total = total + sum(extra[t] * layer0[t]["total"] for t in TOWER_PATTERNS)
    return {
        "measured": {"trainable": trainable, "total": total, "total_without_original_copies": total - originals},
        "per_layer": layer0,
        "extrapolated_to_real_layers": {
            "layers": {t: REAL_LAYERS[t] for t in TOWER_PATTERNS},
            "trainable": real_trainable,
            "total": real_total,
            "total_without_original_copies": real_total - originals,
            "trainable_equals_meta_count": real_trainable == PAPER_TRAINABLE,
            "meta_count": PAPER_TRAINABLE,
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# memory model
# ---------------------------------------------------------------------------------------------------------------------


def _paper_parts(layers: int, vocab_size: int | None = None) -> dict:
    """Parameter groups of the paper configuration with `layers` layers per tower, counted on the meta device."""
    from adapters_skinclip_vl import apply_lora
    from configuration_skinclip_vl import SkinCLIPVLConfig
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from tools.real_width_components import clip_config, qwen_config

    clip = clip_config(layers)
    text_config = qwen_config(layers, vocab_size).text_config if vocab_size else qwen_config(layers).text_config
    config = SkinCLIPVLConfig(vision_config=clip.vision_config, text_config=text_config, align_config=clip.text_config,
                              image_token_id=0, cls_token_id=1, vision_start_token_id=2, vision_end_token_id=3)
    with torch.device("meta"):
        peft_model = apply_lora(SkinCLIPVLForDiagnosis(config), verbose=False)
    parts = dict(quantized=0, trainable=0, frozen=0, clip=0, embeddings=0)
    for name, param in peft_model.named_parameters():
        n = param.numel()
        if param.requires_grad:
            parts["trainable"] += n
        elif re.search(r"language_model\.layers\.\d+\..*_proj\.(base_layer\.)?weight$", name):
            parts["quantized"] += n
        elif "vision_tower." in name or "align_tower." in name:
            parts["clip"] += n
        elif "embed_tokens" in name or "lm_head" in name:
            parts["embeddings"] += n
        else:
            parts["frozen"] += n  # norms, biases, frozen originals of the modules_to_save copies
    text = config.text_config
    parts.update(hidden=text.hidden_size, intermediate=text.intermediate_size, vocab=text.vocab_size,
                 kv=text.num_key_value_heads * (text.hidden_size // text.num_attention_heads), layers=layers,
                 clip_hidden=config.vision_config.hidden_size, clip_layers=config.vision_config.num_hidden_layers,
                 patches=config.image_seq_length, lora_r=config.lora_r)
    return parts


def memory_model(layers: int, batch_size: int, seq_len: int, logit_positions: int, runtime_bytes: int = 0,
                 parts: dict | None = None, vocab_size: int | None = None, compute_bytes: int = 2) -> dict:
    r"""
    Predicted peak memory of one training step of the paper configuration (bytes per term), as this code runs it:
    `prepare_model_for_kbit_training` keeps every non-4-bit weight in float32, the compute dtype is bf16
    (`compute_bytes=2`, autocast; 4 for float32 compute), activations are checkpointed per decoder layer, LM logits
    cover the rationale span only (`logit_positions`).

    Terms (T = batch_size x seq_len tokens, d = hidden, F = MLP width, V = vocabulary):
    - `decoder_4bit`: 4-bit NF4 values (0.5 B) + double-quantised absmax (1 B per 64 + 4 B per 64 x 256);
    - `embeddings_fp32`: input embeddings and the untied LM head, float32 (4 B each);
    - `clip_fp32`: both frozen CLIP towers, float32;
    - `frozen_other_fp32`: norms, biases, the frozen originals of the `modules_to_save` copies;
    - `trainable_adamw`: LoRA + new modules in float32: weight, gradient, AdamW's two moments (16 B) + one float32
      copy for the `foreach` update (4 B);
    - `checkpoints`: the checkpointed input of every decoder layer, T x d float32 (the residual stream's dtype);
    - `layer_recompute`: one decoder layer's saved tensors during its recomputation, T x (40 d + 8 F) bytes in bf16
      (float32 norm inputs and residuals, 14 d; compute-dtype copies of the projection inputs, LoRA inputs, q, rotated
      q, GQA keys and values expanded to d, attention output, 13 d x 2 B; the four MLP tensors of width F, 4 F x 2 B),
      T x (54 d + 16 F) in float32 (the casts are no-ops, LoRA inputs are the float32 dropout outputs), plus its
      gradients (T x (2 F c + 8 d));
    - `dequantised_weight`: the largest projection de-quantised to the compute dtype for a matmul (F x d x c);
    - `logits`: B x logit_positions x V: compute-dtype output + float32 copy (bf16 only) + log-softmax + gradient
      (14 B per value in bf16, 12 B in float32);
    - `clip_forward_no_graph`: the frozen ViT's kept hidden states (B x (N + 1) x d_v x 4 B x (layers + 1)), when the
      feature cache is off; the paper configuration caches, so it counts only while the cache is filled;
    - `runtime`: interpreter and libraries (CPU: measured before loading anything; GPU: 0, the CUDA context is not in
      `max_memory_allocated`).
    """
    p = parts or _paper_parts(layers, vocab_size)
    d, ff, vocab = p["hidden"], p["intermediate"], p["vocab"]
    tokens = batch_size * seq_len
    terms = {
        "decoder_4bit": p["quantized"] * (0.5 + 1 / 64 + 4 / (64 * 256)),
        "embeddings_fp32": 4 * p["embeddings"],
        "clip_fp32": 4 * p["clip"],
        "frozen_other_fp32": 4 * p["frozen"],
        "trainable_adamw": 20 * p["trainable"],
        "checkpoints": p["layers"] * tokens * d * 4,
        "layer_recompute": tokens * ((40 if compute_bytes == 2 else 54) * d + 4 * compute_bytes * ff)
        + tokens * (2 * compute_bytes * ff + 8 * d),
        "dequantised_weight": ff * d * compute_bytes,
        "logits": batch_size * logit_positions * vocab * (14 if compute_bytes == 2 else 12),
        "clip_forward_no_graph": batch_size * (p["patches"] + 1) * p["clip_hidden"] * 4 * (p["clip_layers"] + 1),
        "runtime": runtime_bytes,
    }
    terms = {k: int(v) for k, v in terms.items()}
    return {"terms": terms, "peak": sum(terms.values()), "batch_size": batch_size, "seq_len": seq_len,
            "logit_positions": logit_positions, "layers": layers, "compute_bytes": compute_bytes}


def memory_model_table(seq_len: int = 350, logit_positions: int = 65) -> str:
    """Markdown table of the model at 28 layers, batch 8 and 4 (GPU: no runtime term)."""
    parts = _paper_parts(28)
    models = {b: memory_model(28, b, seq_len, logit_positions, parts=parts) for b in (8, 4)}
    lines = ["| term | batch 8 (GiB) | batch 4 (GiB) |", "|---|---:|---:|"]
    for name in models[8]["terms"]:
        if name == "runtime":
            continue
        lines.append(f"| `{name}` | {models[8]['terms'][name] / GIB:.2f} | {models[4]['terms'][name] / GIB:.2f} |")
    lines.append(f"| **peak** | **{models[8]['peak'] / GIB:.2f}** | **{models[4]['peak'] / GIB:.2f}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def _trainer_callback(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def truncation_counts(processor) -> dict:
    """Texts over CLIP's 77 positions per dataset: the alignment texts the model embeds (class templates in every
    loader) and, for comparison, the rationales (reports) if they were used as alignment texts. Derm7pt: every case of
    the real `meta/meta.csv` fixture (its checklist reports need no images); ISIC 2019 / 2024: the class templates
    (every row's texts are one of them)."""
    from configuration_skinclip_vl import ISIC2019_CLASSES
    from dataset_scripts import derm7pt
    from dataset_scripts.schema import align_text_for, template_report
    from trainer.collator import count_align_truncations

    def longest(texts):
        return max(len(ids) for ids in processor.align_tokenizer(list(texts))["input_ids"])

    out = {}
    meta = ROOT.parent / "shared" / "fixtures" / "real" / "derm7pt"
    if (meta / "meta" / "meta.csv").is_file():
        records, _ = derm7pt.read_meta(meta)
        records = [r for r in records if r.get("code")]
        reports = [derm7pt.checklist_report(r) for r in records]
        align = [align_text_for(r["code"]) for r in records]
        out["derm7pt"] = {
            "rows": len(records), "align_text_truncated": count_align_truncations(processor, align),
            "report_over_77_clip_tokens": count_align_truncations(processor, reports),
            "longest_report_clip_tokens": longest(reports), "longest_align_text_clip_tokens": longest(align),
        }
    else:
        out["derm7pt"] = {"skipped": f"fixture {meta / 'meta' / 'meta.csv'} absent"}
    align = [align_text_for(code) for code in ISIC2019_CLASSES]
    reports = [template_report(code) for code in ISIC2019_CLASSES]
    out["isic2019_and_isic2024_templates"] = {
        "templates": len(align), "align_text_truncated": count_align_truncations(processor, align),
        "report_over_77_clip_tokens": count_align_truncations(processor, reports),
        "longest_report_clip_tokens": longest(reports), "longest_align_text_clip_tokens": longest(align),
    }
    return out


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Without, torch's bf16 GEMM falls back
    to a reference kernel for some layouts (e.g. the gradient `grad @ W` of every linear layer) that is one to two
    orders of magnitude slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or cpu_has_fast_bf16() else "fp32"


def train_and_save(args, components: dict, run_dir: Path, runtime_bytes: int) -> dict:
    import train
    from adapters_skinclip_vl import count_parameters

    overrides = [
        "--vision_model_name_or_path", components["vision"], "--decoder_name_or_path", components["decoder"],
        "--dataset_name", "synthetic", "--data_dir", str(run_dir / "data"), "--synthetic_num_images",
        str(args.num_images), "--output_dir", str(run_dir / "train"), "--per_device_train_batch_size",
        str(args.batch_size), "--gradient_accumulation_steps", "1", "--max_steps", str(args.steps),
        "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--dataloader_num_workers", "0",
        "--report_to", "none", "--disable_tqdm", "true", "--feature_cache_dir", str(run_dir / "feature_cache"),
        "--max_length", str(args.max_length),
        "--warmup_steps", "0",  # paper.yaml warms up over 3% of the steps: with 1-2 steps the first would have lr 0
    ]
    if args.device == "cpu":
        overrides += ["--use_cpu", "true"]
    if args.precision == "fp32":  # autocast off, 4-bit compute dtype float32 (train.build_model follows --bf16)
        overrides += ["--bf16", "false"]
    model_args, data_args, training_args = train.parse_args([str(ROOT / "configs" / "paper.yaml"), *overrides])
    settings = {
        "load_in_4bit": model_args.load_in_4bit, "lora_r": model_args.lora_r, "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": model_args.lora_target_modules, "gradient_checkpointing":
        training_args.gradient_checkpointing, "bf16": training_args.bf16, "optim": str(training_args.optim),
        "learning_rate": training_args.learning_rate, "cache_vision_features": training_args.cache_vision_features,
    }
    start = time.perf_counter()
    with PeakMemory(args.device) as load_peak:
        trainer, context = train.build_trainer(model_args, data_args, training_args)
    build_seconds = time.perf_counter() - start
    model, processor = context["model"], context["processor"]
    quantized = [type(m).__name__ for m in model.language_model.modules() if "Linear4bit" in type(m).__name__]
    dtypes = {
        "embed_tokens": str(model.get_input_embeddings().weight.dtype),
        "lm_head": str(model.lm_head.weight.dtype),
        "clip": str(model.vision_tower.get_input_embeddings().weight.dtype),
        "quant_type": model.config.decoder_quantization_config.get("bnb_4bit_quant_type"),
        "compute_dtype": str(model.config.decoder_quantization_config.get("bnb_4bit_compute_dtype")),
    }

    batches = []
    collate = trainer.data_collator

    def recording_collator(rows):
        batch = collate(rows)
        labelled = (batch["labels"] != -100).any(dim=0).nonzero()
        batches.append({"shape": list(batch["input_ids"].shape), "tokens": int(batch["attention_mask"].sum()),
                        "logit_positions": batch["input_ids"].shape[1] - int(labelled.min()) + 1})
        return batch

    trainer.data_collator = recording_collator
    timer = _trainer_callback(args.device)
    trainer.add_callback(timer)
    head_inputs = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: head_inputs.append(list(a[0].shape)))
    before = {n: p.detach().float().sum().item() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with PeakMemory(args.device) as step_peak:
        trainer.train()
    changed = sum(p.detach().float().sum().item() != before[n]
                  for n, p in trainer.model.named_parameters() if p.requires_grad)
    hook.remove()
    losses = [log for log in trainer.state.log_history if "loss" in log]

    counts = parameter_counts(trainer.model, args.layers)
    measured_trainable, measured_total = count_parameters(trainer.model)

    # the trained weights, for the fresh process to compare against
    expected = {}
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            value = param.detach().float().cpu()
            expected[name] = [float(value.sum()), float(value.square().sum()), value.flatten()[:4].tolist()]
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (run_dir / "expected_weights.json").write_text(json.dumps(expected))

    batch = batches[len(timer.times) - 1]  # the last batch trained (the data loader may have fetched one more)
    model_pred = memory_model(args.layers, args.batch_size, batch["shape"][1], batch["logit_positions"],
                              runtime_bytes=runtime_bytes if args.device == "cpu" else 0, vocab_size=args.vocab_size,
                              compute_bytes=2 if training_args.bf16 else 4)
    step_times = timer.times
    result = {
        "settings": settings,
        "dtypes": dtypes,
        "decoder_linear_4bit_modules": len(quantized),
        "build_seconds": round(build_seconds, 1),
        "peak_memory_build_bytes": load_peak.peak,
        "parameters": counts,
        "count_parameters": {"trainable": measured_trainable, "total": measured_total},
        "batch": batch,
        "lm_head_input_shapes": head_inputs,
        "steps": len(step_times),
        "step_seconds": [round(t, 3) for t in step_times],
        "step_time_s": round(step_times[-1], 3),
        "tokens_per_s": round(batch["tokens"] / step_times[-1], 1),
        "losses": [{k: log[k] for k in log if k.endswith("loss")} for log in losses],
        "trainable_tensors_changed_by_training": f"{changed} of {len(before)}",
        "peak_memory_step_bytes": step_peak.peak,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if args.device == "cuda" else (
            "process RSS peak (VmHWM, reset before the step)" if step_peak.reset_ok else "process RSS peak since start"),
        "memory_model": model_pred,
        "memory_measured_over_model": round(step_peak.peak / model_pred["peak"], 3),
        "align_truncation": truncation_counts(processor),
    }
    return result


def reload_and_diagnose(run_dir: Path, device: str, max_new_tokens: int) -> dict:
    """In a fresh process: load the saved adapter, compare the trained weights, `diagnose()` with a rationale."""
    import numpy as np
    from PIL import Image

    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    start = time.perf_counter()
    model = SkinCLIPVLForDiagnosis.from_pretrained(
        str(run_dir / "model"), device_map={"": 0} if device == "cuda" else None
    )
    load_seconds = time.perf_counter() - start
    from peft import PeftModel  # noqa: F401 - the model carries the injected adapter

    expected = json.loads((run_dir / "expected_weights.json").read_text())
    params = dict(model.named_parameters())
    mismatched, compared = [], 0
    for name, (total, square, head) in expected.items():
        key = name.replace("base_model.model.", "", 1)
        if key not in params:
            mismatched.append(f"{key}: missing")
            continue
        value = params[key].detach().float().cpu()
        compared += 1
        if not (np.isclose(float(value.sum()), total, rtol=1e-5, atol=1e-4) and
                np.isclose(float(value.square().sum()), square, rtol=1e-5, atol=1e-4) and
                np.allclose(value.flatten()[:4].numpy(), head, rtol=1e-6, atol=1e-7)):
            mismatched.append(key)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    metadata = {"age_approx": 55, "sex": "female", "anatom_site_general": "anterior torso"}
    model.diagnose([image], metadata=metadata, rationale=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.diagnose([image], metadata=metadata, rationale=False)
    classify_seconds = time.perf_counter() - start
    start = time.perf_counter()
    diagnosis = model.diagnose([image], metadata=metadata, rationale=True, max_new_tokens=max_new_tokens)[0]
    if device == "cuda":
        torch.cuda.synchronize()
    generate_seconds = time.perf_counter() - start
    return {
        "load_seconds": round(load_seconds, 1),
        "trained_weights_compared": compared,
        "trained_weights_mismatched": mismatched,
        "prediction": diagnosis.prediction,
        "rationale_chars": len(diagnosis.rationale or ""),
        "rationale_tokens": len(diagnosis.tokens),
        "grounded_terms": len(diagnosis.grounded_terms),
        "classification_latency_s": round(classify_seconds, 3),
        "generation_latency_s": round(generate_seconds, 3),
        "generation_latency_per_token_s": round((generate_seconds - classify_seconds) / max(len(diagnosis.tokens), 1), 3),
        "max_new_tokens": max_new_tokens,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes(),
    }


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f} GiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="layers kept per tower (widths stay real)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps (the last one is timed as steady state)")
    parser.add_argument("--num_images", type=int, default=40, help="synthetic images generated for the run")
    parser.add_argument("--max_length", type=int, default=384, help="sequence cap (rationales truncated to fit)")
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="compute dtype; auto: bf16 (configs/paper.yaml) on GPUs and on CPUs with native bf16 "
                        "matmuls, float32 on other CPUs (their bf16 GEMM is a slow reference kernel)")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="decoder vocabulary (default: the real 152064; smaller only for the test-suite variant)")
    parser.add_argument("--components_dir", default=None, help="default: outputs/paper_components/layersN")
    parser.add_argument("--run_dir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--skip_reload", action="store_true", help="no fresh-process reload / diagnose() (time)")
    parser.add_argument("--memory_model", action="store_true", help="print the 28-layer memory model table and exit")
    parser.add_argument("--reload_check", default=None, help=argparse.SUPPRESS)  # internal: the fresh process
    args = parser.parse_args(argv)

    if args.memory_model:
        print(memory_model_table())
        return None
    if args.reload_check:
        result = reload_and_diagnose(Path(args.reload_check), args.device, args.max_new_tokens)
        Path(args.reload_check, "reload.json").write_text(json.dumps(result, indent=2))
        return result
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible.")
    args.precision = resolve_precision(args.precision, args.device)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft  # noqa: F401 - imported before the runtime baseline is read
    import transformers

    import train  # noqa: F401
    from tools.real_width_components import write_real_width_components

    transformers.utils.logging.set_verbosity_error()
    runtime_bytes = rss_bytes() or 0
    wall = time.perf_counter()
    components_dir = Path(args.components_dir or ROOT / "outputs" / "paper_components" / f"layers{args.layers}")
    start = time.perf_counter()
    components = write_real_width_components(components_dir, num_layers=args.layers, vocab_size=args.vocab_size,
                                             device=args.device)
    components_seconds = time.perf_counter() - start

    tmp = None
    if args.run_dir:
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="paper_config_")
        run_dir = Path(tmp.name)
    try:
        result = {
            "command": " ".join(["python -m bench.paper_config", *(argv or sys.argv[1:])]),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "layers": args.layers,
            "vocab_size": args.vocab_size or 152064,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "cpu_native_bf16": cpu_has_fast_bf16() if args.device == "cpu" else None,
            "components_seconds": round(components_seconds, 1),
            "runtime_rss_bytes": runtime_bytes,
        }
        result.update(train_and_save(args, components, run_dir, runtime_bytes))
        result["reload"] = None
        if not args.skip_reload:
            child = subprocess.run(
                [sys.executable, "-m", "bench.paper_config", "--reload_check", str(run_dir), "--device",
                 args.device, "--max_new_tokens", str(args.max_new_tokens)],
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
            )
            if child.returncode != 0:
                raise RuntimeError(f"the reload process failed:\n{child.stdout[-2000:]}\n{child.stderr[-4000:]}")
            result["reload"] = json.loads((run_dir / "reload.json").read_text())
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
    finally:
        if tmp is not None:
            tmp.cleanup()

    text = json.dumps(result, indent=2)
    print(text)
    counts = result["parameters"]["extrapolated_to_real_layers"]
    print(f"\ntrainable at {args.layers} layers: {result['parameters']['measured']['trainable']:,}; extrapolated to the "
          f"real depths: {counts['trainable']:,} (meta-device count {PAPER_TRAINABLE:,}: "
          f"{'equal' if counts['trainable_equals_meta_count'] else 'DIFFERENT'})")
    print(f"peak memory of the step: measured {_gib(result['peak_memory_step_bytes'])} "
          f"({result['peak_memory_kind']}), memory model {_gib(result['memory_model']['peak'])}: ratio "
          f"{result['memory_measured_over_model']:.2f} (goal: within 0.75-1.25)")
    generation = result["reload"]["generation_latency_s"] if result["reload"] else None
    print(f"step {result['step_time_s']:.2f} s, {result['tokens_per_s']:.0f} tokens/s; generation "
          f"{'not run' if generation is None else f'{generation:.2f} s'} for up to {args.max_new_tokens} tokens")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()


__all__ = ["memory_model", "memory_model_table", "parameter_counts", "main"]
