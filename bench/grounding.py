#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Grounding benchmark: do the explanation maps point at the dermoscopic criteria the synthetic generator drew?

    python -m bench.grounding [--model outputs/demo/model] [--data_dir outputs/data/synthetic] [--split test]

On the synthetic set (criterion masks beside the images), for every (image, criterion drawn) pair:

- term map (generated): the heatmap of the criterion's mention in the model's own greedy rationale (only pairs whose
  criterion the rationale names; their share is the coverage);
- term map (teacher-forced): the heatmap of the criterion's tokens when the reference report is fed to the decoder;
- focal map: the focal pooling weights `alpha` (one map per image, used for each of its criteria);
- Grad-CAM of the predicted class logit over the CLIP patch features (one map per image);
- uniform random: a uniformly random point (pointing game) and a flat map (mass = the mask's area share).

Scores: pointing game = share of pairs whose map peak lies inside the criterion mask; mass = share of the map's mass
inside the mask (a flat map scores the mask's area share). The table goes to docs/benchmarks.md under `## Grounding`.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

METHODS = ["term map (generated)", "term map (teacher-forced report)", "focal map", "Grad-CAM", "uniform random"]


def update_markdown_section(path: Path, heading: str, body: str) -> None:
    """Replace the section `heading` (up to the next `## ` heading) of a markdown file, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    block = [heading, "", *body.strip("\n").splitlines(), ""]
    if start is None:
        lines = lines + ([""] if lines and lines[-1].strip() else []) + block
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + block + lines[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def score(heatmap: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """(peak inside mask, share of the map's mass inside the mask)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    total = float(heatmap.sum())
    return bool(mask[y, x]), float((heatmap * mask).sum() / total) if total > 0 else float(mask.mean())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo/model", help="trained model directory (`make demo`)")
    parser.add_argument("--data_dir", default="outputs/data/synthetic", help="synthetic data (generated if missing)")
    parser.add_argument("--synthetic_num_images", type=int, default=None, help="default: the data dir's generation")
    parser.add_argument("--synthetic_image_size", type=int, default=None, help="default: the data dir's generation")
    parser.add_argument("--seed_split", type=int, default=None, help="default: the data dir's generation")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--no_write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"No trained model at {model_dir}. Produce the demo model with `make demo` (python train.py), "
              "or pass --model DIR.", file=sys.stderr)
        return 2
    import dataset_scripts
    from dataset_scripts import synthetic
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    data, summary = dataset_scripts.load(
        "synthetic", args.data_dir, seed_split=args.seed_split, synthetic_num_images=args.synthetic_num_images,
        synthetic_image_size=args.synthetic_image_size,
    )
    seed = summary.settings["generation"]["seed"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SkinCLIPVLForDiagnosis.from_pretrained(str(model_dir)).eval()  # this repository's code, not the copy
    processor = model.resolve_processor()
    rows = data[args.split].select_columns(["image_id", "criteria", "report", "metadata"])
    rows = [r for r in rows if r["criteria"]][: args.limit]
    image_dir = Path(args.data_dir) / "isic2019" / "ISIC_2019_Training_Input"

    hits = {m: [] for m in METHODS}
    mass = {m: [] for m in METHODS}
    pairs = mentioned = 0
    start = time.time()
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        paths = [image_dir / f"{r['image_id']}.jpg" for r in chunk]
        meta = [{k: r["metadata"].get(k) for k in ("age", "sex", "site")} for r in chunk]
        generated = model.diagnose(paths, metadata=meta, processor=processor, rationale=True, grounding=True,
                                   max_new_tokens=args.max_new_tokens, grad_cam=True)
        forced = model.ground_text(paths, [r["report"] for r in chunk], metadata=meta, processor=processor)
        for row, path, gen, ref in zip(chunk, paths, generated, forced):
            masks = synthetic.criterion_masks(path)
            for criterion in row["criteria"]:
                mask = masks.get(criterion)
                if mask is None or not mask.any():
                    continue
                pairs += 1
                maps = {
                    "term map (teacher-forced report)": next(
                        (t.heatmap for t in ref.grounded_terms if t.term == criterion), None
                    ),
                    "term map (generated)": next((t.heatmap for t in gen.grounded_terms if t.term == criterion), None),
                    "focal map": gen.focal_map,
                    "Grad-CAM": gen.grad_cam,
                }
                mentioned += maps["term map (generated)"] is not None
                for method, heatmap in maps.items():
                    if heatmap is not None:
                        hit, share = score(heatmap, mask)
                        hits[method].append(hit)
                        mass[method].append(share)
                y, x = rng.integers(mask.shape[0]), rng.integers(mask.shape[1])
                hits["uniform random"].append(bool(mask[y, x]))
                mass["uniform random"].append(float(mask.mean()))

    def fmt(values):
        return f"{np.mean(values):.3f}" if values else "n/a"

    table = ["| map | pairs | pointing game | mass inside mask |", "|---|---:|---:|---:|"]
    for method in METHODS:
        table.append(f"| {method} | {len(hits[method])} | {fmt(hits[method])} | {fmt(mass[method])} |")
    command = f"python -m bench.grounding --model {args.model} --data_dir {args.data_dir} --split {args.split}" + (
        f" --limit {args.limit}" if args.limit else "")
    body = "\n".join([
        f"`{command}` ({time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads)",
        "",
        f"Synthetic {args.split} split, {len(rows)} images with at least one criterion, {pairs} (image, criterion) "
        f"pairs; masks from the generator. Decoder attention: mean over heads and layers "
        f"{model.grounding_layer_ids()}; greedy rationales of at most {args.max_new_tokens} tokens. The generated "
        f"rationales name {mentioned} of the {pairs} criteria drawn (coverage {mentioned / max(pairs, 1):.3f}).",
        "",
        *table,
        "",
        "Pointing game: the map's peak lies inside the criterion mask. Mass: share of the map inside the mask (a flat "
        "map scores the mask's mean area share, the `uniform random` row). Focal map and Grad-CAM are one map per "
        "image, scored against each criterion of the image.",
    ])
    print(body)
    if not args.no_write:
        update_markdown_section(Path(args.output), "## Grounding", body)
        print(f"\nwritten to {args.output} (## Grounding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
