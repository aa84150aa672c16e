"""Derm7pt (Kawahara et al. 2019, release_v0) -> the shared schema, on its official train / validation / test split.

Raw layout (as downloaded; a `release_v0/` folder holding it is also accepted)::

    data_dir/
      meta/meta.csv                                  (19 columns, LF, 1,011 cases)
      meta/train_indexes.csv, valid_indexes.csv, test_indexes.csv   (column `indexes`: 0-based row positions)
      images/<derm>, images/<clinic>                 (paths from meta.csv; mixed-case `.JPG` names)

Diagnoses map to the 8 classes (`schema.DERM7PT_DIAGNOSIS_MAP`: all nevi -> NV, all melanomas incl. metastasis -> MEL,
seborrheic keratosis and lentigo -> BKL, ...; melanosis and miscellaneous have no class and are excluded, counted)
and to the authors' 5 groups (`derm7pt_group`). The seven checklist answers are kept in `seven_point`, the criteria
present in `criteria`, and the report states the checklist in words, then the diagnosis. Derm7pt has no age column,
so age is always unknown. `group_id` is the case number (one case per lesion; no patient id).
"""

from pathlib import Path

from datasets import DatasetDict

from processing_skinclip_vl import serialize_metadata

from ._common import (
    DataError,
    LoadSummary,
    build_dataset_dict,
    empty_row_fields,
    locate_image,
    note_metadata,
    read_csv,
)
from .schema import (
    DERM7PT_CRITERIA_COLUMNS,
    DERM7PT_CRITERION_PHRASES,
    DERM7PT_DIAGNOSIS_MAP,
    DERM7PT_GROUP_MAP,
    DERM7PT_GROUPS,
    align_text_for,
    class_index,
    diagnosis_sentence,
    is_malignant,
    metadata_struct,
)

META_COLUMNS = [
    "case_num",
    "diagnosis",
    "seven_point_score",
    *DERM7PT_CRITERIA_COLUMNS,
    "level_of_diagnostic_difficulty",
    "elevation",
    "location",
    "sex",
    "management",
    "clinic",
    "derm",
    "case_id",
    "notes",
]
INDEX_FILES = {"train": "train_indexes.csv", "validation": "valid_indexes.csv", "test": "test_indexes.csv"}


def resolve_root(data_dir: str | Path) -> Path:
    """`data_dir`, or `data_dir/release_v0` when the release folder is nested."""
    data_dir = Path(data_dir)
    if not (data_dir / "meta").is_dir() and (data_dir / "release_v0" / "meta").is_dir():
        return data_dir / "release_v0"
    return data_dir


def checklist_report(record: dict) -> str:
    """The 7-point checklist in words, then the diagnosis: "Pigment network: atypical. ... Diagnosis: melanoma." """
    parts = [f"{name}: {record[col]}." for col, name in DERM7PT_CRITERIA_COLUMNS.items()]
    return " ".join(parts + [diagnosis_sentence(record["code"])])


def read_meta(data_dir: str | Path, summary: LoadSummary | None = None) -> tuple[list, LoadSummary]:
    """Read and check `meta/meta.csv` and the three index files (no images). Returns `(records, summary)`.

    Records carry `row` (0-based position), `split`, `case_num`, `code`, `label`, `group5`, the seven criteria, and the
    raw fields. Rows whose diagnosis has no class are excluded and counted by reason. Raises `DataError` naming file
    and line for a missing column, a duplicate case number, an index out of range or an index in two split files.
    """
    root = resolve_root(data_dir)
    meta_path = root / "meta" / "meta.csv"
    summary = summary or LoadSummary(dataset="derm7pt", data_dir=str(root))
    _, rows = read_csv(meta_path, META_COLUMNS)

    split_of = {}
    for split, name in INDEX_FILES.items():
        idx_path = root / "meta" / name
        _, idx_rows = read_csv(idx_path, ["indexes"])
        for line, r in idx_rows:
            try:
                pos = int(r["indexes"].strip())
            except ValueError:
                raise DataError(f"{idx_path}, line {line}: index {r['indexes']!r} is not an integer") from None
            if not 0 <= pos < len(rows):
                raise DataError(f"{idx_path}, line {line}: index {pos} out of range for {len(rows)} rows of {meta_path}")
            if pos in split_of:
                raise DataError(f"{idx_path}, line {line}: row {pos} is already in the {split_of[pos]} split")
            split_of[pos] = split

    records, seen = [], {}
    for pos, (line, r) in enumerate(rows):
        case = r["case_num"].strip()
        if case in seen:
            raise DataError(f"{meta_path}, line {line}: duplicate case_num {case!r} (first at line {seen[case]})")
        seen[case] = line
        diagnosis = r["diagnosis"].strip()
        image_id = f"derm7pt_{case}"
        if pos not in split_of:
            summary.exclude("row in none of the official index files", image_id)
            continue
        if diagnosis not in DERM7PT_DIAGNOSIS_MAP:
            summary.exclude(f"diagnosis {diagnosis!r} not in the Derm7pt label map", image_id)
            continue
        code = DERM7PT_DIAGNOSIS_MAP[diagnosis]
        if code is None:
            summary.exclude(f"diagnosis {diagnosis!r}: no class in the 8-class space", image_id)
            continue
        for col in DERM7PT_CRITERIA_COLUMNS:
            value = r[col].strip()
            if value != "absent" and (col, value) not in DERM7PT_CRITERION_PHRASES:
                raise DataError(f"{meta_path}, line {line}: unknown {col} value {value!r}")
        try:
            score = int(r["seven_point_score"])
        except ValueError:
            score = None
        records.append(
            {
                **{k: v.strip() for k, v in r.items()},
                "row": pos,
                "line": line,
                "split": split_of[pos],
                "image_id": image_id,
                "code": code,
                "label": class_index(code),
                "group5": DERM7PT_GROUP_MAP[diagnosis],
                "score": score,
            }
        )
    return records, summary


