#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Reproduce the paper's Tables II and III and Fig. 3 on a controlled proxy, with seeds, bootstrap CIs and verdicts.

    python -m bench.reproduce                      # the full harness on the synthetic proxy (CPU, <= 60 min)
    python -m bench.reproduce --quick              # a CI-sized smoke run (a few minutes): same rows, tiny sizes
    python -m bench.reproduce --dataset isic2019 --data_dir /data/ISIC2019 --ood_dataset isic2024 \\
        --ood_data_dir /data/ISIC2024 --vision_model_name_or_path openai/clip-vit-large-patch14 \\
        --decoder_name_or_path Qwen/Qwen2.5-VL-7B-Instruct --output_dir outputs/reproduce_real --docs_dir docs/real

What runs (every VLM row with seeds `--seeds`, seed s also being the split seed s):

- Table II: the `--ablation` rows `ce_only`, `focal`, `focal_align`, `focal_cal`, `full` (lambda_gen 0.5 in every
  row), and the linear probe, scored in distribution (8-class test split) and out of distribution (the binary ISIC
  2024 protocol of `evaluate_model.py`: malignancy score P(MEL)+P(BCC)+P(SCC), Youden threshold chosen on the
  in-distribution validation split, binary ECE).
- `--align_text`: `focal_align` and `full` also with the other alignment target.
- Table III: `full`, `ce_only` and the linear probe on 12% of the training lesion groups (`--train_fraction 0.12`).
- Fig. 3: `full` with lambda_gen in {0, 0.1, 0.25, 0.5, 1.0}.

Every run keeps the checkpoint with the best validation balanced accuracy (`load_best_model_at_end`), fits a
temperature on validation, and reports ECE / Brier before and after it. Paired differences against CE (and the other
contrasts of the verdicts) get percentile 95% CIs from a two-level bootstrap: each replicate resamples the test lesion
groups of every split seed (the same resample for every row of that seed), computes each row's metric on it, and
averages the per-seed differences over a resample of the seeds (with replacement), so the CI carries the spread
between training seeds as well as the test-set noise.

Each run is also a command of its own: `python -m bench.reproduce [the harness flags] --run ROW --seed S ...` trains
and evaluates that one run and prints its metrics as one JSON object on the last line of standard output; that
command is stored next to the run's numbers in `docs/reproduction.json`. Runs are deterministic (fixed seeds, fixed
thread count, the frozen features read back from the on-disk cache), so re-running a command reproduces its recorded
`balanced_accuracy` exactly. The rows share the frozen CLIP forward through the feature cache, and run in `--jobs`
processes of `--num_threads` threads each.

