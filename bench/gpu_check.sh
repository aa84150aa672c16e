#!/usr/bin/env bash
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
#
# The GPU check of the paper configuration (docs/benchmarks.md, "Paper configuration at real width"):
#
#   bench/gpu_check.sh OUT_DIR            # run from anywhere; PYTHON=... to choose the interpreter
#
# 1. python -m bench.paper_config --device cuda --layers 28 at batch 8 (with the fresh-process reload and diagnose()) and at
#    batch 4 (training step only): OUT_DIR/paper_layers28_batch8.json, OUT_DIR/paper_layers28_batch4.json;
# 2. with more than one GPU: a 2-GPU DDP step (configs/accelerate/ddp.yaml) and a 2-GPU FSDP step with the 4-bit decoder
#    (configs/accelerate/fsdp.yaml; train.py stores the 4-bit weights in the compute dtype under FSDP) of train.py with
#    configs/paper.yaml on 2-layer real-width components: OUT_DIR/ddp/, OUT_DIR/fsdp/ (rank*_train.json, logs).
#
# Budget: 10 minutes on one H100/H200-class machine; each part has its own timeout so that one failure still leaves
# the others' JSON. OUT_DIR/summary.txt lists what ran and each exit status. The random-weight components are written
# on the GPU (fast) under OUT_DIR/components/ (28 layers: ~17 GB on disk).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$SUMMARY"
    return 0
}

n_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpus=$n_gpus $("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')")" | tee -a "$SUMMARY"
if [ "$n_gpus" -lt 1 ]; then
    echo "no CUDA device: nothing to check (the CPU mode is python -m bench.paper_config --layers 2)" | tee -a "$SUMMARY"
    exit 1
fi
"$PY" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$SUMMARY"

step components28 200 "$PY" -m tools.real_width_components "$OUT/components/layers28" --layers 28 --device cuda
step batch8 200 "$PY" -m bench.paper_config --device cuda --layers 28 --batch_size 8 --steps 2 \
    --components_dir "$OUT/components/layers28" --output_json "$OUT/paper_layers28_batch8.json"
step batch4 120 "$PY" -m bench.paper_config --device cuda --layers 28 --batch_size 4 --steps 2 --skip_reload \
    --components_dir "$OUT/components/layers28" --output_json "$OUT/paper_layers28_batch4.json"

if [ "$n_gpus" -gt 1 ]; then
    step components2 60 "$PY" -m tools.real_width_components "$OUT/components/layers2" --layers 2 --device cuda
    common=(train.py configs/paper.yaml --vision_model_name_or_path "$OUT/components/layers2/clip"
            --decoder_name_or_path "$OUT/components/layers2/decoder" --dataset_name synthetic
            --data_dir "$OUT/data" --synthetic_num_images 64 --max_steps 2 --per_device_train_batch_size 4
            --gradient_accumulation_steps 1 --eval_strategy no --save_strategy no --n_bootstrap 10
            --dataloader_num_workers 0 --disable_tqdm true)
    step ddp 120 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
        "${common[@]}" --output_dir "$OUT/ddp"
    step fsdp 120 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \
        "${common[@]}" --output_dir "$OUT/fsdp"
else
    echo "ddp skipped: one GPU" | tee -a "$SUMMARY"
fi
echo "done: $OUT" | tee -a "$SUMMARY"
