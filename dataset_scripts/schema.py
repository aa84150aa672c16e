"""The one schema every SkinCLIP-VL data source is loaded into, and the maps from each source's labels to it.

All loaders (`isic2019`, `derm7pt`, `isic2024`, `synthetic`) emit exactly `FEATURES`, so their splits concatenate with
`datasets.concatenate_datasets`.

Columns:

- `image` (`Image`): the lesion image (for file sources, a path decoded lazily; embedded by `prepare`).
- `label` (`ClassLabel` over `CLASS_NAMES`): the 8-class ISIC 2019 label; -1 when the source gives no fine class
  (ISIC 2024 plain "Benign" and other unmapped `iddx_3` values).
- `image_id`, `group_id` (split and bootstrap key), `patient_id` (None where the source has none: ISIC 2019, Derm7pt).
- `criteria` (`Sequence(string)`): dermoscopic criteria present, where known (Derm7pt checklist, synthetic drawings).
- `dataset`, `source_label` (the raw diagnosis string), `malignant` (1/0 where the source says, else -1).
- `metadata`: a fixed struct `{age: int32, sex: string, site: string, extra: string}`. `age`, `sex`, `site` are the
  canonical values of `processing_skinclip_vl.canonical_metadata` (None when unknown). `extra` is a JSON object
  (sorted keys, only non-empty values) with the source's remaining fields, e.g. `{"lesion_id": "HAM_0000118"}`; one
  string field keeps the struct identical across sources.
- `meta_text`: `serialize_metadata` of the row's metadata (the processor's own serializer).
- `report`: the rationale target. When `label` is a class it ends with `Diagnosis: <full class name>.`; empty for
  rows without a fine class.
- `align_text`: the class description sentence, e.g. `A dermoscopic image of melanoma.`; empty without a fine class.
- `derm7pt_group` (`ClassLabel` over `DERM7PT_GROUPS`): the Derm7pt authors' 5-group label; -1 for other sources.
- `seven_point`: struct of the seven checklist answers and the score (Derm7pt layout sources); None elsewhere.
"""

import json
from typing import Any

from datasets import ClassLabel, Features, Image, Sequence, Value

from configuration_skinclip_vl import CLASS_FULL_NAMES, ISIC2019_CLASSES, MALIGNANT_CLASSES

# the label space and class names are the model's (configuration_skinclip_vl), so data and model cannot drift apart
CLASS_NAMES = list(ISIC2019_CLASSES)
CLASS_DESCRIPTIONS = dict(CLASS_FULL_NAMES)

# one short, label-derived, bias-free finding per class (no per-image claims, no demographics)
CLASS_FINDINGS = {
    "MEL": "The dermoscopic pattern is that of a malignant melanocytic lesion.",
    "NV": "The dermoscopic pattern is that of a benign melanocytic lesion.",
    "BCC": "The dermoscopic pattern is that of a malignant non-melanocytic epithelial lesion.",
    "AK": "The dermoscopic pattern is that of a keratinocytic lesion with sun damage.",
    "BKL": "The dermoscopic pattern is that of a benign keratinocytic lesion.",
    "DF": "The dermoscopic pattern is that of a benign fibrous lesion.",
    "VASC": "The dermoscopic pattern is that of a benign vascular lesion.",
    "SCC": "The dermoscopic pattern is that of a malignant keratinocytic lesion.",
}

# ---------------------------------------------------------------------------------------------------------------------
# Source label maps. A value of None means "no class in the 8-class space": the row is excluded (ISIC 2019, Derm7pt)
# or kept with label -1 (ISIC 2024, whose binary target is still usable), and counted by reason. Never guessed.
# ---------------------------------------------------------------------------------------------------------------------

# ISIC 2019 ground-truth columns (one-hot). UNK has no class.
ISIC2019_LABEL_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_LABEL_MAP: dict[str, str | None] = {c: c for c in CLASS_NAMES}
ISIC2019_LABEL_MAP["UNK"] = None

