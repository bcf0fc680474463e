#!/usr/bin/env bash
# The one script for a lent GPU (DESIGN.md, "Testing and measuring on the lent GPU"): install nanotrain and
# build nanotrain._C, run the gpu-marked tests, run the benchmarks, measure training throughput, and print a
# short summary table last. Logs and results go to $OUT (at most 8 files come back from the device machine).
#
#   benchmarks/gpu_check.sh                 # every stage
#   benchmarks/gpu_check.sh build tests     # some stages (build is needed once per fresh machine)
#
# The device image (python3.12, torch 2.11+cu130) has no internet. Carry missing wheels (rustbpe, for the
# tokenizer of the training stage) in .whl/ (ignored by git) and name `.whl` in the call's carry; made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl rustbpe
# Knobs: PYTHON (python3), MAX_JOBS (16), T_BUILD/T_TESTS/T_BENCH/T_TRAIN (stage time limits in seconds),
# TRAIN_ARGS (extra options for the training measurement), BENCH (pytest selection, default: benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
STAGES=${*:-build tests bench train}
SUMMARY=$(mktemp)
: >"$SUMMARY"
row() { echo "| $1 | $2 | $3 | $4 |" >>"$SUMMARY"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - $1 )); }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if has build; then
  t0=$(date +%s)
  timeout "${T_BUILD:-200}" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
  rc=$?
  status=$("$PY" -c "from nanotrain.ops._ext import extension_status; print(extension_status())" 2>>"$OUT/build.log")
  grep "nanotrain setup" "$OUT/build.log"
  echo "extension: $status"
  row build "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" "$(elapsed "$t0") s" "$status"
  {
    echo; echo "nanotrain --kernels:"
    "$PY" -m nanotrain --kernels 2>&1 || "$PY" -c "from nanotrain.train import print_kernel_table; print_kernel_table()"
  } >>"$OUT/build.log" 2>&1
fi

if has tests; then
  t0=$(date +%s)
  timeout "${T_TESTS:-120}" "$PY" -m pytest -m gpu tests -q -p no:cacheprovider >"$OUT/tests.log" 2>&1
  rc=$?
  tail -15 "$OUT/tests.log"
  row "gpu tests" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" "$(elapsed "$t0") s" \
    "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/tests.log" | tail -1 | tr -d '=' | xargs)"
fi

if has bench; then
  t0=$(date +%s)
  # the device's measured ceilings first: every "% of limit" refers to them
  timeout 60 "$PY" - >"$OUT/bench.log" 2>&1 <<'EOF'
import sys; sys.path.insert(0, "benchmarks")
import common
print(f"limits: bf16 matmul {common.matmul_peak_tflops():.0f} TFLOP/s, copy {common.copy_bandwidth_gbs():.0f} GB/s")
EOF
  # shellcheck disable=SC2086
  timeout "${T_BENCH:-150}" "$PY" -m pytest ${BENCH:-benchmarks} -q -p no:cacheprovider >>"$OUT/bench.log" 2>&1
  rc=$?
  row benchmarks "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" "$(elapsed "$t0") s" \
    "$(grep '^limits:' "$OUT/bench.log" | cut -c9-)"
fi

if has train; then
  t0=$(date +%s)
  export NANOTRAIN_BASE_DIR=${NANOTRAIN_BASE_DIR:-/tmp/nanotrain_base}
  # shellcheck disable=SC2086
  timeout "${T_TRAIN:-150}" "$PY" - ${TRAIN_ARGS:-} >"$OUT/train.log" 2>&1 <<'EOF'
import sys
from nanotrain.data.cli import main as data
from nanotrain.train import main as train
assert data(["sample"]) == 0 and data(["tokenizer", "--vocab-size", "8192"]) == 0
sys.exit(train(["--depth=12", "--num-iterations=30", "--eval-every=1000", "--eval-tokens=524288",
                "--core-metric-every=-1", "--sample-every=-1", "--save-every=-1", *sys.argv[1:]]))
EOF
  rc=$?
  last=$(grep -iE 'tok/s|tok_per_sec|mfu' "$OUT/train.log" | tail -1 | cut -c1-150)
  row "train d12 x30" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" "$(elapsed "$t0") s" "${last:-no step line}"
  tail -5 "$OUT/train.log"
fi

# the summary, last: stages, then every benchmark row
{
  echo
  echo "| stage | result | time | detail |"
  echo "|---|---|---|---|"
  cat "$SUMMARY"
  if [ -f "$OUT/bench_results.json" ]; then
    echo
    "$PY" - "$OUT/bench_results.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{'bench':<10} {'case':<44} {'provider':<18} {'ms':>9} {'rate':>16} {'%lim':>5} {'vs peer':>8}")
for r in rows:
    rate = f"{r['rate']:.4g} {r['unit']}" if r["unit"] else "-"
    pct = f"{r['pct_of_limit']:.0f}" if r["pct_of_limit"] is not None else "-"
    peer = f"{r['vs_peer']:.2f}x" if r["vs_peer"] is not None else "-"
    print(f"{r['bench']:<10} {r['case'][:44]:<44} {r['provider'][:18]:<18} {r['time_ms']:>9.4g} {rate:>16} {pct:>5} {peer:>8}")
EOF
  fi
} | tee -a "$OUT/summary.txt"
