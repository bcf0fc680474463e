#!/usr/bin/env bash
# The d4 CPU measurement of benchmarks/RESULTS.md ("training (CPU)"): issue 4's settings on the offline
# sample corpus. Prints val bpb every 50 steps and tok/s each step. Pass --compile=on to measure compiled.
set -euo pipefail
nanotrain-data sample
nanotrain-data tokenizer --vocab-size 4096
nanotrain --device-type=cpu --depth=4 --max-seq-len=256 --window-pattern=L --device-batch-size=32 \
  --total-batch-size=8192 --num-iterations=300 --eval-every=50 --eval-tokens=131072 --core-metric-every=-1 \
  --sample-every=300 --model-tag=d4bench --compile=off --overwrite "$@"
