# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Evaluation metrics for SkinCLIP-VL (paper section IV-B), on scikit-learn.

scikit-learn computes balanced accuracy, AUROC, NLL (`log_loss`), the Brier score and confusion matrices. This module
adds only what no library does: ECE with 15 equal-width bins, the group-level bootstrap, post-hoc temperature fitting
(with its bounds) and the ISIC 2024 binary (malignancy) protocol. The report (`compute_all_metrics`) and the
`Trainer`'s `compute_metrics` are in `trainer/evaluation.py`, the reliability and confusion-matrix PNGs in
`trainer/figures.py`.

Conventions shared by every function here:

- `labels` are class indices, `(n,)`; `probs` are class probabilities, `(n, num_classes)`. Both may be numpy arrays,
  torch tensors (any device/dtype) or lists.
- Rows whose label is negative (-1: no fine class, e.g. ISIC 2024 rows that do not map; -100: padding) are left out of
  every metric (`compute_all_metrics` reports how many as `n_excluded`).
- Class-averaged metrics average over the classes *present* in `labels`: a class absent from the evaluated split has
  no recall and no AUROC (reported as `None`, never an error). A metric that cannot be computed is `nan` (in JSON
  output: `null`).
"""

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from processing_skinclip_vl import apply_temperature

# a tiny or separable validation split can drive the NLL optimum to extremes: the fitted temperature is kept in here
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _prepare(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels int64 (n,), probs float64 (n, C)) with negative-label rows removed."""
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    probs = _to_numpy(probs).astype(np.float64)
    if probs.ndim != 2:
        raise ValueError(f"`probs` must be (num_samples, num_classes), got shape {probs.shape}.")
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"`labels` and `probs` differ in length: labels: {labels.shape[0]}, probs: {probs.shape[0]}.")
    keep = labels >= 0
    labels, probs = labels[keep], probs[keep]
    if labels.size and labels.max() >= probs.shape[1]:
        raise ValueError(f"a label ({labels.max()}) is out of range for {probs.shape[1]} classes.")
    return labels, probs


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"`class_names` must name every class: classes: {num_classes}, names: {len(class_names)}.")
    return class_names


def _json_float(value) -> float | None:
    """Python float, or None for nan/inf (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -------------------------------------------------------------------------------------------------------------------
# multi-class metrics (scikit-learn)
# -------------------------------------------------------------------------------------------------------------------


def balanced_accuracy(labels, probs) -> float:
    """Mean recall of the argmax prediction over the classes present in `labels` (`balanced_accuracy_score`); `nan`
    when no row is labelled. `probs` may be logits (only the argmax is used)."""
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those classes are not averaged
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, probs.argmax(axis=1)))


def binary_auroc(labels, scores) -> float | None:
    """ROC AUC (`roc_auc_score`) of `scores` for the 0/1 (or boolean) `labels`; `None` without both classes."""
    labels = _to_numpy(labels).reshape(-1).astype(bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, _to_numpy(scores).reshape(-1)))


def per_class_auroc(labels, probs, class_names: Sequence[str] | None = None) -> dict[str, float | None]:
    """
    One-vs-rest AUROC of every class.

    Args:
        labels (array-like of shape `(n,)`): class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`): class probabilities (any monotone score works).
        class_names (sequence of `str`, *optional*): keys of the result; defaults to `"0"`, `"1"`, ...

    Returns:
        `dict[str, float | None]`: class name -> AUROC, `None` for a class without positives or without negatives in
        `labels` (absent classes are reported, not dropped).
    """
    labels, probs = _prepare(labels, probs)
    names = _class_names(class_names, probs.shape[1])
    return {name: binary_auroc(labels == c, probs[:, c]) for c, name in enumerate(names)}


def macro_auroc(labels, probs) -> float:
    """Macro one-vs-rest AUROC over the classes with both positives and negatives in `labels` (one `roc_auc_score`
    call on their indicator columns); `nan` when no class qualifies. [`per_class_auroc`] shows the left-out ones."""
    labels, probs = _prepare(labels, probs)
    indicator = labels[:, None] == np.arange(probs.shape[1])[None, :]
    scored = indicator.any(axis=0) & ~indicator.all(axis=0)
    if not scored.any():
        return float("nan")
    if scored.sum() == 1:
        return binary_auroc(indicator[:, scored][:, 0], probs[:, scored][:, 0])
    return float(roc_auc_score(indicator[:, scored], probs[:, scored], average="macro"))


def _calibration_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int):
    """Per-bin (count, accuracy, mean confidence) for equal-width bins (0, 1/n], (1/n, 2/n], ..., ((n-1)/n, 1]."""
    if n_bins < 1:
        raise ValueError(f"`n_bins` must be >= 1, got {n_bins}.")
    edges = np.arange(n_bins + 1) / n_bins  # k / n rounds like the literal: 9 / 15 == 0.6
    # side="left": a confidence exactly on an edge belongs to the bin that edge closes
    bins = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidences, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, acc_sum / counts, np.nan)
        confidence = np.where(counts > 0, conf_sum / counts, np.nan)
    return edges, counts, accuracy, confidence


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
    """
    Expected calibration error on the max probability: `sum_b (n_b / n) * |acc_b - conf_b|` over `n_bins` equal-width
    bins `(0, 1/n_bins], ..., (1 - 1/n_bins, 1]`, where `acc_b` is the accuracy of the argmax prediction and `conf_b`
    the mean max probability of the rows in bin `b`. Empty bins contribute nothing.

    Args:
        labels (array-like of shape `(n,)`): class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`): class probabilities (not logits).
        n_bins (`int`, *optional*, defaults to 15): number of bins.

    Returns:
        `float`: ECE in `[0, 1]`, `nan` when no row is labelled.
    """
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    _, counts, accuracy, confidence = _calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / labels.size * np.abs(accuracy[filled] - confidence[filled])))


def brier_score(labels, probs) -> float:
    """Multi-class Brier score, mean over rows of `sum_k (p_k - onehot_k) ** 2` (0 best, 2 worst; `brier_score_loss`
    without halving). The training term `calibration_loss` is the same quantity."""
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    # clip: summed probabilities (Derm7pt groups) can exceed 1 by round-off, which scikit-learn rejects
    probs = np.clip(probs, 0.0, 1.0)
    return float(brier_score_loss(labels, probs, labels=np.arange(probs.shape[1]), scale_by_half=False))


def negative_log_likelihood(labels, probs, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood `-log p_y` of the true class (`log_loss`), with `p_y` clipped at `eps` so a
    confident mistake costs at most `-log(eps)`."""
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    with warnings.catch_warnings():  # clipped rows no longer sum to exactly one
        warnings.simplefilter("ignore", UserWarning)
        return float(log_loss(labels, np.clip(probs, eps, 1.0), labels=np.arange(probs.shape[1])))


