"""The web demo (app.py): input checks, the JSON record equal to predict.py's, and the page in a real headless Chromium."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the web demo needs the `app` extra (pip install -e '.[app]')")

import app  # noqa: E402


def _image(width=100, height=80, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved_model(tiny_components, tmp_path_factory):
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from processing_skinclip_vl import SkinCLIPVLProcessor

    torch.manual_seed(0)
    model = SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    model.apply_lora(verbose=False)
    model.config.calibration_temperature = 1.5
    out = tmp_path_factory.mktemp("app_model") / "model"
    model.save_pretrained(out)
    SkinCLIPVLProcessor.from_components(tiny_components["vision"], tiny_components["decoder"]).save_pretrained(out)
    return out


def test_metadata_checks_and_the_predict_convention():
    assert app.build_metadata(None, "unknown", "unknown") == {}
    assert app.build_metadata(55, "female", "anterior torso") == {"age": 55.0, "sex": "female", "site": "anterior torso"}
    for bad in (-1, 121, float("nan"), "old"):
        with pytest.raises(app.InputError, match="Age must"):
            app.build_metadata(bad, None, None)
    assert "unknown" in app.site_choices() and "head/neck" in app.site_choices()


def test_unreadable_and_huge_uploads_get_a_message_naming_the_file(tmp_path, monkeypatch):
    text = tmp_path / "upload.bin"
    text.write_text("these are notes, not pixels")
    with pytest.raises(app.InputError, match="“notes.png” is not an image this demo can read"):
        app.read_upload(text, "notes.png")
    big = tmp_path / "big.png"
    _image(300, 200).save(big)
    monkeypatch.setattr(app, "MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(app.InputError, match=r"“big.png” is 300 x 200 pixels"):
        app.read_upload(big, "big.png")
    monkeypatch.setattr(app, "MAX_PIXELS", 300 * 200)
    assert app.read_upload(big, "big.png").size == (300, 200)


def test_examples_are_generated_synthetic_images_with_their_metadata(tmp_path):
    examples = app.write_examples(tmp_path / "examples")
    assert [row[4] for row in examples] == list(app.EXAMPLE_CLASSES)
    for path, age, sex, site, _ in examples:
        assert Image.open(path).size == (224, 224)
        assert sex in app.SEXES and site in app.site_choices() and (age is None or 0 <= age <= 120)
    assert app.write_examples(tmp_path / "examples") == examples  # generated once, then read back


def test_json_record_is_predicts_and_bad_input_is_refused(saved_model, tmp_path, monkeypatch):
    import predict

    model, processor = predict.load_model(str(saved_model))
    backend = app.DemoBackend(model, processor, str(saved_model), tmp_path / "work", max_new_tokens=8)
    folder = tmp_path / "in"
    folder.mkdir()
    _image(seed=3).save(folder / "lesion.png")
    payload = {"path": str(folder / "lesion.png"), "orig_name": "lesion.png"}
    result = backend.diagnose(payload, 55, "female", "anterior torso")
    status, probs, segments, term_maps, gallery, warnings, json_file, _ = backend.page_outputs(result)
    assert abs(sum(probs.values()) - 1) < 1e-5 and len(probs) == 8
    assert [caption for _, caption in gallery][:2] == ["focal-pooling map", f"Grad-CAM ({result['diagnosis'].prediction})"]
    assert "".join(text for text, _ in segments) == result["diagnosis"].rationale

    monkeypatch.chdir(folder)  # predict.py records the path it is given; the app records the uploaded name
    assert predict.main(["--model", str(saved_model), "--image", "lesion.png", "--age", "55", "--sex", "female",
                         "--site", "anterior torso", "--output_dir", str(tmp_path / "cli"), "--grad_cam",
                         "--max_new_tokens", "8"]) == 0
    assert json.loads(open(json_file).read()) == json.loads((tmp_path / "cli" / "lesion.json").read_text())

    with pytest.raises(app.InputError, match="No image"):
        backend.diagnose(None, None, None, None)
    with pytest.raises(app.InputError, match="Age must be between 0 and 120"):
        backend.diagnose(payload, 300, None, None)


def test_each_highlighted_term_is_linked_to_its_map(saved_model, tmp_path):
    import predict
    from processing_skinclip_vl import Diagnosis, GroundedTerm

    model, processor = predict.load_model(str(saved_model))
    backend = app.DemoBackend(model, processor, str(saved_model), tmp_path / "work")
    image = _image()
    text = "Dermoscopic findings: blue-whitish veil and irregular streaks. Diagnosis: melanoma."
    maps = [np.zeros((80, 100), dtype=np.float32) for _ in range(2)]
    maps[0][:10, :10], maps[1][70:, 90:] = 1.0, 1.0
    terms = []
    for heat, words in zip(maps, ("blue-whitish veil", "irregular streaks")):
        start = text.index(words)
        terms.append(GroundedTerm(term=words, text=words, token_span=(0, 1), char_span=(start, start + len(words)),
                                  heatmap=heat, peak=(0, 0)))
    probabilities = dict.fromkeys(backend.labels, 1 / 8)
    diagnosis = Diagnosis(probabilities=probabilities, prediction="MEL", confidence=1 / 8, malignancy_score=3 / 8,
                          rationale=text, stated_diagnosis="MEL", grounded_terms=terms, focal_map=maps[0],
                          image_size=image.size, warnings=["a warning with <angle brackets>"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    record = predict.write_outputs(diagnosis, image, "x.png", {}, out_dir, "x", "m")
    result = {"diagnosis": diagnosis, "record": record, "out_dir": out_dir, "json_file": out_dir / "x.json"}
    _, _, segments, term_maps, gallery, warnings, _, first_map = backend.page_outputs(result)
    assert "".join(t for t, _ in segments) == text
    assert [(t, c) for t, c in segments if c] == [("blue-whitish veil", "blue-whitish veil"),
                                                  ("irregular streaks", "irregular streaks")]
    for index, (path, term) in term_maps.items():
        assert segments[int(index)][1] == term
        heat = maps[[t.term for t in terms].index(term)]
        drawn = np.asarray(Image.open(path), dtype=np.float32)
        # the map drawn for this term is the overlay of its heatmap: it differs from the image where the heat is
        assert np.abs(drawn - np.asarray(image, dtype=np.float32)).sum(-1)[heat > 0].min() > 0
        assert np.array_equal(drawn[heat == 0], np.asarray(image)[heat == 0])
    assert first_map == term_maps["1"][0]
    assert [caption for _, caption in gallery] == ["focal-pooling map", "term: blue-whitish veil (blue-whitish veil)",
                                                   "term: irregular streaks (irregular streaks)"]
    assert "&lt;angle brackets&gt;" in warnings  # shown as text, not as HTML


def test_missing_default_model_says_run_make_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="run `make demo` first"):
        app.serve([], block=False)


def test_page_in_headless_chromium(saved_model, tmp_path):
    """Upload, fill the metadata, submit: probabilities, rationale, overlays and the JSON link render; then an empty
    submit, a text file and a file that only claims to be a PNG get readable messages and the app keeps serving."""
    from tools.app_browser import DemoPage, find_chromium, open_chromium, start_app

    executables = find_chromium()
    if executables is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium / chromedriver not found in CI: .ci/run installs them (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("no Chromium + chromedriver on this machine (apt-get install chromium chromium-driver)")
    _image(120, 90, seed=5).save(tmp_path / "lesion.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "notes.png").write_text("not an image either")

    demo, url = start_app(saved_model, tmp_path / "examples", extra_args=["--max_new_tokens", "12"])
    driver = open_chromium(executables)
    try:
        page = DemoPage(driver, url, timeout=90).load()
        assert "not a medical device" in page.find("#banner").text
        assert "temperature T = 1.500" in page.find("#probabilities").text

        page.submit()  # nothing uploaded
        assert "No image" in page.status()

        page.upload(tmp_path / "lesion.png")
        page.wait_for_preview()
        page.set_age(55)
        page.pick("#sex", "female")
        page.pick("#site", "anterior torso")
        page.submit()
        probs = page.probabilities()
        assert len(probs) == 8
        assert abs(sum(p for p, _ in probs.values()) - 1) < 1e-4
        assert abs(sum(shown for _, shown in probs.values()) - 100) <= 0.5 * len(probs)  # whole percentages
        assert page.rationale()
        assert page.wait_for_overlays()
        record = page.json_record()
        assert record["metadata"] == {"age": 55.0, "sex": "female", "site": "anterior torso"}
        assert record["image"] == "lesion.png" and set(record["probabilities"]) == set(app.EXAMPLE_CLASSES) | {
            "AK", "DF", "VASC", "SCC"}
        assert {name.split(" ")[0]: p for name, (p, _) in probs.items()} == pytest.approx(record["probabilities"])
        assert "Warnings" in page.find("#warnings").text

        page.upload(tmp_path / "notes.txt")  # the browser refuses it by type
        assert "Invalid file type" in page.wait_for_toast("notes.txt")
        page.upload(tmp_path / "notes.png")  # passes the browser's check: the app opens it and says what is wrong
        page.submit()
        assert "“notes.png” is not an image this demo can read" in page.status()
        assert "Traceback" not in driver.page_source
        assert not page.find_all("#probabilities meter")  # the previous result is cleared

        page.upload(tmp_path / "lesion.png")  # still serving
        page.wait_for_preview()
        page.submit()
        assert len(page.probabilities()) == 8
        shot = page.screenshot(tmp_path / "app.png")
        assert Image.open(shot).size[0] > 800
    finally:
        driver.quit()
        demo.close()
