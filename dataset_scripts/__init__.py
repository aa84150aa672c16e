"""Raw benchmark downloads (ISIC 2019, Derm7pt, ISIC 2024) and a synthetic generator -> one HF `datasets` schema."""

from ._common import DataError, LoadSummary
from .schema import CLASS_DESCRIPTIONS, CLASS_NAMES, FEATURES, MALIGNANT_CLASSES
from .splits import GroupLeakageError, check_no_group_leakage, group_split, group_subset

__all__ = [
    "CLASS_DESCRIPTIONS",
    "CLASS_NAMES",
    "FEATURES",
    "MALIGNANT_CLASSES",
    "DataError",
    "GroupLeakageError",
    "LoadSummary",
    "check_no_group_leakage",
    "group_split",
    "group_subset",
]
