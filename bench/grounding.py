#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Grounding benchmark: do the clinical terms' maps point at the criteria drawn, and are they faithful?

    python -m bench.grounding --seeds 0 1 2 --lambda_ground 0 1      # train (or reuse) and score 3 seeds x 2 losses
    python -m bench.grounding --model outputs/demo/model              # score one trained model
    python -m bench.grounding --dataset isic2018_task2 --data_dir /data/ISIC2018 --model DIR   # real masks

For every (image, criterion) pair whose mask is known (synthetic: the generator's masks; ISIC 2018 Task 2: the five
attribute masks), every map is scored against the criterion's mask:

- term maps, one per attribution method (`--methods`, `GROUNDING_METHODS`), for the criterion's mention in the
  reference report fed to the decoder (teacher-forced; every pair) and in the model's own greedy rationale (generated;
  only the criteria the rationale names, whose share is the coverage);
- baselines, one map per image: `focal_map` (focal pooling `alpha`), `grad_cam` (Grad-CAM of the predicted class over
  the CLIP patch features), `uniform` (a uniformly random point; mass = the mask's area share).

Scores: pointing game (the map's peak lies inside the mask), mass in mask (share of the map inside the mask), and
deletion (faithfulness): the patches of a map are replaced, most relevant first, by the image's mean CLIP patch
feature, for `--deletion_fractions` of the patches; the drop of the term's log-probability (teacher-forced report;
class maps: the predicted class's log-probability) is compared with masking as many random patches:
`deletion = mean over fractions of (drop(map) - drop(random))`, > 0 when the map finds patches the model uses.
Rationale quality: criterion precision/recall of the generated rationales against the criteria drawn, and the share of
rationales whose stated diagnosis equals the classification head's prediction.

With `--seeds`, models are trained by `train.py`'s demo preset (frozen tiny components, data and feature cache shared
by all runs, `--num_train_epochs` each) for every seed and `--lambda_ground` value; results are mean +- sd over
seeds, written to docs/grounding.md and docs/grounding.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("focal_map", "grad_cam", "uniform")
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5)


# ------------------------------------------------------------------ scores
def score(heatmap: np.ndarray, mask: np.ndarray) -> tuple[bool, float]:
    """(peak inside mask, share of the map's mass inside the mask)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    total = float(heatmap.sum())
    return bool(mask[y, x]), float((heatmap * mask).sum() / total) if total > 0 else float(mask.mean())


def deletion_orders(patch_map: np.ndarray, fractions, rng: np.random.Generator) -> list:
    """For each fraction `f`: `(top, random)` index arrays of `ceil(f * N)` patches: the map's highest first (ties
    broken at random), and a uniformly random set of the same size."""
    values = np.asarray(patch_map, dtype=np.float64).reshape(-1)
    n = values.size
    order = np.lexsort((rng.random(n), -values))  # descending value, random among ties
    out = []
    for fraction in fractions:
        k = max(1, int(np.ceil(fraction * n)))
        out.append((order[:k], rng.permutation(n)[:k]))
    return out


def deletion_score(score_fn, patch_map: np.ndarray, fractions=DEFAULT_FRACTIONS, rng=None) -> float:
    """Area between the deletion curves of a map and of random patches: `mean_f [drop(top_f) - drop(random_f)]` with
    `drop(S) = score_fn([]) - score_fn(S)`; `score_fn(list of patch index arrays) -> scores` scores the input with those
    patches masked (one call, the first entry of the list is the unmasked input)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    pairs = deletion_orders(patch_map, fractions, rng)
    sets = [np.zeros(0, dtype=np.int64)] + [s for pair in pairs for s in pair]
    scores = np.asarray(score_fn(sets), dtype=np.float64)
    base, rest = scores[0], scores[1:].reshape(len(fractions), 2)
    drops = base - rest
    return float(np.mean(drops[:, 0] - drops[:, 1]))


