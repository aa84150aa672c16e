"""Loaders on the real public fixtures in ../shared/fixtures/real (see its SOURCES.md); skipped when absent."""

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_scripts import derm7pt, isic2019, isic2024
from dataset_scripts.schema import CLASS_NAMES, FEATURES, parse_diagnosis

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real"
ISIC19 = REAL / "isic2019"
DERM = REAL / "derm7pt"
ISIC24 = REAL / "isic2024"

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real fixtures not found at {REAL}")


def isic2019_fixture_dir(tmp_path: Path) -> Path:
    """The 28-image real fixture in the official file names (CSV bytes copied as is, CRLF kept)."""
    d = tmp_path / "isic2019"
    d.mkdir()
    shutil.copyfile(ISIC19 / "fixture_GroundTruth.csv", d / isic2019.GROUND_TRUTH_FILE)
    shutil.copyfile(ISIC19 / "fixture_Metadata.csv", d / isic2019.METADATA_FILE)
    (d / isic2019.IMAGE_DIR).symlink_to(ISIC19 / isic2019.IMAGE_DIR)
    return d


@needs_real
def test_isic2019_fixture_rows_labels_ids(tmp_path):
    assert b"\r\n" in (ISIC19 / "fixture_GroundTruth.csv").read_bytes()
    dd = isic2019.load(isic2019_fixture_dir(tmp_path), seed=0)
    assert set(dd) == {"train", "validation", "test"}
    assert dd["train"].features == FEATURES
    total = sum(len(ds) for ds in dd.values())
    assert total == 28
    labels = Counter(CLASS_NAMES[i] for ds in dd.values() for i in ds["label"])
    assert labels == {"MEL": 7, "NV": 7, "BCC": 2, "AK": 3, "BKL": 3, "DF": 3, "VASC": 1, "SCC": 2}
    ids = sorted(i for ds in dd.values() for i in ds["image_id"])
    expected = sorted(p.stem for p in (ISIC19 / isic2019.IMAGE_DIR).glob("*.jpg"))
    assert ids == expected
    assert dd.summary.rows["train"]["total"] + dd.summary.rows["validation"]["total"] + dd.summary.rows["test"]["total"] == 28
    rows = {r["image_id"]: r for ds in dd.values() for r in ds}
    # empty lesion_id -> its own group; patient_id is never filled for ISIC 2019
    assert rows["ISIC_0000000"]["group_id"] == "ISIC_0000000"
    assert rows["ISIC_0024318"]["group_id"] == "HAM_0002450"
    assert all(r["patient_id"] is None for r in rows.values())
    # all metadata fields empty: said to be unknown, never guessed
    empty = rows["ISIC_0000546"]
    assert empty["metadata"]["age"] is None and empty["metadata"]["sex"] is None and empty["metadata"]["site"] is None
    assert "unknown" in empty["meta_text"]
    partial = rows["ISIC_0000551"]
    assert partial["metadata"]["site"] == "posterior torso" and partial["metadata"]["age"] is None
    mel = rows["ISIC_0000002"]
    assert mel["malignant"] == 1 and mel["source_label"] == "MEL"
    assert mel["report"].endswith("Diagnosis: melanoma.") and parse_diagnosis(mel["report"]) == "MEL"
    assert mel["align_text"] == "A dermoscopic image of melanoma."
    assert mel["meta_text"] == "A lesion on an upper extremity of a 60-year-old female patient."
    assert rows["ISIC_0024330"]["image"].size == (180, 180)


@needs_real
def test_isic2019_full_csv_label_level():
    records, summary = isic2019.read_labels(ISIC19)
    assert len(records) == 25331
    assert isic2019.label_counts(records) == {
        "MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628,
    }
    notes = {n["reason"]: n["count"] for n in summary.to_dict()["notes"]}
    assert notes["no lesion_id: the image is its own split group"] == 2084
    assert notes["id ends in _downsampled (kept as is)"] == 2074
    assert summary.to_dict()["exclusions"] == []
    rec = next(r for r in records if r["image_id"] == "ISIC_0000017_downsampled")
    assert rec["group_id"] == "ISIC_0000017_downsampled"


