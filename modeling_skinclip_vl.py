# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""SkinCLIP-VL: frozen CLIP perception, focal pooling, a LoRA-adapted Qwen2.5-VL decoder with a [CLS] head.

The inference path reads top to bottom: projector -> focal pooling -> model (forward, generate) -> building from
components -> LoRA -> saving and loading adapters -> diagnosis with grounded rationales.
"""

import os
import re
from dataclasses import dataclass
from typing import Optional, Union

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
from transformers.utils.hub import cached_file

try:
    from .configuration_skinclip_vl import PLACEHOLDER_TOKENS, SkinCLIPVLConfig
except ImportError:  # imported as a top-level module (the repository itself) rather than as remote code
    from configuration_skinclip_vl import PLACEHOLDER_TOKENS, SkinCLIPVLConfig


logger = logging.get_logger(__name__)

# Trainable non-LoRA modules; PEFT keeps trained copies of them in the adapter (`modules_to_save`).
TRAINABLE_MODULES = ["multi_modal_projector", "focal_pooling", "cls_embedding", "classifier", "logit_scale"]
ADAPTER_SUBFOLDER = "adapter"
_HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download", "proxies")


def lora_target_pattern(target_modules) -> str:
    """Regex (PEFT full-match) that selects the decoder's attention projections and can never match the CLIP towers."""
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"language_model\.layers\.\d+\.self_attn\.({names})"


