# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""The metrics SkinCLIP-VL reports, as an `evaluate` metric module.

    import evaluate
    metric = evaluate.load("metrics/skin_lesion_metrics")        # a local path: no download
    metric.compute(predictions=probs, references=labels)       # probs: (n, num_classes) rows

It computes with `trainer.evaluation.compute_all_metrics` (scikit-learn + the repository's ECE-15), the function the
training `compute_metrics` and `evaluate_model.py` use, so the numbers are the same; the repository (or its installed
package) must be importable.
"""

import datasets
import evaluate

from trainer.evaluation import compute_all_metrics

_CITATION = """\\
@article{skinclipvl2026,
  title = {SkinCLIP-VL: Consistency-Aware Vision-Language Learning for Multimodal Skin Cancer Diagnosis},
  year = {2026}
}
"""

_DESCRIPTION = """\\
Multi-class skin-lesion classification metrics: balanced accuracy (mean per-class recall), macro one-vs-rest AUROC,
expected calibration error with 15 equal-width bins on the top probability (ECE-15), multi-class Brier score and
negative log-likelihood, plus accuracy. Rows with a negative reference (no fine class) are left out and counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row per sample, `num_classes` class probabilities (or logits with
        `is_logits=True`).
    references (`list` of `int`): class indices; negative ones are left out (`n_excluded`).
    is_logits (`bool`, *optional*, defaults to `False`): the predictions are raw logits (softmax is applied).
    temperature (`float`, *optional*): post-hoc temperature applied to logits first (needs `is_logits=True`); the
        calibration metrics before it are returned too (`*_before_temperature`).
    n_bins (`int`, *optional*, defaults to 15): ECE bins.
    class_names (`list` of `str`, *optional*): names for `per_class`.
    per_class (`bool`, *optional*, defaults to `False`): also return per-class sensitivity, specificity, AUROC.
Returns:
    `balanced_accuracy`, `macro_auroc`, `ece`, `brier`, `nll`, `accuracy` (float, or None when undefined), `n_samples`,
    `n_excluded`, and `per_class` when asked.
Examples:
    >>> metric = evaluate.load("metrics/skin_lesion_metrics")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1])["balanced_accuracy"]
    1.0
"""

HEADLINE = ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll", "accuracy")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SkinLesionMetrics(evaluate.Metric):
    """Balanced accuracy, macro AUROC, ECE-15, Brier, NLL of class probabilities (SkinCLIP-VL's `trainer.metrics`)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/model_evaluation.html"],
        )

    def _compute(self, predictions, references, is_logits=False, temperature=None, n_bins=15, class_names=None,
                 per_class=False):
        result = compute_all_metrics(
            references, predictions, class_names=class_names, temperature=temperature, n_boot=0, n_bins=n_bins,
            is_logits=is_logits,
        )
        keys = [*HEADLINE, "n_samples", "n_excluded"]
        keys += [k for k in result if k.endswith("_before_temperature")]
        if per_class:
            keys.append("per_class")
        return {key: result[key] for key in keys}
