"""4-bit NF4 decoder (QLoRA) on CPU: only the decoder's language model is quantised; LoRA trains on top of it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapters_skinclip_vl import TRAINABLE_MODULES
from modeling_skinclip_vl import SkinCLIPVLForDiagnosis


def _bitsandbytes_cpu_reason():
    """None when bitsandbytes can run 4-bit here, else why not."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported: {type(err).__name__}: {err}"
    try:
        layer = bnb.nn.Linear4bit(16, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(16, 16), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        layer.weight._quantize("cpu") if not getattr(layer.weight, "bnb_quantized", False) else None
        layer(torch.randn(2, 16))
    except Exception as err:
        return f"bitsandbytes {bnb.__version__} cannot run 4-bit NF4 on this CPU: {type(err).__name__}: {err}"
    return None


@pytest.fixture(scope="module")
def quantized_model(tiny_components):
    reason = _bitsandbytes_cpu_reason()
    if reason:
        pytest.skip(reason)
    from transformers import BitsAndBytesConfig

    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    torch.manual_seed(0)
    return SkinCLIPVLForDiagnosis.from_components(
        tiny_components["vision"], tiny_components["decoder"], quantization_config=quantization_config
    )


@pytest.fixture(scope="module")
def batch(tiny_processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    return tiny_processor(
        images=images, metadata=[{"age_approx": 45, "sex": "male"}, None], reports=["melanoma", "benign keratosis"]
    )


def test_only_decoder_linears_are_4bit(quantized_model):
    import bitsandbytes as bnb

    decoder_linears = {
        name: type(module).__name__
        for name, module in quantized_model.language_model.named_modules()
        if name.endswith(("_proj",))
    }
    n_layers = quantized_model.config.text_config.num_hidden_layers
    assert len(decoder_linears) == n_layers * 7  # q k v o gate up down
    assert set(decoder_linears.values()) == {"Linear4bit"}, decoder_linears
    for name in ["vision_tower", "align_tower", "lm_head"] + TRAINABLE_MODULES:
        module = getattr(quantized_model, name)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules()), name
        assert all(p.dtype == torch.float32 for p in module.parameters()), name
    assert quantized_model.config.decoder_quantization_config["bnb_4bit_quant_type"] == "nf4"
    assert quantized_model.config.decoder_quantization_config["load_in_4bit"] is True


def test_forward_and_generate_run(quantized_model, batch, tiny_processor):
    quantized_model.eval()
    with torch.no_grad():  # inference: bitsandbytes' CPU fast path must not crash on the tiny shapes
        out = quantized_model(**batch)
    assert out.class_logits.shape == (2, 8) and out.class_logits.dtype == torch.float32
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.loss)
    # with labels, LM logits cover only the rationale span (from the position before the first label to the end)
    first_label = int((batch["labels"] != -100).any(dim=0).int().argmax())
    assert out.logits.shape[:2] == (2, batch["input_ids"].shape[1] - first_label + 1)
    prompts = tiny_processor(metadata=[None, None])
    generated = quantized_model.generate(
        input_ids=prompts["input_ids"],
        attention_mask=prompts["attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=3,
        do_sample=False,
    )
    assert (
        generated.shape[0] == 2
        and prompts["input_ids"].shape[1] < generated.shape[1] <= prompts["input_ids"].shape[1] + 3
    )


def test_lora_backward_step(quantized_model, batch):
    peft_model = quantized_model.apply_lora(verbose=False)
    with torch.no_grad():  # LoRA B starts at zero: make it non-trivial so that LoRA A gets a gradient too
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.train()
    assert not quantized_model.vision_tower.training
    lora = {name: param for name, param in peft_model.named_parameters() if "lora_" in name}
    assert len(lora) == quantized_model.config.text_config.num_hidden_layers * 2 * 2
    assert all(param.requires_grad and param.dtype == torch.float32 for param in lora.values())
    assert not any(
        p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    )
    before = {name: param.detach().clone() for name, param in lora.items()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    out = peft_model(**batch)
    loss = out.loss + F.cross_entropy(out.class_logits, torch.tensor([0, 4]))
    loss.backward()
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    for name, param in lora.items():
        assert not torch.equal(param, before[name]), name


def test_gradients_after_an_evaluation_pass_are_unchanged(tiny_components, batch):
    """bitsandbytes repacks 4-bit weights for CPU inference on a no-grad eval forward, and that kernel has no backward:
    back in train mode the model must restore the regular layout, or gradients through the base layers are lost."""
    reason = _bitsandbytes_cpu_reason()
    if reason:
        pytest.skip(reason)
    from transformers import BitsAndBytesConfig

    def lora_gradients(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = SkinCLIPVLForDiagnosis.from_components(
            tiny_components["vision"], tiny_components["decoder"],
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32),
        )
        peft_model = model.apply_lora(verbose=False)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.linspace(-0.05, 0.05, param.numel()).reshape(param.shape))
        if evaluate_first:
            peft_model.eval()
            with torch.no_grad():
                peft_model(**batch)
        peft_model.train()
        out = peft_model(**batch)
        (out.loss + F.cross_entropy(out.class_logits, torch.tensor([0, 4]))).backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if "lora_A" in n and "layers.0." in n}

    fresh, after_eval = lora_gradients(False), lora_gradients(True)
    assert fresh
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=1e-4, atol=1e-7, msg=name)
