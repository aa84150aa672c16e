"""SkinCLIPVLProcessor: prompt layout, labels, padding, metadata serializer, image modes, alignment text, save/load."""

import io
import logging
import math

import numpy as np
import pytest
import torch
from conftest import real_fixture
from PIL import Image

from processing_skinclip_vl import load_image, serialize_metadata, unknown_metadata_keys

METAS = [
    {"age_approx": 55, "sex": "male", "anatom_site_general": "posterior torso"},
    None,
    {"sex": "female"},
]


def _images(n, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- prompt and labels
def test_prompt_has_n_image_tokens_and_one_cls_last(tiny_processor):
    batch = tiny_processor(images=_images(3), metadata=METAS)
    n = tiny_processor.num_image_tokens
    assert n == 64  # 64 px / patch 8 -> 8 x 8 patches
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for row, row_mask in zip(ids, mask):
        real = row[row_mask.bool()]
        assert int((real == tiny_processor.image_token_id).sum()) == n
        assert int((row == tiny_processor.cls_token_id).sum()) == 1
        assert int(real[-1]) == tiny_processor.cls_token_id  # CLS is the last non-pad token of a prompt
        start = tiny_processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        end = tiny_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>")
        positions = (real == tiny_processor.image_token_id).nonzero().flatten()
        assert int(real[positions[0] - 1]) == start and int(real[positions[-1] + 1]) == end
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + n))  # contiguous block


