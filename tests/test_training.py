"""CFATrainer: large-batch-exact loss under gradient accumulation, the feature cache, resume, and a real 2-process launch."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.arguments import ABLATIONS, CFATrainingArguments, DataArguments, ModelArguments

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_components):
    """A folder for the runs of this module (`data/synthetic/` is shared); the tiny components are named explicitly."""
    root = tmp_path_factory.mktemp("train")
    (root / "components.json").write_text(json.dumps(tiny_components))
    return root


def components(workspace) -> dict:
    return json.loads((workspace / "components.json").read_text())


def make_args(workspace, name, **overrides):
    data_args = DataArguments(
        dataset_name="synthetic", synthetic_num_images=overrides.pop("num_images", 64),
        data_dir=str(workspace / "data" / "synthetic"),
    )
    model_args = ModelArguments(
        vision_model_name_or_path=components(workspace)["vision"],
        decoder_name_or_path=components(workspace)["decoder"], lora_r=4, lora_alpha=8, lora_dropout=0.0,
    )
    defaults = dict(
        output_dir=str(workspace / name), report_to="none", seed=0, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, save_strategy="no",
        eval_strategy="no", logging_steps=1, dataloader_num_workers=0, n_bootstrap=20, disable_tqdm=True,
        per_device_eval_batch_size=16, use_cpu=True,
    )
    defaults.update(overrides)
    return model_args, data_args, CFATrainingArguments(**defaults)


def trainable_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_one_large_batch(workspace):
    from train import build_trainer

    states = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer, _ = build_trainer(*make_args(
            workspace, f"ga{batch}x{accumulation}", per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, lambda_align=0.0,
        ))
        before = trainable_state(trainer)
        trainer.train()
        after = trainable_state(trainer)
        states.append({n: after[n] - before[n] for n in before})
    large, accumulated = states
    assert any(delta.abs().max() > 1e-6 for delta in large.values()), "the step did not change any weight"
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_accumulation_token_weighting_matters(workspace):
    """Control: naive per-micro-batch means (the bug the trainer avoids) would not match; the rationale lengths differ."""
    from train import build_trainer

    trainer, context = build_trainer(*make_args(workspace, "tokens", per_device_train_batch_size=4, max_steps=1))
    rows = [context["data"]["train"][i] for i in range(4)]
    batch = context["collator"]("train")(rows)
    tokens = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert len(set(tokens.tolist())) > 1, "all rationales have the same length: the GA test would not discriminate"


def test_feature_cache_matches_uncached_losses(workspace, tmp_path):
    from train import build_trainer
    from trainer.collator import FeatureCache, SkinCLIPVLCollator

    trainer, context = build_trainer(*make_args(workspace, "cache", per_device_train_batch_size=4, max_steps=1,
                                                cache_vision_features=False))
    model, processor, data = context["model"], context["processor"], context["data"]
    split = data["validation"]  # load_data gives every split a row_index column (and undecoded images)
    cache = FeatureCache(tmp_path / "cache", model, processor, dtype="float32")
    features = cache.image_features(split, split._fingerprint)
    texts = cache.text_embeddings(split["align_text"])
    assert cache.image_features(split, split._fingerprint) is not None  # second call is a cache hit
    rows = [split[i] for i in range(min(6, len(split)))]
    cached = SkinCLIPVLCollator(processor, image_features=features, text_embeddings=texts)(rows)
    plain = SkinCLIPVLCollator(processor)(rows)
    assert "pixel_values" in plain and "pixel_values" not in cached and "image_features" in cached
    trainer.model.eval()
    with torch.no_grad():
        trainer.pop_loss_terms("eval")
        loss_cached, out_cached = trainer.compute_loss(trainer.model, cached, return_outputs=True)
        terms_cached = trainer.pop_loss_terms("eval")
        loss_plain, out_plain = trainer.compute_loss(trainer.model, plain, return_outputs=True)
        terms_plain = trainer.pop_loss_terms("eval")
    torch.testing.assert_close(loss_cached, loss_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_cached.class_logits, out_plain.class_logits, atol=1e-5, rtol=1e-5)
    assert set(terms_plain) == {"focal_loss", "align_loss", "calibration_loss", "gen_loss", "ground_loss"}
    assert terms_plain["ground_loss"] == 0.0  # lambda_ground defaults to 0
    for name in terms_plain:
        assert abs(terms_cached[name] - terms_plain[name]) < 1e-5, name
    assert terms_plain["align_loss"] > 0 and terms_plain["gen_loss"] > 0


def test_ablation_switches(workspace):
    assert set(ABLATIONS) == {"ce_only", "focal", "focal_align", "focal_cal", "full"}
    ce = make_args(workspace, "abl", ablation="ce_only")[2]
    assert (ce.use_focal, ce.lambda_align, ce.lambda_calibration, ce.lambda_gen) == (False, 0.0, 0.0, 0.5)
    focal_cal = make_args(workspace, "abl", ablation="focal_cal", lambda_calibration=0.7)[2]
    assert (focal_cal.use_focal, focal_cal.lambda_align, focal_cal.lambda_calibration) == (True, 0.0, 0.7)
    with pytest.raises(ValueError, match="nonsense"):
        make_args(workspace, "abl", ablation="nonsense")


def test_initialisation_does_not_depend_on_a_first_run_setup(workspace, monkeypatch):
    """A first `make demo` builds the components and generates the data (global RNG draws) before the model exists; a
    later run finds them on disk. Both must start from the same weights (the demo is compared bit for bit)."""
    import train

    model_args, data_args, training_args = make_args(workspace, "init")
    later = trainable_state(train.build_trainer(model_args, data_args, training_args)[0])
    resolve = train.resolve_components

    def first_run_setup(*args, **kwargs):
        torch.rand(1000), np.random.rand(10), random.random()  # what building and pretraining components draws
        return resolve(*args, **kwargs)

    monkeypatch.setattr(train, "resolve_components", first_run_setup)
    first = trainable_state(train.build_trainer(model_args, data_args, training_args)[0])
    assert first.keys() == later.keys() and any("lora_A" in name for name in first)
    for name in first:
        assert torch.equal(first[name], later[name]), name


def test_resume_from_checkpoint_reaches_the_same_weights(workspace):
    from train import build_trainer

    common = dict(per_device_train_batch_size=4, max_steps=6, save_strategy="steps", save_steps=3, optim="adamw_torch",
                  learning_rate=5e-3, lr_scheduler_type="linear")
    trainer, _ = build_trainer(*make_args(workspace, "resume_full", **common))
    trainer.train()
    full = trainable_state(trainer)
    checkpoint = workspace / "resume_full" / "checkpoint-3"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "optimizer.pt").is_file()

    trainer, _ = build_trainer(*make_args(workspace, "resume_again", **common))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    resumed = trainable_state(trainer)
    changed = [n for n in full if not torch.allclose(full[n], resumed[n], atol=1e-6)]
    assert not changed, f"resumed run differs in {changed[:5]}"


def test_run_writes_model_and_metrics(workspace):
    from train import run

    report = run(*make_args(workspace, "run", per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
                            optim="adamw_torch"))
    out = workspace / "run"
    for name in ("metrics.json", "reliability.png", "confusion_matrix.png", "model/config.json",
                 "model/adapter/adapter_model.safetensors", "model/processor_config.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("test", "test_image_only"):
        for key in ("balanced_accuracy", "macro_auroc", "ece", "ece_before_temperature", "brier", "nll", "ci"):
            assert key in saved[split], (split, key)
    assert saved["temperature"] == pytest.approx(report["temperature"]) and saved["temperature"] > 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["calibration_temperature"] == pytest.approx(saved["temperature"])


def test_two_process_ddp_launch(workspace):
    """A real 2-process DDP (gloo) launch of train.py with accelerate on CPU: both ranks train, one model is saved."""
    out = workspace / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train.py"),
        "--output_dir", str(out), "--data_dir", str(workspace / "data" / "synthetic"),
        "--vision_model_name_or_path", components(workspace)["vision"],
        "--decoder_name_or_path", components(workspace)["decoder"],
        "--synthetic_num_images", "64", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--lora_r", "4", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
        "--n_bootstrap", "10", "--disable_tqdm", "true", "--use_cpu", "true",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}_train.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert (out / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list(out.rglob("adapter_model.safetensors"))) == 1


def test_alignment_against_all_distinct_texts(workspace):
    """The bank option contrasts each image against every distinct alignment text (cached frozen embeddings)."""
    from train import build_trainer

    trainer, context = build_trainer(*make_args(workspace, "bank", per_device_train_batch_size=4, max_steps=1,
                                                align_against_all_texts=True))
    bank = trainer.text_bank
    column = trainer.data_collator.align_text_column  # the texts this run aligns with (--align_text)
    distinct = {t for split in context["data"].values() for t in split[column]}
    assert bank["embeds"].shape[0] == len(distinct) > 4  # more texts than one batch holds
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "align_loss" in entry]
    assert logged and logged[0]["align_loss"] > 0


def test_augmentation_switches_the_feature_cache_off(workspace, caplog):
    from train import build_trainer

    model_args, data_args, training_args = make_args(workspace, "augment", per_device_train_batch_size=4, max_steps=1)
    data_args.augment = True
    with caplog.at_level("WARNING"):
        trainer, _ = build_trainer(model_args, data_args, training_args)
    assert trainer.data_collator.image_features is None and trainer.data_collator.augment
    assert any("feature cache is off" in record.getMessage() for record in caplog.records)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert "pixel_values" in batch and "image_features" not in batch


def test_push_to_hub_is_refused_before_training(workspace):
    """Local component paths cannot be rebuilt from the Hub: train.py refuses before spending time on training."""
    from train import build_trainer

    with pytest.raises(ValueError, match="hub_model_id"):
        build_trainer(*make_args(workspace, "push", max_steps=1, push_to_hub=True))
    with pytest.raises(ValueError, match="vision_model_name_or_path"):
        build_trainer(*make_args(workspace, "push", max_steps=1, push_to_hub=True, hub_model_id="org/adapter"))


def test_evaluation_reads_the_validation_features(workspace):
    """Evaluation inside training uses the cached features of the validation rows (not the training rows')."""
    from train import build_trainer
    from trainer.collator import SkinCLIPVLCollator

    trainer, context = build_trainer(*make_args(workspace, "evalcache", per_device_train_batch_size=4, max_steps=1,
                                                per_device_eval_batch_size=8))
    assert trainer.eval_data_collator is not trainer.data_collator
    metrics = trainer.evaluate()
    validation = context["data"]["validation"]
    # pixels and CLIP tokens: no cache involved (the same alignment texts as the run)
    plain = SkinCLIPVLCollator(context["processor"], align_text_column=trainer.data_collator.align_text_column)
    total, count = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(validation), 8):
            rows = [validation[i] for i in range(start, min(start + 8, len(validation)))]
            total += float(trainer.compute_loss(trainer.model, plain(rows))) * len(rows)
            count += len(rows)
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-3)
    assert "eval_balanced_accuracy" in metrics
    logged = trainer.state.log_history[-1]  # each CFA term is logged with the eval_ prefix
    assert {"eval_focal_loss", "eval_align_loss", "eval_calibration_loss", "eval_gen_loss"} <= set(logged)
