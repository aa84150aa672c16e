# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
r"""SkinCLIP-VL term grounding: per-token maps over the N image patches for the tokens of a rationale.

Plain functions taking the model first; `SkinCLIPVLForDiagnosis` (modeling_skinclip_vl.py) exposes each as a method
(`model.grounding_token_maps`, `model.ground_text`, `model.ground_token_ids`, `model.term_embeddings`,
`model.teacher_forced_inputs`, `model.rationale_log_probs`), and `diagnose(grounding=METHOD)` records the maps of its
rationale. The model keeps the pieces the training loss and decoding need (`term_patch_similarity`, the attention of
a decoding step to the image, `grad_cam_patches`); `SkinCLIPVLProcessor.post_process_diagnosis`
(processing_skinclip_vl.py) turns the maps into heatmaps of the clinical terms.

The rationale tokens are placed after each prompt (teacher forcing, `teacher_forced_inputs`). The four methods
(`GROUNDING_METHODS`; `DEFAULT_GROUNDING_METHOD` is `"text_query"`):

- `"attention"` (every token): the token's attention to the image positions, mean over heads and the grounding
  layers (`model.grounding_layer_ids()`: `config.grounding_layers`, else the second half), renormalised. `diagnose`
  records the same maps while decoding.
- `"grad_attention"` (clinical-term tokens): Chefer et al. (2021) gradient-weighted rollout for the decoder:
  `R = I`, then for every layer `R <- R + mean_heads(relu(dlogp/dA * A)) @ R`, where `logp` is the
  log-probability of the term token (read at the position before it); the map is that position's row of `R`
  over the image positions, renormalised (uniform if it is all zero).
- `"hidden_similarity"` (clinical-term tokens): cosine similarity of the token's hidden state with the image
  positions' hidden states, mean over the grounding layers, negative values set to 0, renormalised.
- `"text_query"` (clinical-term tokens): `softmax(logit_scale * cos(t_term, p_i W_v))` over the patches, with
  `t_term` the frozen CLIP text embedding of the vocabulary term (`model.term_patch_similarity`, the similarity the
  `L_ground` training term uses); every token of a term gets the term's map. No decoder pass.

Remote code (copied into every saved model); it does not import modeling_skinclip_vl.
"""

from typing import Optional, Union

import numpy as np
import torch
from torch import nn

try:
    from .processing_skinclip_vl import (
        DEFAULT_GROUNDING_METHOD,
        GROUNDING_METHODS,
        clinical_term_token_spans,
        prepare_images,
    )
except ImportError:  # imported as a top-level module (the repository itself) rather than as remote code
    from processing_skinclip_vl import (
        DEFAULT_GROUNDING_METHOD,
        GROUNDING_METHODS,
        clinical_term_token_spans,
        prepare_images,
    )


def resolve_grounding_method(grounding) -> Optional[str]:
    """`grounding` argument -> method name: `True` -> `DEFAULT_GROUNDING_METHOD`, `False`/`None` -> `None`."""
    if grounding is True:
        return DEFAULT_GROUNDING_METHOD
    if grounding is False or grounding is None:
        return None
    if grounding not in GROUNDING_METHODS:
        raise ValueError(f"grounding={grounding!r}: use True, False or one of {list(GROUNDING_METHODS)}.")
    return grounding


def _normalise_rows(values: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum 1; an all-zero row becomes uniform."""
    total = values.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(values, 1.0 / values.shape[-1])
    return torch.where(total > 0, values / total.clamp(min=1e-30), uniform)


class eager_attention:
    """Eager attention (which can return attention maps) for the duration of a block, then the previous setting."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.previous = self.model.config._attn_implementation or "sdpa"
        if self.previous != "eager":
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc):
        if self.previous != "eager":
            self.model.set_attn_implementation(self.previous)


