"""ISIC 2019 training release -> the shared schema, with lesion-level train / validation / test splits.

Raw layout (as downloaded)::

    data_dir/
      ISIC_2019_Training_Input/ISIC_0000000.jpg ...   (some ids end in `_downsampled`)
      ISIC_2019_Training_GroundTruth.csv              (image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK; one-hot, CRLF)
      ISIC_2019_Training_Metadata.csv                 (image, age_approx, anatom_site_general, lesion_id, sex)

`group_id` is `lesion_id`; an image without one is its own group, so the splits are lesion-level (the release has no
patient id, `patient_id` is None). Reports are label-derived templates (no per-image criteria are known); `align_text`
is the class description sentence.
"""

from collections.abc import Callable, Sequence
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
    CLASS_NAMES,
    ISIC2019_LABEL_COLUMNS,
    ISIC2019_LABEL_MAP,
    align_text_for,
    class_index,
    is_malignant,
    metadata_struct,
    template_report,
)
from .splits import group_split

GROUND_TRUTH_FILE = "ISIC_2019_Training_GroundTruth.csv"
METADATA_FILE = "ISIC_2019_Training_Metadata.csv"
IMAGE_DIR = "ISIC_2019_Training_Input"
METADATA_COLUMNS = ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]


def _one_hot(path, line: int, row: dict) -> str:
    values = {}
    for col in ISIC2019_LABEL_COLUMNS:
        raw = row[col].strip()
        try:
            values[col] = float(raw)
        except ValueError:
            raise DataError(f"{path}, line {line} ({row['image']}): column {col} is {raw!r}, not a number") from None
    hot = [c for c, v in values.items() if v == 1.0]
    if len(hot) != 1 or any(v not in (0.0, 1.0) for v in values.values()):
        shown = ", ".join(f"{c}={row[c]}" for c in ISIC2019_LABEL_COLUMNS)
        raise DataError(f"{path}, line {line} ({row['image']}): label is not one-hot ({shown})")
    return hot[0]


def read_labels(
    data_dir: str | Path,
    ground_truth_file: str = GROUND_TRUTH_FILE,
    metadata_file: str = METADATA_FILE,
    summary: LoadSummary | None = None,
) -> tuple[list, LoadSummary]:
    """Read and check the two CSVs (no images). Returns `(records, summary)`.

    Each record: `image_id, code (class code), label, lesion_id, group_id, age_approx, sex, anatom_site_general,
    gt_line`. Rows whose one-hot column has no class (UNK) are excluded and counted. Raises `DataError` naming file and
    line for a non-one-hot label, a duplicate id, a missing column or an image without a metadata row.
    """
    data_dir = Path(data_dir)
    gt_path, meta_path = data_dir / ground_truth_file, data_dir / metadata_file
    summary = summary or LoadSummary(dataset="isic2019", data_dir=str(data_dir))
    _, gt_rows = read_csv(gt_path, ["image", *ISIC2019_LABEL_COLUMNS])
    _, meta_rows = read_csv(meta_path, METADATA_COLUMNS)

    meta = {}
    for line, row in meta_rows:
        image_id = row["image"].strip()
        if image_id in meta:
            raise DataError(f"{meta_path}, line {line}: duplicate image id {image_id!r} (first at line {meta[image_id][0]})")
        meta[image_id] = (line, row)

    records, first_line = [], {}
    for line, row in gt_rows:
        image_id = row["image"].strip()
        if not image_id:
            raise DataError(f"{gt_path}, line {line}: empty image id")
        if image_id in first_line:
            raise DataError(f"{gt_path}, line {line}: duplicate image id {image_id!r} (first at line {first_line[image_id]})")
        first_line[image_id] = line
        column = _one_hot(gt_path, line, row)
        code = ISIC2019_LABEL_MAP[column]
        if code is None:
            summary.exclude(f"ground-truth column {column}: no class in the 8-class space", image_id)
            continue
        if image_id not in meta:
            raise DataError(f"{gt_path}, line {line}: image {image_id!r} has no row in {meta_path}")
        m = meta[image_id][1]
        lesion_id = m["lesion_id"].strip() or None
        if lesion_id is None:
            summary.note("no lesion_id: the image is its own split group", image_id)
        if image_id.endswith("_downsampled"):
            summary.note("id ends in _downsampled (kept as is)", image_id)
        records.append(
            {
                "image_id": image_id,
                "code": code,
                "label": class_index(code),
                "source_label": column,
                "lesion_id": lesion_id,
                "group_id": lesion_id or image_id,
                "age_approx": m["age_approx"].strip(),
                "sex": m["sex"].strip(),
                "anatom_site_general": m["anatom_site_general"].strip(),
                "gt_line": line,
            }
        )
    orphans = sorted(set(meta) - set(first_line))
    for image_id in orphans:
        summary.exclude(f"metadata row without a ground-truth row in {ground_truth_file}", image_id)
    return records, summary


