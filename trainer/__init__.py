# coding=utf-8
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Training-only code for SkinCLIP-VL: the CFA loss, the CFATrainer, its arguments, metrics, collator and callbacks."""

import configuration_skinclip_vl  # noqa: F401  (first: keeps bitsandbytes from fetching Hub kernels, see there)
