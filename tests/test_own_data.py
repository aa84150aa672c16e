"""Own data: the generic CSV loader, the HAM10000 and PAD-UFES-20 presets in their real layouts, configurable class
lists (a 6-class model trained and used with its class names; HAM10000 mapped into the 8 ISIC 2019 classes), the
dataset card, and the model card's front matter."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import real_fixture
from own_data_fixtures import write_ham10000, write_pad_ufes_20

import dataset_scripts
from configuration_skinclip_vl import ISIC2019_CLASSES, SkinCLIPVLConfig
from dataset_scripts import DataError, align_class_labels, check_no_group_leakage, class_names_of
from dataset_scripts.own_data import LABEL_MAP_DIR, PAD_UFES_20_CLASSES


@pytest.fixture(scope="module")
def pad_dir(tmp_path_factory):
    return write_pad_ufes_20(tmp_path_factory.mktemp("pad_ufes_20") / "PAD-UFES-20")


def _patients_per_split(data):
    return {split: set(ds["patient_id"]) for split, ds in data.items()}


# ------------------------------------------------------------------ PAD-UFES-20


def test_pad_ufes_20_layout_loads_with_patient_level_splits(pad_dir):
    rows = list(csv.DictReader(open(pad_dir / "metadata.csv")))
    lesions_per_patient = {}
    for row in rows:
        lesions_per_patient.setdefault(row["patient_id"], set()).add(row["lesion_id"])
    assert max(len(v) for v in lesions_per_patient.values()) == 2  # a lesion-level split could separate a patient
    assert len({p.parent.name for p in pad_dir.rglob("*.png")}) == 3  # images/imgs_part_1..3

    data, summary = dataset_scripts.load("pad_ufes_20", pad_dir)
    assert class_names_of(data) == PAD_UFES_20_CLASSES
    assert sum(len(ds) for ds in data.values()) == len(rows)
    for ds in data.values():
        assert ds["group_id"] == ds["patient_id"]  # the split unit is the patient
    per_split = _patients_per_split(data)
    check_no_group_leakage(per_split)
    assert all(per_split.values()), per_split
    assert summary.settings["split_unit"].startswith("patient (patient_id)")
    row = data["train"][0]
    assert row["meta_text"].startswith("A lesion on ") and row["align_text"].startswith("A clinical image of ")
    assert row["report"].startswith("Diagnosis: ") and json.loads(row["metadata"]["extra"])["lesion_id"]
    # the same rows grouped by lesion only (the csv loader) put some patient in two splits: the unit matters
    lesion_level, _ = dataset_scripts.load(
        "csv", pad_dir, csv="metadata.csv", image_column="img_id", label_column="diagnostic", group_column="lesion_id",
        seed_split=0, split_fractions=(0.5, 0.25, 0.25),
    )
    with pytest.raises(dataset_scripts.GroupLeakageError):
        check_no_group_leakage(_patients_per_split(lesion_level))


def test_prepare_pad_ufes_20_writes_summary_and_dataset_card(pad_dir, tmp_path):
    from datasets import load_from_disk

    from dataset_scripts import prepare

    out = tmp_path / "prepared"
    assert prepare.main(["--dataset", "pad_ufes_20", "--data_dir", str(pad_dir), "--output_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["class_labels"] == PAD_UFES_20_CLASSES
    assert summary["settings"]["split_unit"].startswith("patient")
    data = load_from_disk(str(out))
    assert class_names_of(data) == PAD_UFES_20_CLASSES
    check_no_group_leakage(_patients_per_split(data))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "cc-by-4.0" and "medical" in front["tags"]
    for split, info in summary["rows"].items():
        assert f"| {split} | {info['total']} |" in card


def test_prepare_push_to_hub_uploads_the_dataset_card(pad_dir, tmp_path, monkeypatch):
    import huggingface_hub
    from datasets import DatasetDict

    from dataset_scripts import prepare

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw.get("repo_type"))))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", lambda self, **kw: calls.append(
        ("upload_file", kw["repo_id"], kw["path_in_repo"], kw["repo_type"], kw["path_or_fileobj"].decode())))
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: calls.append(
        ("push_to_hub", repo_id, {k: len(v) for k, v in self.items()})))
    out = tmp_path / "pushed"
    assert prepare.main(["--dataset", "pad_ufes_20", "--data_dir", str(pad_dir), "--output_dir", str(out),
                         "--push_to_hub", "org/pad-ufes-20"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_file", "push_to_hub"]  # card first, data merge into it
    assert calls[0][1:] == ("org/pad-ufes-20", "dataset")
    _, repo, path, repo_type, card = calls[1]
    assert (repo, path, repo_type) == ("org/pad-ufes-20", "README.md", "dataset")
    summary = json.loads((out / "summary.json").read_text())
    assert calls[2][2] == {split: info["total"] for split, info in summary["rows"].items()}
    assert "Split unit: patient (patient_id)" in card and "Pacheco et al." in card and "CC BY 4.0" in card
    assert card == (out / "README.md").read_text().replace("pad_ufes_20-skinclip-vl", "pad-ufes-20")
    header = next(line for line in card.splitlines() if line.startswith("| split | rows | groups |"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == PAD_UFES_20_CLASSES


def test_six_class_model_trains_on_pad_ufes_20_and_predicts_with_its_class_names(pad_dir, tiny_components, tmp_path):
    import predict
    from train import run
    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments
    from trainer.hub import build_model_card

    data_args = DataArguments(dataset_name="pad_ufes_20", data_dir=str(pad_dir))
    model_args = ModelArguments(vision_model_name_or_path=tiny_components["vision"],
                                decoder_name_or_path=tiny_components["decoder"], lora_r=4, lora_alpha=8,
                                lora_dropout=0.0)
    training_args = CFATrainingArguments(
        output_dir=str(tmp_path / "run"), report_to="none", seed=0, max_steps=2, per_device_train_batch_size=4,
        per_device_eval_batch_size=16, learning_rate=1e-3, save_strategy="no", eval_strategy="no", logging_steps=1,
        dataloader_num_workers=0, n_bootstrap=5, disable_tqdm=True, use_cpu=True,
    )
    report = run(model_args, data_args, training_args)
    model_dir = tmp_path / "run" / "model"
    config = SkinCLIPVLConfig.from_pretrained(model_dir)
    assert config.class_labels == PAD_UFES_20_CLASSES and config.num_labels == 6
    assert report["split_unit"].startswith("patient") and report["dataset"] == "pad_ufes_20"
    assert set(report["test"]["per_class"]) == set(PAD_UFES_20_CLASSES)
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()

    image = next(pad_dir.rglob("*.png"))
    out = tmp_path / "pred"
    assert predict.main(["--model", str(model_dir), "--image", str(image), "--output_dir", str(out),
                         "--max_new_tokens", "4"]) == 0
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert list(record["probabilities"]) == PAD_UFES_20_CLASSES
    assert record["prediction"] in PAD_UFES_20_CLASSES
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5
    # P(MEL)+P(BCC)+P(SCC): the malignant classes this model has
    expected = sum(record["probabilities"][c] for c in ("BCC", "MEL", "SCC"))
    assert record["malignancy_score"] == pytest.approx(expected, abs=1e-5)

    # the model card names the model's classes, the data and their terms
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    model = SkinCLIPVLForDiagnosis.from_pretrained(model_dir)
    card = build_model_card(model, "org/pad-adapter", metrics=tmp_path / "run" / "metrics.json")
    front = yaml.safe_load(card.split("---")[1])
    # both components, as the loaded model records them (small local components travel inside the saved model)
    assert front["base_model"] == [model.config.vision_model_name_or_path, model.config.decoder_name_or_path]
    assert [Path(p).name for p in front["base_model"]] == ["vision", "decoder"]
    assert front["datasets"] == ["pad_ufes_20"] and front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "image-classification"
    assert {"dermatology", "medical", "lora"} <= set(front["tags"])
    assert "over 6 classes (ACK (actinic keratosis), BCC" in card and "CC BY 4.0" in card
    assert "## Intended use" in card and "## Limitations" in card and "The 6 classes" in card

    # an ISIC 2019 model cannot take these data as they are: the error names the labels it lacks
    data, _ = dataset_scripts.load("pad_ufes_20", pad_dir)
    with pytest.raises(DataError, match=r"ACK \(\d+ rows\), NEV \(\d+ rows\), SEK \(\d+ rows\)"):
        align_class_labels(data, ISIC2019_CLASSES, "the model")
    mapped, _ = dataset_scripts.load("pad_ufes_20", pad_dir,
                                     label_map=str(LABEL_MAP_DIR / "pad_ufes_20_to_isic2019.json"))
    assert class_names_of(mapped) == ISIC2019_CLASSES
    assert align_class_labels(mapped, ISIC2019_CLASSES) is mapped


# ------------------------------------------------------------------ HAM10000 (real metadata subset and images)


def test_ham10000_maps_into_the_8_isic_classes(tmp_path):
    subset = real_fixture("isic2019", "HAM10000_metadata.subset.csv")
    images = real_fixture("isic2019", "ISIC_2019_Training_Input")
    root = write_ham10000(tmp_path / "HAM10000", subset, images)
    rows = list(csv.DictReader(open(root / "HAM10000_metadata.csv")))
    assert len(rows) >= 15 and (root / "HAM10000_images_part_2").is_dir()

    label_map = LABEL_MAP_DIR / "ham10000_to_isic2019.json"
    mapping = json.loads(label_map.read_text())
    data, summary = dataset_scripts.load("ham10000", root, label_map=str(label_map))
    assert class_names_of(data) == ISIC2019_CLASSES
    seen = {}
    for ds in data.values():
        for row in ds:
            seen[row["image_id"]] = row
            assert ISIC2019_CLASSES[row["label"]] == mapping[row["source_label"]]
            assert row["group_id"] == json.loads(row["metadata"]["extra"])["lesion_id"]
            assert row["patient_id"] is None
    assert set(seen) == {r["image_id"] for r in rows}
    by_id = {r["image_id"]: r for r in rows}
    assert {ISIC2019_CLASSES[r["label"]] for r in seen.values()} == {mapping[r["dx"]] for r in rows}
    first = seen[rows[0]["image_id"]]
    assert first["metadata"]["age"] == int(by_id[first["image_id"]]["age"])
    assert summary.settings["split_unit"].startswith("lesion (lesion_id)")
    assert align_class_labels(data, ISIC2019_CLASSES) is data  # fits an ISIC 2019 model as is

    own, _ = dataset_scripts.load("ham10000", root)  # its own 7 dx codes
    assert class_names_of(own) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    with pytest.raises(DataError, match="akiec"):
        align_class_labels(own, ISIC2019_CLASSES)


# ------------------------------------------------------------------ generic CSV: class lists, maps, bad input


def _csv_layout(tmp_path, rows, header=("file", "dx", "patient", "lesion", "age")):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for row in rows:
        if not row[0].startswith("missing"):
            Image.new("RGB", (16, 16), (10 * len(row[0]), 80, 90)).save(images / row[0])
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path, images


def _rows(n=12):
    return [(f"img{i}.png", ("cyst", "wart", "mole")[i % 3], f"P{i // 2}", f"L{i}", str(30 + i)) for i in range(n)]


def test_csv_loader_class_list_label_map_and_split_unit(tmp_path):
    path, images = _csv_layout(tmp_path, _rows())
    common = dict(csv=str(path), image_dir=str(images), image_column="file", label_column="dx")
    data, summary = dataset_scripts.load("csv", None, patient_column="patient", age_column="age", **common)
    assert class_names_of(data) == ["cyst", "mole", "wart"]  # sorted distinct labels
    assert summary.settings["split_unit"].startswith("patient (patient)")
    check_no_group_leakage(_patients_per_split(data))
    assert data["train"][0]["meta_text"].startswith("A lesion at an unknown anatomical site of a 3")

    data, summary = dataset_scripts.load("csv", None, group_column="lesion", class_labels=["wart", "mole", "cyst"],
                                         **common)
    assert class_names_of(data) == ["wart", "mole", "cyst"]  # the given head order
    assert summary.settings["split_unit"].startswith("lesion (lesion)")
    row = data["train"][0]
    assert ["wart", "mole", "cyst"][row["label"]] == row["source_label"] and row["patient_id"] is None

    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"cyst": None, "wart": "VASC", "mole": "NV"}))
    data, summary = dataset_scripts.load("csv", None, label_map=str(label_map), **common)
    assert class_names_of(data) == ISIC2019_CLASSES  # every target is an ISIC 2019 class
    excluded = {e["reason"]: e["count"] for e in summary.to_dict()["exclusions"]}
    assert excluded == {"label 'cyst' maps to no class (null in map.json)": 4}
    assert sum(len(ds) for ds in data.values()) == 8

    with pytest.raises(DataError, match=r"labels\.csv, line 2 \(img0\.png\): label 'cyst' is not one of the classes"):
        dataset_scripts.load("csv", None, class_labels=["wart", "mole"], **common)
    label_map.write_text(json.dumps({"wart": "VASC", "mole": "NV"}))
    with pytest.raises(DataError, match=r"labels\.csv, line 2 \(img0\.png\): label 'cyst' is not in the label map"):
        dataset_scripts.load("csv", None, label_map=str(label_map), **common)
    label_map.write_text("{not json")
    with pytest.raises(DataError, match=r"map\.json: not a JSON file"):
        dataset_scripts.load("csv", None, label_map=str(label_map), **common)


def test_csv_loader_bad_input_names_file_and_line(tmp_path):
    rows = _rows(9)
    rows[4] = ("missing.png", "wart", "P9", "L9", "50")
    path, images = _csv_layout(tmp_path, rows)
    common = dict(csv=str(path), image_dir=str(images), image_column="file", label_column="dx")
    with pytest.raises(DataError, match=r"labels\.csv, line 6 \(missing\.png\): .*missing\.png not found"):
        dataset_scripts.load("csv", None, **common)
    data, summary = dataset_scripts.load("csv", None, skip_bad_images=True, **common)
    assert summary.to_dict()["skips"] == [{"reason": "image file missing", "count": 1, "examples": ["missing.png"]}]
    assert sum(len(ds) for ds in data.values()) == 8
    with pytest.raises(DataError, match=r"labels\.csv: missing column\(s\) \['diagnosis'\]"):
        dataset_scripts.load("csv", None, **{**common, "label_column": "diagnosis"})
    with pytest.raises(ValueError, match=r"needs the option\(s\) \['image_column'\]"):
        dataset_scripts.load("csv", None, csv=str(path), label_column="dx")
    with pytest.raises(ValueError, match="does not take the option 'class_labels'"):
        dataset_scripts.load("isic2019", tmp_path, class_labels=["a", "b"])

    rows = _rows(6)
    rows[3] = (rows[1][0], "wart", "P1", "L1", "40")
    (tmp_path / "dup").mkdir()
    path, images = _csv_layout(tmp_path / "dup", rows)
    with pytest.raises(DataError, match=r"line 5: duplicate image 'img1\.png' \(first at line 3\)"):
        dataset_scripts.load("csv", None, csv=str(path), image_dir=str(images), image_column="file",
                             label_column="dx")
    rows = _rows(6)
    rows[2] = (rows[2][0], "", "P1", "L1", "40")
    (tmp_path / "empty").mkdir()
    path, images = _csv_layout(tmp_path / "empty", rows)
    with pytest.raises(DataError, match=r"line 4 \(img2\.png\): empty 'dx'"):
        dataset_scripts.load("csv", None, csv=str(path), image_dir=str(images), image_column="file",
                             label_column="dx")


def test_align_class_labels_reorders_by_name(tmp_path):
    path, images = _csv_layout(tmp_path, _rows())
    data, _ = dataset_scripts.load("csv", None, csv=str(path), image_dir=str(images), image_column="file",
                                   label_column="dx")
    model_classes = ["mole", "other", "wart", "cyst"]
    aligned = align_class_labels(data, model_classes)
    assert class_names_of(aligned) == model_classes
    for split in data:
        before = [class_names_of(data)[i] for i in data[split]["label"]]
        after = [model_classes[i] for i in aligned[split]["label"]]
        assert before == after == aligned[split]["source_label"]


def test_config_class_labels_is_the_one_source(tmp_path):
    config = SkinCLIPVLConfig(class_labels=PAD_UFES_20_CLASSES)
    assert config.num_labels == 6 and config.id2label[3] == "NEV" and config.label2id["SEK"] == 5
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "class_labels" not in saved and saved["id2label"]["0"] == "ACK"
    assert SkinCLIPVLConfig.from_pretrained(tmp_path).class_labels == PAD_UFES_20_CLASSES
    assert SkinCLIPVLConfig().class_labels == ISIC2019_CLASSES
    with pytest.raises(ValueError, match="distinct"):
        SkinCLIPVLConfig(class_labels=["A", "A"])
