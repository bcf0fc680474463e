#!/usr/bin/env bash
# The offline CPU demo: make a sample corpus from text already on this machine, train a tokenizer
# on it, then train a small (depth 4) model for a few minutes with val bpb reported as it falls.
# Everything lives under $NANOTRAIN_BASE_DIR (default ~/.cache/nanotrain).
set -euo pipefail
STEPS=${STEPS:-200}
nanotrain-data sample
nanotrain-data tokenizer --vocab-size 4096
nanotrain --device-type=cpu --depth=4 --max-seq-len=256 --window-pattern=L \
  --device-batch-size=8 --total-batch-size=8192 --num-iterations="$STEPS" \
  --eval-every=50 --eval-tokens=131072 --core-metric-every=-1 --sample-every="$STEPS" --overwrite "$@"
