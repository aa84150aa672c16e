# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Argument dataclasses of `train.py` (parsed by `HfArgumentParser`, also from a YAML/JSON file)."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .validation import check_number

ABLATIONS = {
    # name: (use_focal, lambda_align, lambda_calibration); lambda_gen stays as set in every row (paper Table II)
    "ce_only": (False, 0.0, 0.0),
    "focal": (True, 0.0, 0.0),
    "focal_align": (True, None, 0.0),
    "focal_cal": (True, 0.0, None),
    "full": (True, None, None),
}

# --align_text value -> the dataset column holding each row's alignment text
ALIGN_TEXT_COLUMNS = {"report": "report", "label": "align_text"}


@dataclass
class ModelArguments:
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint (Hub id or dir), e.g. openai/clip-vit-large-patch14. Default: the tiny "
                  "demo components, written under --output_dir/../components if missing."},
    )
    decoder_name_or_path: str | None = field(
        default=None, metadata={"help": "Decoder checkpoint, e.g. Qwen/Qwen2.5-VL-7B-Instruct. Default: tiny demo decoder."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved SkinCLIP-VL (adapter dir or Hub repo) instead."}
    )
    projector_type: str = field(default="linear", metadata={"help": "'linear' or 'mlp'."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (paper: 16)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Decoder attention projections with LoRA."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the decoder language model in 4-bit NF4 (QLoRA)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager or flash_attention_2."})
    model_dtype: str | None = field(default=None, metadata={"help": "Component dtype: float32, bfloat16, float16."})

    def __post_init__(self):
        check_number("lora_r", self.lora_r, minimum=1, integer=True)
        check_number("lora_alpha", self.lora_alpha, above=0)
        check_number("lora_dropout", self.lora_dropout, minimum=0, below=1)
        if self.projector_type not in ("linear", "mlp"):
            raise ValueError(f"--projector_type must be 'linear' or 'mlp', got {self.projector_type!r}.")


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="synthetic",
        metadata={"help": "A registered source with a train split: synthetic, isic2019, derm7pt, csv, ham10000, pad_ufes_20."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Raw data folder (synthetic: generated if missing)."})
    synthetic_num_images: int = field(default=1000, metadata={"help": "Synthetic images to generate."})
    synthetic_seed: int | None = field(
        default=None, metadata={"help": "Synthetic generation seed (the split has --seed_split). Default: the data "
                                "folder's generation, else 0."},
    )
    synthetic_test_per_class: int | None = field(
        default=None, metadata={"help": "Synthetic: a class-balanced test split of at least this many images per class "
                                "(added to the long-tailed mix; the train split keeps the mix). 0: a 10% split. "
                                "Default: the data folder's generation, else 0."},
    )
    synthetic_validation_per_class: int | None = field(
        default=None, metadata={"help": "Synthetic: the same for validation."}
    )
    seed_split: int = field(default=0, metadata={"help": "Split seed (group-level, stratified)."})
    train_fraction: float = field(default=1.0, metadata={"help": "Share of training lesion groups kept (paper: 0.12)."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate rationales so sequences fit this length."})
    augment: bool = field(default=False, metadata={"help": "Random flips/rotations (switches the feature cache off)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap evaluation rows (debugging)."})
    # own data (dataset_scripts.own_data): the model's classes are the data's class list
    csv: str | None = field(default=None, metadata={"help": "csv: the CSV file, one row per image."})
    image_dir: str | None = field(default=None, metadata={"help": "csv: the image folder (default --data_dir)."})
    image_column: str | None = field(default=None, metadata={"help": "csv: the column naming the image file."})
    label_column: str | None = field(default=None, metadata={"help": "csv: the column with the diagnosis."})
    group_column: str | None = field(default=None, metadata={"help": "csv: lesion id column (lesion-level splits)."})
    patient_column: str | None = field(default=None, metadata={"help": "csv: patient id column (patient-level splits)."})
    age_column: str | None = field(default=None, metadata={"help": "csv: age column."})
    sex_column: str | None = field(default=None, metadata={"help": "csv: sex column."})
    site_column: str | None = field(default=None, metadata={"help": "csv: anatomical site column."})
    label_map: str | None = field(
        default=None, metadata={"help": 'JSON {"raw label": "class" or null} (csv, ham10000, pad_ufes_20).'}
    )
    class_labels: list[str] | None = field(
        default=None, metadata={"help": "The class list in head order (csv, ham10000, pad_ufes_20; default: the data's)."}
    )

    def __post_init__(self):
        check_number("synthetic_num_images", self.synthetic_num_images, minimum=1, integer=True)
        check_number("seed_split", self.seed_split, minimum=0, integer=True)
        check_number("train_fraction", self.train_fraction, above=0, maximum=1)
        check_number("max_length", self.max_length, minimum=1, integer=True, optional=True)
        check_number("max_eval_samples", self.max_eval_samples, minimum=1, integer=True, optional=True)


@dataclass
class CFATrainingArguments(TrainingArguments):
    lambda_align: float = field(default=1.0, metadata={"help": "Weight of the alignment (InfoNCE) loss."})
    lambda_calibration: float = field(
        default=1.0, metadata={"help": "Weight of the calibration loss (multi-class Brier score of the class head)."}
    )
    lambda_gen: float = field(default=0.5, metadata={"help": "Weight of the rationale LM loss (paper best: 0.5)."})
    lambda_ground: float = field(
        default=0.0,
        metadata={"help": "Weight of the weakly supervised term-to-patch grounding loss (report terms only; 0: the "
                  "paper's loss)."},
    )
    focal_loss_gamma: float = field(default=2.0, metadata={"help": "Focal focusing parameter."})
    use_focal: bool = field(default=True, metadata={"help": "False: plain cross-entropy (CE-only ablation)."})
    focal_loss_alpha_mode: str = field(
        default="inverse", metadata={"help": "Class weights from training counts: inverse, effective or none."}
    )
    ablation: str | None = field(
        default=None, metadata={"help": f"Paper Table II row: {', '.join(ABLATIONS)} (overrides use_focal/lambdas)."}
    )
    cache_vision_features: bool = field(
        default=True, metadata={"help": "Compute frozen CLIP patch features and text embeddings once (off with augment)."}
    )
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Where the feature cache lives."})
    align_text: str = field(
        default="report",
        metadata={"help": "Alignment target of L_align: 'report' (each image's own report, the paper's ground-truth "
                  "text: Derm7pt checklist, synthetic criteria) or 'label' (the class description sentence)."},
    )
    align_against_all_texts: bool = field(
        default=False, metadata={"help": "Contrast each image against all distinct alignment texts (cached bank)."}
    )
    gather_align_embeddings: bool = field(
        default=True, metadata={"help": "Gather alignment embeddings across processes for the InfoNCE batch."}
    )
    fit_temperature: bool = field(default=True, metadata={"help": "Fit post-hoc temperature on validation."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the final test CIs."})

    def __post_init__(self):
        if self.ablation is not None:
            if self.ablation not in ABLATIONS:
                raise ValueError(f"ablation={self.ablation!r} is not one of {list(ABLATIONS)}.")
            use_focal, lambda_align, lambda_calibration = ABLATIONS[self.ablation]
            self.use_focal = use_focal
            self.lambda_align = self.lambda_align if lambda_align is None else lambda_align
            self.lambda_calibration = self.lambda_calibration if lambda_calibration is None else lambda_calibration
        for name in ("lambda_align", "lambda_calibration", "lambda_gen", "focal_loss_gamma"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("n_bootstrap", self.n_bootstrap, minimum=0, integer=True)
        check_number("learning_rate", self.learning_rate, above=0)
        check_number("num_train_epochs", self.num_train_epochs, minimum=0)
        check_number("weight_decay", self.weight_decay, minimum=0)
        check_number("max_grad_norm", self.max_grad_norm, minimum=0)
        check_number("warmup_ratio", getattr(self, "warmup_ratio", None), minimum=0, maximum=1, optional=True)
        check_number("gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1, integer=True)
        check_number("per_device_train_batch_size", self.per_device_train_batch_size, minimum=1, integer=True)
        check_number("per_device_eval_batch_size", self.per_device_eval_batch_size, minimum=1, integer=True)
        if self.align_text not in ALIGN_TEXT_COLUMNS:
            raise ValueError(f"align_text={self.align_text!r}: use one of {list(ALIGN_TEXT_COLUMNS)}.")
        if self.focal_loss_alpha_mode not in ("inverse", "effective", "none"):
            raise ValueError(
                f"focal_loss_alpha_mode={self.focal_loss_alpha_mode!r}: use 'inverse', 'effective' or 'none'."
            )
        super().__post_init__()


__all__ = ["ModelArguments", "DataArguments", "CFATrainingArguments", "ABLATIONS", "ALIGN_TEXT_COLUMNS", "check_number"]
