#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Evaluate a trained SkinCLIP-VL model on one benchmark split, following DESIGN.md's per-benchmark protocol.

    python evaluate_model.py --model outputs/demo/model --dataset synthetic --data_dir outputs/data/synthetic
    python evaluate_model.py --model DIR_OR_REPO --dataset isic2019 --data_dir /data/isic2019 --split test
    python evaluate_model.py --model DIR_OR_REPO --dataset derm7pt --data_dir /data/derm7pt/release_v0
    python evaluate_model.py --model DIR_OR_REPO --dataset isic2024 --data_dir /data/isic2024 \
        --threshold_from /data/isic2019          # Youden threshold chosen on ISIC 2019 validation
    python evaluate_model.py --model DIR --dataset pad_ufes_20 --data_dir /data/PAD-UFES-20   # own data / presets
    python evaluate_model.py --model DIR --dataset csv --csv labels.csv --image_dir images/ --image_column file \
        --label_column diagnosis [--patient_column patient] [--label_map map.json]

The metrics are over the model's classes (`config.class_labels`); the data's labels are matched to them by name, and
data with a label the model lacks is an error naming it (map it with `--label_map`).

Every metric is reported with group-level bootstrap 95% CIs (resampling `group_id`s: lesions for ISIC 2019 and the
synthetic set, cases for Derm7pt, patients for ISIC 2024), before and after the model's post-hoc temperature
(`config.calibration_temperature`, fitted on validation by `train.py`). Balanced accuracy and AUROC do not change with
a temperature (argmax and rankings are kept); the calibration metrics (ECE, Brier, NLL) do.

Protocol (paper Table I):

- `synthetic`, `isic2019`: 8-class metrics (balanced accuracy, macro OvR AUROC, ECE with 15 bins, Brier, NLL,
  per-class sensitivity/specificity). The split must be the one training used (same `--seed_split`).
- `derm7pt`: 8-class metrics over the classes present in the split, and the Derm7pt authors' 5 groups scored from the
  8-class prediction: the 8-class probabilities are summed into groups with `CLASS_TO_DERM7PT_GROUP`
  (NV -> NEV, MEL -> MEL, BCC -> BCC, BKL -> SK, AK / DF / VASC / SCC -> MISC) and compared with the authors' group
  label (`derm7pt_group`). Where the two label spaces disagree: a lentigo is BKL in our 8-class map (as ISIC files
  solar lentigo) but MISC for the authors, so a lentigo predicted BKL is an SK prediction and counts as an error; the
  5-group block is therefore also reported without the lentigo rows (`derm7pt_5group_without_lentigo`). Melanosis and
  "miscellaneous" cases (authors' MISC) have no 8-class label, are excluded by the loader, and are counted there.
- `isic2024` (out-of-distribution, zero-shot; the ISIC 2019 model unchanged): malignancy score
  `P(MEL) + P(BCC) + P(SCC)` -> binary AUROC, binary balanced accuracy / sensitivity / specificity at a threshold
  chosen with Youden's J on ISIC 2019 validation (`--threshold_from DIR`: the model is run on that folder's
  validation split; or `--threshold_from 0.37`: a fixed value), binary ECE (15 bins on the two-class max probability)
  and Brier; plus the 8-class metrics on the rows whose `iddx_3` maps to a class. Without `--threshold_from` the
  threshold is chosen on the test rows themselves, which is optimistic, and the report says so.
