# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Class-logit collection, the metrics report shared by `train.py` and `evaluate_model.py`, and the `Trainer`'s
`compute_metrics`."""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from processing_skinclip_vl import apply_temperature

from .figures import confusion_matrix_plot, reliability_diagram
from .metrics import (
    TEMPERATURE_BOUNDS,
    _class_names,
    _json_float,
    _prepare,
    _to_numpy,
    balanced_accuracy,
    bootstrap_cis,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    macro_auroc,
    negative_log_likelihood,
    per_class_auroc,
    per_class_sensitivity_specificity,
    softmax,
)


@torch.no_grad()
def collect_logits(model, dataset, collator, batch_size: int = 32, desc: str = "predicting"):
    """Class logits (one prefill each, LM logits only for the last position), labels and group ids of `dataset`."""
    model.eval()
    device = next(p for p in model.parameters()).device
    collator = dataclasses.replace(collator, with_targets=False)
    logits, labels, groups = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collator(rows)
        labels.append(batch.pop("class_labels").numpy())
        batch.pop("align_text_ids")
        batch.pop("group_ids")
        groups.extend(str(row.get("group_id") or row.get("image_id")) for row in rows)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        outputs = model(**batch, logits_to_keep=1, use_cache=False)
        logits.append(outputs.class_logits.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels), groups


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(
        x.ndim == 2 and x.size > 0 and np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
        and np.allclose(x.sum(axis=1), 1.0, atol=1e-3)
    )


def compute_all_metrics(
    labels,
    logits_or_probs,
    group_ids=None,
    class_names: Sequence[str] | None = None,
    temperature: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 15,
    is_logits: bool | None = None,
) -> dict[str, Any]:
    """
    All multi-class metrics, per-class results and group-level bootstrap CIs, as a JSON-serialisable dict.

    Args:
        labels (array-like of shape `(n,)`): class indices; negative ones (no fine class) are left out and counted in
            `n_excluded`.
        logits_or_probs (array-like of shape `(n, num_classes)`): raw logits or probabilities (see `is_logits`).
        group_ids (sequence of hashables of length `n`, *optional*): lesion/patient groups for the bootstrap; `None`
            resamples rows.
        class_names (sequence of `str`, *optional*): keys of `per_class`; defaults to `"0"`, `"1"`, ...
        temperature (`float`, *optional*): post-hoc temperature, applied to the logits (with [`apply_temperature`])
            before every metric; the calibration metrics before it are also reported (`*_before_temperature`).
        n_boot (`int`, *optional*, defaults to 1000): bootstrap replicates; 0 skips the CIs (`ci` is then empty).
        seed (`int`, *optional*, defaults to 0): bootstrap seed.
        alpha (`float`, *optional*, defaults to 0.05): CI level (95% by default).
        n_bins (`int`, *optional*, defaults to 15): ECE bins.
        is_logits (`bool`, *optional*): whether `logits_or_probs` are logits. `None` guesses: non-negative rows summing
            to 1 are probabilities.

    Returns:
        `dict[str, Any]` with `balanced_accuracy`, `macro_auroc`, `ece`, `brier`, `nll`, `accuracy` (floats or `None`
        when undefined), `per_class` (`{name: {"sensitivity", "specificity", "auroc", "support"}}`),
        `auroc_absent_classes` (names left out of the macro AUROC), `ci` (`{metric: [low, high]}` for the five
        headline metrics), `n_samples`, `n_excluded`, `num_classes`, `n_boot`, `ci_level`, and with a temperature
        `temperature` and the `*_before_temperature` values.
    """
    raw_labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    values = _to_numpy(logits_or_probs).astype(np.float64)
    if values.ndim != 2 or values.shape[0] != raw_labels.shape[0]:
        raise ValueError(
            f"`logits_or_probs` must be (num_samples, num_classes) with one row per label: labels: "
            f"{raw_labels.shape[0]}, logits_or_probs: {values.shape}."
        )
    if is_logits is None:
        is_logits = not _looks_like_probs(values)
    if temperature is not None and not is_logits:
        raise ValueError("`temperature` needs logits, but `logits_or_probs` are probabilities (or set `is_logits=True`).")
    names = _class_names(class_names, values.shape[1])
    n_excluded = int((raw_labels < 0).sum())

    result: dict[str, Any] = {"n_samples": int(raw_labels.size - n_excluded), "n_excluded": n_excluded}
    result["num_classes"] = int(values.shape[1])
    if temperature is not None:
        before = softmax(values, axis=1)
        result["temperature"] = float(temperature)
        result["ece_before_temperature"] = _json_float(expected_calibration_error(raw_labels, before, n_bins=n_bins))
        result["nll_before_temperature"] = _json_float(negative_log_likelihood(raw_labels, before))
        result["brier_before_temperature"] = _json_float(brier_score(raw_labels, before))
        values = apply_temperature(values, temperature)
    probs = softmax(values, axis=1) if is_logits else values

    def _ece(y, p):
        return expected_calibration_error(y, p, n_bins=n_bins)

    headline = {
        "balanced_accuracy": balanced_accuracy,
        "macro_auroc": macro_auroc,
        "ece": _ece,
        "brier": brier_score,
        "nll": negative_log_likelihood,
    }
    for name, fn in headline.items():
        result[name] = _json_float(fn(raw_labels, probs))
    kept_labels, kept_probs = _prepare(raw_labels, probs)
    result["accuracy"] = _json_float(np.mean(kept_probs.argmax(axis=1) == kept_labels) if kept_labels.size else None)

    aurocs = per_class_auroc(raw_labels, probs, names)
    per_class = per_class_sensitivity_specificity(raw_labels, probs, names)
    for name in names:
        per_class[name]["auroc"] = aurocs[name]
    result["per_class"] = per_class
    result["auroc_absent_classes"] = [name for name in names if aurocs[name] is None]

    result["ci"] = {}
    if n_boot > 0 and kept_labels.size:
        intervals = bootstrap_cis(headline, raw_labels, probs, group_ids, n_boot=n_boot, seed=seed, alpha=alpha)
        result["ci"] = {name: [_json_float(low), _json_float(high)] for name, (low, high) in intervals.items()}
    result["n_boot"] = int(n_boot)
    result["ci_level"] = 1.0 - alpha
    return result


def build_compute_metrics(
    class_names: Sequence[str] | None = None, n_boot: int = 0, temperature: float | None = None, n_bins: int = 15
) -> Callable[[Any], dict[str, float]]:
    """
    Builds a `compute_metrics` for the HF `Trainer`.

    The returned function takes an `EvalPrediction` (or a `(predictions, label_ids)` tuple) where `predictions` are
    class logits `(B, C)`, or a tuple whose first element they are, and `label_ids` are the class labels `(B,)` or a
    tuple `(class_labels, group_ids)`. It returns a flat dict of floats (the Trainer prefixes them with `eval_`):
    `balanced_accuracy`, `macro_auroc`, `ece`, `brier`, `nll`, `accuracy`, `n_excluded`, undefined values as `nan`,
    and with `n_boot > 0` `{metric}_ci_low` / `{metric}_ci_high` (group-level when group ids are given). `n_boot`
    defaults to 0 (no CIs), which keeps evaluation during training cheap; `temperature` is applied to the logits first.
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        if hasattr(eval_pred, "predictions"):
            predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        else:
            predictions, label_ids = eval_pred[0], eval_pred[1]
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        labels, group_ids = label_ids, None
        if isinstance(label_ids, (tuple, list)):
            labels = label_ids[0]
            group_ids = label_ids[1] if len(label_ids) > 1 else None
        metrics = compute_all_metrics(
            labels, predictions, group_ids=group_ids, class_names=class_names, temperature=temperature,
            n_boot=n_boot, n_bins=n_bins, is_logits=True,
        )
        flat = {}
        for key in ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll", "accuracy"):
            flat[key] = float("nan") if metrics[key] is None else metrics[key]
            if key in metrics["ci"]:
                low, high = metrics["ci"][key]
                flat[f"{key}_ci_low"] = float("nan") if low is None else low
                flat[f"{key}_ci_high"] = float("nan") if high is None else high
        flat["n_excluded"] = float(metrics["n_excluded"])
        return flat

    return compute_metrics



