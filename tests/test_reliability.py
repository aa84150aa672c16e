"""Issue 9: no silent wrong results, one image path, validated inputs, self-contained saved models, clear errors."""

import csv
import json
import random
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from test_datasets_bad_inputs import make_isic2019

from dataset_scripts import DataError, isic2019
from dataset_scripts.isic2019 import IMAGE_DIR, METADATA_FILE


def _noise_image(size=64, seed=0, mode="RGB"):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).convert(mode)


def _odd_mode_files(folder):
    """The same picture as a 16-bit grey PNG, CMYK JPEG, palette PNG with transparency, LA PNG and RGBA PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _noise_image(48, seed=3)
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    base.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    palette = base.convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    la = base.convert("LA")
    la.putalpha(Image.linear_gradient("L").resize(la.size))
    la.save(folder / "la.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size).rotate(90))
    rgba.save(folder / "rgba.png")
    return sorted(folder.iterdir())


def _image_rows(paths):
    n = len(paths)
    return Dataset.from_dict(
        {"image": [str(p) for p in paths], "image_id": [p.stem for p in paths], "label": [1] * n,
         "meta_text": [""] * n, "report": ["r"] * n, "align_text": ["a"] * n, "group_id": [p.stem for p in paths]},
        features=Features({"image": ImageFeature(), "image_id": Value("string"), "label": Value("int64"),
                           "meta_text": Value("string"), "report": Value("string"), "align_text": Value("string"),
                           "group_id": Value("string")}),
    )


# ---------------------------------------------------------------------------------------------------------------------
# silent wrong results
# ---------------------------------------------------------------------------------------------------------------------


def test_feature_cache_misses_when_images_are_replaced_in_place(tmp_path, tiny_model, tiny_processor):
    from trainer.collator import FeatureCache

    folder = tmp_path / "images"
    folder.mkdir()
    paths = [folder / f"img{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        _noise_image(seed=i).save(p)
    cache = FeatureCache(tmp_path / "cache", tiny_model, tiny_processor)
    ds = _image_rows(paths)
    first = np.array(cache.image_features(ds, ds._fingerprint))
    again = np.array(cache.image_features(_image_rows(paths), ds._fingerprint))
    np.testing.assert_array_equal(first, again)  # nothing changed: a hit
    assert len(list((tmp_path / "cache").glob("image-*.npy"))) == 1
    for i, p in enumerate(paths):  # same paths, same fingerprint of the path strings, other pixels
        _noise_image(seed=100 + i).save(p)
    replaced = _image_rows(paths)
    assert replaced._fingerprint == ds._fingerprint
    second = np.array(cache.image_features(replaced, replaced._fingerprint))
    assert len(list((tmp_path / "cache").glob("image-*.npy"))) == 2
    assert not np.allclose(first, second)


def test_training_cache_augmentation_and_predict_see_the_same_pixels(tmp_path, tiny_model, tiny_processor):
    """16-bit, CMYK, palette, LA and RGBA files: the collator (plain and augmented), the feature cache and predict's
    loader give identical pixel tensors."""
    from processing_skinclip_vl import load_image
    from trainer.collator import FeatureCache, SkinCLIPVLCollator, augment_image

    paths = _odd_mode_files(tmp_path / "odd")
    ds = _image_rows(paths)
    predicted = [load_image(p) for p in paths]  # what predict.py hands to model.diagnose
    expected = tiny_processor(images=predicted, metadata=[None] * len(paths), return_tensors="pt")["pixel_values"]
    assert np.asarray(predicted[0]).std() > 10  # the 16-bit file is not a white sheet

    plain = SkinCLIPVLCollator(tiny_processor)([ds[i] for i in range(len(ds))])
    torch.testing.assert_close(plain["pixel_values"], expected, rtol=0, atol=0)

    augmented = SkinCLIPVLCollator(tiny_processor, augment=True, seed=7)([ds[i] for i in range(len(ds))])
    rng = random.Random(7)
    want = tiny_processor(images=[augment_image(image, rng) for image in predicted], return_tensors="pt")
    torch.testing.assert_close(augmented["pixel_values"], want["pixel_values"], rtol=0, atol=0)

    cached = FeatureCache(tmp_path / "cache", tiny_model, tiny_processor).image_features(ds, ds._fingerprint)
    with torch.no_grad():
        direct = tiny_model.get_image_features(expected).float().numpy().astype(np.float16)
    np.testing.assert_array_equal(np.asarray(cached), direct)


def _big_jpeg(path, size=96):
    _noise_image(size, seed=1).save(path, quality=95)


def test_prepare_verification_decodes_truncated_images(tmp_path):
    d = make_isic2019(tmp_path)
    target = d / IMAGE_DIR / "ISIC_0000002.jpg"
    _big_jpeg(target)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"line 4 \(ISIC_0000002\).*ISIC_0000002\.jpg.*truncated"):
        isic2019.load(d)
    dd = isic2019.load(d, skip_bad_images=True)
    assert sum(len(v) for v in dd.values()) == 5
    assert dd.summary.to_dict()["skips"][0]["examples"] == ["ISIC_0000002"]


@pytest.mark.parametrize("limit", [100, 200])  # 16 x 16 = 256 px: over 2 x 100 (error) and over 200 (warning)
def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch, limit):
    d = make_isic2019(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DataError, match=r"line 2 \(ISIC_0000000\).*decompression bomb"):
        isic2019.load(d)
    dd = isic2019.load(d, skip_bad_images=True)
    assert sum(len(v) for v in dd.values()) == 0 or dd.summary.to_dict()["skips"][0]["count"] == 6


def test_undecodable_image_at_training_time_names_image_and_row(tmp_path, tiny_processor):
    from trainer.collator import SkinCLIPVLCollator

    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    _big_jpeg(good)
    _big_jpeg(bad)
    bad.write_bytes(bad.read_bytes()[:400])
    ds = _image_rows([good, bad]).add_column("row_index", [0, 1])
    ds = ds.cast_column("image", ImageFeature(decode=False))
    collator = SkinCLIPVLCollator(tiny_processor)
    with pytest.raises(ValueError, match=r"(?i)image bad \(row 1\).*truncated"):
        collator([ds[0], ds[1]])


# ---------------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--lora_r", "0"], "lora_r"),
        (["--lora_alpha", "0"], "lora_alpha"),
        (["--lora_dropout", "1.5"], "lora_dropout"),
        (["--lambda_gen", "nan"], "lambda_gen"),
        (["--lambda_align", "-1"], "lambda_align"),
        (["--lambda_calibration", "inf"], "lambda_calibration"),
        (["--focal_loss_gamma", "-2"], "focal_loss_gamma"),
        (["--train_fraction", "0"], "train_fraction"),
        (["--synthetic_num_images", "0"], "synthetic_num_images"),
        (["--n_bootstrap", "-5"], "n_bootstrap"),
        (["--learning_rate", "nan"], "learning_rate"),
        (["--max_length", "0"], "max_length"),
    ],
)
def test_train_numeric_arguments_are_validated_at_parse_time(tmp_path, flags, name):
    import train

    with pytest.raises(ValueError, match=name):
        train.parse_args(["--output_dir", str(tmp_path / "run"), "--report_to", "none", *flags])


def test_apply_lora_has_no_or_default(tiny_model):
    from adapters_skinclip_vl import apply_lora

    with pytest.raises(ValueError, match="r"):
        apply_lora(tiny_model, r=0, verbose=False)


@pytest.mark.parametrize(
    "module, flags, name",
    [
        ("predict", ["--max_new_tokens", "0"], "--max_new_tokens"),
        ("predict", ["--batch_size", "0"], "--batch_size"),
        ("predict", ["--age", "nan"], "--age"),
        ("evaluate_model", ["--n_bootstrap", "-1"], "--n_bootstrap"),
        ("evaluate_model", ["--batch_size", "0"], "--batch_size"),
        ("evaluate_model", ["--max_samples", "0"], "--max_samples"),
        ("prepare", ["--train_fraction", "0"], "--train_fraction"),
        ("prepare", ["--synthetic_num_images", "-3"], "--synthetic_num_images"),
        ("prepare", ["--split_fractions", "0.5", "0.5", "nan"], "--split_fractions"),
        ("prepare", ["--num_proc", "0"], "--num_proc"),
    ],
)
def test_cli_numeric_arguments_are_validated(tmp_path, capsys, module, flags, name):
    if module == "predict":
        import predict

        base = ["--model", "m", "--image", "x.png", "--output_dir", str(tmp_path)]
        run = predict.parse_args
    elif module == "evaluate_model":
        import evaluate_model

        base = ["--model", "m", "--dataset", "synthetic"]
        run = evaluate_model.build_parser().parse_args
    else:
        from dataset_scripts import prepare

        base = ["--dataset", "synthetic", "--output_dir", str(tmp_path / "out")]
        run = prepare.build_parser().parse_args
    with pytest.raises(SystemExit):
        run([*base, *flags])
    assert name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_metadata_values_are_unknown_and_warned():
    from processing_skinclip_vl import canonical_metadata, metadata_warnings, serialize_metadata

    raw = {"age": 300, "sex": "x", "site": "moon"}
    assert canonical_metadata(raw) == {"age": None, "sex": None, "site": None}
    assert serialize_metadata(raw) == serialize_metadata({})
    warned = " | ".join(metadata_warnings(raw))
    assert "age 300" in warned and "sex 'x'" in warned and "site 'moon'" in warned
    assert metadata_warnings({"age": "55", "sex": "F", "site": "Anterior torso"}) == []
    assert metadata_warnings({"age_approx": "abc"}) and metadata_warnings({"age": -5})
    assert metadata_warnings({"age": None, "sex": "", "site": float("nan")}) == []  # missing is not invalid


def test_prepare_summary_counts_invalid_metadata(tmp_path):
    d = make_isic2019(tmp_path)
    path = d / METADATA_FILE
    lines = path.read_bytes().decode().split("\r\n")
    lines[2] = lines[2].replace(",35,", ",abc,")
    lines[3] = lines[3].replace("anterior torso", "moon")
    path.write_bytes("\r\n".join(lines).encode())
    summary = isic2019.load(d).summary.to_dict()
    notes = {n["reason"]: n for n in summary["notes"]}
    assert notes["metadata value not understood (used as unknown): age"]["examples"] == ["ISIC_0000001"]
    assert notes["metadata value not understood (used as unknown): site"]["examples"] == ["ISIC_0000002"]


# ---------------------------------------------------------------------------------------------------------------------
# predict.py: metadata, odd images, model files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tiny_components, tmp_path_factory):
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from processing_skinclip_vl import SkinCLIPVLProcessor

    torch.manual_seed(0)
    model = SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    model.apply_lora(verbose=False)
    out = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(out)
    SkinCLIPVLProcessor.from_components(tiny_components["vision"], tiny_components["decoder"]).save_pretrained(out)
    return out


def test_predict_reports_canonical_metadata_and_warnings(saved_model, tmp_path):
    import predict

    image = tmp_path / "lesion.png"
    _noise_image(64, seed=4).save(image)
    common = ["--model", str(saved_model), "--image", str(image), "--no_rationale"]
    assert predict.main([*common, "--age", "300", "--sex", "x", "--site", "moon", "--output_dir", str(tmp_path / "a")]) == 0
    assert predict.main([*common, "--output_dir", str(tmp_path / "b")]) == 0
    odd = json.loads((tmp_path / "a" / "lesion.json").read_text())
    plain = json.loads((tmp_path / "b" / "lesion.json").read_text())
    assert odd["metadata"] == {"age": None, "sex": None, "site": None}
    assert odd["metadata_given"] == {"age": 300.0, "sex": "x", "site": "moon"}
    assert odd["probabilities"] == plain["probabilities"]  # 'moon' no longer reaches the prompt
    text = " | ".join(odd["warnings"])
    assert "age 300" in text and "sex 'x'" in text and "site 'moon'" in text

    table = tmp_path / "cases.csv"
    table.write_text("image,age,sex,site\nlesion.png,abc,female,back\n")
    assert predict.main(["--model", str(saved_model), "--csv", str(table), "--no_rationale",
                         "--output_dir", str(tmp_path / "c")]) == 0
    with open(tmp_path / "c" / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert "age 'abc'" in row["warnings"]
    record = json.loads((tmp_path / "c" / "lesion.json").read_text())
    assert record["metadata"] == {"age": None, "sex": "female", "site": "back"}


def test_predict_warns_on_tiny_blank_and_transparent_images(saved_model, tmp_path):
    import predict

    folder = tmp_path / "odd"
    folder.mkdir()
    _noise_image(8, seed=0).save(folder / "tiny.png")
    Image.new("RGB", (64, 64), (200, 150, 120)).save(folder / "blank.png")
    Image.new("RGBA", (64, 64), (10, 20, 30, 0)).save(folder / "transparent.png")
    _noise_image(64, seed=2).save(folder / "fine.png")
    assert predict.main(["--model", str(saved_model), "--images_dir", str(folder), "--no_rationale",
                         "--output_dir", str(tmp_path / "out")]) == 0
    warnings = {p: " | ".join(json.loads((tmp_path / "out" / f"{p}.json").read_text())["warnings"])
                for p in ("tiny", "blank", "transparent", "fine")}
    assert "tiny" in warnings["tiny"] and "8 x 8" in warnings["tiny"]
    assert "blank" in warnings["blank"]
    assert "transparent" in warnings["transparent"]
    assert warnings["fine"] == ""


def test_predict_csv_that_is_not_utf8_names_file_and_line(saved_model, tmp_path):
    import predict

    table = tmp_path / "cases.csv"
    table.write_bytes(b"image,site\na.png,back\nb.png,t\xeate\n")
    with pytest.raises(SystemExit, match=r"cases\.csv, line 3: not UTF-8"):
        predict.main(["--model", str(saved_model), "--csv", str(table), "--output_dir", str(tmp_path / "o")])


def _copy_model(saved_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(saved_model, target)
    return target


@pytest.mark.parametrize("damage", ["missing_path", "no_config", "no_adapter", "truncated_adapter"])
def test_corrupt_or_missing_model_files_are_named(saved_model, tmp_path, damage):
    import predict

    model = _copy_model(saved_model, tmp_path)
    if damage == "missing_path":
        model = tmp_path / "no_such_model"
        expected = r"no_such_model.*does not exist"
    elif damage == "no_config":
        (model / "config.json").unlink()
        expected = r"config\.json.*missing"
    elif damage == "no_adapter":
        shutil.rmtree(model / "adapter")
        expected = r"adapter.*missing"
    else:
        weights = model / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expected = r"adapter_model\.safetensors.*(corrupt|truncated)"
    with pytest.raises((SystemExit, ValueError, OSError), match=expected):
        predict.load_model(str(model))


# ---------------------------------------------------------------------------------------------------------------------
# self-contained saved models
# ---------------------------------------------------------------------------------------------------------------------


def test_saved_model_loads_from_any_working_directory(tiny_components, tmp_path, monkeypatch):
    from transformers import AutoModel

    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    work = tmp_path / "work"
    (work / "outputs" / "components").mkdir(parents=True)
    for role in ("vision", "decoder"):
        shutil.copytree(tiny_components[role], work / "outputs" / "components" / role)
    monkeypatch.chdir(work)
    model = SkinCLIPVLForDiagnosis.from_components("outputs/components/vision", "outputs/components/decoder")
    model.apply_lora(verbose=False)
    model.save_pretrained("outputs/run/model")
    shutil.move(str(work / "outputs" / "run" / "model"), str(tmp_path / "moved"))
    shutil.rmtree(work)  # a fresh clone: the components folder of the training run is gone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoModel.from_pretrained(str(tmp_path / "moved"), trust_remote_code=True)
    assert json.loads((tmp_path / "moved" / "config.json").read_text())["vision_model_name_or_path"] == "components/vision"
    assert loaded.config.vision_model_name_or_path == str(tmp_path / "moved" / "components" / "vision")
    assert (tmp_path / "moved" / "components" / "decoder" / "config.json").is_file()


def test_large_local_components_are_absolute_and_missing_ones_are_named(tiny_components, tmp_path, monkeypatch):
    import adapters_skinclip_vl
    import modeling_skinclip_vl as msv

    copies = {}
    for role in ("vision", "decoder"):
        copies[role] = tmp_path / "big" / role
        shutil.copytree(tiny_components[role], copies[role])
    monkeypatch.setattr(adapters_skinclip_vl, "SMALL_COMPONENT_BYTES", 1)  # everything counts as large
    monkeypatch.chdir(tmp_path)
    model = msv.SkinCLIPVLForDiagnosis.from_components("big/vision", "big/decoder")
    model.apply_lora(verbose=False)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["vision_model_name_or_path"] == str(copies["vision"].resolve())
    assert not (tmp_path / "model" / "components").exists()
    shutil.rmtree(copies["vision"])
    with pytest.raises(ValueError, match=r"vision component .*big/vision.* does not exist.*vision="):
        msv.SkinCLIPVLForDiagnosis.from_pretrained(tmp_path / "model")


def test_hub_ids_stay_hub_ids():
    from adapters_skinclip_vl import _portable_component

    assert _portable_component("openai/clip-vit-large-patch14", "/tmp/x", "vision") == "openai/clip-vit-large-patch14"


# ---------------------------------------------------------------------------------------------------------------------
# clear errors
# ---------------------------------------------------------------------------------------------------------------------


def _split_dict(train_labels, validation_labels, test_labels):
    from datasets import ClassLabel, DatasetDict

    from dataset_scripts.schema import CLASS_NAMES

    def rows(labels):
        return Dataset.from_dict({"label": labels, "image_id": [f"i{k}" for k in range(len(labels))]},
                                 features=Features({"label": ClassLabel(names=list(CLASS_NAMES)),
                                                    "image_id": Value("string")}))

    return DatasetDict(train=rows(train_labels), validation=rows(validation_labels), test=rows(test_labels))


def test_empty_split_is_an_error_before_the_model_is_built(tmp_path, monkeypatch):
    import dataset_scripts
    import train

    monkeypatch.setattr(dataset_scripts, "load", lambda *a, **k: (_split_dict([0, 1], [], [1]), None))
    model_args, data_args, training_args = train.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    with pytest.raises(ValueError, match=r"'validation' split .* is empty"):
        train.load_data(data_args, training_args)


def test_absent_classes_are_warned_with_per_split_counts(tmp_path, monkeypatch, caplog):
    import dataset_scripts
    import train

    monkeypatch.setattr(dataset_scripts, "load", lambda *a, **k: (_split_dict([0, 1, 1], [0], [1]), None))
    model_args, data_args, training_args = train.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    with caplog.at_level("INFO"):
        train.load_data(data_args, training_args)
    text = caplog.text
    assert "absent from the training split" in text and "BCC" in text and "SCC" in text
    assert "train: 3 rows (MEL 1, NV 2" in text


def test_train_needs_data_dir_for_raw_sources(tmp_path):
    import train

    model_args, data_args, training_args = train.parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--dataset_name", "isic2019"])
    with pytest.raises(ValueError, match="--data_dir"):
        train.load_data(data_args, training_args)


def test_evaluate_needs_data_dir_and_nonempty_split(tmp_path, monkeypatch):
    import dataset_scripts
    import evaluate_model

    args = evaluate_model.build_parser().parse_args(["--model", "m", "--dataset", "isic2019"])
    with pytest.raises(ValueError, match="--data_dir"):
        evaluate_model.load_split("isic2019", None, "test", args)
    monkeypatch.setattr(dataset_scripts, "load", lambda *a, **k: (_split_dict([0], [0], []), None))
    with pytest.raises(ValueError, match=r"'test' split .* is empty"):
        evaluate_model.load_split("isic2019", str(tmp_path), "test", args)


def test_corrupt_checkpoint_on_resume_names_the_file(tmp_path):
    import train

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    torch.save({"x": torch.zeros(100)}, checkpoint / "optimizer.pt")
    (checkpoint / "optimizer.pt").write_bytes((checkpoint / "optimizer.pt").read_bytes()[:300])
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"optimizer\.pt.*(corrupt|truncated)"):
        train.check_checkpoint(checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"trainer_state\.json"):
        train.check_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint-9.*does not exist"):
        train.check_checkpoint(tmp_path / "checkpoint-9")
    model_args, data_args, training_args = train.parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--resume_from_checkpoint", str(checkpoint)])
    with pytest.raises(ValueError, match=r"trainer_state\.json"):
        train.run(model_args, data_args, training_args)  # before any data or model is built


def test_non_utf8_csv_names_file_and_line(tmp_path):
    d = make_isic2019(tmp_path)
    path = d / METADATA_FILE
    lines = path.read_bytes().split(b"\r\n")
    lines[3] = lines[3].replace(b"female", b"f\xe9male")
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(DataError, match=r"ISIC_2019_Training_Metadata\.csv, line 4: not UTF-8"):
        isic2019.load(d)


@pytest.mark.parametrize("image_id", ["../escape", "/etc/passwd"])
def test_image_ids_that_leave_the_image_folder_are_rejected(tmp_path, image_id):
    from dataset_scripts.isic2019 import GROUND_TRUTH_FILE

    d = make_isic2019(tmp_path / "raw")
    (tmp_path / "raw" / "escape.jpg").write_bytes((d / IMAGE_DIR / "ISIC_0000001.jpg").read_bytes())
    for name in (GROUND_TRUTH_FILE, METADATA_FILE):
        path = d / name
        path.write_text(path.read_text().replace("ISIC_0000001", image_id))
    with pytest.raises(DataError, match="outside the image folder"):
        isic2019.load(d, skip_bad_images=True)


def test_prepare_unwritable_output_names_the_folder_given(tmp_path, capsys):
    from dataset_scripts import prepare

    target = "/proc/skinclip_reliability_out"
    with pytest.raises(SystemExit, match=r"/proc/skinclip_reliability_out"):
        prepare.main(["--dataset", "isic2019", "--data_dir", str(make_isic2019(tmp_path)), "--output_dir", target])


def test_prepare_warns_on_empty_splits_and_verifies_in_parallel(tmp_path, capsys):
    from dataset_scripts import prepare

    raw = make_isic2019(tmp_path / "raw")
    target = raw / IMAGE_DIR / "ISIC_0000004.jpg"
    _big_jpeg(target)
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(DataError, match=r"(?i)ISIC_0000004.*truncated"):
        prepare.main(["--dataset", "isic2019", "--data_dir", str(raw), "--output_dir", str(tmp_path / "a"),
                      "--num_proc", "2"])
    assert not (tmp_path / "a").exists()
    assert prepare.main(["--dataset", "isic2019", "--data_dir", str(raw), "--output_dir", str(tmp_path / "b"),
                         "--num_proc", "2", "--skip_bad_images", "--split_fractions", "1", "0", "0"]) == 0
    out = capsys.readouterr()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["rows"]["train"]["total"] == 5
    assert summary["skips"][0]["examples"] == ["ISIC_0000004"]
    assert "warning: the validation split is empty" in out.out + out.err
    assert "verifying images" in out.err  # the progress bar