def per_class_sensitivity_specificity(
    labels, probs, class_names: Sequence[str] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """
    One-vs-rest sensitivity (recall) and specificity of the argmax prediction, per class, from `confusion_matrix`.

    Returns:
        `dict[str, dict]`: class name -> `{"sensitivity", "specificity", "support"}`; sensitivity is `None` for a class
        absent from `labels`, specificity `None` when every row is of that class.
    """
    labels, probs = _prepare(labels, probs)
    names = _class_names(class_names, probs.shape[1])
    matrix = confusion_matrix(labels, probs.argmax(axis=1), labels=np.arange(len(names)))
    n = int(matrix.sum())
    result = {}
    for c, name in enumerate(names):
        true_pos, n_pos, n_predicted = int(matrix[c, c]), int(matrix[c].sum()), int(matrix[:, c].sum())
        n_neg = n - n_pos
        true_neg = n_neg - (n_predicted - true_pos)
        result[name] = {
            "sensitivity": float(true_pos / n_pos) if n_pos else None,
            "specificity": float(true_neg / n_neg) if n_neg else None,
            "support": n_pos,
        }
    return result


# -------------------------------------------------------------------------------------------------------------------
# group-level bootstrap
# -------------------------------------------------------------------------------------------------------------------


def _group_members(group_ids, n: int) -> list[np.ndarray]:
    """Row indices of each group, groups in order of first appearance."""
    if group_ids is None:
        return [np.array([i]) for i in range(n)]
    index: dict[Hashable, int] = {}
    codes = np.array([index.setdefault(g.item() if hasattr(g, "item") else g, len(index)) for g in group_ids])
    order = np.argsort(codes, kind="stable")
    boundaries = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, boundaries)


