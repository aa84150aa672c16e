#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""The demo's components: tiny random CLIP + Qwen2.5-VL checkpoints (tools/tiny_components.py)."""

from pathlib import Path

from tools.tiny_components import write_tiny_components


def ensure_demo_components(root) -> dict:
    root = Path(root)
    paths = {"vision": str(root / "clip"), "decoder": str(root / "decoder")}
    if not (Path(paths["vision"]) / "config.json").exists() or not (Path(paths["decoder"]) / "config.json").exists():
        paths = write_tiny_components(root, seed=0)
    return paths
