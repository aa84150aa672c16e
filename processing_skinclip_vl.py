# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Processor for SkinCLIP-VL: CLIP image processor + decoder tokenizer + CLIP tokenizer, and the metadata serializer."""

import math
from typing import Any, Optional

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
    if isinstance(value, float) and math.isnan(value):
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
            try:
                age = float(value)
            except (TypeError, ValueError):
                continue
            if math.isnan(age) or age < 0 or age > 120:
                continue
            out["age"] = int(round(age))
        elif field == "sex":
            out["sex"] = _SEX_WORDS.get(str(value).strip().lower())
        else:
            out["site"] = str(value).strip().lower().replace("_", " ")
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
    if age is not None and sex is not None:
        who = f"of a {age}-year-old {sex} patient"
    elif age is not None:
        who = f"of a {age}-year-old patient of unknown sex"
    elif sex is not None:
        who = f"of a {sex} patient of unknown age"
    else:
        who = "of a patient of unknown age and sex"
    return f"A lesion {where} {who}."
