#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune SkinCLIP-VL with the CFA loss.

    python train.py                                  # the demo preset (synthetic data, tiny components, 2 CPU cores)
    python train.py configs/paper.yaml               # arguments from a YAML/JSON file
    python train.py --dataset_name isic2019 --data_dir /data/isic2019 --vision_model_name_or_path ... --output_dir ...
    python train.py --dataset_name pad_ufes_20 --data_dir /data/PAD-UFES-20 --output_dir ...   # its 6 classes
    accelerate launch train.py configs/paper.yaml    # the same, on many devices

Writes `OUTPUT_DIR/model/` (adapter-style model directory, loadable with `AutoModel.from_pretrained(...,
trust_remote_code=True)`), `metrics.json`, `reliability.png`, `confusion_matrix.png` and the Trainer logs.
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from trainer.arguments import ALIGN_TEXT_COLUMNS, CFATrainingArguments, DataArguments, ModelArguments
from trainer.cfa_trainer import CFATrainer
from trainer.collator import FeatureCache, SkinCLIPVLCollator, count_align_truncations
from trainer.evaluation import build_compute_metrics, collect_logits, write_report
from trainer.losses import CFALoss, class_balanced_alpha

OWN_DATA_OPTIONS = ("csv", "image_dir", "image_column", "label_column", "group_column", "patient_column", "age_column",
                    "sex_column", "site_column", "label_map", "class_labels")

logger = logging.getLogger("train")

DEMO_PRESET = {
    "output_dir": "outputs/demo",
    "dataset_name": "synthetic",
    "synthetic_num_images": 2000,
    "synthetic_test_per_class": 60,  # rare classes measured on 60+ test images each, not 2
    "synthetic_validation_per_class": 30,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "num_train_epochs": 10,
    "max_grad_norm": 5.0,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-3,
    "warmup_steps": 20,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.0,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "load_best_model_at_end": True,  # keep the epoch with the best validation balanced accuracy
    "metric_for_best_model": "balanced_accuracy",
    "greater_is_better": True,
    "logging_steps": 10,
    "report_to": "none",
    "seed": 0,
    "dataloader_num_workers": 0,
    "n_bootstrap": 1000,
}


