#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Training-step benchmark: CFA vs CE-only step time, epoch time with vs without the frozen-feature cache, and the
trainable / total parameters of the paper's configuration (on the meta device).

    .venv/bin/python -m bench.train_step            # both presets, about 3-5 minutes on 2 CPU cores
    .venv/bin/python -m bench.train_step --quick    # fewer timed steps   (from the repository root)

Measured side by side in one run, on two model pairs:

- `tiny`: the demo's tiny components (tools/tiny_components.py), a real processor batch (random images, metadata
  text, report) of the demo's batch size 16, fp32.
- `realistic`: random weights in memory with real shapes: CLIP ViT-B/16 (vision 768 x 12 layers, 12 heads, patch 16,
  image 224 -> 196 patches; text tower 512 x 12) + a Qwen2.5-0.5B-shaped decoder (896 x 24 layers, 14 heads, 2 KV
  heads, intermediate 4864, vocab 151936, tied embeddings), bf16, batch 2, a tokenizer-free batch of token ids laid
  out as the processor does (prompt, 196 image placeholders, metadata/instruction, CLS, rationale with labels).

Every step is one optimiser step: forward, loss, backward, AdamW update on the trainable parameters (LoRA on q/v and
the new modules). Four variants run interleaved (round-robin, after one warm-up round) and the median is reported:

- `cfa_cached`: CFA loss (focal + align + calibration + 0.5 LM), cached `image_features` and `text_embeds`;
- `ce_cached`:  CE-only ablation (plain CE + 0.5 LM; align and calibration off), cached features;
- `cfa_pixels`: CFA loss, the frozen CLIP towers run every step from `pixel_values` and CLIP token ids;
- `ce_pixels`:  CE-only, from pixels (the text tower is skipped: no alignment term).

Epoch time ratio (cache / no cache) over E epochs of S steps: `(E*S*t_cfa_cached + S*t_fill) / (E*S*t_cfa_pixels)`,
where `t_fill` is the one-time cost of filling the cache for one batch (the no-grad CLIP vision + text forward,
measured in the same rounds). Data loading / image decoding is not included (it is also saved by the cache).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters_skinclip_vl import apply_lora, count_parameters
from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
from trainer.losses import CFALoss

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("cfa_cached", "ce_cached", "cfa_pixels", "ce_pixels")


def cfa_loss_fn():
    return CFALoss(focal_loss_gamma=2.0, lambda_align=1.0, lambda_calibration=1.0, lambda_gen=0.5, use_focal=True)


def ce_loss_fn():
    return CFALoss(lambda_align=0.0, lambda_calibration=0.0, lambda_gen=0.5, use_focal=False)  # trainer.arguments "ce_only"


# ---------------------------------------------------------------------------------------------------------------------
# model pairs
# ---------------------------------------------------------------------------------------------------------------------


def tiny_pair(batch_size: int):
    from PIL import Image

    from processing_skinclip_vl import SkinCLIPVLProcessor
    from tools.tiny_components import write_tiny_components

    components = ROOT / "outputs" / "components"
    if not (components / "clip" / "config.json").exists() or not (components / "decoder" / "config.json").exists():
        components = Path(tempfile.mkdtemp(prefix="bench_components_"))
        write_tiny_components(components, seed=0)
    vision, decoder = str(components / "clip"), str(components / "decoder")
    torch.manual_seed(0)
    model = SkinCLIPVLForDiagnosis.from_components(vision, decoder)
    processor = SkinCLIPVLProcessor.from_components(vision, decoder)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(batch_size)
    ]
    classes = ["melanoma", "melanocytic nevus", "basal cell carcinoma", "benign keratosis"]
    batch = processor(
        images=images,
        metadata=["A lesion on the back of a 55-year-old male patient."] * batch_size,
        reports=[f"Irregular streaks at the rim. Diagnosis: {classes[i % 4]}." for i in range(batch_size)],
        align_texts=[f"A dermoscopic image of {classes[i % 4]}." for i in range(batch_size)],
        return_tensors="pt",
    )
    batch = dict(batch)
    batch["class_labels"] = torch.arange(batch_size) % 8
    batch["align_text_ids"] = torch.arange(batch_size) % 4
    return model, batch, "tiny components (hidden 32, 2 layers), fp32, batch %d" % batch_size