def mask_patches(features: torch.Tensor, patch_sets) -> torch.Tensor:
    """`features` (N, d) of one image -> (len(patch_sets), N, d): each copy with its patches replaced by the image's
    mean patch feature."""
    mean = features.mean(dim=0, keepdim=True)
    out = features.unsqueeze(0).repeat(len(patch_sets), 1, 1)
    for i, patches in enumerate(patch_sets):
        if len(patches):
            out[i, torch.as_tensor(np.asarray(patches), dtype=torch.long)] = mean
    return out


# ------------------------------------------------------------------ one model
class _Sums:
    def __init__(self):
        self.values = {}

    def add(self, key, value):
        self.values.setdefault(key, []).append(float(value))

    def mean(self, key):
        values = self.values.get(key, [])
        return float(np.mean(values)) if values else None

    def count(self, key):
        return len(self.values.get(key, []))


def _data_rows(args):
    """`(rows, image path of a row, masks of a row)` for the benchmark's dataset."""
    import dataset_scripts

    if args.dataset == "synthetic":
        from dataset_scripts import synthetic

        data, _ = dataset_scripts.load("synthetic", args.data_dir, seed_split=args.seed_split,
                                       synthetic_num_images=args.synthetic_num_images)
        image_dir = Path(args.data_dir) / "isic2019" / "ISIC_2019_Training_Input"
        rows = [r for r in data[args.split] if r["criteria"]]

        def image_path(row):
            return image_dir / f"{row['image_id']}.jpg"

        def masks(row):
            return synthetic.criterion_masks(image_path(row))

        return rows, image_path, masks
    from dataset_scripts import isic2018_task2

    data, _ = dataset_scripts.load("isic2018_task2", args.data_dir)
    rows = [r for r in data[args.split if args.split in data else "test"] if r["criteria"]]
    return rows, isic2018_task2.image_path_of, isic2018_task2.row_masks


