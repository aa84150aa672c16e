# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""SkinCLIP-VL configuration."""

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
# Full class names as rationales state them ("Diagnosis: melanoma."); dataset_scripts.schema uses the same dict.
CLASS_FULL_NAMES = {
    "MEL": "melanoma",
    "NV": "melanocytic nevus",
    "BCC": "basal cell carcinoma",
    "AK": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
    "SCC": "squamous cell carcinoma",
}
MALIGNANT_CLASSES = ("MEL", "BCC", "SCC")

# Paper sizes, written out (transformers' own defaults are other models).
CLIP_VIT_L14_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}
CLIP_VIT_L14_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
}
QWEN2_5_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
SUPPORTED_DECODER_TYPES = ("qwen2_5_vl_text", "qwen2")
# Placeholder tokens: existing special tokens of the Qwen2/Qwen2.5(-VL) tokenizers (no new tokens, no embedding resize).
PLACEHOLDER_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "cls_token_id": "<|vision_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


class SkinCLIPVLConfig(PreTrainedConfig):
    r"""
    Configuration of [`SkinCLIPVLForDiagnosis`]: a frozen CLIP vision tower, a projector, focal attention pooling, a
    (LoRA-adapted) Qwen2.5-VL language model with a [CLS] classification head, and a frozen CLIP text tower for the
    alignment text. Defaults are the paper's: CLIP ViT-L/14 + the Qwen2.5-VL-7B language model.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to ViT-L/14 at 224 px.
        text_config (`dict` or `Qwen2_5_VLTextConfig` / `Qwen2Config`, *optional*):
            The decoder language model. Defaults to the Qwen2.5-VL-7B language model.
        align_config (`dict` or `CLIPTextConfig`, *optional*):
            The CLIP text tower (with its projection) that embeds the alignment text. Defaults to ViT-L/14's.
        vision_model_name_or_path (`str`, *optional*, defaults to `"openai/clip-vit-large-patch14"`):
            Hub id or local directory of the CLIP checkpoint (vision + text towers); used to rebuild the base model
            under an adapter.
        decoder_name_or_path (`str`, *optional*, defaults to `"Qwen/Qwen2.5-VL-7B-Instruct"`):
            Hub id or local directory of the decoder checkpoint.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index of the CLIP vision tower whose patch features are used (CLS dropped).
        projector_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (`Linear(d_v, d_m)`) or `"mlp"` (`Linear -> GELU -> Linear`).
        pooling_dim (`int`, *optional*):
            Query/key size `d_f` of focal pooling. Defaults to the decoder hidden size `d_m`.
        image_token_id (`int`, *optional*, defaults to 151655):
            Placeholder token (`<|image_pad|>`) whose positions receive the projected patch features.
        cls_token_id (`int`, *optional*, defaults to 151654):
            Placeholder token (`<|vision_pad|>`, unused by Qwen2.5-VL itself) whose position receives the learnable
            [CLS] embedding.
        vision_start_token_id (`int`, *optional*, defaults to 151652):
            `<|vision_start|>`.
        vision_end_token_id (`int`, *optional*, defaults to 151653):
            `<|vision_end|>`.
        lora_r (`int`, *optional*, defaults to 64):
            LoRA rank.
        lora_alpha (`int`, *optional*, defaults to 16):
            LoRA scaling numerator (`lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to 0.05):
            Dropout on the LoRA input.
        lora_target_modules (`list[str]`, *optional*, defaults to `["q_proj", "v_proj"]`):
            Decoder attention projections that receive LoRA (never the CLIP towers').
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial `log` temperature of the alignment similarity (CLIP's `ln(1/0.07)`).
        calibration_temperature (`float`, *optional*, defaults to 1.0):
            Post-hoc temperature fitted on validation; applied at inference only (`forward` returns raw logits).
        grounding_layers (`list[int]`, *optional*):
            Decoder layers whose attention maps are averaged for token grounding; defaults to the second half.
        decoder_quantization_config (`dict`, *optional*):
            The `BitsAndBytesConfig` (as a dict) the decoder language model was loaded with, so that an adapter
            checkpoint rebuilds the same (e.g. 4-bit NF4) base. Never applied to the CLIP towers or the new modules.
    """

    model_type = "skinclip_vl"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L14_VISION
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_5_vl_text", init_kwargs=QWEN2_5_VL_7B_TEXT),
        "align_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_text_model", init_kwargs=CLIP_VIT_L14_TEXT),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    align_config: dict | PreTrainedConfig | None = None
    vision_model_name_or_path: str = "openai/clip-vit-large-patch14"
    decoder_name_or_path: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    vision_feature_layer: int = -2
    projector_type: str = "linear"
    pooling_dim: int | None = None
    image_token_id: int = 151655
    cls_token_id: int = 151654
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    logit_scale_init_value: float = 2.6592
    calibration_temperature: float = 1.0
    grounding_layers: list[int] | None = None
    decoder_quantization_config: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.id2label is None and "num_labels" not in kwargs:
            self.id2label = dict(enumerate(ISIC2019_CLASSES))
        if self.label2id is None and self.id2label is not None:
            self.label2id = {name: int(i) for i, name in self.id2label.items()}
        if self.lora_target_modules is None:
            self.lora_target_modules = ["q_proj", "v_proj"]
        super().__post_init__(**kwargs)
        if self.pooling_dim is None:
            self.pooling_dim = self.text_config.hidden_size
        self.validate_skinclip()

    def validate_skinclip(self):
        """Raise a `ValueError` naming the field and value of the first invalid setting."""
        if self.text_config.model_type not in SUPPORTED_DECODER_TYPES:
            raise ValueError(
                f"text_config.model_type={self.text_config.model_type!r} is not supported; "
                f"use one of {SUPPORTED_DECODER_TYPES} (a Qwen2.5-VL or Qwen2/Qwen2.5 language model)."
            )
        if self.vision_config.model_type != "clip_vision_model":
            raise ValueError(f"vision_config.model_type must be 'clip_vision_model', got {self.vision_config.model_type!r}.")
        if self.align_config.model_type != "clip_text_model":
            raise ValueError(f"align_config.model_type must be 'clip_text_model', got {self.align_config.model_type!r}.")
        if self.projector_type not in ("linear", "mlp"):
            raise ValueError(f"projector_type must be 'linear' or 'mlp', got {self.projector_type!r}.")
        num_layers = self.vision_config.num_hidden_layers
        if not -num_layers - 1 <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is out of range for a vision tower with "
                f"{num_layers} layers (hidden states {-num_layers - 1}..{num_layers})."
            )
        for name in ("pooling_dim", "lora_r", "lora_alpha"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one decoder projection, e.g. ['q_proj', 'v_proj'].")
        if not self.calibration_temperature > 0:
            raise ValueError(f"calibration_temperature must be > 0, got {self.calibration_temperature!r}.")
        if self.num_labels < 2:
            raise ValueError(f"SkinCLIP-VL needs at least 2 classes in id2label, got {self.num_labels}.")
        special = {
            "image_token_id": self.image_token_id,
            "cls_token_id": self.cls_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }
        if len(set(special.values())) != len(special):
            raise ValueError(f"The placeholder token ids must be distinct, got {special}.")
        vocab = self.text_config.vocab_size
        for name, value in special.items():
            if not 0 <= value < vocab:
                raise ValueError(f"{name}={value} is outside the decoder vocabulary (size {vocab}).")
        if self.grounding_layers is not None:
            n = self.text_config.num_hidden_layers
            bad = [i for i in self.grounding_layers if not -n <= i < n]
            if bad:
                raise ValueError(f"grounding_layers {bad} are out of range for a decoder with {n} layers.")

    @property
    def image_seq_length(self) -> int:
        """Number of patch tokens `N` the vision tower yields (CLS dropped)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2


__all__ = ["SkinCLIPVLConfig", "ISIC2019_CLASSES", "CLASS_FULL_NAMES", "MALIGNANT_CLASSES", "PLACEHOLDER_TOKENS"]
