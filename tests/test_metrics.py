"""Tests of trainer/metrics.py (and the report of trainer/evaluation.py) against hand computations (CPU, fast)."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from transformers import EvalPrediction

from trainer.evaluation import build_compute_metrics, compute_all_metrics
from trainer.figures import confusion_matrix_plot, reliability_diagram
from trainer.metrics import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    balanced_accuracy,
    binary_auroc,
    binary_metrics,
    bootstrap_cis,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    macro_auroc,
    malignancy_scores,
    negative_log_likelihood,
    per_class_auroc,
    per_class_sensitivity_specificity,
    youden_threshold,
)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _pairwise_auroc(is_positive, scores):
    """AUROC by hand: the share of (positive, negative) pairs ranked right, ties counting 1/2."""
    pos, neg = scores[is_positive], scores[~is_positive]
    return np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])


def bootstrap_ci(metric_fn, labels, probs, group_ids=None, **kwargs):
    return bootstrap_cis({"metric": metric_fn}, labels, probs, group_ids, **kwargs)["metric"]


def _random_problem(n=300, num_classes=4, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += signal
    return labels, logits, _softmax(logits)


# ------------------------------------------------------------------------------------------------------------------
# point metrics
# ------------------------------------------------------------------------------------------------------------------


def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.38, 0.62], [0.2, 0.8]])
    labels = np.array([0, 0, 0, 0, 1])
    # bins of width 1/15, right-closed: 0.9 -> (13/15, 14/15], 0.8 -> (11/15, 12/15] (edge belongs to the lower bin),
    # 0.6 -> (8/15, 9/15], 0.62 -> (9/15, 10/15]
    expected = 2 / 5 * abs(0.5 - 0.9) + 1 / 5 * abs(1 - 0.6) + 1 / 5 * abs(0 - 0.62) + 1 / 5 * abs(1 - 0.8)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)  # 0.404
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(labels, probs, n_bins=1) == pytest.approx(
        abs(3 / 5 - np.mean([0.9, 0.9, 0.6, 0.62, 0.8]))
    )
    # perfectly calibrated one-hot predictions
    assert expected_calibration_error([0, 1], np.eye(2)) == 0.0


def test_balanced_accuracy_matches_sklearn_and_excludes_negative_labels():
    labels, _, probs = _random_problem(seed=1, signal=0.8)
    expected = balanced_accuracy_score(labels, probs.argmax(axis=1))
    assert balanced_accuracy(labels, probs) == pytest.approx(expected)
    assert balanced_accuracy(torch.tensor(labels), torch.tensor(probs, dtype=torch.bfloat16)) == pytest.approx(
        expected, abs=0.05
    )
    with_missing = labels.copy()
    with_missing[:50] = -1
    assert balanced_accuracy(with_missing, probs) == pytest.approx(
        balanced_accuracy_score(labels[50:], probs[50:].argmax(axis=1))
    )
    # a class absent from the labels is not averaged in (class 3 never occurs)
    assert balanced_accuracy([0, 0, 1, 2], np.eye(4)[[0, 3, 1, 2]]) == pytest.approx((0.5 + 1 + 1) / 3)


def test_auroc_matches_hand_computation_and_reports_absent_classes():
    labels, _, probs = _random_problem(n=120, seed=2)
    probs = np.round(probs, 2)  # ties
    for c, value in per_class_auroc(labels, probs).items():
        assert value == pytest.approx(_pairwise_auroc(labels == int(c), probs[:, int(c)]), abs=1e-12)
    assert macro_auroc(labels, probs) == pytest.approx(
        np.mean([_pairwise_auroc(labels == c, probs[:, c]) for c in range(4)]), abs=1e-12
    )
    assert binary_auroc(labels == 1, probs[:, 1]) == per_class_auroc(labels, probs)["1"]
    assert binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None

    labels = np.array([0, 0, 1, 1, 0, 1])  # class 2 absent
    probs = _random_problem(n=6, num_classes=3, seed=3)[2]
    per_class = per_class_auroc(labels, probs, class_names=["NV", "MEL", "BCC"])
    assert per_class["BCC"] is None
    assert macro_auroc(labels, probs) == pytest.approx((per_class["NV"] + per_class["MEL"]) / 2)
    assert np.isnan(macro_auroc([1, 1], probs[:2]))  # only one class: no AUROC at all


def test_brier_nll_sensitivity_specificity_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    labels = np.array([0, 2, 2, -1])
    assert brier_score(labels, probs) == pytest.approx(
        np.mean([0.3**2 + 0.2**2 + 0.1**2, 0.1**2 + 0.5**2 + 0.6**2, 0.3**2 + 0.3**2 + 0.6**2])
    )
    assert negative_log_likelihood(labels, probs) == pytest.approx(-np.mean(np.log([0.7, 0.4, 0.4])))
    # a certain mistake costs -log(eps), not inf; summed probabilities a hair above 1 are accepted
    assert negative_log_likelihood([1], [[1.0, 0.0]]) == pytest.approx(-np.log(1e-12))
    assert brier_score([0], [[1.0 + 1e-15, 0.0]]) == pytest.approx(0.0, abs=1e-12)
    assert brier_score([1, 0], [[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(0.5)  # two classes: not halved
    per_class = per_class_sensitivity_specificity(labels, probs, ["a", "b", "c"])
    # predictions: 0, 1, 2 (row 4 excluded)
    assert per_class["a"] == {"sensitivity": 1.0, "specificity": 1.0, "support": 1}
    assert per_class["b"] == {"sensitivity": None, "specificity": pytest.approx(2 / 3), "support": 0}
    assert per_class["c"] == {"sensitivity": 0.5, "specificity": 1.0, "support": 2}
    with pytest.raises(ValueError, match="names: 2"):
        per_class_sensitivity_specificity(labels, probs, ["a", "b"])


# ------------------------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_estimate_and_is_seeded():
    labels, _, probs = _random_problem(n=400, seed=4)
    groups = np.arange(400) // 2
    point = balanced_accuracy(labels, probs)
    low, high = bootstrap_ci(balanced_accuracy, labels, probs, groups, n_boot=200, seed=0)
    assert low < point < high
    assert (low, high) == bootstrap_ci(balanced_accuracy, labels, probs, groups, n_boot=200, seed=0)
    assert (low, high) != bootstrap_ci(balanced_accuracy, labels, probs, groups, n_boot=200, seed=1)


def test_bootstrap_resamples_whole_groups():
    sizes = [1, 2, 3, 4, 5]
    groups = np.repeat([f"lesion{i}" for i in range(5)], sizes)
    rows = np.arange(groups.size)
    probs = np.stack([rows, rows], axis=1).astype(float)  # the "probs" carry the row index for the spy
    labels = np.zeros(rows.size, dtype=int)
    seen = []

    def spy(y, p):
        seen.append(p[:, 0].astype(int))
        return float(len(y))

    bootstrap_ci(spy, labels, probs, groups, n_boot=50, seed=0)
    assert len(seen) == 50
    for drawn in seen:
        counts = np.bincount(drawn, minlength=rows.size)
        for g in range(5):
            members = counts[groups == f"lesion{g}"]
            assert (members == members[0]).all()  # a group is drawn whole, k times for all of its rows
        assert len(drawn) == sum(counts)
    # 5 groups are drawn per replicate: the row count is a sum of 5 group sizes, not 15 rows
    assert any(len(drawn) != rows.size for drawn in seen)


def test_group_level_ci_is_wider_than_row_level_for_duplicated_groups():
    # 30 lesions, each imaged 10 times with identical predictions: rows are not independent
    labels, _, probs = _random_problem(n=30, seed=5, signal=1.0)
    labels, probs = np.repeat(labels, 10), np.repeat(probs, 10, axis=0)
    groups = np.repeat(np.arange(30), 10)
    group_low, group_high = bootstrap_ci(balanced_accuracy, labels, probs, groups, n_boot=300, seed=0)
    row_low, row_high = bootstrap_ci(balanced_accuracy, labels, probs, None, n_boot=300, seed=0)
    assert group_high - group_low > 1.8 * (row_high - row_low)


def test_bootstrap_cis_skips_nan_replicates_and_excludes_unlabelled_rows():
    labels = np.array([0, 1, -1, 0, 1, 1])
    probs = _softmax(np.random.default_rng(0).normal(size=(6, 2)))
    intervals = bootstrap_cis({"auroc": macro_auroc, "nll": negative_log_likelihood}, labels, probs, n_boot=100)
    assert set(intervals) == {"auroc", "nll"}
    assert all(np.isfinite(intervals["auroc"])) and all(np.isfinite(intervals["nll"]))


# ------------------------------------------------------------------------------------------------------------------
# temperature scaling
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [2.0, 0.5])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(5000, 5))
    probs = _softmax(logits / true_temperature)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    fitted = fit_temperature(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert fitted == pytest.approx(true_temperature, rel=0.1)
    # the fit lowers the NLL, and works under no_grad (evaluation code)
    with torch.no_grad():
        assert fit_temperature(logits, labels) == pytest.approx(fitted, rel=1e-3)
    assert negative_log_likelihood(labels, _softmax(apply_temperature(logits, fitted))) < negative_log_likelihood(
        labels, _softmax(logits)
    )


def test_fit_temperature_keeps_its_bounds():
    # separable logits: the NLL keeps falling as T -> 0, so the optimum runs low and is clipped to the lower bound
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 1, 0, 1])
    temperature, fitted = fit_temperature(logits, labels, bounds=(0.5, 20.0), return_fitted=True)
    assert fitted < 0.5 and temperature == 0.5
    assert fit_temperature(logits, labels, bounds=None) == pytest.approx(fitted)
    assert TEMPERATURE_BOUNDS[0] <= fit_temperature(logits, labels) <= TEMPERATURE_BOUNDS[1]
    # nothing to fit: 1.0
    assert fit_temperature(logits, [-1, -1, -1, -1], return_fitted=True) == (1.0, 1.0)


def test_apply_temperature_types():
    logits = np.array([[2.0, -2.0]])
    np.testing.assert_allclose(apply_temperature(logits, 2.0), [[1.0, -1.0]])
    tensor = apply_temperature(torch.tensor(logits), 4.0)
    assert isinstance(tensor, torch.Tensor)
    torch.testing.assert_close(tensor, torch.tensor([[0.5, -0.5]], dtype=torch.float64))
    assert apply_temperature(logits, None) is logits
    with pytest.raises(ValueError, match="-1.0"):
        apply_temperature(logits, -1.0)


# ------------------------------------------------------------------------------------------------------------------
# binary protocol
# ------------------------------------------------------------------------------------------------------------------


def test_youden_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.8, 0.9])
    # >= 0.5: TPR 1, FPR 1/4 (J = .75); >= 0.8: TPR 2/3, FPR 0 (J = .67); >= 0.55: TPR 2/3, FPR 1/4
    assert youden_threshold(labels, scores) == pytest.approx(0.5)
    best = max(scores, key=lambda t: np.mean(scores[labels == 1] >= t) - np.mean(scores[labels == 0] >= t))
    assert youden_threshold(labels, scores) == best
    with pytest.raises(ValueError, match="both"):
        youden_threshold([1, 1], [0.2, 0.3])


def test_binary_metrics():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, -1])
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.5, 0.8, 0.9, 0.99])
    given = binary_metrics(labels, scores, threshold=0.6)
    assert given["threshold_source"] == "given"
    assert given["auroc"] == pytest.approx(_pairwise_auroc(labels[:7] == 1, scores[:7]))
    assert given["sensitivity"] == pytest.approx(2 / 3) and given["specificity"] == 1.0
    assert given["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    two_class = np.stack([1 - scores[:7], scores[:7]], axis=1)
    assert given["ece"] == pytest.approx(expected_calibration_error(labels[:7], two_class))
    assert given["brier"] == pytest.approx(np.mean((scores[:7] - labels[:7]) ** 2))
    assert given["n_samples"] == 7 and given["n_positive"] == 3
    youden = binary_metrics(labels, scores)
    assert youden["threshold"] == pytest.approx(0.5) and youden["threshold_source"] == "youden_on_these_rows"
    assert youden["balanced_accuracy"] == pytest.approx((1 + 0.75) / 2)
    json.dumps(youden, allow_nan=False)
    probs = np.array([[0.2, 0.3, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    np.testing.assert_allclose(malignancy_scores(probs, [0, 2]), [0.3, 0.8])


# ------------------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------------------


def test_pngs_written(tmp_path):
    labels, logits, probs = _random_problem(n=100, seed=6)
    diagram = reliability_diagram(labels, probs, tmp_path / "figs" / "reliability.png", title="test")
    matrix = confusion_matrix_plot(labels, logits, ["NV", "MEL", "BCC", "BKL"], tmp_path / "confusion_matrix.png")
    for path in (diagram, matrix):
        with open(path, "rb") as handle:
            content = handle.read()
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and len(content) > 1000


# ------------------------------------------------------------------------------------------------------------------
# compute_all_metrics / Trainer compute_metrics
# ------------------------------------------------------------------------------------------------------------------


def test_compute_all_metrics_keys_and_json():
    labels, logits, probs = _random_problem(n=200, seed=7)
    labels = labels.copy()
    labels[:10] = -1
    groups = np.arange(200) // 4
    names = ["NV", "MEL", "BCC", "BKL"]
    from_logits = compute_all_metrics(labels, logits, group_ids=groups, class_names=names, n_boot=50)
    from_probs = compute_all_metrics(labels, probs, group_ids=groups, class_names=names, n_boot=50)
    json.dumps(from_logits, allow_nan=False)
    for key in ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll"):
        assert from_logits[key] == pytest.approx(from_probs[key])
        low, high = from_logits["ci"][key]
        assert low <= from_logits[key] <= high
    assert from_logits["balanced_accuracy"] == pytest.approx(balanced_accuracy(labels, probs))
    assert from_logits["ece"] == pytest.approx(expected_calibration_error(labels, probs))
    assert from_logits["n_excluded"] == 10 and from_logits["n_samples"] == 190
    assert set(from_logits["per_class"]) == set(names)
    assert set(from_logits["per_class"]["MEL"]) == {"sensitivity", "specificity", "auroc", "support"}
    assert from_logits["auroc_absent_classes"] == []

    scaled = compute_all_metrics(labels, logits, class_names=names, temperature=2.0, n_boot=0)
    assert scaled["ci"] == {} and scaled["temperature"] == 2.0
    assert scaled["ece_before_temperature"] == pytest.approx(from_logits["ece"])
    assert scaled["ece"] == pytest.approx(expected_calibration_error(labels, _softmax(logits / 2.0)))
    with pytest.raises(ValueError, match="temperature"):
        compute_all_metrics(labels, probs, temperature=2.0)


def test_build_compute_metrics_handles_trainer_outputs():
    labels, logits, probs = _random_problem(n=60, seed=8)
    labels = labels.copy()
    labels[0] = -1
    groups = np.arange(60) // 3
    compute_metrics = build_compute_metrics(["a", "b", "c", "d"])
    plain = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert plain["balanced_accuracy"] == pytest.approx(balanced_accuracy(labels, probs))
    assert plain["n_excluded"] == 1.0
    assert all(isinstance(v, float) for v in plain.values())
    nested = compute_metrics(EvalPrediction(predictions=(logits, np.zeros((60, 7))), label_ids=(labels, groups)))
    for key in ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll"):
        assert nested[key] == pytest.approx(plain[key])
    as_tensors = compute_metrics((torch.tensor(logits), torch.tensor(labels)))
    assert as_tensors["ece"] == pytest.approx(plain["ece"])

    with_ci = build_compute_metrics(["a", "b", "c", "d"], n_boot=20)(EvalPrediction(logits, (labels, groups)))
    assert with_ci["balanced_accuracy_ci_low"] <= with_ci["balanced_accuracy"] <= with_ci["balanced_accuracy_ci_high"]