def bootstrap_cis(
    metric_fns: Mapping[str, Callable[[np.ndarray, np.ndarray], float]],
    labels,
    probs,
    group_ids=None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """
    Percentile bootstrap confidence intervals of several metrics, resampling whole groups.

    Each replicate draws as many groups as there are, with replacement, and keeps every row of every drawn group (one
    drawn twice contributes its rows twice): rows of one lesion or patient are correlated, so resampling rows would
    give too narrow intervals. All metrics share the replicates (paired); `nan`/`None` values (e.g. AUROC of a
    replicate without some class) are ignored for that metric.

    Args:
        metric_fns (`Mapping[str, Callable]`): name -> `fn(labels, probs) -> float`.
        labels (array-like of shape `(n,)`): class indices; negative-label rows are dropped first (with their groups).
        probs (array-like of shape `(n, num_classes)`): whatever the metric functions expect.
        group_ids (sequence of hashables of length `n`, *optional*): group (lesion / patient) of each row; `None`
            resamples rows.
        n_boot (`int`, *optional*, defaults to 1000): number of replicates.
        seed (`int`, *optional*, defaults to 0): seed of the `numpy` generator; equal seeds give equal intervals.
        alpha (`float`, *optional*, defaults to 0.05): two-sided level, a 95% interval by default.

    Returns:
        `dict[str, tuple[float, float]]`: name -> `(low, high)`, `(nan, nan)` if no replicate gave a value.
    """
    raw_labels = _to_numpy(labels).reshape(-1)
    probs = _to_numpy(probs)
    if probs.shape[0] != raw_labels.shape[0]:
        raise ValueError(
            f"`labels` and `probs` differ in length: labels: {raw_labels.shape[0]}, probs: {probs.shape[0]}."
        )
    if group_ids is not None:
        is_array = isinstance(group_ids, (torch.Tensor, np.ndarray))
        group_ids = list(_to_numpy(group_ids).reshape(-1)) if is_array else list(group_ids)
        if len(group_ids) != raw_labels.shape[0]:
            raise ValueError(
                f"`group_ids` must have one id per row: rows: {raw_labels.shape[0]}, ids: {len(group_ids)}."
            )
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
    keep = raw_labels.astype(np.int64) >= 0
    labels, probs = raw_labels[keep], probs[keep]
    if group_ids is not None:
        group_ids = [g for g, k in zip(group_ids, keep) if k]
    members = _group_members(group_ids, labels.shape[0])
    values: dict[str, list[float]] = {name: [] for name in metric_fns}
    if members and n_boot > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            drawn = rng.integers(0, len(members), size=len(members))
            rows = np.concatenate([members[g] for g in drawn])
            for name, fn in metric_fns.items():
                value = fn(labels[rows], probs[rows])
                values[name].append(np.nan if value is None else float(value))
    intervals = {}
    for name, vals in values.items():
        vals = np.asarray(vals, dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            intervals[name] = (float(low), float(high))
    return intervals


# -------------------------------------------------------------------------------------------------------------------
# temperature scaling
# -------------------------------------------------------------------------------------------------------------------


def fit_temperature(
    logits, labels, max_iter: int = 100, bounds: tuple[float, float] | None = TEMPERATURE_BOUNDS, return_fitted=False
):
    """
    Fits the post-hoc temperature `T` minimising the NLL of `softmax(logits / T)` (Guo et al., 2017), kept in `bounds`.

    Optimises `log T` (so `T > 0`) with L-BFGS (strong Wolfe), in float64, from `T = 1`. Fit it on validation logits;
    apply it with [`apply_temperature`].

    Args:
        logits (array-like of shape `(n, num_classes)`): raw class logits.
        labels (array-like of shape `(n,)`): class indices; negative ones are left out.
        max_iter (`int`, *optional*, defaults to 100): maximum L-BFGS iterations.
        bounds (`tuple[float, float]`, *optional*, defaults to `TEMPERATURE_BOUNDS`): the fitted value is clipped into
            `[low, high]` (a tiny or separable split can drive the optimum to extremes); `None` does not clip.
        return_fitted (`bool`, *optional*, defaults to `False`): also return the unclipped fitted value.

    Returns:
        `float`: the temperature, `> 0` (1.0 when there is nothing to fit); with `return_fitted`, `(temperature,
        fitted)`.
    """
    labels, logits = _prepare(labels, logits)
    fitted = 1.0
    if labels.size:
        z, y = torch.from_numpy(logits), torch.from_numpy(labels)
        with torch.enable_grad():
            log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            optimizer = torch.optim.LBFGS(
                [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                tolerance_change=1e-12,
            )

            def closure():
                optimizer.zero_grad()
                loss = F.cross_entropy(z / log_t.exp(), y)  # differentiates through T (not `apply_temperature`)
                loss.backward()
                return loss

            optimizer.step(closure)
        fitted = float(log_t.detach().exp())
        fitted = fitted if math.isfinite(fitted) and fitted > 0 else 1.0
    temperature = fitted if bounds is None else min(max(fitted, bounds[0]), bounds[1])
    return (temperature, fitted) if return_fitted else temperature


# -------------------------------------------------------------------------------------------------------------------
# binary (ISIC 2024 out-of-distribution) protocol
# -------------------------------------------------------------------------------------------------------------------


def malignancy_scores(probs, positive_classes: Sequence[int]) -> np.ndarray:
    """Malignancy score of each row: the summed probability of the malignant classes (`P(MEL) + P(BCC) + P(SCC)` for
    the ISIC 2019 head), clipped to `[0, 1]`; `(n,)` from `probs` `(n, num_classes)`."""
    probs = _to_numpy(probs).astype(np.float64)
    return np.clip(probs[:, list(positive_classes)].sum(axis=1), 0.0, 1.0)


def _prepare_binary(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    scores = _to_numpy(scores).reshape(-1).astype(np.float64)
    if labels.shape != scores.shape:
        raise ValueError(f"`labels` and `scores` differ in length: labels: {labels.size}, scores: {scores.size}.")
    keep = labels >= 0
    labels, scores = labels[keep], scores[keep]
    if labels.size and labels.max() > 1:
        raise ValueError(f"binary labels must be 0, 1 (or negative to exclude), got {labels.max()}.")
    return labels, scores


def youden_threshold(labels, scores) -> float:
    """
    Threshold maximising Youden's J = sensitivity + specificity - 1 on the ROC curve (`roc_curve`); a row is called
    positive when `score >= threshold`. Choose it on validation data (ISIC 2019 validation for the ISIC 2024
    protocol). Ties keep the highest threshold. `labels` are 0/1 (negative ones left out), `scores` larger for
    positive.
    """
    labels, scores = _prepare_binary(labels, scores)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("`youden_threshold` needs both positive and negative rows.")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    threshold = thresholds[int(np.argmax(tpr - fpr))]
    if not np.isfinite(threshold):  # roc_curve's first point (nothing positive)
        threshold = np.nextafter(scores.max(), np.inf)
    return float(threshold)


def binary_metrics(labels, scores, threshold: float | None = None, n_bins: int = 15) -> dict[str, Any]:
    """
    Binary metrics of a malignancy score (the ISIC 2024 out-of-distribution protocol).

    - `auroc`: ROC AUC of `scores`.
    - `threshold`: the given one (chosen on ISIC 2019 validation), or, when `None`, the Youden threshold on these very
      rows (optimistic; `threshold_source` says which).
    - `balanced_accuracy`, `sensitivity`, `specificity` of `score >= threshold` (balanced accuracy over the classes
      present).
    - `ece`: binary ECE, i.e. [`expected_calibration_error`] of the two-class probabilities `[1 - score, score]`
      (max-probability bins, as the multi-class ECE); `brier`: mean `(score - label) ** 2`.

    Args:
        labels (array-like of shape `(n,)`): 0/1 labels (1 = malignant); negative ones are left out.
        scores (array-like of shape `(n,)`): malignancy probabilities in `[0, 1]` (see [`malignancy_scores`]).
        threshold (`float`, *optional*): decision threshold.
        n_bins (`int`, *optional*, defaults to 15): ECE bins.

    Returns:
        `dict[str, Any]`: JSON-serialisable (`None` for undefined values).
    """
    labels, scores = _prepare_binary(labels, scores)
    threshold_source = "given"
    if threshold is None:
        threshold, threshold_source = youden_threshold(labels, scores), "youden_on_these_rows"
    predicted = (scores >= threshold).astype(np.int64)
    (true_neg, false_pos), (false_neg, true_pos) = confusion_matrix(labels, predicted, labels=[0, 1])
    n_pos, n_neg = int(true_pos + false_neg), int(true_neg + false_pos)
    clipped = np.clip(scores, 0, 1)
    two_class = np.stack([1.0 - clipped, clipped], axis=1)
    return {
        "auroc": _json_float(binary_auroc(labels == 1, scores)),
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "balanced_accuracy": _json_float(balanced_accuracy(labels, np.stack([1 - predicted, predicted], axis=1))),
        "sensitivity": _json_float(true_pos / n_pos if n_pos else None),
        "specificity": _json_float(true_neg / n_neg if n_neg else None),
        "ece": _json_float(expected_calibration_error(labels, two_class, n_bins=n_bins)),
        "brier": _json_float(brier_score_loss(labels, clipped, pos_label=1) if labels.size else None),
        "n_samples": int(labels.size),
        "n_positive": n_pos,
    }


__all__ = [
    "TEMPERATURE_BOUNDS",
    "apply_temperature",
    "balanced_accuracy",
    "binary_auroc",
    "binary_metrics",
    "bootstrap_cis",
    "brier_score",
    "expected_calibration_error",
    "fit_temperature",
    "macro_auroc",
    "malignancy_scores",
    "negative_log_likelihood",
    "per_class_auroc",
    "per_class_sensitivity_specificity",
    "softmax",
    "youden_threshold",
]