def realistic_pair(batch_size: int, dtype: torch.dtype, rationale_tokens: int = 48):
    from transformers import CLIPTextConfig, CLIPVisionConfig, Qwen2Config

    from configuration_skinclip_vl import SkinCLIPVLConfig

    vision_config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        patch_size=16,
        image_size=224,
        projection_dim=512,
    )
    align_config = CLIPTextConfig(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=512,
    )
    text_config = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    config = SkinCLIPVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        align_config=align_config,
        vision_model_name_or_path="openai/clip-vit-base-patch16",
        decoder_name_or_path="Qwen/Qwen2.5-0.5B-Instruct",
    )
    torch.manual_seed(0)
    model = SkinCLIPVLForDiagnosis(config)
    model.lm_head.weight = model.get_input_embeddings().weight  # Qwen2.5-0.5B ties them
    model.to(dtype)

    n_patches = (224 // 16) ** 2
    generator = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(0, 150000, (n,), generator=generator)

    rows, labels = [], []
    for _ in range(batch_size):
        prefix, middle = text(20), text(30)
        rationale = text(rationale_tokens)
        ids = torch.cat(
            [
                prefix,
                torch.tensor([config.vision_start_token_id]),
                torch.full((n_patches,), config.image_token_id),
                torch.tensor([config.vision_end_token_id]),
                middle,
                torch.tensor([config.cls_token_id]),
                rationale,
            ]
        )
        label = torch.full_like(ids, -100)
        label[-rationale_tokens:] = rationale
        rows.append(ids)
        labels.append(label)
    input_ids, labels = torch.stack(rows), torch.stack(labels)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator).to(dtype),
        "align_input_ids": torch.randint(0, 49406, (batch_size, 16), generator=generator),
        "align_attention_mask": torch.ones(batch_size, 16, dtype=torch.long),
        "class_labels": torch.arange(batch_size) % 8,
        "align_text_ids": torch.arange(batch_size),
    }
    desc = (
        f"CLIP ViT-B/16 + Qwen2.5-0.5B shapes (random weights), {str(dtype).replace('torch.', '')}, "
        f"batch {batch_size}, {input_ids.shape[1]} tokens"
    )
    return model, batch, desc


# ---------------------------------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fill_cache(base, batch):
    """What the feature cache computes once per image / text: the frozen CLIP patch features and text embeddings."""
    image_features = base.get_image_features(batch["pixel_values"])
    text_embeds = base.get_text_features(batch["align_input_ids"], batch["align_attention_mask"])
    return image_features, text_embeds


def make_inputs(batch, cached, use_align, features):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if cached:
        inputs["image_features"] = features[0]
        if use_align:
            inputs["text_embeds"] = features[1]
    else:
        inputs["pixel_values"] = batch["pixel_values"]
        if use_align:
            inputs["align_input_ids"] = batch["align_input_ids"]
            inputs["align_attention_mask"] = batch["align_attention_mask"]
    return inputs


def train_step(model, optimizer, loss_fn, inputs, batch):
    optimizer.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    terms = loss_fn(
        outputs.class_logits.float(),
        batch["class_labels"],
        image_embeds=outputs.image_embeds.float() if outputs.image_embeds is not None else None,
        text_embeds=outputs.text_embeds.float() if outputs.text_embeds is not None else None,
        logit_scale=outputs.logit_scale.float(),
        lm_loss=outputs.loss,
        align_text_ids=batch["align_text_ids"],
    )
    terms["loss"].backward()
    optimizer.step()
    return float(terms["loss"].detach())


def bench_pair(name, model, batch, desc, rounds: int):
    print(f"\n[{name}] {desc}", flush=True)
    t0 = time.perf_counter()
    peft_model = apply_lora(model, r=8 if name == "tiny" else 16, lora_alpha=16, lora_dropout=0.0, verbose=False)
    base = peft_model.base_model.model
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    features = fill_cache(base, batch)
    losses = {"cfa": cfa_loss_fn(), "ce": ce_loss_fn()}
    inputs = {
        "cfa_cached": make_inputs(batch, True, True, features),
        "ce_cached": make_inputs(batch, True, False, features),
        "cfa_pixels": make_inputs(batch, False, True, features),
        "ce_pixels": make_inputs(batch, False, False, features),
    }
    times = {v: [] for v in (*VARIANTS, "fill")}
    print(
        f"  setup {time.perf_counter() - t0:.1f}s; 1 warm-up round + {rounds} timed rounds of {len(VARIANTS)} "
        "variants + the cache fill, interleaved",
        flush=True,
    )
    for r in range(rounds + 1):
        for variant in VARIANTS:
            start = time.perf_counter()
            train_step(peft_model, optimizer, losses[variant.split("_")[0]], inputs[variant], batch)
            elapsed = time.perf_counter() - start
            if r:
                times[variant].append(elapsed)
        start = time.perf_counter()
        fill_cache(base, batch)
        if r:
            times["fill"].append(time.perf_counter() - start)
        print(
            f"  round {r}{' (warm-up)' if not r else ''}: "
            + ", ".join(f"{v} {times[v][-1]:.3f}s" if r else v for v in (*VARIANTS, "fill")),
            flush=True,
        )
    median = {v: statistics.median(t) for v, t in times.items()}
    trainable_n, total_n = count_parameters(peft_model)
    return {"name": name, "desc": desc, "median": median, "rounds": rounds, "params": (trainable_n, total_n)}