def parse_args(argv):
    parser = HfArgumentParser((ModelArguments, DataArguments, CFATrainingArguments))
    if not argv:
        logger.warning("No arguments: running the demo preset (synthetic data, tiny random components).")
        return parser.parse_dict(DEMO_PRESET)
    if argv[0].endswith((".yaml", ".yml", ".json")):
        # a config file, optionally followed by command-line overrides: train.py configs/paper.yaml --data_dir ...
        path = Path(argv[0]).resolve()
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            import yaml

            values = yaml.safe_load(path.read_text()) or {}
        known = {f.dest for f in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown argument(s) {unknown}")
        parser.set_defaults(**values)
        # a required argument given in the file no longer needs the command line
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        argv = argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def resolve_components(model_args, training_args):
    """Hub ids / dirs of the components; the tiny demo components are written on first use (main process first)."""
    if model_args.vision_model_name_or_path and model_args.decoder_name_or_path:
        return model_args.vision_model_name_or_path, model_args.decoder_name_or_path
    from tools.demo_components import ensure_demo_components  # tiny components, briefly pretrained on other images

    root = Path(training_args.output_dir).parent / "components"
    with training_args.main_process_first(desc="writing tiny components"):
        paths = ensure_demo_components(root)
    return (
        model_args.vision_model_name_or_path or paths["vision"],
        model_args.decoder_name_or_path or paths["decoder"],
    )


def load_data(data_args, training_args):
    """The three splits of `--dataset_name` (rows with a fine class), images left undecoded for the one image loader.

    Raises a `ValueError` before any model is built when a source needs `--data_dir` and has none, or when a split
    is empty; warns with the per-split class counts when a class is absent from the training split."""
    import dataset_scripts

    name = data_args.dataset_name
    source = dataset_scripts.get_dataset_source(name)
    if "train" not in source.splits:
        names = dataset_scripts.dataset_names()
        trainable = [n for n in names if "train" in dataset_scripts.get_dataset_source(n).splits]
        raise ValueError(f"--dataset_name {name!r} has only {list(source.splits)}: train on one of {trainable}.")
    data_dir = data_args.data_dir
    if data_dir is None and source.requires_data_dir:
        raise ValueError(f"--data_dir is required for --dataset_name {name} (the folder of the raw download).")
    if data_dir is None:  # generated data go beside the run
        data_dir = str(Path(training_args.output_dir).parent / "data" / name)
    own_data = {key: getattr(data_args, key) for key in OWN_DATA_OPTIONS}
    with training_args.main_process_first(desc="loading data"):
        data, summary = dataset_scripts.load(
            name, data_dir, seed_split=data_args.seed_split, train_fraction=data_args.train_fraction,
            synthetic_num_images=data_args.synthetic_num_images, synthetic_seed=data_args.synthetic_seed,
            synthetic_test_per_class=data_args.synthetic_test_per_class,
            synthetic_validation_per_class=data_args.synthetic_validation_per_class, **own_data,
        )
    for split in ("train", "validation", "test"):
        if split not in data:
            raise ValueError(f"Dataset {name!r} has no {split!r} split.")
    # rows without a fine class cannot train the head
    data = data.filter(lambda label: label >= 0, input_columns="label")
    if data_args.max_eval_samples is not None:
        for split in ("validation", "test"):
            data[split] = data[split].select(range(min(len(data[split]), data_args.max_eval_samples)))
    check_class_counts(data, name)
    return index_rows(data, summary)


def index_rows(data, summary=None):
    """Images left undecoded (the collator decodes them with `processing_skinclip_vl.load_image`, so a failure names
    the row) and a `row_index` column (the feature cache's key) in every split; `summary` stays attached."""
    from datasets import Image as ImageFeature

    for split in data:
        if "image" in data[split].column_names:
            data[split] = data[split].cast_column("image", ImageFeature(decode=False))
        if "row_index" not in data[split].column_names:
            data[split] = data[split].add_column("row_index", list(range(len(data[split]))))
    data.summary = summary
    return data


def check_class_counts(data, name: str) -> None:
    """Log rows per split and class; `ValueError` for an empty split, a warning listing classes absent from train."""
    from dataset_scripts.schema import CLASS_NAMES

    class_names = list(getattr(data["train"].features["label"], "names", None) or CLASS_NAMES)  # a ClassLabel's own
    for split in ("train", "validation", "test"):
        labels = data[split]["label"]
        per_class = ", ".join(f"{c} {sum(1 for label in labels if label == i)}" for i, c in enumerate(class_names))
        logger.info(f"{split}: {len(labels)} rows ({per_class})")
        if not labels:
            raise ValueError(
                f"The {split!r} split of {name!r} is empty (no row with a class): give more data or other "
                "split fractions (e.g. prepare with --split_fractions) before training."
            )
    present = set(data["train"]["label"])
    absent = [c for i, c in enumerate(class_names) if i not in present]
    if absent:
        logger.warning(f"Class(es) {absent} absent from the training split of {name!r}: the head cannot learn them.")


def check_checkpoint(checkpoint) -> None:
    """Raise a `ValueError` naming the file when a checkpoint to resume from is missing or has a corrupt file
    (a safetensors header that does not parse, a torch zip archive that fails its CRC check, JSON that is not JSON)."""
    import zipfile

    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: the folder does not exist.")
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        problem = None
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:  # checks the header against the file size
                    handle.keys()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    problem = f"corrupt (entry {bad} fails its CRC check)"
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except Exception as err:  # noqa: BLE001 - every way a file can be unreadable is reported the same way
            problem = f"corrupt or truncated ({type(err).__name__}: {err})"
        if problem:
            raise ValueError(f"Cannot resume from {folder}: {path} is {problem}. Resume from another checkpoint.")


def fsdp_enabled(training_args) -> bool:
    """Whether this run is sharded with FSDP (`--fsdp ...`, or `accelerate launch` with an FSDP config)."""
    return bool(training_args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def build_model(model_args, training_args, vision, decoder, class_labels=None):
    from adapters_skinclip_vl import apply_lora
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from processing_skinclip_vl import SkinCLIPVLProcessor

    quantization_config = None
    if model_args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float32
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            # FSDP flattens and shards parameters of one dtype per unit: the packed 4-bit weights must then be stored
            # in the compute dtype (QLoRA + FSDP), not in uint8
            bnb_4bit_quant_storage=compute_dtype if fsdp_enabled(training_args) else torch.uint8,
        )
    if model_args.model_name_or_path:
        model = SkinCLIPVLForDiagnosis.from_pretrained(model_args.model_name_or_path, is_trainable=False)
        processor = SkinCLIPVLProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        model = SkinCLIPVLForDiagnosis.from_components(
            vision, decoder, quantization_config=quantization_config, dtype=model_args.model_dtype,
            attn_implementation=model_args.attn_implementation, projector_type=model_args.projector_type,
            class_labels=class_labels,
        )
        processor = SkinCLIPVLProcessor.from_components(vision, decoder)
    peft_model = apply_lora(
        model, r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules, gradient_checkpointing=training_args.gradient_checkpointing,
    )
    return peft_model, model, processor


def align_truncation_report(processor, data, dataset_name: str, column: str = "align_text") -> dict:
    """Alignment texts longer than CLIP's 77 positions, per split; one warning for the dataset (not one per sample)."""
    counts = {split: count_align_truncations(processor, data[split][column]) for split in data}
    total = sum(counts.values())
    if total:
        logger.warning(
            f"{dataset_name}: {total} of {sum(len(split) for split in data.values())} alignment texts exceed "
            f"{processor.align_max_length} CLIP tokens and are truncated ({counts})."
        )
    return counts


def build_trainer(model_args, data_args, training_args, data=None):
    """All the wiring: components, data, model + LoRA, feature cache, CFA loss, collators, `CFATrainer`.

    `data` (a `DatasetDict` with train / validation / test rows that all have a fine class) replaces loading it from
    `data_args` (bench/reproduce.py passes its own splits)."""
    set_seed(training_args.seed)
    vision, decoder = resolve_components(model_args, training_args)
    import dataset_scripts

    if data is None:
        data = load_data(data_args, training_args)
    else:
        data = index_rows(data, getattr(data, "summary", None))
    summary = getattr(data, "summary", None)
    align_column = ALIGN_TEXT_COLUMNS[training_args.align_text]
    # seeded again here: building components or generating data above draws from the global RNGs only on a first run,
    # and the new modules' and LoRA's initialisation must not depend on whether `outputs/` was empty
    set_seed(training_args.seed)
    # a new model takes the data's class list; a saved one keeps its own, and the data must fit it (error otherwise)
    peft_model, model, processor = build_model(
        model_args, training_args, vision, decoder, class_labels=dataset_scripts.class_names_of(data)
    )
    class_names = model.config.class_labels
    data = dataset_scripts.align_class_labels(data, class_names, f"the model ({model_args.model_name_or_path})")
    align_truncated = align_truncation_report(processor, data, data_args.dataset_name, align_column)

    use_cache = training_args.cache_vision_features and not data_args.augment
    if training_args.cache_vision_features and data_args.augment:
        logger.warning("Augmentation is on: the frozen-feature cache is off (every step runs the CLIP vision tower).")
    features, text_embeddings = {}, None
    if use_cache:
        cache_dir = training_args.feature_cache_dir or os.path.join(training_args.output_dir, "feature_cache")
        cache = FeatureCache(cache_dir, model, processor)
        with training_args.main_process_first(desc="feature cache"):
            for split in ("train", "validation", "test"):
                fingerprint = data[split]._fingerprint
                features[split] = cache.image_features(data[split], fingerprint, desc=f"CLIP features ({split})")
            all_texts = [t for split in data.values() for t in split[align_column]]
            text_embeddings = cache.text_embeddings(all_texts)
        logger.warning(f"Frozen CLIP features cached in {cache_dir} (the ViT runs once per image).")

    term_bank = None
    if training_args.lambda_ground > 0:
        # the grounding term's bank: the clinical terms the training reports name, embedded by the frozen CLIP text tower
        from processing_skinclip_vl import find_clinical_terms

        terms = sorted({term for report in data["train"]["report"] for term, _, _ in find_clinical_terms(report or "")})
        if len(terms) < 2:
            raise ValueError(f"--lambda_ground needs reports naming at least 2 clinical terms; the training reports name "
                             f"{terms}.")
        with torch.no_grad():
            term_bank = (terms, model.term_embeddings(terms, processor).cpu())
        logger.warning(f"Grounding term: {len(terms)} clinical terms from the training reports.")

    def collator(split, use_metadata=True, train=False):
        return SkinCLIPVLCollator(
            processor, image_features=features.get(split), text_embeddings=text_embeddings,
            use_metadata=use_metadata, augment=train and data_args.augment, max_length=data_args.max_length,
            seed=training_args.seed, term_vocabulary=term_bank[0] if term_bank is not None else None,
            align_text_column=align_column,
        )

    counts = [0] * len(class_names)
    for label in data["train"]["label"]:
        counts[label] += 1
    focal_loss_alpha = None if training_args.focal_loss_alpha_mode == "none" else class_balanced_alpha(
        counts, mode=training_args.focal_loss_alpha_mode
    )
    cfa_loss = CFALoss(
        focal_loss_alpha=focal_loss_alpha, focal_loss_gamma=training_args.focal_loss_gamma,
        lambda_align=training_args.lambda_align, lambda_calibration=training_args.lambda_calibration,
        lambda_gen=training_args.lambda_gen, use_focal=training_args.use_focal,
        lambda_ground=training_args.lambda_ground,
    )
    text_bank = None
    if training_args.align_against_all_texts:
        if text_embeddings is None:
            raise ValueError("--align_against_all_texts needs the feature cache (cache_vision_features, no augment).")
        texts = sorted(text_embeddings)
        text_bank = (texts, torch.stack([text_embeddings[t] for t in texts]))

    push_repo = training_args.hub_model_id if training_args.push_to_hub else None
    if training_args.push_to_hub:
        # fail before training, not after it
        from trainer.hub import check_hub_component_names

        if not push_repo:
            raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME (the adapter repo to create or update).")
        check_hub_component_names(model.config)
    training_args.push_to_hub = False  # the adapter layout is pushed at the end, not by the Trainer
    training_args.remove_unused_columns = False
    training_args.label_names = ["class_labels", "group_ids"]

    trainer = CFATrainer(
        model=peft_model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator("train", train=True),
        processing_class=processor,
        compute_metrics=build_compute_metrics(class_names),
        cfa_loss=cfa_loss,
        text_bank=text_bank,
        gather_align_embeddings=training_args.gather_align_embeddings,
        eval_data_collator=collator("validation"),
        term_bank=term_bank,
    )
    context = {
        "model": model, "processor": processor, "data": data, "collator": collator, "class_names": class_names,
        "push_repo": push_repo, "summary": summary, "align_text_truncated": align_truncated,
    }
    return trainer, context


def check_output_dir(output_dir) -> None:
    """A `ValueError` naming `output_dir` when it cannot be created or written."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--output_dir {output_dir}: cannot write there ({err.strerror or err}).") from None


def run(model_args, data_args, training_args):
    if training_args.resume_from_checkpoint:  # before any data or model is built
        check_checkpoint(training_args.resume_from_checkpoint)
    check_output_dir(training_args.output_dir)
    trainer, context = build_trainer(model_args, data_args, training_args)
    model, processor, data, collator = context["model"], context["processor"], context["data"], context["collator"]
    class_names, push_repo = context["class_names"], context["push_repo"]
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    rank = training_args.process_index
    with open(os.path.join(training_args.output_dir, f"rank{rank}_train.json"), "w") as handle:
        json.dump({"rank": rank, "world_size": training_args.world_size, "global_step": trainer.state.global_step,
                   "distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
                   "wrapped_model": type(trainer.model_wrapped).__name__,
                   "train_rows": len(data["train"]), **train_result.metrics}, handle)

    report = None
    if trainer.is_world_process_zero():
        batch = training_args.per_device_eval_batch_size
        validation = collect_logits(model, data["validation"], collator("validation"), batch, "validation")
        test = collect_logits(model, data["test"], collator("test"), batch, "test")
        test_image_only = collect_logits(model, data["test"], collator("test", use_metadata=False), batch, "test (image only)")
        report = write_report(
            training_args.output_dir, class_names, validation, test, test_image_only,
            n_boot=training_args.n_bootstrap, fit_on_validation=training_args.fit_temperature,
            extra={"dataset": data_args.dataset_name, "train_rows": len(data["train"]),
                   "align_text_truncated": context["align_text_truncated"],
                   "split_unit": context["summary"].settings.get("split_unit", "official split")
                   if context["summary"] is not None else "given splits"},
        )
        model.config.calibration_temperature = report["temperature"]
        model_dir = os.path.join(training_args.output_dir, "model")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        with open(os.path.join(model_dir, "metrics.json"), "w") as handle:
            json.dump(report, handle, indent=2)
        summary = {k: report["test"][k] for k in ("balanced_accuracy", "macro_auroc", "ece", "ece_before_temperature")}
        summary["image_only_balanced_accuracy"] = report["test_image_only"]["balanced_accuracy"]
        print(json.dumps({"temperature": report["temperature"], "test": summary}, indent=2))
        print(f"Saved the model to {model_dir} and metrics to {training_args.output_dir}/metrics.json")
        if push_repo:
            from trainer.hub import push_adapter_to_hub

            push_adapter_to_hub(model, processor, push_repo, metrics=report)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    model_args, data_args, training_args = parse_args(argv)
    run(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
