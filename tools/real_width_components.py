#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Write random-weight component checkpoints with the paper's exact configurations, at a chosen depth.

    python -m tools.real_width_components OUT_DIR --layers 2 [--seed 0]   (from the repository root)

writes

- `OUT_DIR/clip/`: a `CLIPModel` with the configuration of `openai/clip-vit-large-patch14` (vision tower 1024 wide,
  16 heads, MLP 4096, patch 14 at 224 px -> 256 patches; text tower 768 wide, 12 heads, 77 positions, vocabulary 49,408;
  projections 768; `quick_gelu`; the checkpoint's legacy text ids bos 0 / eos 2 / pad 1, with which CLIP pools at the
  highest token id, `<|endoftext|>`), saved in float32 like the real one, with a `CLIPImageProcessor` (224 px, OpenAI
  mean / std) and a `CLIPTokenizer` whose `<|startoftext|>` / `<|endoftext|>` are 49406 / 49407, 77 positions;
- `OUT_DIR/decoder/`: a `Qwen2_5_VLForConditionalGeneration` with the configuration of `Qwen/Qwen2.5-VL-7B-Instruct`
  (language model 3584 wide, 28 heads, 4 KV heads, MLP 18,944, vocabulary 152,064, M-RoPE sections [16, 24, 24],
  untied LM head; vision tower 1280 wide, which SkinCLIP-VL drops), saved in bfloat16 like the real one, with a
  `Qwen2Tokenizer` whose special tokens have the real ids (`<|endoftext|>` 151643 ... `<|video_pad|>` 151656, then the
  tool-call and fill-in-the-middle tokens up to 151664) and a chat template with the real markers.

Only the depth is cut: `--layers N` keeps N layers in each of the four towers (CLIP vision 24, CLIP text 12, Qwen
language model 28, Qwen vision 32); widths, heads, vocabularies and embeddings stay real. The weights are random: the
checkpoints test shapes, memory, dtypes and the code path, never model quality. The BPE vocabularies are small merges
learnt on clinical phrases, padded with unreachable filler entries up to the real sizes, so texts tokenise into more
tokens than with the real vocabularies (an upper bound on sequence lengths). Nothing is downloaded.

