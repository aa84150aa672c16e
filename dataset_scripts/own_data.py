"""Your own data -> the shared schema: a generic CSV + image folder loader, and presets for HAM10000 and PAD-UFES-20.

Generic (`--dataset csv`): one CSV row per image, with a column naming the image (a path relative to `image_dir`, or a
file name found anywhere under it) and a column with its diagnosis; optional lesion, patient, age, sex and site columns::

    python -m dataset_scripts.prepare --dataset csv --csv labels.csv --image_dir images/ \
        --image_column file --label_column diagnosis [--patient_column patient] [--group_column lesion] \
        [--age_column age --sex_column sex --site_column site] [--label_map map.json] [--class_labels A B C] \
        --output_dir OUT

Presets, `--data_dir` being the folder of the public release:

- `ham10000`: `HAM10000_metadata.csv` (lesion_id, image_id, dx, dx_type, age, sex, localization) and the JPEGs in
  `HAM10000_images_part_1/` and `HAM10000_images_part_2/` (found anywhere under `--data_dir`); classes are the `dx`
  codes akiec, bcc, bkl, df, mel, nv, vasc; lesion-level splits (`lesion_id`). The release has no patient id.
- `pad_ufes_20`: `metadata.csv` (patient_id, lesion_id, ..., diagnostic, ..., img_id, biopsed) and smartphone PNGs
  named by `img_id` (in `images/imgs_part_1..3/` in the public release; found anywhere under `--data_dir`); classes
  ACK, BCC, MEL, NEV, SCC, SEK; **patient-level** splits (`patient_id`).

Class list. The schema's `label` is a `ClassLabel` over the run's class list (`schema.build_features`), not the 8
ISIC 2019 classes: `--class_labels` gives it (in head order); without it a preset uses its own codes, a `--label_map`
whose targets are all ISIC 2019 classes gives the 8 ISIC 2019 classes (so the data fit an ISIC 2019 model), and
otherwise the sorted distinct labels of the CSV are the classes. `--label_map FILE.json` is a JSON object
`{"raw label": "class" or null}`: a row whose raw label maps to null is excluded and counted; a raw label the map
does not list, or a class outside `--class_labels`, is an error naming the file, line and label.
`dataset_scripts/label_maps/` holds the maps of both presets into the 8 ISIC 2019 classes.

Splits. `group_id` is the patient id when a patient column is given (patient-level splits), else the lesion id
(`--group_column`; lesion-level), else the image itself; a row whose patient (lesion) cell is empty falls back to the
next unit and is counted as a note. The split is the benchmark one (`splits.group_split`: group-level, stratified by
class, seeded, `--split_fractions`), checked for leakage, and summarised in the same `summary.json`.

Bad input follows the benchmark loaders' rules (`_common`): a missing file or column, a short row, an empty or
duplicate image id, an empty label: `DataError` naming the file and line; a missing or unreadable image: the same, or
a counted skip with `--skip_bad_images`.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

from datasets import DatasetDict

from configuration_skinclip_vl import ISIC2019_CLASSES
from processing_skinclip_vl import serialize_metadata

from ._common import DataError, LoadSummary, build_dataset_dict, empty_row_fields, find_file, locate_image, read_csv
from .schema import align_text_for, build_features, is_malignant, metadata_struct, template_report
from .splits import group_split

HAM10000_METADATA_FILE = "HAM10000_metadata.csv"
HAM10000_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HAM10000_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]

PAD_UFES_20_METADATA_FILE = "metadata.csv"
PAD_UFES_20_CLASSES = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
PAD_UFES_20_COLUMNS = [
    "patient_id", "lesion_id", "smoke", "drink", "background_father", "background_mother", "age", "pesticide",
    "gender", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system", "fitspatrick", "region",
    "diameter_1", "diameter_2", "diagnostic", "itch", "grew", "hurt", "changed", "bleed", "elevation", "img_id",
    "biopsed",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MAP_DIR = Path(__file__).resolve().parent / "label_maps"


def read_label_map(path: str | os.PathLike) -> dict:
    """Read a `--label_map` JSON file: an object mapping raw labels to a class name or null.

    Raises `DataError` naming the file when it is missing, not JSON, or not such an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label map file not found")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a JSON file ({err})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{path}: a label map must be a non-empty JSON object {{\"raw label\": \"class\" or null}}")
    bad = {k: v for k, v in mapping.items() if not (v is None or (isinstance(v, str) and v.strip()))}
    if bad:
        raise DataError(f"{path}: every value must be a class name or null, got {bad}")
    return {str(k).strip(): (None if v is None else v.strip()) for k, v in mapping.items()}


