"""evaluate_model.py end to end on a tiny model trained here (synthetic, Derm7pt layout, ISIC 2024 HDF5 layout), its
scoring helpers on hand-sized arrays, and the training configs (configs/*.yaml, configs/accelerate/*.yaml)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, real_fixture

import evaluate_model as em

HEADLINE = ("balanced_accuracy", "macro_auroc", "ece", "brier", "nll")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_components):
    """A tiny model trained for one epoch on 120 synthetic images with `python train.py` (about 20 s on 2 cores)."""
    root = tmp_path_factory.mktemp("evaluate")
    data_dir, run_dir = root / "data", root / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--vision_model_name_or_path",
        tiny_components["vision"],
        "--decoder_name_or_path",
        tiny_components["decoder"],
        "--output_dir",
        str(run_dir),
        "--data_dir",
        str(data_dir),
        "--synthetic_num_images",
        "120",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "16",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--n_bootstrap",
        "10",
        "--learning_rate",
        "2e-3",
        "--dataloader_num_workers",
        "0",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "model" / "config.json").is_file()
    return {"model": str(run_dir / "model"), "data": str(data_dir), "root": root}


def _run(args, tmp_path, name="report.json"):
    out = tmp_path / name
    assert em.main([*args, "--output_json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    return json.loads(text)


def _check_block(block, n_boot):
    for key in HEADLINE:
        value = block[key]
        assert value is None or np.isfinite(value)
        if n_boot and value is not None:
            low, high = block["ci"][key]
            assert low is not None and high is not None and low <= high
    assert 0.0 <= block["balanced_accuracy"] <= 1.0 and 0.0 <= block["ece"] <= 1.0


def test_synthetic_end_to_end(trained, tmp_path, capsys):
    model_config = json.loads((Path(trained["model"]) / "config.json").read_text())
    report = _run(
        ["--model", trained["model"], "--dataset", "synthetic", "--data_dir", trained["data"], "--n_bootstrap", "50"],
        tmp_path,
    )
    console = capsys.readouterr().out
    assert "balanced_accuracy" in console and "after temperature" in console and "before temperature" in console
    assert report["dataset"] == "synthetic" and report["split"] == "test" and report["use_metadata"] is True
    assert report["temperature"] == pytest.approx(model_config["calibration_temperature"])
    after, before = report["multiclass"], report["multiclass_before_temperature"]
    _check_block(after, 50)
    _check_block(before, 50)
    assert after["n_samples"] == report["n_rows"] > 0 and after["n_boot"] == 50
    assert after["ece_before_temperature"] == pytest.approx(before["ece"])
    # a temperature changes neither the argmax nor the ranking
    assert after["balanced_accuracy"] == pytest.approx(before["balanced_accuracy"])
    assert set(after["per_class"]) == {"MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"}
    assert "binary" not in report and "derm7pt_5group" not in report

    image_only = _run(
        [
            "--model",
            trained["model"],
            "--dataset",
            "synthetic",
            "--data_dir",
            trained["data"],
            "--n_bootstrap",
            "0",
            "--no_metadata",
            "--split",
            "validation",
        ],
        tmp_path,
        "image_only.json",
    )
    assert image_only["use_metadata"] is False and image_only["split"] == "validation"
    assert image_only["multiclass"]["ci"] == {}


def test_derm7pt_layout_reports_five_groups(trained, tmp_path):
    report = _run(
        [
            "--model",
            trained["model"],
            "--dataset",
            "derm7pt",
            "--data_dir",
            str(Path(trained["data"]) / "derm7pt"),
            "--n_bootstrap",
            "20",
        ],
        tmp_path,
    )
    groups, without = report["derm7pt_5group"], report["derm7pt_5group_without_lentigo"]
    assert groups["class_to_group"]["BKL"] == "SK" and groups["class_to_group"]["DF"] == "MISC"
    assert groups["after_temperature"]["num_classes"] == 5
    assert set(groups["after_temperature"]["per_class"]) == {"BCC", "NEV", "MEL", "MISC", "SK"}
    n = groups["after_temperature"]["n_samples"]
    assert n == report["multiclass"]["n_samples"] > 0
    assert without["after_temperature"]["n_samples"] == n - groups["n_lentigo"]
    _check_block(groups["after_temperature"], 20)
    _check_block(groups["before_temperature"], 20)


def test_group_matrix_sums_probabilities_into_the_authors_groups():
    from dataset_scripts.schema import CLASS_NAMES, DERM7PT_GROUPS

    matrix = em.group_matrix(CLASS_NAMES, DERM7PT_GROUPS)
    assert matrix.shape == (8, 5) and np.all(matrix.sum(axis=1) == 1)
    probs = np.array([[0.1, 0.2, 0.3, 0.05, 0.15, 0.1, 0.05, 0.05]])  # MEL NV BCC AK BKL DF VASC SCC
    grouped = dict(zip(DERM7PT_GROUPS, (probs @ matrix)[0]))
    assert grouped == pytest.approx({"BCC": 0.3, "NEV": 0.2, "MEL": 0.1, "MISC": 0.25, "SK": 0.15})


def test_binary_block_by_hand():
    labels = np.array([1, 1, 0, 0, -1])
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.7])
    fixed = em.binary_block(labels, scores, ["a", "b", "c", "d", "e"], threshold=0.45, n_boot=30)
    assert fixed["threshold_source"] == "given" and fixed["n_samples"] == 4
    # at 0.45: predicted positive = {0.9, 0.5}: sensitivity 1/2, specificity 1/2
    assert fixed["sensitivity"] == 0.5 and fixed["specificity"] == 0.5 and fixed["balanced_accuracy"] == 0.5
    assert fixed["auroc"] == pytest.approx(0.75)  # pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1)
    assert fixed["brier"] == pytest.approx(np.mean([0.01, 0.36, 0.25, 0.01]))
    assert set(fixed["ci"]) == {"auroc", "balanced_accuracy", "sensitivity", "specificity", "ece", "brier"}
    youden = em.binary_block(labels, scores, None, threshold=None, n_boot=0)
    assert youden["threshold_source"] == "youden_on_these_rows" and youden["balanced_accuracy"] == 0.75


def _isic2024_dir(tmp_path) -> Path:
    """train-metadata.csv (5 real rows: 3 malignant, 2 plain 'Benign') + an HDF5 of the 5 real tiles."""
    import h5py

    source = real_fixture("isic2024")
    tiles = sorted((source / "train-image" / "image").glob("*.jpg"))
    if not tiles or not (source / "train-metadata.sample5.csv").is_file():
        pytest.skip(f"ISIC 2024 sample tiles/metadata absent under {source}")
    d = tmp_path / "isic2024"
    d.mkdir()
    shutil.copyfile(source / "train-metadata.sample5.csv", d / "train-metadata.csv")
    with h5py.File(d / "train-image.hdf5", "w") as handle:
        for p in tiles:
            handle.create_dataset(p.stem, data=np.bytes_(p.read_bytes()))
    return d


def test_isic2024_protocol(trained, tmp_path):
    data = _isic2024_dir(tmp_path)
    base = ["--model", trained["model"], "--dataset", "isic2024", "--data_dir", str(data), "--n_bootstrap", "20"]

    optimistic = _run(base, tmp_path, "optimistic.json")
    binary = optimistic["binary"]
    assert binary["optimistic"] is True and "optimistic" in binary["threshold_source"]
    after = binary["after_temperature"]
    assert after["n_samples"] == 5 and after["n_positive"] == 3 and after["threshold_source"] == "youden_on_these_rows"
    for key in ("auroc", "balanced_accuracy", "ece", "brier"):
        assert after[key] is not None and 0.0 <= after[key] <= 1.0
        assert set(after["ci"]) >= {"auroc", "balanced_accuracy", "ece"}
    # 8-class metrics only on the 3 rows whose iddx_3 maps (SCC, SCC, BCC); the 2 plain "Benign" rows are excluded
    assert optimistic["multiclass"]["n_samples"] == 3 and optimistic["multiclass"]["n_excluded"] == 2
    assert optimistic["n_rows_with_fine_label"] == 3

    held_out = _run([*base, "--threshold_from", trained["data"]], tmp_path, "held_out.json")["binary"]
    assert held_out["optimistic"] is False and "validation" in held_out["threshold_source"]
    assert held_out["after_temperature"]["threshold_source"] == "given"
    assert held_out["after_temperature"]["auroc"] == pytest.approx(after["auroc"])  # the threshold moves no ranking

    fixed = _run([*base, "--threshold_from", "0.25"], tmp_path, "fixed.json")["binary"]
    assert fixed["after_temperature"]["threshold"] == 0.25 == fixed["before_temperature"]["threshold"]
    assert fixed["threshold_source"] == "given on the command line"


def test_isic2024_needs_test_split(trained, tmp_path):
    with pytest.raises(ValueError, match="--split test"):
        em.main(
            [
                "--model",
                trained["model"],
                "--dataset",
                "isic2024",
                "--data_dir",
                str(tmp_path),
                "--split",
                "validation",
            ]
        )


# ---------------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------------


def _parse_config(path):
    """Parse a train.py YAML strictly with train.py's parser. bf16 needs a GPU (TrainingArguments' post-init refuses it
    on this CPU), so it is checked in the file and switched off for the parse; every other key must map to a field."""
    from transformers import HfArgumentParser

    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments

    raw = yaml.safe_load(Path(path).read_text())
    parser = HfArgumentParser((ModelArguments, DataArguments, CFATrainingArguments))
    fields = {f for dc in parser.dataclass_types for f in dc.__dataclass_fields__}
    assert set(raw) <= fields, f"keys that are no argument: {set(raw) - fields}"
    try:
        return raw, parser.parse_yaml_file(os.path.abspath(path), allow_extra_keys=False)
    except ValueError as err:
        if "bf16" not in str(err):
            raise
    return raw, parser.parse_dict({**raw, "bf16": False}, allow_extra_keys=False)


def test_paper_config():
    raw, (model_args, data_args, training_args) = _parse_config(REPO_ROOT / "configs" / "paper.yaml")
    assert model_args.vision_model_name_or_path == "openai/clip-vit-large-patch14"
    assert model_args.decoder_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert model_args.load_in_4bit is True
    assert (model_args.lora_r, model_args.lora_alpha) == (64, 16)
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert training_args.optim.value.startswith("adamw") and training_args.learning_rate == 1e-4
    assert training_args.num_train_epochs == 20 and raw["bf16"] is True
    assert training_args.gradient_checkpointing is True
    assert data_args.dataset_name == "isic2019"
    assert training_args.lambda_gen == 0.5 and training_args.focal_loss_gamma == 2.0


def test_small_config():
    raw, (model_args, data_args, training_args) = _parse_config(REPO_ROOT / "configs" / "single_gpu_small.yaml")
    assert model_args.decoder_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_args.vision_model_name_or_path == "openai/clip-vit-base-patch16"
    assert model_args.load_in_4bit is False and raw["bf16"] is True
    assert data_args.dataset_name in ("isic2019", "synthetic", "derm7pt")


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if name == "fsdp":
        assert config.fsdp_config["fsdp_use_orig_params"] is True
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2_5_VLDecoderLayer"
