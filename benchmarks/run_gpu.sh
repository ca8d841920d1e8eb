#!/usr/bin/env bash
# The whole GPU run on a lent machine, in one command (benchmarks/README.md explains each stage):
#
#   bash benchmarks/run_gpu.sh                      # every stage, in this order:
#        setup info train bench tests memcheck racecheck
#   bash benchmarks/run_gpu.sh train bench          # only some stages (setup is always run first)
#
# Through the device tool (15 minutes of device time a session, the machine's start of a minute or two
# included; one command at most 10 minutes): ONE call, `run` with timeout_s 600 and the command
#   bash benchmarks/run_gpu.sh
# then give_back. With less device time left, set RUN_GPU_BUDGET_S to status's budget_left_s minus the
# start (~150 s) and a margin, or name fewer stages. Stage limits under $OUT (seconds): info 60, train 120,
# bench 210, tests 120, memcheck 45, racecheck 45 -- within the default budget of 570. A stage cut by its
# limit keeps what it measured (the kernel benchmark rewrites its JSON after every case), and $OUT is
# refreshed after every stage, so a run killed from outside still brings back the stages before.
#
# Each stage logs to its own file under benchmarks/results/<device>-<date>/logs/ and never stops the
# stages after it (set -u, no set -e). Every stage runs under `timeout`. The results (JSON, Markdown,
# PNG, logs) stay under benchmarks/results/ and, with $OUT set, are copied there: results.tar.gz
# (everything), summary.md, kernels.md, train.md, roofline.png, versions.png -- at most 8 files, as the
# device tool brings back.
#
# The kernels are compiled with Numba's on-disk cache (GPU_CNN_KERNEL_CACHE=1, NUMBA_CACHE_DIR a fresh
# folder per run), so the five Python processes compile each kernel once; setup falls back to no
# cache if a cached kernel fails to build.
#
# Environment: PYTHON (interpreter to use; default: the active venv, else the one that imports torch,
# e.g. the image's /opt/torch/.venv/bin/python3, else python3); PYTEST_ARGS (default
# "-v -rfE --ignore=tests/test_compile.py": -v so that a stage cut by its limit still names the tests
# it ran; not -x, so that one environment-dependent failure early in the alphabet does not hide every
# kernel test; the PTX/ptxas compile check needs no GPU and runs in CI); KERNELS_ARGS (extra options
# for benchmarks.kernels, e.g. "--quick"); TRAIN_ARGS; RUN_GPU_BUDGET_S.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
T0=$(date +%s)
ALL_STAGES="info train bench tests memcheck racecheck"
STAGES="${*:-$ALL_STAGES}"
STAGES=$(echo " $STAGES " | sed 's/ setup / /g')
if [ -n "${OUT:-}" ]; then  # a lease: every stage sized to fit one 10-minute call
  BUDGET=${RUN_GPU_BUDGET_S:-570}
  LIMIT_info=60 LIMIT_train=120 LIMIT_bench=210 LIMIT_tests=120 LIMIT_memcheck=45 LIMIT_racecheck=45
else                        # a GPU of your own: room for the full sweep and the whole suite
  BUDGET=${RUN_GPU_BUDGET_S:-100000}
  LIMIT_info=120 LIMIT_train=600 LIMIT_bench=1800 LIMIT_tests=1800 LIMIT_memcheck=900 LIMIT_racecheck=900
fi
PACK_RESERVE=20
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg GPU_CNN_KERNEL_CACHE=1
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$(mktemp -d /tmp/gpu_cnn_numba_cache.XXXXXX)}
unset NUMBA_ENABLE_CUDASIM