"""

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from configuration_skinclip_vl import MALIGNANT_CLASSES
from dataset_scripts import dataset_names
from processing_skinclip_vl import apply_temperature
from trainer.metrics import softmax
from trainer.validation import number_type

logger = logging.getLogger("evaluate_model")

DATASETS = tuple(dataset_names())
OWN_DATA_OPTIONS = ("csv", "image_dir", "image_column", "label_column", "group_column", "patient_column", "age_column",
                    "sex_column", "site_column", "label_map", "class_labels")
# 8-class prediction -> the Derm7pt authors' 5 groups (see the module docstring for where the spaces disagree)
CLASS_TO_DERM7PT_GROUP = {
    "MEL": "MEL",
    "NV": "NEV",
    "BCC": "BCC",
    "BKL": "SK",
    "AK": "MISC",
    "DF": "MISC",
    "VASC": "MISC",
    "SCC": "MISC",
}
HEADLINE = ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll")
BINARY_HEADLINE = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "ece", "brier")


def _threshold_or_folder(text: str) -> str:
    """`--threshold_from`: a data folder, or a number that must be a malignancy score in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        return text
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"a threshold is a malignancy score in [0, 1], got {text}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Trained model directory or Hub repo (adapter layout).")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data_dir", default=None, help="Raw data folder (synthetic: generated there if missing).")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--output_json", default=None, help="Where to write the report (default: print only).")
    parser.add_argument(
        "--threshold_from",
        type=_threshold_or_folder,
        default=None,
        help="ISIC 2024: an ISIC 2019 (or synthetic) data folder whose validation split fixes the Youden threshold, "
        "or a float threshold. Default: Youden on the test rows (optimistic, flagged in the report).",
    )
    parser.add_argument("--no_metadata", action="store_true", help="Withhold metadata (image-only evaluation).")
    parser.add_argument("--n_bootstrap", type=number_type(integer=True, minimum=0), default=1000, help="Bootstrap replicates for the CIs (0: none).")
    parser.add_argument("--batch_size", type=number_type(integer=True, minimum=1), default=32)
    parser.add_argument(
        "--seed_split",
        type=number_type(integer=True, minimum=0),
        default=None,
        help="Split seed used in training (default 0; synthetic: the seed of the generation in --data_dir).",
    )
    parser.add_argument(
        "--synthetic_num_images",
        type=number_type(integer=True, minimum=1),
        default=None,
        help="Synthetic set size (default: the generation in --data_dir, else 1000 generated there).",
    )
    parser.add_argument("--isic2024_metadata_file", default="train-metadata.csv")
    parser.add_argument("--isic2024_image_file", default="train-image.hdf5")
    own = parser.add_argument_group("own data (dataset_scripts.own_data; the same flags as prepare and train.py)")
    for name in ("csv", "image_dir", "image_column", "label_column", "group_column", "patient_column", "age_column",
                 "sex_column", "site_column", "label_map"):
        own.add_argument(f"--{name}", default=None)
    own.add_argument("--class_labels", nargs="+", default=None, help="the data's class list (default: its own)")
    parser.add_argument("--max_samples", type=number_type(integer=True, minimum=1), default=None,
                        help="Evaluate the first N rows only (debugging).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
    parser.add_argument("--local_files_only", action="store_true", help="Never contact the Hub.")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------


def load_split(dataset: str, data_dir, split: str, args):
    """One split of a registered source (`dataset_scripts.load`) in the shared schema: `(datasets.Dataset, summary)`.

    For `synthetic`, options left unset (`--seed_split`, `--synthetic_num_images`) take the values of the generation
    already in `data_dir`."""
    from datasets import Image as ImageFeature

    import dataset_scripts

    source = dataset_scripts.get_dataset_source(dataset)
    if data_dir is None and source.requires_data_dir:
        raise ValueError(f"--data_dir is required for --dataset {dataset} (the folder of the raw download).")
    splits = source.splits
    if split not in splits:
        only = " (an out-of-distribution test set: use --split test)" if splits == ("test",) else ""
        raise ValueError(f"{dataset} has no {split!r} split, only {list(splits)}{only}.")
    data, summary = dataset_scripts.load(
        dataset,
        data_dir,
        seed_split=args.seed_split,
        synthetic_num_images=args.synthetic_num_images,
        isic2024_metadata_file=args.isic2024_metadata_file,
        isic2024_image_file=args.isic2024_image_file,
        **{name: getattr(args, name, None) for name in OWN_DATA_OPTIONS},
    )
    ds = data[split]
    if args.max_samples is not None:
        ds = ds.select(range(min(len(ds), args.max_samples)))
    if len(ds) == 0:
        raise ValueError(f"The {split!r} split of {dataset!r} ({data_dir}) is empty: nothing to evaluate.")
    # decoded by processing_skinclip_vl.load_image in the collator: an image that fails names its id and row
    ds = ds.cast_column("image", ImageFeature(decode=False)).add_column("row_index", list(range(len(ds))))
    return ds, summary


def _looks_synthetic(data_dir) -> bool:
    return (Path(data_dir) / "generation.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------------


def group_matrix(class_names, groups) -> np.ndarray:
    """(num_classes, num_groups) 0/1 matrix summing 8-class probabilities into the Derm7pt authors' groups."""
    matrix = np.zeros((len(class_names), len(groups)))
    for i, name in enumerate(class_names):
        matrix[i, groups.index(CLASS_TO_DERM7PT_GROUP[name])] = 1.0
    return matrix


def multiclass_blocks(logits, labels, groups, class_names, temperature, n_boot) -> dict:
    """8-class metrics after the temperature (with `*_before_temperature`), and the full block before it."""
    from trainer.evaluation import compute_all_metrics

    after = compute_all_metrics(
        labels,
        logits,
        group_ids=groups,
        class_names=class_names,
        temperature=temperature,
        n_boot=n_boot,
        is_logits=True,
    )
    before = compute_all_metrics(
        labels, logits, group_ids=groups, class_names=class_names, n_boot=n_boot, is_logits=True
    )
    return {"after_temperature": after, "before_temperature": before}


def derm7pt_group_blocks(logits, group_labels, groups, class_names, temperature, n_boot, keep=None) -> dict:
    """The authors' 5 groups, scored from the 8-class probabilities (before and after the temperature)."""
    from dataset_scripts.schema import DERM7PT_GROUPS
    from trainer.evaluation import compute_all_metrics

    group_labels = np.asarray(group_labels, dtype=np.int64)
    if keep is not None:
        group_labels = np.where(keep, group_labels, -1)
    matrix = group_matrix(class_names, DERM7PT_GROUPS)
    result = {}
    for name, t in (("after_temperature", temperature), ("before_temperature", 1.0)):
        probs = softmax(apply_temperature(logits, t), axis=1) @ matrix
        result[name] = compute_all_metrics(
            group_labels, probs, group_ids=groups, class_names=DERM7PT_GROUPS, n_boot=n_boot, is_logits=False
        )
    result["class_to_group"] = dict(CLASS_TO_DERM7PT_GROUP)
    return result


def binary_block(labels, scores, groups, threshold, n_boot, seed: int = 0) -> dict:
    """ISIC 2024 binary metrics at `threshold` (None: Youden on these rows) with group-level bootstrap CIs."""
    from trainer.metrics import binary_auroc, binary_metrics, bootstrap_cis

    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    keep = labels >= 0
    if keep.sum() == 0:
        return {"n_samples": 0, "note": "no row has a binary target"}
    if len(set(labels[keep].tolist())) < 2 and threshold is None:
        return {"n_samples": int(keep.sum()), "note": "one binary class only: no Youden threshold, no AUROC"}
    result = binary_metrics(labels, scores, threshold=threshold)
    fixed = result["threshold"]

    def at_threshold(y, s):
        return binary_metrics(y, s[:, 0], threshold=fixed)

    fns = {
        "auroc": lambda y, s: binary_auroc(y == 1, s[:, 0]),
        "balanced_accuracy": lambda y, s: at_threshold(y, s)["balanced_accuracy"],
        "sensitivity": lambda y, s: at_threshold(y, s)["sensitivity"],
        "specificity": lambda y, s: at_threshold(y, s)["specificity"],
        "ece": lambda y, s: at_threshold(y, s)["ece"],
        "brier": lambda y, s: at_threshold(y, s)["brier"],
    }
    result["ci"] = {}
    if n_boot > 0:
        intervals = bootstrap_cis(fns, labels, scores[:, None], groups, n_boot=n_boot, seed=seed)
        result["ci"] = {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in intervals.items()}
        result["ci_note"] = "threshold held fixed across replicates"
    result["n_boot"] = int(n_boot)
    return result


def _finite(value):
    return float(value) if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------------


def load_model(name: str, device: str | None, local_files_only: bool = False):
    from transformers import AutoModel, AutoProcessor

    from adapters_skinclip_vl import check_saved_model

    check_saved_model(name)  # a missing folder, config.json, adapter/ or a corrupt weights file is named
    hub = {"trust_remote_code": True}
    if local_files_only:
        hub["local_files_only"] = True
    model = AutoModel.from_pretrained(name, **hub)
    processor = AutoProcessor.from_pretrained(name, **hub)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return model, processor


def predict(model, processor, dataset, use_metadata: bool, batch_size: int, desc: str):
    """(logits, labels, groups) of `dataset` (no feature cache: the vision tower runs on the images)."""
    from trainer.collator import SkinCLIPVLCollator
    from trainer.evaluation import collect_logits

    collator = SkinCLIPVLCollator(processor, use_metadata=use_metadata)
    return collect_logits(model, dataset, collator, batch_size, desc)


def youden_from_validation(model, processor, args, class_names, temperature) -> dict:
    """The Youden threshold of the malignancy score on the validation split of `--threshold_from` (a data folder)."""
    from trainer.metrics import malignancy_scores, youden_threshold

    source = args.threshold_from
    dataset = "synthetic" if _looks_synthetic(source) else "isic2019"
    validation, _ = load_split(dataset, source, "validation", args)
    logits, _, _ = predict(
        model, processor, validation, not args.no_metadata, args.batch_size, f"{dataset} validation (threshold)"
    )
    malignant = np.asarray(validation["malignant"], dtype=np.int64)
    positive = [class_names.index(c) for c in MALIGNANT_CLASSES]
    thresholds = {}
    for name, t in (("after_temperature", temperature), ("before_temperature", 1.0)):
        scores = malignancy_scores(softmax(apply_temperature(logits, t), axis=1), positive)
        thresholds[name] = float(youden_threshold(malignant, scores))
    return {
        "thresholds": thresholds,
        "threshold_source": f"youden on {dataset} validation ({source}, {int((malignant >= 0).sum())} rows)",
        "optimistic": False,
    }


def resolve_threshold(model, processor, args, class_names, temperature) -> dict:
    if args.threshold_from is None:
        return {
            "thresholds": {"after_temperature": None, "before_temperature": None},
            "threshold_source": "youden on the test rows themselves (optimistic: no held-out threshold was given)",
            "optimistic": True,
        }
    try:
        value = float(args.threshold_from)
    except ValueError:
        value = None
    if value is not None:
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"--threshold_from {args.threshold_from}: a threshold is a malignancy score in [0, 1].")
        return {
            "thresholds": {"after_temperature": value, "before_temperature": value},
            "threshold_source": "given on the command line",
            "optimistic": False,
        }
    if not Path(args.threshold_from).is_dir():
        raise ValueError(f"--threshold_from {args.threshold_from!r} is neither a float nor a data folder.")
    return youden_from_validation(model, processor, args, class_names, temperature)


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


def evaluate(args) -> dict:
    if args.dataset == "isic2024" and args.split != "test":
        raise ValueError("ISIC 2024 is an out-of-distribution test set: use --split test.")
    dataset, summary = load_split(args.dataset, args.data_dir, args.split, args)  # data errors before the model
    model, processor = load_model(args.model, args.device, args.local_files_only)
    config = model.config
    class_names = config.class_labels
    temperature = getattr(config, "calibration_temperature", None)
    temperature = 1.0 if temperature is None else float(temperature)
    from dataset_scripts import align_class_labels

    dataset = align_class_labels(dataset, class_names, f"the model {args.model}")
    use_metadata = not args.no_metadata
    logits, labels, groups = predict(
        model, processor, dataset, use_metadata, args.batch_size, f"{args.dataset} {args.split}"
    )

    report = {
        "model": str(args.model),
        "dataset": args.dataset,
        "data_dir": None if args.data_dir is None else str(args.data_dir),
        "split": args.split,
        "use_metadata": use_metadata,
        "temperature": temperature,
        "n_rows": int(len(dataset)),
        "n_bootstrap": int(args.n_bootstrap),
        "bootstrap_unit": "group_id",
        "class_names": class_names,
    }
    if summary is not None and hasattr(summary, "to_dict"):
        report["load_summary"] = summary.to_dict()
    blocks = multiclass_blocks(logits, labels, groups, class_names, temperature, args.n_bootstrap)
    report["multiclass"] = blocks["after_temperature"]
    report["multiclass_before_temperature"] = blocks["before_temperature"]
    protocol = [f"{len(class_names)}-class metrics over the classes present; rows without a fine class excluded (n_excluded)"]

    if args.dataset == "derm7pt":
        group_labels = np.asarray(dataset["derm7pt_group"], dtype=np.int64)
        source = [str(s).strip().lower() for s in dataset["source_label"]]
        not_lentigo = np.array([s != "lentigo" for s in source])
        report["derm7pt_5group"] = derm7pt_group_blocks(
            logits, group_labels, groups, class_names, temperature, args.n_bootstrap
        )
        report["derm7pt_5group_without_lentigo"] = derm7pt_group_blocks(
            logits, group_labels, groups, class_names, temperature, args.n_bootstrap, keep=not_lentigo
        )
        report["derm7pt_5group"]["n_lentigo"] = int((~not_lentigo).sum())
        protocol.append(
            "Derm7pt 5 groups from the 8-class probabilities summed by class_to_group; lentigo is BKL (-> SK) for "
            "the model but MISC for the authors, so also reported without the lentigo rows; melanosis/miscellaneous "
            "have no 8-class label and are excluded by the loader"
        )

    if args.dataset == "isic2024":
        from trainer.metrics import malignancy_scores

        positive = [class_names.index(c) for c in MALIGNANT_CLASSES]
        malignant = np.asarray(dataset["malignant"], dtype=np.int64)
        chosen = resolve_threshold(model, processor, args, class_names, temperature)
        binary = {
            "score": "P(MEL) + P(BCC) + P(SCC)",
            "threshold_source": chosen["threshold_source"],
            "optimistic": chosen["optimistic"],
        }
        for name, t in (("after_temperature", temperature), ("before_temperature", 1.0)):
            scores = malignancy_scores(softmax(apply_temperature(logits, t), axis=1), positive)
            binary[name] = binary_block(malignant, scores, groups, chosen["thresholds"][name], args.n_bootstrap)
        report["binary"] = binary
        report["n_rows_with_fine_label"] = int((labels >= 0).sum())
        protocol.append(
            "ISIC 2024 (OOD): binary metrics of the malignancy score on rows with a 0/1 target; threshold: "
            + chosen["threshold_source"]
        )
    report["protocol"] = protocol
    return report


def _fmt(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.4f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def format_report(report: dict) -> str:
    lines = [
        f"{report['dataset']} / {report['split']} ({report['n_rows']} rows, metadata "
        f"{'used' if report['use_metadata'] else 'withheld'}), temperature {report['temperature']:.4g}, "
        f"95% CIs from {report['n_bootstrap']} group-level bootstrap replicates",
    ]

    def table(title, after, before, keys):
        lines.append(f"\n{title}  (n = {after.get('n_samples', 'n/a')})")
        lines.append(f"  {'metric':<20}{'after temperature':<36}{'before temperature':<36}")
        for key in keys:
            lines.append(
                f"  {key:<20}{_fmt(after.get(key), after.get('ci', {}).get(key)):<36}"
                f"{_fmt(before.get(key), before.get('ci', {}).get(key)):<36}"
            )

    table(f"{len(report['class_names'])}-class", report["multiclass"], report["multiclass_before_temperature"], HEADLINE)
    for key, title in (
        ("derm7pt_5group", "Derm7pt 5 groups"),
        ("derm7pt_5group_without_lentigo", "Derm7pt 5 groups, without lentigo"),
    ):
        if key in report:
            table(title, report[key]["after_temperature"], report[key]["before_temperature"], HEADLINE)
    if "binary" in report:
        binary = report["binary"]
        after, before = binary["after_temperature"], binary["before_temperature"]
        table("ISIC 2024 binary, P(MEL)+P(BCC)+P(SCC)", after, before, BINARY_HEADLINE)
        lines.append(
            f"  threshold: {_fmt(after.get('threshold'))} (after), {_fmt(before.get('threshold'))} (before); "
            f"{binary['threshold_source']}"
        )
        if binary["optimistic"]:
            lines.append("  WARNING: threshold chosen on the test rows: balanced accuracy is optimistic.")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    if args.output_json:  # fail before the evaluation, not after it
        directory = os.path.dirname(os.path.abspath(args.output_json))
        try:
            os.makedirs(directory, exist_ok=True)
            probe = os.path.join(directory, f".write-test-{os.getpid()}")
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as err:
            raise SystemExit(f"--output_json {args.output_json}: cannot write to {directory} ({err.strerror or err})") from None
    report = evaluate(args)
    print(format_report(report))
    if args.output_json:
        text = json.dumps(report, indent=2, allow_nan=False, default=_json_default)
        tmp = f"{args.output_json}.tmp{os.getpid()}"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.replace(tmp, args.output_json)
        print(f"\nWrote {args.output_json}")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _finite(float(value))
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


if __name__ == "__main__":
    sys.exit(main())
