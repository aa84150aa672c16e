# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Evaluation metrics for SkinCLIP-VL (paper section IV-B).

Balanced accuracy, macro one-vs-rest AUROC, expected calibration error (15 equal-width bins on the max probability),
Brier score, NLL, per-class sensitivity/specificity, group-level bootstrap confidence intervals, post-hoc temperature
scaling, the ISIC 2024 binary (malignancy) protocol, reliability-diagram and confusion-matrix PNGs, and a
`compute_metrics` for the HF `Trainer`.

Conventions shared by every function here:

- `labels` are class indices, `(n,)`; `probs` are class probabilities, `(n, num_classes)`. Both may be numpy arrays,
  torch tensors (any device/dtype) or lists.
- Rows whose label is negative (-1: no fine class, e.g. ISIC 2024 rows that do not map; -100: padding) are left out of
  every metric. [`compute_all_metrics`] reports how many were left out as `n_excluded`.
- Class-averaged metrics average over the classes *present* in `labels`: a class absent from the evaluated split has
  no recall and no AUROC. A metric that cannot be computed is `nan` (in JSON output: `null`).
"""

import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from processing_skinclip_vl import apply_temperature

# -------------------------------------------------------------------------------------------------------------------
# input handling
# -------------------------------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        return x.numpy()
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


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _looks_like_probs(x: np.ndarray) -> bool:
    return bool(
        x.ndim == 2
        and x.size > 0
        and np.isfinite(x).all()
        and x.min() >= 0.0
        and x.max() <= 1.0
        and np.allclose(x.sum(axis=1), 1.0, atol=1e-3)
    )


def _json_float(value) -> float | None:
    """Python float, or None for nan/inf (strict JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -------------------------------------------------------------------------------------------------------------------
# multi-class metrics
# -------------------------------------------------------------------------------------------------------------------


def balanced_accuracy(labels, probs) -> float:
    """
    Mean per-class recall over the classes present in `labels` (same as `sklearn.metrics.balanced_accuracy_score`).

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities (or logits: only the argmax is used).

    Returns:
        `float`: balanced accuracy in `[0, 1]`, `nan` when no row is labelled.
    """
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    preds = probs.argmax(axis=1)
    recalls = [np.mean(preds[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls))


def _binary_auroc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC via the Mann-Whitney U statistic (ties count 1/2, as `roc_auc_score`); None without both classes."""
    n_pos = int(is_positive.sum())
    n_neg = is_positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(labels, probs, class_names: Sequence[str] | None = None) -> dict[str, float | None]:
    """
    One-vs-rest AUROC of every class.

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities (any monotone score works, logits included).
        class_names (sequence of `str`, *optional*):
            Keys of the result; defaults to `"0"`, `"1"`, ...

    Returns:
        `dict[str, float | None]`: class name -> AUROC, `None` for a class without positives or without negatives in
        `labels` (absent classes are reported, not dropped).
    """
    labels, probs = _prepare(labels, probs)
    names = _class_names(class_names, probs.shape[1])
    return {name: _binary_auroc(labels == c, probs[:, c]) for c, name in enumerate(names)}


def macro_auroc(labels, probs) -> float:
    """
    Macro one-vs-rest AUROC: the mean of [`per_class_auroc`] over the classes that have both positives and negatives
    in `labels`. Use [`per_class_auroc`] to see which classes were left out (they are `None` there).

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities.

    Returns:
        `float`: macro AUROC, `nan` when no class qualifies.
    """
    values = [v for v in per_class_auroc(labels, probs).values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


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
    bins `(0, 1/n_bins], (1/n_bins, 2/n_bins], ..., (1 - 1/n_bins, 1]`, where `acc_b` is the accuracy of the argmax
    prediction and `conf_b` the mean max probability of the rows in bin `b`. Empty bins contribute nothing.

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities (not logits).
        n_bins (`int`, *optional*, defaults to 15):
            Number of bins.

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
    """
    Multi-class Brier score: mean over rows of `sum_k (p_k - onehot_k) ** 2` (0 is perfect, 2 is worst).

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities.

    Returns:
        `float`
    """
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))


def negative_log_likelihood(labels, probs, eps: float = 1e-12) -> float:
    """
    Mean negative log-likelihood `-log p_y` of the true class (probabilities clipped at `eps`).

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities.
        eps (`float`, *optional*, defaults to 1e-12):
            Lower clip of `p_y`, so a confident mistake costs at most `-log(eps)`.

    Returns:
        `float`
    """
    labels, probs = _prepare(labels, probs)
    if labels.size == 0:
        return float("nan")
    p_true = probs[np.arange(labels.size), labels]
    return float(-np.mean(np.log(np.clip(p_true, eps, None))))


def per_class_sensitivity_specificity(
    labels, probs, class_names: Sequence[str] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """
    One-vs-rest sensitivity (recall) and specificity of the argmax prediction, per class.

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities (or logits).
        class_names (sequence of `str`, *optional*):
            Keys of the result; defaults to `"0"`, `"1"`, ...

    Returns:
        `dict[str, dict]`: class name -> `{"sensitivity", "specificity", "support"}`; sensitivity is `None` for a class
        absent from `labels`, specificity `None` when every row is of that class.
    """
    labels, probs = _prepare(labels, probs)
    names = _class_names(class_names, probs.shape[1])
    preds = probs.argmax(axis=1)
    result = {}
    for c, name in enumerate(names):
        positive, predicted = labels == c, preds == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        result[name] = {
            "sensitivity": float((predicted & positive).sum() / n_pos) if n_pos else None,
            "specificity": float((~predicted & ~positive).sum() / n_neg) if n_neg else None,
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

    Each replicate draws as many group ids as there are groups, with replacement, and keeps every row of every drawn
    group (a group drawn twice contributes its rows twice). Rows of one lesion or patient are correlated, so resampling
    rows would give intervals that are too narrow. All metrics share the same replicates (paired). Replicates where a
    metric is `nan`/`None` (e.g. AUROC of a replicate without some class) are ignored for that metric.

    Args:
        metric_fns (`Mapping[str, Callable]`):
            Name -> `fn(labels, probs) -> float`.
        labels (array-like of shape `(n,)`):
            Class indices; rows with a negative label are dropped first (with their group ids).
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities (whatever the metric functions expect).
        group_ids (sequence of hashables of length `n`, *optional*):
            Group (lesion / patient) of each row; `None` resamples rows.
        n_boot (`int`, *optional*, defaults to 1000):
            Number of replicates.
        seed (`int`, *optional*, defaults to 0):
            Seed of the `numpy` generator; equal seeds give equal intervals.
        alpha (`float`, *optional*, defaults to 0.05):
            Two-sided level: `(alpha/2, 1 - alpha/2)` percentiles, a 95% interval by default.

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
        group_ids = (
            list(_to_numpy(group_ids).reshape(-1))
            if isinstance(group_ids, (torch.Tensor, np.ndarray))
            else list(group_ids)
        )
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


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    labels,
    probs,
    group_ids=None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """
    Percentile bootstrap confidence interval of one metric, resampling whole groups; see [`bootstrap_cis`].

    Returns:
        `tuple[float, float]`: `(low, high)`.
    """
    return bootstrap_cis({"metric": metric_fn}, labels, probs, group_ids, n_boot=n_boot, seed=seed, alpha=alpha)[
        "metric"
    ]


# -------------------------------------------------------------------------------------------------------------------
# temperature scaling
# -------------------------------------------------------------------------------------------------------------------


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """
    Fits the post-hoc temperature `T` minimising the NLL of `softmax(logits / T)` (Guo et al., 2017).

    Optimises `log T` (so `T > 0`) with L-BFGS and a strong-Wolfe line search, in float64, from `T = 1`. Fit it on
    validation logits; apply it with [`apply_temperature`] at inference only.

    Args:
        logits (array-like of shape `(n, num_classes)`):
            Raw class logits.
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        max_iter (`int`, *optional*, defaults to 100):
            Maximum L-BFGS iterations.

    Returns:
        `float`: the temperature, `> 0` (1.0 when there is nothing to fit).
    """
    labels, logits = _prepare(labels, logits)
    if labels.size == 0:
        return 1.0
    z = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    with torch.enable_grad():
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t],
            lr=1.0,
            max_iter=max_iter,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) and temperature > 0 else 1.0


# -------------------------------------------------------------------------------------------------------------------
# binary (ISIC 2024 out-of-distribution) protocol
# -------------------------------------------------------------------------------------------------------------------


def malignancy_scores(probs, positive_classes: Sequence[int]) -> np.ndarray:
    """
    Malignancy score of each row: the summed probability of the malignant classes (`P(MEL) + P(BCC) + P(SCC)` for the
    ISIC 2019 head), clipped to `[0, 1]`.

    Args:
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities.
        positive_classes (sequence of `int`):
            Indices of the malignant classes.

    Returns:
        `np.ndarray` of shape `(n,)`.
    """
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
    Threshold maximising Youden's J = sensitivity + specificity - 1 on the ROC curve; a row is called positive when
    `score >= threshold`. Choose it on validation data (ISIC 2019 validation for the ISIC 2024 protocol). Ties keep the
    highest threshold.

    Args:
        labels (array-like of shape `(n,)`):
            0/1 labels; negative ones are left out.
        scores (array-like of shape `(n,)`):
            Scores, larger meaning more likely positive.

    Returns:
        `float`: the threshold.
    """
    from sklearn.metrics import roc_curve

    labels, scores = _prepare_binary(labels, scores)
    if labels.size == 0 or labels.min() == labels.max():
        raise ValueError("`youden_threshold` needs both positive and negative rows.")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    threshold = thresholds[best]
    if not np.isfinite(threshold):  # roc_curve's first point (nothing positive)
        threshold = np.nextafter(scores.max(), np.inf)
    return float(threshold)


def binary_metrics(labels, scores, threshold: float | None = None, n_bins: int = 15) -> dict[str, Any]:
    """
    Binary metrics of a malignancy score (the ISIC 2024 out-of-distribution protocol).

    - `auroc`: ROC AUC of `scores`.
    - `threshold`: the given one (chosen on ISIC 2019 validation), or, when `None`, the Youden threshold on these very
      rows (optimistic; `threshold_source` says which).
    - `balanced_accuracy`, `sensitivity`, `specificity` of `score >= threshold`.
    - `ece`: binary ECE, i.e. [`expected_calibration_error`] of the two-class probabilities `[1 - score, score]`
      (max-probability bins, as the multi-class ECE); `brier`: mean `(score - label) ** 2`.

    Args:
        labels (array-like of shape `(n,)`):
            0/1 labels (1 = malignant); negative ones are left out.
        scores (array-like of shape `(n,)`):
            Malignancy probabilities in `[0, 1]` (see [`malignancy_scores`]).
        threshold (`float`, *optional*):
            Decision threshold.
        n_bins (`int`, *optional*, defaults to 15):
            ECE bins.

    Returns:
        `dict[str, Any]`: JSON-serialisable (`None` for undefined values).
    """
    labels, scores = _prepare_binary(labels, scores)
    threshold_source = "given"
    if threshold is None:
        threshold, threshold_source = youden_threshold(labels, scores), "youden_on_these_rows"
    positive, predicted = labels == 1, scores >= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    sensitivity = (predicted & positive).sum() / n_pos if n_pos else float("nan")
    specificity = (~predicted & ~positive).sum() / n_neg if n_neg else float("nan")
    present = [v for v in (sensitivity, specificity) if not math.isnan(v)]
    two_class = np.stack([1.0 - np.clip(scores, 0, 1), np.clip(scores, 0, 1)], axis=1)
    return {
        "auroc": _json_float(_binary_auroc(positive, scores)),
        "threshold": float(threshold),
        "threshold_source": threshold_source,
        "balanced_accuracy": _json_float(np.mean(present) if present else float("nan")),
        "sensitivity": _json_float(sensitivity),
        "specificity": _json_float(specificity),
        "ece": _json_float(expected_calibration_error(labels, two_class, n_bins=n_bins)),
        "brier": _json_float(np.mean((scores - labels) ** 2) if labels.size else float("nan")),
        "n_samples": int(labels.size),
        "n_positive": n_pos,
    }


# -------------------------------------------------------------------------------------------------------------------
# figures (matplotlib, Agg canvas: no display and no global pyplot state)
# -------------------------------------------------------------------------------------------------------------------


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def reliability_diagram(labels, probs, path, n_bins: int = 15, title: str | None = None) -> str:
    """
    Writes a reliability diagram (accuracy vs mean max probability per bin, bin counts below) as a PNG.

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        probs (array-like of shape `(n, num_classes)`):
            Class probabilities.
        path (`str` or `os.PathLike`):
            Output PNG; parent directories are created.
        n_bins (`int`, *optional*, defaults to 15):
            Bins, as in [`expected_calibration_error`].
        title (`str`, *optional*):
            Title; the ECE is always appended.

    Returns:
        `str`: `path`.
    """
    labels, probs = _prepare(labels, probs)
    edges, counts, accuracy, confidence = _calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)
    ece = expected_calibration_error(labels, probs, n_bins=n_bins)
    figure = _new_figure((5, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = edges[1] - edges[0]
    filled = counts > 0
    top.bar(edges[:-1][filled], accuracy[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(
        edges[:-1][filled],
        confidence[filled] - accuracy[filled],
        bottom=accuracy[filled],
        width=width,
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    top.set_title(f"{title + ': ' if title else ''}ECE = {ece:.4f} (n = {labels.size})")
    bottom.bar(edges[:-1], counts, width=width, align="edge", edgecolor="black", color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("count")
    return _save(figure, path)


def confusion_matrix_plot(labels, preds, class_names: Sequence[str], path, normalize: bool = True) -> str:
    """
    Writes a confusion matrix (rows: true class, columns: predicted class) as a PNG.

    Args:
        labels (array-like of shape `(n,)`):
            Class indices; negative ones are left out.
        preds (array-like of shape `(n,)` or `(n, num_classes)`):
            Predicted class indices, or probabilities/logits (argmax taken).
        class_names (sequence of `str`):
            Axis labels, one per class.
        path (`str` or `os.PathLike`):
            Output PNG; parent directories are created.
        normalize (`bool`, *optional*, defaults to `True`):
            Colour by row-normalised rate (per-class recall on the diagonal); cells are annotated with counts.

    Returns:
        `str`: `path`.
    """
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    preds = _to_numpy(preds)
    if preds.ndim == 2:
        preds = preds.argmax(axis=1)
    preds = preds.reshape(-1).astype(np.int64)
    if preds.shape != labels.shape:
        raise ValueError(f"`labels` and `preds` differ in length: labels: {labels.size}, preds: {preds.size}.")
    keep = labels >= 0
    labels, preds = labels[keep], preds[keep]
    names = [str(name) for name in class_names]
    num_classes = len(names)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    size = max(4.0, 0.6 * num_classes + 2)
    figure = _new_figure((size, size))
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(num_classes), names, rotation=45, ha="right")
    ax.set_yticks(range(num_classes), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = rates.max() / 2 if rates.size else 0
    for i in range(num_classes):
        for j in range(num_classes):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if rates[i, j] > threshold else "black",
            )
    ax.set_title(f"confusion matrix (n = {labels.size})")
    return _save(figure, path)


# -------------------------------------------------------------------------------------------------------------------
# everything at once
# -------------------------------------------------------------------------------------------------------------------


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
        labels (array-like of shape `(n,)`):
            Class indices; negative ones (no fine class) are left out and counted in `n_excluded`.
        logits_or_probs (array-like of shape `(n, num_classes)`):
            Raw logits or probabilities (see `is_logits`).
        group_ids (sequence of hashables of length `n`, *optional*):
            Lesion/patient groups for the bootstrap; `None` resamples rows.
        class_names (sequence of `str`, *optional*):
            Keys of `per_class`; defaults to `"0"`, `"1"`, ...
        temperature (`float`, *optional*):
            Post-hoc temperature, applied to the logits before every metric; the calibration metrics before it are
            also reported (`ece_before_temperature`, `nll_before_temperature`, `brier_before_temperature`).
        n_boot (`int`, *optional*, defaults to 1000):
            Bootstrap replicates; 0 skips the CIs (`ci` is then empty).
        seed (`int`, *optional*, defaults to 0):
            Bootstrap seed.
        alpha (`float`, *optional*, defaults to 0.05):
            CI level (95% by default).
        n_bins (`int`, *optional*, defaults to 15):
            ECE bins.
        is_logits (`bool`, *optional*):
            Whether `logits_or_probs` are logits. `None` guesses: non-negative rows summing to 1 are probabilities.

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
        raise ValueError(
            "`temperature` needs logits, but `logits_or_probs` are probabilities (or set `is_logits=True`)."
        )
    names = _class_names(class_names, values.shape[1])
    n_excluded = int((raw_labels < 0).sum())

    result: dict[str, Any] = {"n_samples": int(raw_labels.size - n_excluded), "n_excluded": n_excluded}
    result["num_classes"] = int(values.shape[1])
    if temperature is not None:
        before = _softmax(values)
        result["temperature"] = float(temperature)
        result["ece_before_temperature"] = _json_float(expected_calibration_error(raw_labels, before, n_bins=n_bins))
        result["nll_before_temperature"] = _json_float(negative_log_likelihood(raw_labels, before))
        result["brier_before_temperature"] = _json_float(brier_score(raw_labels, before))
        values = apply_temperature(values, temperature)
    probs = _softmax(values) if is_logits else values

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
    class_names: Sequence[str] | None = None,
    n_boot: int = 0,
    temperature: float | None = None,
    n_bins: int = 15,
) -> Callable[[Any], dict[str, float]]:
    """
    Builds a `compute_metrics` for the HF `Trainer`.

    The returned function takes an `EvalPrediction` (or a `(predictions, label_ids)` tuple) where `predictions` are
    class logits `(B, C)`, or a tuple whose first element they are, and `label_ids` are the class labels `(B,)` or a
    tuple `(class_labels, group_ids)`. It returns a flat dict of floats (the Trainer prefixes them with `eval_`):
    `balanced_accuracy`, `macro_auroc`, `ece`, `brier`, `nll`, `accuracy`, `n_excluded`, undefined values as `nan`,
    and with `n_boot > 0` `{metric}_ci_low` / `{metric}_ci_high` (group-level when group ids are given).

    Args:
        class_names (sequence of `str`, *optional*):
            Class names (checked against the number of logits).
        n_boot (`int`, *optional*, defaults to 0):
            Bootstrap replicates per evaluation; 0 (no CIs) keeps evaluation during training cheap.
        temperature (`float`, *optional*):
            Temperature applied to the logits first.
        n_bins (`int`, *optional*, defaults to 15):
            ECE bins.

    Returns:
        `Callable[[EvalPrediction], dict[str, float]]`
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        if hasattr(eval_pred, "predictions"):
            predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        else:
            predictions, label_ids = eval_pred[0], eval_pred[1]
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        group_ids = None
        if isinstance(label_ids, (tuple, list)):
            labels = label_ids[0]
            group_ids = label_ids[1] if len(label_ids) > 1 else None
        else:
            labels = label_ids
        metrics = compute_all_metrics(
            labels,
            predictions,
            group_ids=group_ids,
            class_names=class_names,
            temperature=temperature,
            n_boot=n_boot,
            n_bins=n_bins,
            is_logits=True,
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


__all__ = [
    "apply_temperature",
    "balanced_accuracy",
    "binary_metrics",
    "bootstrap_ci",
    "bootstrap_cis",
    "brier_score",
    "build_compute_metrics",
    "compute_all_metrics",
    "confusion_matrix_plot",
    "expected_calibration_error",
    "fit_temperature",
    "macro_auroc",
    "malignancy_scores",
    "negative_log_likelihood",
    "per_class_auroc",
    "per_class_sensitivity_specificity",
    "reliability_diagram",
    "youden_threshold",
]