Writes `DOCS_DIR/reproduction.md`, `DOCS_DIR/reproduction.json` and `DOCS_DIR/reproduction_lambda_gen.png`; run
outputs (per-run predictions, checkpoints, caches) go under `--output_dir`. Finished runs whose command is unchanged
are reused when the harness is started again (`--overwrite` retrains them).
"""

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from datasets import DatasetDict

logger = logging.getLogger("reproduce")

ABLATION_ROWS = ("ce_only", "focal", "focal_align", "focal_cal", "full")
ROW_TITLES = {
    "ce_only": "Baseline (CE)",
    "focal": "+ L_focal",
    "focal_align": "+ L_focal + L_align",
    "focal_cal": "+ L_focal + L_cal",
    "full": "+ L_CFA (full)",
    "linear_probe": "Linear probe (frozen CLIP pooled features)",
}
LAMBDA_GEN_SWEEP = (0.0, 0.1, 0.25, 0.5, 1.0)
PAPER_LAMBDA_GEN = 0.5
SMALL_FRACTION = 0.12
PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)

# In-distribution and out-of-distribution columns of the tables (flat metric keys of a run record).
ID_COLUMNS = ("balanced_accuracy", "macro_auroc", "ece_before_temperature", "ece", "brier")
OOD_COLUMNS = ("ood_balanced_accuracy", "ood_auroc", "ood_ece_before_temperature", "ood_ece", "ood_brier")
COLUMN_TITLES = {
    "balanced_accuracy": "B-ACC", "macro_auroc": "macro AUROC", "ece_before_temperature": "ECE before T",
    "ece": "ECE after T", "brier": "Brier (after T)", "ood_balanced_accuracy": "B-ACC (binary)",
    "ood_auroc": "AUROC (binary)", "ood_ece_before_temperature": "ECE before T", "ood_ece": "ECE after T",
    "ood_brier": "Brier (after T)",
}
LOWER_IS_BETTER = {"ece", "ece_before_temperature", "brier", "ood_ece", "ood_ece_before_temperature", "ood_brier"}

# Sizes and training recipe per preset. The recipe is the demo's (train.py DEMO_PRESET) with model selection on.
PRESETS = {
    # sized for the 60-minute CPU budget on 2 cores (2 runs in parallel, 1 thread each): a training step of the tiny
    # pair costs ~0.15 s of one core (batch 16), so each of the 33 full-data VLM runs gets ~1,600 long-tailed training
    # rows x 6 epochs (600 steps). The first committed run (400 rows x 3 epochs, 75 steps) stayed at chance.
    "full": {
        "num_images": 1600, "test_per_class": 60, "validation_per_class": 20, "ood_num_images": 800,
        "image_size": 128, "num_train_epochs": 6, "seeds": "0,1,2", "n_bootstrap": 500,
    },
    "quick": {
        "num_images": 160, "test_per_class": 6, "validation_per_class": 4, "ood_num_images": 80,
        "image_size": 64, "num_train_epochs": 1, "seeds": "0,1,2", "n_bootstrap": 50,
    },
}
TRAINING_RECIPE = {
    "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "max_grad_norm": 5.0, "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32, "learning_rate": 2e-3, "warmup_steps": 20, "lr_scheduler_type": "cosine",
    "weight_decay": 0.0, "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1,
    "load_best_model_at_end": True, "metric_for_best_model": "balanced_accuracy", "greater_is_better": True,
    "logging_steps": 50, "report_to": "none", "dataloader_num_workers": 0, "disable_tqdm": True,
    "focal_loss_gamma": 2.0, "focal_loss_alpha_mode": "inverse", "lambda_align": 1.0,
    "lambda_calibration": 1.0,
}
DATA_SEED = 0  # the synthetic pool's generation seed (split seeds vary)
OOD_SEED = 2024  # the shifted set's generation seed


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness = parser.add_argument_group("harness (part of every run's command)")
    harness.add_argument("--quick", action="store_true", help="CI-sized smoke run (tiny data, 1 epoch).")
    harness.add_argument("--dataset", default="synthetic", choices=("synthetic", "isic2019", "derm7pt"))
    harness.add_argument("--data_dir", default=None, help="Raw data (synthetic: generated under --output_dir).")
    harness.add_argument("--ood_dataset", default=None, choices=("synthetic_shift", "isic2024"),
                         help="Out-of-distribution test set (default: synthetic_shift for synthetic, else none).")
    harness.add_argument("--ood_data_dir", default=None)
    harness.add_argument("--vision_model_name_or_path", default=None, help="Default: the tiny demo CLIP.")
    harness.add_argument("--decoder_name_or_path", default=None, help="Default: the tiny demo decoder.")
    harness.add_argument("--output_dir", default=None, help="Default: outputs/reproduce[_quick].")
    harness.add_argument("--num_train_epochs", type=float, default=None, help="Override the preset.")
    harness.add_argument("--num_threads", type=int, default=1, help="torch threads per run (fixed for determinism).")
    harness.add_argument("--align_text_default", default="report", choices=("report", "label"),
                         help="--align_text of the Table II / III / Fig. 3 rows (the other one is also run).")
    harness.add_argument("--per_device_train_batch_size", type=int, default=None)
    harness.add_argument("--bf16", action="store_true", help="bf16 training (GPU runs of the real components).")
    harness.add_argument("--load_in_4bit", action="store_true", help="4-bit NF4 decoder (QLoRA, GPU).")
    harness.add_argument("--lora_r", type=int, default=None)
    harness.add_argument("--learning_rate", type=float, default=None)
    orchestration = parser.add_argument_group("orchestration (not part of the run commands)")
    orchestration.add_argument("--seeds", default=None, help="Comma-separated training (= split) seeds.")
    orchestration.add_argument("--jobs", type=int, default=2, help="Runs in parallel (processes).")
    orchestration.add_argument("--docs_dir", default=None, help="Where the report goes (default: docs/, quick: "
                               "OUTPUT_DIR/docs).")
    orchestration.add_argument("--n_bootstrap", type=int, default=None)
    orchestration.add_argument("--overwrite", action="store_true", help="Retrain finished runs.")
    one = parser.add_argument_group("one run (prints its metrics as JSON on the last line)")
    one.add_argument("--run", default=None, choices=(*ABLATION_ROWS, "linear_probe"))
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--lambda_gen", type=float, default=PAPER_LAMBDA_GEN)
    one.add_argument("--align_text", default=None, choices=("report", "label"))
    one.add_argument("--train_fraction", type=float, default=1.0)
    return parser


HARNESS_FLAGS = (
    "quick", "dataset", "data_dir", "ood_dataset", "ood_data_dir", "vision_model_name_or_path", "decoder_name_or_path",
    "output_dir", "num_train_epochs", "num_threads", "per_device_train_batch_size", "bf16", "load_in_4bit", "lora_r",
    "learning_rate",
)


def resolve(args) -> argparse.Namespace:
    """Fill the defaults that depend on --quick / --dataset."""
    preset = dict(PRESETS["quick" if args.quick else "full"])
    args.preset = preset
    if args.output_dir is None:
        args.output_dir = "outputs/reproduce_quick" if args.quick else "outputs/reproduce"
    if args.ood_dataset is None and args.dataset == "synthetic":
        args.ood_dataset = "synthetic_shift"
    if args.ood_dataset == "isic2024" and not args.ood_data_dir:
        raise ValueError("--ood_dataset isic2024 needs --ood_data_dir (the folder with train-metadata.csv).")
    if args.dataset != "synthetic" and not args.data_dir:
        raise ValueError(f"--dataset {args.dataset} needs --data_dir.")
    if args.num_train_epochs is None:
        args.num_train_epochs = preset["num_train_epochs"]
    if args.seeds is None:
        args.seeds = preset["seeds"]
    args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if args.n_bootstrap is None:
        args.n_bootstrap = preset["n_bootstrap"]
    if args.docs_dir is None:
        args.docs_dir = os.path.join(args.output_dir, "docs") if args.quick else "docs"
    if args.align_text is None:
        args.align_text = args.align_text_default
    if not 0 < args.train_fraction <= 1:
        raise ValueError(f"--train_fraction must be in (0, 1], got {args.train_fraction}")
    if args.num_threads < 1 or args.jobs < 1:
        raise ValueError("--num_threads and --jobs must be >= 1")
    return args


def harness_argv(args) -> list:
    """The harness flags as given (defaults left out), in a fixed order: the shared part of every run command."""
    parser = build_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    argv = []
    for name in HARNESS_FLAGS:
        value = getattr(args, name)
        if name == "output_dir":
            value = args.output_dir  # always explicit, so a command never depends on a default folder
        elif name == "num_train_epochs":
            if value == args.preset["num_train_epochs"]:
                continue
        elif value == defaults.get(name):
            continue
        if isinstance(value, bool):
            if value:
                argv.append(f"--{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv


def run_spec(row: str, seed: int, lambda_gen: float = PAPER_LAMBDA_GEN, align_text: str = "report",
             train_fraction: float = 1.0) -> dict:
    return {"row": row, "seed": seed, "lambda_gen": float(lambda_gen), "align_text": align_text,
            "train_fraction": float(train_fraction)}


def run_id(spec: dict) -> str:
    parts = [spec["row"]]
    if spec["row"] != "linear_probe":
        parts += [f"lg{spec['lambda_gen']:g}", f"align-{spec['align_text']}"]
    parts += [f"tf{spec['train_fraction']:g}", f"s{spec['seed']}"]
    return "_".join(parts)


def run_command(args, spec: dict) -> str:
    argv = ["python", "-m", "bench.reproduce", *harness_argv(args), "--run", spec["row"], "--seed", str(spec["seed"])]
    if spec["row"] != "linear_probe":
        argv += ["--lambda_gen", f"{spec['lambda_gen']:g}", "--align_text", spec["align_text"]]
    argv += ["--train_fraction", f"{spec['train_fraction']:g}"]
    return shlex.join(argv)


def planned_runs(args) -> list:
    """Every run of the harness (deduplicated), in a stable order."""
    default, other = args.align_text_default, "label" if args.align_text_default == "report" else "report"
    specs = []
    for seed in args.seed_list:
        for row in ABLATION_ROWS:
            specs.append(run_spec(row, seed, align_text=default))
        specs.append(run_spec("linear_probe", seed))
        for row in ("focal_align", "full"):
            specs.append(run_spec(row, seed, align_text=other))
        for row in ("full", "ce_only"):
            specs.append(run_spec(row, seed, align_text=default, train_fraction=SMALL_FRACTION))
        specs.append(run_spec("linear_probe", seed, train_fraction=SMALL_FRACTION))
        for lam in LAMBDA_GEN_SWEEP:
            specs.append(run_spec("full", seed, lambda_gen=lam, align_text=default))
    unique = {}
    for spec in specs:
        unique.setdefault(run_id(spec), spec)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------------------------
# data and components
# ---------------------------------------------------------------------------------------------------------------------


def components(args) -> tuple[str, str]:
    if args.vision_model_name_or_path and args.decoder_name_or_path:
        return args.vision_model_name_or_path, args.decoder_name_or_path
    from tools.demo_components import ensure_demo_components

    paths = ensure_demo_components(Path(args.output_dir) / "components")
    return args.vision_model_name_or_path or paths["vision"], args.decoder_name_or_path or paths["decoder"]


_LOADED = {}  # per process: the same data are loaded once for all the runs a worker executes


def _memo(key, load):
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def load_splits(args, split_seed: int, train_fraction: float):
    """train / validation / test of the in-distribution data (rows with a fine class), seeded by `split_seed`."""
    key = ("splits", args.dataset, args.data_dir, args.output_dir, split_seed, train_fraction)
    data = _memo(key, lambda: _load_splits(args, split_seed, train_fraction))
    copy = DatasetDict(dict(data))  # build_trainer replaces splits in the dict it gets
    copy.summary = data.summary
    return copy


def _load_splits(args, split_seed: int, train_fraction: float):
    import dataset_scripts

    preset = args.preset
    data_dir = args.data_dir
    if args.dataset == "synthetic" and data_dir is None:
        data_dir = os.path.join(args.output_dir, "data", "synthetic")
    data, _ = dataset_scripts.load(
        args.dataset, data_dir, seed_split=split_seed, train_fraction=train_fraction, synthetic_seed=DATA_SEED,
        synthetic_num_images=preset["num_images"], synthetic_image_size=preset["image_size"],
        synthetic_test_per_class=preset["test_per_class"], synthetic_validation_per_class=preset["validation_per_class"],
    )
    summary = getattr(data, "summary", None)
    data = data.filter(lambda label: label >= 0, input_columns="label")
    for split in ("train", "validation", "test"):
        if split not in data or len(data[split]) == 0:
            raise ValueError(f"{args.dataset} ({args.data_dir}): the {split!r} split is empty for split seed {split_seed}.")
    data.summary = summary
    return data


def load_ood(args):
    """The out-of-distribution test rows (binary `malignant` target), or None."""
    if args.ood_dataset is None:
        return None
    return _memo(("ood", args.ood_dataset, args.ood_data_dir, args.output_dir), lambda: _load_ood(args))


def _load_ood(args):
    import dataset_scripts

    if args.ood_dataset == "synthetic_shift":
        data_dir = args.ood_data_dir or os.path.join(args.output_dir, "data", "synthetic_shift")
        data, _ = dataset_scripts.load(
            "synthetic", data_dir, synthetic_seed=OOD_SEED, synthetic_num_images=args.preset["ood_num_images"],
            synthetic_image_size=args.preset["image_size"], synthetic_shift=True, split_fractions=(0.0, 0.0, 1.0),
            synthetic_test_per_class=0, synthetic_validation_per_class=0,
        )
    else:
        data, _ = dataset_scripts.load(
            args.ood_dataset, args.ood_data_dir, cache_dir=os.path.join(args.output_dir, "cache", args.ood_dataset)
        )
    ood = data["test"].filter(lambda m: m >= 0, input_columns="malignant")
    if len(ood) == 0:
        raise ValueError(f"{args.ood_dataset} ({args.ood_data_dir}): no row has a binary malignant target.")
    return ood


# ---------------------------------------------------------------------------------------------------------------------
# scoring (shared by the VLM and the linear probe)
# ---------------------------------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def score_predictions(class_names, val, test, ood=None) -> dict:
    """Flat metrics of one run from its logits: temperature fitted on validation (clipped to TEMPERATURE_BOUNDS);
    test 8-class metrics after and before it; OOD binary metrics with the Youden threshold from validation.

    `val`, `test`: dicts with `logits`, `labels` (and `malignant` for val); `ood`: `logits`, `malignant`."""
    from configuration_skinclip_vl import MALIGNANT_CLASSES
    from trainer.evaluation import compute_all_metrics
    from trainer.metrics import binary_metrics, fit_temperature, malignancy_scores, youden_threshold

    keep = val["labels"] >= 0
    temperature, fitted = 1.0, 1.0
    if keep.sum() > 1:  # clipped to trainer.metrics.TEMPERATURE_BOUNDS, as train.py does
        temperature, fitted = fit_temperature(val["logits"][keep], val["labels"][keep], return_fitted=True)
    block = compute_all_metrics(test["labels"], test["logits"], class_names=class_names, temperature=temperature,
                                n_boot=0, is_logits=True)
    metrics = {"temperature": temperature, "temperature_fitted": fitted}
    for key in ("balanced_accuracy", "macro_auroc", "ece", "ece_before_temperature", "brier",
                "brier_before_temperature", "nll", "nll_before_temperature", "accuracy"):
        metrics[key] = block.get(key)
    metrics["per_class_sensitivity"] = {name: v["sensitivity"] for name, v in block["per_class"].items()}
    if ood is None:
        return metrics
    positive = [class_names.index(c) for c in MALIGNANT_CLASSES]
    val_malignant = np.asarray(val["malignant"], dtype=np.int64)
    for suffix, t in (("", temperature), ("_before_temperature", 1.0)):
        val_scores = malignancy_scores(_softmax(val["logits"], t), positive)
        kept = val_malignant >= 0
        threshold = None
        if len(set(val_malignant[kept].tolist())) == 2:
            threshold = float(youden_threshold(val_malignant[kept], val_scores[kept]))
        scores = malignancy_scores(_softmax(ood["logits"], t), positive)
        if threshold is None:
            result = {"auroc": binary_metrics(ood["malignant"], scores, threshold=0.5)["auroc"],
                      "balanced_accuracy": None, "sensitivity": None, "specificity": None, "threshold": None}
            two = binary_metrics(ood["malignant"], scores, threshold=0.5)
            result.update({"ece": two["ece"], "brier": two["brier"]})
        else:
            result = binary_metrics(ood["malignant"], scores, threshold=threshold)
        if suffix:
            metrics["ood_ece_before_temperature"] = result["ece"]
            metrics["ood_brier_before_temperature"] = result["brier"]
            metrics["ood_balanced_accuracy_before_temperature"] = result["balanced_accuracy"]
        else:
            for key in ("auroc", "balanced_accuracy", "sensitivity", "specificity", "ece", "brier", "threshold"):
                metrics[f"ood_{key}"] = result[key]
    metrics["ood_n"] = int(len(ood["malignant"]))
    metrics["ood_n_malignant"] = int(np.sum(ood["malignant"] == 1))
    if "labels" in ood and (ood["labels"] >= 0).any():
        block = compute_all_metrics(ood["labels"], ood["logits"], class_names=class_names, n_boot=0, is_logits=True)
        metrics["ood_8class_balanced_accuracy"] = block["balanced_accuracy"]
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------------


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _arrays(ds, logits) -> dict:
    out = {"logits": np.asarray(logits, dtype=np.float64), "labels": np.asarray(ds["label"], dtype=np.int64),
           "malignant": np.asarray(ds["malignant"], dtype=np.int64),
           "groups": np.asarray([str(g) for g in ds["group_id"]])}
    return out


def train_vlm(args, spec: dict, run_dir: Path, data, ood, vision: str, decoder: str):
    """Train one VLM row; returns (class_names, val, test, ood) prediction dicts and the training log."""
    import dataclasses

    from transformers import HfArgumentParser

    import train as train_script
    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments
    from trainer.collator import FeatureCache
    from trainer.evaluation import collect_logits

    values = dict(TRAINING_RECIPE)
    values.update({
        "output_dir": str(run_dir / "trainer"), "vision_model_name_or_path": vision, "decoder_name_or_path": decoder,
        "dataset_name": args.dataset, "seed": spec["seed"], "seed_split": spec["seed"],
        "train_fraction": spec["train_fraction"], "num_train_epochs": args.num_train_epochs,
        "ablation": spec["row"], "lambda_gen": spec["lambda_gen"], "align_text": spec["align_text"],
        "feature_cache_dir": str(Path(args.output_dir) / "feature_cache"), "n_bootstrap": 0,
        "bf16": args.bf16, "load_in_4bit": args.load_in_4bit,
    })
    for name in ("per_device_train_batch_size", "lora_r", "learning_rate"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    parser = HfArgumentParser((ModelArguments, DataArguments, CFATrainingArguments))
    model_args, data_args, training_args = parser.parse_dict(values)
    trainer, context = train_script.build_trainer(model_args, data_args, training_args, data=data)
    trainer.train()
    model, collator, data = context["model"], context["collator"], context["data"]
    class_names = context["class_names"]
    batch = training_args.per_device_eval_batch_size
    preds = {}
    for split in ("validation", "test"):
        logits, _, _ = collect_logits(model, data[split], collator(split), batch, split)
        preds[split] = _arrays(data[split], logits)
    if ood is not None:
        cache = FeatureCache(training_args.feature_cache_dir, model, context["processor"])
        features = cache.image_features(ood, ood._fingerprint, desc="CLIP features (ood)")
        ood_rows = ood.add_column("row_index", list(range(len(ood))))
        ood_collator = dataclasses.replace(collator("test"), image_features=features)
        logits, _, _ = collect_logits(model, ood_rows, ood_collator, batch, "ood")
        preds["ood"] = _arrays(ood, logits)
    history = [
        {k: v for k, v in entry.items() if k in ("epoch", "eval_balanced_accuracy", "loss", "eval_loss")}
        for entry in trainer.state.log_history
    ]
    best = {"best_metric": trainer.state.best_metric, "best_checkpoint": trainer.state.best_model_checkpoint,
            "global_step": trainer.state.global_step}
    shutil.rmtree(run_dir / "trainer", ignore_errors=True)  # checkpoints are not needed once scored
    return class_names, preds, {"history": history, **best}


def pooled_features(vision: str, dataset, cache_dir: Path) -> np.ndarray:
    """Frozen CLIP pooled image features (`pooler_output`) of every row, cached on disk by component and rows."""
    import hashlib

    import torch
    from transformers import AutoImageProcessor, CLIPVisionModel

    key = hashlib.sha256(f"{vision}\n{dataset._fingerprint}".encode()).hexdigest()[:16]
    path = cache_dir / f"pooled-{key}.npy"
    if path.exists():
        return np.load(path)
    model = CLIPVisionModel.from_pretrained(vision).eval()
    processor = AutoImageProcessor.from_pretrained(vision)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            images = [im.convert("RGB") for im in dataset[start : start + 64]["image"]]
            pixels = processor(images, return_tensors="pt")["pixel_values"]
            chunks.append(model(pixel_values=pixels).pooler_output.float().numpy())
    features = np.concatenate(chunks).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, features)
    os.replace(tmp, path)
    return features


def train_probe(args, spec: dict, data, ood, vision: str):
    """Logistic regression (scikit-learn) on frozen CLIP pooled features: C chosen on validation balanced accuracy,
    balanced class weights (the counterpart of the focal alpha), standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    from configuration_skinclip_vl import ISIC2019_CLASSES

    class_names = list(ISIC2019_CLASSES)
    cache_dir = Path(args.output_dir) / "feature_cache"
    feats = {split: pooled_features(vision, data[split], cache_dir) for split in ("train", "validation", "test")}
    if ood is not None:
        feats["ood"] = pooled_features(vision, ood, cache_dir)
    scaler = StandardScaler().fit(feats["train"])
    y_train = np.asarray(data["train"]["label"])
    y_val = np.asarray(data["validation"]["label"])

    def fit(c):
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        return model.fit(scaler.transform(feats["train"]), y_train)

    scores = []
    for c in PROBE_C_GRID:
        model = fit(c)
        scores.append(balanced_accuracy_score(y_val, model.predict(scaler.transform(feats["validation"]))))
    best_c = PROBE_C_GRID[int(np.argmax(scores))]
    model = fit(best_c)

    def logits(x):
        """Decision values as 8-class logits; a class absent from train gets -1e4 (probability 0)."""
        out = np.full((len(x), len(class_names)), -1e4)
        scores = model.decision_function(scaler.transform(x))
        if scores.ndim == 1:  # two classes seen in train: one decision value for classes_[1]
            out[:, model.classes_[0]] = 0.0
            out[:, model.classes_[1]] = scores
        else:
            out[:, model.classes_] = scores
        return out

    preds = {"validation": _arrays(data["validation"], logits(feats["validation"])),
             "test": _arrays(data["test"], logits(feats["test"]))}
    if ood is not None:
        preds["ood"] = _arrays(ood, logits(feats["ood"]))
    info = {"C": best_c, "validation_balanced_accuracy_per_C": dict(zip(map(str, PROBE_C_GRID), map(float, scores))),
            "feature_dim": int(feats["train"].shape[1])}
    return class_names, preds, info


