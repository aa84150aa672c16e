"""Raw benchmark downloads (ISIC 2019, Derm7pt, ISIC 2024), your own data (a CSV + images; HAM10000, PAD-UFES-20) and
a synthetic generator -> one HF `datasets` schema (its `label` a `ClassLabel` over the run's class list).

`load(name, data_dir, **options)` (`registry.py`) is the one entry point: it returns `(DatasetDict, LoadSummary)`.
"""

from ._common import DataError, LoadSummary, align_class_labels, build_dataset_dict, empty_row_fields
from .registry import (
    DatasetSource,
    dataset_names,
    get_dataset_source,
    load,
    register_dataset,
    unregister_dataset,
)
from .schema import CLASS_DESCRIPTIONS, CLASS_NAMES, FEATURES, MALIGNANT_CLASSES, build_features, class_names_of
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
    "align_class_labels",
    "build_dataset_dict",
    "build_features",
    "check_no_group_leakage",
    "class_names_of",
    "dataset_names",
    "empty_row_fields",
    "get_dataset_source",
    "group_split",
    "group_subset",
    "load",
    "register_dataset",
    "unregister_dataset",
]
