#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""The demo's components: tiny CLIP + Qwen2.5-VL checkpoints, briefly pretrained on a separate synthetic set.

Random 2-layer towers give the pipeline nothing a real checkpoint would: the real CLIP was pretrained on 400M
image-text pairs, the real Qwen knows language. So, before the demo uses them as frozen "pretrained" components,

- the tiny CLIP gets a short CLIP-style contrastive pretraining (image <-> report text), and
- the tiny decoder a short language-model pretraining on the report texts alone (no images: it learns the words and
  the grammar of a report, not which criteria an image shows; that is left to the LoRA fine-tuning),

both on synthetic images and reports that are NOT part of the demo's train/validation/test data (another seed,
another folder).

    python -m tools.demo_components OUT_DIR [--num_images 800] [--steps 300]   # from the repository root
"""

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .tiny_components import move_into_place, write_tiny_components

logger = logging.getLogger(__name__)
PRETRAIN_SEED = 1234  # the demo data use seed 0: a different seed, a different folder, no shared images


def _fit(model, loss_fn, num_rows: int, out_dir, steps: int, batch_size: int, lr: float, seed: int, data_dir,
         parameters=None) -> dict:
    """Train `model` for `steps` AdamW steps on random batches (`loss_fn(index) -> loss`), save it to `out_dir` and
    write `pretraining.json` there; returns that record."""
    model.train()
    optimizer = torch.optim.AdamW(parameters if parameters is not None else model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for _step in range(steps):
        loss = loss_fn(torch.randint(0, num_rows, (batch_size,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    model.save_pretrained(out_dir)
    record = {"seed": seed, "rows": num_rows, "steps": steps, "batch_size": batch_size, "lr": lr,
              "first_loss": sum(losses[:10]) / 10, "last_loss": sum(losses[-10:]) / 10,
              "seconds": round(time.time() - start, 1), "data_dir": str(data_dir)}
    (Path(out_dir) / "pretraining.json").write_text(json.dumps(record, indent=2))
    return record


def pretrain_clip(clip_dir, data_dir, num_images: int = 800, steps: int = 300, batch_size: int = 64, lr: float = 2e-3,
                  seed: int = PRETRAIN_SEED) -> dict:
    """Contrastively pretrain the CLIP checkpoint in `clip_dir` in place; returns the training record."""
    from datasets import concatenate_datasets
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    import dataset_scripts

    torch.manual_seed(seed)
    data, _ = dataset_scripts.load("synthetic", data_dir, synthetic_num_images=num_images, seed_split=seed)
    data = concatenate_datasets([data[s] for s in data])
    image_processor = AutoImageProcessor.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    pixel_values = image_processor([im.convert("RGB") for im in data["image"]], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(list(data["report"]), padding=True, truncation=True, max_length=77, return_tensors="pt")
    model = CLIPModel.from_pretrained(clip_dir)

    def loss_fn(index):
        out = model(input_ids=tokens["input_ids"][index], attention_mask=tokens["attention_mask"][index],
                    pixel_values=pixel_values[index])
        # texts repeat (same criteria + diagnosis): identical texts are positives of each other
        same = tokens["input_ids"][index]
        positives = (same[:, None, :] == same[None, :, :]).all(-1).float()
        targets = positives / positives.sum(dim=1, keepdim=True)
        return (F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)) / 2

    return _fit(model, loss_fn, len(data), clip_dir, steps, batch_size, lr, seed, data_dir)


def pretrain_decoder(decoder_dir, data_dir, num_images: int = 800, steps: int = 300, batch_size: int = 32,
                     lr: float = 3e-3, seed: int = PRETRAIN_SEED) -> dict:
    """Language-model pretraining of the tiny decoder, in place, on assistant turns holding the synthetic reports."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    import dataset_scripts

    torch.manual_seed(seed)
    data, _ = dataset_scripts.load("synthetic", data_dir, synthetic_num_images=num_images, seed_split=seed)
    reports = [r for split in data.values() for r in split["report"]]
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    texts = [f"<|im_start|>assistant\n{report}<|im_end|>" for report in reports]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(decoder_dir)
    parameters = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]

    def loss_fn(index):
        return model(input_ids=tokens["input_ids"][index], attention_mask=tokens["attention_mask"][index],
                     labels=labels[index]).loss

    return _fit(model, loss_fn, len(texts), decoder_dir, steps, batch_size, lr, seed, data_dir, parameters)


def ensure_demo_components(root, num_images: int = 800, steps: int = 300) -> dict:
    """Tiny components under `root` (`clip/` pretrained as above, `decoder/`), made once; returns their paths."""
    root = Path(root)
    paths = {"vision": str(root / "clip"), "decoder": str(root / "decoder")}
    if (root / "clip" / "pretraining.json").is_file() and (root / "decoder" / "pretraining.json").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".components-", dir=root))
    try:
        written = write_tiny_components(tmp, seed=0)
        data_dir = root.parent / "data" / "component_pretraining"
        record = pretrain_clip(written["vision"], data_dir, num_images, steps)
        logger.warning(f"Pretrained the tiny CLIP on separate synthetic images: loss {record['first_loss']:.2f} -> "
                       f"{record['last_loss']:.2f} in {record['seconds']} s")
        record = pretrain_decoder(written["decoder"], data_dir, num_images, steps)
        logger.warning(f"Pretrained the tiny decoder on separate synthetic reports: loss {record['first_loss']:.2f} "
                       f"-> {record['last_loss']:.2f} in {record['seconds']} s")
        move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num_images", type=int, default=800)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(json.dumps(ensure_demo_components(args.out_dir, args.num_images, args.steps), indent=2))


if __name__ == "__main__":
    main()