@needs_real
def test_isic2019_downsampled_id_loads(tmp_path):
    """A `_downsampled` row of the real CSVs, with a stand-in image under its real file name."""
    d = tmp_path / "isic"
    (d / isic2019.IMAGE_DIR).mkdir(parents=True)
    picks = {"ISIC_0000017_downsampled", "ISIC_0000000"}
    for name in (isic2019.GROUND_TRUTH_FILE, isic2019.METADATA_FILE):
        lines = (ISIC19 / name).read_bytes().split(b"\r\n")
        keep = [lines[0]] + [ln for ln in lines[1:] if ln.split(b",")[0].decode() in picks]
        (d / name).write_bytes(b"\r\n".join(keep) + b"\r\n")
    for p in picks:
        Image.new("RGB", (16, 16), (120, 80, 60)).save(d / isic2019.IMAGE_DIR / f"{p}.jpg")
    dd = isic2019.load(d, split_fractions=(1.0, 0.0, 0.0))
    assert sorted(dd["train"]["image_id"]) == sorted(picks)
    assert len(dd["validation"]) == 0 and len(dd["test"]) == 0


def derm7pt_standin(tmp_path: Path) -> Path:
    """Real meta/ (copied) + tiny stand-in images at the real relative paths (the real images may not be shared)."""
    root = tmp_path / "release_v0"
    shutil.copytree(DERM / "meta", root / "meta")
    with open(DERM / "meta" / "meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(0)
    for r in rows:
        for col in ("derm", "clinic"):
            p = root / "images" / r[col]
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p, format="JPEG")
    return root


@needs_real
def test_derm7pt_real_meta_with_standin_images(tmp_path):
    assert b"\r\n" not in (DERM / "meta" / "meta.csv").read_bytes()
    root = derm7pt_standin(tmp_path)
    dd = derm7pt.load(tmp_path)  # the nested release_v0/ folder is found
    total = sum(len(ds) for ds in dd.values())
    assert total == 1011 - 24
    exclusions = {e["reason"]: e["count"] for e in dd.summary.to_dict()["exclusions"]}
    assert exclusions == {
        "diagnosis 'melanosis': no class in the 8-class space": 16,
        "diagnosis 'miscellaneous': no class in the 8-class space": 8,
    }
    labels = Counter(CLASS_NAMES[i] for ds in dd.values() for i in ds["label"])
    assert labels == {"NV": 575, "MEL": 252, "BKL": 69, "BCC": 42, "VASC": 29, "DF": 20}
    idx = {s: [int(r["indexes"]) for r in csv.DictReader(open(root / "meta" / f))] for s, f in derm7pt.INDEX_FILES.items()}
    assert sum(len(v) for v in idx.values()) == 1011
    first = dd["train"][0]
    assert first["dataset"] == "derm7pt" and first["metadata"]["age"] is None
    assert "unknown age" in first["meta_text"]
    bcc = [r for ds in dd.values() for r in ds if r["image_id"] == "derm7pt_1"]
    if bcc:  # case 1 is in one of the splits only if its index is listed
        r = bcc[0]
        assert r["report"].startswith("Pigment network: absent. Streaks: absent.")
        assert r["report"].endswith("Vascular structures: arborizing. Diagnosis: basal cell carcinoma.")
        assert "arborizing vessels" in r["criteria"]
        assert r["seven_point"]["vascular_structures"] == "arborizing"
        assert r["derm7pt_group"] == 0 and r["malignant"] == 1
    # per-split counts follow the official index files minus the excluded rows
    with open(DERM / "meta" / "meta.csv", newline="") as fh:
        diag = [r["diagnosis"] for r in csv.DictReader(fh)]
    for split, positions in idx.items():
        kept = [p for p in positions if diag[p] not in ("melanosis", "miscellaneous")]
        assert len(dd[split]) == len(kept)


@needs_real
def test_derm7pt_lentigo_and_groups(tmp_path):
    derm7pt_standin(tmp_path)
    dd = derm7pt.load(tmp_path / "release_v0", image_type="clinic")
    rows = [r for ds in dd.values() for r in ds if r["source_label"] == "lentigo"]
    assert rows and all(CLASS_NAMES[r["label"]] == "BKL" and r["derm7pt_group"] == 3 for r in rows)
    assert all(r["align_text"].startswith("A clinical image of") for r in rows)
    records, summary = derm7pt.read_meta(DERM)
    assert len(records) == 987
    assert Counter(r["group5"] for r in records) == {"NEV": 575, "MEL": 252, "MISC": 73, "SK": 45, "BCC": 42}