def load(
    data_dir: str | Path,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
    dataset_name: str = "isic2019",
    row_hook: Callable[[dict, dict], dict] | None = None,
) -> DatasetDict:
    """Load the ISIC 2019 training release as `train` / `validation` / `test` (lesion-level, stratified, seeded).

    Args:
        data_dir (`str` or `Path`): the folder holding the two CSVs and `ISIC_2019_Training_Input/`.
        split_fractions (`Sequence[float]`, *optional*, defaults to `(0.8, 0.1, 0.1)`): group shares per split.
        seed (`int`, *optional*, defaults to 0): split and subset seed.
        train_fraction (`float`, *optional*, defaults to 1.0): keep this share of the training groups per class.
        skip_bad_images (`bool`, *optional*, defaults to `False`): count and skip missing / unreadable images instead
            of raising `DataError`.
        verify_images (`bool`, *optional*, defaults to `True`): open every image header with PIL (`Image.verify`).
        dataset_name (`str`, *optional*): the `dataset` column value (the synthetic loader passes "synthetic").
        row_hook (`callable`, *optional*): `row_hook(row, record) -> row`, to add source-specific fields.

    Returns:
        `DatasetDict` with a `.summary` attribute (`LoadSummary`).
    """
    data_dir = Path(data_dir)
    records, summary = read_labels(data_dir, summary=LoadSummary(dataset=dataset_name, data_dir=str(data_dir)))
    summary.settings.update(
        {"split_fractions": list(split_fractions), "seed": seed, "train_fraction": train_fraction,
         "split_unit": "lesion_id (images without one are their own group)"}
    )
    image_dir = data_dir / IMAGE_DIR
    gt_path = data_dir / GROUND_TRUTH_FILE
    rows = []
    for rec in records:
        path = locate_image(
            image_dir, rec["image_id"] + ".jpg", verify=verify_images, skip_bad_images=skip_bad_images, summary=summary,
            image_id=rec["image_id"], context=f"{gt_path}, line {rec['gt_line']} ({rec['image_id']})",
        )
        if path is None:
            continue
        raw_meta = {"age_approx": rec["age_approx"], "sex": rec["sex"], "anatom_site_general": rec["anatom_site_general"]}
        note_metadata(summary, raw_meta, rec["image_id"])

        row = {
            **empty_row_fields(),
            "image": {"path": str(path.resolve()), "bytes": None},
            "label": rec["label"],
            "image_id": rec["image_id"],
            "group_id": rec["group_id"],
            "dataset": dataset_name,
            "source_label": rec["source_label"],
            "malignant": is_malignant(rec["code"]),
            "metadata": metadata_struct(
                rec["age_approx"], rec["sex"], rec["anatom_site_general"], {"lesion_id": rec["lesion_id"]}
            ),
            "meta_text": serialize_metadata(raw_meta),
            "report": template_report(rec["code"]),
            "align_text": align_text_for(rec["code"]),
        }
        if row_hook is not None:
            row = row_hook(row, rec)
        rows.append(row)
    assignment = group_split([r["label"] for r in rows], [r["group_id"] for r in rows], split_fractions, seed)
    by_split = {name: [] for name in ("train", "validation", "test")}
    for row, split in zip(rows, assignment):
        by_split[split].append(row)
    return build_dataset_dict(by_split, summary, train_fraction=train_fraction, seed=seed)


def label_counts(records: list) -> dict:
    """Rows per class code (in `CLASS_NAMES` order) of `read_labels` records."""
    return {c: sum(r["code"] == c for r in records) for c in CLASS_NAMES}


__all__ = ["GROUND_TRUTH_FILE", "IMAGE_DIR", "METADATA_FILE", "label_counts", "load", "read_labels"]
