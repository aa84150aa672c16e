"""SkinCLIPVLForDiagnosis on tiny components: shapes, freezing, a LoRA training step, batching, generation, save/load."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REMOTE_FILES, real_fixture
from PIL import Image
from torch import nn

from adapters_skinclip_vl import TRAINABLE_MODULES, count_parameters
from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

# metadata of different lengths -> different prompt lengths -> left padding in a batch
METAS = [
    {"age_approx": 55, "sex": "male", "anatom_site_general": "posterior torso"},
    None,
    {"sex": "female", "anatom_site_general": "lateral torso"},
]
REPORTS = [
    "Pigment network: atypical. Streaks: irregular. Diagnosis: melanoma.",
    "benign keratosis",
    "Dots and globules.",
]
ALIGN_TEXTS = ["melanoma", "benign keratosis", "melanocytic nevus"]
def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def images():
    return _images(3)


@pytest.fixture(scope="module")
def prompt_batch(tiny_processor, images):
    return tiny_processor(images=images, metadata=METAS)


@pytest.fixture(scope="module")
def train_batch(tiny_processor, images):
    return tiny_processor(images=images, metadata=METAS, reports=REPORTS, align_texts=ALIGN_TEXTS)


def _perturb_(module, names=("lora_B",), std=0.05, seed=1):
    """Make LoRA B (zero at init) and the trained modules non-trivial, so save/load and gradients are meaningful."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if any(key in name for key in names):
                param.add_(torch.randn(param.shape, generator=gen) * std)


# ---------------------------------------------------------------------------------------------- forward
def test_output_shapes(tiny_model, train_batch):
    config = tiny_model.config
    batch_size, seq_len = train_batch["input_ids"].shape
    with torch.no_grad():
        out = tiny_model(**train_batch, output_hidden_states=True)
    n_patches = config.image_seq_length
    assert n_patches == 64
    assert out.class_logits.shape == (batch_size, 8)
    labelled = (train_batch["labels"] != -100).any(dim=0).nonzero()
    rationale_span = seq_len - int(labelled.min()) + 1  # logits only where a label is predicted
    assert rationale_span < seq_len - n_patches
    assert out.logits.shape == (batch_size, rationale_span, config.text_config.vocab_size)
    assert out.image_embeds.shape == (batch_size, config.align_config.projection_dim)
    assert out.text_embeds.shape == (batch_size, config.align_config.projection_dim)
    assert out.pooling_attention.shape == (batch_size, n_patches)
    assert torch.allclose(out.pooling_attention.sum(-1), torch.ones(batch_size), atol=1e-5)
    assert (out.pooling_attention >= 0).all()
    assert out.image_features.shape == (batch_size, n_patches, config.vision_config.hidden_size)
    assert out.logit_scale.shape == ()
    assert math.isclose(float(out.logit_scale), math.exp(config.logit_scale_init_value), rel_tol=1e-5)
    assert out.loss is not None and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.cache is not None and out.cache.get_seq_length() == seq_len
    assert len(out.hidden_states) == config.text_config.num_hidden_layers + 1
    # same keys under the transformers 5.24 name; no stale `past_key_values` field
    assert "cache" in out.keys() and "past_key_values" not in out.keys()


def test_logit_scale_is_clamped_at_100(tiny_model, prompt_batch):
    with torch.no_grad():
        tiny_model.logit_scale.value.fill_(10.0)
        out = tiny_model(**prompt_batch, logits_to_keep=1)
    assert float(out.logit_scale) == 100.0


def test_logits_to_keep(tiny_model, prompt_batch):
    with torch.no_grad():
        full = tiny_model(**prompt_batch)
        last = tiny_model(**prompt_batch, logits_to_keep=1)
    batch_size = prompt_batch["input_ids"].shape[0]
    assert last.logits.shape == (batch_size, 1, tiny_model.config.text_config.vocab_size)
    assert torch.allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-6)
    assert torch.allclose(last.class_logits, full.class_logits, atol=1e-6)