@needs_real
def test_derm7pt_case_insensitive_file_match(tmp_path):
    root = derm7pt_standin(tmp_path)
    with open(root / "meta" / "meta.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    target = root / "images" / rows[0]["derm"]  # NEL/Nel026.jpg
    target.rename(target.with_name(target.name.upper()))
    dd = derm7pt.load(root)
    notes = {n["reason"]: n["count"] for n in dd.summary.to_dict()["notes"]}
    assert notes.get("image found by case-insensitive name match") == (1 if 0 in _all_indexed(root) else 0)


def _all_indexed(root):
    out = set()
    for f in derm7pt.INDEX_FILES.values():
        out |= {int(r["indexes"]) for r in csv.DictReader(open(root / "meta" / f))}
    return out


def isic2024_fixture_dir(tmp_path: Path) -> Path:
    """train-metadata.csv (the 5 real rows) + a train-image.hdf5 built from the 5 real tiles, as the official file."""
    import h5py

    d = tmp_path / "isic2024"
    d.mkdir()
    shutil.copyfile(ISIC24 / "train-metadata.sample5.csv", d / "train-metadata.csv")
    with h5py.File(d / "train-image.hdf5", "w") as f:
        for p in sorted((ISIC24 / "train-image" / "image").glob("*.jpg")):
            f.create_dataset(p.stem, data=np.bytes_(p.read_bytes()))
    return d


@needs_real
def test_isic2024_train_sample_from_hdf5(tmp_path):
    dd = isic2024.load(isic2024_fixture_dir(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert list(dd) == ["test"]
    ds = dd["test"]
    assert ds.features == FEATURES and len(ds) == 5
    rows = {r["image_id"]: r for r in ds}
    assert set(rows) == {"ISIC_0082829", "ISIC_0157465", "ISIC_1885694", "ISIC_6776067", "ISIC_9153490"}
    assert CLASS_NAMES[rows["ISIC_0082829"]["label"]] == "SCC"  # Squamous cell carcinoma in situ
    assert CLASS_NAMES[rows["ISIC_1885694"]["label"]] == "SCC"  # Squamous cell carcinoma, Invasive
    assert CLASS_NAMES[rows["ISIC_6776067"]["label"]] == "BCC"
    for benign in ("ISIC_0157465", "ISIC_9153490"):  # plain "Benign": binary target only
        assert rows[benign]["label"] == -1 and rows[benign]["malignant"] == 0
        assert rows[benign]["report"] == "" and rows[benign]["source_label"] == "Benign"
    assert sum(r["malignant"] for r in rows.values()) == 3
    r = rows["ISIC_0082829"]
    assert r["patient_id"] == r["group_id"] == "IP_3249371"
    assert r["metadata"]["age"] == 80 and r["metadata"]["site"] == "anterior torso"
    assert "Hospital Clínic de Barcelona" in r["metadata"]["extra"]  # UTF-8 kept
    assert r["image"].size == (137, 137)
    notes = {n["reason"]: n["count"] for n in dd.summary.to_dict()["notes"]}
    assert notes == {"label -1: no iddx_3 (iddx_full 'Benign'): binary target only": 2}


@needs_real
def test_isic2024_official_test_file_without_target(tmp_path):
    dd = isic2024.load(ISIC24, metadata_file="test-metadata.csv", image_file="test-image.hdf5",
                       cache_dir=str(tmp_path / "cache"))
    ds = dd["test"]
    assert len(ds) == 3 and set(ds["malignant"]) == {-1} and set(ds["label"]) == {-1}
    assert ds[0]["image"].mode == "RGB"


@needs_real
def test_isic2024_store_is_lazy_and_picklable(tmp_path):
    import pickle

    d = isic2024_fixture_dir(tmp_path)
    store = isic2024.HDF5ImageStore(d / "train-image.hdf5")
    assert not store.is_open  # nothing opened yet
    assert store["ISIC_0082829"][:2] == b"\xff\xd8"
    assert store.is_open
    clone = pickle.loads(pickle.dumps(store))
    assert not clone.is_open and "ISIC_9153490" in clone
    store.close()
    clone.close()
    assert not store.is_open and not clone.is_open