def resolve_class_labels(mapped_labels: Sequence[str], class_labels: Sequence[str] | None, label_map: dict | None,
                         preset_classes: Sequence[str] | None) -> list[str]:
    """The run's class list (see the module docstring for the order of precedence)."""
    if class_labels:
        names = [str(c).strip() for c in class_labels]
    elif label_map is not None:
        targets = {v for v in label_map.values() if v is not None}
        names = list(ISIC2019_CLASSES) if targets <= set(ISIC2019_CLASSES) else sorted(targets)
    elif preset_classes is not None:
        names = list(preset_classes)
    else:
        names = sorted(set(mapped_labels))
    if len(names) < 2 or len(set(names)) != len(names):
        raise DataError(f"the class list needs at least 2 distinct classes, got {names}")
    return names


def index_images(root: Path) -> dict:
    """`{lower-case file name: [paths]}` of every image file under `root` (any depth), for releases whose images sit
    in several sub-folders."""
    index = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                index.setdefault(name.lower(), []).append(Path(folder) / name)
    return index


def load_table(
    csv_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    image_column: str,
    label_column: str,
    group_column: str | None = None,
    patient_column: str | None = None,
    age_column: str | None = None,
    sex_column: str | None = None,
    site_column: str | None = None,
    label_map: str | os.PathLike | None = None,
    class_labels: Sequence[str] | None = None,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
    dataset_name: str = "csv",
    modality: str = "dermoscopic",
    preset_classes: Sequence[str] | None = None,
    extra_columns: Sequence[str] = (),
    image_suffix: str = "",
    search_subfolders: bool = True,
    source: str | None = None,
) -> DatasetDict:
    """Load one CSV of image rows into the shared schema with group-level train / validation / test splits.

    Args:
        csv_path (`str` or `Path`): the CSV file.
        image_dir (`str` or `Path`): the folder the image column is relative to.
        image_column, label_column (`str`): the columns naming the image and its diagnosis.
        group_column (`str`, *optional*): lesion id (lesion-level splits when no patient column is given).
        patient_column (`str`, *optional*): patient id (patient-level splits).
        age_column, sex_column, site_column (`str`, *optional*): the metadata the prompt verbalises.
        label_map (`str` or `Path`, *optional*): JSON `{"raw label": "class" or null}` (`read_label_map`).
        class_labels (`Sequence[str]`, *optional*): the class list in head order (`resolve_class_labels`).
        split_fractions, seed, train_fraction, skip_bad_images, verify_images: as the benchmark loaders.
        dataset_name (`str`): the `dataset` column and summary name.
        modality (`str`): the alignment text's image kind ("dermoscopic", "clinical").
        preset_classes (`Sequence[str]`, *optional*): a preset's own class list (its default).
        extra_columns (`Sequence[str]`): columns kept in `metadata.extra`.
        image_suffix (`str`): appended to the image column when it has no file extension (HAM10000: ".jpg").
        search_subfolders (`bool`): an image not at `image_dir / <image column>` is looked up by file name anywhere
            under `image_dir` (a name found twice is an error naming both paths).
        source (`str`, *optional*): where the data come from, for the summary / dataset card.

    Returns:
        `DatasetDict` with a `.summary` (`LoadSummary`), the `label` a `ClassLabel` over the run's class list.
    """
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    optional = {"group_column": group_column, "patient_column": patient_column, "age_column": age_column,
                "sex_column": sex_column, "site_column": site_column}
    required = [image_column, label_column, *[c for c in optional.values() if c], *extra_columns]
    _, rows = read_csv(csv_path, list(dict.fromkeys(required)))
    mapping = read_label_map(label_map) if label_map is not None else None
    summary = LoadSummary(dataset=dataset_name, data_dir=str(image_dir))

    records, first_line = [], {}
    for line, row in rows:
        image_id = row[image_column].strip()
        if not image_id:
            raise DataError(f"{csv_path}, line {line}: empty {image_column!r}")
        if image_id in first_line:
            raise DataError(
                f"{csv_path}, line {line}: duplicate image {image_id!r} (first at line {first_line[image_id]})"
            )
        first_line[image_id] = line
        raw = row[label_column].strip()
        if not raw:
            raise DataError(f"{csv_path}, line {line} ({image_id}): empty {label_column!r}")
        code = raw
        if mapping is not None:
            if raw not in mapping:
                raise DataError(
                    f"{csv_path}, line {line} ({image_id}): label {raw!r} is not in the label map {label_map} "
                    f"(it lists {sorted(mapping)})"
                )
            code = mapping[raw]
            if code is None:
                summary.exclude(f"label {raw!r} maps to no class (null in {Path(label_map).name})", image_id)
                continue
        records.append((line, row, image_id, raw, code))

    class_names = resolve_class_labels([r[4] for r in records], class_labels, mapping, preset_classes)
    unknown = sorted({r[4] for r in records} - set(class_names))
    if unknown:
        line, _, image_id, raw, code = next(r for r in records if r[4] in unknown)
        raise DataError(
            f"{csv_path}, line {line} ({image_id}): label {code!r} is not one of the classes {class_names} "
            f"(labels outside the class list: {unknown}; give --class_labels or map them with --label_map)"
        )

    if patient_column:
        unit = f"patient ({patient_column})"
    elif group_column:
        unit = f"lesion ({group_column})"
    else:
        unit = "image (no patient or lesion column)"
    summary.settings.update({
        "split_fractions": list(split_fractions), "seed": seed, "train_fraction": train_fraction,
        "split_unit": unit + ("; rows without one fall back to the lesion, then the image" if patient_column else
                              "; rows without one are their own group" if group_column else ""),
        "class_labels": class_names, "csv": str(csv_path), "image_dir": str(image_dir),
        "label_map": None if label_map is None else str(label_map), "source": source or str(csv_path),
    })
    index = None
    malignant = [c for c in class_names if is_malignant(c) == 1]
    out = []
    for line, row, image_id, raw, code in records:
        name = image_id if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS else image_id + image_suffix
        context = f"{csv_path}, line {line} ({image_id})"
        folder, relative = image_dir, name
        if search_subfolders and find_file(image_dir, name)[0] is None:
            if index is None:
                index = index_images(image_dir)
            found = index.get(Path(name).name.lower(), [])
            if len(found) > 1:
                raise DataError(f"{context}: image {name!r} found more than once: {[str(p) for p in found]}")
            if found:
                folder, relative = found[0].parent, found[0].name
        path = locate_image(folder, relative, verify=verify_images, skip_bad_images=skip_bad_images, summary=summary,
                            image_id=image_id, context=context)
        if path is None:
            continue
        patient = row[patient_column].strip() if patient_column else ""
        lesion = row[group_column].strip() if group_column else ""
        if patient_column and not patient:
            summary.note(f"empty {patient_column}: grouped by its lesion or image instead", image_id)
        elif group_column and not patient_column and not lesion:
            summary.note(f"empty {group_column}: the image is its own split group", image_id)
        group = patient or lesion or image_id
        age = row[age_column] if age_column else None
        sex = row[sex_column] if sex_column else None
        site = row[site_column] if site_column else None
        extra = {c: row[c].strip() for c in extra_columns}
        if group_column:
            extra.setdefault("lesion_id", lesion)
        out.append({
            **empty_row_fields(),
            "image": {"path": str(path.resolve()), "bytes": None},
            "label": class_names.index(code),
            "image_id": image_id,
            "group_id": group,
            "patient_id": patient or None,
            "dataset": dataset_name,
            "source_label": raw,
            "malignant": is_malignant(code, malignant),
            "metadata": metadata_struct(age, sex, site, extra),
            "meta_text": serialize_metadata({"age": age, "sex": sex, "site": site}),
            "report": template_report(code),
            "align_text": align_text_for(code, modality),
        })
    assignment = group_split([r["label"] for r in out], [r["group_id"] for r in out], split_fractions, seed)
    by_split = {name: [] for name in ("train", "validation", "test")}
    for row, split in zip(out, assignment):
        by_split[split].append(row)
    return build_dataset_dict(by_split, summary, train_fraction=train_fraction, seed=seed,
                              features=build_features(class_names))


