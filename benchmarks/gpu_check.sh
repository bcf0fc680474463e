#!/usr/bin/env bash
# The plan for the lent GPU's minutes (issue 13 part 4; DESIGN.md "Testing and measuring on the lent GPU").
#
# A lent GPU comes with 15 minutes of device time in all, the machine's start (1-2 min) included, and at most
# 10 minutes per command. The plan is two calls of this script, each under a budget, so that both fit with
# minutes left to rerun a stage that failed:
#   call1 (budget 330 s)  setup: install without the extension | tests: the gpu tests of the three kernel families
#                         in bf16, autotune cut to one config per kernel (NANOTRAIN_AUTOTUNE=first) | checks: the
#                         kernel self-checks (`nanotrain --kernels --check`, tolerated where absent) | graph: graph
#                         breaks of a compiled d12 forward | bench: first timings against the peers (SDPA flash,
#                         FlexAttention at window 1025, torch._scaled_mm, the compiled Muon reference), one config
#   call2 (budget 300 s)  build: the C++/CUDA extension and its ahead-of-time kernels (nvcc, sm_90a, the compile
#                         dealt to MAX_JOBS processes) | ext-tests: its gpu tests (tests/test_aot*.py: the AOT
#                         kernels of attention, decode, Muon and FP8 bit for bit against Triton, first-call time) |
#                         train: 30 steps of d12 for tokens/s and MFU | bench: full autotune timings in what is left
#                         of the budget (rows kept as they come)
# 1.5 (start) + 5.5 + 5 = 12 minutes, leaving 3 to rerun a stage (`gpu_check.sh call2 train`).
#
# Before the calls, HERE (no GPU needed; the device has no internet and no rustbpe):
#   benchmarks/gpu_check.sh prepare        # .whl/ (rustbpe cp312 wheel) + .gpu_carry/base (corpus + tokenizer)
#   benchmarks/gpu_check.sh --dry-run call1 && benchmarks/gpu_check.sh --dry-run call2   # the whole plan on the CPU
# Then the two device calls (the commit is passed in: the device's copy of the tree has no git history):
#   run(command="NANOTRAIN_COMMIT=$(git rev-parse --short HEAD) benchmarks/gpu_check.sh call1",
#       carry=[".whl", ".gpu_carry"], timeout_s=420)
#   run(command="NANOTRAIN_COMMIT=<same> benchmarks/gpu_check.sh call2", carry=[".whl", ".gpu_carry"], timeout_s=380)
# (write the hash itself into the command: the device tool does not run `git` here). `make gpu-check-plan` prints
# both commands with the hash filled in.
#
# Results, all under $OUT (at most 8 files come back): stages.jsonl (one JSON line per stage: call, stage, status,
# seconds, detail, commit, device, date), results.jsonl (every benchmark row, common.Row), summary.txt (the tables
# printed last), and one <stage>.log per stage run. Every stage runs under `timeout` within the call's budget, so
# the summary is printed even when a stage runs out of time.
#
# Usage: benchmarks/gpu_check.sh [--dry-run] {call1|call2|prepare|list} [STAGE ...]
#   STAGE: run only these stages of the call (e.g. `call2 train`); list: print each call's stages.
# --dry-run (or DRY_RUN=1): run the plan end to end on a machine without CUDA: every stage runs, and what needs
#   CUDA is skipped by the tests and benchmarks themselves (as skipped rows) or here (said in the stage's detail);
#   installs are not done (an install with NANOTRAIN_NO_EXT=1 deletes this tree's built extension), the training
#   stage runs a tiny model, and the graph-break count a short sequence; limits and budget are DRY_SCALE (4) times
#   longer (a shared CPU is slower than the device machine's 16 cores).
# Knobs: PYTHON (python3), NANOTRAIN_COMMIT, OUT (default benchmarks/out/gpu_check/<call>), BUDGET (seconds of the call),
#   T_<STAGE> (a stage's limit, e.g. T_TRAIN=120), TRAIN_ARGS (extra nanotrain options), MAX_JOBS (16).
set -uo pipefail
cd "$(dirname "$0")/.."

# Stage limits are estimates (no stage has run on a GPU yet): torch.compile of the peers and of the model
# dominates bench and train. Limits are capped by what is left of the call's budget.
declare -A STAGES=([call1]="setup tests checks graph bench" [call2]="build ext-tests train bench")
declare -A LIMITS=([setup]=30 [tests]=110 [checks]=30 [graph]=30 [bench]=120 [build]=90 [ext-tests]=130 [train]=75)
declare -A BUDGETS=([call1]=330 [call2]=300)
KERNEL_TESTS="tests/ops/test_attention.py tests/ops/test_fp8.py tests/ops/test_newton_schulz.py"
CARRY=.gpu_carry

