# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Processor for SkinCLIP-VL: CLIP image processor + decoder tokenizer + CLIP tokenizer, and the metadata serializer."""

import math
import os
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Metadata -> text ("multimedia data bridging", paper III-A.2).
#
# Deterministic, bias-free templates: only age, sex and anatomical site are verbalised; a field that is missing, empty
# or NaN is said to be unknown, never guessed. Unknown keys are ignored here and listed by `unknown_metadata_keys`.
# The same function serves the dataset builders (training) and the processor (inference).
# --------------------------------------------------------------------------------------------------------------------

# raw column name (ISIC 2019, ISIC 2024, Derm7pt, HAM10000) -> canonical field
METADATA_KEY_ALIASES = {
    "age": "age",
    "age_approx": "age",
    "sex": "sex",
    "gender": "sex",
    "site": "site",
    "anatom_site_general": "site",
    "anatom_site_general_challenge": "site",
    "location": "site",
    "localization": "site",
}

# keys that are part of the metadata struct but deliberately not verbalised (source extras, ids, labels)
METADATA_SILENT_KEYS = {
    "image",
    "image_id",
    "isic_id",
    "lesion_id",
    "patient_id",
    "case_id",
    "case_num",
    "dataset",
    "elevation",
    "management",
    "level_of_diagnostic_difficulty",
    "notes",
    "tbp_lv_location",
    "tbp_lv_location_simple",
    "clin_size_long_diam_mm",
    "image_type",
    "tbp_tile_type",
    "attribution",
    "copyright_license",
    "dx",
    "dx_type",
    "diagnosis",
    "target",
    "label",
}

_SITE_PHRASES = {
    # ISIC 2019 / 2020 / 2024 anatom_site_general values
    "anterior torso": "the anterior torso",
    "posterior torso": "the posterior torso",
    "lateral torso": "the lateral torso",
    "upper extremity": "an upper extremity",
    "lower extremity": "a lower extremity",
    "head/neck": "the head or neck",
    "palms/soles": "the palms or soles",
    "oral/genital": "the oral or genital area",
    "torso": "the torso",
    # Derm7pt locations
    "abdomen": "the abdomen",
    "back": "the back",
    "chest": "the chest",
    "head neck": "the head or neck",
    "lower limbs": "a lower limb",
    "upper limbs": "an upper limb",
    "buttocks": "the buttocks",
    "acral": "acral skin",
    "genital areas": "the genital area",
    # HAM10000 localization values
    "face": "the face",
    "scalp": "the scalp",
    "ear": "the ear",
    "neck": "the neck",
    "trunk": "the trunk",
    "foot": "the foot",
    "hand": "the hand",
    "genital": "the genital area",
}

_SEX_WORDS = {"male": "male", "m": "male", "female": "female", "f": "female"}


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        if value != value:  # NaN of any float type (numpy float32/64 too), pandas NaT
            return True
    except (TypeError, ValueError):  # pandas.NA (its truth value is ambiguous), arrays: not a readable value
        return True
    if isinstance(value, str) and value.strip().lower() in {"", "nan", "none", "unknown", "null", "na", "n/a"}:
        return True
    return False


def canonical_metadata(metadata: Optional[dict]) -> dict:
    """Map a raw metadata row (any supported source's column names) to `{"age", "sex", "site"}`.

    Values that are missing or cannot be read are `None`. Ages are integers (ISIC gives them in 5-year steps).
    """
    out = {"age": None, "sex": None, "site": None}
    for key, value in (metadata or {}).items():
        field = METADATA_KEY_ALIASES.get(str(key).strip().lower())
        if field is None or _is_missing(value) or out[field] is not None:
            continue
        if field == "age":
            if isinstance(value, bool):
                continue
            try:
                age = float(value)
            except (TypeError, ValueError):
                continue
            if math.isnan(age) or age < 0 or age > 120:
                continue
            out["age"] = int(round(age))
        elif field == "sex":
            out["sex"] = _SEX_WORDS.get(str(value).strip().lower())
        elif isinstance(value, str):  # a site is a name; anything else (numbers, containers) cannot be read
            out["site"] = value.strip().lower().replace("_", " ")
    return out


