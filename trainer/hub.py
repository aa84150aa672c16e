# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""SkinCLIP-VL adapters on the Hugging Face Hub: the model card, the upload of the adapter layout, the checks that the
base components can be rebuilt from the Hub, adapter sizes (estimated on the meta device, measured on disk), and the
dataset card `dataset_scripts.prepare --push_to_hub` writes.

Training-side tooling: not remote code (a saved model does not carry `trainer/`). `SkinCLIPVLForDiagnosis.push_to_hub`
calls `push_adapter_to_hub` from here when the repository is importable.
"""

import copy
import json
import math
import os
import tempfile
from typing import Optional

import torch

from adapters_skinclip_vl import ADAPTER_SUBFOLDER, apply_lora, count_parameters
from configuration_skinclip_vl import KNOWN_MALIGNANT_CLASSES, SkinCLIPVLConfig, class_full_name
from modeling_skinclip_vl import SkinCLIPVLForDiagnosis


# ------------------------------------------------------------------ adapter size
def adapter_size_on_disk(directory) -> dict:
    """Measured bytes of a saved adapter: `{"adapter_model": ..., "adapter_dir": ...}` (`directory` is the model
    directory holding `adapter/`, or the `adapter/` folder itself)."""
    directory = str(directory)
    if os.path.isdir(os.path.join(directory, ADAPTER_SUBFOLDER)):
        directory = os.path.join(directory, ADAPTER_SUBFOLDER)
    files = [os.path.join(directory, name) for name in os.listdir(directory)]
    return {
        "adapter_model": os.path.getsize(os.path.join(directory, "adapter_model.safetensors")),
        "adapter_dir": sum(os.path.getsize(f) for f in files if os.path.isfile(f)),
    }


def estimate_adapter_size(config: Optional[SkinCLIPVLConfig] = None, dtype: torch.dtype = torch.float32) -> dict:
    r"""
    Parameters and bytes of the adapter (LoRA + `modules_to_save`) for `config` (default: the paper's, ViT-L/14 +
    Qwen2.5-VL-7B LM, LoRA r=64 on q_proj/v_proj), computed on the meta device: no weights are allocated.

    Returns:
        `dict` with `lora_parameters`, `modules_to_save_parameters`, `parameters`, `base_parameters` (the frozen rest),
        `bytes` (tensor data at `dtype` plus the safetensors header) and `dtype`.
    """
    from peft import get_peft_model_state_dict

    config = copy.deepcopy(config if config is not None else SkinCLIPVLConfig())
    with torch.device("meta"):
        model = SkinCLIPVLForDiagnosis(config)
        peft_model = apply_lora(model, verbose=False)
    state = get_peft_model_state_dict(peft_model)
    lora = sum(v.numel() for k, v in state.items() if "lora_" in k)
    saved = sum(v.numel() for k, v in state.items() if "lora_" not in k)
    total = sum(p.numel() for p in peft_model.parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    dtype_name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, str(dtype))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, value in state.items():
        size = value.numel() * itemsize
        header[f"base_model.model.{key}"] = {"dtype": dtype_name, "shape": list(value.shape),
                                             "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode())
    return {
        "lora_parameters": lora,
        "modules_to_save_parameters": saved,
        "parameters": lora + saved,
        "base_parameters": total - lora - saved,
        "bytes": offset + 8 + header_bytes + (-header_bytes % 8),
        "dtype": str(dtype).replace("torch.", ""),
    }


# ------------------------------------------------------------------ Hub
def _looks_local(name) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(name)
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def check_hub_component_names(config) -> None:
    """Raise a `ValueError` when the component names an adapter repo would be rebuilt from are local paths."""
    bad = [(k, getattr(config, k)) for k in ("vision_model_name_or_path", "decoder_name_or_path")
           if _looks_local(getattr(config, k))]
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in bad)
        raise ValueError(
            f"Refusing to push: the base components are local paths ({listed}), so nobody could rebuild the base from "
            "the Hub. Set them to the Hub ids of the same checkpoints first, e.g. "
            "`model.config.vision_model_name_or_path = 'openai/clip-vit-large-patch14'` and "
            "`model.config.decoder_name_or_path = 'Qwen/Qwen2.5-VL-7B-Instruct'`."
        )


# The terms of each registered data source, as the cards state them: (Hub licence id, the words, citation / source).
# Source: the datasets' own release pages (ISIC archive, Harvard Dataverse, Mendeley Data, the Derm7pt release README).
DATA_TERMS = {
    "isic2019": ("cc-by-nc-4.0", "ISIC 2019 challenge training data (BCN20000, HAM10000, MSK): CC BY-NC 4.0, "
                 "non-commercial use only, attribution required", "https://challenge.isic-archive.com/data/#2019"),
    "ham10000": ("cc-by-nc-sa-4.0", "HAM10000: CC BY-NC-SA 4.0, non-commercial use only, attribution and share-alike "
                 "required", "Tschandl et al., Sci Data 5, 180161 (2018), doi:10.7910/DVN/DBW86T"),
    "pad_ufes_20": ("cc-by-4.0", "PAD-UFES-20: CC BY 4.0, attribution required",
                    "Pacheco et al., Data in Brief 32, 106221 (2020), doi:10.17632/zr7vgbcyr2.1"),
    "derm7pt": ("other", "Derm7pt: academic research use only, images may not be redistributed (non-commercial)",
                "Kawahara et al., IEEE JBHI 2019, https://derm.cs.sfu.ca"),
    "isic2024": ("cc-by-nc-4.0", "ISIC 2024 (SLICE-3D): CC BY-NC 4.0, non-commercial use only, attribution required",
                 "https://challenge2024.isic-archive.com"),
    "synthetic": ("apache-2.0", "procedurally generated by dataset_scripts/synthetic.py, no clinical data",
                  "this repository"),
}
UNKNOWN_DATA_TERMS = ("other", "set by the data owner (not recorded): check the terms before sharing or using it",
                      "the user's own data")


def data_terms(dataset_name: Optional[str]) -> tuple:
    """`(licence id, terms in words, source)` of a registered data source (`UNKNOWN_DATA_TERMS` for others)."""
    return DATA_TERMS.get(str(dataset_name), UNKNOWN_DATA_TERMS)


CARD_METRICS = ("balanced_accuracy", "macro_auroc", "ece", "ece_before_temperature", "brier", "nll", "auroc")


def _card_metrics(metrics: dict) -> dict:
    """The headline metric values of a `metrics.json` (per split: `test/balanced_accuracy`, ...), never the counts,
    CIs or per-class tables that the file also holds."""

    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}/{m}": float(value[m]) for m in CARD_METRICS if number(value.get(m))})
        elif key in CARD_METRICS and number(value):
            out[key] = float(value)
    return out


def _read_metrics(metrics) -> dict:
    if metrics is None:
        return {}
    if isinstance(metrics, (str, os.PathLike)):
        with open(metrics, encoding="utf-8") as handle:
            metrics = json.load(handle)
    return dict(metrics)


def build_model_card(model, repo_id: str, metrics=None, adapter_dir=None, license: str = "apache-2.0",
                     dataset_name: Optional[str] = None, datasets: Optional[list] = None) -> str:
    r"""
    The `README.md` of an adapter repo, following the Hub's conventions for an adapter on a composite base: YAML front
    matter (`license`, `base_model` = both component ids, `library_name`, `pipeline_tag`, `tags`, `datasets`, metrics
    from `metrics` (a dict or a `metrics.json` path) as `model-index` results) and a body with the model's class names,
    the training data and its terms (non-commercial where the data are), the intended use, the limitations, that it is
    not a medical device, and the computed parameter counts and adapter size (measured from `adapter_dir` when given).

    Args:
        dataset_name (`str`, *optional*): the registered source it was trained / evaluated on (default: the
            `dataset` of `metrics`); its terms are quoted (`DATA_TERMS`).
        datasets (`list[str]`, *optional*): Hub dataset ids for the `datasets` front-matter field (default: the
            `dataset_name`).
    """
    from huggingface_hub import EvalResult, ModelCardData

    config = model.config
    raw = _read_metrics(metrics)
    known_dataset = dataset_name or raw.get("dataset")
    dataset_name = known_dataset or "held-out evaluation split"
    terms = data_terms(known_dataset) if known_dataset else UNKNOWN_DATA_TERMS
    values = _card_metrics({k: v for k, v in raw.items() if k != "dataset"})
    eval_results = [
        EvalResult(task_type="image-classification", dataset_type=str(dataset_name), dataset_name=str(dataset_name),
                   metric_type=name.replace("/", "_"), metric_value=round(value, 6), metric_name=name)
        for name, value in values.items()
    ]
    base_models = [config.vision_model_name_or_path, config.decoder_name_or_path]
    card_data = ModelCardData(
        license=license,
        base_model=base_models,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["skinclip-vl", "dermatology", "medical", "skin-lesion-classification", "vision-language", "lora", "peft",
              "custom_code", "medical-imaging"],
        datasets=list(datasets) if datasets else ([str(known_dataset)] if known_dataset else None),
        metrics=sorted({name.split("/")[-1] for name in values}) or None,
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    _, total = count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    saved = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    size_line = ""
    if adapter_dir is not None:
        sizes = adapter_size_on_disk(adapter_dir)
        size_line = f"- Adapter file `adapter/adapter_model.safetensors`: {sizes['adapter_model']:,} bytes " \
                    f"({sizes['adapter_model'] / 2**20:.2f} MiB).\n"
    metrics_table = ""
    if values:
        rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in values.items())
        metrics_table = f"\n## Evaluation\n\nOn {dataset_name} (from `metrics.json`):\n\n| metric | value |\n|---|---|\n{rows}\n"
    class_names = config.class_labels
    labels = ", ".join(f"{v} ({class_full_name(v)})" for v in class_names)
    malignant = [c for c in class_names if c in KNOWN_MALIGNANT_CLASSES]
    score = f"a malignancy score {'+'.join(f'P({c})' for c in malignant)}, " if malignant else ""
    body = f"""
