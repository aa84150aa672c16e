"""Bad raw input: clear errors naming file and row, or counted skips when a flag allows; never a silent drop."""

import csv

import pytest
from PIL import Image

from dataset_scripts import DataError, derm7pt, isic2019, isic2024
from dataset_scripts.isic2019 import GROUND_TRUTH_FILE, IMAGE_DIR, METADATA_FILE

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def make_isic2019(d, n=6, labels=None):
    (d / IMAGE_DIR).mkdir(parents=True)
    labels = labels or ["NV", "MEL", "BCC", "NV", "BKL", "AK"][:n]
    gt = ["image," + ",".join(CLASSES)]
    meta = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    for i, lab in enumerate(labels):
        iid = f"ISIC_{i:07d}"
        gt.append(iid + "," + ",".join("1.0" if c == lab else "0.0" for c in CLASSES))
        meta.append(f"{iid},{30 + 5 * i},anterior torso,L{i // 2},female")
        Image.new("RGB", (16, 16), (150, 100, 80)).save(d / IMAGE_DIR / f"{iid}.jpg")
    (d / GROUND_TRUTH_FILE).write_bytes(("\r\n".join(gt) + "\r\n").encode())
    (d / METADATA_FILE).write_bytes(("\r\n".join(meta) + "\r\n").encode())
    return d


def rewrite(path, fn):
    lines = path.read_bytes().decode().split("\r\n")
    path.write_bytes("\r\n".join(fn(lines)).encode())


def test_good_toy_loads(tmp_path):
    dd = isic2019.load(make_isic2019(tmp_path))
    assert sum(len(v) for v in dd.values()) == 6


def test_missing_image_errors_with_file_and_row(tmp_path):
    d = make_isic2019(tmp_path)
    (d / IMAGE_DIR / "ISIC_0000002.jpg").unlink()
    with pytest.raises(DataError, match=r"ISIC_2019_Training_GroundTruth\.csv, line 4 \(ISIC_0000002\).*not found"):
        isic2019.load(d)


def test_missing_image_counted_when_skipping(tmp_path):
    d = make_isic2019(tmp_path)
    (d / IMAGE_DIR / "ISIC_0000002.jpg").unlink()
    dd = isic2019.load(d, skip_bad_images=True)
    assert sum(len(v) for v in dd.values()) == 5
    assert dd.summary.to_dict()["skips"] == [{"reason": "image file missing", "count": 1, "examples": ["ISIC_0000002"]}]
    assert "skipped: 1 x image file missing" in dd.summary.format()