def unknown_metadata_keys(metadata: Optional[dict]) -> list:
    """Keys of `metadata` that `serialize_metadata` neither verbalises nor knows as silent extras."""
    return sorted(
        str(k)
        for k in (metadata or {})
        if str(k).strip().lower() not in METADATA_KEY_ALIASES and str(k).strip().lower() not in METADATA_SILENT_KEYS
    )


def serialize_metadata(metadata: Optional[dict]) -> str:
    """Turn patient metadata into one deterministic, bias-free sentence.

    Example: `{"age_approx": 55, "sex": "male", "anatom_site_general": "posterior torso"}` ->
    `"A lesion on the posterior torso of a 55-year-old male patient."`. Missing fields are said to be unknown.
    """
    meta = canonical_metadata(metadata)
    site = meta["site"]
    if site is None:
        where = "at an unknown anatomical site"
    else:
        where = "on " + _SITE_PHRASES.get(site, "the " + site.replace("/", " or "))
    age, sex = meta["age"], meta["sex"]
    article = "an" if age is not None and (str(age).startswith("8") or age in (11, 18)) else "a"
    if age is not None and sex is not None:
        who = f"of {article} {age}-year-old {sex} patient"
    elif age is not None:
        who = f"of {article} {age}-year-old patient of unknown sex"
    elif sex is not None:
        who = f"of a {sex} patient of unknown age"
    else:
        who = "of a patient of unknown age and sex"
    return f"A lesion {where} {who}."


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def apply_temperature(logits, temperature: Optional[float]):
    """
    Divides class logits by the post-hoc calibration temperature (the one place it is applied: inference, evaluation,
    reports); returns the same type as `logits` (a numpy array in float64, or a torch tensor).

    Args:
        logits (`np.ndarray` or `torch.Tensor` of shape `(..., num_classes)`):
            Raw class logits.
        temperature (`float`, *optional*):
            Positive temperature (`config.calibration_temperature`); `None` returns `logits` unchanged.
    """
    if temperature is None:
        return logits
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature}.")
    if hasattr(logits, "softmax") and hasattr(logits, "detach"):  # a torch tensor (no torch import in this file)
        return logits / temperature
    return np.asarray(logits, dtype=np.float64) / temperature


def load_image(image) -> Image.Image:
    """Open `image` (path, PIL image or HxWxC uint8 array) as an RGB PIL image with EXIF orientation applied.

    16-bit and float images are rescaled to 8 bit, palette/grey/CMYK converted, alpha composited onto white.
    An unreadable file raises a `ValueError` naming it.
    """
    name = None
    if isinstance(image, (str, os.PathLike)):
        name = str(image)
        try:
            with Image.open(name) as handle:
                handle.load()
                image = handle.copy()
                exif = handle.getexif()
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"Cannot read image {name!r}: {err}") from err
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
        exif = None
    elif isinstance(image, Image.Image):
        exif = image.getexif()
    else:
        raise TypeError(f"Expected an image path, a PIL image or a numpy array, got {type(image).__name__}.")

    if exif and exif.get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            # fixed 16 -> 8 bit scaling keeps intensities comparable across images
            array = array / 257.0
        else:
            # 32-bit integer / float images have no fixed range: stretch to their own min-max
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.round().astype(np.uint8), mode="L")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = "You are a careful dermatology assistant."
DEFAULT_INSTRUCTION = "Describe the dermoscopic findings and give the diagnosis."
DEFAULT_PROMPT_TEMPLATE = (
    "<|im_start|>system\n{system_prompt}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|>{image_tokens}<|vision_end|>{metadata} {instruction}<|im_end|>\n"
    "<|im_start|>assistant\n{cls_token}"
)


