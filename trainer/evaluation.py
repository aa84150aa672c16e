# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Class-logit collection and the metrics report shared by `train.py` and `evaluate_model.py`."""

import dataclasses
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import compute_all_metrics, confusion_matrix_plot, fit_temperature, reliability_diagram

TEMPERATURE_BOUNDS = (0.05, 20.0)


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
        batch.pop("align_group_ids")
        batch.pop("group_ids")
        groups.extend(str(row.get("group_id") or row.get("image_id")) for row in rows)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        outputs = model(**batch, logits_to_keep=1, use_cache=False)
        logits.append(outputs.class_logits.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels), groups


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
        fitted = float(fit_temperature(val_logits[keep], val_labels[keep]))
        # a tiny or separable validation split can drive the NLL optimum to extremes; keep T in a sane range
        temperature = min(max(fitted, TEMPERATURE_BOUNDS[0]), TEMPERATURE_BOUNDS[1])
    report = {"temperature": temperature, "temperature_fitted": fitted, "temperature_bounds": list(TEMPERATURE_BOUNDS)}
    report["validation"] = split_report(*validation, class_names, temperature, n_boot=0)
    report["test"] = split_report(*test, class_names, temperature, n_boot=n_boot)
    if test_image_only is not None:
        report["test_image_only"] = split_report(*test_image_only, class_names, temperature, n_boot=n_boot)
    if extra:
        report.update(extra)
    logits, labels, _ = test
    keep = labels >= 0
    probs = torch.softmax(torch.from_numpy(logits[keep]) / temperature, dim=-1).numpy()
    reliability_diagram(labels[keep], probs, os.path.join(output_dir, "reliability.png"), title="Test, after temperature")
    confusion_matrix_plot(labels[keep], probs, class_names, os.path.join(output_dir, "confusion_matrix.png"))
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    return report


__all__ = ["collect_logits", "split_report", "write_report"]