def execute_run(args, spec: dict) -> dict:
    """Train and score one run; writes RUN_DIR/result.json and predictions.npz; returns the record."""
    import transformers

    _set_threads(args.num_threads)
    transformers.utils.logging.set_verbosity_error()
    start, cpu_start = time.time(), time.process_time()
    rid = run_id(spec)
    run_dir = Path(args.output_dir) / "runs" / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    vision, decoder = components(args)
    data = load_splits(args, spec["seed"], spec["train_fraction"])
    ood = load_ood(args)
    if spec["row"] == "linear_probe":
        class_names, preds, info = train_probe(args, spec, data, ood, vision)
    else:
        class_names, preds, info = train_vlm(args, spec, run_dir, data, ood, vision, decoder)
    metrics = score_predictions(class_names, preds["validation"], preds["test"], preds.get("ood"))
    record = {
        "id": rid, "command": run_command(args, spec), **spec, "seed_split": spec["seed"],
        "train_rows": len(data["train"]), "validation_rows": len(data["validation"]), "test_rows": len(data["test"]),
        "ood_rows": 0 if ood is None else len(ood), "preset": args.preset, "metrics": metrics, "info": info,
        "seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
    }
    arrays = {}
    for split, p in preds.items():
        for key, value in p.items():
            arrays[f"{split}_{key}"] = value
    np.savez(run_dir / "predictions.npz", **arrays)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=_json_default))
    os.replace(tmp, run_dir / "result.json")
    return record


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _worker_init(num_threads: int) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    _set_threads(num_threads)


