# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""SkinCLIP-VL adapters and checkpoint files: the PEFT and file mechanics behind the model's entry points (as
transformers/integrations/peft.py is for `PreTrainedModel`).

`SkinCLIPVLForDiagnosis.apply_lora`, `save_pretrained`, `from_pretrained` and `from_components` (modeling_skinclip_vl.py)
call into this file: LoRA on the decoder's attention projections (`apply_lora`, `lora_target_pattern`), the `adapter/`
subfolder (`save_adapter`, `load_adapter`), where a saved model records its components (`components/<role>` for small
local checkpoints, `_portable_component` / `_resolve_component`), the checks of a saved folder (`check_saved_model`),
the remote-code files every checkpoint carries (`REMOTE_CODE_FILES`), and the bitsandbytes CPU 4-bit workarounds.
Remote code (copied into every saved model); it does not import modeling_skinclip_vl. `peft` and `bitsandbytes` are
imported inside functions only.
"""

import math
import os
import re
from typing import Optional

from torch import nn
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging
from transformers.utils.hub import cached_file

logger = logging.get_logger(__name__)

# Trainable non-LoRA modules; PEFT keeps trained copies of them in the adapter (`modules_to_save`).
TRAINABLE_MODULES = ["multi_modal_projector", "focal_pooling", "cls_embedding", "classifier", "logit_scale"]
ADAPTER_SUBFOLDER = "adapter"
COMPONENTS_SUBFOLDER = "components"
# local component checkpoints up to this size are copied into a saved adapter model (the demo's tiny ones); larger
# ones (real CLIP / Qwen checkpoints) are recorded by absolute path
SMALL_COMPONENT_BYTES = 200 * 2**20
_HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")

# every checkpoint carries these (DESIGN.md); `_copy_remote_code` writes them next to `config.json`
REMOTE_CODE_FILES = (
    "configuration_skinclip_vl.py",
    "modeling_skinclip_vl.py",
    "processing_skinclip_vl.py",
    "grounding_skinclip_vl.py",
    "adapters_skinclip_vl.py",
)


def lora_target_pattern(target_modules) -> str:
    """Regex (PEFT full-match) that selects the decoder's attention projections and can never match the CLIP towers."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"language_model\.layers\.\d+\.self_attn\.({names})"


# ------------------------------------------------------------------ LoRA (PEFT)
def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without peft
        raise ImportError("LoRA adapters need `peft` (pip install peft==0.21.2).") from err
    return peft