log() { echo "[run_gpu $(date +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }
remaining() { echo $(( BUDGET - ($(date +%s) - T0) - PACK_RESERVE )); }

# ---------------------------------------------------------------------------------------------- setup
# The GPU image has no network, and its Python (/opt/torch/.venv) already holds torch, cupy, numba,
# numba-cuda, pytest, matplotlib, scikit-learn: use it as it is. The project runs from this checkout
# (gpu_cnn finds ../kernels itself; PYTHONPATH for subprocesses); an editable install without
# dependencies, offline, adds the gpu-cnn command when it works. Elsewhere (network, no such Python)
# fall back to the README's install in a fresh venv.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if [ -n "${VIRTUAL_ENV:-}" ] && python -c "import numba.cuda" >/dev/null 2>&1; then echo python; return; fi
  for c in /opt/torch/.venv/bin/python3 python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then echo "$c"; return; fi
  done
  echo python3
}
BASE_PY=$(pick_python)
PY=$BASE_PY
SETUP_LOG=$(mktemp /tmp/run_gpu_setup.XXXXXX.log)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
setup() {
  if "$BASE_PY" -c "import numba, numba.cuda, numpy, matplotlib, pytest, sklearn, tqdm, PIL" >/dev/null 2>&1; then
    echo "$BASE_PY has every dependency: using it; offline editable install without dependencies (optional)"
    "$BASE_PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      || echo "editable install failed (fine: the project runs from the checkout via PYTHONPATH)"
  else
    echo "$BASE_PY lacks dependencies: the README's install in .venv-gpu (needs the package index)"
    local venv=$ROOT/.venv-gpu
    [ -x "$venv/bin/python" ] || "$BASE_PY" -m venv "$venv" || return 1
    PY=$venv/bin/python
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e ".[dev,cuda]" || return 1
    "$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q torch \
      || echo "torch not installed: no cuDNN/cuBLAS comparison"
  fi
  "$PY" -c "import gpu_cnn.kernels, benchmarks.kernels; print('import ok')" || return 1
  # the kernels are lazy: compile and launch one now, so a toolkit numba-cuda cannot use shows up here;
  # with the disk cache first, then without it
  local check="
import numpy as np
from numba import cuda
from gpu_cnn.kernels import _common
a = cuda.to_device(np.zeros(37, np.float32))
_common.fill(a, 1.5)
assert (a.copy_to_host() == 1.5).all(), 'fill kernel wrote wrong values'
print('kernel compile + launch ok on', cuda.get_current_device().name, '- disk cache:', _common.DISK_CACHE)"
  if ! "$PY" -c "$check"; then
    echo "kernel launch failed with the disk cache: trying without it"
    export GPU_CNN_KERNEL_CACHE=0
    "$PY" -c "$check" || return 1
  fi
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|cupy|numba|numpy|pytest|matplotlib|cuda)" || true
}
log "setup with $BASE_PY"
setup >"$SETUP_LOG" 2>&1
SETUP_RC=$?
# setup may have switched to the venv it made
[ -x "$ROOT/.venv-gpu/bin/python" ] && ! "$BASE_PY" -c "import numba.cuda" >/dev/null 2>&1 && PY=$ROOT/.venv-gpu/bin/python
log "setup exit $SETUP_RC (python: $PY)"

# where results go: benchmarks/results/<device slug>-<date>/ (the benchmarks' own default)
RESULTS=$("$PY" - <<'EOF' 2>/dev/null
import gpu_cnn
gpu_cnn.set_backend("cuda")
from benchmarks.common import default_out_dir, device_info
print(default_out_dir(device_info("cuda")))
EOF
)
[ -n "$RESULTS" ] || RESULTS=$ROOT/benchmarks/results/gpu-$(date +%F)
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
cp "$SETUP_LOG" "$LOGS/setup.log"
SUMMARY=$LOGS/summary.md
{
  echo "# GPU run $(date -Iseconds)"
  echo
  echo "Command: \`bash benchmarks/run_gpu.sh $*\` in $ROOT; python $PY; results $RESULTS"
  echo
  echo "| stage | exit | seconds | log |"
  echo "| --- | ---: | ---: | --- |"
  echo "| setup | $SETUP_RC | $(( $(date +%s) - T0 )) | logs/setup.log |"
} >"$SUMMARY"
nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || true

