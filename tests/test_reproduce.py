"""bench/reproduce.py and what it depends on: held-out synthetic splits, the shifted OOD set, --align_text, model
selection, the paired-bootstrap statistics, and the --quick harness end to end (its run commands reproduce exactly)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import reproduce
from dataset_scripts import synthetic
from dataset_scripts.schema import CLASS_NAMES
from dataset_scripts.splits import check_no_group_leakage

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# the proxy data
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_pool(tmp_path_factory):
    return tmp_path_factory.mktemp("pool") / "synthetic"


def test_held_out_splits_are_class_balanced_and_train_keeps_the_long_tail(held_out_pool):
    dd = synthetic.load(held_out_pool, num_images=300, seed=7, image_size=48, test_per_class=8,
                        validation_per_class=4, split_seed=0)
    test = Counter(CLASS_NAMES[i] for i in dd["test"]["label"])
    validation = Counter(CLASS_NAMES[i] for i in dd["validation"]["label"])
    train = Counter(CLASS_NAMES[i] for i in dd["train"]["label"])
    assert all(test[c] >= 8 for c in CLASS_NAMES), test
    assert all(validation[c] >= 4 for c in CLASS_NAMES), validation
    assert max(test.values()) <= 8 + 2 and max(validation.values()) <= 4 + 2  # groups have at most 3 images
    # the training split keeps the ISIC mix: NV the largest class, DF / VASC the smallest
    assert train.most_common(1)[0][0] == "NV" and train["NV"] > 10 * max(train["DF"], 1)
    check_no_group_leakage(dd)
    generation = dd.summary.settings["generation"]
    assert generation["held_out_per_class"] == {"test": 8, "validation": 4}
    assert generation["class_counts"]["DF"] == synthetic.class_counts(300, 2)["DF"] + 12
    # a later load of the folder without sizes splits it the same way (evaluate_model.py relies on it)
    again = synthetic.load(held_out_pool, num_images=300, seed=7, image_size=48, split_seed=0)
    assert again["test"]["image_id"] == dd["test"]["image_id"]

    other = synthetic.load(held_out_pool, num_images=300, seed=7, image_size=48, test_per_class=8,
                           validation_per_class=4, split_seed=1)
    assert set(other["test"]["image_id"]) != set(dd["test"]["image_id"])  # the split seed changes the split ...
    everything = lambda d: sorted(i for s in d.values() for i in s["image_id"])  # noqa: E731
    assert everything(other) == everything(dd)  # ... not the pool
    small = synthetic.load(held_out_pool, num_images=300, seed=7, image_size=48, test_per_class=8,
                           validation_per_class=4, split_seed=0, train_fraction=0.12)
    assert small["test"]["image_id"] == dd["test"]["image_id"]  # Table III: same test rows
    assert len(small["train"]) < 0.3 * len(dd["train"]) and set(small["train"]["label"]) == set(range(8))
    with pytest.raises(ValueError, match="not the requested"):  # same folder, other held-out size
        synthetic.load(held_out_pool, num_images=300, seed=7, image_size=48, test_per_class=9, validation_per_class=4)


def test_shifted_set_changes_acquisition_not_disease(tmp_path):
    root = tmp_path / "shift"
    record = synthetic.generate(root, num_images=200, seed=3, image_size=64, shift=True)
    assert record["artefact_counts_per_image"]["vignette"] == 0 and record["artefact_counts_per_image"]["ruler"] == 0
    assert not (root / "derm7pt").exists()
    counts = record["class_counts"]
    malignant = sum(counts[c] for c in ("MEL", "BCC", "SCC"))
    assert malignant / sum(counts.values()) == pytest.approx(0.10, abs=0.02)
    dd = synthetic.load(root, num_images=200, seed=3, image_size=64, shift=True, split_fractions=(0.0, 0.0, 1.0))
    assert len(dd["test"]) == 200 and len(dd["train"]) == 0
    row = dd["test"][0]
    assert row["image"].size == (38, 38)  # saved smaller: 0.6 x 64
    # masks follow the crop and resize
    for criterion, mask in synthetic.criterion_masks(row["image"].filename).items():
        assert mask.shape == (38, 38), criterion
    again = tmp_path / "again"
    synthetic.generate(again, num_images=200, seed=3, image_size=64, shift=True)
    first = sorted((root / "isic2019" / "ISIC_2019_Training_Input").glob("*.jpg"))[:5]
    for p in first:
        assert (again / p.relative_to(root)).read_bytes() == p.read_bytes()
    with pytest.raises(ValueError, match="not the requested"):
        synthetic.load(root, num_images=200, seed=3, image_size=64)  # a shifted folder is not the in-domain set


# ---------------------------------------------------------------------------------------------------------------------
# --align_text and model selection
# ---------------------------------------------------------------------------------------------------------------------


def _args(tmp_path, tiny_components, **overrides):
    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments

    data_args = DataArguments(dataset_name="synthetic", synthetic_num_images=64, data_dir=str(tmp_path / "data"))
    model_args = ModelArguments(vision_model_name_or_path=tiny_components["vision"],
                                decoder_name_or_path=tiny_components["decoder"], lora_r=4, lora_alpha=8,
                                lora_dropout=0.0)
    values = dict(output_dir=str(tmp_path / "run"), report_to="none", seed=0, learning_rate=5e-3, warmup_steps=0,
                  per_device_train_batch_size=8, per_device_eval_batch_size=16, dataloader_num_workers=0,
                  disable_tqdm=True, use_cpu=True, save_strategy="no", eval_strategy="no", n_bootstrap=0)
    values.update(overrides)
    return model_args, data_args, CFATrainingArguments(**values)


def test_align_text_report_aligns_each_image_with_its_own_report(tmp_path, tiny_components):
    from train import build_trainer
    from trainer.collator import stable_id

    for choice, column in (("report", "report"), ("label", "align_text")):
        trainer, context = build_trainer(*_args(tmp_path, tiny_components, align_text=choice, max_steps=1))
        rows = [context["data"]["train"][i] for i in range(12)]
        batch = context["collator"]("train")(rows)
        assert batch["align_text_ids"].tolist() == [stable_id(r[column]) for r in rows]
        cache_texts = trainer.data_collator.text_embeddings
        for row, embedding in zip(rows, batch["text_embeds"]):
            torch.testing.assert_close(embedding, cache_texts[row[column]])
    reports = {r["report"] for r in rows}
    labels = {r["align_text"] for r in rows}
    assert len(reports) > len(labels)  # per-image reports are finer targets than class sentences
    with pytest.raises(ValueError, match="align_text"):
        _args(tmp_path, tiny_components, align_text="caption")


def test_load_best_model_at_end_keeps_the_best_validation_epoch(tmp_path, tiny_components):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from train import build_trainer

    trainer, _ = build_trainer(*_args(
        tmp_path, tiny_components, num_train_epochs=3, learning_rate=3e-2, eval_strategy="epoch",
        save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model="balanced_accuracy", greater_is_better=True,
    ))
    trainer.train()
    scores = [e["eval_balanced_accuracy"] for e in trainer.state.log_history if "eval_balanced_accuracy" in e]
    assert len(scores) == 3 and trainer.state.best_metric == max(scores)
    best = Path(trainer.state.best_model_checkpoint)
    saved = load_file(best / "adapter" / "adapter_model.safetensors")
    current = get_peft_model_state_dict(trainer.model)
    assert set(saved) <= set(current) and saved
    for name, tensor in saved.items():
        torch.testing.assert_close(current[name].cpu(), tensor, msg=name)
    assert trainer.evaluate()["eval_balanced_accuracy"] == pytest.approx(max(scores))
    last = sorted(Path(trainer.args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    if last != best:  # the weights in memory are the best epoch's, not the last one's
        last_saved = load_file(last / "adapter" / "adapter_model.safetensors")
        assert any(not torch.equal(last_saved[n], saved[n]) for n in saved)


# ---------------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_fast_auroc_and_ece_match_the_library_metrics():
    from sklearn.metrics import roc_auc_score

    from trainer.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    y = rng.integers(0, 8, 400)
    p = rng.dirichlet(np.ones(8), 400).round(2)  # rounding makes ties
    p = p / p.sum(1, keepdims=True)
    assert reproduce._auroc_ovr(y, p) == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    m = (rng.random(300) < 0.2).astype(int)
    s = rng.random(300).round(2)
    assert reproduce._binary_auroc(m, s) == pytest.approx(roc_auc_score(m, s))
    pred = p.argmax(1)
    assert reproduce._ece((pred == y).astype(float), p.max(1)) == pytest.approx(expected_calibration_error(y, p))


def _fake_run(rid, labels, groups, logits, malignant=None, ood_logits=None):
    record = {"id": rid, "metrics": {"temperature": 1.0, "ood_threshold": 0.5}}
    arrays = {"test_labels": labels, "test_groups": groups, "test_logits": logits}
    if ood_logits is not None:
        arrays.update({"ood_malignant": malignant, "ood_groups": groups[: len(malignant)], "ood_logits": ood_logits})
    from trainer.metrics import balanced_accuracy

    record["metrics"]["balanced_accuracy"] = balanced_accuracy(labels, reproduce._softmax(logits))
    return record, arrays


def test_paired_bootstrap_contrasts():
    rng = np.random.default_rng(1)
    n = 240
    labels = np.repeat(np.arange(8), n // 8)
    groups = np.asarray([f"g{i // 2}" for i in range(n)])
    good = np.eye(8)[labels] * 4 + rng.normal(0, 1, (n, 8))
    bad = rng.normal(0, 1, (n, 8))
    records, arrays = {}, {}
    for seed in (0, 1, 2):
        for name, logits in (("a", good), ("b", bad), ("c", good)):
            rid = f"{name}_s{seed}"
            records[rid], arrays[rid] = _fake_run(rid, labels, groups, logits)
    boot = reproduce.bootstrap_table(records, arrays, [0, 1, 2], n_boot=200, positive=[0, 2, 7])
    same = reproduce.contrast(records, boot, [0, 1, 2], "balanced_accuracy", ["a"], ["c"])
    assert same["estimate"] == 0 and same["ci"] == [0.0, 0.0]  # identical predictions: paired difference is exactly 0
    better = reproduce.contrast(records, boot, [0, 1, 2], "balanced_accuracy", ["a"], ["b"])
    assert better["estimate"] > 0.5 and better["ci"][0] > 0.4
    assert reproduce.verdict_greater(better["ci"]) == "reproduced"
    assert reproduce.verdict_greater(better["ci"], direction=-1) == "refuted"
    assert reproduce.verdict_greater([-0.1, 0.2]) == "inconclusive"
    # a difference whose sign flips between training seeds: every seed's own test-set CI is clear of 0, the mean is
    # positive, but the two-level bootstrap (seeds resampled too) does not call it
    flip_records, flip_arrays = {}, {}
    for seed in (0, 1, 2):
        first, second = (bad, good) if seed == 1 else (good, bad)
        for name, logits in (("x", first), ("y", second)):
            rid = f"{name}_s{seed}"
            flip_records[rid], flip_arrays[rid] = _fake_run(rid, labels, groups, logits)
    flip_boot = reproduce.bootstrap_table(flip_records, flip_arrays, [0, 1, 2], n_boot=400, positive=[0, 2, 7])
    flip = reproduce.contrast(flip_records, flip_boot, [0, 1, 2], "balanced_accuracy", ["x"], ["y"])
    assert flip["estimate"] > 0.1 and min(flip["per_seed"]) < -0.4 < 0.4 < max(flip["per_seed"])
    assert flip["ci"][0] < 0 < flip["ci"][1] and reproduce.verdict_greater(flip["ci"]) == "inconclusive"
    test_level_only = np.nanmean(flip_boot["x"]["balanced_accuracy"] - flip_boot["y"]["balanced_accuracy"], axis=1)
    assert np.percentile(test_level_only, 2.5) > 0  # what a test-set-only bootstrap would have called reproduced
    # an unpaired test set is refused
    records["c_s1"], arrays["c_s1"] = _fake_run("c_s1", labels, np.roll(groups, 1), good)
    with pytest.raises(ValueError, match="other test rows"):
        reproduce.bootstrap_table(records, arrays, [0, 1, 2], n_boot=5, positive=[0, 2, 7])


def test_run_commands_carry_every_setting():
    args = reproduce.resolve(reproduce.build_parser().parse_args(["--quick", "--output_dir", "/tmp/x"]))
    specs = reproduce.planned_runs(args)
    assert len({reproduce.run_id(s) for s in specs}) == len(specs)
    rows = Counter((s["row"], s["align_text"], s["train_fraction"], s["lambda_gen"]) for s in specs)
    assert all(count == 3 for count in rows.values())  # every row with 3 seeds
    assert {(s["row"], s["train_fraction"]) for s in specs} >= {("full", 0.12), ("ce_only", 0.12),
                                                               ("linear_probe", 0.12)}
    assert {s["lambda_gen"] for s in specs if s["row"] == "full"} == set(reproduce.LAMBDA_GEN_SWEEP)
    spec = next(s for s in specs if s["row"] == "full" and s["lambda_gen"] == 0.1 and s["seed"] == 2)
    argv = shlex.split(reproduce.run_command(args, spec))[3:]
    again = reproduce.resolve(reproduce.build_parser().parse_args(argv))
    assert (again.run, again.seed, again.lambda_gen, again.align_text, again.train_fraction) == (
        "full", 2, 0.1, "report", 1.0)
    assert again.quick and again.output_dir == "/tmp/x"


# ---------------------------------------------------------------------------------------------------------------------
# the harness end to end
# ---------------------------------------------------------------------------------------------------------------------


def _run(argv, timeout=1500):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_quick_harness_writes_the_report_and_its_commands_reproduce(tmp_path, tiny_components):
    out = tmp_path / "out"
    _run(["-m", "bench.reproduce", "--quick", "--output_dir", str(out), "--vision_model_name_or_path",
          tiny_components["vision"], "--decoder_name_or_path", tiny_components["decoder"], "--jobs", "2"])
    docs = out / "docs"
    report = json.loads((docs / "reproduction.json").read_text())
    text = (docs / "reproduction.md").read_text()
    assert (docs / "reproduction_lambda_gen.png").stat().st_size > 1000
    for heading in ("Table II, in distribution", "Table II, out of distribution", "Table III", "Fig. 3",
                    "Verdicts", "align_text"):
        assert heading in text, heading
    runs = report["runs"]
    assert len(runs) == len(reproduce.planned_runs(reproduce.resolve(reproduce.build_parser().parse_args(
        ["--quick", "--output_dir", str(out)]))))
    for record in runs:
        for key in ("balanced_accuracy", "macro_auroc", "ece", "ece_before_temperature", "brier", "ood_auroc",
                    "ood_balanced_accuracy", "ood_ece"):
            assert key in record["metrics"], (record["id"], key)
        assert record["command"].startswith("python -m bench.reproduce ")
    assert {v["verdict"] for v in report["verdicts"]} <= {"reproduced", "refuted", "inconclusive"}
    assert [r["row"] for r in report["table2"]] == [*reproduce.ABLATION_ROWS, "linear_probe"]
    # re-running a recorded command in a fresh process prints the same metrics (JSON, last line of stdout)
    for rid in ("full_lg0.5_align-report_tf1_s1", "linear_probe_tf0.12_s2"):
        record = next(r for r in runs if r["id"] == rid)
        argv = shlex.split(record["command"])
        assert argv[:3] == ["python", "-m", "bench.reproduce"]
        printed = json.loads(_run(argv[1:]).stdout.strip().splitlines()[-1])
        assert printed["id"] == rid
        assert printed["balanced_accuracy"] == record["metrics"]["balanced_accuracy"]
        assert printed["ood_auroc"] == record["metrics"]["ood_auroc"]


def test_quick_harness_on_the_real_formats(tmp_path, tiny_components):
    """isic2019 + isic2024 fixture layouts (real CSV/HDF5 files, ../shared/fixtures/real) with tiny components."""
    from conftest import real_fixture

    isic19, isic24 = real_fixture("isic2019"), real_fixture("isic2024")
    import h5py

    from dataset_scripts import isic2019

    data = tmp_path / "isic2019"
    data.mkdir()
    shutil.copyfile(isic19 / "fixture_GroundTruth.csv", data / isic2019.GROUND_TRUTH_FILE)
    shutil.copyfile(isic19 / "fixture_Metadata.csv", data / isic2019.METADATA_FILE)
    (data / isic2019.IMAGE_DIR).symlink_to(isic19 / isic2019.IMAGE_DIR)
    ood = tmp_path / "isic2024"
    ood.mkdir()
    shutil.copyfile(isic24 / "train-metadata.sample5.csv", ood / "train-metadata.csv")
    with h5py.File(ood / "train-image.hdf5", "w") as f:
        for p in sorted((isic24 / "train-image" / "image").glob("*.jpg")):
            f.create_dataset(p.stem, data=np.bytes_(p.read_bytes()))
    out = tmp_path / "out"
    argv = ["-m", "bench.reproduce", "--quick", "--dataset", "isic2019", "--data_dir", str(data), "--ood_dataset",
            "isic2024", "--ood_data_dir", str(ood), "--vision_model_name_or_path", tiny_components["vision"],
            "--decoder_name_or_path", tiny_components["decoder"], "--output_dir", str(out), "--seeds", "0,1"]
    _run(argv)
    report = json.loads((out / "docs" / "reproduction.json").read_text())
    assert report["dataset"] == "isic2019" and report["ood_dataset"] == "isic2024"
    record = report["runs"][0]
    assert "--dataset isic2019" in record["command"] and "--ood_dataset isic2024" in record["command"]
    assert record["ood_rows"] == 5 and record["metrics"]["ood_n_malignant"] == 3


def test_paper_config_selects_the_best_validation_epoch_and_aligns_with_reports():
    from train import DEMO_PRESET, parse_args

    for argv in (["configs/paper.yaml"], ["configs/single_gpu_small.yaml"]):
        _, _, training_args = parse_args([str(REPO / argv[0]), "--bf16", "false", "--use_cpu", "true"])  # CPU here
        assert training_args.load_best_model_at_end and training_args.metric_for_best_model in ("balanced_accuracy", "eval_balanced_accuracy")
        assert training_args.greater_is_better and training_args.save_strategy == training_args.eval_strategy
        assert training_args.align_text == "report"
    _, data_args, training_args = parse_args([])  # the demo preset
    assert training_args.load_best_model_at_end and data_args.synthetic_test_per_class == 60
    assert DEMO_PRESET["synthetic_validation_per_class"] == data_args.synthetic_validation_per_class == 30
