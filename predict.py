#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Diagnose dermoscopic images with a trained SkinCLIP-VL (local directory or Hub adapter repo).

    python predict.py --model outputs/demo/model --image lesion.jpg --age 55 --sex female --site "anterior torso" \
        --output_dir /tmp/p
    python predict.py --model org/adapter-repo --images_dir photos/ --output_dir out/
    python predict.py --model DIR --csv cases.csv --output_dir out/   # columns: image (path) [, age, sex, site, ...]

Per image: `<stem>.json` (probabilities of every class, prediction, confidence, malignancy score, rationale, grounded
terms with their patch-grid map, heatmap file, peak and attribution method (`--grounding`), `metadata`: the canonical
values used, `metadata_given`: what was given, and warnings: metadata values not understood and used as unknown,
tiny / blank / fully transparent images, ...) and `<stem>_overlay.png` (image, focal map, term maps); per term
`<stem>_term_<term>.png`. Batches (`--images_dir`, `--csv`) also get `summary.csv`; an unreadable image is listed there
with its error and the batch goes on.
"""

import argparse
import csv
import json
import logging
import os
import re
import sys
from pathlib import Path

from drawing import overlay_heatmap, render_diagnosis_panel
from processing_skinclip_vl import GROUNDING_METHODS, canonical_metadata, image_warnings
from trainer.validation import number_type

logger = logging.getLogger("predict")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CSV_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model directory or Hub repo id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image")
    source.add_argument("--images_dir", help="every image in this folder (not recursive)")
    source.add_argument("--csv", help="a CSV with an image path column (relative to the CSV) and optional metadata")
    parser.add_argument("--age", type=number_type(), help="patient age (with --image; outside 0-120: unknown, warned)")
    parser.add_argument("--sex", help="patient sex (with --image)")
    parser.add_argument("--site", help="anatomical site (with --image)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--no_rationale", action="store_true", help="probabilities and focal map only")
    parser.add_argument("--grad_cam", action="store_true", help="also write the Grad-CAM map of the prediction")
    parser.add_argument(
        "--grounding", default=None, choices=list(GROUNDING_METHODS),
        help="attribution method of the term maps (default: the model's default, DEFAULT_GROUNDING_METHOD; "
             "docs/grounding.md compares them)",
    )
    parser.add_argument("--max_new_tokens", type=number_type(integer=True, minimum=1), default=64,
                        help="rationale length cap (no rationale: --no_rationale)")
    parser.add_argument("--batch_size", type=number_type(integer=True, minimum=1), default=4)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    if args.image is None and any(v is not None for v in (args.age, args.sex, args.site)):
        parser.error("--age/--sex/--site go with --image; put per-image metadata in the --csv columns")
    return args


def collect_inputs(args) -> list:
    """`[(image path, metadata dict)]` in a stable order."""
    if args.image:
        meta = {"age": args.age, "sex": args.sex, "site": args.site}
        return [(Path(args.image), {k: v for k, v in meta.items() if v is not None})]
    if args.images_dir:
        folder = Path(args.images_dir)
        if not folder.is_dir():
            raise SystemExit(f"--images_dir {folder} is not a directory")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, {}) for p in paths]
    table = Path(args.csv)
    if not table.is_file():
        raise SystemExit(f"--csv {table}: file not found")
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as err:
        with open(table, "rb") as handle:
            line = next((n for n, raw in enumerate(handle, 1) if not _is_utf8(raw)), "?")
        raise SystemExit(f"--csv {table}, line {line}: not UTF-8 ({err.reason}); save the file as UTF-8") from None
    if not rows:
        raise SystemExit(f"--csv {table} has no rows")
    column = next((c for c in CSV_IMAGE_COLUMNS if c in rows[0]), None)
    if column is None:
        raise SystemExit(f"--csv {table} needs one of the columns {CSV_IMAGE_COLUMNS}; found {list(rows[0])}")
    out = []
    for row in rows:
        path = Path(row[column])
        out.append((path if path.is_absolute() else table.parent / path, {k: v for k, v in row.items() if k != column}))
    return out


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_model(name, device=None, revision=None):
    import torch
    from transformers import AutoModel, AutoProcessor

    from adapters_skinclip_vl import check_saved_model

    check_saved_model(name)  # a missing folder, config.json, adapter/ or a corrupt weights file is named

    model = AutoModel.from_pretrained(name, trust_remote_code=True, revision=revision)
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True, revision=revision)
    if not hasattr(model, "diagnose"):
        raise SystemExit(
            f"The remote code saved in {name} predates `diagnose`; save the checkpoint again with this repository's "
            "modeling_skinclip_vl.py (e.g. re-run `make demo`)."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "term"


def write_outputs(diagnosis, image, path, metadata, out_dir: Path, stem: str, model_name: str) -> dict:
    """Write `<stem>.json`, `<stem>_overlay.png` and one `<stem>_term_<term>.png` per grounded term; return the JSON."""
    record = diagnosis.to_dict()
    overlay_file = f"{stem}_overlay.png"
    render_diagnosis_panel(image, diagnosis).save(out_dir / overlay_file)
    seen = {}
    for term, entry in zip(diagnosis.grounded_terms, record["grounded_terms"]):
        slug = _slug(term.term)
        seen[slug] = seen.get(slug, 0) + 1
        name = f"{stem}_term_{slug}" + (f"_{seen[slug]}" if seen[slug] > 1 else "") + ".png"
        overlay_heatmap(image, term.heatmap).save(out_dir / name)
        entry["heatmap_file"] = name
    if diagnosis.focal_map is not None:
        record["focal_map_file"] = f"{stem}_focal.png"
        overlay_heatmap(image, diagnosis.focal_map).save(out_dir / record["focal_map_file"])
    if diagnosis.grad_cam is not None:
        record["grad_cam_file"] = f"{stem}_gradcam.png"
        overlay_heatmap(image, diagnosis.grad_cam).save(out_dir / record["grad_cam_file"])
    record = {"image": str(path), "metadata": canonical_metadata(metadata), "metadata_given": metadata,
              "model": model_name, **record, "overlay_file": overlay_file}
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return record


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from tqdm.auto import tqdm

    inputs = collect_inputs(args)
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f".write-test-{os.getpid()}").write_bytes(b"")
        (out_dir / f".write-test-{os.getpid()}").unlink()
    except OSError as err:
        raise SystemExit(f"--output_dir {args.output_dir}: cannot write there ({err.strerror or err})") from None
    from processing_skinclip_vl import load_image

    model, processor = load_model(args.model, args.device, args.revision)
    labels = model.config.class_labels  # the model's own class names (config.class_labels)

    stems, summary = {}, []
    progress = tqdm(total=len(inputs), desc="diagnose", unit="image")
    for start in range(0, len(inputs), args.batch_size):
        chunk, images = [], []
        for path, meta in inputs[start : start + args.batch_size]:
            try:
                images.append(load_image(path))
                chunk.append((path, meta))
            except (ValueError, OSError, TypeError) as err:
                summary.append({"image": str(path), "status": "error", "error": str(err)})
                progress.update(1)
        if not chunk:
            continue
        results = model.diagnose(
            images,
            metadata=[meta for _, meta in chunk],
            processor=processor,
            rationale=not args.no_rationale,
            grounding=False if args.no_rationale else (args.grounding or True),
            max_new_tokens=args.max_new_tokens,
            grad_cam=args.grad_cam,
        )
        for (path, meta), image, diagnosis in zip(chunk, images, results):
            diagnosis.warnings.extend(image_warnings(path))  # tiny, blank, fully transparent
            stem = Path(path).stem
            stems[stem] = stems.get(stem, 0) + 1
            stem = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
            write_outputs(diagnosis, image, path, meta, out_dir, stem, args.model)
            row = {"image": str(path), "status": "ok", "error": "", "json": f"{stem}.json",
                   "prediction": diagnosis.prediction, "confidence": f"{diagnosis.confidence:.6f}",
                   "malignancy_score": f"{diagnosis.malignancy_score:.6f}",
                   "stated_diagnosis": diagnosis.stated_diagnosis or "", "warnings": " | ".join(diagnosis.warnings)}
            row.update({f"p_{label}": f"{diagnosis.probabilities[label]:.6f}" for label in labels})
            summary.append(row)
            progress.update(1)
    progress.close()

    failed = [row for row in summary if row["status"] != "ok"]
    if args.image is None:
        columns = ["image", "status", "error", "prediction", "confidence", "malignancy_score",
                   *[f"p_{label}" for label in labels], "stated_diagnosis", "warnings", "json"]
        with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(summary)
        logger.info(f"{len(summary) - len(failed)} diagnosed, {len(failed)} unreadable; summary: {out_dir / 'summary.csv'}")
    for row in failed:
        logger.error(f"{row['image']}: {row['error']}")
    return 1 if failed and len(failed) == len(summary) else 0


if __name__ == "__main__":
    sys.exit(main())