def split_report(logits, labels, groups, class_names, temperature, n_boot: int = 1000) -> dict:
    """All metrics of one split after temperature scaling, plus `ece_before_temperature` (and the other befores)."""
    labels = np.where(labels < 0, -1, labels)
    return compute_all_metrics(
        labels, logits, group_ids=groups, class_names=class_names, temperature=temperature, n_boot=n_boot, is_logits=True
    )


def write_report(
    output_dir,
    class_names,
    validation,
    test,
    test_image_only=None,
    n_boot: int = 1000,
    fit_on_validation: bool = True,
    extra: dict | None = None,
) -> dict:
    """
    Fit the temperature on `validation` (logits, labels, groups), report `test` (and `test_image_only`) with CIs,
    and write `metrics.json`, `reliability.png` (after temperature) and `confusion_matrix.png` into `output_dir`.
    """
    os.makedirs(output_dir, exist_ok=True)
    val_logits, val_labels, _ = validation
    keep = val_labels >= 0
    temperature = 1.0
    fitted = None
    if fit_on_validation and keep.sum() > 1:
        temperature, fitted = fit_temperature(val_logits[keep], val_labels[keep], return_fitted=True)
    report = {"temperature": temperature, "temperature_fitted": fitted, "temperature_bounds": list(TEMPERATURE_BOUNDS)}
    report["validation"] = split_report(*validation, class_names, temperature, n_boot=0)
    report["test"] = split_report(*test, class_names, temperature, n_boot=n_boot)
    if test_image_only is not None:
        report["test_image_only"] = split_report(*test_image_only, class_names, temperature, n_boot=n_boot)
    if extra:
        report.update(extra)
    logits, labels, _ = test
    keep = labels >= 0
    probs = torch.softmax(apply_temperature(torch.from_numpy(logits[keep]), temperature), dim=-1).numpy()
    reliability_diagram(labels[keep], probs, os.path.join(output_dir, "reliability.png"), title="Test, after temperature")
    confusion_matrix_plot(labels[keep], probs, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    return report


__all__ = ["build_compute_metrics", "collect_logits", "compute_all_metrics", "split_report", "write_report"]
