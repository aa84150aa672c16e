#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Write tiny, random but complete "pretrained" component checkpoints for tests, the demo and the CPU benchmarks.

    python -m tools.tiny_components OUT_DIR [--seed 0]   # from the repository root

writes

- `OUT_DIR/clip/`: a `CLIPModel` (vision tower 64 px / patch 8 -> 8 x 8 patches, text tower, both projections) with a
  `CLIPImageProcessor` and a `CLIPTokenizer` (byte-level BPE trained here on clinical phrases);
- `OUT_DIR/decoder/`: a `Qwen2_5_VLForConditionalGeneration` (tiny vision tower that SkinCLIP-VL drops, tiny language
  model that it uses) with a `Qwen2Tokenizer` carrying the Qwen chat special tokens.

Nothing is downloaded. The output is a deterministic function of the seed.
"""

import argparse
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A small chat template in the Qwen format (role headers between <|im_start|> and <|im_end|>).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8


def _corpus():
    """Clinical phrases the tiny tokenizers are trained on, so that reports tokenize into a few dozen tokens."""
    words = [
        "melanoma", "melanocytic nevus", "basal cell carcinoma", "actinic keratosis", "benign keratosis",
        "dermatofibroma", "vascular lesion", "squamous cell carcinoma", "pigment network", "typical", "atypical",
        "absent", "present", "streaks", "regular", "irregular", "pigmentation", "diffuse", "localized",
        "regression structures", "blue areas", "white areas", "combinations", "dots and globules",
        "blue-whitish veil", "vascular structures", "arborizing", "comma", "hairpin", "within regression",
        "wreath", "dotted", "linear irregular", "asymmetry", "irregular border", "color variegation",
        "Diagnosis:", "Impression:", "A lesion on the", "anterior torso", "posterior torso", "lateral torso",
        "upper extremity", "lower extremity", "head or neck", "palms or soles", "oral or genital area",
        "abdomen", "back", "chest", "lower limb", "upper limb", "buttocks", "acral skin", "genital area",
        "of a", "year-old", "male", "female", "patient", "of unknown age", "of unknown sex", "and sex",
        "at an unknown anatomical site", "A dermoscopic image of", "Dermoscopy shows", "features consistent with",
        "Describe the lesion and give the diagnosis.", "You are a careful dermatology assistant.",
        "no specific dermoscopic criteria", "is seen", "are seen", "centre", "center", "rim", "periphery",
        "Dermoscopic findings:", "typical pigment network", "atypical pigment network", "irregular streaks",
        "irregular dots and globules", "arborizing vessels", "dotted vessels", "blue-gray ovoid nests",
        "milia-like cysts", "red lagoons", "central white patch", "surface scale",
    ]
    lines = list(words)
    for age in range(0, 100, 5):
        lines.append(f"A lesion on the back of a {age}-year-old male patient.")
        lines.append(f"A lesion on the chest of a {age}-year-old female patient.")
    return lines * 4


def learn_bpe(words: Counter, num_merges: int, suffix: str = "") -> list:
    """Deterministic byte-pair merges: the most frequent adjacent pair first, ties broken by the pair itself.

    (The `tokenizers` trainer breaks ties in hash order, so two runs can give different vocabularies.)"""
    corpus = {}
    for word, freq in words.items():
        symbols = list(word)
        symbols[-1] += suffix
        corpus[tuple(symbols)] = corpus.get(tuple(symbols), 0) + freq
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + freq
        corpus = merged
    return merges


def _bpe_vocab(specials: list, num_merges: int, pre_tokenize, suffix: str = "") -> tuple[dict, list]:
    """Vocabulary (specials, the byte-level alphabet, with `suffix` variants if any, then merged symbols) + merges."""
    words = Counter(word for line in _corpus() for word, _ in pre_tokenize(line))
    merges = learn_bpe(words, num_merges, suffix)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = list(specials) + alphabet + ([a + suffix for a in alphabet] if suffix else [])
    for left, right in merges:
        if left + right not in symbols:
            symbols.append(left + right)
    return {symbol: i for i, symbol in enumerate(dict.fromkeys(symbols))}, [(a, b) for a, b in merges]


def build_tokenizers(num_merges: int = 300):
    """Byte-level BPE tokenizers learnt deterministically on the clinical corpus: a `Qwen2Tokenizer` whose Qwen chat
    special tokens are added tokens, and a `CLIPTokenizer` (lower-cased, `</w>` word ends)."""
    # the slow-to-build wrappers only lend their normaliser / pre-tokeniser to split the corpus into words
    qwen_backend = Qwen2Tokenizer()._tokenizer
    vocab, merges = _bpe_vocab(
        ["<|endoftext|>"], num_merges, lambda text: qwen_backend.pre_tokenizer.pre_tokenize_str(text)
    )
    qwen = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    qwen.chat_template = QWEN_CHAT_TEMPLATE

    clip_backend = CLIPTokenizer()._tokenizer
    vocab, merges = _bpe_vocab(
        ["<|startoftext|>", "<|endoftext|>"], num_merges,
        lambda text: clip_backend.pre_tokenizer.pre_tokenize_str(clip_backend.normalizer.normalize_str(text)),
        suffix="</w>",
    )
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges)
    clip_tok.model_max_length = 77
    # Round-trip through disk so that the special-token ids written into the model configs are those of the saved
    # tokenizers (the wrappers cache ids that can go stale when the vocabulary is replaced).
    with tempfile.TemporaryDirectory() as tmp:
        qwen.save_pretrained(os.path.join(tmp, "qwen"))
        clip_tok.save_pretrained(os.path.join(tmp, "clip"))
        qwen = Qwen2Tokenizer.from_pretrained(os.path.join(tmp, "qwen"))
        clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "clip"))
    return qwen, clip_tok


def build_clip(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPModel:
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            vocab_size=vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            projection_dim=32,
        ),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def build_decoder(vocab_size: int, token_ids: dict) -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
            bos_token_id=token_ids["<|endoftext|>"],
            eos_token_id=token_ids["<|im_end|>"],
            pad_token_id=token_ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=32,
            fullatt_block_indexes=[0],
        ),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # A trained LM has output logits spanning several units; at the 0.02 init std a frozen random head caps every
        # logit near 0.6, so no adapter could ever fit a rationale. Give the tiny head a pretrained-like scale.
        model.lm_head.weight.normal_(mean=0.0, std=0.3)
    return model


def move_into_place(staging, out_dir, names=("clip", "decoder")):
    """Replace `out_dir/<name>` by the finished `staging/<name>` folders (a rename each: never half-written)."""
    for name in names:
        if (Path(out_dir) / name).exists():
            shutil.rmtree(Path(out_dir) / name)
        os.replace(Path(staging) / name, Path(out_dir) / name)


def write_tiny_components(out_dir, seed: int = 0) -> dict:
    """Write `clip/` and `decoder/` under `out_dir` (atomically) and return their paths."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    qwen_tok, clip_tok = build_tokenizers()
    ids = {t: qwen_tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    clip = build_clip(
        len(clip_tok),
        clip_tok.convert_tokens_to_ids("<|startoftext|>"),
        clip_tok.convert_tokens_to_ids("<|endoftext|>"),
        clip_tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    decoder = build_decoder(len(qwen_tok), ids)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir))
    try:
        clip.save_pretrained(tmp / "clip")
        image_processor.save_pretrained(tmp / "clip")
        clip_tok.save_pretrained(tmp / "clip")
        decoder.save_pretrained(tmp / "decoder")
        qwen_tok.save_pretrained(tmp / "decoder")
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"vision": str(out_dir / "clip"), "decoder": str(out_dir / "decoder")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_tiny_components(args.out_dir, seed=args.seed)
    print(f"tiny CLIP:    {paths['vision']}\ntiny decoder: {paths['decoder']}")


if __name__ == "__main__":
    main()