def test_left_padding(tiny_processor):
    batch = tiny_processor(metadata=METAS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "metadata of different lengths should give different prompt lengths"
    pad = tiny_processor.tokenizer.pad_token_id
    for row, row_mask, length in zip(ids, mask, lengths):
        n_pad = ids.shape[1] - int(length)
        assert row_mask[:n_pad].sum() == 0 and row_mask[n_pad:].all()
        assert (row[:n_pad] == pad).all()
    # each row equals the sample tokenised alone
    for i, meta in enumerate(METAS):
        alone = tiny_processor(metadata=meta)["input_ids"][0]
        assert torch.equal(ids[i, ids.shape[1] - len(alone) :], alone)


def test_labels_mask_prompt_and_padding(tiny_processor):
    reports = ["Pigment network: atypical. Diagnosis: melanoma.", "benign keratosis", "Streaks: irregular."]
    prompts = tiny_processor(metadata=METAS)
    batch = tiny_processor(metadata=METAS, reports=reports)
    tok = tiny_processor.tokenizer
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    for i, report in enumerate(reports):
        target = tok(report, add_special_tokens=False)["input_ids"] + [end_id]
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        supervised = labels != -100
        assert labels[supervised].tolist() == target
        assert ids[supervised].tolist() == target  # labels equal the tokens they sit on (shifted in the loss)
        assert supervised[-len(target) :].all() and not supervised[: -len(target)].any()
        assert (labels[~mask.bool()] == -100).all()
        prompt_len = int(prompts["attention_mask"][i].sum())
        assert int(mask.sum()) == prompt_len + len(target)
        assert int(ids[-len(target) - 1]) == tiny_processor.cls_token_id  # the rationale follows CLS


# ---------------------------------------------------------------------------------------------- metadata serializer
@pytest.mark.parametrize(
    "metadata, expected",
    [
        (  # ISIC 2019 column names
            {
                "image": "ISIC_0000000",
                "age_approx": 55.0,
                "anatom_site_general": "anterior torso",
                "lesion_id": "x",
                "sex": "female",
            },
            "A lesion on the anterior torso of a 55-year-old female patient.",
        ),
        (  # ISIC 2024 column names (more columns, tbp_* extras silent)
            {
                "isic_id": "ISIC_0015670",
                "patient_id": "IP_1",
                "age_approx": 60,
                "sex": "male",
                "anatom_site_general": "lower extremity",
                "tbp_lv_location": "Left Leg - Lower",
            },
            "A lesion on a lower extremity of a 60-year-old male patient.",
        ),
        (  # Derm7pt: no age column, `location`
            {"case_num": 1, "sex": "female", "location": "lower limbs", "diagnosis": "basal cell carcinoma"},
            "A lesion on a lower limb of a female patient of unknown age.",
        ),
        ({}, "A lesion at an unknown anatomical site of a patient of unknown age and sex."),
        (None, "A lesion at an unknown anatomical site of a patient of unknown age and sex."),
        (
            {"age_approx": float("nan"), "sex": "", "anatom_site_general": np.nan},
            "A lesion at an unknown anatomical site of a patient of unknown age and sex.",
        ),
        (
            {"age_approx": 40, "sex": "unknown"},
            "A lesion at an unknown anatomical site of a 40-year-old patient of unknown sex.",
        ),
        (
            {"age_approx": np.float32("nan"), "sex": np.float64("nan"), "anatom_site_general": np.float32("nan")},
            "A lesion at an unknown anatomical site of a patient of unknown age and sex.",
        ),
        (
            {"age_approx": "not a number", "sex": 3, "anatom_site_general": {"a": 1}, "foo": [1, 2]},
            "A lesion at an unknown anatomical site of a patient of unknown age and sex.",
        ),
        ({"age": True, "sex": "F"}, "A lesion at an unknown anatomical site of a female patient of unknown age."),
    ],
    ids=["isic2019", "isic2024", "derm7pt", "empty", "none", "nan", "sex-unknown", "numpy-nan", "garbage", "bool-age"],
)
def test_serialize_metadata(metadata, expected):
    assert serialize_metadata(metadata) == expected
    assert serialize_metadata(metadata) == expected  # deterministic


def test_serialize_metadata_pandas_missing_values():
    pd = pytest.importorskip("pandas", reason="pandas is not installed")
    text = serialize_metadata({"age_approx": pd.NA, "sex": pd.NA, "anatom_site_general": pd.NA})
    assert text == "A lesion at an unknown anatomical site of a patient of unknown age and sex."
    row = pd.read_csv(io.StringIO("image,age_approx,anatom_site_general,lesion_id,sex\nISIC_1,,,,\n")).iloc[0]
    assert serialize_metadata(row.to_dict()) == text


def test_unknown_metadata_keys_are_reported_and_ignored():
    meta = {"age_approx": 30, "sex": "male", "lesion_id": "L1", "favourite_colour": "blue", 7: "x"}
    assert unknown_metadata_keys(meta) == ["7", "favourite_colour"]
    assert serialize_metadata(meta) == serialize_metadata({"age_approx": 30, "sex": "male"})
    assert unknown_metadata_keys(None) == []


def test_processor_accepts_serialized_metadata_string(tiny_processor):
    text = serialize_metadata(METAS[0])
    assert torch.equal(tiny_processor(metadata=text)["input_ids"], tiny_processor(metadata=METAS[0])["input_ids"])


# ---------------------------------------------------------------------------------------------- images
def _base_image():
    array = np.zeros((40, 60, 3), np.uint8)  # H 40, W 60: left half red, right half blue
    array[:, :30] = (255, 0, 0)
    array[:, 30:] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I", "F", "YCbCr", "PA", "RGBa", "La"])
def test_image_modes_give_three_channels(tiny_processor, mode):
    image = _base_image()
    image = image.convert(mode) if mode not in ("PA", "RGBa", "La") else image.convert("RGBA").convert(mode)
    assert image.mode == mode
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (60, 40)
    pixel_values = tiny_processor(images=image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    assert torch.isfinite(pixel_values).all()


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(load_image(image))[0, 0].tolist() == [255, 255, 255]


def test_16_bit_image_file(tiny_processor, tmp_path):
    array = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)  # values up to ~64k
    Image.fromarray(array).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "sixteen.png"))
    assert rgb.shape == (40, 60, 3)
    # fixed 16 -> 8 bit scaling (value / 257), not clipped to 255 and not stretched per image
    np.testing.assert_allclose(rgb[:, :, 0].astype(int), np.round(array / 257.0).astype(int), atol=1)
    assert (np.diff(rgb[:, :, 0].astype(int).flatten()) >= 0).all()  # monotone ramp kept
    assert tiny_processor(images=str(tmp_path / "sixteen.png"))["pixel_values"].shape == (1, 3, 64, 64)


