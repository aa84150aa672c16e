# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""SkinCLIP-VL: frozen CLIP perception, focal pooling, a LoRA-adapted Qwen2.5-VL decoder with a [CLS] head.

The file reads top to bottom: projector -> focal pooling -> model (forward, generate) -> building from components ->
LoRA, saving and loading (entry points; the PEFT and checkpoint-file mechanics are in adapters_skinclip_vl.py) ->
inference (diagnose: one prefill, cached greedy rationale, attention maps, Grad-CAM) -> grounding (the term-attribution
methods are in grounding_skinclip_vl.py). This file only computes tensors: `SkinCLIPVLProcessor.post_process_diagnosis`
(processing_skinclip_vl.py) turns them into `Diagnosis` objects with grounded terms; drawing lives in the repository's
drawing.py and Hub tooling in trainer/hub.py (neither travels with a saved model).
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection, CLIPVisionModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

try:
    from .adapters_skinclip_vl import (
        TRAINABLE_MODULES,
        _check_components_match,
        _copy_remote_code,
        _disable_unsupported_cpu_4bit_packing,
        _unpack_cpu_inference_4bit,
        apply_lora,
        check_saved_model,
        count_parameters,
        is_adapter_checkpoint,
        load_adapter,
        load_adapter_model,
        save_adapter,
        save_adapter_model,
    )
    from .configuration_skinclip_vl import PLACEHOLDER_TOKENS, SkinCLIPVLConfig
    from .grounding_skinclip_vl import (
        eager_attention,
        generated_token_maps,
        ground_text,
        ground_token_ids,
        grounding_token_maps,
        rationale_log_probs,
        resolve_grounding_method,
        teacher_forced_inputs,
        term_embeddings,
    )
    from .processing_skinclip_vl import find_processor, prepare_images
except ImportError:  # imported as a top-level module (the repository itself) rather than as remote code
    from adapters_skinclip_vl import (
        TRAINABLE_MODULES,
        _check_components_match,
        _copy_remote_code,
        _disable_unsupported_cpu_4bit_packing,
        _unpack_cpu_inference_4bit,
        apply_lora,
        check_saved_model,
        count_parameters,
        is_adapter_checkpoint,
        load_adapter,
        load_adapter_model,
        save_adapter,
        save_adapter_model,
    )
    from configuration_skinclip_vl import PLACEHOLDER_TOKENS, SkinCLIPVLConfig
    from grounding_skinclip_vl import (
        eager_attention,
        generated_token_maps,
        ground_text,
        ground_token_ids,
        grounding_token_maps,
        rationale_log_probs,
        resolve_grounding_method,
        teacher_forced_inputs,
        term_embeddings,
    )
    from processing_skinclip_vl import find_processor, prepare_images


logger = logging.get_logger(__name__)



@dataclass
class SkinCLIPVLOutput(ModelOutput):
    r"""
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Causal LM loss on the rationale tokens (per-token mean, or sum / `num_items_in_batch`).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            LM logits (what `generate()` reads); only the last `logits_to_keep` positions when that is set, and only
            the rationale span (the positions that predict a label) when `labels` are given.
        class_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
            Raw class scores from the [CLS] hidden state (no temperature). Present on multimodal prefills.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, align_dim)`, *optional*):
            `v_global`, the focal-pooled image descriptor in the alignment space.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, align_dim)`, *optional*):
            `t_global`, the frozen CLIP text embedding of the alignment text, when given.
        logit_scale (`torch.FloatTensor` of shape `()`):
            `exp(logit_scale)` clamped at 100: the multiplier of the alignment similarities.
        pooling_attention (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            Focal pooling weights `alpha` over the image patches (a saliency map; rows sum to 1).
        cache (`Cache`, *optional*):
            The decoder's KV cache (transformers 5.24 name; `past_key_values` before).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Decoder hidden states, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Decoder attention maps, when `output_attentions=True` (needs eager attention).
        image_features (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`, *optional*):
            The frozen CLIP patch features `V` that were used (for caching and Grad-CAM).
        patch_embeds (`torch.FloatTensor` of shape `(batch_size, num_patches, hidden_size)`, *optional*):
            The projected patches `P` (what the grounding term `L_ground` aligns with the report's clinical terms).
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    class_logits: Optional[torch.FloatTensor] = None
    image_embeds: Optional[torch.FloatTensor] = None
    text_embeds: Optional[torch.FloatTensor] = None
    logit_scale: Optional[torch.FloatTensor] = None
    pooling_attention: Optional[torch.FloatTensor] = None
    cache: Optional[Cache] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
    image_features: Optional[torch.FloatTensor] = None
    patch_embeds: Optional[torch.FloatTensor] = None


class SkinCLIPVLProjector(nn.Module):
    """Maps CLIP patch features `V` (d_v) to the decoder width (d_m): `Linear`, or `Linear -> GELU -> Linear`."""

    def __init__(self, config: SkinCLIPVLConfig):
        super().__init__()
        d_v, d_m = config.vision_config.hidden_size, config.text_config.hidden_size
        if config.projector_type == "mlp":
            self.linear_1 = nn.Linear(d_v, d_m)
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(d_m, d_m)
        else:
            self.linear_1 = nn.Linear(d_v, d_m)
            self.act = None
            self.linear_2 = None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        if self.linear_2 is not None:
            hidden = self.linear_2(self.act(hidden))
        return hidden


class FocalPooling(nn.Module):
    r"""
    Learnable-query attention pooling over the projected patches (paper Eq. 1-2):
    `alpha = softmax((q W_q)(P W_k)^T / sqrt(d_f))`, `v_global = sum_i alpha_i (p_i W_v)`.
    """

    def __init__(self, hidden_size: int, pooling_dim: int, output_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, hidden_size))
        self.query_proj = nn.Linear(hidden_size, pooling_dim)
        self.key_proj = nn.Linear(hidden_size, pooling_dim)
        self.value_proj = nn.Linear(hidden_size, output_dim)
        self.scale = pooling_dim**-0.5

    def forward(self, patch_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`patch_embeds` (B, N, d_m) -> (`v_global` (B, d_align), `alpha` (B, N))."""
        query = self.query_proj(self.query.to(patch_embeds.dtype))  # (1, d_f)
        keys = self.key_proj(patch_embeds)  # (B, N, d_f)
        scores = torch.einsum("qf,bnf->bn", query, keys) * self.scale
        alpha = scores.float().softmax(dim=-1).to(patch_embeds.dtype)
        values = self.value_proj(patch_embeds)  # (B, N, d_align)
        return torch.einsum("bn,bnd->bd", alpha, values), alpha