def epoch_ratio(m, epochs: int) -> float:
    return (epochs * m["cfa_cached"] + m["fill"]) / (epochs * m["cfa_pixels"])


def paper_parameters():
    """Trainable / total parameters of the paper's configuration, built on the meta device (no memory, no weights)."""
    from configuration_skinclip_vl import SkinCLIPVLConfig

    with torch.device("meta"):
        model = SkinCLIPVLForDiagnosis(SkinCLIPVLConfig())
    assert next(model.parameters()).is_meta
    from adapters_skinclip_vl import TRAINABLE_MODULES

    trainable_new = sum(p.numel() for name in TRAINABLE_MODULES for p in getattr(model, name).parameters())
    peft_model = apply_lora(model, r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"], verbose=False)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable, total = count_parameters(peft_model)
    # modules_to_save keeps a frozen original next to each trained copy: count the model once
    originals = sum(p.numel() for n, p in peft_model.named_parameters() if ".original_module." in n)
    return {
        "trainable": trainable,
        "total_counted_by_peft": total,
        "total_unique": total - originals,
        "lora": lora,
        "new_modules": trainable_new,
        "meta": all(p.is_meta for p in peft_model.parameters()),
    }


def format_tables(results, paper, command) -> str:
    lines = [f"Command: `{command}`", "", "Median seconds per optimiser step (forward + loss + backward + AdamW):", ""]
    lines.append(
        "| pair | CFA, cached | CE-only, cached | CFA, pixels | CE-only, pixels | cache fill / batch | rounds |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median"]
        lines.append(
            f"| {r['name']} | {m['cfa_cached']:.3f} | {m['ce_cached']:.3f} | {m['cfa_pixels']:.3f} | "
            f"{m['ce_pixels']:.3f} | {m['fill']:.3f} | {r['rounds']} |"
        )
    lines += [
        "",
        "| pair | CFA / CE-only (cached) | CFA / CE-only (pixels) | epoch cache / no cache, 1 epoch | "
        "12 epochs | 20 epochs | ViT+text share of an uncached CFA step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median"]
        share = m["fill"] / m["cfa_pixels"]
        lines.append(
            f"| {r['name']} | {m['cfa_cached'] / m['ce_cached']:.3f} | {m['cfa_pixels'] / m['ce_pixels']:.3f} | "
            f"{epoch_ratio(m, 1):.3f} | {epoch_ratio(m, 12):.3f} | {epoch_ratio(m, 20):.3f} | {share:.1%} |"
        )
    lines += ["", "Pairs:"] + [
        f"- {r['name']}: {r['desc']}; trainable / total {r['params'][0]:,} / {r['params'][1]:,}" for r in results
    ]
    lines += [
        "",
        "Paper configuration (CLIP ViT-L/14 + Qwen2.5-VL-7B language model, LoRA r=64 on q_proj/v_proj), built on the "
        f"meta device (all parameters meta: {paper['meta']}):",
        "",
        f"- trainable: {paper['trainable']:,} (LoRA {paper['lora']:,} + new modules {paper['new_modules']:,})",
        f"- total: {paper['total_unique']:,} ({paper['total_counted_by_peft']:,} as PEFT counts them, with the frozen "
        "originals of the modules_to_save copies)",
        f"- trainable share: {paper['trainable'] / paper['total_unique']:.3%}",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="Timed rounds per pair (after one warm-up round).")
    parser.add_argument("--quick", action="store_true", help="3 rounds.")
    parser.add_argument("--realistic_batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="realistic pair dtype")
    parser.add_argument("--skip_realistic", action="store_true")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    paper = paper_parameters()
    results = [bench_pair("tiny", *tiny_pair(16), rounds=rounds)]
    if not args.skip_realistic:
        model, batch, desc = realistic_pair(args.realistic_batch, getattr(torch, args.dtype))
        results.append(bench_pair("realistic", model, batch, desc, rounds=rounds))
        del model
    command = "python -m bench.train_step" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    print("\n" + format_tables(results, paper, command.strip()))
    print(f"\nTotal wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
