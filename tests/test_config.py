"""SkinCLIPVLConfig: the paper's defaults written out, exact JSON round trip, validation errors."""

import json
import re

import pytest

from configuration_skinclip_vl import ISIC2019_CLASSES, SkinCLIPVLConfig


@pytest.fixture(scope="module")
def default_config():
    return SkinCLIPVLConfig()


def test_vision_defaults_are_clip_vit_l14(default_config):
    vision = default_config.vision_config
    assert vision.model_type == "clip_vision_model"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4096, 14, 224)
    assert vision.projection_dim == 768
    assert default_config.image_seq_length == 256
    assert default_config.vision_feature_layer == -2


def test_align_defaults_are_clip_vit_l14_text(default_config):
    text = default_config.align_config
    assert text.model_type == "clip_text_model"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (768, 12, 12)
    assert (text.intermediate_size, text.max_position_embeddings, text.vocab_size) == (3072, 77, 49408)
    assert text.projection_dim == 768


def test_decoder_defaults_are_qwen2_5_vl_7b(default_config):
    lm = default_config.text_config
    assert lm.model_type == "qwen2_5_vl_text"
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (3584, 28, 28, 4)
    assert (lm.intermediate_size, lm.vocab_size) == (18944, 152064)
    assert lm.rope_parameters["rope_theta"] == 1e6
    assert list(lm.rope_parameters["mrope_section"]) == [16, 24, 24]
    assert lm.rms_norm_eps == 1e-6
    assert lm.tie_word_embeddings is False
    assert default_config.tie_word_embeddings is False
    assert default_config.pooling_dim == 3584


def test_labels_lora_and_loss_defaults(default_config):
    assert default_config.num_labels == 8
    assert [default_config.id2label[i] for i in range(8)] == ISIC2019_CLASSES
    assert ISIC2019_CLASSES == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert default_config.label2id == {name: i for i, name in enumerate(ISIC2019_CLASSES)}
    assert default_config.lora_r == 64
    assert default_config.lora_alpha == 16
    assert list(default_config.lora_target_modules) == ["q_proj", "v_proj"]
    # training hyper-parameters live in CFATrainingArguments / CFALoss: nothing reads them from the model config
    for name in ("focal_loss_alpha", "focal_loss_gamma", "lambda_align", "lambda_calibration", "lambda_cal", "lambda_gen"):
        assert name not in default_config.to_dict(), name
    assert default_config.calibration_temperature == 1.0
    assert default_config.projector_type == "linear"
    assert default_config.vision_model_name_or_path == "openai/clip-vit-large-patch14"
    assert default_config.decoder_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"


def _round_trip(config, tmp_path):
    config.save_pretrained(tmp_path)
    reloaded = SkinCLIPVLConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.to_json_string() == config.to_json_string()
    return reloaded


def test_json_round_trip_defaults(default_config, tmp_path):
    reloaded = _round_trip(default_config, tmp_path)
    assert reloaded.id2label == default_config.id2label  # int keys again after JSON's string keys
    assert type(reloaded.text_config) is type(default_config.text_config)


def test_json_round_trip_non_defaults(tmp_path):
    config = SkinCLIPVLConfig(
        text_config={
            "model_type": "qwen2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        image_token_id=10,
        cls_token_id=11,
        vision_start_token_id=12,
        vision_end_token_id=13,
        projector_type="mlp",
        pooling_dim=16,
        vision_feature_layer=-1,
        calibration_temperature=1.37,
        grounding_layers=[0, -1],
        lora_r=8,
        lora_alpha=32,
        lora_target_modules=["q_proj", "k_proj", "v_proj"],
        vision_model_name_or_path="/some/clip",
        decoder_name_or_path="/some/qwen",
    )
    reloaded = _round_trip(config, tmp_path)
    assert reloaded.text_config.model_type == "qwen2"
    assert reloaded.vision_config.num_hidden_layers == 3
    assert reloaded.calibration_temperature == 1.37
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "skinclip_vl"
    assert saved["pooling_dim"] == 16 and saved["lora_r"] == 8


def test_json_round_trip_tiny_components_config(tiny_components, tmp_path):
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    config = SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"]).config
    _round_trip(config, tmp_path)
    assert config.vision_model_name_or_path == tiny_components["vision"]
    assert config.decoder_name_or_path == tiny_components["decoder"]


@pytest.mark.parametrize(
    "kwargs, value_in_message",
    [
        ({"projector_type": "conv"}, "'conv'"),
        ({"calibration_temperature": 0.0}, "0.0"),
        ({"calibration_temperature": -2.0}, "-2.0"),
        ({"vision_feature_layer": 25}, "25"),
        ({"vision_feature_layer": -26}, "-26"),
        ({"cls_token_id": 151655}, "151655"),
        ({"vision_start_token_id": 151653}, "151653"),
        ({"text_config": {"model_type": "llama"}}, "'llama'"),
        ({"lora_r": 0}, "0"),
        ({"image_token_id": 152064}, "152064"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_validation_errors(kwargs, value_in_message):
    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=re.escape(value_in_message)) as error:
        SkinCLIPVLConfig(**kwargs)
    message = str(error.value)
    if field != "text_config":
        assert field in message or "placeholder" in message, message


def test_vision_feature_layer_bounds_are_the_hidden_state_indices():
    # a 24-layer tower has 25 hidden states: -25..24 are valid
    assert SkinCLIPVLConfig(vision_feature_layer=24).vision_feature_layer == 24
    assert SkinCLIPVLConfig(vision_feature_layer=-25).vision_feature_layer == -25
