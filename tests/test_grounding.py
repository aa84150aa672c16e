"""Grounding (issue 12): the attribution methods, the weakly supervised grounding term, the deletion metric and the
ISIC 2018 Task 2 loader."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from processing_skinclip_vl import GROUNDING_METHODS, find_clinical_terms

TEXT = "Dermoscopic findings: asymmetry, irregular streaks and blue-whitish veil. Diagnosis: melanoma."


def _image(width=100, height=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------ attribution methods
@pytest.mark.parametrize("method", GROUNDING_METHODS)
def test_each_method_gives_normalised_patch_maps(tiny_model, tiny_processor, method):
    result = tiny_model.ground_text([_image(), _image(seed=1)], [TEXT, "Dermoscopic findings: red lagoons."],
                                    processor=tiny_processor, grounding=method)
    assert [t.term for t in result[0].grounded_terms] == ["asymmetry", "irregular streaks", "blue-whitish veil"]
    assert [t.term for t in result[1].grounded_terms] == ["red lagoons"]
    maps = []
    for diagnosis in result:
        for term in diagnosis.grounded_terms:
            assert term.method == method
            assert term.patch_map.shape == (8, 8)  # the tiny CLIP's 8 x 8 patch grid
            assert np.isfinite(term.patch_map).all() and term.patch_map.min() >= 0
            assert term.patch_map.sum() == pytest.approx(1.0, abs=1e-5)
            assert term.heatmap.shape == (80, 100) and term.heatmap.max() == pytest.approx(1.0)
            maps.append(term.patch_map)
        record = diagnosis.to_dict()
        for entry in record["grounded_terms"]:
            assert entry["method"] == method and np.asarray(entry["map"]).shape == (8, 8)
        json.dumps(record)
    # the maps depend on the term and the image (not one constant map)
    assert max(float(np.abs(m - maps[0]).max()) for m in maps[1:]) > 1e-6


@pytest.mark.parametrize("method", ["grad_attention", "text_query"])
def test_diagnose_records_the_method(tiny_model, tiny_processor, method, monkeypatch):
    # make the greedy rationale name clinical terms: the tiny random decoder is steered to the reference text
    ids = tiny_processor.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    step = {"k": 0}
    original = tiny_model.lm_head.forward

    def steered(hidden):
        logits = original(hidden)
        k = min(step["k"], len(ids) - 1)
        logits = logits.clone()
        logits[..., ids[k]] = 1e4
        step["k"] += 1
        return logits

    monkeypatch.setattr(tiny_model.lm_head, "forward", steered)
    diagnosis = tiny_model.diagnose([_image()], processor=tiny_processor, grounding=method, max_new_tokens=len(ids))[0]
    assert diagnosis.rationale.startswith("Dermoscopic findings: asymmetry")
    assert diagnosis.grounded_terms and {t.method for t in diagnosis.grounded_terms} == {method}
    for term in diagnosis.grounded_terms:
        assert term.patch_map.sum() == pytest.approx(1.0, abs=1e-5)


def test_unknown_grounding_method_is_an_error(tiny_model, tiny_processor):
    with pytest.raises(ValueError, match="grounding="):
        tiny_model.diagnose([_image()], processor=tiny_processor, grounding="saliency")


def test_grad_attention_equals_hand_computation_on_one_layer(tiny_components, tiny_processor, tmp_path):
    """One decoder layer: rollout `R = I + mean_h relu(dlogp/dA * A)`; the map of a term token is the row of the
    position before it, over the image positions, renormalised (the identity adds nothing there)."""
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    decoder = tmp_path / "decoder1"
    shutil.copytree(tiny_components["decoder"], decoder)
    config = json.loads((decoder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 1
    config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:1]
    (decoder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], str(decoder)).eval()
    assert model.config.text_config.num_hidden_layers == 1
    image, text = _image(seed=3), "Dermoscopic findings: irregular streaks."
    ids = tiny_processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    result = model.ground_token_ids([image], [ids], processor=tiny_processor, grounding="grad_attention")[0]
    (term,) = result.grounded_terms
    assert term.term == "irregular streaks"

    # by hand: one eager forward, gradient of each term token's log-probability w.r.t. the attention probabilities
    batch = tiny_processor(images=[image], metadata=[None], return_tensors="pt")
    prompt = batch["input_ids"][0].tolist()
    input_ids = torch.tensor([prompt + ids])
    features = model.get_image_features(batch["pixel_values"]).float().requires_grad_(True)
    model.set_attn_implementation("eager")
    outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), image_features=features,
                    use_cache=False, output_attentions=True, output_hidden_states=True)
    (attention,) = outputs.attentions  # (1, heads, L, L)
    image_cols = (input_ids[0] == model.config.image_token_id).nonzero()[:, 0]
    rows = []
    for k in range(*term.token_span):
        position = len(prompt) + k
        log_prob = outputs.logits[0, position - 1].float().log_softmax(-1)[ids[k]]
        (grad,) = torch.autograd.grad(log_prob, attention, retain_graph=True)
        weighted = torch.relu(grad * attention).mean(dim=1)[0]  # (L, L)
        row = weighted[position - 1, image_cols]
        rows.append((row / row.sum()).detach().numpy())
    expected = np.mean(rows, axis=0).reshape(8, 8)
    np.testing.assert_allclose(term.patch_map, expected / expected.sum(), rtol=1e-4, atol=1e-6)


def test_text_query_is_the_focal_pooling_attention_of_the_term_embedding(tiny_model, tiny_processor):
    image = _image(seed=4)
    (result,) = tiny_model.ground_text([image], ["Dermoscopic findings: red lagoons."], processor=tiny_processor,
                                       grounding="text_query")
    (term,) = result.grounded_terms
    batch = tiny_processor(images=[image], metadata=[None], return_tensors="pt")
    with torch.no_grad():
        patches = tiny_model.multi_modal_projector(tiny_model.get_image_features(batch["pixel_values"]))
        values = torch.nn.functional.normalize(tiny_model.focal_pooling.value_proj(patches), dim=-1)[0]
        tokens = tiny_processor.tokenize_align_texts(["red lagoons"])
        text = tiny_model.get_text_features(torch.tensor(tokens["align_input_ids"]),
                                            torch.tensor(tokens["align_attention_mask"]))
        text = torch.nn.functional.normalize(text, dim=-1)[0]
        expected = (tiny_model.logit_scale().exp() * (values @ text)).softmax(-1).reshape(8, 8).numpy()
    np.testing.assert_allclose(term.patch_map, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ deletion metric
def test_deletion_metric_finds_a_planted_patch():
    from bench.grounding import deletion_score, mask_patches

    rng = np.random.default_rng(0)
    n, d, planted = 64, 16, 37
    features = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
    direction = torch.zeros(d)
    direction[0] = 1.0
    features[planted, 0] = 25.0  # the only patch the "model" responds to

    def score_fn(patch_sets):  # a detector: the strongest response over the patches
        return (mask_patches(features, patch_sets) @ direction).max(dim=1).values.numpy()

    pointing = np.full(n, 0.1 / (n - 1))
    pointing[planted] = 0.9
    planted_scores = [deletion_score(score_fn, pointing, rng=np.random.default_rng(s)) for s in range(5)]
    random_scores = [deletion_score(score_fn, rng.random(n), rng=np.random.default_rng(s)) for s in range(5)]
    assert min(planted_scores) > 5.0  # masking the planted patch first removes the response at every fraction
    assert np.mean(planted_scores) > np.mean(random_scores) + 5.0
    assert abs(np.mean(random_scores)) < np.mean(planted_scores) / 2


def test_mask_patches_replaces_by_the_mean_patch():
    from bench.grounding import mask_patches

    features = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    out = mask_patches(features, [np.zeros(0, dtype=np.int64), np.array([1, 3])])
    assert torch.equal(out[0], features)
    assert torch.equal(out[1][[0, 2]], features[[0, 2]])
    assert torch.allclose(out[1][[1, 3]], features.mean(dim=0).expand(2, 3))


# ------------------------------------------------------------------ the grounding term
def test_grounding_loss_prefers_term_maps_on_the_named_images():
    from trainer.losses import grounding_loss

    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    good = torch.full((3, 2, 4), -0.5)
    good[:, :, 0] = torch.where(labels.bool(), 0.9, -0.5)  # one patch per named term responds
    bad = torch.full((3, 2, 4), -0.5)
    bad[:, :, 0] = torch.where(labels.bool(), -0.5, 0.9)
    assert grounding_loss(good, labels, 10.0) < grounding_loss(bad, labels, 10.0) - 1.0
    # a term every image names has no negative in the term -> images direction; gradients stay finite
    sims = torch.randn(3, 2, 4, requires_grad=True)
    loss = grounding_loss(sims, torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), 5.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sims.grad).all() and sims.grad.abs().sum() > 0


def test_cfa_loss_grounding_term_is_off_by_default():
    from trainer.losses import CFALoss

    logits, labels = torch.randn(3, 8), torch.tensor([0, 1, 2])
    sims, term_labels = torch.randn(3, 2, 4), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    default = CFALoss(lambda_align=0.0, lambda_calibration=0.0)
    off = default(logits, labels, term_similarity=sims, term_labels=term_labels, logit_scale=10.0)
    assert float(off["ground_loss"]) == 0.0 and default.lambda_ground == 0.0
    on = CFALoss(lambda_align=0.0, lambda_calibration=0.0, lambda_ground=0.5)(
        logits, labels, term_similarity=sims, term_labels=term_labels, logit_scale=10.0)
    assert float(on["ground_loss"]) > 0
    assert float(on["loss"]) == pytest.approx(float(off["loss"]) + 0.5 * float(on["ground_loss"]), rel=1e-6)
    with pytest.raises(ValueError, match="lambda_ground"):
        CFALoss(lambda_ground=-1.0)


def test_collator_term_labels_come_from_the_report(tiny_processor):
    from trainer.collator import SkinCLIPVLCollator, report_term_labels

    vocabulary = ["asymmetry", "irregular streaks", "red lagoons"]
    labels = report_term_labels([TEXT, "Dermoscopic findings: red lagoons. Diagnosis: vascular lesion.", ""], vocabulary)
    assert labels.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    row = {"image": _image(), "meta_text": None, "report": TEXT, "align_text": "a", "label": 0, "image_id": "x"}
    batch = SkinCLIPVLCollator(tiny_processor, term_vocabulary=vocabulary)([row])
    assert batch["term_labels"].tolist() == [[1, 1, 0]]
    assert "term_labels" not in SkinCLIPVLCollator(tiny_processor)([row])


def test_trainer_step_with_grounding_term(tiny_model, tiny_processor, tmp_path):
    """One CFATrainer loss computation with lambda_ground > 0: the term is logged, finite, and reaches the focal
    pooling's value projection through the patches."""
    from transformers import TrainingArguments

    from adapters_skinclip_vl import apply_lora
    from trainer.cfa_trainer import CFATrainer
    from trainer.collator import SkinCLIPVLCollator
    from trainer.losses import CFALoss

    terms = ["asymmetry", "irregular streaks", "red lagoons"]
    bank = (terms, tiny_model.term_embeddings(terms, tiny_processor))
    peft_model = apply_lora(tiny_model, r=2, lora_alpha=4, verbose=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = CFATrainer(model=peft_model, args=args, cfa_loss=CFALoss(lambda_ground=1.0), term_bank=bank,
                         data_collator=SkinCLIPVLCollator(tiny_processor, term_vocabulary=terms))
    rows = [{"image": _image(seed=s), "meta_text": None, "report": r, "align_text": r, "label": s, "image_id": str(s)}
            for s, r in enumerate([TEXT, "Dermoscopic findings: red lagoons. Diagnosis: vascular lesion."])]
    batch = trainer.data_collator(rows)
    peft_model.train()
    loss = trainer.compute_loss(peft_model, batch)
    loss.backward()
    logged = trainer.pop_loss_terms("train")
    assert logged["ground_loss"] > 0 and np.isfinite(logged["ground_loss"])
    grads = [p.grad for n, p in peft_model.named_parameters() if "focal_pooling" in n and "value_proj" in n
             and p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ ISIC 2018 Task 2
def _write_isic2018_fixture(root, size=(60, 40)):
    """Three images in the challenge layout, with attribute masks drawn where the structures are painted."""
    from dataset_scripts.isic2018_task2 import ATTRIBUTE_TERMS, IMAGE_DIR, MASK_DIR

    (root / IMAGE_DIR).mkdir(parents=True)
    (root / MASK_DIR).mkdir(parents=True)
    drawn = {
        "ISIC_0000001": {"pigment_network": (5, 5, 30, 30), "streaks": (35, 10, 55, 20)},
        "ISIC_0000002": {"negative_network": (10, 10, 40, 35), "milia_like_cyst": (45, 5, 52, 12)},
        "ISIC_0000003": {},
    }
    for image_id, boxes in drawn.items():
        image = Image.new("RGB", size, (200, 160, 140))
        paint = ImageDraw.Draw(image)
        for box in boxes.values():
            paint.rectangle(box, fill=(60, 40, 30))
        image.save(root / IMAGE_DIR / f"{image_id}.jpg")
        for attribute in ATTRIBUTE_TERMS:
            mask = Image.new("L", size, 0)
            if attribute in boxes:
                ImageDraw.Draw(mask).rectangle(boxes[attribute], fill=255)
            mask.save(root / MASK_DIR / f"{image_id}_attribute_{attribute}.png")
    return drawn


def test_isic2018_task2_loader_on_a_drawn_fixture(tmp_path):
    import dataset_scripts
    from dataset_scripts import isic2018_task2

    drawn = _write_isic2018_fixture(tmp_path)
    data, summary = dataset_scripts.load("isic2018_task2", tmp_path)
    assert list(data) == ["test"] and len(data["test"]) == 3
    rows = {row["image_id"]: row for row in data["test"]}
    assert rows["ISIC_0000001"]["criteria"] == ["pigment network", "streaks"]
    assert rows["ISIC_0000002"]["criteria"] == ["milia-like cysts", "negative network"]
    assert rows["ISIC_0000003"]["criteria"] == []
    for image_id, row in rows.items():
        assert row["label"] == -1 and row["dataset"] == "isic2018_task2"
        assert [t for t, _, _ in find_clinical_terms(row["report"])] == row["criteria"]  # the report names them
        assert isic2018_task2.image_path_of(row) == tmp_path / isic2018_task2.IMAGE_DIR / f"{image_id}.jpg"
        masks = isic2018_task2.row_masks(row)
        assert set(masks) == set(isic2018_task2.ATTRIBUTE_TERMS.values())
        for attribute, (x0, y0, x1, y1) in drawn[image_id].items():
            mask = masks[isic2018_task2.ATTRIBUTE_TERMS[attribute]]
            assert mask.shape == (40, 60) and mask[y0 : y1 + 1, x0 : x1 + 1].all() and mask.sum() == (x1 - x0 + 1) * (y1 - y0 + 1)
    assert summary.settings["attribute_images"]["pigment network"] == 1


def test_isic2018_task2_loader_bad_inputs(tmp_path):
    import dataset_scripts
    from dataset_scripts import DataError, isic2018_task2

    _write_isic2018_fixture(tmp_path)
    missing = tmp_path / isic2018_task2.MASK_DIR / "ISIC_0000002_attribute_streaks.png"
    missing.unlink()
    with pytest.raises(DataError, match="ISIC_0000002_attribute_streaks.png"):
        dataset_scripts.load("isic2018_task2", tmp_path)
    data, summary = dataset_scripts.load("isic2018_task2", tmp_path, skip_bad_images=True)
    assert [r["image_id"] for r in data["test"]] == ["ISIC_0000001", "ISIC_0000003"]
    assert "ISIC_0000002" in summary.format()
    Image.new("L", (10, 10), 0).save(missing)  # present again, but not the image's size
    with pytest.raises(DataError, match="size"):
        dataset_scripts.load("isic2018_task2", tmp_path)
    with pytest.raises(DataError, match="ISIC2018_Task2_Training_GroundTruth_v3"):
        dataset_scripts.load("isic2018_task2", tmp_path / "nowhere")
