#!/usr/bin/env bash
# The GPU image's Python software, rehearsed on this CPU machine (issue 13 part 3; `make gpu-rehearsal`, not CI).
#
# The lent GPU runs python3.12 with torch 2.11.0+cu130 and triton 3.6.0; development and CI run newer releases.
# Triton's Python API moves between releases (ASTSource, GPUTarget, compile options, metadata fields), and a
# difference found in the GPU minutes costs those minutes. This script builds a python3.12 venv with the GPU
# image's exact torch and triton in .rehearsal/ (ignored by git), installs nanotrain into it without the
# extension (from a copy of the working tree), and runs there:
#   interp   the interpreter tests of the three kernel families (TRITON_INTERPRET=1, not slow, not gpu);
#   aot      the slow-marked ahead-of-time compiles of every kernel for sm_90a / sm_80 (kernels/_compile.py),
#            which go through triton 3.6's real compiler and ptxas: the API differences show up here;
#   build    the GPU plan's build stage as the device runs it (call2): the extension against torch 2.11's headers
#            with nvcc, its ahead-of-time kernels compiled by triton 3.6 for sm_90a (kernels/_aot.py, every
#            VARIANTS entry), then the table read back from the built library. Needs nvcc; minutes.
# The first run downloads torch (a CUDA build, several GB) and takes minutes; later runs reuse the venv.
#
#   benchmarks/gpu_rehearsal.sh             # venv (once) + both stages
#   benchmarks/gpu_rehearsal.sh aot         # one stage
# Knobs: PY312 (the python3.12 to build the venv from), REHEARSAL_DIR (.rehearsal), TORCH_VERSION (2.11.0),
# TRITON_VERSION (3.6.0), PYTEST_ARGS (extra pytest options, e.g. "-x -k sym").
# The result (pass/fail counts and seconds per stage) is printed last and written to $REHEARSAL_DIR/result.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${REHEARSAL_DIR:-.rehearsal}
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
STAGES=${*:-interp aot build}
FILES="tests/ops/test_attention.py tests/ops/test_newton_schulz.py tests/ops/test_fp8.py"
case $DIR in /*) ;; *) DIR=$PWD/$DIR ;; esac
PY=$DIR/bin/python

find_py312() {
  if [ -n "${PY312:-}" ]; then echo "$PY312"; return; fi
  for p in python3.12 "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)"; do
    # pyenv's shim exists even when 3.12 is not the active version: ask it to run
    if [ -n "$p" ] && "$p" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      command -v "$p"; return
    fi
  done
}

if ! "$PY" -c "import torch, triton, numpy, sys; assert torch.__version__.split('+')[0] == '$TORCH_VERSION' \
    and triton.__version__ == '$TRITON_VERSION' and tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4)" 2>/dev/null; then
  base=$(find_py312)
  if [ -z "$base" ]; then
    echo "gpu-rehearsal: no python3.12 found; install one or set PY312=/path/to/python3.12" >&2
    exit 2
  fi
  echo "gpu-rehearsal: building $DIR from $base with torch==$TORCH_VERSION triton==$TRITON_VERSION (minutes)"
  [ -x "$PY" ] || "$base" -m venv "$DIR" || exit 2
  # nanotrain's runtime deps that the tests import, the GPU image's torch/triton, pytest; setuptools for the
  # editable install below (--no-build-isolation: pyproject pins the development torch as a build requirement).
  # numpy < 2.4: triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 refuses
  # ("only 0-dimensional arrays can be converted"); the GPU does not run the interpreter, so this pin only
  # keeps the CPU rehearsal of the interpreter tests meaningful.
  "$PY" -m pip install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy<2.4" pyarrow tiktoken pyyaml \
    pytest setuptools wheel || exit 2
fi

# The tests run on a copy of the working tree (tracked and untracked-not-ignored files, as the device gets it):
# installing with NANOTRAIN_NO_EXT=1 removes an in-place nanotrain/_C*.so, which must not happen to this tree.
SRC=$DIR/src
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$SRC" \
  || { echo "gpu-rehearsal: could not copy the working tree (is this a git checkout?)" >&2; exit 2; }
if ! (cd / && "$PY" -c "import nanotrain.kernels, sys; sys.exit(not nanotrain.__file__.startswith('$SRC/'))") \
    2>/dev/null; then
  # no deps (pyproject pins the development torch), no extension (the device's first call installs it this way)
  (cd "$SRC" && NANOTRAIN_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .) || exit 2
fi
"$PY" -c "import sys, torch, triton, numpy; print('gpu-rehearsal: python', sys.version.split()[0], 'torch',
      torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"

# a private Triton cache, emptied each run: every kernel compiles fresh under triton 3.6 (a cached binary, or one
# cached by another Triton release sharing ~/.triton, could hide a compile that fails)
export TRITON_CACHE_DIR=$DIR/triton_cache
rm -rf "$TRITON_CACHE_DIR"

RESULT=$DIR/result.txt
: >"$RESULT"
status=0
for stage in $STAGES; do
  case $stage in
    interp) marks="not slow and not gpu" ;;
    aot) marks="slow" ;;
    build) marks="" ;;
    *) echo "gpu-rehearsal: unknown stage '$stage' (interp, aot, build)" >&2; exit 2 ;;
  esac
  t0=$(date +%s)
  if [ "$stage" = build ]; then
    # as benchmarks/gpu_check.sh stage_build on the device (sm_90a only), then the cubins the library embeds
    (cd "$SRC" && NANOTRAIN_CUDA_ARCHES=90a MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation --no-deps \
      -e . 2>&1 | grep -E "nanotrain setup|AOT kernels|error|Error"
     "$PY" -c "
import sys, kernels._aot as aot
from nanotrain.ops import _ext
status, table = _ext.extension_status(), _ext.aot_table()
print('extension:', status)
want = len(aot.entries_for('90a'))
print(f'{len(table)} cubins embedded for sm_90a, {want} VARIANTS entries built for it')
sys.exit(not (status.startswith('built with CUDA') and len(table) == want))") 2>&1 | tee "$DIR/$stage.log"
    rc=${PIPESTATUS[0]}
  else
    # shellcheck disable=SC2086
    (cd "$SRC" && "$PY" -m pytest -q -p no:cacheprovider -m "$marks" ${PYTEST_ARGS:-} $FILES) 2>&1 | tee "$DIR/$stage.log"
    rc=${PIPESTATUS[0]}
  fi
  [ "$rc" = 0 ] || status=1
  counts=$(grep -E '^=* ?[0-9]+ (passed|failed|error|skipped|deselected)|cubins embedded' "$DIR/$stage.log" | tail -1 \
    | tr -d '=' | xargs)
  echo "$stage | rc=$rc | $(( $(date +%s) - t0 )) s | ${counts:-no pytest summary}" >>"$RESULT"
done
echo
echo "gpu-rehearsal (torch $TORCH_VERSION, triton $TRITON_VERSION, python3.12):"
cat "$RESULT"
exit $status