class _LMHeadInputs:
    """Records the shape of every input of the LM head (a forward hook)."""

    def __init__(self, model):
        self.shapes = []
        self.handle = model.lm_head.register_forward_hook(lambda module, args, out: self.shapes.append(args[0].shape))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_lm_logits_only_on_rationale_positions(tiny_model, train_batch):
    """Training never builds B x L x V logits: the LM head sees only the rationale span, and the loss is the one of the
    full logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    batch_size, seq_len = train_batch["input_ids"].shape
    first_label = int((train_batch["labels"] != -100).any(dim=0).nonzero().min())
    with torch.no_grad(), _LMHeadInputs(tiny_model) as head:
        out = tiny_model(**train_batch)
    assert head.shapes == [torch.Size((batch_size, seq_len - first_label + 1, tiny_model.config.text_config.hidden_size))]
    assert head.shapes[0][1] < seq_len - tiny_model.config.image_seq_length  # none of the image-token positions
    with torch.no_grad():
        full = tiny_model(**{k: v for k, v in train_batch.items() if k != "labels"})
    assert full.logits.shape[1] == seq_len
    reference = ForCausalLMLoss(full.logits, train_batch["labels"], vocab_size=full.logits.shape[-1])
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, full.logits[:, first_label - 1 :], rtol=1e-5, atol=1e-5)
    # an explicit logits_to_keep that cannot hold the rationale span is refused
    with pytest.raises(ValueError, match="rationale span"):
        tiny_model(**train_batch, logits_to_keep=2)


def test_lm_logits_only_on_last_position_in_generation_and_diagnosis(tiny_model, prompt_batch):
    """Classification and every generation step (prefill included) apply the LM head to one position per row."""
    batch_size = prompt_batch["input_ids"].shape[0]
    with torch.no_grad(), _LMHeadInputs(tiny_model) as head:
        tiny_model(**prompt_batch, logits_to_keep=1)
        tiny_model.generate(**prompt_batch, max_new_tokens=3, do_sample=False)
    assert len(head.shapes) >= 2
    assert all(shape[:2] == (batch_size, 1) for shape in head.shapes), head.shapes


def test_precomputed_image_features_give_the_same_result(tiny_model, prompt_batch):
    with torch.no_grad():
        out = tiny_model(**prompt_batch)
        features = tiny_model.get_image_features(prompt_batch["pixel_values"])
        cached = tiny_model(
            input_ids=prompt_batch["input_ids"], attention_mask=prompt_batch["attention_mask"], image_features=features
        )
    assert torch.equal(features, out.image_features)
    assert torch.allclose(cached.class_logits, out.class_logits, atol=1e-6)


def test_placeholder_count_mismatch_raises_with_counts(tiny_model, prompt_batch, tiny_processor):
    input_ids = prompt_batch["input_ids"].clone()
    first_image = (input_ids[1] == tiny_processor.image_token_id).nonzero()[0, 0]
    input_ids[1, first_image] = tiny_processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with pytest.raises(ValueError, match=r"tokens per sample: \[64, 63, 64\], features per sample: 64"):
        tiny_model(
            input_ids=input_ids,
            attention_mask=prompt_batch["attention_mask"],
            pixel_values=prompt_batch["pixel_values"],
        )
    input_ids = prompt_batch["input_ids"].clone()
    input_ids[0, -2] = tiny_processor.cls_token_id
    with pytest.raises(ValueError, match=r"CLS.*\[2, 1, 1\]"):
        tiny_model(
            input_ids=input_ids,
            attention_mask=prompt_batch["attention_mask"],
            pixel_values=prompt_batch["pixel_values"],
        )


# ---------------------------------------------------------------------------------------------- freezing and training
def test_clip_towers_frozen_and_eval_under_train(tiny_model):
    tiny_model.train()
    for tower in (tiny_model.vision_tower, tiny_model.align_tower):
        assert all(not module.training for module in tower.modules())
        assert all(not param.requires_grad for param in tower.parameters())
    for name in TRAINABLE_MODULES:
        module = getattr(tiny_model, name)
        assert module.training
        assert all(param.requires_grad for param in module.parameters())
    assert tiny_model.language_model.training


def _cfa_like_loss(out, class_labels):
    """Class CE + LM loss + an InfoNCE term on image_embeds (through logit_scale): reaches every trainable module."""
    image = F.normalize(out.image_embeds, dim=-1)
    text = F.normalize(out.text_embeds, dim=-1)
    sims = out.logit_scale * image @ text.T
    targets = torch.arange(sims.shape[0])
    align = (F.cross_entropy(sims, targets) + F.cross_entropy(sims.T, targets)) / 2
    return F.cross_entropy(out.class_logits, class_labels) + out.loss + align


def test_lora_training_step_changes_trainable_only(tiny_model, train_batch):
    peft_model = tiny_model.apply_lora(verbose=False)
    _perturb_(peft_model)  # LoRA B starts at zero, which would give LoRA A a zero gradient in the first step
    peft_model.train()
    assert not tiny_model.vision_tower.training and not tiny_model.align_tower.training
    before = {name: param.detach().clone() for name, param in peft_model.named_parameters()}
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    out = peft_model(**train_batch)
    loss = _cfa_like_loss(out, torch.tensor([0, 4, 1]))
    loss.backward()
    optimizer.step()
    changed = {name for name, param in peft_model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == set(trainable), (
        f"not updated: {sorted(set(trainable) - changed)}; frozen but changed: {sorted(changed - set(trainable))}"
    )
    for part in ("vision_tower", "align_tower", "lm_head", "embed_tokens", "mlp", "o_proj", "k_proj", "norm"):
        assert not any(part in name for name in trainable), part
    for name in TRAINABLE_MODULES:
        assert any(f"{name}.modules_to_save" in n for n in changed), name


def test_lora_trainable_count_and_placement(tiny_model):
    config = tiny_model.config
    text, d_m = config.text_config, config.text_config.hidden_size
    head_dim = d_m // text.num_attention_heads
    q_out, v_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    r = config.lora_r
    lora = text.num_hidden_layers * (r * (d_m + q_out) + r * (d_m + v_out))
    d_v, d_f, d_align = config.vision_config.hidden_size, config.pooling_dim, config.align_config.projection_dim
    projector = d_v * d_m + d_m
    pooling = d_m + 2 * (d_m * d_f + d_f) + d_m * d_align + d_align
    cls, classifier, logit_scale = d_m, d_m * 8 + 8, 1
    expected = lora + projector + pooling + cls + classifier + logit_scale
    assert expected == 2 * (64 * 64 + 64 * 48) + 1056 + 3200 + 32 + 264 + 1 == 18889

    total_before = sum(p.numel() for p in tiny_model.parameters())
    peft_model = tiny_model.apply_lora(verbose=False)
    trainable, total = count_parameters(peft_model)
    assert trainable == expected
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # total = base + LoRA + the trained copies of modules_to_save
    assert total == total_before + lora + (expected - lora)

    lora_names = [name for name, _ in peft_model.named_parameters() if "lora_" in name]
    assert len(lora_names) == text.num_hidden_layers * 2 * 2  # layers x (q, v) x (A, B)
    assert not any("vision_tower" in name or "align_tower" in name for name in lora_names)
    for name in lora_names:
        assert ".language_model.layers." in name and (".q_proj." in name or ".v_proj." in name), name

    from peft.utils.other import ModulesToSaveWrapper

    inner = peft_model.base_model.model
    assert set(peft_model.peft_config["default"].modules_to_save) == set(TRAINABLE_MODULES)
    for name in TRAINABLE_MODULES:
        wrapper = getattr(inner, name)
        assert isinstance(wrapper, ModulesToSaveWrapper), name
        assert isinstance(wrapper.original_module, nn.Module)
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
        assert not any(p.requires_grad for p in wrapper.original_module.parameters())


# ---------------------------------------------------------------------------------------------- batching
def test_batch_equals_single(tiny_model, tiny_processor, images, prompt_batch, train_batch):
    assert len(set(prompt_batch["attention_mask"].sum(1).tolist())) == 3  # really different lengths
    with torch.no_grad():
        batched = tiny_model(**prompt_batch)
        batched_train = tiny_model(**train_batch)
        for i in range(3):
            alone = tiny_model(**tiny_processor(images=images[i], metadata=METAS[i]))
            torch.testing.assert_close(batched.class_logits[i], alone.class_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.logits[i, -1], alone.logits[0, -1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.image_embeds[i], alone.image_embeds[0], atol=1e-5, rtol=1e-5)
            # with rationales of different lengths appended, CLS is no longer last; its logits must not move
            torch.testing.assert_close(batched_train.class_logits[i], alone.class_logits[0], atol=1e-5, rtol=1e-5)
            alone_train = tiny_model(**tiny_processor(images=images[i], metadata=METAS[i], reports=REPORTS[i]))
            n = alone_train.logits.shape[1]
            torch.testing.assert_close(batched_train.logits[i, -n:], alone_train.logits[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- generation
def test_generate_reuses_cache_and_matches_single(tiny_model, tiny_processor, images, prompt_batch):
    tiny_model.generation_config.eos_token_id = None  # let every row run the full length
    generated = tiny_model.generate(**prompt_batch, max_new_tokens=4, do_sample=False)
    prompt_len = prompt_batch["input_ids"].shape[1]
    assert generated.shape == (3, prompt_len + 4)
    assert torch.equal(generated[:, :prompt_len], prompt_batch["input_ids"])
    no_cache = tiny_model.generate(**prompt_batch, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(generated, no_cache)
    for i in range(3):
        alone = tiny_model.generate(
            **tiny_processor(images=images[i], metadata=METAS[i]), max_new_tokens=4, do_sample=False
        )
        assert torch.equal(generated[i, prompt_len:], alone[0, -4:])


def test_generate_stops_at_eos(tiny_model, tiny_processor, prompt_batch):
    eos_id = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos_id in tiny_model.generation_config.eos_token_id
    head = tiny_model.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = 1e4
    tiny_model.lm_head = biased
    generated = tiny_model.generate(**prompt_batch, max_new_tokens=8, do_sample=False)
    new = generated[:, prompt_batch["input_ids"].shape[1] :]
    assert new.shape == (3, 1)
    assert (new[:, -1] == eos_id).all()


# ---------------------------------------------------------------------------------------------- save / load
def test_full_save_load(tiny_model, prompt_batch, tmp_path):
    _perturb_(tiny_model, names=TRAINABLE_MODULES, std=0.1)
    tiny_model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert set(REMOTE_FILES) <= files
    reloaded = SkinCLIPVLForDiagnosis.from_pretrained(tmp_path).eval()
    assert not reloaded.has_adapter()
    with torch.no_grad():
        a, b = tiny_model(**prompt_batch), reloaded(**prompt_batch)
    torch.testing.assert_close(a.class_logits, b.class_logits, atol=0, rtol=0)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.logit_scale, b.logit_scale, atol=0, rtol=0)
    for name, param in tiny_model.state_dict().items():
        assert torch.equal(param, reloaded.state_dict()[name]), name


@pytest.fixture()
def saved_adapter(tiny_model, tiny_processor, tmp_path):
    """A LoRA model with non-trivial LoRA B and trained modules, saved in the adapter layout (+ processor)."""
    peft_model = tiny_model.apply_lora(verbose=False)
    _perturb_(peft_model, names=("lora_B", "modules_to_save"), std=0.1)
    peft_model.eval()
    save_dir = tmp_path / "skinclip"
    peft_model.base_model.model.save_pretrained(save_dir)
    tiny_processor.save_pretrained(save_dir)
    return peft_model, save_dir


def test_adapter_layout(saved_adapter, tiny_components):
    peft_model, save_dir = saved_adapter
    files = {p.name for p in save_dir.iterdir()}
    assert set(REMOTE_FILES) <= files
    assert not files & {
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
        "adapter_config.json",
    }
    assert (save_dir / "adapter" / "adapter_config.json").is_file()
    assert (save_dir / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((save_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_skinclip_vl.SkinCLIPVLForDiagnosis"
    assert config["auto_map"]["AutoConfig"] == "configuration_skinclip_vl.SkinCLIPVLConfig"
    # the tiny local components travel inside the saved model (issue 9: self-contained saved models)
    assert config["vision_model_name_or_path"] == "components/vision"
    assert config["decoder_name_or_path"] == "components/decoder"
    for role in ("vision", "decoder"):
        copied = {p.name for p in (save_dir / "components" / role).iterdir()}
        assert copied == {p.name for p in Path(tiny_components[role]).iterdir()}
    from safetensors.torch import load_file

    keys = load_file(save_dir / "adapter" / "adapter_model.safetensors").keys()
    assert keys and all("lora_" in k or any(f"{m}." in k for m in TRAINABLE_MODULES) for k in keys), sorted(keys)
    for name in TRAINABLE_MODULES:
        assert any(k.startswith(f"base_model.model.{name}.") for k in keys), name
    size = (save_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 4 * count_parameters(peft_model)[0] + 65536  # trainable weights only, float32


def test_adapter_save_load_equality(saved_adapter, tiny_components, prompt_batch):
    peft_model, save_dir = saved_adapter
    with torch.no_grad():
        expected = peft_model(**prompt_batch)
    reloaded = SkinCLIPVLForDiagnosis.from_pretrained(save_dir)
    assert isinstance(reloaded, SkinCLIPVLForDiagnosis) and reloaded.has_adapter()
    assert not reloaded.training
    with torch.no_grad():
        got = reloaded(**prompt_batch)
    torch.testing.assert_close(got.class_logits, expected.class_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.image_embeds, expected.image_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.logit_scale, expected.logit_scale, atol=1e-6, rtol=1e-6)

    from peft import PeftModel

    fresh = SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"])
    with torch.no_grad():
        untrained = fresh(**prompt_batch)
    assert not torch.allclose(untrained.class_logits, expected.class_logits, atol=1e-3)
    via_peft = PeftModel.from_pretrained(fresh, save_dir, subfolder="adapter").eval()
    with torch.no_grad():
        got = via_peft(**prompt_batch)
    torch.testing.assert_close(got.class_logits, expected.class_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_automodel_classifies_real_isic_images(saved_adapter):
    from transformers import AutoModel, AutoProcessor

    paths = [
        str(real_fixture("isic2019", "ISIC_2019_Training_Input", name))
        for name in ("ISIC_0000000.jpg", "ISIC_0000001.jpg", "ISIC_0000002.jpg")
    ]
    _, save_dir = saved_adapter
    processor = AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(save_dir, trust_remote_code=True)
    assert type(model).__name__ == "SkinCLIPVLForDiagnosis"
    metadata = [{"age_approx": 55, "sex": "female", "anatom_site_general": "anterior torso"}, None, {"age_approx": 30}]
    with torch.no_grad():
        out = model(**processor(images=paths, metadata=metadata), logits_to_keep=1)
    probs = out.class_logits.softmax(-1)
    assert probs.shape == (3, 8)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    assert ((probs > 0) & (probs < 1)).all()
    assert [model.config.id2label[i] for i in range(8)] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
