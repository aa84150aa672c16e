# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Processor for SkinCLIP-VL: CLIP image processor + decoder tokenizer + CLIP tokenizer, the metadata serializer, and the
post-processing of the model's outputs into diagnoses with grounded clinical terms (`post_process_diagnosis`)."""

import math
import os
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

try:
    from .configuration_skinclip_vl import CLASS_FULL_NAMES, KNOWN_MALIGNANT_CLASSES, class_full_name
except ImportError:  # imported as a top-level module (the repository itself) rather than as remote code
    from configuration_skinclip_vl import CLASS_FULL_NAMES, KNOWN_MALIGNANT_CLASSES, class_full_name

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


_SITE_PHRASES.update({
    # PAD-UFES-20 regions (the others are above)
    "arm": "the arm", "forearm": "the forearm", "thigh": "the thigh", "leg": "the leg", "nose": "the nose",
    "lip": "the lip",
})
_SITE_ALIASES: dict = {}  # other spellings -> a key of _SITE_PHRASES

AGE_RANGE = (0, 120)


def _read_metadata(metadata: Optional[dict]) -> tuple[dict, list]:
    """`(canonical values, [(field, raw value), ...] of the values given but not understood)`."""
    out = {"age": None, "sex": None, "site": None}
    rejected = []
    for key, value in (metadata or {}).items():
        field = METADATA_KEY_ALIASES.get(str(key).strip().lower())
        if field is None or _is_missing(value) or out[field] is not None:
            continue
        if field == "age":
            try:
                age = None if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                age = None
            if age is None or not math.isfinite(age) or not AGE_RANGE[0] <= age <= AGE_RANGE[1]:
                rejected.append(("age", value))
                continue
            out["age"] = int(round(age))
        elif field == "sex":
            sex = _SEX_WORDS.get(str(value).strip().lower())
            if sex is None:
                rejected.append(("sex", value))
            out["sex"] = sex
        else:
            site = value.strip().lower().replace("_", " ") if isinstance(value, str) else None
            site = _SITE_ALIASES.get(site, site)
            if site not in _SITE_PHRASES:  # a site is a known name; others would put free text into the prompt
                rejected.append(("site", value))
                continue
            out["site"] = site
    return out, rejected


def canonical_metadata(metadata: Optional[dict]) -> dict:
    """Map a raw metadata row (any supported source's column names) to `{"age", "sex", "site"}`.

    Values that are missing or not understood are `None` (ages outside 0-120, sexes other than male/female, sites
    that are not a known anatomical site name; `metadata_warnings` lists the ones given). Ages are integers (ISIC
    gives them in 5-year steps).
    """
    return _read_metadata(metadata)[0]


def metadata_warnings(metadata: Optional[dict]) -> list:
    """One warning per metadata value that was given but is not understood (and is therefore used as unknown)."""
    messages = {
        "age": f"a number from {AGE_RANGE[0]} to {AGE_RANGE[1]}",
        "sex": "male or female",
        "site": "a known anatomical site, e.g. 'anterior torso'",
    }
    return [
        f"metadata {field} {value!r} is not understood (expected {messages[field]}); used as unknown"
        for field, value in _read_metadata(metadata)[1]
    ]


def metadata_rejections(metadata: Optional[dict]) -> list:
    """The canonical field names (`age`, `sex`, `site`) whose given value was not understood."""
    return [field for field, _ in _read_metadata(metadata)[1]]


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
    if isinstance(logits, torch.Tensor):
        return logits / temperature
    return np.asarray(logits, dtype=np.float64) / temperature