def teacher_forced_inputs(model, batch, token_ids) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`prompt + token_ids[b]` of every row, left padded: `(input_ids, attention_mask, positions)` where
    `positions[b][k]` is the sequence index of rationale token k of row b."""
    rows = []
    for b, ids in enumerate(token_ids):
        prompt = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
        rows.append(prompt + list(ids))
    longest = max(len(r) for r in rows)
    pad = model.generation_config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=model.device)
    positions = [list(range(longest - len(ids), longest)) for ids in token_ids]
    return input_ids, attention_mask, positions


def term_embeddings(model, terms, processor=None) -> torch.Tensor:
    """Frozen CLIP text embeddings `(len(terms), align_dim)` of clinical-term strings (cached per term)."""
    cache = model.__dict__.setdefault("_term_embedding_cache", {})
    missing = [t for t in dict.fromkeys(terms) if t not in cache]
    if missing:
        processor = model.resolve_processor(processor)
        tokens = processor.tokenize_align_texts(missing)
        ids = torch.as_tensor(tokens["align_input_ids"], device=model.device)
        mask = torch.as_tensor(tokens["align_attention_mask"], device=model.device)
        for term, embedding in zip(missing, model.get_text_features(ids, mask).float()):
            cache[term] = embedding.detach()
    return torch.stack([cache[t].to(model.device) for t in terms]) if terms else torch.zeros(0, device=model.device)


def grounding_token_maps(model, batch, token_ids, method: str, processor=None, image_features=None) -> list:
    r"""
    Per-token maps over the N image patches for the rationale tokens `token_ids[b]` placed after each prompt of
    `batch` (teacher forcing). Returns one float32 `(len(token_ids[b]), N)` array per row; each mapped row sums to
    1; rows the method does not map are NaN. The methods are described in the module docstring.

    Args:
        model ([`SkinCLIPVLForDiagnosis`]): the model (every function here takes it first).
        batch (`dict`): processor output of the prompts (`input_ids`, `attention_mask`, `pixel_values`).
        token_ids (`list[list[int]]`): the rationale tokens of every row (no end token).
        method (`str`): one of `GROUNDING_METHODS`.
        image_features (`torch.Tensor`, *optional*): the frozen CLIP patch features, if already computed.
    """
    if method not in GROUNDING_METHODS:
        raise ValueError(f"Unknown grounding method {method!r}; use one of {list(GROUNDING_METHODS)}.")
    processor = model.resolve_processor(processor)
    if image_features is None:
        image_features = model.get_image_features(batch["pixel_values"])
    image_features = image_features.detach()
    n = image_features.shape[1]
    maps = [np.full((len(ids), n), np.nan, dtype=np.float32) for ids in token_ids]
    spans = [clinical_term_token_spans(processor.tokenizer, list(ids))[2] for ids in token_ids]
    if method == "text_query":
        with torch.no_grad():
            patch_embeds, _, _ = model.forward_features(image_features)
            scale = model.logit_scale().exp().clamp(max=100.0).float()
            for b, found in enumerate(spans):
                if not found:
                    continue
                terms = [term for term, _, _, _ in found]
                sim = model.term_patch_similarity(patch_embeds[b : b + 1], term_embeddings(model, terms, processor))
                term_maps = (scale * sim[0]).softmax(dim=-1).cpu().numpy()
                for (_, _, _, tokens), term_map in zip(found, term_maps):
                    maps[b][tokens] = term_map
        return maps
    if not any(len(ids) for ids in token_ids):
        return maps
    input_ids, attention_mask, positions = teacher_forced_inputs(model, batch, token_ids)
    image_mask = input_ids == model.config.image_token_id
    if method == "attention":
        with torch.no_grad(), eager_attention(model):
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                            use_cache=False, output_attentions=True, logits_to_keep=1)
        att = torch.stack([outputs.attentions[i].float() for i in model.grounding_layer_ids()]).mean(dim=(0, 2))
        for b, ids in enumerate(token_ids):
            if not len(ids):
                continue
            rows = att[b, positions[b]][:, image_mask[b]]
            maps[b] = (rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)).cpu().numpy()
        return maps
    if method == "hidden_similarity":
        with torch.no_grad():
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                            use_cache=False, output_hidden_states=True, logits_to_keep=1)
        layers = model.grounding_layer_ids()
        for b, found in enumerate(spans):
            rows = sorted({positions[b][k] for _, _, _, tokens in found for k in tokens})
            if not rows:
                continue
            sims = 0
            for layer in layers:
                hidden = nn.functional.normalize(outputs.hidden_states[layer + 1][b].float(), dim=-1)
                sims = sims + hidden[rows] @ hidden[image_mask[b]].T  # (rows, N)
            values = _normalise_rows(torch.relu(sims / len(layers)))
            for row, value in zip(rows, values.cpu().numpy()):
                maps[b][positions[b].index(row)] = value
        return maps
    # grad_attention
    targets = [[(k, positions[b][k]) for k in sorted({k for _, _, _, tokens in spans[b] for k in tokens})]
               for b in range(len(token_ids))]
    rounds = max((len(t) for t in targets), default=0)
    if rounds == 0:
        return maps
    image_features = image_features.float().requires_grad_(True)  # a graph even when no parameter trains
    with torch.enable_grad(), eager_attention(model):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                        use_cache=False, output_attentions=True, output_hidden_states=True, logits_to_keep=1)
        attentions = outputs.attentions
        final = outputs.hidden_states[-1]  # (B, L, d): after the decoder's final norm
        length = input_ids.shape[1]
        for j in range(rounds):
            picked = [(b, t[j]) for b, t in enumerate(targets) if j < len(t)]
            rows = torch.tensor([b for b, _ in picked], device=model.device)
            before = torch.tensor([pos - 1 for _, (_, pos) in picked], device=model.device)
            wanted = torch.tensor([input_ids[b, pos] for b, (_, pos) in picked], device=model.device)
            logits = model.lm_head(final[rows, before]).float()
            log_probs = logits.log_softmax(dim=-1).gather(1, wanted[:, None]).sum()
            grads = torch.autograd.grad(log_probs, attentions, retain_graph=j < rounds - 1)
            relevance = torch.eye(length, device=model.device).expand(input_ids.shape[0], length, length)
            with torch.no_grad():
                for attention, grad in zip(attentions, grads):
                    weighted = torch.relu(grad.float() * attention.float()).mean(dim=1)  # (B, L, L)
                    relevance = relevance + torch.bmm(weighted, relevance)
            for b, (k, pos) in picked:
                row = relevance[b, pos - 1][image_mask[b]]
                maps[b][k] = _normalise_rows(row[None])[0].cpu().numpy()
    return maps


def generated_token_maps(model, batch, generated, method: str, processor=None, image_features=None) -> np.ndarray:
    """[`grounding_token_maps`] of generated rationales `generated` (B, T), each cut at its first end token, as one
    float32 `(B, T, N)` array, NaN where a token has no map: what `diagnose` records for the teacher-forced methods."""
    eos = set(model.generation_config.eos_token_id or [])
    ids = [[t for t in row] for row in generated.tolist()]
    ids = [row[: next((k for k, t in enumerate(row) if t in eos), len(row))] for row in ids]
    maps = grounding_token_maps(model, batch, ids, method, processor=processor, image_features=image_features)
    token_maps = np.full((len(ids), generated.shape[1], maps[0].shape[-1] if maps else 0), np.nan, dtype=np.float32)
    for b, row in enumerate(maps):
        token_maps[b, : len(row)] = row
    return token_maps


@torch.no_grad()
def rationale_log_probs(model, input_ids, attention_mask, image_features, positions) -> torch.Tensor:
    """Log-probability of the token at each `positions[b][m]` (read at the position before it) under teacher
    forcing, for deletion curves: `(B, M)` (rows padded with 0 where `positions[b]` is shorter)."""
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, image_features=image_features,
                    use_cache=False, output_hidden_states=True, logits_to_keep=1)
    final = outputs.hidden_states[-1]
    width = max((len(p) for p in positions), default=0)
    out = torch.zeros(input_ids.shape[0], width, device=model.device)
    for b, pos in enumerate(positions):
        if not pos:
            continue
        index = torch.as_tensor(pos, device=model.device)
        logits = model.lm_head(final[b, index - 1]).float().log_softmax(dim=-1)
        out[b, : len(pos)] = logits.gather(1, input_ids[b, index][:, None])[:, 0]
    return out


@torch.no_grad()
def ground_text(model, images, texts, metadata=None, processor=None, grounding: Union[bool, str] = True) -> list:
    r"""
    Teacher-forced grounding of given rationales (e.g. a reference report, or to inspect another text): the texts are
    tokenised and passed to [`ground_token_ids`].

    Returns:
        `list[Diagnosis]` with the class probabilities of the prefill, `rationale` = the text, `tokens`, `token_maps`,
        `grounded_terms` and `focal_map` filled.
    """
    processor = model.resolve_processor(processor)
    texts = [texts] if isinstance(texts, str) else list(texts)
    token_ids = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ground_token_ids(model, images, token_ids, metadata=metadata, processor=processor, grounding=grounding)


@torch.no_grad()
def ground_token_ids(model, images, token_ids, metadata=None, processor=None,
                     grounding: Union[bool, str] = True) -> list:
    r"""
    Teacher-forced grounding of given rationale tokens: one forward over `prompt + token_ids[b]` (left padded), the
    maps of [`grounding_token_maps`] for the method `grounding`, and the clinical terms of the decoded text with
    their heatmaps (`processor.post_process_diagnosis(..., generated=False)`). With `"attention"` every token gets
    its map (the one `diagnose` records while decoding); the other methods map the clinical-term tokens only.

    Args:
        images: one image or a list (paths, PIL images or arrays).
        token_ids (`list[list[int]]`): the rationale tokens of every image (no end token).
        metadata, processor: as in [`diagnose`].
        grounding (`bool` or `str`, *optional*, defaults to `True`): the attribution method (`True`: the default).
    """
    processor = model.resolve_processor(processor)
    method = resolve_grounding_method(grounding) or DEFAULT_GROUNDING_METHOD
    pil_images, metadata = prepare_images(images, metadata)
    batch = processor(images=pil_images, metadata=metadata, return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    try:
        features = model.get_image_features(batch["pixel_values"])
        with torch.no_grad():
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            image_features=features, use_cache=False, logits_to_keep=1)
        token_maps = grounding_token_maps(model, batch, token_ids, method, processor=processor,
                                          image_features=features)
    finally:
        model.train(was_training)
    return processor.post_process_diagnosis(
        outputs.class_logits, [image.size for image in pil_images], model.config.id2label,
        temperature=model.config.calibration_temperature, pooling_attention=outputs.pooling_attention.float().cpu(),
        token_ids=[list(ids) for ids in token_ids], token_maps=token_maps, generated=False,
        grounding_method=method,
    )


__all__ = [
    "eager_attention",
    "generated_token_maps",
    "ground_text",
    "ground_token_ids",
    "grounding_token_maps",
    "rationale_log_probs",
    "resolve_grounding_method",
    "teacher_forced_inputs",
    "term_embeddings",
]