class SkinCLIPVLProcessor(ProcessorMixin):
    r"""
    Builds SkinCLIP-VL inputs: CLIP pixel values, the decoder prompt with `N` image placeholders, the serialized
    metadata, the instruction and the [CLS] placeholder (left padded), the rationale labels, and the CLIP-tokenised
    alignment text.

    Args:
        image_processor (`CLIPImageProcessor`): the CLIP checkpoint's image processor.
        tokenizer (`Qwen2Tokenizer`): the decoder tokenizer (Qwen chat special tokens).
        align_tokenizer (`CLIPTokenizer`): the CLIP tokenizer for the alignment text.
        num_image_tokens (`int`, *optional*, defaults to 256): patches `N` of the vision tower.
        system_prompt (`str`, *optional*): system turn of the prompt.
        instruction (`str`, *optional*): the user instruction after the metadata sentence.
        prompt_template (`str`, *optional*): format string with `{system_prompt}`, `{image_tokens}`, `{metadata}`,
            `{instruction}` and `{cls_token}`; the default is Qwen's chat format.
        image_token (`str`, *optional*, defaults to `"<|image_pad|>"`), cls_token (`str`, *optional*, defaults to
            `"<|vision_pad|>"`), end_token (`str`, *optional*, defaults to `"<|im_end|>"`): placeholder and
            end-of-rationale tokens, all existing special tokens of the decoder tokenizer.
        align_max_length (`int`, *optional*, defaults to 77): CLIP text length; longer alignment texts are truncated
            and counted in `self.truncation_count`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        align_tokenizer=None,
        num_image_tokens: int = 256,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        instruction: str = DEFAULT_INSTRUCTION,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        image_token: str = "<|image_pad|>",
        cls_token: str = "<|vision_pad|>",
        end_token: str = "<|im_end|>",
        align_max_length: int = 77,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.system_prompt = system_prompt
        self.instruction = instruction
        self.prompt_template = prompt_template
        self.image_token = image_token
        self.cls_token = cls_token
        self.end_token = end_token
        self.align_max_length = int(align_max_length)
        self.truncation_count = 0
        super().__init__(image_processor, tokenizer, align_tokenizer, **kwargs)
        for token in (image_token, cls_token, end_token):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"The decoder tokenizer has no special token {token!r}.")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        self.cls_token_id = self.tokenizer.convert_tokens_to_ids(cls_token)
        self.end_token_id = self.tokenizer.convert_tokens_to_ids(end_token)

    @classmethod
    def from_components(cls, vision, decoder, **kwargs) -> "SkinCLIPVLProcessor":
        """Build the processor from the same CLIP and decoder checkpoints as `SkinCLIPVLForDiagnosis.from_components`."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        hub = {k: kwargs.pop(k) for k in ("token", "revision", "cache_dir", "local_files_only") if k in kwargs}
        vision_config = AutoConfig.from_pretrained(vision, **hub)
        vision_config = getattr(vision_config, "vision_config", vision_config)
        num_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
        return cls(
            image_processor=AutoImageProcessor.from_pretrained(vision, **hub),
            tokenizer=AutoTokenizer.from_pretrained(decoder, **hub),
            align_tokenizer=AutoTokenizer.from_pretrained(vision, **hub),
            num_image_tokens=num_image_tokens,
            **kwargs,
        )

    def build_prompt(self, metadata=None) -> str:
        """The prompt of one sample; `metadata` is a dict (serialized here), an already serialized string or `None`."""
        meta_text = metadata if isinstance(metadata, str) else serialize_metadata(metadata)
        return self.prompt_template.format(
            system_prompt=self.system_prompt,
            image_tokens=self.image_token * self.num_image_tokens,
            metadata=meta_text,
            instruction=self.instruction,
            cls_token=self.cls_token,
        )

    def __call__(
        self,
        images=None,
        metadata=None,
        reports=None,
        align_texts=None,
        return_tensors: Optional[str] = "pt",
        max_length: Optional[int] = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (paths, PIL images or arrays). Optional: with the feature cache the model gets
                `image_features` instead, and the prompt still carries the placeholders.
            metadata: one dict / string or a list of them (`None` entries: all fields unknown).
            reports: rationale targets; when given, `labels` are returned (-100 on prompt and padding).
            align_texts: alignment texts for the frozen CLIP text tower.
            max_length: truncate rationales so that no sequence is longer (the prompt is never truncated).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (left padded), `labels` (with `reports`),
            `pixel_values` (with `images`), `align_input_ids` / `align_attention_mask` (with `align_texts`).
        """
        batch_size = None
        for value in (images, metadata, reports, align_texts):
            if isinstance(value, (list, tuple)):
                batch_size = len(value)
                break
        single = batch_size is None
        batch_size = 1 if single else batch_size

        def as_list(value, name):
            if value is None:
                return None
            value = [value] if single or not isinstance(value, (list, tuple)) else list(value)
            if len(value) != batch_size:
                raise ValueError(f"`{name}` has {len(value)} entries but the batch has {batch_size}.")
            return value

        images, metadata = as_list(images, "images"), as_list(metadata, "metadata")
        reports, align_texts = as_list(reports, "reports"), as_list(align_texts, "align_texts")
        data = {}
        if images is not None:
            pil_images = [load_image(image) for image in images]
            data["pixel_values"] = self.image_processor(pil_images, return_tensors="pt")["pixel_values"]

        sequences, label_rows = [], []
        for i in range(batch_size):
            prompt_ids = self.tokenizer(self.build_prompt(metadata[i] if metadata else None), add_special_tokens=False)[
                "input_ids"
            ]
            if max_length is not None and len(prompt_ids) > max_length:
                raise ValueError(f"The prompt of sample {i} has {len(prompt_ids)} tokens, more than max_length={max_length}.")
            labels = [-100] * len(prompt_ids)
            if reports is not None:
                target = self.tokenizer(str(reports[i]), add_special_tokens=False)["input_ids"] + [self.end_token_id]
                if max_length is not None:
                    target = target[: max_length - len(prompt_ids)]
                prompt_ids = prompt_ids + target
                labels = labels + target
            sequences.append(prompt_ids)
            label_rows.append(labels)

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_token_id
        longest = max(len(seq) for seq in sequences)
        data["input_ids"] = [[pad_id] * (longest - len(seq)) + seq for seq in sequences]
        data["attention_mask"] = [[0] * (longest - len(seq)) + [1] * len(seq) for seq in sequences]
        if reports is not None:
            data["labels"] = [[-100] * (longest - len(row)) + row for row in label_rows]

        if align_texts is not None:
            data.update(self.tokenize_align_texts(align_texts))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def tokenize_align_texts(self, texts) -> dict:
        """CLIP-tokenise alignment texts (padded to the longest, truncated at `align_max_length` with a counted warning)."""
        texts = [str(t) for t in texts]
        full = self.align_tokenizer(texts, add_special_tokens=True)["input_ids"]
        truncated = sum(len(ids) > self.align_max_length for ids in full)
        if truncated:
            if self.truncation_count == 0:  # one warning per processor; the count goes on in `truncation_count`
                logger.warning(
                    f"{truncated} alignment text(s) exceed {self.align_max_length} CLIP tokens and were truncated "
                    f"(further truncations are counted in `processor.truncation_count`, not warned about)."
                )
            self.truncation_count += truncated
        encoded = self.align_tokenizer(texts, padding=True, truncation=True, max_length=self.align_max_length)
        return {"align_input_ids": encoded["input_ids"], "align_attention_mask": encoded["attention_mask"]}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "labels", "align_input_ids", "align_attention_mask"]


SkinCLIPVLProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "SkinCLIPVLProcessor",
    "serialize_metadata",
    "canonical_metadata",
    "unknown_metadata_keys",
    "load_image",
    "apply_temperature",
    "METADATA_KEY_ALIASES",
]