def _open_image(image, draft: bool = False) -> Image.Image:
    """A loaded PIL image, unconverted, from a path, raw bytes or a `datasets` image dict (`{"bytes", "path"}`).
    `draft`: decode JPEGs at 1/8 scale (every compressed byte is still read: for verification)."""
    import io

    if isinstance(image, dict):  # a `datasets.Image(decode=False)` value: embedded bytes, else the file path
        source, name = (io.BytesIO(image["bytes"]), image.get("path") or "<embedded bytes>") if image.get("bytes") \
            else (image.get("path"), image.get("path"))
        if source is None:
            raise ValueError("Cannot read image: the row has neither bytes nor a path.")
    elif isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "<bytes>"
    else:
        source = name = str(image)
    try:
        with Image.open(source) as handle:
            if draft and handle.format == "JPEG":
                handle.draft(handle.mode, (max(1, handle.width // 8), max(1, handle.height // 8)))
            handle.load()
            return _detach(handle)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot read image {name!r}: {err}") from err


def _detach(handle) -> Image.Image:
    image = handle.copy()
    image.info = dict(handle.info)
    image._exif = handle.getexif()
    return image


def load_image(image, draft: bool = False) -> Image.Image:
    """Open `image` as an RGB PIL image with EXIF orientation applied: the one image loader of training, the feature
    cache, augmentation, evaluation, `predict.py`, the web demo and `prepare`'s verification.

    `image` is a path, raw bytes, a `datasets` image value (`{"bytes", "path"}`, as `Image(decode=False)` gives), a
    PIL image or an HxWxC uint8 array. 16-bit and float images are rescaled to 8 bit, palette/grey/CMYK converted,
    alpha composited onto white. An unreadable file (truncated, not an image, over PIL's decompression-bomb limit)
    raises a `ValueError` naming it. `draft=True` decodes JPEGs at 1/8 scale (`prepare`'s verification).
    """
    if isinstance(image, (str, os.PathLike, dict, bytes, bytearray)):
        image = _open_image(image, draft=draft)
        exif = image.getexif()
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


def prepare_images(images, metadata) -> tuple[list, list]:
    """One RGB PIL image per input (`load_image`: paths, PIL images, arrays) and one metadata entry per image (a single
    dict, string or `None` is given to every image): what `diagnose`, `grad_cam` and the grounding entry points take."""
    single = not isinstance(images, (list, tuple))
    images = [images] if single else list(images)
    if not images:
        raise ValueError("No images were given.")
    if metadata is None or isinstance(metadata, (dict, str)):
        metadata = [metadata] * len(images)
    if len(metadata) != len(images):
        raise ValueError(f"images: {len(images)}, metadata entries: {len(metadata)}; give one metadata per image.")
    return [load_image(image) for image in images], list(metadata)


MIN_IMAGE_SIDE = 32


def image_warnings(image) -> list:
    """Warnings for an image that cannot carry a diagnosis: tiny (shorter side under `MIN_IMAGE_SIDE` px), fully
    transparent, or blank (one colour after `load_image`). `image` is anything `load_image` takes."""
    raw = _open_image(image) if isinstance(image, (str, os.PathLike, dict, bytes, bytearray)) else image
    if isinstance(raw, np.ndarray):
        raw = Image.fromarray(raw)
    out = []
    width, height = raw.size
    if min(width, height) < MIN_IMAGE_SIDE:
        out.append(f"the image is tiny ({width} x {height} px, under {MIN_IMAGE_SIDE} px): too small to show a lesion")
    if raw.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (raw.mode == "P" and "transparency" in raw.info):
        alpha = raw.convert("RGBA").getchannel("A")
        if alpha.getextrema()[1] == 0:
            out.append("the image is fully transparent: there is nothing to see (it is read as a white sheet)")
            return out
    low, high = zip(*load_image(raw).getextrema())
    if max(h - lo for lo, h in zip(low, high)) <= 2:
        out.append("the image is blank (one colour): there is no lesion to diagnose")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Post-processing: the diagnosis output, clinical terms of a rationale, patch maps -> heatmaps on the input image.
#
# `SkinCLIPVLForDiagnosis.diagnose` computes tensors (class logits, focal weights, rationale tokens and their attention
# to the image patches); `SkinCLIPVLProcessor.post_process_diagnosis` turns them into `Diagnosis` objects, as
# `Kosmos2Processor.post_process_generation` does for grounded text.
# --------------------------------------------------------------------------------------------------------------------

# Clinical vocabulary whose mentions in a rationale get one heatmap each: the 7-point checklist criteria, the ABCD /
# pattern-analysis structures of the ISIC classes, and colours. Matching is case-insensitive, treats "-" and " " alike,
# and prefers the longest term at a position ("irregular dots and globules" over "dots and globules").
CLINICAL_TERMS = (
    # 7-point checklist (Argenziano) and its values
    "atypical pigment network", "typical pigment network", "pigment network", "negative network", "blue-whitish veil",
    "atypical vascular pattern", "irregular streaks", "regular streaks", "streaks", "irregular pigmentation",
    "irregular dots and globules", "regular dots and globules", "dots and globules", "regression structures",
    "blotch",
    # ABCD rule and global features
    "asymmetry", "irregular border", "color variegation", "colour variegation",
    # structures of the other classes
    "arborizing vessels", "dotted vessels", "hairpin vessels", "comma vessels", "linear irregular vessels",
    "glomerular vessels", "vessels", "blue-gray ovoid nests", "leaf-like areas", "spoke-wheel areas", "ulceration",
    "milia-like cysts", "comedo-like openings", "fissures and ridges", "red lagoons", "central white patch",
    "shiny white structures", "surface scale", "scale", "globules", "dots", "peppering", "shiny white lines",
    # colours
    "blue-white", "blue-gray", "light brown", "dark brown", "brown", "black", "blue", "gray", "grey", "red", "pink",
    "white", "yellow",
)

# Attribution methods that give a clinical term its map over the patch grid (`SkinCLIPVLForDiagnosis.diagnose`):
# - "attention": the term tokens' decoder attention to the image positions, mean over heads and grounding layers;
# - "grad_attention": gradient-weighted attention rollout through the decoder layers for the term tokens'
#   log-probabilities (Chefer et al. 2021), restricted to the image positions;
# - "hidden_similarity": cosine similarity between the term tokens' hidden states and the image positions' hidden
#   states at the grounding layers;
# - "text_query": the term's frozen CLIP text embedding as the query of focal-pooling attention over the projected
#   patches' value projections (the alignment space of `L_align` and `L_ground`; no decoder pass).
GROUNDING_METHODS = ("attention", "grad_attention", "hidden_similarity", "text_query")
DEFAULT_GROUNDING_METHOD = "text_query"  # best pointing game with deletion > 0 in docs/grounding.md (goal not reached)


@dataclass
class GroundedTerm:
    r"""
    A clinical term of the rationale with the image region its tokens attend to.

    Args:
        term (`str`): the vocabulary entry (`CLINICAL_TERMS`) that matched.
        text (`str`): the words as generated.
        token_span (`tuple[int, int]`): `[start, end)` indices into `Diagnosis.tokens` (the generated tokens).
        char_span (`tuple[int, int]`): `[start, end)` character offsets into `Diagnosis.rationale`.
        heatmap (`np.ndarray` of shape `(height, width)`, float32 in [0, 1]): mean over the term's tokens of their
            attention to the image patches (see `SkinCLIPVLForDiagnosis.diagnose`), upsampled to the input image.
        peak (`tuple[int, int]`): `(x, y)` pixel of the heatmap's maximum, in input image coordinates.
        method (`str`, *optional*): the attribution method that made the map (`GROUNDING_METHODS`).
        patch_map (`np.ndarray` of shape `(grid, grid)`, *optional*): the term's map over the patch grid (sums to 1),
            before upsampling.
    """

    term: str
    text: str
    token_span: tuple
    char_span: tuple
    heatmap: np.ndarray
    peak: tuple
    method: Optional[str] = None
    patch_map: Optional[np.ndarray] = None


@dataclass
class Diagnosis:
    r"""
    What `SkinCLIPVLForDiagnosis.diagnose` returns per image.

    Args:
        probabilities (`dict[str, float]`): class -> probability, `softmax(class_logits / config.calibration_temperature)`.
        prediction (`str`): the most probable class (e.g. `"MEL"`).
        confidence (`float`): its probability.
        malignancy_score (`float`): `P(MEL) + P(BCC) + P(SCC)`.
        rationale (`str`, *optional*): the generated rationale (greedy), `None` when not asked for.
        stated_diagnosis (`str`, *optional*): the class named by the rationale's closing "Diagnosis: <name>." sentence.
        grounded_terms (`list[GroundedTerm]`): the clinical terms of the rationale with their heatmaps.
        focal_map (`np.ndarray` of shape `(height, width)`, *optional*): the focal pooling weights `alpha`, upsampled.
        grad_cam (`np.ndarray` of shape `(height, width)`, *optional*): Grad-CAM of the predicted class (when asked for).
        tokens (`list[str]`): the generated tokens (decoded one by one), end token excluded.
        token_ids (`list[int]`): their ids.
        token_maps (`np.ndarray` of shape `(num_tokens, grid, grid)`, *optional*): per generated token, its attention
            to the image patches (rows sum to 1; NaN for a last token cut by `max_new_tokens`, never processed).
        image_size (`tuple[int, int]`): `(width, height)` of the input image (the heatmaps' size).
        warnings (`list[str]`): e.g. the rationale names another diagnosis than the classification head.
    """

    probabilities: dict
    prediction: str
    confidence: float
    malignancy_score: float
    rationale: Optional[str] = None
    stated_diagnosis: Optional[str] = None
    grounded_terms: list = dataclass_field(default_factory=list)
    focal_map: Optional[np.ndarray] = None
    grad_cam: Optional[np.ndarray] = None
    tokens: list = dataclass_field(default_factory=list)
    token_ids: list = dataclass_field(default_factory=list)
    token_maps: Optional[np.ndarray] = None
    image_size: Optional[tuple] = None
    warnings: list = dataclass_field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready summary: per grounded term its patch-grid map (rows of the grid, summing to 1), peak and method
        (the upsampled heatmaps are left out)."""
        return {
            "probabilities": {k: float(v) for k, v in self.probabilities.items()},
            "prediction": self.prediction,
            "confidence": float(self.confidence),
            "malignancy_score": float(self.malignancy_score),
            "rationale": self.rationale,
            "stated_diagnosis": self.stated_diagnosis,
            "grounded_terms": [
                {
                    "term": t.term,
                    "text": t.text,
                    "token_span": list(t.token_span),
                    "char_span": list(t.char_span),
                    "peak": {"x": int(t.peak[0]), "y": int(t.peak[1])},
                    "method": t.method,
                    "map": None if t.patch_map is None else np.round(np.asarray(t.patch_map, dtype=float), 6).tolist(),
                }
                for t in self.grounded_terms
            ],
            "image_size": list(self.image_size) if self.image_size else None,
            "warnings": list(self.warnings),
        }


def stated_diagnosis(rationale: Optional[str], id2label: Optional[dict] = None) -> Optional[str]:
    """The class named by the last "Diagnosis: <full name or code>." sentence of `rationale`, or `None`."""
    if not rationale:
        return None
    found = re.findall(r"diagnosis\s*:\s*([^.\n]+)", rationale, flags=re.IGNORECASE)
    if not found:
        return None
    name = " ".join(found[-1].strip().lower().split())
    labels = list((id2label or {}).values()) or list(CLASS_FULL_NAMES)
    for label in labels:
        if name in (str(label).lower(), class_full_name(label).lower()):
            return label
    return None


def _term_pattern():
    def one(term):
        words = [re.escape(w) for w in re.split(r"[\s-]+", term)]
        return r"[\s-]*".join(words)

    terms = sorted(CLINICAL_TERMS, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(f"(?P<t{i}>{one(t)})" for i, t in enumerate(terms)) + r")(?![\w-])",
                      flags=re.IGNORECASE), terms


_TERM_REGEX, _TERM_ORDER = _term_pattern()


def find_clinical_terms(text: str) -> list:
    """`[(term, matched_text, (start, end))]` of the `CLINICAL_TERMS` in `text`, left to right, non-overlapping."""
    out = []
    for match in _TERM_REGEX.finditer(text or ""):
        index = next(int(k[1:]) for k, v in match.groupdict().items() if v is not None)
        out.append((_TERM_ORDER[index], match.group(0), match.span()))
    return out


def _token_char_spans(tokenizer, token_ids) -> tuple[str, list, list]:
    """Decode `token_ids` incrementally: (text, per-token `(start, end)` character spans, per-token strings)."""
    spans, pieces, previous = [], [], ""
    for k in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: k + 1], skip_special_tokens=True)
        start = len(os.path.commonprefix([previous, text]))
        spans.append((start, len(text)))
        pieces.append(text[start:])
        previous = text
    return previous, spans, pieces


def clinical_term_token_spans(tokenizer, token_ids) -> tuple[str, list, list]:
    """Decode `token_ids` and locate the `CLINICAL_TERMS` mentions: `(text, pieces, terms)` with the per-token strings
    `pieces` and `terms = [(term, matched_text, (char_start, char_end), [token indices])]`, left to right."""
    text, spans, pieces = _token_char_spans(tokenizer, token_ids)
    terms = []
    for term, matched, (c0, c1) in find_clinical_terms(text):
        tokens = [k for k, (s, e) in enumerate(spans) if e > s and s < c1 and e > c0]
        if tokens:
            terms.append((term, matched, (c0, c1), tokens))
    return text, pieces, terms


# ------------------------------------------------------------------ heatmaps
def _size_field(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def patch_grid_box(image_processor, width: int, height: int) -> tuple[float, float, float, float]:
    """`(left, top, box_width, box_height)` of the region of a `width` x `height` image that the vision tower sees
    (the image processor's resize then centre crop, mapped back to input pixels)."""
    size = getattr(image_processor, "size", None)
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_resize", True) and _size_field(size, "shortest_edge"):
        scale_x = scale_y = _size_field(size, "shortest_edge") / min(width, height)
    elif getattr(image_processor, "do_resize", True) and _size_field(size, "height"):
        scale_x, scale_y = _size_field(size, "width") / width, _size_field(size, "height") / height
    else:
        scale_x = scale_y = 1.0
    resized_w, resized_h = width * scale_x, height * scale_y
    if getattr(image_processor, "do_center_crop", False) and _size_field(crop, "height"):
        crop_w, crop_h = _size_field(crop, "width"), _size_field(crop, "height")
    else:
        crop_w, crop_h = resized_w, resized_h
    left, top = (resized_w - crop_w) / 2 / scale_x, (resized_h - crop_h) / 2 / scale_y
    return left, top, crop_w / scale_x, crop_h / scale_y


def patch_map_to_heatmap(values, image_size: tuple, box: Optional[tuple] = None) -> np.ndarray:
    """Upsample an N-patch map (N a square) bilinearly onto the `box` region of an image of `image_size` = (W, H).
    Returns a float32 (H, W) array scaled to max 1 (all zeros stays zeros); pixels outside the box are 0."""
    values = torch.as_tensor(np.asarray(values, dtype=np.float32))
    grid = values.reshape(-1)
    side = int(round(math.sqrt(grid.numel())))
    if side * side != grid.numel():
        raise ValueError(f"A patch map needs a square number of patches, got {grid.numel()}.")
    width, height = int(image_size[0]), int(image_size[1])
    left, top, box_w, box_h = box if box is not None else (0.0, 0.0, float(width), float(height))
    tw, th = max(1, int(round(box_w))), max(1, int(round(box_h)))
    up = torch.nn.functional.interpolate(
        torch.nan_to_num(grid).reshape(1, 1, side, side), size=(th, tw), mode="bilinear", align_corners=False
    )[0, 0].clamp(min=0).numpy()
    heatmap = np.zeros((height, width), dtype=np.float32)
    x0, y0 = int(round(left)), int(round(top))
    xs, ys, xe, ye = max(0, x0), max(0, y0), min(width, x0 + tw), min(height, y0 + th)
    if xe > xs and ye > ys:
        heatmap[ys:ye, xs:xe] = up[ys - y0 : ye - y0, xs - x0 : xe - x0]
    peak = float(heatmap.max())
    return heatmap / peak if peak > 0 else heatmap


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, int]:
    """`(x, y)` of the maximum of a (H, W) heatmap."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)



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

    # ------------------------------------------------------------------ post-processing
    def post_process_heatmaps(self, patch_maps, image_sizes) -> list:
        """Upsample per-image N-patch maps (e.g. Grad-CAM) onto the region of each input image the vision tower sees:
        one float32 (H, W) heatmap in [0, 1] per `(width, height)` of `image_sizes`."""
        return [
            patch_map_to_heatmap(values, size, patch_grid_box(self.image_processor, *size))
            for values, size in zip(patch_maps, image_sizes)
        ]

    def ground_terms(self, token_ids, token_maps, image_size: tuple, method: Optional[str] = None) -> tuple[str, list, list]:
        r"""
        Decode `token_ids` and give every `CLINICAL_TERMS` mention the mean heatmap of its tokens.

        Args:
            token_ids (`list[int]`): rationale tokens (no end token).
            token_maps (`np.ndarray` of shape `(num_tokens, grid, grid)`, *optional*): each token's attention to the image
                patches (NaN rows are skipped). `None`: no terms.
            image_size (`tuple[int, int]`): `(width, height)` of the input image.
            method (`str`, *optional*): the attribution method that made `token_maps` (recorded per term).

        Returns:
            `(text, tokens, grounded_terms)`: the decoded text, the per-token strings and a `list[GroundedTerm]`.
        """
        text, pieces, found = clinical_term_token_spans(self.tokenizer, token_ids)
        box = patch_grid_box(self.image_processor, *image_size)
        terms = []
        for term, matched, (c0, c1), tokens in found:
            usable = [k for k in tokens if token_maps is not None and not np.isnan(token_maps[k]).any()]
            if not usable:
                continue
            patch_map = np.mean([token_maps[k] for k in usable], axis=0).astype(np.float32)
            total = float(patch_map.sum())
            patch_map = patch_map / total if total > 0 else np.full_like(patch_map, 1.0 / patch_map.size)
            heatmap = patch_map_to_heatmap(patch_map, image_size, box)
            terms.append(
                GroundedTerm(term=term, text=matched, token_span=(tokens[0], tokens[-1] + 1), char_span=(c0, c1),
                             heatmap=heatmap, peak=heatmap_peak(heatmap), method=method, patch_map=patch_map)
            )
        return text, pieces, terms

    def post_process_diagnosis(
        self,
        class_logits,
        image_sizes,
        id2label: dict,
        temperature: Optional[float] = None,
        pooling_attention=None,
        token_ids=None,
        token_maps=None,
        eos_token_id=None,
        generated: bool = True,
        metadata=None,
        grounding_method: Optional[str] = None,
    ) -> list:
        r"""
        Turn `SkinCLIPVLForDiagnosis` outputs into one [`Diagnosis`] per image (the counterpart of
        `Kosmos2Processor.post_process_generation` for grounded text).

        Args:
            class_logits (`torch.Tensor` of shape `(batch_size, num_labels)`):
                Raw class scores (`SkinCLIPVLOutput.class_logits`); probabilities are
                `softmax(apply_temperature(class_logits, temperature))`.
            image_sizes (`list[tuple[int, int]]`):
                `(width, height)` of every input image (the heatmaps' size).
            id2label (`dict[int, str]`):
                `config.id2label`.
            temperature (`float`, *optional*):
                The calibration temperature (`config.calibration_temperature`); `None`: none.
            pooling_attention (`torch.Tensor` of shape `(batch_size, num_patches)`, *optional*):
                The focal pooling weights, upsampled into `Diagnosis.focal_map`.
            token_ids (`torch.Tensor` of shape `(batch_size, T)` or a list of `list[int]`, *optional*):
                The rationale tokens of every image; `None`: no rationale.
            token_maps (`np.ndarray` of shape `(batch_size, T, num_patches)` or a list of `(T_b, num_patches)` arrays, *optional*):
                Each rationale token's attention to the image patches; `None`: no grounding.
            eos_token_id (`int` or `list[int]`, *optional*):
                End tokens: a generated rationale ends before the first.
            generated (`bool`, *optional*, defaults to `True`):
                The tokens are the model's own greedy rationale: cut at the end token, stripped, and checked (a warning
                when it was cut at the length limit, states no diagnosis, or states another class than the head).
                `False` for a given (teacher-forced) text: kept as it is, no checks.
            metadata (*optional*):
                The metadata of every image; keys of a dict that are not verbalised get a warning.
            grounding_method (`str`, *optional*):
                The attribution method that made `token_maps` (`GROUNDING_METHODS`), recorded in every `GroundedTerm`.

        Returns:
            `list[Diagnosis]`, one per image, in order.
        """
        probs = apply_temperature(torch.as_tensor(class_logits).float(), temperature).softmax(dim=-1).cpu()
        labels = [id2label[i] for i in range(probs.shape[1])]
        if eos_token_id is None:
            eos_ids = set()
        else:
            eos_ids = set(eos_token_id) if isinstance(eos_token_id, (list, tuple, set)) else {int(eos_token_id)}
        result = []
        for b, size in enumerate(image_sizes):
            size = tuple(size)
            p = {label: float(probs[b, i]) for i, label in enumerate(labels)}
            prediction = max(p, key=p.get)
            diagnosis = Diagnosis(
                probabilities=p,
                prediction=prediction,
                confidence=p[prediction],
                malignancy_score=float(sum(p.get(label, 0.0) for label in KNOWN_MALIGNANT_CLASSES)),
                focal_map=None if pooling_attention is None else patch_map_to_heatmap(
                    pooling_attention[b], size, patch_grid_box(self.image_processor, *size)
                ),
                image_size=size,
            )
            if token_ids is not None:
                ids = token_ids[b].tolist() if hasattr(token_ids[b], "tolist") else list(token_ids[b])
                ended = next((k for k, t in enumerate(ids) if t in eos_ids), None) if generated else None
                ids = ids[:ended] if ended is not None else ids
                maps = None
                if token_maps is not None:
                    rows = np.asarray(token_maps[b])[: len(ids)]
                    side = int(round(math.sqrt(rows.shape[-1])))
                    maps = rows.reshape(len(ids), side, side)
                text, pieces, terms = self.ground_terms(ids, maps, size, method=grounding_method)
                diagnosis.rationale = text.strip() if generated else text
                diagnosis.tokens, diagnosis.token_ids = pieces, ids
                diagnosis.token_maps, diagnosis.grounded_terms = maps, terms
                diagnosis.stated_diagnosis = stated_diagnosis(diagnosis.rationale, id2label)
                if generated:
                    if ended is None:
                        diagnosis.warnings.append(f"the rationale was cut at max_new_tokens={len(ids)}")
                    if diagnosis.stated_diagnosis is None:
                        diagnosis.warnings.append("the rationale states no diagnosis ('Diagnosis: <name>.')")
                    elif diagnosis.stated_diagnosis != prediction:
                        diagnosis.warnings.append(
                            f"the rationale states {diagnosis.stated_diagnosis} but the classification head predicts "
                            f"{prediction} (p={p[prediction]:.2f}); rely on the probabilities, not on the text"
                        )
            meta = metadata[b] if isinstance(metadata, (list, tuple)) else metadata
            ignored = unknown_metadata_keys(meta) if isinstance(meta, dict) else []
            if ignored:
                diagnosis.warnings.append(f"metadata keys ignored (not age, sex or site): {ignored}")
            if isinstance(meta, dict):
                diagnosis.warnings.extend(metadata_warnings(meta))
            result.append(diagnosis)
        return result

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "labels", "align_input_ids", "align_attention_mask"]


def find_processor(config):
    """The processor of a model with `config`: the one saved with it (`config._name_or_path`, through `AutoProcessor`),
    else one built from the component checkpoints named in the config; a `ValueError` lists what was tried."""
    errors, processor = [], None
    source = getattr(config, "_name_or_path", "") or ""
    if source:
        try:
            from transformers import AutoProcessor

            candidate = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            if hasattr(candidate, "build_prompt"):
                processor = candidate
            else:
                errors.append(f"{source!r} holds no SkinCLIP-VL processor files")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"{source!r}: {err}")
    if processor is None:
        vision, decoder = config.vision_model_name_or_path, config.decoder_name_or_path
        try:
            processor = SkinCLIPVLProcessor.from_components(vision, decoder)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"components {vision!r} / {decoder!r}: {err}")
    if processor is None:
        raise ValueError(
            "diagnose() needs a processor: pass `processor=AutoProcessor.from_pretrained(<model dir or repo>, "
            "trust_remote_code=True)`. Could not load one from " + "; ".join(errors)
        )
    return processor


SkinCLIPVLProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "SkinCLIPVLProcessor",
    "serialize_metadata",
    "canonical_metadata",
    "unknown_metadata_keys",
    "load_image",
    "prepare_images",
    "find_processor",
    "image_warnings",
    "metadata_warnings",
    "metadata_rejections",
    "apply_temperature",
    "METADATA_KEY_ALIASES",
    "CLINICAL_TERMS",
    "DEFAULT_GROUNDING_METHOD",
    "GROUNDING_METHODS",
    "clinical_term_token_spans",
    "Diagnosis",
    "GroundedTerm",
    "find_clinical_terms",
    "heatmap_peak",
    "patch_grid_box",
    "patch_map_to_heatmap",
    "stated_diagnosis",
]
