"""Stand-in raw releases in their real layouts, for the own-data tests (no clinical image is generated)."""

import csv
import shutil
from pathlib import Path

from dataset_scripts.own_data import HAM10000_COLUMNS, PAD_UFES_20_COLUMNS

PAD_CLASS_COLOURS = {
    "ACK": (200, 120, 90), "BCC": (180, 60, 60), "MEL": (60, 40, 30),
    "NEV": (150, 100, 70), "SCC": (210, 170, 150), "SEK": (120, 90, 40),
}


def write_pad_ufes_20(root: Path, patients_per_class: int = 4, image_size: int = 48) -> Path:
    """A PAD-UFES-20 release layout: `metadata.csv` (the 26 public columns, in order) and `images/imgs_part_{1,2,3}/`
    with one flat-coloured stand-in PNG per row, named `PAT_<patient>_<lesion>_<n>.png` as the release names them.

    Every patient has two lesions (two images each, the second lesion of another class for every other patient),
    so a lesion-level split could put one patient in two splits and a patient-level split cannot."""
    from PIL import Image

    root = Path(root)
    classes = list(PAD_CLASS_COLOURS)
    rows, n = [], 0
    for c_index, code in enumerate(classes):
        for p in range(patients_per_class):
            patient = f"PAT_{100 + c_index * patients_per_class + p}"
            other = classes[(c_index + 1) % len(classes)] if p % 2 else code
            for lesion_index, lesion_code in enumerate((code, other)):
                lesion = str(1000 + 10 * (c_index * patients_per_class + p) + lesion_index)
                for _ in range(2):
                    n += 1
                    img_id = f"{patient}_{lesion}_{n}.png"
                    part = root / "images" / f"imgs_part_{1 + n % 3}"
                    part.mkdir(parents=True, exist_ok=True)
                    shade = tuple(min(255, v + 3 * (n % 5)) for v in PAD_CLASS_COLOURS[lesion_code])
                    Image.new("RGB", (image_size, image_size), shade).save(part / img_id)
                    rows.append({
                        "patient_id": patient, "lesion_id": lesion, "smoke": "False", "drink": "False",
                        "background_father": "POMERANIA", "background_mother": "POMERANIA", "age": str(40 + n % 40),
                        "pesticide": "False", "gender": "FEMALE" if n % 2 else "MALE", "skin_cancer_history": "True",
                        "cancer_history": "False", "has_piped_water": "True", "has_sewage_system": "True",
                        "fitspatrick": "2.0", "region": ("FACE", "ARM", "BACK", "CHEST")[n % 4],
                        "diameter_1": "6.0", "diameter_2": "5.0", "diagnostic": lesion_code, "itch": "False",
                        "grew": "UNK", "hurt": "False", "changed": "UNK", "bleed": "False", "elevation": "True",
                        "img_id": img_id, "biopsed": "True",
                    })
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PAD_UFES_20_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_ham10000(root: Path, metadata_subset: Path, image_dir: Path) -> Path:
    """A HAM10000 release layout from the real 20-row metadata subset and the real images among the ISIC 2019
    fixture images: `HAM10000_metadata.csv` and `HAM10000_images_part_1/2/` (images split over the two folders)."""
    root = Path(root)
    with open(metadata_subset, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert set(HAM10000_COLUMNS) <= set(rows[0]), rows[0].keys()
    kept = []
    for i, row in enumerate(rows):
        source = image_dir / f"{row['image_id']}.jpg"
        if not source.is_file():  # not every subset row's image is among the fixture images
            continue
        part = root / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, part / source.name)
        kept.append(row)
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return root