# Derm7pt `diagnosis` (all 20 values of release_v0 meta.csv) -> (8-class label, the Derm7pt authors' 5-group label).
# One table serves both label spaces; `DERM7PT_DIAGNOSIS_MAP` and `DERM7PT_GROUP_MAP` below are its two columns.
DERM7PT_GROUPS = ["BCC", "NEV", "MEL", "MISC", "SK"]  # the authors' 5 diagnosis groups (Kawahara et al. 2019)
DERM7PT_DIAGNOSIS_TABLE: dict[str, tuple[str | None, str]] = {
    "basal cell carcinoma": ("BCC", "BCC"),
    "blue nevus": ("NV", "NEV"),
    "clark nevus": ("NV", "NEV"),
    "combined nevus": ("NV", "NEV"),
    "congenital nevus": ("NV", "NEV"),
    "dermal nevus": ("NV", "NEV"),
    "recurrent nevus": ("NV", "NEV"),
    "reed or spitz nevus": ("NV", "NEV"),
    "melanoma": ("MEL", "MEL"),
    "melanoma (in situ)": ("MEL", "MEL"),
    "melanoma (less than 0.76 mm)": ("MEL", "MEL"),
    "melanoma (0.76 to 1.5 mm)": ("MEL", "MEL"),
    "melanoma (more than 1.5 mm)": ("MEL", "MEL"),
    "melanoma metastasis": ("MEL", "MEL"),
    "seborrheic keratosis": ("BKL", "SK"),
    # ISIC files solar lentigo under BKL; the Derm7pt authors' 5 groups put lentigo in MISC
    "lentigo": ("BKL", "MISC"),
    "dermatofibroma": ("DF", "MISC"),
    "vascular lesion": ("VASC", "MISC"),
    "melanosis": (None, "MISC"),
    "miscellaneous": (None, "MISC"),
}
DERM7PT_DIAGNOSIS_MAP: dict[str, str | None] = {d: code for d, (code, _) in DERM7PT_DIAGNOSIS_TABLE.items()}
DERM7PT_GROUP_MAP: dict[str, str] = {d: group for d, (_, group) in DERM7PT_DIAGNOSIS_TABLE.items()}

# the seven checklist columns of Derm7pt meta.csv, in file order, with their display names
DERM7PT_CRITERIA_COLUMNS = {
    "pigment_network": "Pigment network",
    "streaks": "Streaks",
    "pigmentation": "Pigmentation",
    "regression_structures": "Regression structures",
    "dots_and_globules": "Dots and globules",
    "blue_whitish_veil": "Blue-whitish veil",
    "vascular_structures": "Vascular structures",
}

# (column, value) -> criterion phrase used in `criteria` (the same phrases as the synthetic generator's CRITERIA)
DERM7PT_CRITERION_PHRASES = {
    ("pigment_network", "typical"): "typical pigment network",
    ("pigment_network", "atypical"): "atypical pigment network",
    ("streaks", "regular"): "regular streaks",
    ("streaks", "irregular"): "irregular streaks",
    ("pigmentation", "diffuse regular"): "regular diffuse pigmentation",
    ("pigmentation", "localized regular"): "regular localized pigmentation",
    ("pigmentation", "diffuse irregular"): "irregular diffuse pigmentation",
    ("pigmentation", "localized irregular"): "irregular localized pigmentation",
    ("regression_structures", "blue areas"): "regression structures",
    ("regression_structures", "white areas"): "regression structures",
    ("regression_structures", "combinations"): "regression structures",
    ("dots_and_globules", "regular"): "regular dots and globules",
    ("dots_and_globules", "irregular"): "irregular dots and globules",
    ("blue_whitish_veil", "present"): "blue-whitish veil",
    ("vascular_structures", "arborizing"): "arborizing vessels",
    ("vascular_structures", "comma"): "comma vessels",
    ("vascular_structures", "hairpin"): "hairpin vessels",
    ("vascular_structures", "within regression"): "vessels within regression",
    ("vascular_structures", "wreath"): "wreath vessels",
    ("vascular_structures", "dotted"): "dotted vessels",
    ("vascular_structures", "linear irregular"): "linear irregular vessels",
}

# ISIC 2024 `iddx_3` -> 8-class label. Values not listed (and plain "Benign" rows with empty iddx_3) get label -1.
ISIC2024_IDDX3_MAP: dict[str, str | None] = {
    "Melanoma Invasive": "MEL",
    "Melanoma in situ": "MEL",
    "Melanoma, NOS": "MEL",
    "Melanoma metastasis": "MEL",
    "Nevus": "NV",
    "Basal cell carcinoma": "BCC",
    "Solar or actinic keratosis": "AK",
    "Seborrheic keratosis": "BKL",
    "Solar lentigo": "BKL",
    "Lentigo NOS": "BKL",
    "Lichen planus like keratosis": "BKL",
    "Pigmented benign keratosis": "BKL",
    "Dermatofibroma": "DF",
    "Hemangioma": "VASC",
    "Squamous cell carcinoma in situ": "SCC",
    "Squamous cell carcinoma, Invasive": "SCC",
    "Squamous cell carcinoma, NOS": "SCC",
    # listed explicitly as having no class (indeterminate or outside the 8 classes)
    "Atypical melanocytic neoplasm": None,
    "Atypical intraepithelial melanocytic proliferation": None,
    "Angiofibroma": None,
    "Fibroepithelial polyp": None,
    "Hidradenoma": None,
    "Scar": None,
    "Trichilemmal or isthmic-catagen or pilar cyst": None,
    "Verruca": None,
}
# ISIC 2024 binary `target`
ISIC2024_TARGET_MAP = {"0": 0, "1": 1}