def _preset_metadata_file(data_dir: Path, name: str) -> Path:
    """`data_dir/name`, or the one file of that name found under `data_dir` (error naming the folder otherwise)."""
    direct = data_dir / name
    if direct.is_file():
        return direct
    found = sorted(p for p in data_dir.rglob(name) if p.is_file()) if data_dir.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{data_dir}: no {name} in the folder or below it (is --data_dir the release folder?)")
    raise DataError(f"{data_dir}: {name} found more than once: {[str(p) for p in found]}")


def load_ham10000(
    data_dir: str | os.PathLike,
    *,
    label_map: str | None = None,
    class_labels: Sequence[str] | None = None,
    seed_split: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """HAM10000 (`HAM10000_metadata.csv` + `HAM10000_images_part_1/2`), lesion-level splits (see the module doc)."""
    data_dir = Path(data_dir)
    metadata = _preset_metadata_file(data_dir, HAM10000_METADATA_FILE)
    return load_table(
        metadata, data_dir, image_column="image_id", label_column="dx", group_column="lesion_id",
        age_column="age", sex_column="sex", site_column="localization", label_map=label_map,
        class_labels=class_labels, split_fractions=split_fractions, seed=seed_split, train_fraction=train_fraction,
        skip_bad_images=skip_bad_images, verify_images=verify_images, dataset_name="ham10000",
        modality="dermoscopic", preset_classes=HAM10000_CLASSES, extra_columns=("dx_type",), image_suffix=".jpg",
        search_subfolders=True, source="HAM10000 (Tschandl et al. 2018, Harvard Dataverse doi:10.7910/DVN/DBW86T)",
    )


def load_pad_ufes_20(
    data_dir: str | os.PathLike,
    *,
    label_map: str | None = None,
    class_labels: Sequence[str] | None = None,
    seed_split: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """PAD-UFES-20 (`metadata.csv` + smartphone PNGs under `images/`), patient-level splits (see the module doc)."""
    data_dir = Path(data_dir)
    metadata = _preset_metadata_file(data_dir, PAD_UFES_20_METADATA_FILE)
    kept = [c for c in PAD_UFES_20_COLUMNS if c not in ("patient_id", "lesion_id", "age", "gender", "region",
                                                        "diagnostic", "img_id")]
    return load_table(
        metadata, data_dir, image_column="img_id", label_column="diagnostic", group_column="lesion_id",
        patient_column="patient_id", age_column="age", sex_column="gender", site_column="region",
        label_map=label_map, class_labels=class_labels, split_fractions=split_fractions, seed=seed_split,
        train_fraction=train_fraction, skip_bad_images=skip_bad_images, verify_images=verify_images,
        dataset_name="pad_ufes_20", modality="clinical", preset_classes=PAD_UFES_20_CLASSES, extra_columns=kept,
        search_subfolders=True, source="PAD-UFES-20 (Pacheco et al. 2020, Mendeley Data doi:10.17632/zr7vgbcyr2.1)",
    )


__all__ = [
    "HAM10000_CLASSES",
    "HAM10000_COLUMNS",
    "HAM10000_METADATA_FILE",
    "LABEL_MAP_DIR",
    "PAD_UFES_20_CLASSES",
    "PAD_UFES_20_COLUMNS",
    "PAD_UFES_20_METADATA_FILE",
    "index_images",
    "load_ham10000",
    "load_pad_ufes_20",
    "load_table",
    "read_label_map",
    "resolve_class_labels",
]
