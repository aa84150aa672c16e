"""ISIC 2018 Task 2 (lesion attribute detection) -> the shared schema, as one `test` split for grounding evaluation.

Raw layout (the challenge download)::

    data_dir/
      ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg ...                     (dermoscopic images)
      ISIC2018_Task2_Training_GroundTruth_v3/ISIC_0000000_attribute_globules.png
                                             ISIC_0000000_attribute_milia_like_cyst.png
                                             ISIC_0000000_attribute_negative_network.png
                                             ISIC_0000000_attribute_pigment_network.png
                                             ISIC_0000000_attribute_streaks.png

Every image has five binary masks (0 / 255, the image's size), most of them empty. The attributes map to the clinical
vocabulary (`ATTRIBUTE_TERMS`); `criteria` lists the terms whose mask is not empty and `report` names them
("Dermoscopic findings: pigment network and streaks."). Task 2 has no diagnosis: `label` is -1, so the rows only serve
grounding (`python -m bench.grounding --dataset isic2018_task2 --data_dir DIR --model MODEL`). The mask files of a
row are in `metadata.extra` (`attribute_masks`: term -> path); `row_masks(row)` reads them.

Bad input: an image without its five masks, a mask whose size differs from its image, or a file PIL cannot read
raises `DataError` naming the file, or with `skip_bad_images` is counted in the summary and skipped.
"""

import json
from pathlib import Path

import numpy as np

from ._common import DataError, LoadSummary, build_dataset_dict, check_image, empty_row_fields
from .schema import metadata_struct

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
MASK_DIR = "ISIC2018_Task2_Training_GroundTruth_v3"
ATTRIBUTE_TERMS = {
    "globules": "globules",
    "milia_like_cyst": "milia-like cysts",
    "negative_network": "negative network",
    "pigment_network": "pigment network",
    "streaks": "streaks",
}


def mask_file(mask_dir: Path, image_id: str, attribute: str) -> Path:
    return Path(mask_dir) / f"{image_id}_attribute_{attribute}.png"


def _read_mask(path: Path, size: tuple) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size != size:
                raise DataError(f"{path}: mask size {im.size} differs from its image's size {size}")
            return np.asarray(im.convert("L")) > 127
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: unreadable mask ({type(err).__name__}: {err})") from err


def findings_report(terms: list) -> str:
    """The attribute terms as a findings sentence (no diagnosis: Task 2 has none)."""
    if not terms:
        return "No specific dermoscopic criteria are seen."
    listed = terms[0] if len(terms) == 1 else ", ".join(terms[:-1]) + " and " + terms[-1]
    return f"Dermoscopic findings: {listed}."


def load(data_dir, skip_bad_images: bool = False, verify_images: bool = True):
    """ISIC 2018 Task 2 images with their five attribute masks as a `test` split (`DatasetDict` with `.summary`)."""
    from PIL import Image

    root = Path(data_dir)
    image_dir, mask_dir = root / IMAGE_DIR, root / MASK_DIR
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"ISIC 2018 Task 2: {folder} is missing (expected {IMAGE_DIR}/ and {MASK_DIR}/ in {root})")
    summary = LoadSummary(dataset="isic2018_task2", data_dir=str(root))
    summary.settings["attribute_terms"] = dict(ATTRIBUTE_TERMS)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg" and p.stem.startswith("ISIC_"))
    if not images:
        raise DataError(f"ISIC 2018 Task 2: no ISIC_*.jpg images in {image_dir}")
    rows = []
    for path in images:
        image_id = path.stem
        try:
            if verify_images and (reason := check_image(path)) is not None:
                raise DataError(f"{path}: unreadable image ({reason})")
            with Image.open(path) as im:
                size = im.size
            files, present = {}, []
            for attribute, term in ATTRIBUTE_TERMS.items():
                file = mask_file(mask_dir, image_id, attribute)
                if not file.is_file():
                    raise DataError(f"{file} is missing (every image has five attribute masks)")
                files[term] = str(file.resolve())
                if _read_mask(file, size).any():
                    present.append(term)
        except DataError as err:
            if not skip_bad_images:
                raise
            summary.skip("image or attribute mask missing or unreadable", f"{image_id} ({err})")
            continue
        rows.append({
            **empty_row_fields(),
            "image": {"path": str(path.resolve()), "bytes": None},
            "label": -1,
            "image_id": image_id,
            "group_id": image_id,
            "criteria": present,
            "dataset": "isic2018_task2",
            "source_label": "",
            "malignant": -1,
            "metadata": metadata_struct(None, None, None, {"attribute_masks": json.dumps(files, sort_keys=True)}),
            "meta_text": "",
            "report": findings_report(present),
            "align_text": "",
        })
    summary.settings["attribute_images"] = {t: sum(t in r["criteria"] for r in rows) for t in ATTRIBUTE_TERMS.values()}
    return build_dataset_dict({"test": rows}, summary)


def _mask_files(row) -> dict:
    extra = json.loads((row.get("metadata") or {}).get("extra") or "{}")
    return json.loads(extra.get("attribute_masks", "{}"))


def row_masks(row) -> dict:
    """`{term: bool (H, W) mask}` of a loaded row (read from the files recorded in `metadata.extra`)."""
    from PIL import Image

    out = {}
    for term, file in _mask_files(row).items():
        with Image.open(file) as im:
            out[term] = np.asarray(im.convert("L")) > 127
    return out


def image_path_of(row) -> Path:
    """The image file of a loaded row (its masks sit in the mask folder beside the image folder)."""
    files = _mask_files(row)
    mask = Path(next(iter(files.values())))
    return mask.parent.parent / IMAGE_DIR / f"{row['image_id']}.jpg"


__all__ = ["ATTRIBUTE_TERMS", "IMAGE_DIR", "MASK_DIR", "findings_report", "image_path_of", "load", "row_masks"]