def load(
    data_dir: str | Path,
    image_type: str = "derm",
    seed: int = 0,
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
    dataset_name: str = "derm7pt",
) -> DatasetDict:
    """Load Derm7pt on its official split.

    Args:
        data_dir (`str` or `Path`): the release folder (holding `meta/` and `images/`).
        image_type (`str`, *optional*, defaults to `"derm"`): `"derm"` (dermoscopic) or `"clinic"` (clinical).
        seed (`int`, *optional*, defaults to 0): seed of the `train_fraction` subset.
        train_fraction (`float`, *optional*, defaults to 1.0): keep this share of the training cases per class.
        skip_bad_images (`bool`, *optional*, defaults to `False`): count and skip missing / unreadable images.
        verify_images (`bool`, *optional*, defaults to `True`): open every image header with PIL.
        dataset_name (`str`, *optional*, defaults to `"derm7pt"`): the `dataset` column value.

    Returns:
        `DatasetDict` (`train`, `validation`, `test`) with a `.summary` attribute.
    """

    if image_type not in ("derm", "clinic"):
        raise ValueError(f"image_type must be 'derm' or 'clinic', got {image_type!r}")
    root = resolve_root(data_dir)
    records, summary = read_meta(root, LoadSummary(dataset=dataset_name, data_dir=str(root)))
    summary.settings.update({"image_type": image_type, "seed": seed, "train_fraction": train_fraction,
                             "split": "official index files", "split_unit": "case"})
    meta_path = root / "meta" / "meta.csv"
    modality = "dermoscopic" if image_type == "derm" else "clinical"
    by_split = {split: [] for split in INDEX_FILES}
    for rec in records:
        path = locate_image(
            root / "images", rec[image_type], verify=verify_images, skip_bad_images=skip_bad_images, summary=summary,
            image_id=rec["image_id"], context=f"{meta_path}, line {rec['line']} (case {rec['case_num']})",
        )
        if path is None:
            continue
        criteria = [
            DERM7PT_CRITERION_PHRASES[(col, rec[col])] for col in DERM7PT_CRITERIA_COLUMNS if rec[col] != "absent"
        ]
        raw_meta = {"sex": rec["sex"], "location": rec["location"]}
        note_metadata(summary, raw_meta, rec["image_id"])
        extra = {k: rec[k] for k in ("elevation", "management", "level_of_diagnostic_difficulty", "case_id", "notes")}
        extra["case_num"] = rec["case_num"]
        by_split[rec["split"]].append(
            {
                **empty_row_fields(),
                "image": {"path": str(path.resolve()), "bytes": None},
                "label": rec["label"],
                "image_id": rec["image_id"],
                "group_id": rec["image_id"],
                "criteria": list(dict.fromkeys(criteria)),
                "dataset": dataset_name,
                "source_label": rec["diagnosis"],
                "malignant": is_malignant(rec["code"]),
                "metadata": metadata_struct(None, rec["sex"], rec["location"], extra),
                "meta_text": serialize_metadata(raw_meta),
                "report": checklist_report(rec),
                "align_text": align_text_for(rec["code"], modality),
                "derm7pt_group": DERM7PT_GROUPS.index(rec["group5"]),
                "seven_point": {**{c: rec[c] for c in DERM7PT_CRITERIA_COLUMNS}, "score": rec["score"]},
            }
        )
    return build_dataset_dict(by_split, summary, train_fraction=train_fraction, seed=seed)


__all__ = ["INDEX_FILES", "META_COLUMNS", "checklist_report", "load", "read_meta", "resolve_root"]
