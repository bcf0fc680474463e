#!/usr/bin/env bash
# GPT-2 grade base model on one 8xH100 node: data, tokenizer, then depth-26 training with FP8.
# Set WANDB_RUN to log to Weights & Biases. Everything lives under $NANOTRAIN_BASE_DIR.
set -euo pipefail
NPROC=${NPROC:-8}
nanotrain-data download -n "${SHARDS:-240}"
nanotrain-data tokenizer
torchrun --standalone --nproc_per_node="$NPROC" -m nanotrain --depth=26 --fp8 --run="${WANDB_RUN:-dummy}" \
  --save-every=1000 --keep-last=3 "$@"
nanotrain-eval --model-tag d26 --eval core,bpb,sample
