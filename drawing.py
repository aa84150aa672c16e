# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Drawing of SkinCLIP-VL explanation maps: heatmap colouring, overlays on the input image, and the diagnosis panel.

Used by `predict.py`, `bench/` and the web demo. Not remote code: a saved model needs none of it (the heatmaps
themselves come from `SkinCLIPVLProcessor.post_process_diagnosis`).
"""

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def heatmap_to_rgb(heatmap: np.ndarray) -> np.ndarray:
    """A jet-like colour map of a [0, 1] (H, W) heatmap -> (H, W, 3) uint8 (blue = low, red = high)."""
    x = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3.0, 2.0, 1.0)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay_heatmap(image, heatmap: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Blend a heatmap (same size as `image`) over an RGB PIL image; opacity grows with the heat."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != heatmap.shape:
        raise ValueError(f"Heatmap {heatmap.shape} and image {base.shape[:2]} sizes differ (height, width).")
    weight = (opacity * np.clip(np.nan_to_num(heatmap), 0, 1))[..., None]
    blended = base * (1 - weight) + heatmap_to_rgb(heatmap).astype(np.float32) * weight
    return Image.fromarray(blended.round().astype(np.uint8))


def render_diagnosis_panel(image, diagnosis, tile: int = 224, max_terms: int = 4) -> Image.Image:
    r"""
    One PNG-ready panel: the image, the focal map, Grad-CAM (if computed) and up to `max_terms` term maps, captioned,
    above a line with the prediction, its confidence and the malignancy score.

    Args:
        image (`PIL.Image.Image`): the input image (the heatmaps' size).
        diagnosis (`Diagnosis`): one result of `model.diagnose` / `processor.post_process_diagnosis`.
        tile (`int`, *optional*, defaults to 224): side of each tile in pixels.
        max_terms (`int`, *optional*, defaults to 4): at most this many grounded-term tiles.
    """
    image = image.convert("RGB")
    tiles = [("input", image)]
    if diagnosis.focal_map is not None:
        tiles.append(("focal map", overlay_heatmap(image, diagnosis.focal_map)))
    if diagnosis.grad_cam is not None:
        tiles.append(("Grad-CAM", overlay_heatmap(image, diagnosis.grad_cam)))
    for term in diagnosis.grounded_terms[:max_terms]:
        tiles.append((term.term, overlay_heatmap(image, term.heatmap)))
    footer = (f"{diagnosis.prediction} ({diagnosis.confidence:.2f})  malignancy {diagnosis.malignancy_score:.2f}"
              + "".join(f"  WARNING: {warning}" for warning in diagnosis.warnings))
    footer_lines = textwrap.wrap(footer, width=max(20, tile * len(tiles) // 6))[:6]
    caption_h, footer_h = 16, 6 + 12 * len(footer_lines)
    panel = Image.new("RGB", (tile * len(tiles), tile + caption_h + footer_h), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for i, (name, picture) in enumerate(tiles):
        scale = tile / max(picture.size)
        shown = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
        panel.paste(shown, (i * tile + (tile - shown.width) // 2, caption_h + (tile - shown.height) // 2))
        draw.text((i * tile + 4, 2), name[:34], fill=(0, 0, 0))
        if name not in ("input",):
            term = next((t for t in diagnosis.grounded_terms if t.term == name), None)
            peak = term.peak if term is not None else None
            if peak is not None:
                px = i * tile + (tile - shown.width) // 2 + peak[0] * scale
                py = caption_h + (tile - shown.height) // 2 + peak[1] * scale
                draw.ellipse((px - 4, py - 4, px + 4, py + 4), outline=(255, 255, 255), width=2)
    for row, line in enumerate(footer_lines):
        draw.text((4, tile + caption_h + 3 + 12 * row), line, fill=(0, 0, 0))
    return panel


__all__ = ["heatmap_to_rgb", "overlay_heatmap", "render_diagnosis_panel"]