def test_exif_orientation_is_applied(tiny_processor, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _base_image().save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    raw = Image.open(tmp_path / "rotated.jpg")
    assert raw.size == (60, 40)
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.size == (40, 60)  # transposed
    array = np.asarray(shown).astype(int)
    assert array[5, 20, 0] > 200 and array[5, 20, 2] < 50  # the left (red) half is now on top
    assert array[-5, 20, 2] > 200 and array[-5, 20, 0] < 50
    # same through an already opened PIL image and through the processor
    assert load_image(raw).size == (40, 60)
    assert tiny_processor(images=str(tmp_path / "rotated.jpg"))["pixel_values"].shape == (1, 3, 64, 64)


def test_unreadable_image_names_the_file(tiny_processor, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\x00\x01 definitely not a jpeg " * 10)
    with pytest.raises(ValueError, match="x.jpg"):
        tiny_processor(images=[str(bad)], metadata=[None])
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_batch_size_mismatch_raises(tiny_processor):
    with pytest.raises(ValueError, match="`metadata` has 3 entries but the batch has 2"):
        tiny_processor(images=_images(2), metadata=METAS)


# ---------------------------------------------------------------------------------------------- alignment text
def test_long_alignment_text_is_truncated_with_counted_warning(tiny_processor, caplog):
    long_text = " ".join(["irregular streaks at the periphery and a blue-whitish veil"] * 30)
    assert len(tiny_processor.align_tokenizer(long_text)["input_ids"]) > 77
    before = tiny_processor.truncation_count
    logger = logging.getLogger("transformers")
    propagate, logger.propagate = logger.propagate, True
    try:
        with caplog.at_level(logging.WARNING):
            batch = tiny_processor(metadata=[None, None], align_texts=[long_text, "melanoma"])
    finally:
        logger.propagate = propagate
    assert tiny_processor.truncation_count == before + 1
    assert any("truncated" in r.getMessage() and "1 alignment text" in r.getMessage() for r in caplog.records)
    ids, mask = batch["align_input_ids"], batch["align_attention_mask"]
    assert ids.shape == (2, 77)
    eos = tiny_processor.align_tokenizer.eos_token_id
    assert int(ids[0, -1]) == eos  # truncation keeps the end-of-text token CLIP pools at
    assert int(mask[1].sum()) < 77 and int(mask[0].sum()) == 77


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tiny_processor, tmp_path):
    from transformers import AutoProcessor

    tiny_processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_skinclip_vl.py").is_file()
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "SkinCLIPVLProcessor"
    assert reloaded.num_image_tokens == tiny_processor.num_image_tokens
    assert reloaded.prompt_template == tiny_processor.prompt_template
    kwargs = dict(
        images=_images(3), metadata=METAS, reports=["melanoma", "nevus", "dermatofibroma"], align_texts=["a", "b", "c"]
    )
    first, second = tiny_processor(**kwargs), reloaded(**kwargs)
    assert (
        set(first)
        == set(second)
        == {"pixel_values", "input_ids", "attention_mask", "labels", "align_input_ids", "align_attention_mask"}
    )
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_real_isic_images(tiny_processor):
    folder = "ISIC_2019_Training_Input"
    paths = [real_fixture("isic2019", folder, name) for name in ("ISIC_0000000.jpg", "ISIC_0000001.jpg")]
    batch = tiny_processor(images=[str(p) for p in paths], metadata=[{"age_approx": 55, "sex": "female"}, None])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert not math.isclose(float(batch["pixel_values"][0].std()), 0.0)