def _worker_run(args_dict: dict, spec: dict) -> dict:
    args = argparse.Namespace(**args_dict)
    try:
        return execute_run(args, spec)
    except Exception as error:  # reported by the orchestrator with the run's command
        import traceback

        return {"id": run_id(spec), "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}


# ---------------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------------


def _auroc_ovr(y: np.ndarray, p: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present with both outcomes (Mann-Whitney with average ranks: the
    same value as scikit-learn's `roc_auc_score`, computed without its per-call overhead)."""
    from scipy.stats import rankdata

    values = []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos = int(pos.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = rankdata(p[:, c])
        values.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(values)) if values else float("nan")


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ece(correct: np.ndarray, confidence: np.ndarray, n_bins: int = 15) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(index):
        members = index == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(correct))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [np.mean(pred[y == c] == c) for c in np.unique(y)]
    return float(np.mean(recalls))


class RunScorer:
    """Metrics of one run on any resample of its test (and OOD) rows: the bootstrap's inner function."""

    def __init__(self, record: dict, arrays, positive: list):
        t = record["metrics"]["temperature"]
        self.y = arrays["test_labels"]
        self.p_after = _softmax(arrays["test_logits"], t)
        self.p_before = _softmax(arrays["test_logits"], 1.0)
        self.has_ood = "ood_logits" in arrays
        if self.has_ood:
            self.m = arrays["ood_malignant"]
            self.s_after = np.clip(_softmax(arrays["ood_logits"], t)[:, positive].sum(1), 0, 1)
            self.s_before = np.clip(_softmax(arrays["ood_logits"], 1.0)[:, positive].sum(1), 0, 1)
            self.threshold = record["metrics"].get("ood_threshold")

    def test_metrics(self, idx: np.ndarray) -> dict:
        y, pa, pb = self.y[idx], self.p_after[idx], self.p_before[idx]
        pred = pa.argmax(1)
        onehot = np.eye(pa.shape[1])[y]
        return {
            "balanced_accuracy": _balanced_accuracy(y, pred),
            "macro_auroc": _auroc_ovr(y, pa),
            "ece": _ece((pred == y).astype(float), pa.max(1)),
            "ece_before_temperature": _ece((pb.argmax(1) == y).astype(float), pb.max(1)),
            "brier": float(np.mean(np.sum((pa - onehot) ** 2, axis=1))),
        }

    def ood_metrics(self, idx: np.ndarray) -> dict:
        if not self.has_ood:
            return {}
        m, sa, sb = self.m[idx], self.s_after[idx], self.s_before[idx]
        out = {"ood_auroc": _binary_auroc(m, sa)}
        if self.threshold is not None:
            pred = sa >= self.threshold
            sens = np.mean(pred[m == 1]) if (m == 1).any() else np.nan
            spec = np.mean(~pred[m == 0]) if (m == 0).any() else np.nan
            out["ood_balanced_accuracy"] = float(np.nanmean([sens, spec]))
        for key, s in (("ood_ece", sa), ("ood_ece_before_temperature", sb)):
            conf = np.maximum(s, 1 - s)
            correct = ((s >= 0.5).astype(int) == m).astype(float)
            out[key] = _ece(correct, conf)
        out["ood_brier"] = float(np.mean((sa - m) ** 2))
        return out


def _group_resampler(groups: np.ndarray, rng: np.random.Generator):
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]

    def draw():
        chosen = rng.integers(0, len(members), size=len(members))
        return np.concatenate([members[g] for g in chosen])

    return draw


def bootstrap_table(records: dict, arrays: dict, seeds: list, n_boot: int, positive: list, seed: int = 0) -> dict:
    """`{run key -> {metric -> (n_boot, n_seeds) array}}` of every run's metric on common group resamples.

    The run key is the run id without its seed suffix; replicate r of seed s uses the same test (and OOD) resample
    for every run of that seed, so differences between runs are paired."""
    rng = np.random.default_rng(seed)
    keys = sorted({rid.rsplit("_s", 1)[0] for rid in records})
    out = {k: {} for k in keys}
    for si, s in enumerate(seeds):
        runs = {rid.rsplit("_s", 1)[0]: rid for rid in records if rid.endswith(f"_s{s}")}
        if not runs:
            continue
        first = arrays[next(iter(runs.values()))]
        draw_test = _group_resampler(first["test_groups"], rng)
        draw_ood = _group_resampler(first["ood_groups"], rng) if "ood_groups" in first else None
        scorers = {k: RunScorer(records[rid], arrays[rid], positive) for k, rid in runs.items()}
        for rid in runs.values():  # same test rows for every run of a seed (pairing needs it)
            if not np.array_equal(arrays[rid]["test_groups"], first["test_groups"]):
                raise ValueError(f"run {rid} was scored on other test rows than the other runs of seed {s}")
        for r in range(n_boot):
            idx = draw_test()
            oidx = draw_ood() if draw_ood is not None else None
            for k, scorer in scorers.items():
                values = scorer.test_metrics(idx)
                if oidx is not None:
                    values.update(scorer.ood_metrics(oidx))
                for metric, v in values.items():
                    out[k].setdefault(metric, np.full((n_boot, len(seeds)), np.nan))[r, si] = v
    return out


def _ci(samples: np.ndarray) -> list:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [None, None]
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


# ---------------------------------------------------------------------------------------------------------------------
# aggregation, verdicts, report
# ---------------------------------------------------------------------------------------------------------------------


def _key(row, align_text, lambda_gen=PAPER_LAMBDA_GEN, train_fraction=1.0) -> str:
    spec = run_spec(row, 0, lambda_gen=lambda_gen, align_text=align_text, train_fraction=train_fraction)
    return run_id(spec).rsplit("_s", 1)[0]


def _values(records: dict, key: str, metric: str, seeds: list) -> list:
    out = []
    for s in seeds:
        record = records.get(f"{key}_s{s}")
        value = None if record is None else record["metrics"].get(metric)
        out.append(None if value is None or not math.isfinite(value) else float(value))
    return out


def _mean_sd(values: list) -> dict:
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "sd": sd, "n": len(finite)}


