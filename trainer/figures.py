# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Reliability-diagram and confusion-matrix PNGs (matplotlib, Agg canvas: no display and no global pyplot state)."""

import os
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from .metrics import _calibration_bins, _prepare, _to_numpy, expected_calibration_error


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> str:
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def reliability_diagram(labels, probs, path, n_bins: int = 15, title: str | None = None) -> str:
    """Writes a reliability diagram (accuracy vs mean max probability per bin, as [`expected_calibration_error`], with
    bin counts below) as a PNG at `path` (parent directories created); `title` gets the ECE appended. Returns `path`."""
    labels, probs = _prepare(labels, probs)
    edges, counts, accuracy, confidence = _calibration_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)
    ece = expected_calibration_error(labels, probs, n_bins=n_bins)
    figure = _new_figure((5, 6))
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width, filled = edges[1] - edges[0], counts > 0
    left = edges[:-1][filled]
    top.bar(left, accuracy[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    gap = confidence[filled] - accuracy[filled]
    top.bar(left, gap, bottom=accuracy[filled], width=width, align="edge", color="tab:red", alpha=0.3, label="gap")
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
    Writes a confusion matrix (`confusion_matrix`, drawn by `ConfusionMatrixDisplay`; rows: true class, columns:
    predicted class) as a PNG.

    Args:
        labels (array-like of shape `(n,)`): class indices; negative ones are left out.
        preds (array-like of shape `(n,)` or `(n, num_classes)`): predicted classes, or probabilities/logits (argmax).
        class_names (sequence of `str`): axis labels, one per class.
        path (`str` or `os.PathLike`): output PNG; parent directories are created.
        normalize (`bool`, *optional*, defaults to `True`): colour by row-normalised rate (per-class recall on the
            diagonal); cells are annotated with counts either way.

    Returns:
        `str`: `path`.
    """
    labels = _to_numpy(labels).reshape(-1).astype(np.int64)
    preds = _to_numpy(preds)
    preds = (preds.argmax(axis=1) if preds.ndim == 2 else preds).reshape(-1).astype(np.int64)
    if preds.shape != labels.shape:
        raise ValueError(f"`labels` and `preds` differ in length: labels: {labels.size}, preds: {preds.size}.")
    keep = labels >= 0
    names = [str(name) for name in class_names]
    matrix = confusion_matrix(labels[keep], preds[keep], labels=np.arange(len(names)))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    size = max(4.0, 0.6 * len(names) + 2)
    ax = _new_figure((size, size)).subplots()
    display = ConfusionMatrixDisplay(rates, display_labels=names)
    display.plot(ax=ax, cmap="Blues", xticks_rotation=45, colorbar=True, im_kw={"vmin": 0, "vmax": 1 if normalize else None})
    for (i, j), text in np.ndenumerate(display.text_):
        text.set_text(str(matrix[i, j]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (n = {int(keep.sum())})")
    return _save(ax.figure, path)


__all__ = ["confusion_matrix_plot", "reliability_diagram"]