class LogitScale(nn.Module):
    """Holds the learnable log-temperature of the alignment loss (a module, so PEFT can keep it in the adapter)."""

    def __init__(self, init_value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self) -> torch.Tensor:
        return self.value


class SkinCLIPVLPreTrainedModel(PreTrainedModel):
    config_class = SkinCLIPVLConfig
    config: SkinCLIPVLConfig
    base_model_prefix = "skinclip_vl"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, FocalPooling):
            init.normal_(module.query, mean=0.0, std=std)
        elif isinstance(module, LogitScale):
            init.constant_(module.value, self.config.logit_scale_init_value)
        elif isinstance(module, nn.Embedding) and module is getattr(self, "cls_embedding", None):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Linear):
            # only this model's own linear layers reach here: the towers and the decoder are sub-models with their own init
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class SkinCLIPVLForDiagnosis(SkinCLIPVLPreTrainedModel, GenerationMixin):
    r"""
    SkinCLIP-VL for skin-lesion diagnosis: 8-class probabilities from a [CLS] token and a rationale from the LM head.

    The processor writes `[chat prefix; <|vision_start|> N x <|image_pad|> <|vision_end|>; T_meta; instruction; CLS]`
    (then, for training, the rationale) into `input_ids`; this model scatters the projected patch features and the
    learnable CLS embedding into the placeholder positions (the LLaVA pattern), so the stock `generate()` works.
    """

    _keys_to_ignore_on_load_unexpected = [r"^vision_tower\.text_model", r"^align_tower\.vision_model"]

    def __init__(
        self,
        config: SkinCLIPVLConfig,
        *,
        vision_tower: Optional[nn.Module] = None,
        align_tower: Optional[nn.Module] = None,
        language_model: Optional[nn.Module] = None,
        lm_head: Optional[nn.Module] = None,
    ):
        super().__init__(config)
        d_m = config.text_config.hidden_size
        self.vision_tower = vision_tower if vision_tower is not None else CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = SkinCLIPVLProjector(config)
        self.focal_pooling = FocalPooling(d_m, config.pooling_dim, config.align_config.projection_dim)
        self.language_model = (
            language_model if language_model is not None else AutoModel.from_config(config.text_config)
        )
        self.lm_head = lm_head if lm_head is not None else nn.Linear(d_m, config.text_config.vocab_size, bias=False)
        self.cls_embedding = nn.Embedding(1, d_m)
        self.classifier = nn.Linear(d_m, config.num_labels)
        self.align_tower = (
            align_tower if align_tower is not None else CLIPTextModelWithProjection(config.align_config)
        )
        self.logit_scale = LogitScale(config.logit_scale_init_value)
        self.post_init()
        # dispatch the resolved attention implementation to the towers and the decoder (their configs are sub-configs)
        self.set_attn_implementation(self.config._attn_implementation or "sdpa")
        self.freeze_clip_towers()

    # ------------------------------------------------------------------ frozen perception
    def freeze_clip_towers(self):
        """The CLIP towers are frozen and stay in eval mode, also inside `model.train()`."""
        for tower in (self.vision_tower, self.align_tower):
            tower.requires_grad_(False)
            tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()
        self.align_tower.eval()
        if mode:
            _unpack_cpu_inference_4bit(self.language_model)
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP patch features `V` (B, N, d_v) from `config.vision_feature_layer`, CLS dropped."""
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        return outputs.hidden_states[self.config.vision_feature_layer][:, 1:]

    @torch.no_grad()
    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Frozen CLIP text embedding `t_global` (B, d_align) of the alignment text."""
        return self.align_tower(input_ids=input_ids, attention_mask=attention_mask).text_embeds

    def forward_features(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trainable visual path: `V` -> (`P` = projected patches (B, N, d_m), `v_global`, `alpha`)."""
        dtype = self.classifier.weight.dtype
        patch_embeds = self.multi_modal_projector(image_features.to(dtype))
        image_embeds, alpha = self.focal_pooling(patch_embeds)
        return patch_embeds, image_embeds, alpha

    def _merge_placeholders(self, input_ids, inputs_embeds, patch_embeds):
        """Scatter `P` into the `<|image_pad|>` positions and the CLS embedding into the CLS position."""
        image_mask = input_ids == self.config.image_token_id
        cls_mask = input_ids == self.config.cls_token_id
        n_image_tokens = image_mask.sum(dim=1)
        n_patches = patch_embeds.shape[1]
        if not torch.all(n_image_tokens == n_patches):
            raise ValueError(
                f"Image placeholder tokens and image features do not match: tokens per sample: "
                f"{n_image_tokens.tolist()}, features per sample: {n_patches}."
            )
        n_cls = cls_mask.sum(dim=1)
        if not torch.all(n_cls == 1):
            raise ValueError(f"Each sample needs exactly one CLS placeholder token; found per sample: {n_cls.tolist()}.")
        inputs_embeds = inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), patch_embeds.to(inputs_embeds.dtype).reshape(-1, patch_embeds.shape[-1])
        )
        cls = self.cls_embedding(torch.zeros_like(input_ids[:, :1])).to(inputs_embeds.dtype)  # (B, 1, d_m)
        inputs_embeds = torch.where(cls_mask.unsqueeze(-1), cls, inputs_embeds)
        return inputs_embeds, cls_mask

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.FloatTensor] = None,
        image_features: Optional[torch.FloatTensor] = None,
        align_input_ids: Optional[torch.LongTensor] = None,
        align_attention_mask: Optional[torch.Tensor] = None,
        text_embeds: Optional[torch.FloatTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs,
    ) -> SkinCLIPVLOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Processor output: prompt with image and CLS placeholders (left padded), then the rationale in training.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`, *optional*):
                CLIP-normalised images. Either these or `image_features` on a multimodal prefill.
            image_features (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`, *optional*):
                Precomputed frozen CLIP patch features (the feature cache); skips the vision tower.
            align_input_ids / align_attention_mask (`torch.LongTensor`, *optional*):
                CLIP-tokenised alignment text, embedded by the frozen CLIP text tower into `text_embeds`.
            text_embeds (`torch.FloatTensor` of shape `(batch_size, align_dim)`, *optional*):
                Precomputed `t_global` (the feature cache).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Rationale token labels, -100 on the prompt and padding. With labels, LM logits are computed only for
                the positions that predict a label (the last `K` positions, from the one before the first rationale
                token of the batch; rationales end every row, since padding is on the left), never for the prompt's
                image tokens: `logits` is `(batch_size, K, vocab_size)`.
            logits_to_keep (`int`, *optional*, defaults to 0):
                Compute LM logits for the last `logits_to_keep` positions only (0 = all, or the rationale positions
                when `labels` are given). Classification, evaluation and `generate()` pass 1.
        """
        kwargs.pop("return_dict", None)
        if (cache_alias := kwargs.pop("past_key_values", None)) is not None and cache is None:
            cache = cache_alias
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        patch_embeds = image_embeds = alpha = cls_mask = None
        if pixel_values is not None and image_features is None:
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            if input_ids is None:
                raise ValueError("A multimodal forward needs `input_ids` to locate the image and CLS placeholders.")
            patch_embeds, image_embeds, alpha = self.forward_features(image_features)
            inputs_embeds, cls_mask = self._merge_placeholders(input_ids, inputs_embeds, patch_embeds)

        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # left padding: positions count real tokens only, so a padded sample sees the same positions as alone
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = positions[:, -inputs_embeds.shape[1] :]

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state

        class_logits = None
        if cls_mask is not None:
            cls_hidden = hidden_states[cls_mask]  # (B, d_m): exactly one CLS per row
            class_logits = self.classifier(cls_hidden.to(self.classifier.weight.dtype))

        if labels is not None:
            logits_to_keep = _logits_to_keep_for_labels(labels, logits_to_keep)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(
                logits,
                labels[:, -logits.shape[1] :],
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )

        if text_embeds is None and align_input_ids is not None:
            text_embeds = self.get_text_features(align_input_ids, align_attention_mask)

        return SkinCLIPVLOutput(
            loss=loss,
            logits=logits,
            class_logits=class_logits,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logit_scale=self.logit_scale().exp().clamp(max=100.0),
            pooling_attention=alpha,
            cache=outputs.cache if use_cache is not False else None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            image_features=image_features,
            patch_embeds=patch_embeds,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and model_inputs.get("use_cache", True) and model_inputs.get("cache") is not None:
            # image features, alignment text and CLS belong to the prefill; decoding steps only extend the cache
            for key in ("image_features", "align_input_ids", "align_attention_mask", "text_embeds"):
                model_inputs.pop(key, None)
        return model_inputs

    # ------------------------------------------------------------------ building from pretrained components
    @classmethod
    def from_components(
        cls,
        vision: Union[str, os.PathLike],
        decoder: Union[str, os.PathLike],
        quantization_config=None,
        *,
        config: Optional[SkinCLIPVLConfig] = None,
        token: Optional[Union[str, bool]] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        local_files_only: bool = False,
        dtype: Optional[Union[str, torch.dtype]] = None,
        device_map=None,
        attn_implementation: Optional[str] = None,
        **config_overrides,
    ) -> "SkinCLIPVLForDiagnosis":
        r"""
        Build SkinCLIP-VL from a pretrained CLIP checkpoint (vision + text towers) and a Qwen2.5-VL (or Qwen2/2.5)
        decoder checkpoint, Hub ids or local directories. The decoder's own vision tower is dropped; only the new
        modules (projector, focal pooling, CLS embedding, classifier, logit scale) are initialised.

        Args:
            vision (`str`): CLIP checkpoint, e.g. `"openai/clip-vit-large-patch14"`.
            decoder (`str`): decoder checkpoint, e.g. `"Qwen/Qwen2.5-VL-7B-Instruct"`.
            quantization_config (`BitsAndBytesConfig`, *optional*): applied to the decoder language model only.
            config (`SkinCLIPVLConfig`, *optional*): a saved config to rebuild; its sizes must match the components.
            token, revision, cache_dir, local_files_only, dtype, device_map, attn_implementation: passed to every
                `from_pretrained` call (`device_map` to the decoder only; the rest of the model follows its device).
            config_overrides: any other `SkinCLIPVLConfig` field (e.g. `projector_type="mlp"`, `lora_r=16`).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub = {"token": token, "revision": revision, "cache_dir": cache_dir, "local_files_only": local_files_only}
        load = dict(hub, dtype=dtype)
        if attn_implementation is not None:
            load["attn_implementation"] = attn_implementation
        vision, decoder = str(vision), str(decoder)
        with _quiet_load_reports():
            vision_tower = CLIPVisionModel.from_pretrained(vision, **load)
            align_tower = CLIPTextModelWithProjection.from_pretrained(vision, **load)
            decoder_config = AutoConfig.from_pretrained(decoder, **hub)
            decoder_kwargs = dict(load, device_map=device_map)
            if quantization_config is not None:
                if getattr(quantization_config, "llm_int8_skip_modules", None) is None and hasattr(
                    quantization_config, "llm_int8_skip_modules"
                ):
                    # the decoder's vision tower is dropped below: do not spend time quantising it
                    quantization_config.llm_int8_skip_modules = ["visual", "lm_head"]
                decoder_kwargs["quantization_config"] = quantization_config
            if decoder_config.model_type in ("qwen2_5_vl", "qwen2_vl"):
                from transformers import Qwen2_5_VLForConditionalGeneration

                full = Qwen2_5_VLForConditionalGeneration.from_pretrained(decoder, **decoder_kwargs)
                language_model, text_config = full.model.language_model, full.config.text_config
            elif decoder_config.model_type == "qwen2":
                full = AutoModelForCausalLM.from_pretrained(decoder, **decoder_kwargs)
                language_model, text_config = full.model, full.config
            else:
                raise ValueError(
                    f"Decoder {decoder!r} has model_type {decoder_config.model_type!r}; SkinCLIP-VL supports "
                    "Qwen2.5-VL ('qwen2_5_vl') and Qwen2/Qwen2.5 causal LMs ('qwen2')."
                )
            lm_head = full.lm_head
            generation_config = getattr(full, "generation_config", None)
            tokenizer = AutoTokenizer.from_pretrained(decoder, **hub)

        token_ids = {}
        for field, token_str in PLACEHOLDER_TOKENS.items():
            token_id = tokenizer.convert_tokens_to_ids(token_str)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"Decoder tokenizer {decoder!r} has no special token {token_str!r} (needed for {field}).")
            token_ids[field] = token_id

        if config is None:
            config = SkinCLIPVLConfig(
                vision_config=vision_tower.config, text_config=text_config, align_config=align_tower.config,
                vision_model_name_or_path=vision, decoder_name_or_path=decoder, **token_ids, **config_overrides,
            )
        else:
            _check_components_match(config, vision_tower.config, text_config, align_tower.config, vision, decoder)
            config.vision_config, config.text_config, config.align_config = vision_tower.config, text_config, align_tower.config
            for key, value in config_overrides.items():
                setattr(config, key, value)
        if quantization_config is not None:
            config.decoder_quantization_config = quantization_config.to_dict()
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation

        model = cls(config, vision_tower=vision_tower, align_tower=align_tower, language_model=language_model,
                    lm_head=lm_head)
        del full
        if quantization_config is not None:
            _disable_unsupported_cpu_4bit_packing(model.language_model)
        device = model.get_input_embeddings().weight.device
        if quantization_config is None and dtype is not None:
            model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else model.dtype)
        for name in ["vision_tower", "align_tower"] + TRAINABLE_MODULES:
            getattr(model, name).to(device)
        if generation_config is not None:
            model.generation_config = generation_config
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = _eos_ids(tokenizer, model.generation_config.eos_token_id)
        return model

    # ------------------------------------------------------------------ LoRA
    def apply_lora(self, **kwargs):
        """Wrap this model with PEFT LoRA; see [`apply_lora`]."""
        return apply_lora(self, **kwargs)

    def has_adapter(self) -> bool:
        """Whether PEFT adapter layers are injected into this model."""
        return bool(getattr(self, "peft_config", None)) and any("lora_" in n for n, _ in self.named_parameters())

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, state_dict=None, **kwargs):
        """
        With LoRA injected (after [`apply_lora`] or loading an adapter): writes DESIGN.md's adapter layout
        (`config.json` with `auto_map` and component names, the remote-code files, `generation_config.json`, and
        `adapter/` with `adapter_config.json` + `adapter_model.safetensors` holding LoRA and `modules_to_save`).
        Without: a plain full save.
        """
        if not self.has_adapter():
            result = super().save_pretrained(
                save_directory, *args, is_main_process=is_main_process, state_dict=state_dict, **kwargs
            )
            if is_main_process and self._auto_class is not None:
                _copy_remote_code(save_directory)
            return result
        if kwargs.get("push_to_hub"):
            raise ValueError("Use `model.push_to_hub(repo_id)` to upload an adapter checkpoint.")
        os.makedirs(save_directory, exist_ok=True)
        if is_main_process:
            save_adapter_model(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        Load a saved SkinCLIP-VL. An adapter checkpoint (an `adapter/` subfolder, local or on the Hub) is rebuilt from
        the component names in its config ([`from_components`]) and the adapter is applied; a full save loads as any
        `PreTrainedModel`. Extra keyword arguments for adapter checkpoints: `quantization_config` (defaults to the
        recorded `decoder_quantization_config`), `is_trainable` (LoRA trainable after loading), `vision` / `decoder`
        (override the component locations, e.g. local copies).
        """
        if os.path.isdir(str(pretrained_model_name_or_path)):
            check_saved_model(pretrained_model_name_or_path)
        if is_adapter_checkpoint(pretrained_model_name_or_path, **kwargs):
            return load_adapter_model(cls, pretrained_model_name_or_path, **kwargs)
        for key in ("vision", "decoder", "is_trainable"):
            kwargs.pop(key, None)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    # ------------------------------------------------------------------ inference
    def resolve_processor(self, processor=None):
        """The processor to use: the one given, else the one saved with the model (`config._name_or_path`), else one built
        from the component checkpoints named in the config (a found one is cached on the model)."""
        if processor is None:
            processor = getattr(self, "_skinclip_processor", None) or find_processor(self.config)
            self._skinclip_processor = processor
        if not hasattr(processor, "post_process_diagnosis"):
            raise ValueError(
                f"The processor ({type(processor).__module__}) predates `post_process_diagnosis`: save it again with "
                "this version's processing_skinclip_vl.py (e.g. re-run `make demo`)."
            )
        return processor

    def placeholder_token_ids(self) -> list:
        """Image, CLS and vision start/end token ids: never generated."""
        return [self.config.image_token_id, self.config.cls_token_id, self.config.vision_start_token_id,
                self.config.vision_end_token_id]

    def grounding_layer_ids(self) -> list:
        """Decoder layers whose attention is averaged for grounding: `config.grounding_layers`, else the second half."""
        n = self.config.text_config.num_hidden_layers
        layers = self.config.grounding_layers
        layers = list(range(n // 2, n)) if not layers else [i % n for i in layers]
        return sorted(set(layers))

    def _image_attention(self, attentions, image_mask) -> torch.Tensor:
        """(B, N) attention of the last query position to the image patches: mean over heads and grounding layers,
        renormalised over the N patches. `attentions`: per layer (B, heads, q, kv); `image_mask`: (B, L) with L <= kv."""
        layers = self.grounding_layer_ids()
        att = torch.stack([attentions[i][:, :, -1, :].float() for i in layers]).mean(dim=(0, 2))  # (B, kv)
        att = att[:, : image_mask.shape[1]][image_mask].view(image_mask.shape[0], -1)
        return att / att.sum(dim=-1, keepdim=True).clamp(min=1e-12)

    def diagnose(
        self,
        images,
        metadata=None,
        processor=None,
        rationale: bool = True,
        grounding: Union[bool, str, None] = True,
        max_new_tokens: int = 64,
        grad_cam: bool = False,
    ) -> list:
        r"""
        Classify dermoscopic images with patient metadata and, when asked, write grounded rationales.

        One prefill forward gives the class logits and the focal map. With `rationale=True`, greedy decoding continues
        from that prefill's KV cache (no second prefill): the first token comes from the prefill's last LM logits, then
        the stock `generate()` runs on the cache. Placeholder tokens (image, CLS, vision start/end) are never generated.

        Grounding (`grounding=METHOD`, one of `GROUNDING_METHODS`; `True`: `DEFAULT_GROUNDING_METHOD`): every clinical
        term of the rationale gets a map over the N patches (the methods: grounding_skinclip_vl.py). `"attention"`
        maps come from the decoding itself (eager attention while decoding, then the previous setting); the other
        methods run after decoding on the generated tokens (teacher-forced, one pass).
        `processor.post_process_diagnosis` then turns these tensors into `Diagnosis` objects: probabilities
        `softmax(class_logits / config.calibration_temperature)`, heatmaps on the image region the vision tower sees,
        and one heatmap per mention of a `CLINICAL_TERMS` entry (the mean map of its tokens).

        Args:
            images: one image or a list (paths, PIL images or HxWxC uint8 arrays).
            metadata: one dict/string for all images, or a list with one per image (`None`: unknown).
            processor ([`SkinCLIPVLProcessor`], *optional*): defaults to the processor saved with the model, else one
                built from the component checkpoints named in the config.
            rationale (`bool`, *optional*, defaults to `True`): generate a rationale.
            grounding (`bool` or `str`, *optional*, defaults to `True`): the attribution method of the term heatmaps
                (`"attention"`, `"grad_attention"`, `"hidden_similarity"`, `"text_query"`; `True`: the default
                method; `False`: none). Needs `rationale`; recorded in every `GroundedTerm.method`.
            max_new_tokens (`int`, *optional*, defaults to 64): rationale length limit (the end token included).
            grad_cam (`bool`, *optional*, defaults to `False`): also compute Grad-CAM of the predicted class (one more
                forward and backward pass).

        Returns:
            `list[Diagnosis]`, one per image, in order.
        """
        if rationale and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1 with rationale=True, got {max_new_tokens!r} "
                             "(for no rationale pass rationale=False).")
        processor = self.resolve_processor(processor)
        method = resolve_grounding_method(grounding)
        pil_images, metadata = prepare_images(images, metadata)
        sizes = [image.size for image in pil_images]
        batch = processor(images=pil_images, metadata=metadata, return_tensors="pt").to(self.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outputs = self(**batch, use_cache=rationale, logits_to_keep=1)
                generated, token_maps = None, None
                if rationale and max_new_tokens > 0:
                    image_mask = batch["input_ids"] == self.config.image_token_id
                    generated, token_maps = self._continue_generation(
                        batch, outputs, max_new_tokens, method == "attention", image_mask
                    )
            if generated is not None and method not in (None, "attention"):
                token_maps = generated_token_maps(self, batch, generated, method, processor=processor,
                                                  image_features=outputs.image_features)
            result = processor.post_process_diagnosis(
                outputs.class_logits, sizes, self.config.id2label, temperature=self.config.calibration_temperature,
                pooling_attention=outputs.pooling_attention.float().cpu(), token_ids=generated,
                token_maps=token_maps if method else None, eos_token_id=self.generation_config.eos_token_id,
                metadata=metadata, grounding_method=method,
            )
            if grad_cam:
                cams = self.grad_cam_patches(batch, targets=[self.config.label2id[d.prediction] for d in result])
                for diagnosis, heatmap in zip(result, processor.post_process_heatmaps(cams, sizes)):
                    diagnosis.grad_cam = heatmap
        finally:
            self.train(was_training)
        return result

    def _continue_generation(self, batch, outputs, max_new_tokens, grounding, image_mask):
        """Greedy rationale from the prefill's cache. Returns `(tokens (B, T), token maps (B, T, N) or None)`."""
        suppress = self.placeholder_token_ids()
        first_logits = outputs.logits[:, -1, :].float()
        first_logits[:, suppress] = float("-inf")
        first = first_logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        eos_ids = list(self.generation_config.eos_token_id or [])
        input_ids = torch.cat([batch["input_ids"], first], dim=1)
        attention_mask = torch.cat([batch["attention_mask"], torch.ones_like(first)], dim=1)
        steps_left = max_new_tokens - 1
        all_done = bool(torch.isin(first[:, 0], torch.tensor(eos_ids, device=first.device)).all()) if eos_ids else False
        if steps_left <= 0 or all_done:
            return first.cpu(), None
        context = eager_attention(self) if grounding else contextlib.nullcontext()
        with context:
            generation = self.generate(
                input_ids=input_ids, attention_mask=attention_mask, cache=outputs.cache, max_new_tokens=steps_left,
                do_sample=False, num_beams=1, suppress_tokens=suppress, output_attentions=grounding,
                return_dict_in_generate=True, pad_token_id=self.generation_config.pad_token_id,
                eos_token_id=eos_ids or None,
            )
        tokens = generation.sequences[:, batch["input_ids"].shape[1] :].cpu()  # first token + generated ones
        maps = None
        if grounding:
            per_step = [self._image_attention(step, image_mask).cpu() for step in generation.attentions]  # token k
            n = image_mask.sum(dim=1)[0].item()
            missing = tokens.shape[1] - len(per_step)  # the last token is never processed
            maps = torch.stack(per_step + [torch.full((tokens.shape[0], n), float("nan"))] * missing, dim=1).numpy()
        return tokens, maps

    # ------------------------------------------------------------------ grounding (grounding_skinclip_vl.py)
    def ground_text(self, images, texts, metadata=None, processor=None, grounding: Union[bool, str] = True) -> list:
        """Teacher-forced grounding of given rationale texts; see `grounding_skinclip_vl.ground_text`."""
        return ground_text(self, images, texts, metadata=metadata, processor=processor, grounding=grounding)

    def ground_token_ids(self, images, token_ids, metadata=None, processor=None,
                         grounding: Union[bool, str] = True) -> list:
        """Teacher-forced grounding of given rationale tokens; see `grounding_skinclip_vl.ground_token_ids`."""
        return ground_token_ids(self, images, token_ids, metadata=metadata, processor=processor, grounding=grounding)

    def grounding_token_maps(self, batch, token_ids, method: str, processor=None, image_features=None) -> list:
        """Per-token maps over the image patches by one attribution method; see `grounding_skinclip_vl`."""
        return grounding_token_maps(self, batch, token_ids, method, processor=processor, image_features=image_features)

    def teacher_forced_inputs(self, batch, token_ids) -> tuple[torch.Tensor, torch.Tensor, list]:
        """`prompt + token_ids[b]`, left padded; see `grounding_skinclip_vl.teacher_forced_inputs`."""
        return teacher_forced_inputs(self, batch, token_ids)

    def term_embeddings(self, terms, processor=None) -> torch.Tensor:
        """Cached frozen CLIP text embeddings of clinical terms; see `grounding_skinclip_vl.term_embeddings`."""
        return term_embeddings(self, terms, processor=processor)

    def rationale_log_probs(self, input_ids, attention_mask, image_features, positions) -> torch.Tensor:
        """Teacher-forced token log-probabilities (deletion curves); see `grounding_skinclip_vl.rationale_log_probs`."""
        return rationale_log_probs(self, input_ids, attention_mask, image_features, positions)

    def term_patch_similarity(self, patch_embeds: torch.Tensor, term_embeds: torch.Tensor) -> torch.Tensor:
        r"""
        Cosine similarity `(B, K, N)` between K term embeddings `t_k` (the frozen CLIP text space, `(K, d_align)`, or
        per image `(B, K, d_align)`) and the focal pooling's value projections `p_i W_v` of the N projected patches
        (the space in which `v_global` is aligned with `t_global`). `text_query` maps are
        `softmax(logit_scale * similarity)` over the patches; `L_ground` trains them.
        """
        values = nn.functional.normalize(self.focal_pooling.value_proj(patch_embeds).float(), dim=-1)  # (B, N, d)
        terms = nn.functional.normalize(term_embeds.float(), dim=-1)
        if terms.ndim == 2:
            return torch.einsum("kd,bnd->bkn", terms, values)
        return torch.einsum("bkd,bnd->bkn", terms, values)

    def grad_cam_patches(self, batch, targets=None) -> np.ndarray:
        r"""
        Tensor-level Grad-CAM over the frozen CLIP patch features `V` (B, N, d_v) for the class logit `targets[b]`
        (default: the predicted class): weights = mean over patches of d logit / d V, cam = relu(sum_c w_c V_c).
        Parameters get no gradients.

        Args:
            batch (`dict`): processor output with `input_ids`, `attention_mask` and `pixel_values`.
            targets (`list[int]`, *optional*): class index per sample.

        Returns:
            `np.ndarray` of shape `(batch_size, num_patches)`.
        """
        with torch.no_grad():
            features = self.get_image_features(batch["pixel_values"])
        features = features.detach().float().requires_grad_(True)
        with torch.enable_grad():
            outputs = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=features,
                           use_cache=False, logits_to_keep=1)
            logits = outputs.class_logits.float()
            if targets is None:
                targets = logits.argmax(dim=-1).tolist()
            index = torch.as_tensor(targets, device=logits.device).view(-1, 1)
            (grads,) = torch.autograd.grad(logits.gather(1, index).sum(), features)
        weights = grads.mean(dim=1, keepdim=True)  # (B, 1, d_v)
        cam = torch.relu((features.detach() * weights).sum(dim=-1))  # (B, N)
        return cam.cpu().numpy()

    def grad_cam(self, images, metadata=None, processor=None, targets=None) -> list:
        """Grad-CAM heatmaps ((H, W) float32 in [0, 1], input image size) of the class logits `targets` (class indices or
        labels; default the predicted classes): the baseline explanation the paper compares the grounded terms with."""
        processor = self.resolve_processor(processor)
        pil_images, metadata = prepare_images(images, metadata)
        batch = processor(images=pil_images, metadata=metadata, return_tensors="pt").to(self.device)
        if targets is not None:
            targets = [self.config.label2id[t] if isinstance(t, str) else int(t) for t in targets]
        was_training = self.training
        self.eval()
        try:
            cams = self.grad_cam_patches(batch, targets)
        finally:
            self.train(was_training)
        return processor.post_process_heatmaps(cams, [image.size for image in pil_images])

    def push_to_hub(self, repo_id: str, *args, processor=None, metrics=None, **kwargs):
        """With a LoRA adapter injected: `trainer.hub.push_adapter_to_hub` (adapter layout, processor files, model card;
        needs this repository's `trainer` package, which a saved model does not carry). Without one: the stock
        `PreTrainedModel.push_to_hub` (a full checkpoint)."""
        if not self.has_adapter():
            return PreTrainedModel.push_to_hub(self, repo_id, *args, **kwargs)
        allowed = ("private", "token", "revision", "commit_message", "create_pr", "license", "dataset_name")
        unknown = sorted(set(kwargs) - set(allowed))
        if args or unknown:
            raise TypeError(f"push_to_hub of an adapter model takes keyword arguments {allowed}; got {unknown or args}.")
        try:
            from trainer.hub import push_adapter_to_hub
        except ImportError as err:
            raise ImportError(
                "Pushing an adapter needs the SkinCLIP-VL repository's `trainer.hub` (model card, adapter layout), "
                "which a saved model does not carry: run from a checkout of the repository (or `pip install -e .` it)."
            ) from err
        return push_adapter_to_hub(self, processor, repo_id, metrics, **kwargs)


def _logits_to_keep_for_labels(labels: torch.Tensor, logits_to_keep: Union[int, torch.Tensor]) -> int:
    """How many last positions need LM logits for the loss on `labels`: from the position before the first labelled
    column of the batch to the end. A smaller explicit `logits_to_keep` cannot give the loss and raises."""
    if not isinstance(logits_to_keep, int):
        raise ValueError("`labels` cannot be combined with a tensor `logits_to_keep` (the loss needs the rationale span).")
    length = labels.shape[1]
    labelled = (labels != -100).any(dim=0)
    first = int(labelled.int().argmax()) if bool(labelled.any()) else length  # no label: the last position only
    needed = min(length - first + 1, length)
    if logits_to_keep == 0:
        return needed
    if logits_to_keep < needed:
        raise ValueError(
            f"LM loss needs logits for the last {needed} positions (the rationale span), but logits_to_keep="
            f"{logits_to_keep}; pass logits_to_keep=0 with `labels`."
        )
    return min(logits_to_keep, length)


def _eos_ids(tokenizer, eos_token_id) -> list:
    ids = eos_token_id if isinstance(eos_token_id, list) else ([eos_token_id] if eos_token_id is not None else [])
    for token in ("<|im_end|>", tokenizer.eos_token):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


class _quiet_load_reports:
    """Silence transformers' per-component load reports (the unused CLIP tower keys are expected)."""

    def __enter__(self):
        self.verbosity = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        logging.set_verbosity(self.verbosity)



SkinCLIPVLConfig.register_for_auto_class()
SkinCLIPVLForDiagnosis.register_for_auto_class("AutoModel")

__all__ = [
    "SkinCLIPVLForDiagnosis",
    "SkinCLIPVLPreTrainedModel",
    "SkinCLIPVLOutput",
    "FocalPooling",
    "SkinCLIPVLProjector",
    "LogitScale",
    # re-exported from adapters_skinclip_vl (called by users as `from modeling_skinclip_vl import apply_lora`)
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "save_adapter",
]