METADATA_FEATURES = {
    "age": Value("int32"),
    "sex": Value("string"),
    "site": Value("string"),
    "extra": Value("string"),
}

SEVEN_POINT_FEATURES = {**{c: Value("string") for c in DERM7PT_CRITERIA_COLUMNS}, "score": Value("int32")}

FEATURES = Features(
    {
        "image": Image(),
        "label": ClassLabel(names=CLASS_NAMES),
        "image_id": Value("string"),
        "group_id": Value("string"),
        "patient_id": Value("string"),
        "criteria": Sequence(Value("string")),
        "dataset": Value("string"),
        "source_label": Value("string"),
        "malignant": Value("int32"),
        "metadata": METADATA_FEATURES,
        "meta_text": Value("string"),
        "report": Value("string"),
        "align_text": Value("string"),
        "derm7pt_group": ClassLabel(names=DERM7PT_GROUPS),
        "seven_point": SEVEN_POINT_FEATURES,
    }
)


def class_index(code: str | None) -> int:
    """Index of a class code in `CLASS_NAMES`, -1 for None."""
    return -1 if code is None else CLASS_NAMES.index(code)


def is_malignant(code: str | None) -> int:
    """1 for MEL/BCC/SCC, 0 for the other classes, -1 when there is no class."""
    if code is None:
        return -1
    return int(code in MALIGNANT_CLASSES)


def diagnosis_sentence(code: str) -> str:
    """The closing sentence every report ends with, e.g. `Diagnosis: melanoma.`"""
    return f"Diagnosis: {CLASS_DESCRIPTIONS[code]}."


def align_text_for(code: str | None, modality: str = "dermoscopic") -> str:
    """The class description sentence used as alignment text, e.g. `A dermoscopic image of melanoma.`"""
    if code is None:
        return ""
    return f"A {modality} image of {CLASS_DESCRIPTIONS[code]}."


def template_report(code: str | None) -> str:
    """Label-derived, bias-free rationale (sources without per-image criteria)."""
    if code is None:
        return ""
    return f"{CLASS_FINDINGS[code]} {diagnosis_sentence(code)}"


def criteria_report(criteria: list, code: str) -> str:
    """A rationale naming exactly `criteria` (in order), then the diagnosis."""
    if criteria:
        names = [c for c in criteria]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        findings = f"Dermoscopic findings: {listed}."
    else:
        findings = "No specific dermoscopic criteria are seen."
    return f"{findings} {diagnosis_sentence(code)}"


def metadata_struct(age: Any, sex: Any, site: Any, extra: dict | None = None) -> dict:
    """Build the `metadata` struct from canonical values and a dict of source extras (empty values dropped)."""
    from processing_skinclip_vl import canonical_metadata

    canon = canonical_metadata({"age": age, "sex": sex, "site": site})
    extras = {k: v for k, v in (extra or {}).items() if v not in (None, "")}
    return {
        "age": canon["age"],
        "sex": canon["sex"],
        "site": canon["site"],
        "extra": json.dumps(extras, sort_keys=True, ensure_ascii=False),
    }


def parse_diagnosis(report: str) -> str | None:
    """Class code stated by a report's closing `Diagnosis: <full class name>.` sentence, or None."""
    marker = "Diagnosis:"
    pos = report.rfind(marker)
    if pos < 0:
        return None
    name = report[pos + len(marker) :].strip().rstrip(".").strip().lower()
    for code, desc in CLASS_DESCRIPTIONS.items():
        if desc == name:
            return code
    return None


__all__ = [
    "CLASS_DESCRIPTIONS",
    "CLASS_FINDINGS",
    "CLASS_NAMES",
    "DERM7PT_CRITERIA_COLUMNS",
    "DERM7PT_CRITERION_PHRASES",
    "DERM7PT_DIAGNOSIS_MAP",
    "DERM7PT_DIAGNOSIS_TABLE",
    "DERM7PT_GROUPS",
    "DERM7PT_GROUP_MAP",
    "FEATURES",
    "ISIC2019_LABEL_COLUMNS",
    "ISIC2019_LABEL_MAP",
    "ISIC2024_IDDX3_MAP",
    "ISIC2024_TARGET_MAP",
    "MALIGNANT_CLASSES",
    "METADATA_FEATURES",
    "SEVEN_POINT_FEATURES",
    "align_text_for",
    "class_index",
    "criteria_report",
    "diagnosis_sentence",
    "is_malignant",
    "metadata_struct",
    "parse_diagnosis",
    "template_report",
]
