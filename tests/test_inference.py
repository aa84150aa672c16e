"""diagnose(): one prefill + KV-cache rationale, calibrated probabilities, grounding, Grad-CAM; the processor's
post-processing; drawing (overlays, panel); predict.py."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_skinclip_vl as msv
from configuration_skinclip_vl import CLASS_FULL_NAMES
from drawing import overlay_heatmap, render_diagnosis_panel
from processing_skinclip_vl import find_clinical_terms, patch_grid_box, stated_diagnosis


def _image(width=100, height=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture()
def model(tiny_model):
    return tiny_model


def _reference_greedy(model, processor, image, metadata, steps):
    """Greedy decoding without any cache: a full forward over prompt + tokens so far at every step."""
    batch = processor(images=[image], metadata=[metadata])
    ids = batch["input_ids"]
    suppress = model.placeholder_token_ids()
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
                           use_cache=False).logits[0, -1]
        logits[suppress] = float("-inf")
        token = int(logits.argmax())
        if token in model.generation_config.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_probabilities_temperature_and_malignancy(model, tiny_processor):
    model.config.calibration_temperature = 2.0
    images = [_image(seed=1), _image(64, 64, seed=2)]
    result = model.diagnose(images, metadata={"age": 55, "sex": "female"}, processor=tiny_processor, rationale=False)
    batch = tiny_processor(images=images, metadata=[{"age": 55, "sex": "female"}] * 2)
    with torch.no_grad():
        expected = (model(**batch).class_logits / 2.0).softmax(-1)
    for b, diagnosis in enumerate(result):
        probs = torch.tensor([diagnosis.probabilities[model.config.id2label[i]] for i in range(8)])
        torch.testing.assert_close(probs, expected[b], atol=1e-5, rtol=1e-5)
        assert abs(sum(diagnosis.probabilities.values()) - 1) < 1e-5
        p = diagnosis.probabilities
        assert diagnosis.malignancy_score == pytest.approx(p["MEL"] + p["BCC"] + p["SCC"])
        assert diagnosis.prediction == max(p, key=p.get) and diagnosis.confidence == p[diagnosis.prediction]
        assert diagnosis.rationale is None and diagnosis.focal_map.shape == images[b].size[::-1]


def test_one_prefill_then_cached_decoding(model, tiny_processor):
    lengths, vision_calls = [], []
    lm_forward, vision_forward = model.language_model.forward, model.vision_tower.forward

    def count_lm(*args, **kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])
        return lm_forward(*args, **kwargs)

    def count_vision(*args, **kwargs):
        vision_calls.append(1)
        return vision_forward(*args, **kwargs)

    model.language_model.forward, model.vision_tower.forward = count_lm, count_vision
    model.generation_config.eos_token_id = [-1]  # never stop early: exactly max_new_tokens tokens
    result = model.diagnose([_image()], processor=tiny_processor, max_new_tokens=6)
    prompt_length = tiny_processor(images=[_image()])["input_ids"].shape[1]
    # one prefill over the prompt; the first token comes from its logits; generate() then feeds one token per step
    assert lengths == [prompt_length, 1, 1, 1, 1, 1]
    assert len(vision_calls) == 1
    assert len(result[0].token_ids) == 6


def test_rationale_equals_uncached_greedy_with_left_padding(model, tiny_processor):
    images, metadata = [_image(seed=3), _image(seed=4)], [{"age": 55, "sex": "male", "site": "back"}, None]
    result = model.diagnose(images, metadata=metadata, processor=tiny_processor, max_new_tokens=8, grounding=False)
    for image, meta, diagnosis in zip(images, metadata, result):
        assert diagnosis.token_ids == _reference_greedy(model, tiny_processor, image, meta, 8)


def test_placeholder_tokens_are_never_generated(model, tiny_processor):
    suppress = model.placeholder_token_ids()

    def push_placeholders(module, args, output):
        output = output.clone()
        output[..., suppress] += 1e4
        return output

    model.lm_head.register_forward_hook(push_placeholders)
    result = model.diagnose([_image()], processor=tiny_processor, max_new_tokens=8)
    assert result[0].token_ids and not set(result[0].token_ids) & set(suppress)


def test_generation_grounding_equals_teacher_forced_attention(model, tiny_processor):
    previous = model.config._attn_implementation
    image = _image(seed=5)
    model.generation_config.eos_token_id = [-1]
    diagnosis = model.diagnose([image], processor=tiny_processor, max_new_tokens=7)[0]
    assert model.config._attn_implementation == previous == model.config.text_config._attn_implementation
    maps = diagnosis.token_maps
    assert maps.shape == (7, 8, 8)
    assert np.isnan(maps[-1]).all()  # the last token of a cut rationale is never fed back
    np.testing.assert_allclose(maps[:-1].sum(axis=(1, 2)), 1.0, atol=1e-5)
    forced = model.ground_token_ids([image], [diagnosis.token_ids], processor=tiny_processor)[0]
    np.testing.assert_allclose(maps[:-1], forced.token_maps[:-1], atol=1e-4)


def test_ground_text_terms_and_heatmaps(model, tiny_processor):
    image = _image(100, 80)
    text = "Dermoscopic findings: asymmetry, irregular streaks and blue-whitish veil. Diagnosis: melanoma."
    result = model.ground_text([image], [text], processor=tiny_processor)[0]
    assert [t.term for t in result.grounded_terms] == ["asymmetry", "irregular streaks", "blue-whitish veil"]
    assert result.stated_diagnosis == "MEL"
    ids = tiny_processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    # the vision tower sees the centre 80 x 80 crop of the 100 x 80 image: columns 10..89
    left, top, width, height = patch_grid_box(tiny_processor.image_processor, 100, 80)
    assert (left, top, width, height) == (10.0, 0.0, 80.0, 80.0)
    for term in result.grounded_terms:
        start, end = term.token_span
        assert term.text.lower() in tiny_processor.tokenizer.decode(ids[start:end]).lower()
        assert term.heatmap.shape == (80, 100) and term.heatmap.max() == pytest.approx(1.0)
        assert term.heatmap.min() >= 0 and not term.heatmap[:, :10].any() and not term.heatmap[:, 90:].any()
        assert 10 <= term.peak[0] < 90 and 0 <= term.peak[1] < 80


def test_clinical_vocabulary_and_class_names():
    from dataset_scripts import synthetic
    from dataset_scripts.schema import CLASS_DESCRIPTIONS

    assert CLASS_FULL_NAMES == CLASS_DESCRIPTIONS
    for criterion in synthetic.CRITERIA:
        assert [m[0] for m in find_clinical_terms(f"Findings: {criterion}.")] == [criterion]
    found = find_clinical_terms("Irregular dots and globules, a blue whitish veil and brown dots.")
    assert [m[0] for m in found] == ["irregular dots and globules", "blue-whitish veil", "brown", "dots"]
    assert stated_diagnosis("Findings: x. Diagnosis: Basal cell carcinoma.") == "BCC"
    assert stated_diagnosis("no closing sentence") is None


def test_disagreement_between_rationale_and_head_is_warned(model, tiny_processor):
    with torch.no_grad():
        model.classifier.bias[:] = 0
        model.classifier.bias[1] = 50.0  # the head says NV
    text = "Dermoscopic findings: irregular streaks. Diagnosis: melanoma."
    ids = tiny_processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id[0]
    image = _image()
    with torch.no_grad():
        outputs = model(**tiny_processor(images=[image]), logits_to_keep=1)
    # a generated rationale (then the end token) whose tokens attend uniformly to the 64 patches
    maps = np.full((1, len(ids) + 1, 64), 1 / 64, dtype=np.float32)
    diagnosis = tiny_processor.post_process_diagnosis(
        outputs.class_logits, [image.size], model.config.id2label, temperature=model.config.calibration_temperature,
        pooling_attention=outputs.pooling_attention, token_ids=torch.tensor([ids + [eos]]), token_maps=maps,
        eos_token_id=model.generation_config.eos_token_id,
    )[0]
    assert diagnosis.prediction == "NV" and diagnosis.stated_diagnosis == "MEL"
    assert any("MEL" in w and "NV" in w for w in diagnosis.warnings)
    assert [t.term for t in diagnosis.grounded_terms] == ["irregular streaks"]
    assert diagnosis.to_dict()["grounded_terms"][0]["peak"].keys() == {"x", "y"}


def test_grad_cam(model, tiny_processor):
    images = [_image(seed=6), _image(seed=7)]
    cams = model.grad_cam(images, processor=tiny_processor)
    other = model.grad_cam(images, processor=tiny_processor, targets=["VASC", "VASC"])
    assert all(c.shape == (80, 100) and c.min() >= 0 and c.max() <= 1 for c in cams)
    assert not np.allclose(cams[0], other[0]) or not np.allclose(cams[1], other[1])
    assert all(p.grad is None for p in model.parameters())
    # by hand for sample 0: relu(sum_c mean_n(dlogit/dV) V)
    batch = tiny_processor(images=images[:1])
    features = model.get_image_features(batch["pixel_values"]).requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=features)
    target = int(logits.class_logits.argmax())
    (grad,) = torch.autograd.grad(logits.class_logits[0, target], features)
    expected = torch.relu((features * grad.mean(1, keepdim=True)).sum(-1))[0].detach().numpy()
    np.testing.assert_allclose(model.grad_cam_patches(batch)[0], expected, rtol=1e-4, atol=1e-7)


def test_overlay_and_panel(model, tiny_processor, tmp_path):
    image = _image()
    heat = np.zeros((80, 100), dtype=np.float32)
    heat[10:20, 30:40] = 1.0
    overlay = overlay_heatmap(image, heat)
    assert overlay.size == image.size and np.asarray(overlay)[0, 0].tolist() == np.asarray(image)[0, 0].tolist()
    diagnosis = model.diagnose([image], processor=tiny_processor, max_new_tokens=4, grad_cam=True)[0]
    render_diagnosis_panel(image, diagnosis).save(tmp_path / "panel.png")
    assert Image.open(tmp_path / "panel.png").size[1] > 224


@pytest.fixture(scope="module")
def saved_model(tiny_components, tmp_path_factory):
    from processing_skinclip_vl import SkinCLIPVLProcessor

    torch.manual_seed(0)
    model = msv.SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    model.apply_lora(verbose=False)
    out = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(out)
    SkinCLIPVLProcessor.from_components(tiny_components["vision"], tiny_components["decoder"]).save_pretrained(out)
    return out


def test_processor_is_found_without_passing_it(saved_model, tiny_components):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(saved_model, trust_remote_code=True)
    diagnosis = model.diagnose(_image(), rationale=False)[0]
    assert abs(sum(diagnosis.probabilities.values()) - 1) < 1e-5
    assert model.resolve_processor().num_image_tokens == 64  # the saved one, found and kept
    built = msv.SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    assert built.diagnose(_image(), rationale=False)[0].prediction in built.config.label2id  # from the components


def test_predict_cli(saved_model, tmp_path):
    import predict

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i in range(3):
        _image(seed=i).save(image_dir / f"lesion_{i}.png")
    (image_dir / "broken.jpg").write_bytes(b"not an image")
    single = tmp_path / "single"
    rc = predict.main(["--model", str(saved_model), "--image", str(image_dir / "lesion_0.png"), "--age", "55",
                       "--sex", "female", "--site", "anterior torso", "--output_dir", str(single),
                       "--max_new_tokens", "6"])
    assert rc == 0
    record = json.loads((single / "lesion_0.json").read_text())
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-5 and len(record["probabilities"]) == 8
    assert record["metadata"] == {"age": 55.0, "sex": "female", "site": "anterior torso"}
    assert {"prediction", "confidence", "malignancy_score", "rationale", "grounded_terms", "warnings"} <= set(record)
    assert (single / record["overlay_file"]).is_file()

    batch = tmp_path / "batch"
    assert predict.main(["--model", str(saved_model), "--images_dir", str(image_dir), "--output_dir", str(batch),
                         "--no_rationale", "--batch_size", "2"]) == 0
    with open(batch / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows].count("ok") == 3
    (failed,) = [r for r in rows if r["status"] == "error"]
    assert failed["image"].endswith("broken.jpg") and "Cannot read image" in failed["error"]
    assert len(list(batch.glob("lesion_*_overlay.png"))) == 3
