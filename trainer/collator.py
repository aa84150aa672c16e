# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Batch collation on top of `SkinCLIPVLProcessor`, and the frozen-feature cache (DESIGN.md "Performance principles")."""

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def stable_id(text: str) -> int:
    """A process-independent 62-bit id of a string (Python's `hash` is salted per process)."""
    return int.from_bytes(hashlib.md5(str(text).encode("utf-8")).digest()[:8], "little") >> 2


def load_row_image(row: dict):
    """The RGB PIL image of a dataset row through the one image loader (`processing_skinclip_vl.load_image`): a file
    that does not decode raises a `ValueError` naming the row's `image_id` and `row_index` (when the row has one)."""
    from processing_skinclip_vl import load_image

    try:
        return load_image(row["image"])
    except (ValueError, OSError, TypeError) as err:
        where = f" (row {row['row_index']})" if row.get("row_index") is not None else ""
        raise ValueError(f"image {row.get('image_id', '?')}{where}: {err}") from err


def image_content_fingerprint(dataset, batch_size: int = 256) -> str:
    """A hash of what the `image` column of `dataset` holds, row by row: embedded bytes are hashed; an image stored as a
    path contributes its path, size and modification time. Replacing an image in place changes it."""
    from datasets import Image as ImageFeature

    digest = hashlib.blake2b(digest_size=16)
    column = dataset.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
    for batch in column.with_format("arrow").iter(batch_size=batch_size):
        images = batch.column("image").combine_chunks()
        paths, blobs = images.field("path").to_pylist(), images.field("bytes")
        for i, path in enumerate(paths):
            blob = blobs[i]
            if blob.is_valid:
                digest.update(b"B")
                digest.update(memoryview(blob.as_buffer()))
            elif path is not None:
                try:
                    stat = os.stat(path)
                    digest.update(f"P{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
                except OSError:
                    digest.update(f"M{path}".encode())
            else:
                digest.update(b"N")
    return digest.hexdigest()


def augment_image(image, rng: random.Random):
    """Dermoscopy-safe augmentation: flips and right-angle rotations (lesions have no canonical orientation)."""
    from PIL import Image

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    turns = rng.randrange(4)
    if turns:
        image = image.transpose([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270][turns - 1])
    return image


@dataclass
class SkinCLIPVLCollator:
    """
    Turns dataset rows (the shared schema) into model inputs plus the CFA targets.

    Returns the processor's `input_ids`, `attention_mask`, rationale `labels`, and either `pixel_values` or cached
    `image_features`; either `align_input_ids` or cached `text_embeds`; and `class_labels` (-100 where a row has no
    fine class), `align_text_ids` (rows with the same alignment text share an id: positives of each other in the
    alignment term), `group_ids` (lesion/patient groups, for the bootstrap).

    Args:
        processor: a `SkinCLIPVLProcessor`.
        image_features: per-row frozen CLIP features (indexable by the `row_index` column), or `None` to send pixels.
        text_embeddings: `{align_text: embedding}` from the cache, or `None` to send CLIP token ids.
        use_metadata: `False` withholds metadata (image-only evaluation: every field is said to be unknown).
        augment: random flips/rotations (only without the image-feature cache).
        max_length: truncate rationales so sequences fit.
        with_targets: `False` for prediction: no rationale labels and no alignment text (nothing is tokenised or
            looked up that the class logits do not need).
        term_vocabulary: clinical terms (the grounding term's bank); when given, `term_labels` (batch, terms) marks
            the terms each row's report names (`find_clinical_terms`), the only supervision of `L_ground`.
        align_text_column: the row field holding the alignment text: `"align_text"` (the class sentence,
            `--align_text label`) or `"report"` (the row's own report, `--align_text report`).
    """

    processor: object
    image_features: object = None
    text_embeddings: dict | None = None
    use_metadata: bool = True
    augment: bool = False
    max_length: int | None = None
    seed: int = 0
    with_targets: bool = True
    term_vocabulary: list | None = None
    align_text_column: str = "align_text"
    _rng: random.Random = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.augment and self.image_features is not None:
            raise ValueError("Augmentation needs pixels: use image_features=None (the feature cache is off).")
        self._rng = random.Random(self.seed)

    def __call__(self, rows: list) -> dict:
        images = None
        if self.image_features is None:
            images = [load_row_image(row) for row in rows]
            if self.augment:
                images = [augment_image(image, self._rng) for image in images]
        metadata = [row.get("meta_text") if self.use_metadata else None for row in rows]
        align_texts = [row.get(self.align_text_column) or "" for row in rows]
        batch = self.processor(
            images=images,
            metadata=metadata,
            reports=[row.get("report") or "" for row in rows] if self.with_targets else None,
            align_texts=align_texts if self.with_targets and self.text_embeddings is None else None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        if self.image_features is not None:
            index = [int(row["row_index"]) for row in rows]
            batch["image_features"] = torch.from_numpy(np.asarray(self.image_features[index], dtype=np.float32))
        if self.with_targets and self.text_embeddings is not None:
            batch["text_embeds"] = torch.stack([self.text_embeddings[text] for text in align_texts]).float()
        batch["class_labels"] = torch.tensor([int(r["label"]) if int(r["label"]) >= 0 else -100 for r in rows])
        batch["align_text_ids"] = torch.tensor([stable_id(t) for t in align_texts], dtype=torch.long)
        batch["group_ids"] = torch.tensor([stable_id(r.get("group_id") or r.get("image_id")) for r in rows])
        if self.with_targets and self.term_vocabulary is not None:
            batch["term_labels"] = report_term_labels([row.get("report") or "" for row in rows], self.term_vocabulary)
        return batch


def count_align_truncations(processor, texts) -> int:
    """How many of `texts` (alignment texts of a dataset) exceed the CLIP tokenizer's `processor.align_max_length`
    positions (77 for CLIP) and are therefore truncated when tokenised; empty texts count as not truncated."""
    texts = [str(t) for t in texts if t]
    if not texts:
        return 0
    lengths = processor.align_tokenizer(texts, add_special_tokens=True)["input_ids"]
    return sum(len(ids) > processor.align_max_length for ids in lengths)


def report_term_labels(reports, term_vocabulary) -> torch.Tensor:
    """`(len(reports), len(term_vocabulary))` float tensor: 1 where a report names the term (`find_clinical_terms`)."""
    from processing_skinclip_vl import find_clinical_terms

    index = {term: k for k, term in enumerate(term_vocabulary)}
    labels = torch.zeros(len(reports), len(term_vocabulary))
    for b, report in enumerate(reports):
        for term, _, _ in find_clinical_terms(report):
            if term in index:
                labels[b, index[term]] = 1.0
    return labels


class FeatureCache:
    """
    Frozen CLIP patch features (per dataset row) and CLIP text embeddings (per distinct text), computed once, batched,
    stored on disk (fp16 by default, memory-mapped on read) and keyed by model and data fingerprints, so epochs 2..n
    (and later runs) never run the ViT or the CLIP text tower.
    """

    def __init__(self, cache_dir, model, processor, dtype: str = "float16", batch_size: int = 32):
        self.cache_dir = Path(cache_dir)
        self.model = model
        self.processor = processor
        self.dtype = np.dtype(dtype)
        self.batch_size = batch_size
        self.model_fingerprint = self._model_fingerprint()

    def _model_fingerprint(self) -> str:
        digest = hashlib.sha256()
        config = self.model.config
        digest.update(json.dumps(config.vision_config.to_dict(), sort_keys=True, default=str).encode())
        digest.update(json.dumps(config.align_config.to_dict(), sort_keys=True, default=str).encode())
        digest.update(str(config.vision_feature_layer).encode())
        digest.update(json.dumps(self.processor.image_processor.to_dict(), sort_keys=True, default=str).encode())
        for tower in (self.model.vision_tower, self.model.align_tower):
            for name, tensor in sorted(tower.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().float().numpy().tobytes())
        digest.update(self.dtype.str.encode())
        return digest.hexdigest()[:16]

    def _write_atomic(self, path: Path, array: np.ndarray):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)

    @torch.no_grad()
    def image_features(self, dataset, data_fingerprint: str | None = None, desc: str = "caching CLIP features"):
        """`(rows, N, d_v)` array of frozen patch features for every row of `dataset` (in row order).

        The key covers the model fingerprint, `data_fingerprint` (e.g. `Dataset._fingerprint`: which rows, in which
        order) and the image content (`image_content_fingerprint`), so images replaced in place are a cache miss. The
        images go through the training collator's loader (`load_row_image`), so cached features are those of the
        pixels training and inference see."""
        content = image_content_fingerprint(dataset)
        key = hashlib.sha256(f"{data_fingerprint}\0{content}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"image-{self.model_fingerprint}-{key}.npy"
        if path.exists():
            logger.info(f"Feature cache hit: {path}")
            return np.load(path, mmap_mode="r")
        from datasets import Image as ImageFeature

        device = self.model.vision_tower.device
        keep = [c for c in ("image", "image_id", "row_index") if c in dataset.column_names]
        view = dataset.select_columns(keep).cast_column("image", ImageFeature(decode=False))  # decoded by load_image
        chunks = []
        for start in tqdm(range(0, len(view), self.batch_size), desc=desc):
            rows = view[start : start + self.batch_size]
            columns = list(rows)
            rows = [dict(zip(columns, values)) for values in zip(*rows.values())]
            images = [load_row_image(row) for row in rows]
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
            chunks.append(self.model.get_image_features(pixel_values).float().cpu().numpy().astype(self.dtype))
        features = np.concatenate(chunks, axis=0)
        self._write_atomic(path, features)
        return np.load(path, mmap_mode="r")

    @torch.no_grad()
    def text_embeddings(self, texts) -> dict:
        """`{text: embedding}` (fp32 tensors, from the stored dtype) for the distinct `texts`."""
        distinct = sorted(set(str(t) for t in texts))
        key = hashlib.sha256("\n".join(distinct).encode()).hexdigest()[:16]
        path = self.cache_dir / f"text-{self.model_fingerprint}-{key}.npy"
        if not path.exists():
            device = self.model.align_tower.device
            chunks = []
            for start in range(0, len(distinct), self.batch_size):
                tokens = self.processor.tokenize_align_texts(distinct[start : start + self.batch_size])
                ids = torch.tensor(tokens["align_input_ids"], device=device)
                mask = torch.tensor(tokens["align_attention_mask"], device=device)
                chunks.append(self.model.get_text_features(ids, mask).float().cpu().numpy().astype(self.dtype))
            self._write_atomic(path, np.concatenate(chunks, axis=0))
        array = np.load(path)
        return {text: torch.from_numpy(array[i].astype(np.float32)) for i, text in enumerate(distinct)}


__all__ = [
    "SkinCLIPVLCollator", "FeatureCache", "stable_id", "augment_image", "count_align_truncations", "report_term_labels",
    "load_row_image", "image_content_fingerprint",
]