An existing `OUT_DIR` written with the same `--layers` and `--seed` (recorded in `components.json`) is reused.
"""

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from configuration_skinclip_vl import CLIP_VIT_L14_TEXT, CLIP_VIT_L14_VISION, QWEN2_5_VL_7B_TEXT
from tools.tiny_components import QWEN_SPECIAL_TOKENS, _bpe_vocab, move_into_place

FORMAT_VERSION = 1

# Real layer counts of the four towers (the extrapolation in bench/paper_config.py uses them).
REAL_LAYERS = {"clip_vision": 24, "clip_text": 12, "decoder": 28, "decoder_vision": 32}

# Qwen2.5 tokenizer: 151,643 byte-level BPE entries, then these added tokens with consecutive ids from 151643.
QWEN_BPE_SIZE = 151643
QWEN_EXTRA_TOKENS = [  # added, not special (as in the real tokenizer)
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
# the real checkpoint's embedding has 152,064 rows: 421 more than the tokenizer's 151,643 + 22 tokens use
QWEN_VOCAB_PADDING = QWEN2_5_VL_7B_TEXT["vocab_size"] - QWEN_BPE_SIZE


def qwen_token_ids(bpe_size: int = QWEN_BPE_SIZE) -> dict:
    """Ids of the Qwen added tokens when the BPE part has `bpe_size` entries (real: 151643 -> `<|endoftext|>`)."""
    return {token: bpe_size + i for i, token in enumerate(QWEN_SPECIAL_TOKENS + QWEN_EXTRA_TOKENS)}


QWEN_TOKEN_IDS = qwen_token_ids()
CLIP_TOKEN_IDS = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}

# Qwen2.5-VL's chat template, written here with the same output: a default system turn when none is given, role
# headers between <|im_start|> and <|im_end|>, and `<|vision_start|><|image_pad|><|vision_end|>` per image (the Qwen
# processor expands the one <|image_pad|> to the image's token count; SkinCLIP-VL's processor writes N of them).
QWEN2_5_VL_CHAT_TEMPLATE = (  # no whitespace control: the newlines are those of the format
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _pad_vocab(vocab: dict, size: int, prefix: str) -> dict:
    """Fill `vocab` with unreachable entries (no merge produces them) up to `size` ids."""
    vocab = dict(vocab)
    i = 0
    while len(vocab) < size:
        vocab.setdefault(f"{prefix}{i}", len(vocab))
        i += 1
    return vocab


def build_real_tokenizers(num_merges: int = 600, qwen_bpe_size: int = QWEN_BPE_SIZE):
    """`(Qwen2Tokenizer, CLIPTokenizer)` with the real vocabulary sizes and special-token ids (see the module doc).
    A smaller `qwen_bpe_size` (the test-suite variant) moves the Qwen special tokens down to ids from `qwen_bpe_size`."""
    from transformers import CLIPTokenizer, Qwen2Tokenizer

    qwen_backend = Qwen2Tokenizer()._tokenizer
    vocab, merges = _bpe_vocab([], num_merges, lambda text: qwen_backend.pre_tokenizer.pre_tokenize_str(text))
    vocab = _pad_vocab(vocab, qwen_bpe_size, "\u0120filler")
    qwen = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=None, pad_token=None)
    qwen.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})  # ids in order from 151643
    qwen.add_tokens(QWEN_EXTRA_TOKENS)
    qwen.eos_token, qwen.pad_token = "<|im_end|>", "<|endoftext|>"  # as in the Qwen2.5-VL-Instruct tokenizer
    qwen.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    qwen.model_max_length = 131072

    clip_backend = CLIPTokenizer()._tokenizer
    vocab, merges = _bpe_vocab(
        [], num_merges,
        lambda text: clip_backend.pre_tokenizer.pre_tokenize_str(clip_backend.normalizer.normalize_str(text)),
        suffix="</w>",
    )
    vocab = _pad_vocab(vocab, CLIP_TOKEN_IDS["<|startoftext|>"], "filler")
    vocab.update(CLIP_TOKEN_IDS)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                             pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    clip_tok.model_max_length = 77
    with tempfile.TemporaryDirectory() as tmp:  # round trip: the ids written into the configs are the saved ones
        qwen.save_pretrained(os.path.join(tmp, "qwen"))
        clip_tok.save_pretrained(os.path.join(tmp, "clip"))
        qwen = Qwen2Tokenizer.from_pretrained(os.path.join(tmp, "qwen"))
        clip_tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "clip"))
    for token, token_id in qwen_token_ids(qwen_bpe_size).items():
        if qwen.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"Qwen tokenizer: {token} has id {qwen.convert_tokens_to_ids(token)}, not {token_id}")
    for token, token_id in CLIP_TOKEN_IDS.items():
        if clip_tok.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"CLIP tokenizer: {token} has id {clip_tok.convert_tokens_to_ids(token)}, not {token_id}")
    return qwen, clip_tok


def clip_config(num_layers: int):
    """`openai/clip-vit-large-patch14`'s configuration with `num_layers` layers per tower."""
    from transformers import CLIPConfig

    vision = dict(CLIP_VIT_L14_VISION, num_hidden_layers=min(num_layers, REAL_LAYERS["clip_vision"]),
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
    text = dict(CLIP_VIT_L14_TEXT, num_hidden_layers=min(num_layers, REAL_LAYERS["clip_text"]),
                hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=768, logit_scale_init_value=2.6592)


def qwen_config(num_layers: int, vocab_size: int = QWEN2_5_VL_7B_TEXT["vocab_size"]):
    """`Qwen/Qwen2.5-VL-7B-Instruct`'s configuration with `num_layers` layers in the language model and the vision tower."""
    from transformers import Qwen2_5_VLConfig

    text = copy.deepcopy(QWEN2_5_VL_7B_TEXT)
    text.update(num_hidden_layers=min(num_layers, REAL_LAYERS["decoder"]), vocab_size=vocab_size, hidden_act="silu",
                sliding_window=32768, use_sliding_window=False, max_window_layers=28, attention_dropout=0.0,
                initializer_range=0.02, pad_token_id=None)
    depth = min(num_layers, REAL_LAYERS["decoder_vision"])
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, in_channels=3,
                  hidden_act="silu", tokens_per_second=2,
                  fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1])
    ids = qwen_token_ids(vocab_size - QWEN_VOCAB_PADDING)
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def _stamp(num_layers: int, seed: int, vocab_size: int, device: str) -> dict:
    # the random draws differ between devices: the device is part of what was written
    return {"format": FORMAT_VERSION, "layers": num_layers, "seed": seed, "vocab_size": vocab_size,
            "device": torch.device(device).type}