@dataclass
class SkinCLIPVLOutput(ModelOutput):
    r"""
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Causal LM loss on the rationale tokens (per-token mean, or sum / `num_items_in_batch`).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            LM logits (what `generate()` reads); only the last `logits_to_keep` positions when that is set.
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
                Rationale token labels, -100 on the prompt and padding.
            logits_to_keep (`int`, *optional*, defaults to 0):
                Compute LM logits for the last `logits_to_keep` positions only (0 = all). Evaluation of the classifier
                passes 1, so the B x L x V logits are never built.
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

        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError(
                    f"LM loss needs logits for every position: logits: {logits.shape[1]}, labels: {labels.shape[1]} "
                    "(do not combine `labels` with `logits_to_keep`)."
                )
            loss = ForCausalLMLoss(
                logits, labels, vocab_size=self.config.text_config.vocab_size, num_items_in_batch=num_items_in_batch
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
                vision_config=vision_tower.config,
                text_config=text_config,
                align_config=align_tower.config,
                vision_model_name_or_path=vision,
                decoder_name_or_path=decoder,
                **token_ids,
                **config_overrides,
            )
        else:
            _check_components_match(config, vision_tower.config, text_config, align_tower.config, vision, decoder)
            config.vision_config, config.text_config, config.align_config = (
                vision_tower.config,
                text_config,
                align_tower.config,
            )
            for key, value in config_overrides.items():
                setattr(config, key, value)
        if quantization_config is not None:
            config.decoder_quantization_config = quantization_config.to_dict()
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation

        model = cls(
            config,
            vision_tower=vision_tower,
            align_tower=align_tower,
            language_model=language_model,
            lm_head=lm_head,
        )
        del full
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
        if not is_main_process:
            return
        from transformers.dynamic_module_utils import custom_object_save

        if self._auto_class is not None:
            custom_object_save(self, save_directory, config=self.config)
            _copy_remote_code(save_directory)
        self.config.architectures = [self.__class__.__name__]
        self.config.save_pretrained(save_directory)
        self.generation_config.save_pretrained(save_directory)
        save_adapter(self, os.path.join(save_directory, ADAPTER_SUBFOLDER))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        r"""
        Load a saved SkinCLIP-VL. An adapter checkpoint (an `adapter/` subfolder, local or on the Hub) is rebuilt from
        the component names in its config ([`from_components`]) and the adapter is applied; a full save loads as any
        `PreTrainedModel`. Extra keyword arguments for adapter checkpoints: `quantization_config` (defaults to the
        recorded `decoder_quantization_config`), `is_trainable` (LoRA trainable after loading), `vision` / `decoder`
        (override the component locations, e.g. local copies).
        """
        hub = {k: kwargs[k] for k in _HUB_KWARGS + ("revision", "subfolder") if kwargs.get(k) is not None}
        adapter_config_file = cached_file(
            pretrained_model_name_or_path,
            f"{ADAPTER_SUBFOLDER}/adapter_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub,
        )
        if adapter_config_file is None:
            for key in ("vision", "decoder", "is_trainable"):
                kwargs.pop(key, None)
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

        config = kwargs.pop("config", None)
        if not isinstance(config, SkinCLIPVLConfig):
            config = SkinCLIPVLConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        quantization_config = kwargs.pop("quantization_config", None)
        if quantization_config is None and config.decoder_quantization_config:
            from transformers import BitsAndBytesConfig

            quantization_config = BitsAndBytesConfig.from_dict(dict(config.decoder_quantization_config))
        component_hub = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in kwargs}
        model = cls.from_components(
            vision=kwargs.pop("vision", None) or config.vision_model_name_or_path,
            decoder=kwargs.pop("decoder", None) or config.decoder_name_or_path,
            quantization_config=quantization_config,
            config=config,
            dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
            device_map=kwargs.get("device_map"),
            attn_implementation=kwargs.get("attn_implementation"),
            **component_hub,
        )
        return load_adapter(
            model,
            pretrained_model_name_or_path,
            is_trainable=kwargs.get("is_trainable", False),
            **{k: v for k, v in hub.items() if k != "subfolder"},
        )


REMOTE_CODE_FILES = ("configuration_skinclip_vl.py", "modeling_skinclip_vl.py", "processing_skinclip_vl.py")


def _copy_remote_code(save_directory):
    """Copy all three remote-code files (DESIGN.md: every checkpoint carries them; `custom_object_save` copies only
    the model file and what it imports, which leaves out the processor's file)."""
    import shutil

    here = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        source, target = os.path.join(here, name), os.path.join(save_directory, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copy(source, target)


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


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:  # pragma: no cover - exercised only without peft
        raise ImportError("LoRA adapters need `peft` (pip install peft==0.21.2).") from err
    return peft


def apply_lora(
    model: SkinCLIPVLForDiagnosis,
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
    target_modules = list(target_modules or config.lora_target_modules)
    lora_config = peft.LoraConfig(
        r=r or config.lora_r,
        lora_alpha=lora_alpha or config.lora_alpha,
        lora_dropout=config.lora_dropout if lora_dropout is None else lora_dropout,
        target_modules=lora_target_pattern(target_modules),
        modules_to_save=list(modules_to_save or TRAINABLE_MODULES),
        bias="none",
    )
    config.lora_r, config.lora_alpha, config.lora_target_modules = lora_config.r, lora_config.lora_alpha, target_modules
    if is_decoder_quantized(model):
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


def save_adapter(model: SkinCLIPVLForDiagnosis, adapter_dir: str, adapter_name: str = "default"):
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


def load_adapter(model: SkinCLIPVLForDiagnosis, model_id, is_trainable: bool = False, **hub_kwargs):
    """Apply the `adapter/` of `model_id` (local dir or Hub id) to `model` in place and return `model`."""
    peft = _require_peft()
    peft_model = peft.PeftModel.from_pretrained(
        model, str(model_id), subfolder=ADAPTER_SUBFOLDER, is_trainable=is_trainable, **hub_kwargs
    )
    inner = peft_model.base_model.model
    if not is_trainable:
        inner.eval()
    return inner


SkinCLIPVLConfig.register_for_auto_class()
SkinCLIPVLForDiagnosis.register_for_auto_class("AutoModel")

__all__ = [
    "SkinCLIPVLForDiagnosis",
    "SkinCLIPVLPreTrainedModel",
    "SkinCLIPVLOutput",
    "FocalPooling",
    "SkinCLIPVLProjector",
    "LogitScale",
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "save_adapter",
    "lora_target_pattern",
    "TRAINABLE_MODULES",
]
