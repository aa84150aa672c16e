"""Raw benchmark downloads (ISIC 2019, Derm7pt, ISIC 2024) and a synthetic generator -> one HF `datasets` schema.

`load(name, data_dir, **options)` (`registry.py`) is the one entry point: it returns `(DatasetDict, LoadSummary)`.
"""

from ._common import DataError, LoadSummary, build_dataset_dict, empty_row_fields
from .registry import (
    DatasetSource,
    dataset_names,
    get_dataset_source,
    load,
    register_dataset,
    unregister_dataset,
)
from .schema import CLASS_DESCRIPTIONS, CLASS_NAMES, FEATURES, MALIGNANT_CLASSES
from .splits import GroupLeakageError, check_no_group_leakage, group_split, group_subset

__all__ = [
    "CLASS_DESCRIPTIONS",
    "CLASS_NAMES",
    "FEATURES",
    "MALIGNANT_CLASSES",
    "DataError",
    "DatasetSource",
    "GroupLeakageError",
    "LoadSummary",
    "build_dataset_dict",
    "check_no_group_leakage",
    "dataset_names",
    "empty_row_fields",
    "get_dataset_source",
    "group_split",
    "group_subset",
    "load",
    "register_dataset",
    "unregister_dataset",
]