@torch.no_grad()
def evaluate_model(model_dir, args, rows, image_path, row_masks) -> dict:
    """All scores of one trained model on `rows`: `{"methods": {name: {...}}, "rationale": {...}, "pairs": n}`."""
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from processing_skinclip_vl import find_clinical_terms, load_image

    torch.manual_seed(args.eval_seed)
    rng = np.random.default_rng(args.eval_seed)
    model = SkinCLIPVLForDiagnosis.from_pretrained(str(model_dir)).eval()
    processor = model.resolve_processor()
    tokenizer = processor.tokenizer
    methods = list(args.methods)
    sums = _Sums()
    rationale = {"tp": 0, "predicted": 0, "drawn": 0, "agree": 0, "stated": 0, "images": 0}
    pairs = 0
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        paths = [image_path(r) for r in chunk]
        images = [load_image(p) for p in paths]
        meta = [{k: (r.get("metadata") or {}).get(k) for k in ("age", "sex", "site")} for r in chunk]
        generated = model.diagnose(images, metadata=meta, processor=processor, rationale=True, grounding=False,
                                   max_new_tokens=args.max_new_tokens)
        reports = [tokenizer(r["report"], add_special_tokens=False)["input_ids"] for r in chunk]
        forced = {m: model.ground_token_ids(images, reports, metadata=meta, processor=processor, grounding=m)
                  for m in methods}
        own = {m: model.ground_token_ids(images, [d.token_ids for d in generated], metadata=meta, processor=processor,
                                         grounding=m) for m in methods}
        batch = processor(images=images, metadata=meta, return_tensors="pt")
        features = model.get_image_features(batch["pixel_values"]).float()
        focal_patches = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              image_features=features, use_cache=False, logits_to_keep=1).pooling_attention.float()
        cam_patches = model.grad_cam_patches(batch, targets=[model.config.label2id[d.prediction] for d in generated])
        cam_maps = processor.post_process_heatmaps(cam_patches, [image.size for image in images])
        input_ids, attention_mask, positions = model.teacher_forced_inputs(batch, reports)
        for b, (row, gen) in enumerate(zip(chunk, generated)):
            masks = row_masks(row)
            drawn = [c for c in row["criteria"] if masks.get(c) is not None and masks[c].any()]
            # rationale quality
            named = {term for term, _, _ in find_clinical_terms(gen.rationale or "")} & set(args.vocabulary)
            rationale["images"] += 1
            rationale["tp"] += len(named & set(row["criteria"]))
            rationale["predicted"] += len(named)
            rationale["drawn"] += len(set(row["criteria"]))
            rationale["stated"] += gen.stated_diagnosis is not None
            rationale["agree"] += gen.stated_diagnosis == gen.prediction
            # deletion: one batch of masked variants of this image, scored on the teacher-forced report
            variants, jobs = [np.zeros(0, dtype=np.int64)], []
            side = int(round(np.sqrt(features.shape[1])))
            for criterion in drawn:
                mask = masks[criterion]
                pairs += 1
                maps = {m: next((t for t in forced[m][b].grounded_terms if t.term == criterion), None) for m in methods}
                for m in methods:
                    term = maps[m]
                    if term is None:
                        continue
                    hit, share = score(term.heatmap, mask)
                    sums.add((m, "pointing_game"), hit)
                    sums.add((m, "mass_in_mask"), share)
                    tokens = list(range(*term.token_span))
                    for top, rand in deletion_orders(term.patch_map, args.deletion_fractions, rng):
                        variants += [top, rand]
                    jobs.append((m, "term", tokens, len(variants) - 2 * len(args.deletion_fractions)))
                    gen_term = next((t for t in own[m][b].grounded_terms if t.term == criterion), None)
                    if gen_term is not None:
                        hit, share = score(gen_term.heatmap, mask)
                        sums.add((m, "generated_pointing_game"), hit)
                        sums.add((m, "generated_mass_in_mask"), share)
                any_term = next((maps[m] for m in methods if maps[m] is not None), None)
                for name, heatmap in (("focal_map", gen.focal_map), ("grad_cam", cam_maps[b])):
                    hit, share = score(heatmap, mask)
                    sums.add((name, "pointing_game"), hit)
                    sums.add((name, "mass_in_mask"), share)
                y, x = rng.integers(mask.shape[0]), rng.integers(mask.shape[1])
                sums.add(("uniform", "pointing_game"), bool(mask[y, x]))
                sums.add(("uniform", "mass_in_mask"), float(mask.mean()))
                if any_term is not None:  # uniform: random patches against random patches (deletion 0 in expectation)
                    for top, rand in deletion_orders(np.ones(side * side), args.deletion_fractions, rng):
                        variants += [top, rand]
                    jobs.append(("uniform", "term", list(range(*any_term.token_span)),
                                 len(variants) - 2 * len(args.deletion_fractions)))
            if not drawn:
                continue
            target = model.config.label2id[gen.prediction]
            for name, values in (("focal_map", focal_patches[b].numpy()), ("grad_cam", cam_patches[b])):
                for top, rand in deletion_orders(values, args.deletion_fractions, rng):
                    variants += [top, rand]
                jobs.append((name, "class", None, len(variants) - 2 * len(args.deletion_fractions)))
            masked = mask_patches(features[b], variants)
            count = masked.shape[0]
            term_logp, class_logp = _variant_scores(model, input_ids[b], attention_mask[b], masked, positions[b], target)
            assert count == term_logp.shape[0]
            for name, kind, tokens, start in jobs:
                scores = class_logp if kind == "class" else term_logp[:, tokens].sum(dim=1)
                base = float(scores[0])
                rest = scores[start : start + 2 * len(args.deletion_fractions)].reshape(-1, 2).numpy()
                drops = base - rest
                sums.add((name, "deletion"), float(np.mean(drops[:, 0] - drops[:, 1])))
        print(f"  {min(i + args.batch_size, len(rows))}/{len(rows)} images", flush=True)

    result = {"pairs": pairs, "images": len(rows), "methods": {}}
    for name in methods + list(BASELINES):
        entry = {key: sums.mean((name, key)) for key in ("pointing_game", "mass_in_mask", "deletion")}
        entry["pairs"] = sums.count((name, "pointing_game"))
        if name in methods:
            entry["generated"] = {
                "pointing_game": sums.mean((name, "generated_pointing_game")),
                "mass_in_mask": sums.mean((name, "generated_mass_in_mask")),
                "coverage": sums.count((name, "generated_pointing_game")) / max(pairs, 1),
            }
        result["methods"][name] = entry
    result["rationale"] = {
        "criterion_precision": rationale["tp"] / max(rationale["predicted"], 1),
        "criterion_recall": rationale["tp"] / max(rationale["drawn"], 1),
        "stated_diagnosis_rate": rationale["stated"] / max(rationale["images"], 1),
        "head_agreement": rationale["agree"] / max(rationale["images"], 1),
    }
    return result


