"""Adapters on the Hub: push (mocked up to the upload call), offline load by repo id from a hand-made cache, PEFT load
onto a user-built model, mismatched components, adapter size."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import modeling_skinclip_vl as msv
from trainer.hub import adapter_size_on_disk, estimate_adapter_size, push_adapter_to_hub

VISION_ID, DECODER_ID, ADAPTER_ID = "skinclip-test/tiny-clip", "skinclip-test/tiny-decoder", "skinclip-test/tiny-adapter"


def _image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (72, 64, 3), dtype=np.uint8))


def _trained_adapter_model(components, vision_name=None, decoder_name=None):
    """A tiny model with LoRA whose adapter weights are random (not the identity init), component names as given."""
    torch.manual_seed(0)
    model = msv.SkinCLIPVLForDiagnosis.from_components(components["vision"], components["decoder"])
    if vision_name:
        model.config.vision_model_name_or_path = vision_name
    if decoder_name:
        model.config.decoder_name_or_path = decoder_name
    model.apply_lora(verbose=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def hub_model(tiny_components, tmp_path_factory):
    from processing_skinclip_vl import SkinCLIPVLProcessor

    model = _trained_adapter_model(tiny_components, VISION_ID, DECODER_ID)
    processor = SkinCLIPVLProcessor.from_components(tiny_components["vision"], tiny_components["decoder"])
    out = tmp_path_factory.mktemp("adapter") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, processor, out


def _put_in_cache(cache: Path, repo_id: str, folder) -> None:
    """Lay out `folder` as the `main` snapshot of `repo_id` in a Hub cache (models--org--name/snapshots/<sha>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)


OFFLINE_SCRIPT = r"""
import json, sys, torch
from PIL import Image
from peft import PeftModel
from transformers import AutoModel, AutoProcessor

repo, local, inputs = sys.argv[1:4]
batch = torch.load(inputs)
by_id = AutoModel.from_pretrained(repo, trust_remote_code=True)
by_dir = AutoModel.from_pretrained(local, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
models = [("id", by_id), ("dir", by_dir)]
with torch.no_grad():
    out = {name: m(**batch).class_logits.tolist() for name, m in models}
out["module"] = type(by_id).__module__
out["processor_tokens"] = processor.num_image_tokens
image = Image.new("RGB", (64, 72), (120, 80, 60))
out["diagnose_sum"] = sum(by_id.diagnose(image, rationale=False)[0].probabilities.values())  # processor found by id
print("RESULT" + json.dumps(out))
"""


def test_offline_hub_load_by_repo_id(hub_model, tiny_components, tmp_path):
    model, processor, saved = hub_model
    cache = tmp_path / "hub"
    _put_in_cache(cache, VISION_ID, tiny_components["vision"])
    _put_in_cache(cache, DECODER_ID, tiny_components["decoder"])
    _put_in_cache(cache, ADAPTER_ID, saved)
    batch = dict(processor(images=[_image(1), _image(2)], metadata=[{"age": 40}, None]))
    torch.save(batch, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(**batch).class_logits
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"),
               TOKENIZERS_PARALLELISM="false")
    # the local directory names the components by repo id too, so it also resolves them from the cache
    argv = [ADAPTER_ID, str(saved), str(tmp_path / "inputs.pt")]
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["module"].startswith("transformers_modules.")  # the remote code from the cached snapshot
    for name in ("id", "dir"):
        torch.testing.assert_close(torch.tensor(result[name]), expected, atol=1e-5, rtol=1e-5)
    assert result["processor_tokens"] == 64 and abs(result["diagnose_sum"] - 1) < 1e-5


def test_adapter_on_other_components_names_both(hub_model, tiny_components, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _, _, saved = hub_model
    config = Qwen2_5_VLConfig.from_pretrained(tiny_components["decoder"])
    config.text_config.hidden_size = 48
    config.text_config.rope_parameters["mrope_section"] = [2, 2, 2]
    config.vision_config.out_hidden_size = 48
    other = tmp_path / "wider-decoder"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_components["decoder"]).save_pretrained(other)
    with pytest.raises(ValueError) as err:
        msv.SkinCLIPVLForDiagnosis.from_pretrained(saved, vision=tiny_components["vision"], decoder=str(other))
    message = str(err.value)
    assert "hidden_size=32" in message and "hidden_size=48" in message
    assert DECODER_ID in message and str(other) in message


def _fake_hub(monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, kwargs)
        calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls["card"] = (folder / "README.md").read_text()
        calls["adapter_bytes"] = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_adapter_layout_and_card(hub_model, tmp_path, monkeypatch):
    model, processor, saved = hub_model
    calls = _fake_hub(monkeypatch)
    metrics = {"dataset": "synthetic", "test": {"balanced_accuracy": 0.61, "macro_auroc": 0.9, "n": 105}, "note": "x"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert model.push_to_hub("org/skin-adapter", processor=processor, metrics=tmp_path / "metrics.json",
                             private=True) == "commit-info"
    assert calls["create_repo"] == ("org/skin-adapter", {"private": True, "exist_ok": True, "repo_type": "model"})
    expected = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()) + ["README.md"]
    assert calls["files"] == sorted(expected)
    assert {"config.json", "configuration_skinclip_vl.py", "modeling_skinclip_vl.py", "processing_skinclip_vl.py",
            "grounding_skinclip_vl.py", "adapters_skinclip_vl.py", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "processor_config.json"} <= set(calls["files"])
    assert not [f for f in calls["files"] if f.endswith((".bin", ".pt")) or f == "model.safetensors"]

    card = calls["card"]
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["base_model"] == [VISION_ID, DECODER_ID]
    assert front["pipeline_tag"] == "image-classification" and "lora" in front["tags"]
    results = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    assert results == {"test/balanced_accuracy": 0.61, "test/macro_auroc": 0.9}  # headline metrics, not the counts
    assert "Not a medical device" in card and "## Intended use" in card and "## Limitations" in card
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    saved_params = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert f"in the adapter: {lora + saved_params:,}" in card
    assert f"{calls['adapter_bytes']:,} bytes" in card


def test_push_refused_while_components_are_local_paths(tiny_components, monkeypatch):
    calls = _fake_hub(monkeypatch)
    model = _trained_adapter_model(tiny_components)  # component names are the local tmp dirs
    with pytest.raises(ValueError, match="vision_model_name_or_path") as err:
        push_adapter_to_hub(model, None, "org/skin-adapter")
    assert "decoder_name_or_path" in str(err.value) and "openai/clip-vit-large-patch14" in str(err.value)
    assert not calls


def test_adapter_size_estimate_matches_the_saved_file(hub_model):
    model, _, saved = hub_model
    measured = adapter_size_on_disk(saved)
    estimate = estimate_adapter_size(model.config)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert estimate["lora_parameters"] == lora
    assert abs(estimate["bytes"] - measured["adapter_model"]) <= 0.02 * measured["adapter_model"]


def test_plain_peft_load_onto_a_user_built_model(hub_model, tiny_components):
    # PEFT 0.21.2's load_peft_weights doubles `subfolder` under HF_HUB_OFFLINE=1, so a repo id cannot be tested offline
    # here; the same call on the saved directory exercises the layout (`adapter/` subfolder, PEFT key names)
    from peft import PeftModel

    model, processor, saved = hub_model
    user = msv.SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    user = PeftModel.from_pretrained(user, str(saved), subfolder="adapter").eval()
    batch = dict(processor(images=[_image(3)]))
    with torch.no_grad():
        torch.testing.assert_close(user(**batch).class_logits, model(**batch).class_logits, atol=1e-5, rtol=1e-5)