# {repo_id.split("/")[-1]}

A SkinCLIP-VL LoRA adapter for skin-lesion diagnosis from a lesion image and patient
metadata: calibrated probabilities over {config.num_labels} classes ({labels}), {score}and a short rationale whose
clinical terms are grounded in image regions.

This repository holds only the adapter (`adapter/`: LoRA on the decoder's {", ".join(config.lora_target_modules)},
r={config.lora_r}, lora_alpha={config.lora_alpha}, plus the trained projector, focal pooling, CLS embedding, classifier
and logit scale), the remote code and the processor files. The frozen base is rebuilt from its two components:

- vision and alignment text towers: [`{base_models[0]}`](https://huggingface.co/{base_models[0]})
- decoder language model: [`{base_models[1]}`](https://huggingface.co/{base_models[1]})

## Usage

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
result = model.diagnose("lesion.jpg", metadata={{"age": 55, "sex": "female", "site": "anterior torso"}},
                        processor=processor)[0]
print(result.probabilities, result.rationale, [t.term for t in result.grounded_terms])
```

## Size (computed from this checkpoint)

- Parameters of the assembled model: {total:,}; in the adapter: {lora + saved:,} ({lora:,} LoRA, {saved:,} in
  `modules_to_save`): the trained ones, everything else is the frozen base.
{size_line}- Calibration temperature applied at inference: {config.calibration_temperature:g}.
{metrics_table}
## Training data and terms

- Data: {dataset_name} ({terms[2]}).
- Data terms: {terms[1]}. The adapter is released under {license} as code and weights, but it was trained on these
  data: where their terms are non-commercial (CC BY-NC, research-only), so is any use of this adapter that relies on
  them.

## Intended use

Research on trustworthy, explainable skin-lesion classification: benchmarking, studying calibration and visual
grounding, and as a starting point for further fine-tuning. Outputs are meant to be reviewed by qualified people.

## Limitations

- **Not a medical device.** It is not cleared or approved for clinical use and must not be used to diagnose, treat or
  triage patients.
- Trained on the data above only (synthetic data for demo checkpoints); performance on other devices, image types,
  populations and skin tones is unknown and may be much worse.
- Rationales are generated text and can be wrong or disagree with the classification head (a warning is raised);
  attention heatmaps show where the decoder looked, not a causal explanation.
- The {config.num_labels} classes do not cover every skin condition; an out-of-scope lesion still receives one of them.
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


def push_adapter_to_hub(model, processor, repo_id: str, metrics=None, *, private: Optional[bool] = None,
                        token=None, revision: Optional[str] = None, commit_message: Optional[str] = None,
                        create_pr: bool = False, license: str = "apache-2.0", dataset_name: Optional[str] = None):
    r"""
    Upload DESIGN.md's adapter layout to `repo_id`: `config.json` (with `auto_map` and the component names),
    `generation_config.json`, the three remote-code files, `adapter/` (LoRA + `modules_to_save`), the processor files
    (when `processor` is given) and a model card `README.md`. Never the frozen base weights. Refused while the component
    names are local paths. `metrics`: a dict or a `metrics.json` path, quoted in the card.

    Returns:
        the `CommitInfo` of `HfApi.upload_folder`.
    """
    from huggingface_hub import HfApi

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not model.has_adapter():
        raise ValueError("push_adapter_to_hub needs a model with a LoRA adapter (`apply_lora` or a loaded adapter).")
    check_hub_component_names(model.config)
    with tempfile.TemporaryDirectory(prefix="skinclip-vl-push-") as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        weights = [n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".pt"))]
        if weights:  # the base must never be uploaded
            raise RuntimeError(f"Unexpected weight files at the top of the adapter layout: {weights}.")
        card = build_model_card(model, repo_id, metrics, adapter_dir=folder, license=license,
                                dataset_name=dataset_name)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload SkinCLIP-VL adapter",
            create_pr=create_pr,
        )


# ------------------------------------------------------------------ dataset card (prepare --push_to_hub)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def build_dataset_card(summary, repo_id: str, license: Optional[str] = None) -> str:
    r"""
    The `README.md` of a prepared dataset repo: YAML front matter (`license`, `task_categories`, `tags`,
    `size_categories`, `pretty_name`) and a body with the source, the licence and its terms, the split unit, rows per
    split, the class mix per split, and every exclusion / skip of the load (`LoadSummary`).

    Args:
        summary (`LoadSummary` or its `to_dict()`): what `dataset_scripts.load` read.
        repo_id (`str`): the dataset repo.
        license (`str`, *optional*): a Hub licence id; default: the source's (`DATA_TERMS`).
    """
    from huggingface_hub import DatasetCardData

    info = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    name = info.get("dataset")
    licence_id, terms, source = data_terms(name)
    settings = info.get("settings", {})
    source = settings.get("source") if name not in DATA_TERMS and settings.get("source") else source
    rows = info.get("rows", {})
    total = sum(split["total"] for split in rows.values())
    card_data = DatasetCardData(
        license=license or licence_id,
        task_categories=["image-classification"],
        tags=["dermatology", "medical", "skin-lesion-classification", "skinclip-vl"],
        size_categories=[_size_category(total)],
        pretty_name=f"{name} (SkinCLIP-VL schema)",
    )
    classes = list(next(iter(rows.values()))["per_class"]) if rows else []
    header = "| split | rows | groups | " + " | ".join(classes) + " |"
    rule = "|---" * (3 + len(classes)) + "|"
    groups = settings.get("groups_per_split", {})
    table = [header, rule] + [
        f"| {split} | {info_['total']} | {groups.get(split, 'n/a')} | "
        + " | ".join(str(info_["per_class"].get(c, 0)) for c in classes) + " |"
        for split, info_ in rows.items()
    ]
    dropped = []
    for kind in ("exclusions", "skips", "notes"):
        for item in info.get(kind, []):
            dropped.append(f"- {kind[:-1]}: {item['count']} x {item['reason']}")
    body = f"""
# {repo_id.split("/")[-1]}

`{name}` prepared by SkinCLIP-VL's `python -m dataset_scripts.prepare` into its one `datasets` schema (image, label,
image/group/patient ids, metadata struct and sentence, report, alignment text; see `dataset_scripts/schema.py`).

- Source: {source}.
- Licence: {license or licence_id}; terms: {terms}.
- Classes: {", ".join(f"{c} ({class_full_name(c)})" for c in classes if c != "no fine class")}.
- Split unit: {settings.get("split_unit", "as the source defines")}; seed {settings.get("seed", "n/a")}, fractions
  {settings.get("split_fractions", "official split")}. No group appears in two splits (checked when prepared).

## Splits and class mix

{chr(10).join(table)}

## What was left out

{chr(10).join(dropped) if dropped else "Nothing: every row was kept."}

## Use

Research only; not for clinical decisions. The images keep the terms of their source above.
"""
    return f"---\n{card_data.to_yaml()}\n---\n{body}"


def push_dataset_to_hub(dataset_dict, repo_id: str, summary, *, license: Optional[str] = None, private=None,
                        token=None):
    r"""
    Upload a prepared `DatasetDict` to the dataset repo `repo_id` with its dataset card (`build_dataset_card`): the
    card is uploaded first, so `DatasetDict.push_to_hub` merges its `dataset_info` into the card's front matter.

    Returns:
        the card text.
    """
    from huggingface_hub import HfApi

    card = build_dataset_card(summary, repo_id, license=license)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset")
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo="README.md", repo_id=repo_id,
                    repo_type="dataset", commit_message="Dataset card")
    dataset_dict.push_to_hub(repo_id, private=private, token=token)
    return card


__all__ = [
    "CARD_METRICS",
    "DATA_TERMS",
    "adapter_size_on_disk",
    "build_dataset_card",
    "build_model_card",
    "check_hub_component_names",
    "data_terms",
    "estimate_adapter_size",
    "push_adapter_to_hub",
    "push_dataset_to_hub",
]