DRY_RUN=${DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
CALL=${1:-}
shift || true

case $CALL in
  list)
    for c in call1 call2; do echo "$c (budget ${BUDGETS[$c]} s): ${STAGES[$c]}"; done
    for s in "${!LIMITS[@]}"; do echo "limit $s ${LIMITS[$s]}"; done | sort
    exit 0 ;;
  prepare)
    PY=${PYTHON:-python3}
    mkdir -p .whl
    if ! ls .whl/rustbpe-*-cp312-*manylinux*x86_64*.whl >/dev/null 2>&1; then
      "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl rustbpe || exit 1
    fi
    ls .whl/rustbpe-*-cp312-*manylinux*x86_64*.whl || { echo "prepare: no cp312 manylinux x86_64 rustbpe wheel" >&2; exit 1; }
    "$PY" benchmarks/run.py prepare --base "$CARRY/base" || exit 1
    du -sh .whl "$CARRY"
    exit 0 ;;
  call1|call2) ;;
  *) echo "usage: $0 [--dry-run] {call1|call2|prepare|list} [STAGE ...]" >&2; exit 2 ;;
esac

RUN_STAGES=${*:-${STAGES[$CALL]}}
for s in $RUN_STAGES; do
  [[ " ${STAGES[$CALL]} " == *" $s "* ]] || { echo "$CALL has no stage '$s' (it has: ${STAGES[$CALL]})" >&2; exit 2; }
done