def _seed_mean(replicates: np.ndarray) -> np.ndarray:
    """Two-level bootstrap: replicate r averages the columns (seeds) of a resample of the seeds drawn with replacement,
    each column already a resample of that seed's test groups. The CI so carries the spread between training seeds as
    well as the test-set noise (a difference that changes sign between seeds does not get a CI clear of 0). The seed
    draws depend only on the replicate count and the number of seeds, so every contrast uses the same ones (paired)."""
    n_boot, n_seeds = replicates.shape
    draws = np.random.default_rng(12345).integers(0, n_seeds, size=(n_boot, n_seeds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (a metric undefined on a resample) stay NaN
        return np.nanmean(np.take_along_axis(replicates, draws, axis=1), axis=1)


def contrast(records, boot, seeds, metric, plus: list, minus: list, scale=None) -> dict:
    """Point estimate and bootstrap CI of mean_s(sum(plus) - sum(minus)) over seeds (per-seed full-test values)."""
    def combine(get):
        total = 0.0
        for k in plus:
            total = total + get(k)
        for k in minus:
            total = total - get(k)
        return total

    point_per_seed = combine(lambda k: np.array([np.nan if v is None else v for v in _values(records, k, metric, seeds)]))
    point = float(np.nanmean(point_per_seed)) if np.isfinite(point_per_seed).any() else None
    if any(metric not in boot.get(k, {}) for k in plus + minus):
        return {"estimate": point, "ci": [None, None], "per_seed": point_per_seed.tolist()}
    reps = _seed_mean(combine(lambda k: boot[k][metric]))
    return {"estimate": point, "ci": _ci(reps), "per_seed": [None if not np.isfinite(v) else float(v)
                                                             for v in point_per_seed]}


def ratio_contrast(records, boot, seeds, metric, numerator: str, denominator: str) -> dict:
    """mean_s(numerator) / mean_s(denominator) with its bootstrap CI."""
    num = _mean_sd(_values(records, numerator, metric, seeds))["mean"]
    den = _mean_sd(_values(records, denominator, metric, seeds))["mean"]
    point = None if num is None or not den else num / den
    if metric not in boot.get(numerator, {}) or metric not in boot.get(denominator, {}):
        return {"estimate": point, "ci": [None, None]}
    reps = _seed_mean(boot[numerator][metric]) / _seed_mean(boot[denominator][metric])
    return {"estimate": point, "ci": _ci(reps)}


def verdict_greater(ci, direction: int = 1) -> str:
    """`reproduced` if the CI of the difference lies on the claimed side of 0, `refuted` if on the other side,
    `inconclusive` if it crosses 0 (or is undefined)."""
    low, high = ci
    if low is None or high is None:
        return "inconclusive"
    if direction * low > 0 and direction * high > 0:
        return "reproduced"
    if direction * low < 0 and direction * high < 0:
        return "refuted"
    return "inconclusive"


def verdict_at_most(ci, bound: float) -> str:
    """`reproduced` if the whole CI is at or below `bound`, `refuted` if it is entirely above, else `inconclusive`."""
    low, high = ci
    if high is not None and high <= bound:
        return "reproduced"
    if low is not None and low > bound:
        return "refuted"
    return "inconclusive"


def combine_verdicts(votes: list) -> str:
    """A claim made of several orderings: `reproduced` if every one is, `refuted` if any is, else `inconclusive`."""
    if all(v == "reproduced" for v in votes):
        return "reproduced"
    return "refuted" if "refuted" in votes else "inconclusive"


def aggregate(args, records: dict, arrays: dict) -> dict:
    from configuration_skinclip_vl import ISIC2019_CLASSES, MALIGNANT_CLASSES

    seeds = args.seed_list
    positive = [list(ISIC2019_CLASSES).index(c) for c in MALIGNANT_CLASSES]
    boot = bootstrap_table(records, arrays, seeds, args.n_bootstrap, positive)
    default = args.align_text_default
    has_ood = any("ood_auroc" in r["metrics"] for r in records.values())
    columns = ID_COLUMNS + (OOD_COLUMNS if has_ood else ())
    ce = _key("ce_only", default)
    probe = "linear_probe_tf1"
    probe_small = f"linear_probe_tf{SMALL_FRACTION:g}"

    def summary_row(key):
        return {m: {**_mean_sd(_values(records, key, m, seeds)), "per_seed": _values(records, key, m, seeds)}
                for m in columns}

    table2 = []
    for row in (*ABLATION_ROWS, "linear_probe"):
        key = probe if row == "linear_probe" else _key(row, default)
        entry = {"row": row, "title": ROW_TITLES[row], "key": key, "lambda_gen": None if row == "linear_probe"
                 else PAPER_LAMBDA_GEN, "align_text": None if row == "linear_probe" else default,
                 "summary": summary_row(key)}
        if row != "ce_only":
            entry["vs_ce"] = {m: contrast(records, boot, seeds, m, [key], [ce]) for m in columns}
        table2.append(entry)

    align = []
    for row in ("focal_align", "full"):
        a, b = _key(row, "report"), _key(row, "label")
        align.append({"row": row, "report": summary_row(a), "label": summary_row(b),
                      "report_minus_label": {m: contrast(records, boot, seeds, m, [a], [b]) for m in columns}})

    table3 = []
    for row in ("full", "ce_only", "linear_probe"):
        big = probe if row == "linear_probe" else _key(row, default)
        small = probe_small if row == "linear_probe" else _key(row, default, train_fraction=SMALL_FRACTION)
        metrics = ("balanced_accuracy", "ood_balanced_accuracy") if has_ood else ("balanced_accuracy",)
        table3.append({
            "row": row, "title": ROW_TITLES[row],
            "full_data": {m: _mean_sd(_values(records, big, m, seeds)) for m in metrics},
            "small_data": {m: _mean_sd(_values(records, small, m, seeds)) for m in metrics},
            "drop": {m: contrast(records, boot, seeds, m, [big], [small]) for m in metrics},
            "keys": [big, small],
        })

    fig3 = []
    for lam in LAMBDA_GEN_SWEEP:
        key = _key("full", default, lambda_gen=lam)
        fig3.append({"lambda_gen": lam, "key": key,
                     **{m: _mean_sd(_values(records, key, m, seeds))
                        for m in ("balanced_accuracy", "ece_before_temperature", "ece")}})

    verdicts = build_verdicts(records, boot, seeds, default, has_ood)
    return {"table2": table2, "align_text": align, "table3": table3, "fig3": fig3, "verdicts": verdicts,
            "columns": list(columns), "has_ood": has_ood}


def build_verdicts(records, boot, seeds, default, has_ood) -> list:
    k = {row: _key(row, default) for row in ABLATION_ROWS}
    ood = "ood_balanced_accuracy" if has_ood else "balanced_accuracy"
    setting = "OOD binary" if has_ood else "in-distribution"
    out = []

    def add(claim, paper, evidence, verdict, rule):
        out.append({"claim": claim, "paper": paper, "evidence": evidence, "verdict": verdict, "rule": rule})

    for metric, where in ((ood, setting), ("balanced_accuracy", "in-distribution")):
        c = contrast(records, boot, seeds, metric, [k["focal"]], [k["ce_only"]])
        add(f"Focal loss improves B-ACC over CE ({where})", "+7.7 points (71.5% -> 79.2%, ISIC 2024)",
            {"focal - ce": c}, verdict_greater(c["ci"]), "CI of the difference above 0")
        gains = {"focal - ce": c,
                 "focal_align - focal": contrast(records, boot, seeds, metric, [k["focal_align"]], [k["focal"]]),
                 "focal_cal - focal": contrast(records, boot, seeds, metric, [k["focal_cal"]], [k["focal"]])}
        d1 = contrast(records, boot, seeds, metric, [k["focal"], k["focal"]], [k["ce_only"], k["focal_align"]])
        d2 = contrast(records, boot, seeds, metric, [k["focal"], k["focal"]], [k["ce_only"], k["focal_cal"]])
        verdict = combine_verdicts([verdict_greater(d1["ci"]), verdict_greater(d2["ci"])])
        add(f"Focal gives the largest single gain ({where} B-ACC)", "+7.7 vs +3.3 (align) and +0.9 (cal)",
            {**gains, "(focal-ce) - (focal_align-focal)": d1, "(focal-ce) - (focal_cal-focal)": d2}, verdict,
            "CIs of (focal gain - align increment) and (focal gain - cal increment) both above 0")
        c = contrast(records, boot, seeds, metric, [k["focal_align"]], [k["focal"]])
        add(f"Alignment adds B-ACC on top of focal ({where})", "+3.3 points (79.2% -> 82.5%)",
            {"focal_align - focal": c}, verdict_greater(c["ci"]), "CI of the difference above 0")
    for metric in ("ece_before_temperature",) + (("ood_ece_before_temperature",) if has_ood else ()):
        r = ratio_contrast(records, boot, seeds, metric, k["focal_cal"], k["focal"])
        add(f"Calibration term halves ECE ({metric})", "ECE 0.095 -> 0.045 (focal -> focal+cal, ISIC 2024)",
            {"ece(focal_cal) / ece(focal)": r}, verdict_at_most(r["ci"], 0.5), "CI of the ratio at or below 0.5 (refuted: above 0.5)")
        c = contrast(records, boot, seeds, metric, [k["full"]], [k["ce_only"]])
        add(f"Full CFA lowers ECE vs CE ({metric})", "0.155 -> 0.033 (-79%)", {"full - ce": c},
            verdict_greater(c["ci"], direction=-1), "CI of the difference below 0")
    columns = ID_COLUMNS + (OOD_COLUMNS if has_ood else ())
    evidence, votes = {}, []
    for metric in columns:
        direction = -1 if metric in LOWER_IS_BETTER else 1
        for row in ("ce_only", "focal", "focal_align", "focal_cal"):
            c = contrast(records, boot, seeds, metric, [k["full"]], [k[row]])
            evidence[f"{metric}: full - {row}"] = c
            votes.append(verdict_greater(c["ci"], direction))
    verdict = combine_verdicts(votes)
    add("Full is best on every column", "Table II: full best on B-ACC, AUROC and ECE", evidence, verdict,
        "every full-minus-row CI on the better side of 0 (refuted: any on the worse side)")
    small = {row: _key(row, default, train_fraction=SMALL_FRACTION) for row in ("full", "ce_only")}
    for metric in (ood, "balanced_accuracy") if has_ood else ("balanced_accuracy",):
        drop_full = contrast(records, boot, seeds, metric, [k["full"]], [small["full"]])
        drop_ce = contrast(records, boot, seeds, metric, [k["ce_only"]], [small["ce_only"]])
        drop_probe = contrast(records, boot, seeds, metric, ["linear_probe_tf1"], [f"linear_probe_tf{SMALL_FRACTION:g}"])
        add(f"12% of the training data loses little for full ({metric})", "-2.6 points (85.0% -> 82.4%)",
            {"drop full": drop_full, "drop ce": drop_ce, "drop linear probe": drop_probe},
            verdict_at_most(drop_full["ci"], 0.05),
            "CI of the drop at or below 0.05 (5 points; refuted: above)")
        c = contrast(records, boot, seeds, metric, [k["ce_only"], small["full"]], [small["ce_only"], k["full"]])
        add(f"Full loses less than CE at 12% data ({metric})", "-2.6 vs -16.9 / -20.7 points for the baselines",
            {"drop ce - drop full": c}, verdict_greater(c["ci"]), "CI of (CE drop - full drop) above 0")
    best = _key("full", default, lambda_gen=PAPER_LAMBDA_GEN)
    evidence, votes = {}, []
    for lam in LAMBDA_GEN_SWEEP:
        if lam == PAPER_LAMBDA_GEN:
            continue
        c = contrast(records, boot, seeds, "balanced_accuracy", [best], [_key("full", default, lambda_gen=lam)])
        evidence[f"lambda_gen 0.5 - {lam:g}"] = c
        votes.append(verdict_greater(c["ci"]))
    verdict = combine_verdicts(votes)
    add("lambda_gen = 0.5 is the best value (Fig. 3, in-distribution B-ACC)", "peak at 0.5, robust on [0.1, 1]",
        evidence, verdict, "every 0.5-minus-other CI above 0 (refuted: any below 0)")
    c = contrast(records, boot, seeds, "balanced_accuracy", [k["full"]], ["linear_probe_tf1"])
    add("The VLM (full) beats a linear probe on the same frozen CLIP (in-distribution B-ACC)",
        "not in the paper (MONET/PanDerm report this baseline first)", {"full - linear probe": c},
        verdict_greater(c["ci"]), "CI of the difference above 0")
    return out


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_ms(cell) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.3f} ± {cell['sd']:.3f}" if cell["sd"] is not None else f"{cell['mean']:.3f}"


def _fmt_ci(c) -> str:
    if c["estimate"] is None:
        return "n/a"
    low, high = c["ci"]
    if low is None:
        return f"{c['estimate']:+.3f}"
    return f"{c['estimate']:+.3f} [{low:+.3f}, {high:+.3f}]"


def plot_lambda_gen(fig3: list, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.2))
    FigureCanvasAgg(figure)
    lams = [e["lambda_gen"] for e in fig3]
    for i, (metric, title) in enumerate((("balanced_accuracy", "balanced accuracy (test)"),
                                         ("ece_before_temperature", "ECE before temperature (test)"))):
        ax = figure.add_subplot(1, 2, i + 1)
        means = [np.nan if e[metric]["mean"] is None else e[metric]["mean"] for e in fig3]
        sds = [0.0 if e[metric]["sd"] is None else e[metric]["sd"] for e in fig3]
        ax.errorbar(range(len(lams)), means, yerr=sds, marker="o", capsize=4)
        ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
        ax.set_xlabel("lambda_gen")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    figure.suptitle("lambda_gen sweep (full CFA), mean ± sd over seeds", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def write_docs(args, report: dict, records: dict, harness_command: str, vision, decoder, cost: dict) -> None:
    """`cost`: `wall_seconds`, `cpu_seconds`, `load_average` of the invocation that trained the runs."""
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "reproduction_lambda_gen.png"
    plot_lambda_gen(report["fig3"], png)
    agg = report
    seeds = args.seed_list
    any_record = next(iter(records.values()))
    lines = ["# Reproduction of the paper's Tables II, III and Fig. 3 on a controlled proxy", ""]
    lines += [
        f"Produced by `{harness_command}` in {cost['wall_seconds'] / 60:.1f} min wall time "
        f"({args.jobs} parallel runs x {args.num_threads} thread(s); machine: {os.cpu_count()} logical CPUs; "
        f"{cost['cpu_seconds'] / 60:.1f} CPU-min in all, load average {cost['load_average']} at the end"
        f"{'; the runs of that invocation, this report regenerated from them' if cost.get('report_regenerated_from_reused_runs') else ''}). "
        f"{len(records)} runs; seeds {seeds} (training seed s also the split seed s). Every run's numbers and the "
        "command that reproduces them exactly are in `reproduction.json`.", "",
    ]
    if args.dataset == "synthetic":
        p = args.preset
        lines += [
            f"**Data.** The procedural synthetic set (`dataset_scripts/synthetic.py`, not clinical data): one pool of "
            f"{p['num_images']} long-tailed images (ISIC 2019 class mix) + {p['test_per_class'] + p['validation_per_class']}"
            f" per class, {p['image_size']} px; per split seed, whole lesion groups of each class go to test until it "
            f"holds >= {p['test_per_class']} images per class, then validation (>= {p['validation_per_class']}), the "
            f"rest (the long-tailed mix) is train: {any_record['train_rows']} / {any_record['validation_rows']} / "
            f"{any_record['test_rows']} rows for seed {any_record['seed']}. **OOD:** {any_record['ood_rows']} images "
            f"of the same generator with `shift=True` (tile crop, lower resolution, colour cast, illumination ramp, "
            f"darker skin tones, no vignetting or rulers; 10% malignant), scored with the ISIC 2024 binary protocol.",
            "",
        ]
    else:
        lines += [f"**Data.** `{args.dataset}` at `{args.data_dir}`; OOD `{args.ood_dataset}` at `{args.ood_data_dir}`.",
                  ""]
    lines += [
        f"**Components.** vision `{vision}`, decoder `{decoder}`" + (
            " (the tiny demo pair: CLIP 64 px / 8 x 8 patches, hidden 32 x 2 layers; decoder hidden 32 x 2 layers, "
            "briefly pretrained on other synthetic images by `tools/demo_components.py`)"
            if not args.vision_model_name_or_path else "") + ". "
        f"Recipe: LoRA r={args.lora_r or TRAINING_RECIPE['lora_r']}, lr {args.learning_rate or TRAINING_RECIPE['learning_rate']}, "
        f"{args.num_train_epochs:g} epochs, batch {args.per_device_train_batch_size or 16}, cosine schedule, "
        "checkpoint with the best validation balanced accuracy kept (`load_best_model_at_end`), temperature fitted "
        "on validation. CFA weights: lambda_align 1, lambda_calibration 1, focal_loss_gamma 2, inverse-frequency "
        "focal_loss_alpha.",
        "",
        f"**Statistics.** Cells are mean ± sd over the {len(seeds)} seeds. Differences are paired (same test rows) and "
        f"averaged over seeds; 95% CIs from a two-level bootstrap of {args.n_bootstrap} replicates: each replicate "
        "resamples the seeds (with replacement) and, within each, the test lesion groups (OOD: patient/lesion "
        "groups), so a CI carries the spread between training seeds as well as the test-set noise; a difference "
        "whose sign changes between seeds does not get a CI clear of 0. ECE: 15 equal-width bins on the max "
        "probability (OOD: on the binary probability).", "",
    ]
    cols = agg["columns"]
    for title, subset in (("in distribution (8-class test split)", [c for c in cols if not c.startswith("ood_")]),
                          ("out of distribution (binary protocol)", [c for c in cols if c.startswith("ood_")])):
        if not subset:
            continue
        lines += [f"## Table II, {title}", ""]
        lines.append("| row | lambda_gen | " + " | ".join(COLUMN_TITLES[c] for c in subset) + " |")
        lines.append("|---|---|" + "---|" * len(subset))
        for entry in agg["table2"]:
            lam = "-" if entry["lambda_gen"] is None else f"{entry['lambda_gen']:g}"
            lines.append(f"| {entry['title']} | {lam} | " + " | ".join(_fmt_ms(entry["summary"][c]) for c in subset)
                         + " |")
        lines += ["", "Paired difference against CE, mean over seeds [95% CI]:", ""]
        lines.append("| row | " + " | ".join(COLUMN_TITLES[c] for c in subset) + " |")
        lines.append("|---|" + "---|" * len(subset))
        for entry in agg["table2"]:
            if "vs_ce" in entry:
                lines.append(f"| {entry['title']} | " + " | ".join(_fmt_ci(entry["vs_ce"][c]) for c in subset) + " |")
        lines.append("")
    lines += ["## Alignment target: `--align_text report` vs `label`", ""]
    subset = [c for c in ("balanced_accuracy", "macro_auroc", "ece_before_temperature", "ood_balanced_accuracy",
                          "ood_auroc") if c in cols]
    lines.append("| row | align_text | " + " | ".join(COLUMN_TITLES[c] + (" (OOD)" if c.startswith("ood_") else "")
                                                    for c in subset) + " |")
    lines.append("|---|---|" + "---|" * len(subset))
    for entry in agg["align_text"]:
        for which in ("report", "label"):
            lines.append(f"| {ROW_TITLES[entry['row']]} | {which} | "
                         + " | ".join(_fmt_ms(entry[which][c]) for c in subset) + " |")
        lines.append(f"| {ROW_TITLES[entry['row']]} | report - label | "
                     + " | ".join(_fmt_ci(entry["report_minus_label"][c]) for c in subset) + " |")
    lines += ["", f"Rows of Tables II / III and Fig. 3 use `--align_text {args.align_text_default}`.", ""]
    lines += ["## Table III, data efficiency (100% vs 12% of the training lesion groups)", ""]
    metrics = list(agg["table3"][0]["drop"])
    header = []
    for m in metrics:
        name = "ID B-ACC" if m == "balanced_accuracy" else "OOD B-ACC (binary)"
        header += [f"{name} 100%", f"{name} 12%", f"{name} drop [95% CI]"]
    lines.append("| model | " + " | ".join(header) + " |")
    lines.append("|---|" + "---|" * len(header))
    for entry in agg["table3"]:
        cells = []
        for m in metrics:
            cells += [_fmt_ms(entry["full_data"][m]), _fmt_ms(entry["small_data"][m]), _fmt_ci(entry["drop"][m])]
        lines.append(f"| {entry['title']} | " + " | ".join(cells) + " |")
    lines += ["", "## Fig. 3, lambda_gen sweep (full CFA)", "", f"![lambda_gen sweep]({png.name})", ""]
    lines.append("| lambda_gen | B-ACC | ECE before T | ECE after T |")
    lines.append("|---|---|---|---|")
    for e in agg["fig3"]:
        lines.append(f"| {e['lambda_gen']:g} | {_fmt_ms(e['balanced_accuracy'])} | "
                     f"{_fmt_ms(e['ece_before_temperature'])} | {_fmt_ms(e['ece'])} |")
    lines += ["", "## Verdicts (from the numbers above; rule in the last column)", ""]
    lines.append("| claim | paper | this proxy | verdict | rule |")
    lines.append("|---|---|---|---|---|")
    for v in agg["verdicts"]:
        shown = "; ".join(f"{name}: {_fmt_ci(c)}" for name, c in list(v["evidence"].items())[:4])
        lines.append(f"| {v['claim']} | {v['paper']} | {shown} | **{v['verdict']}** | {v['rule']} |")
    lines.append("")
    (docs / "reproduction.md").write_text("\n".join(lines))
    payload = {
        "command": harness_command, **cost, "jobs": args.jobs,
        "num_threads": args.num_threads, "cpu_count": os.cpu_count(), "seeds": seeds, "dataset": args.dataset,
        "ood_dataset": args.ood_dataset, "components": {"vision": vision, "decoder": decoder},
        "preset": args.preset, "num_train_epochs": args.num_train_epochs, "n_bootstrap": args.n_bootstrap,
        "align_text_default": args.align_text_default, "recipe": TRAINING_RECIPE,
        "runs": [records[k] for k in sorted(records)], **agg,
    }
    (docs / "reproduction.json").write_text(
        json.dumps(_nan_to_none(payload), indent=1, default=_json_default, allow_nan=False)
    )


def _nan_to_none(value):
    """JSON has no NaN: an undefined metric (e.g. AUROC of a split without positives) is written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------------------------


def prepare(args) -> tuple[str, str]:
    """Components, data and the frozen-feature caches, made once before the parallel runs."""
    vision, decoder = components(args)
    for seed in args.seed_list:
        load_splits(args, seed, 1.0)
    load_ood(args)
    return vision, decoder


def orchestrate(args, argv) -> dict:
    start = time.time()
    vision, decoder = prepare(args)
    specs = planned_runs(args)
    records, todo = {}, []
    for spec in specs:
        path = Path(args.output_dir) / "runs" / run_id(spec) / "result.json"
        if path.is_file() and not args.overwrite:
            found = json.loads(path.read_text())
            # the command names the flags, not the preset's sizes: a run made with other sizes is not reused
            if found.get("command") == run_command(args, spec) and found.get("preset") == args.preset:
                records[found["id"]] = found
                continue
        todo.append(spec)
    logger.warning(f"{len(specs)} runs planned, {len(records)} reused, {len(todo)} to run with {args.jobs} job(s).")
    # the first run of each split seed fills the feature cache alone (parallel runs would compute it twice)
    first = {}
    for spec in todo:
        first.setdefault(spec["seed"], spec)
    ordered = list(first.values()) + [s for s in todo if s not in first.values()]
    args_dict = vars(args).copy()
    failures = []
    import multiprocessing

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(args.num_threads,)) as pool:
        warm = [pool.submit(_worker_run, args_dict, s) for s in ordered[: len(first)]]
        results = [f.result() for f in warm]
        futures = [pool.submit(_worker_run, args_dict, s) for s in ordered[len(first):]]
        for i, future in enumerate(futures):
            results.append(future.result())
            logger.warning(f"run {len(first) + i + 1}/{len(ordered)} done ({time.time() - start:.0f} s)")
    for result in results:
        if "error" in result:
            failures.append(result)
        else:
            records[result["id"]] = result
    if failures:
        for f in failures:
            logger.error(f"run {f['id']} failed: {f['error']}\n{f['traceback']}")
        raise RuntimeError(f"{len(failures)} run(s) failed: {[f['id'] for f in failures]}")
    arrays = {rid: dict(np.load(Path(args.output_dir) / "runs" / rid / "predictions.npz")) for rid in records}
    report = aggregate(args, records, arrays)
    wall = time.time() - start
    import resource

    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cost = {"wall_seconds": round(wall, 1),
            "cpu_seconds": round(sum(u.ru_utime + u.ru_stime for u in used), 1),  # this process and its runs
            "load_average": [round(x, 1) for x in os.getloadavg()]}  # 1, 5, 15 min: other work on the machine
    cost_file = Path(args.output_dir) / "harness_cost.json"
    if todo:
        cost["runs_trained"] = len(todo)
        cost_file.write_text(json.dumps(cost, indent=2))
    elif cost_file.is_file():  # every run reused (e.g. the report regenerated): the cost of the invocation that trained
        cost = {**json.loads(cost_file.read_text()), "report_regenerated_from_reused_runs": True}
    write_docs(args, report, records, shlex.join(["python", "-m", "bench.reproduce", *argv]), vision, decoder, cost)
    print(f"Wrote {args.docs_dir}/reproduction.md, reproduction.json, reproduction_lambda_gen.png "
          f"({len(records)} runs, {wall / 60:.1f} min, {len(todo)} trained)")
    return report


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    args = resolve(build_parser().parse_args(argv))
    if args.run is not None:
        spec = run_spec(args.run, args.seed, lambda_gen=args.lambda_gen, align_text=args.align_text,
                        train_fraction=args.train_fraction)
        record = execute_run(args, spec)
        print(json.dumps({"id": record["id"], **{k: v for k, v in record["metrics"].items()
                                                 if not isinstance(v, dict)}}, default=_json_default))
        return 0
    orchestrate(args, argv)
    return 0


__all__ = ["aggregate", "execute_run", "planned_runs", "run_command", "score_predictions"]


if __name__ == "__main__":
    sys.exit(main())