def apply_lora(
    model: PreTrainedModel,
    r: Optional[int] = None,
    lora_alpha: Optional[int] = None,
    lora_dropout: Optional[float] = None,
    target_modules: Optional[list] = None,
    modules_to_save: Optional[list] = None,
    gradient_checkpointing: bool = False,
    verbose: bool = True,
):
    r"""
    Wrap `model` with PEFT LoRA on the decoder's attention projections (`config.lora_target_modules`, by default
    `q_proj` and `v_proj`) through a pattern that cannot match the CLIP towers, and keep trained copies of the new
    modules (`TRAINABLE_MODULES`) in `modules_to_save`. Returns the `PeftModel`; prints trainable vs total parameters.
    Arguments left `None` fall back to the config. A 4-bit decoder is prepared for k-bit training first.
    """
    peft = _require_peft()
    config = model.config
    target_modules = list(config.lora_target_modules if target_modules is None else target_modules)
    r = config.lora_r if r is None else r
    lora_alpha = config.lora_alpha if lora_alpha is None else lora_alpha
    lora_dropout = config.lora_dropout if lora_dropout is None else lora_dropout
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}.")
    if not (isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a finite number > 0, got {lora_alpha!r}.")
    if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
    if not target_modules:
        raise ValueError("target_modules is empty: name the decoder projections to adapt, e.g. ['q_proj', 'v_proj'].")
    lora_config = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_pattern(target_modules),
        modules_to_save=list(modules_to_save or TRAINABLE_MODULES),
        bias="none",
    )
    config.lora_r, config.lora_alpha, config.lora_target_modules = lora_config.r, lora_config.lora_alpha, target_modules
    if is_decoder_quantized(model):
        # never let bitsandbytes repack these weights for its backward-less CPU inference kernel while training
        for layer in model.language_model.modules():
            if type(layer).__name__ == "Linear4bit":
                layer.support_avx512bf16_for_cpu = False
        _unpack_cpu_inference_4bit(model.language_model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model.freeze_clip_towers()
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = peft.get_peft_model(model, lora_config)
    if verbose:
        trainable, total = count_parameters(peft_model)
        logger.warning(f"SkinCLIP-VL LoRA: trainable params: {trainable:,} || all params: {total:,} || "
                       f"trainable%: {100 * trainable / total:.4f}")
    return peft_model


def is_decoder_quantized(model) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.language_model.modules())


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as their number of values, not bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n = int(getattr(param, "quant_state", None).shape.numel()) if getattr(param, "quant_state", None) else 2 * n
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def save_adapter(model: PreTrainedModel, adapter_dir: str, adapter_name: str = "default"):
    """Write `adapter_config.json` + `adapter_model.safetensors` exactly as `PeftModel.save_pretrained` lays them out."""
    peft = _require_peft()
    from safetensors.torch import save_file

    os.makedirs(adapter_dir, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    state = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = os.path.join(adapter_dir, "adapter_model.safetensors.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(adapter_dir, "adapter_model.safetensors"))
    peft_config = model.peft_config[adapter_name]
    peft_config.base_model_name_or_path = None
    peft_config.save_pretrained(adapter_dir)


def load_adapter(model: PreTrainedModel, model_id, is_trainable: bool = False, **hub_kwargs):
    """Apply the `adapter/` of `model_id` (local dir or Hub id) to `model` in place and return `model`."""
    peft = _require_peft()
    location = str(model_id)
    if not os.path.isdir(os.path.join(location, ADAPTER_SUBFOLDER)):
        # fetch the Hub files first and load the local snapshot: PEFT 0.21 doubles `subfolder` when HF_HUB_OFFLINE=1
        cached_file(location, f"{ADAPTER_SUBFOLDER}/adapter_config.json", **hub_kwargs)
        weights = cached_file(location, f"{ADAPTER_SUBFOLDER}/adapter_model.safetensors", **hub_kwargs)
        location, hub_kwargs = os.path.dirname(os.path.dirname(weights)), {}
    peft_model = peft.PeftModel.from_pretrained(
        model, location, subfolder=ADAPTER_SUBFOLDER, is_trainable=is_trainable, **hub_kwargs
    )
    inner = peft_model.base_model.model
    if not is_trainable:
        inner.eval()
    return inner


# ------------------------------------------------------------------ the adapter layout of a saved model
def save_adapter_model(model: PreTrainedModel, save_directory) -> None:
    """DESIGN.md's adapter layout of `model` (LoRA injected) in `save_directory`: `config.json` (`auto_map`, the
    component names as `_portable_component` records them), the remote-code files, `generation_config.json` and
    `adapter/` ([`save_adapter`]). `SkinCLIPVLForDiagnosis.save_pretrained` calls it on the main process."""
    from transformers.dynamic_module_utils import custom_object_save

    if model._auto_class is not None:
        custom_object_save(model, save_directory, config=model.config)
        _copy_remote_code(save_directory)
    model.config.architectures = [model.__class__.__name__]
    recorded = {}
    for key, role in (("vision_model_name_or_path", "vision"), ("decoder_name_or_path", "decoder")):
        value = getattr(model.config, key)
        recorded[key] = _portable_component(value, save_directory, role)
        if os.path.isdir(str(value)):  # in memory: absolute, so that a change of working directory is harmless
            setattr(model.config, key, os.path.abspath(str(value)))
    live = {key: getattr(model.config, key) for key in recorded}
    try:
        for key, value in recorded.items():
            setattr(model.config, key, value)
        model.config.save_pretrained(save_directory)
    finally:
        for key, value in live.items():
            setattr(model.config, key, value)
    model.generation_config.save_pretrained(save_directory)
    save_adapter(model, os.path.join(save_directory, ADAPTER_SUBFOLDER))


def _hub_kwargs(kwargs) -> dict:
    return {k: kwargs[k] for k in _HUB_KWARGS + ("revision", "subfolder") if kwargs.get(k) is not None}


def is_adapter_checkpoint(pretrained_model_name_or_path, **kwargs) -> bool:
    """Whether a saved model (local dir or Hub id; `from_pretrained` keyword arguments) holds
    `adapter/adapter_config.json` (else it is a full save)."""
    adapter_config_file = cached_file(
        pretrained_model_name_or_path, f"{ADAPTER_SUBFOLDER}/adapter_config.json",
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        **_hub_kwargs(kwargs),
    )
    return adapter_config_file is not None


def load_adapter_model(model_class, pretrained_model_name_or_path, **kwargs):
    """An adapter checkpoint as a model of `model_class`: the base rebuilt by `model_class.from_components` from the
    component names in its config (or the `vision` / `decoder` overrides), then its `adapter/` applied
    ([`load_adapter`]). `SkinCLIPVLForDiagnosis.from_pretrained` documents the keyword arguments."""
    hub = _hub_kwargs(kwargs)
    config = kwargs.pop("config", None)
    if not isinstance(config, model_class.config_class):
        config = model_class.config_class.from_pretrained(pretrained_model_name_or_path, **hub)
    quantization_config = kwargs.pop("quantization_config", None)
    if quantization_config is None and config.decoder_quantization_config:
        from transformers import BitsAndBytesConfig

        quantization_config = BitsAndBytesConfig.from_dict(dict(config.decoder_quantization_config))
    component_hub = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in kwargs}
    vision = _resolve_component(config.vision_model_name_or_path, pretrained_model_name_or_path, "vision",
                                kwargs.pop("vision", None))
    decoder = _resolve_component(config.decoder_name_or_path, pretrained_model_name_or_path, "decoder",
                                 kwargs.pop("decoder", None))
    model = model_class.from_components(
        vision=vision,
        decoder=decoder,
        quantization_config=quantization_config,
        config=config,
        dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
        device_map=kwargs.get("device_map"),
        attn_implementation=kwargs.get("attn_implementation"),
        **component_hub,
    )
    model = load_adapter(model, pretrained_model_name_or_path, is_trainable=kwargs.get("is_trainable", False),
                         **{k: v for k, v in hub.items() if k != "subfolder"})
    model.config._name_or_path = str(pretrained_model_name_or_path)  # where `diagnose` finds the processor files
    for key, location in (("vision_model_name_or_path", vision), ("decoder_name_or_path", decoder)):
        recorded = str(getattr(model.config, key))
        if not os.path.isabs(recorded) and os.path.isdir(os.path.join(str(pretrained_model_name_or_path), recorded)):
            setattr(model.config, key, location)  # inside the saved model: absolute now, copied again on save
    return model


def _check_components_match(config, vision_config, text_config, align_config, vision, decoder):
    """An adapter trained on one pair of components must not be applied to another."""
    checks = [
        ("vision", vision, config.vision_config, vision_config, ("hidden_size", "num_hidden_layers", "patch_size", "image_size")),
        ("decoder", decoder, config.text_config, text_config, ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")),
        ("align", vision, config.align_config, align_config, ("hidden_size", "projection_dim")),
    ]
    for role, location, expected, found, fields in checks:
        for field in fields:
            want, got = getattr(expected, field, None), getattr(found, field, None)
            if want != got:
                raise ValueError(
                    f"The checkpoint was trained on a {role} component with {field}={want} "
                    f"({getattr(config, 'vision_model_name_or_path' if role != 'decoder' else 'decoder_name_or_path')}), "
                    f"but {location!r} has {field}={got}. Load the adapter onto the components it was trained with."
                )


# ------------------------------------------------------------------ checkpoint files
def _directory_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _portable_component(value, save_directory, role: str) -> str:
    """What a saved model records for a component: a Hub id unchanged; a small local checkpoint copied into
    `save_directory/components/<role>` and recorded relative to the saved model; a large one by absolute path."""
    import shutil

    value = str(value)
    if not os.path.isdir(value):
        return value  # a Hub id (or a location already recorded relative to a saved model)
    if _directory_bytes(value) > SMALL_COMPONENT_BYTES:
        return os.path.abspath(value)
    target = os.path.join(str(save_directory), COMPONENTS_SUBFOLDER, role)
    if os.path.abspath(value) != os.path.abspath(target):
        tmp = target + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(value, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return f"{COMPONENTS_SUBFOLDER}/{role}"


def _resolve_component(value, model_dir, role: str, override=None) -> str:
    """The location to load a recorded component from: `override` when given; a path relative to the saved model
    (`components/<role>`) resolved against `model_dir`; an absolute path that must exist; else a Hub id."""
    if override:
        return str(override)
    value = str(value)
    local = os.path.isdir(str(model_dir))
    if local and not os.path.isabs(value) and os.path.isdir(os.path.join(str(model_dir), value)):
        return os.path.abspath(os.path.join(str(model_dir), value))
    if os.path.isabs(value) and not os.path.isdir(value):
        raise ValueError(
            f"The {role} component {value} recorded in {model_dir}/config.json does not exist (a large local checkpoint "
            f"is recorded by absolute path). Pass its new location or its Hub id: "
            f"from_pretrained({str(model_dir)!r}, {role}='/path/to/checkpoint')."
        )
    if local and value.startswith(f"{COMPONENTS_SUBFOLDER}/"):
        raise ValueError(f"The {role} component {os.path.join(str(model_dir), value)} is missing from the saved model; "
                         f"pass from_pretrained({str(model_dir)!r}, {role}=...) with the checkpoint it was trained on.")
    return value


def check_saved_model(name) -> None:
    """Raise a `ValueError` naming the file when `name` is not a loadable saved model: a local path that does not
    exist, a missing or unreadable `config.json`, a missing `adapter/` (or its files) without full weights, or a
    truncated / corrupt `.safetensors` file. A Hub id (`ORG/NAME`) is left to the Hub."""
    import json

    text = str(name)
    path = os.path.expanduser(text)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ValueError(f"model path {text} is a file; give the saved model folder (the one with config.json).")
        if os.path.isabs(path) or text.startswith((".", "~")) or text.count("/") != 1 or "\\" in text:
            raise ValueError(f"model path {text} does not exist (neither a folder here nor a Hub repo id ORG/NAME).")
        return
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"{config} is missing: {text} is not a saved SkinCLIP-VL model folder.")
    try:
        with open(config, encoding="utf-8") as handle:
            json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is corrupt (not JSON: {err}).") from None
    adapter = os.path.join(path, ADAPTER_SUBFOLDER)
    full = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
            if os.path.isfile(os.path.join(path, f))]
    if not os.path.isdir(adapter):
        if not full:
            raise ValueError(f"{adapter}/ is missing: {text} has neither the LoRA adapter folder nor full model weights.")
    else:
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if not os.path.isfile(os.path.join(adapter, required)):
                raise ValueError(f"{os.path.join(adapter, required)} is missing from the adapter folder of {text}.")
    from safetensors import safe_open

    folders = [path] + ([adapter] if os.path.isdir(adapter) else [])
    for folder in folders:
        for weights in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):
            weights = os.path.join(folder, weights)
            try:
                with safe_open(weights, framework="pt") as handle:  # checks the header against the file size
                    handle.keys()
            except Exception as err:  # noqa: BLE001 - every unreadable file is reported the same way
                raise ValueError(f"{weights} is corrupt or truncated ({err}); save or download the model again.") from None