export OUT=${OUT:-$PWD/benchmarks/out/gpu_check/$CALL}
[ -z "$*" ] && rm -f "$OUT"/stages.jsonl "$OUT"/results.jsonl "$OUT"/*.log "$OUT"/summary.txt  # a whole call: fresh
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} GPU_CHECK_CALL=$CALL
export NANOTRAIN_RESULTS=$OUT/results.jsonl
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-${BUDGETS[$CALL]}}
SCALE=1
if [ "$DRY_RUN" = 1 ]; then  # a shared CPU runs the same steps several times slower than the device's 16 cores
  SCALE=${DRY_SCALE:-4}
  BUDGET=$(( BUDGET * SCALE ))
fi
START=$(date +%s)
if [ -z "${NANOTRAIN_COMMIT:-}" ]; then
  NANOTRAIN_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "gpu_check: NANOTRAIN_COMMIT not set; using $NANOTRAIN_COMMIT" >&2
fi
export NANOTRAIN_COMMIT

# wheels carried in .whl/ (rustbpe: the device has none; only where the wheel's python matches)
if ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY_RUN" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
GPU_CHECK_DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
export GPU_CHECK_DEVICE=${GPU_CHECK_DEVICE:-no GPU ($(uname -m))}
if [ "$DRY_RUN" = 0 ] && [ "$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)" != 1 ]; then
  echo "gpu_check: no CUDA device here; run with --dry-run to rehearse the plan on this machine" >&2
  exit 2
fi
echo "gpu_check $CALL: stages '$RUN_STAGES', budget ${BUDGET} s, commit $NANOTRAIN_COMMIT, $GPU_CHECK_DEVICE" \
  "$([ "$DRY_RUN" = 1 ] && echo '(DRY RUN: CUDA work skipped)')"

# -- one stage: run stage_<name> under the smaller of its limit and what is left of the budget; record the outcome -
run_stage() {
  local name=$1 fn="stage_${1//-/_}"
  local var="T_${name//-/_}"; var=${var^^}
  local limit=$(( ${!var:-${LIMITS[$name]}} * SCALE ))
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))  # 10 s kept for the summary
  if [ "$left" -lt 5 ]; then
    "$PY" benchmarks/run.py stage "$name" skipped 0 "no time left in the call's ${BUDGET} s budget"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=5 "$limit" bash -c "$fn" >"$OUT/$name.log" 2>&1
  local rc=$? status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout; elif [ $rc != 0 ]; then status=failed; fi
  tail -4 "$OUT/$name.log" | sed 's/^/   /'
  "$PY" benchmarks/run.py stage "$name" "$status" "$(( $(date +%s) - t0 ))" "$(describe_stage "$name" "$rc")"
}

# what a stage's log says in one line: the dry run's skips, pytest's counts, the benchmarks' row counts, the
# extension's status, else the log's last line
describe_stage() {
  local name=$1 rc=$2 log="$OUT/$1.log" line
  line=$(grep -E '[0-9]+ (passed|failed|skipped|error|deselected)' "$log" | tail -1 | tr -d '=' | xargs)
  [ -z "$line" ] && line=$(grep -E '^(bench [a-z0-9]+: |extension: |skipped: )' "$log" | tr '\n' ';' | sed 's/;$//')
  [ -z "$line" ] && line=$(grep -vE '^(DRY RUN|date: )' "$log" | tail -1)
  local dry; dry=$(grep -E '^DRY RUN' "$log" | head -1)
  echo "rc=$rc${line:+; ${line:0:160}}${dry:+; ${dry:0:120}}"
}

# -- the stages ---------------------------------------------------------------------------------------------------
stage_setup() {
  {
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "commit: $NANOTRAIN_COMMIT"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | head -3
    nvcc --version 2>&1 | tail -1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
              'cuda', torch.version.cuda, 'triton', triton.__version__)"
  }
  for w in .whl/*.whl; do
    [ -e "$w" ] || continue
    case $(basename "$w") in *cp312*manylinux*x86_64*|*py3-none-any*) echo "wheel ok: $(basename "$w")" ;;
      *) echo "wheel for another python or platform (the device runs cp312 x86_64): $(basename "$w")"; return 1 ;;
    esac
  done
  if [ -f "$CARRY/base/tokenizer/tokenizer.pkl" ]; then echo "carried corpus + tokenizer: $(du -sh "$CARRY" | cut -f1)"
  else echo "no $CARRY/base: run 'benchmarks/gpu_check.sh prepare' here first (the train stage needs it)"; fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: skipped 'NANOTRAIN_NO_EXT=1 pip install --no-build-isolation --no-deps -e .' (it would delete this tree's built extension)"
  else
    NANOTRAIN_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . || return 1
  fi
  "$PY" -c "from nanotrain.ops._ext import extension_status; print('extension:', extension_status())"
}

stage_tests() {
  # shellcheck disable=SC2086
  NANOTRAIN_AUTOTUNE=first "$PY" -m pytest -q -p no:cacheprovider -m gpu $KERNEL_TESTS -rs ${PYTEST_ARGS:-}
}

stage_checks() {
  if ! "$PY" -m nanotrain --help 2>/dev/null | grep -q -- "--check"; then
    echo "skipped: 'nanotrain --kernels --check' is not in this build"
    "$PY" -m nanotrain --kernels
    return 0
  fi
  NANOTRAIN_AUTOTUNE=first "$PY" -m nanotrain --kernels --check
}

stage_graph() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: d12 at T=64 on the CPU (T=2048 on the GPU)"
    NANOTRAIN_AUTOTUNE=first "$PY" benchmarks/run.py graph-breaks --depth 12 --seq-len 64
  else
    NANOTRAIN_AUTOTUNE=first "$PY" benchmarks/run.py graph-breaks --depth 12 --seq-len 2048
  fi
}

stage_bench() {
  if [ "$CALL" = call1 ]; then
    NANOTRAIN_AUTOTUNE=first "$PY" benchmarks/run.py bench --quick attention fp8 muon
  else
    "$PY" benchmarks/run.py bench attention fp8 muon
  fi
}

stage_build() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: skipped 'pip install --no-build-isolation --no-deps -e .' (nvcc for sm_80/sm_90a; minutes here)"
  else
    # sm_90a only: the H100/H200 needs no sm_80 cubins, and the ahead-of-time compile takes half the time
    NANOTRAIN_CUDA_ARCHES=${NANOTRAIN_CUDA_ARCHES:-90a} "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 \
      | grep -E "nanotrain setup|error|Error" || true
  fi
  "$PY" -c "from nanotrain.ops._ext import extension_status; print('extension:', extension_status())"
  "$PY" -c "from nanotrain.ops._ext import extension_status as s; import sys; sys.exit(not s().startswith('built'))"
}

stage_ext_tests() {
  # the AOT kernels of the three families against the Triton path's, which must run the same first configs
  NANOTRAIN_AUTOTUNE=first "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_extension.py tests/test_aot*.py \
    tests/ops/test_packing.py -rs
  local rc=$?
  if [ "$rc" = 5 ]; then  # pytest: no test collected
    echo "0 passed; skipped: no gpu-marked extension test was collected"; return 0
  fi
  return "$rc"
}

stage_train() {
  if [ ! -f "$CARRY/base/tokenizer/tokenizer.pkl" ]; then
    echo "no $CARRY/base/tokenizer: run 'benchmarks/gpu_check.sh prepare' here and carry $CARRY"; return 1
  fi
  local base=/tmp/nanotrain_gpu_check
  rm -rf "$base" && mkdir -p "$base" && cp -r "$CARRY/base/." "$base/"  # checkpoints and metrics go there
  if [ "$DRY_RUN" = 1 ]; then
    echo "DRY RUN: a tiny model on the CPU (d12 x 30 steps at T=2048 on the GPU)"
    # shellcheck disable=SC2086
    "$PY" benchmarks/run.py train --base "$base" --depth 2 --steps 3 -- --max-seq-len=64 --device-batch-size=2 \
      --total-batch-size=128 --compile=off ${TRAIN_ARGS:-}
  else
    # shellcheck disable=SC2086
    "$PY" benchmarks/run.py train --base "$base" --depth 12 --steps 30 -- --total-batch-size=131072 ${TRAIN_ARGS:-}
  fi
}

export -f stage_setup stage_tests stage_checks stage_graph stage_bench stage_build stage_ext_tests stage_train
export PY DRY_RUN CALL CARRY KERNEL_TESTS
for s in $RUN_STAGES; do
  run_stage "$s"
done

# -- the summary, last --------------------------------------------------------------------------------------------
{
  echo
  echo "== summary ($CALL, $(( $(date +%s) - START )) s of ${BUDGET} s$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN'))"
  "$PY" benchmarks/run.py summary --stages "$OUT/stages.jsonl" --results "$OUT/results.jsonl"
} | tee "$OUT/summary.txt"
grep -q '"status": "\(failed\|timeout\)"' "$OUT/stages.jsonl" && exit 1
exit 0