def _variant_scores(model, input_ids, attention_mask, masked_features, positions, target, chunk: int = 64):
    """Teacher-forced log-probabilities `(V, T)` of the report tokens and `(V,)` of class `target` for V masked copies
    of one image's features."""
    term, klass = [], []
    for start in range(0, masked_features.shape[0], chunk):
        feats = masked_features[start : start + chunk]
        n = feats.shape[0]
        ids = input_ids.unsqueeze(0).expand(n, -1)
        mask = attention_mask.unsqueeze(0).expand(n, -1)
        outputs = model(input_ids=ids, attention_mask=mask, image_features=feats, use_cache=False,
                        output_hidden_states=True, logits_to_keep=1)
        index = torch.as_tensor(positions)
        logits = model.lm_head(outputs.hidden_states[-1][:, index - 1]).float().log_softmax(dim=-1)  # (n, T, V)
        term.append(logits.gather(2, ids[:, index].unsqueeze(-1))[..., 0])
        klass.append(outputs.class_logits.float().log_softmax(dim=-1)[:, target])
    return torch.cat(term).cpu(), torch.cat(klass).cpu()


# ------------------------------------------------------------------ training (multi-seed protocol)
def train_model(seed: int, lambda_ground: float, args) -> Path:
    """Train one model with `train.py`'s demo preset (shared components, data and feature cache under `--workdir`);
    an existing model directory is reused."""
    out = Path(args.workdir) / f"lambda_ground{lambda_ground:g}_seed{seed}"
    if (out / "model" / "config.json").is_file():
        print(f"reusing {out / 'model'}")
        return out / "model"
    from transformers import HfArgumentParser

    import train
    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments

    values = {**train.DEMO_PRESET, "output_dir": str(out), "seed": seed, "lambda_ground": lambda_ground,
              "num_train_epochs": args.num_train_epochs, "synthetic_num_images": args.synthetic_num_images,
              "data_dir": args.data_dir, "feature_cache_dir": str(Path(args.workdir) / "feature_cache"),
              "eval_strategy": "no", "n_bootstrap": 100, "logging_steps": 50}
    model_args, data_args, training_args = HfArgumentParser(
        (ModelArguments, DataArguments, CFATrainingArguments)).parse_dict(values)
    start = time.time()
    train.run(model_args, data_args, training_args)
    print(f"trained {out} in {time.time() - start:.0f} s", flush=True)
    return out / "model"


# ------------------------------------------------------------------ aggregation and writing
def aggregate(per_seed: list) -> dict:
    """Mean and sd (ddof=1; 0 for one seed) over seeds of every number of `evaluate_model`'s result."""

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return {"mean": None, "sd": None, "n": 0}
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "n": len(values)}

    out = {"methods": {}, "rationale": {}}
    for name in per_seed[0]["methods"]:
        entry = {}
        for key in ("pointing_game", "mass_in_mask", "deletion"):
            entry[key] = stat([r["methods"][name][key] for r in per_seed])
        entry["pairs"] = int(np.mean([r["methods"][name]["pairs"] for r in per_seed]))
        if "generated" in per_seed[0]["methods"][name]:
            entry["generated"] = {key: stat([r["methods"][name]["generated"][key] for r in per_seed])
                                  for key in ("pointing_game", "mass_in_mask", "coverage")}
        out["methods"][name] = entry
    for key in per_seed[0]["rationale"]:
        out["rationale"][key] = stat([r["rationale"][key] for r in per_seed])
    out["pairs"] = int(np.mean([r["pairs"] for r in per_seed]))
    return out