def _copy_remote_code(save_directory):
    """Copy every file of `REMOTE_CODE_FILES` (DESIGN.md: every checkpoint carries them; `custom_object_save` copies
    only the model file and what it imports)."""
    import shutil

    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        source, target = os.path.join(here, name), os.path.join(save_directory, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copy(source, target)


# ------------------------------------------------------------------ bitsandbytes 4-bit on CPU
def _disable_unsupported_cpu_4bit_packing(module: nn.Module):
    """bitsandbytes' CPU inference fast path (AVX512-BF16) repacks 4-bit weights in blocks and crashes
    (`shape '[32, 0]' is invalid`) on layers whose in_features are not a multiple of the quantisation block size or
    whose out_features are not a multiple of 32 (tiny test decoders; real checkpoints are never affected). Those
    layers keep the generic 4-bit kernel."""
    for layer in module.modules():
        if type(layer).__name__ != "Linear4bit" or not getattr(layer, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(layer.weight, "quant_state", None), "blocksize", 64)
        if layer.in_features % blocksize or layer.out_features % 32:
            layer.support_avx512bf16_for_cpu = False


def _unpack_cpu_inference_4bit(module: nn.Module):
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval forward and keeps it
    that way; that kernel has no backward, so after an evaluation every gradient through the layer would be silently
    dropped (LoRA below it would train on wrong gradients). Training gets the regular layout back (bitsandbytes' own
    inverse; it keeps the bf16-rounded absmax of the packed form). `apply_lora` also switches the repacking off."""
    for layer in module.modules():
        state = getattr(getattr(layer, "weight", None), "quant_state", None)
        if type(layer).__name__ == "Linear4bit" and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


__all__ = [
    "ADAPTER_SUBFOLDER",
    "COMPONENTS_SUBFOLDER",
    "REMOTE_CODE_FILES",
    "SMALL_COMPONENT_BYTES",
    "TRAINABLE_MODULES",
    "apply_lora",
    "check_saved_model",
    "count_parameters",
    "is_adapter_checkpoint",
    "is_decoder_quantized",
    "load_adapter",
    "load_adapter_model",
    "lora_target_pattern",
    "save_adapter",
    "save_adapter_model",
]