def write_real_width_components(out_dir, num_layers: int = 2, seed: int = 0, reuse: bool = True,
                                vocab_size: int | None = None, device: str = "cpu") -> dict:
    """Write `clip/` and `decoder/` under `out_dir` (atomically; reused when already written with the same settings)
    and return `{"vision": dir, "decoder": dir}`.

    `vocab_size` (default: the real 152,064) shrinks only the decoder vocabulary, for the test suite's variant: the
    Qwen special tokens then sit at `vocab_size - 421` onwards instead of 151643 (every width stays real). `device`:
    where the random weights are drawn (`"cuda"` is much faster at 28 layers; the files are the same layout)."""
    from transformers import CLIPImageProcessorPil, CLIPModel, GenerationConfig, Qwen2_5_VLForConditionalGeneration

    if num_layers < 1:
        raise ValueError(f"--layers must be >= 1, got {num_layers}.")
    vocab_size = int(vocab_size or QWEN2_5_VL_7B_TEXT["vocab_size"])
    if vocab_size - QWEN_VOCAB_PADDING < 2048:
        raise ValueError(f"--vocab_size must be at least {2048 + QWEN_VOCAB_PADDING}, got {vocab_size}.")
    out_dir = Path(out_dir)
    paths = {"vision": str(out_dir / "clip"), "decoder": str(out_dir / "decoder")}
    stamp_file = out_dir / "components.json"
    if reuse and stamp_file.is_file() and json.loads(stamp_file.read_text()) == _stamp(num_layers, seed, vocab_size, device):
        if all((Path(p) / "config.json").is_file() for p in paths.values()):
            return paths

    torch.manual_seed(seed)
    qwen_tok, clip_tok = build_real_tokenizers(qwen_bpe_size=vocab_size - QWEN_VOCAB_PADDING)
    ids = qwen_token_ids(vocab_size - QWEN_VOCAB_PADDING)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".real-width-", dir=out_dir))
    try:
        with torch.device(device):
            clip = CLIPModel._from_config(clip_config(num_layers), dtype=torch.float32).eval()
        clip.save_pretrained(tmp / "clip")
        del clip
        CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
            tmp / "clip"
        )
        clip_tok.save_pretrained(tmp / "clip")

        with torch.device(device):
            decoder = Qwen2_5_VLForConditionalGeneration._from_config(
                qwen_config(num_layers, vocab_size), dtype=torch.bfloat16
            ).eval()
        decoder.generation_config = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
            eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], do_sample=False,
        )
        decoder.save_pretrained(tmp / "decoder")
        del decoder
        qwen_tok.save_pretrained(tmp / "decoder")
        move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp_file.write_text(json.dumps(_stamp(num_layers, seed, vocab_size, device)))
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2, help="layers kept in each tower (widths stay real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=None, help="decoder vocabulary (default: the real 152064)")
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: faster)")
    args = parser.parse_args()
    paths = write_real_width_components(args.out_dir, num_layers=args.layers, seed=args.seed,
                                        vocab_size=args.vocab_size, device=args.device)
    print(f"CLIP ViT-L/14 ({args.layers} layers):          {paths['vision']}\n"
          f"Qwen2.5-VL-7B ({args.layers} layers): {paths['decoder']}")


if __name__ == "__main__":
    main()


__all__ = [
    "write_real_width_components", "build_real_tokenizers", "clip_config", "qwen_config", "qwen_token_ids", "QWEN_TOKEN_IDS",
    "CLIP_TOKEN_IDS", "QWEN2_5_VL_CHAT_TEMPLATE", "REAL_LAYERS",
]