# ---------------------------------------------------------------------------------------------- pack
pack() {  # refresh $OUT (the device tool's output folder) with what the run has so far
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  tar -czf "$OUT/results.tar.gz" -C "$ROOT" "${RESULTS#$ROOT/}" 2>/dev/null \
    || tar -czf "$OUT/results.tar.gz" "$RESULTS"
  for f in "$SUMMARY" "$RESULTS/kernels.md" "$RESULTS/train.md" "$RESULTS/roofline.png" "$RESULTS/versions.png"; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
  return 0
}
pack

# ---------------------------------------------------------------------------------------------- stages
stage() {  # stage NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt 20 ]; then
    log "skip $name: only ${left}s of the budget left"
    echo "| $name | skipped (budget) | 0 | — |" >>"$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "stage $name (timeout ${limit}s): $*"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "[run_gpu] stage $name stopped by its ${limit}s timeout" >>"$LOGS/$name.log"
  log "stage $name exit $rc after $(( $(date +%s) - t ))s; last lines of logs/$name.log:"
  tail -n 8 "$LOGS/$name.log" | sed 's/^/    /'
  echo "| $name | $rc | $(( $(date +%s) - t )) | logs/$name.log |" >>"$SUMMARY"
  pack
}

find_sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /opt/nvidia/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
}
SANITIZER=$(find_sanitizer)

for s in $STAGES; do
  case $s in
    info)      stage info "$LIMIT_info" "$PY" -m gpu_cnn.cli info ;;
    tests)     stage tests "$LIMIT_tests" env GPU_CNN_BACKEND=cuda "$PY" -m pytest -p no:cacheprovider \
                 ${PYTEST_ARGS:--v -rfE --ignore=tests/test_compile.py} ;;
    memcheck)
      if [ -n "$SANITIZER" ]; then
        stage memcheck "$LIMIT_memcheck" "$SANITIZER" --tool memcheck --error-exitcode 3 --print-limit 100 "$PY" -m benchmarks.sanitize
      else log "no compute-sanitizer found: memcheck skipped"; echo "| memcheck | not found | 0 | — |" >>"$SUMMARY"; fi ;;
    racecheck)
      if [ -n "$SANITIZER" ]; then
        stage racecheck "$LIMIT_racecheck" "$SANITIZER" --tool racecheck --error-exitcode 3 --print-limit 100 "$PY" -m benchmarks.sanitize
      else log "no compute-sanitizer found: racecheck skipped"; echo "| racecheck | not found | 0 | — |" >>"$SUMMARY"; fi ;;
    bench)     stage bench "$LIMIT_bench" "$PY" -m benchmarks.kernels --backend cuda --out "$RESULTS" ${KERNELS_ARGS:-} ;;
    train)     stage train "$LIMIT_train" "$PY" -m benchmarks.train --backend cuda --out "$RESULTS" ${TRAIN_ARGS:-} ;;
    *)         log "unknown stage '$s' (stages: setup $ALL_STAGES)"; echo "| $s | unknown stage | 0 | — |" >>"$SUMMARY" ;;
  esac
done

# ---------------------------------------------------------------------------------------------- end
echo >>"$SUMMARY"
echo "Total $(( $(date +%s) - T0 )) s." >>"$SUMMARY"
pack
[ -n "${OUT:-}" ] && log "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"

# the reply of the device tool carries the end of the output: the short tables last
echo
[ -f "$RESULTS/kernels.md" ] && { echo "== kernels (first 60 rows; full table in kernels.md)"; grep '^|' "$RESULTS/kernels.md" | head -62; }
[ -f "$RESULTS/train.md" ] && { echo; echo "== train"; grep '^|' "$RESULTS/train.md"; }
echo
cat "$SUMMARY"
