"""The synthetic generator: determinism, class mix, masks vs reports, and that the real loaders read its layouts."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_scripts import derm7pt, synthetic
from dataset_scripts.schema import CLASS_NAMES, FEATURES, parse_diagnosis


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "data"
    synthetic.generate(root, num_images=96, seed=1, image_size=96)
    return root


def test_deterministic_per_seed(syn, tmp_path):
    again = tmp_path / "again"
    synthetic.generate(again, num_images=96, seed=1, image_size=96)
    assert _digest(again) == _digest(syn)
    other = tmp_path / "other"
    synthetic.generate(other, num_images=96, seed=2, image_size=96)
    assert _digest(other) != _digest(syn)


def test_class_mix_is_long_tailed():
    counts = synthetic.class_counts(1000, 2)
    assert counts == {"NV": 511, "MEL": 181, "BCC": 130, "BKL": 100, "AK": 34, "SCC": 25, "VASC": 10, "DF": 9}
    small = synthetic.class_counts(96, 2)
    assert sum(small.values()) == 96 and min(small.values()) == 2 and max(small, key=small.get) == "NV"


def test_isic_layout_matches_real_format(syn):
    gt = (syn / "isic2019" / "ISIC_2019_Training_GroundTruth.csv").read_bytes()
    assert gt.startswith(b"image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\r\n")
    meta = (syn / "isic2019" / "ISIC_2019_Training_Metadata.csv").read_bytes()
    assert meta.startswith(b"image,age_approx,anatom_site_general,lesion_id,sex\r\n")
    header = (syn / "derm7pt" / "meta" / "meta.csv").read_text().splitlines()[0].split(",")
    assert header == derm7pt.META_COLUMNS and len(header) == 19


def test_load_masks_and_reports_agree(syn):
    dd = synthetic.load(syn, num_images=96, seed=1, image_size=96)
    assert dd["train"].features == FEATURES
    total = Counter()
    seen_criteria = set()
    for ds in dd.values():
        for r in ds:
            total[CLASS_NAMES[r["label"]]] += 1
            assert r["dataset"] == "synthetic"
            masks = synthetic.criterion_masks(r["image"].filename)
            assert list(masks) == r["criteria"]  # a mask for exactly the criteria listed, in CRITERIA order
            for crit, m in masks.items():
                assert m.shape == (96, 96) and m.dtype == bool and m.sum() >= 4
                assert crit in r["report"]
            for crit in set(synthetic.CRITERIA) - set(r["criteria"]):
                assert f" {crit}" not in r["report"] and not r["report"].startswith(f"Dermoscopic findings: {crit}")
            assert r["report"].endswith(f"Diagnosis: {r['align_text'][len('A dermoscopic image of '):-1]}.")
            assert parse_diagnosis(r["report"]) == CLASS_NAMES[r["label"]]
            seen_criteria |= set(r["criteria"])
    assert total == synthetic.class_counts(96, 2)
    assert len(seen_criteria) >= 8
    assert set(seen_criteria) <= set(synthetic.CRITERIA)


def test_derm7pt_layout_through_real_loader(syn):
    dd = derm7pt.load(syn / "derm7pt")
    excluded = {e["reason"]: e["count"] for e in dd.summary.to_dict()["exclusions"]}
    assert set(excluded) <= {"diagnosis 'miscellaneous': no class in the 8-class space"}
    rows = [r for ds in dd.values() for r in ds]
    assert rows and not {CLASS_NAMES[r["label"]] for r in rows} & {"AK", "SCC"}
    for r in rows[:20]:
        masks = synthetic.mask_paths(r["image"].filename)  # masks sit beside the Derm7pt-layout image too
        if r["seven_point"]["blue_whitish_veil"] == "present":
            assert "blue-whitish veil" in masks


def test_metadata_correlates_with_class(tmp_path):
    import csv

    root = tmp_path / "meta"
    synthetic.generate(root, num_images=400, seed=0, image_size=32, write_derm7pt=False)
    gt = list(csv.reader(open(root / "isic2019" / "ISIC_2019_Training_GroundTruth.csv")))
    meta = {r[0]: r for r in csv.reader(open(root / "isic2019" / "ISIC_2019_Training_Metadata.csv"))}
    ages = {}
    for row in gt[1:]:
        cls = gt[0][1 + [float(v) for v in row[1:]].index(1.0)]
        if meta[row[0]][1]:
            ages.setdefault(cls, []).append(int(meta[row[0]][1]))
    assert np.mean(ages["BCC"]) > np.mean(ages["NV"]) + 15


def test_classes_learnable_but_not_trivial_at_64px(tmp_path):
    """Nearest class centroid on 8x8 colour thumbnails of 64 px images: far above chance, below perfect."""
    root = tmp_path / "learn"
    synthetic.generate(root, num_images=480, seed=3, image_size=64, write_derm7pt=False, min_per_class=12)
    dd = synthetic.load(root, num_images=480, seed=3, image_size=64)

    def feats(ds):
        x = np.stack([np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR), np.float32).ravel() / 255
                      for im in ds["image"]])
        return x, np.asarray(ds["label"])

    xtr, ytr = feats(dd["train"])
    xte, yte = feats(dd["validation"].select(range(len(dd["validation"]))))
    xte = np.concatenate([xte, feats(dd["test"])[0]])
    yte = np.concatenate([yte, feats(dd["test"])[1]])
    classes = sorted(set(ytr))
    cent = np.stack([xtr[ytr == c].mean(0) for c in classes])
    pred = np.asarray(classes)[np.argmin(((xte[:, None] - cent[None]) ** 2).sum(-1), 1)]
    recalls = [np.mean(pred[yte == c] == c) for c in classes if (yte == c).any()]
    balanced = float(np.mean(recalls))
    print(f"nearest-centroid balanced accuracy: {balanced:.3f}")
    assert 1 / 8 + 0.15 < balanced < 0.99, balanced


def test_generate_refuses_non_empty_dir_and_leaves_nothing_on_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        synthetic.generate(tmp_path / "full", num_images=16)
    with pytest.raises(ValueError, match="num_images"):
        synthetic.generate(tmp_path / "small", num_images=4)
    assert not (tmp_path / "small").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["full"]


def test_load_refuses_mismatched_generation(syn):
    with pytest.raises(ValueError, match="not the requested"):
        synthetic.load(syn, num_images=97, seed=1, image_size=96)
