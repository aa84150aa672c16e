"""The `evaluate` metric module (metrics/skin_lesion_metrics), loaded offline in a fresh process, gives exactly the
numbers of trainer.metrics / the Trainer's compute_metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "metrics" / "skin_lesion_metrics"


def _inputs():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(60, 6)) * 2
    labels = rng.integers(0, 6, size=60)
    labels[[4, 17]] = -1  # rows without a fine class are left out by both
    return logits, labels


def test_metric_module_in_a_fresh_offline_process_equals_trainer_metrics(tmp_path):
    from scipy.special import softmax

    from trainer.evaluation import build_compute_metrics
    from trainer.metrics import (
        balanced_accuracy,
        brier_score,
        expected_calibration_error,
        macro_auroc,
        negative_log_likelihood,
    )

    logits, labels = _inputs()
    (tmp_path / "inputs.json").write_text(json.dumps({"logits": logits.tolist(), "labels": labels.tolist()}))
    code = f"""
import json, evaluate
from scipy.special import softmax
import numpy as np
x = json.load(open("inputs.json"))
metric = evaluate.load({str(MODULE)!r})
probs = softmax(np.array(x["logits"]), axis=1).tolist()
out = {{"probs": metric.compute(predictions=probs, references=x["labels"]),
        "logits_t": metric.compute(predictions=x["logits"], references=x["labels"], is_logits=True, temperature=1.7)}}
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])

    probs = softmax(logits, axis=1)
    expected = {
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "macro_auroc": macro_auroc(labels, probs),
        "ece": expected_calibration_error(labels, probs, n_bins=15),
        "brier": brier_score(labels, probs),
        "nll": negative_log_likelihood(labels, probs),
    }
    for key, value in expected.items():
        assert out["probs"][key] == value, key  # identical, not approximately equal
    assert out["probs"]["n_excluded"] == 2 and out["probs"]["n_samples"] == 58

    trainer_metrics = build_compute_metrics(temperature=1.7)((logits, labels))
    for key in ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll", "accuracy"):
        assert out["logits_t"][key] == trainer_metrics[key], key
    assert out["logits_t"]["ece_before_temperature"] == pytest.approx(expected["ece"], abs=0)
    assert out["logits_t"]["ece"] != out["probs"]["ece"]  # the temperature was applied


def test_metric_card_exists():
    card = (MODULE / "README.md").read_text()
    assert card.startswith("---") and "## Limitations and bias" in card and "ECE-15" in card