def test_unreadable_image(tmp_path):
    d = make_isic2019(tmp_path)
    (d / IMAGE_DIR / "ISIC_0000003.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"line 5 \(ISIC_0000003\).*ISIC_0000003\.jpg"):
        isic2019.load(d)
    dd = isic2019.load(d, skip_bad_images=True)
    assert dd.summary.to_dict()["skips"][0]["reason"] == "image file unreadable"


@pytest.mark.parametrize("row", ["ISIC_0000001,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                                 "ISIC_0000001,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                                 "ISIC_0000001,0.5,0.5,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
                                 "ISIC_0000001,x,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0"])
def test_label_not_one_hot(tmp_path, row):
    d = make_isic2019(tmp_path)
    rewrite(d / GROUND_TRUTH_FILE, lambda ls: [row if ln.startswith("ISIC_0000001,") else ln for ln in ls])
    with pytest.raises(DataError, match=r"GroundTruth\.csv, line 3 \(ISIC_0000001\)"):
        isic2019.read_labels(d)


def test_duplicate_id(tmp_path):
    d = make_isic2019(tmp_path)
    rewrite(d / GROUND_TRUTH_FILE, lambda ls: ls[:-1] + [ls[2], ""])
    with pytest.raises(DataError, match=r"line 8: duplicate image id 'ISIC_0000001' \(first at line 3\)"):
        isic2019.read_labels(d)


def test_missing_column(tmp_path):
    d = make_isic2019(tmp_path)
    rewrite(d / METADATA_FILE, lambda ls: [",".join(ln.split(",")[:3] + ln.split(",")[4:]) for ln in ls])
    with pytest.raises(DataError, match=r"Metadata\.csv: missing column\(s\) \['lesion_id'\]"):
        isic2019.read_labels(d)


def test_unk_rows_are_excluded_and_counted(tmp_path):
    d = make_isic2019(tmp_path, labels=["NV", "UNK", "MEL"])
    dd = isic2019.load(d)
    assert sum(len(v) for v in dd.values()) == 2
    ex = dd.summary.to_dict()["exclusions"]
    assert ex == [{"reason": "ground-truth column UNK: no class in the 8-class space", "count": 1,
                   "examples": ["ISIC_0000001"]}]


def test_image_without_metadata_row(tmp_path):
    d = make_isic2019(tmp_path)
    rewrite(d / METADATA_FILE, lambda ls: [ln for ln in ls if not ln.startswith("ISIC_0000004")])
    with pytest.raises(DataError, match=r"line 6: image 'ISIC_0000004' has no row in"):
        isic2019.read_labels(d)


def make_derm7pt(d):
    (d / "meta").mkdir(parents=True)
    (d / "images" / "A").mkdir(parents=True)
    header = derm7pt.META_COLUMNS
    rows = []
    for i, diag in enumerate(["clark nevus", "melanoma (in situ)", "miscellaneous", "lentigo"]):
        r = dict.fromkeys(header, "absent")
        r.update(case_num=str(i + 1), diagnosis=diag, seven_point_score="0", level_of_diagnostic_difficulty="low",
                 elevation="flat", location="back", sex="male", management="excision",
                 clinic=f"A/c{i}.jpg", derm=f"A/d{i}.JPG", case_id="", notes="")
        rows.append(r)
        for k in ("clinic", "derm"):
            Image.new("RGB", (8, 8)).save(d / "images" / r[k], format="JPEG")
    with open(d / "meta" / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    for name, idx in (("train_indexes.csv", [0, 2]), ("valid_indexes.csv", [1]), ("test_indexes.csv", [3])):
        (d / "meta" / name).write_text("indexes\n" + "".join(f"{i}\n" for i in idx))
    return d


def test_derm7pt_toy_and_errors(tmp_path):
    d = make_derm7pt(tmp_path / "ok")
    dd = derm7pt.load(d)
    assert {k: len(v) for k, v in dd.items()} == {"train": 1, "validation": 1, "test": 1}
    (d / "images" / "A" / "d1.JPG").unlink()
    with pytest.raises(DataError, match=r"meta\.csv, line 3 \(case 2\).*d1\.JPG not found"):
        derm7pt.load(d)
    dd = derm7pt.load(d, skip_bad_images=True)
    assert len(dd["validation"]) == 0 and dd.summary.to_dict()["skips"][0]["count"] == 1


def test_derm7pt_index_in_two_splits_and_out_of_range(tmp_path):
    d = make_derm7pt(tmp_path / "a")
    (d / "meta" / "test_indexes.csv").write_text("indexes\n3\n0\n")
    with pytest.raises(DataError, match=r"test_indexes\.csv, line 3: row 0 is already in the train split"):
        derm7pt.read_meta(d)
    (d / "meta" / "test_indexes.csv").write_text("indexes\n9\n")
    with pytest.raises(DataError, match="index 9 out of range"):
        derm7pt.read_meta(d)


def test_derm7pt_missing_column(tmp_path):
    d = make_derm7pt(tmp_path / "b")
    text = (d / "meta" / "meta.csv").read_text().replace("streaks,", "streak_s,", 1)
    (d / "meta" / "meta.csv").write_text(text)
    with pytest.raises(DataError, match=r"missing column\(s\) \['streaks'\]"):
        derm7pt.read_meta(d)


def test_isic2024_missing_key_and_duplicate(tmp_path):
    import h5py
    import numpy as np

    d = tmp_path / "i24"
    d.mkdir()
    header = "isic_id,target,patient_id,age_approx,sex,anatom_site_general,iddx_full,iddx_3"
    lines = [header, "ISIC_1,0,IP_1,50.0,male,head/neck,Benign,", "ISIC_2,1,IP_2,,female,,Malignant::X::Melanoma Invasive,Melanoma Invasive"]
    (d / "train-metadata.csv").write_text("\n".join(lines) + "\n")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with h5py.File(d / "train-image.hdf5", "w") as f:
        f.create_dataset("ISIC_1", data=np.bytes_(buf.getvalue()))
    with pytest.raises(DataError, match=r"train-metadata\.csv, line 3 \(ISIC_2\): key 'ISIC_2' not in"):
        isic2024.load(d, cache_dir=str(tmp_path / "c"))
    dd = isic2024.load(d, skip_bad_images=True, cache_dir=str(tmp_path / "c"))
    assert len(dd["test"]) == 1 and dd.summary.to_dict()["skips"][0]["reason"] == "image missing from the HDF5"
    (d / "train-metadata.csv").write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DataError, match="duplicate isic_id 'ISIC_1'"):
        isic2024.read_metadata(d / "train-metadata.csv")