def _fmt(stat) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def best_term_method(methods: dict, term_methods) -> str:
    return max(term_methods, key=lambda m: methods[m]["pointing_game"]["mean"] or -1)


def recommended_method(methods: dict, term_methods) -> str:
    """The term-map method with the highest mean pointing game among those whose mean deletion score is > 0 (maps
    the model's output depends on); `"attention"` if none is."""
    faithful = [m for m in term_methods if (methods[m]["deletion"]["mean"] or 0) > 0]
    return best_term_method(methods, faithful) if faithful else "attention"


def goal_check(methods: dict, term_methods) -> dict:
    best = best_term_method(methods, term_methods)
    pg = methods[best]["pointing_game"]["mean"]
    margin = min(pg - methods["grad_cam"]["pointing_game"]["mean"], pg - methods["focal_map"]["pointing_game"]["mean"])
    deletion = methods[best]["deletion"]["mean"]
    return {"best_method": best, "pointing_game": pg, "margin_over_grad_cam_and_focal_map": margin,
            "deletion": deletion, "reached": bool(pg >= 0.8 and margin >= 0.15 and deletion is not None and deletion > 0)}


def write_docs(report: dict, md_path: Path, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Grounding", "", f"`{report['command']}`", "",
             f"{report['dataset']} {report['split']} split, {report['images']} images with at least one criterion, "
             f"{report['pairs']} (image, criterion) pairs with a mask; seeds {report['seeds']} (training seeds; "
             f"mean ± sd over seeds). {report['settings_text']}", ""]
    for run_name, run in report["runs"].items():
        primary = " (primary: `methods` in docs/grounding.json)" if run_name == report["primary_run"] else ""
        lines += [f"## {run_name}{primary}", "",
                  "| map | pointing game | mass in mask | deletion (> 0: faithful) | generated: pointing game | "
                  "generated: mass | generated: coverage |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, entry in run["methods"].items():
            gen = entry.get("generated")
            lines.append(
                f"| {name} | {_fmt(entry['pointing_game'])} | {_fmt(entry['mass_in_mask'])} | {_fmt(entry['deletion'])} | "
                + (f"{_fmt(gen['pointing_game'])} | {_fmt(gen['mass_in_mask'])} | {_fmt(gen['coverage'])} |" if gen
                   else "(one map per image) | | |"))
        r = run["rationale"]
        lines += ["", f"Rationale quality (generated): criterion precision {_fmt(r['criterion_precision'])}, "
                      f"recall {_fmt(r['criterion_recall'])}; a diagnosis stated in {_fmt(r['stated_diagnosis_rate'])} "
                      f"of rationales; stated diagnosis = head prediction in {_fmt(r['head_agreement'])}.",
                  "", f"Goal check: {json.dumps(run['goal'])}", ""]
    lines += ["## How to read", "",
              "Term-map columns use the reference report fed to the decoder (every pair); `generated` columns the "
              "model's own greedy rationale (only the criteria it names; coverage = that share). Focal map and "
              "Grad-CAM are one map per image, scored against each of its criteria; `uniform` is a random point "
              "(pointing game) and a flat map (mass = the mask's area share). Deletion: mean over the fractions of "
              "(drop of the term's log-probability when the map's top patches are replaced by the image's mean patch "
              "feature) minus (the drop for as many random patches); class maps use the predicted class's "
              "log-probability, `uniform` random against random.", ""]
    md_path.write_text("\n".join(lines))


def parse_args(argv=None):
    from processing_skinclip_vl import GROUNDING_METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="*", default=None, help="trained model dir(s) to score (no training)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="train (or reuse) one model per seed")
    parser.add_argument("--lambda_ground", type=float, nargs="*", default=[0.0], help="grounding-loss weights to train")
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--workdir", default="outputs/grounding_bench", help="models, components, data, feature cache")
    parser.add_argument("--methods", nargs="*", default=list(GROUNDING_METHODS), choices=list(GROUNDING_METHODS))
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "isic2018_task2"])
    parser.add_argument("--data_dir", default=None, help="default: WORKDIR/data/synthetic (generated if missing)")
    parser.add_argument("--synthetic_num_images", type=int, default=2000)
    parser.add_argument("--seed_split", type=int, default=0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--deletion_fractions", type=float, nargs="*", default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--eval_seed", type=int, default=0)
    parser.add_argument("--output_md", default=str(REPO / "docs" / "grounding.md"))
    parser.add_argument("--output_json", default=str(REPO / "docs" / "grounding.json"))
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not args.model and not args.seeds:
        parser.error("give --model DIR [DIR ...] (score trained models) or --seeds S [S ...] (train and score)")
    if args.data_dir is None:
        if args.dataset != "synthetic":
            parser.error("--dataset isic2018_task2 needs --data_dir")
        args.data_dir = str(Path(args.workdir) / "data" / "synthetic")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dataset == "synthetic":
        from dataset_scripts.synthetic import CRITERIA as vocabulary
    else:
        from dataset_scripts.isic2018_task2 import ATTRIBUTE_TERMS

        vocabulary = list(ATTRIBUTE_TERMS.values())
    args.vocabulary = list(vocabulary)  # the criteria a rationale can be right or wrong about
    start = time.time()
    runs = {}
    if args.model:
        runs["given models"] = [Path(m) for m in args.model]
    else:
        for lambda_ground in args.lambda_ground:
            runs[f"lambda_ground={lambda_ground:g}"] = [train_model(s, lambda_ground, args) for s in args.seeds]
    train_seconds = time.time() - start
    rows, image_path, row_masks = _data_rows(args)
    rows = rows[: args.limit]
    report_runs = {}
    for run_name, model_dirs in runs.items():
        per_seed = []
        for model_dir in model_dirs:
            print(f"scoring {model_dir} on {len(rows)} images", flush=True)
            per_seed.append(evaluate_model(model_dir, args, rows, image_path, row_masks))
        summary = aggregate(per_seed)
        summary["goal"] = goal_check(summary["methods"], args.methods)
        summary["per_seed"] = per_seed
        summary["models"] = [str(m) for m in model_dirs]
        report_runs[run_name] = summary
    primary = max(report_runs, key=lambda r: report_runs[r]["goal"]["pointing_game"])
    command = "python -m bench.grounding " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = (f"Training: train.py demo preset (tiny frozen CLIP + Qwen2.5-VL components, 2000 synthetic images), "
                f"{args.num_train_epochs:g} epochs per model, no per-epoch evaluation; scoring: greedy rationales of at "
                f"most {args.max_new_tokens} tokens, deletion fractions {args.deletion_fractions}, "
                f"{'all' if args.limit is None else f'the first {args.limit}'} test images with a criterion. "
                f"Wall time: training {train_seconds:.0f} s, total {time.time() - start:.0f} s on "
                f"{torch.get_num_threads()} CPU thread(s).") if args.seeds else (
                f"Scoring only; greedy rationales of at most {args.max_new_tokens} tokens.")
    report = {
        "command": command,
        "dataset": args.dataset,
        "split": args.split,
        "seeds": args.seeds or [],
        "images": len(rows),
        "pairs": report_runs[primary]["pairs"],
        "settings_text": settings,
        "primary_run": primary,
        "methods": report_runs[primary]["methods"],
        "rationale": report_runs[primary]["rationale"],
        "goal": report_runs[primary]["goal"],
        "default_method": recommended_method(report_runs[primary]["methods"], args.methods),
        "runs": report_runs,
    }
    for run_name, run in report_runs.items():
        print(run_name, json.dumps({n: {k: run["methods"][n][k]["mean"] for k in ("pointing_game", "mass_in_mask",
                                                                               "deletion")} for n in run["methods"]}))
        print("  goal", run["goal"], "rationale", {k: v["mean"] for k, v in run["rationale"].items()})
    if not args.no_write:
        write_docs(report, Path(args.output_md), Path(args.output_json))
        print(f"written {args.output_md} and {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
