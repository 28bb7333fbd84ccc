#!/usr/bin/env bash
# The one prepared script for a GPU machine (H100/H200, no network needed): install the project, run the GPU tests
# and the GPU benchmarks of the whole suite, and leave logs, JSON and a markdown table in $OUT.
#
#   bash benchmarks/gpu/run.sh            # from the repository root; about 7.5 minutes at most
#
# Every step runs under a timeout taken from one overall budget (ZFSERVE_GPU_BUDGET_S, default 450 s),
# most important first, so a slow step cuts the ones after it instead of the whole run. Kernel benchmark
# cases append to $OUT/kernels.jsonl as they finish, so a step cut short keeps what it measured.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
BUDGET=${ZFSERVE_GPU_BUDGET_S:-450}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export ZFSERVE_BENCH_JSONL="$OUT/kernels.jsonl"
# A test file whose imports are missing there (captum, tritonclient...) must not stop the others.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors)

step() {  # step NAME MAX_SECONDS COMMAND...
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((left < max ? left : max))
    if ((limit < 20)); then
        echo "== skipped $name: ${left}s of the budget left" | tee -a "$LOG"
        return 0
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >"$OUT/step.txt" 2>&1
    local rc=$?
    cat "$OUT/step.txt" >>"$LOG"
    tail -n 6 "$OUT/step.txt"
    echo "== $name: exit $rc at $(($(date +%s) - START))s" | tee -a "$LOG"
}

step install 90 "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e .
step environment 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
    --format=csv; $PY -c 'import torch, triton, sys; print(sys.version.split()[0], torch.__version__, \
    torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; \
    $PY -c 'import onnxruntime as o; print(\"onnxruntime\", o.__version__, o.get_available_providers())'"
# Compile every kernel variant in parallel first (a cold machine would compile them one by one below).
step warm-cache 120 "$PY" benchmarks/gpu/warm_cache.py
# The interpreter tests, now compiled for the GPU (tiny shapes, every autotune candidate), then the
# gpu-marked tests of the whole suite.
step kernel-tests 120 "${PYTEST[@]}" tests/test_kernels.py -m "not gpu"
step gpu-tests 150 "${PYTEST[@]}" -m gpu tests/
# Acceptance cases first: fused conv1 vs eager, unpool vs max_unpool2d / aten backward, every batch/dtype.
step bench-kernels 150 "${PYTEST[@]}" benchmarks/test_kernels.py -k "eager or unpool" \
    --benchmark-json "$OUT/bench-kernels.json"
step bench-suite 120 "${PYTEST[@]}" -m gpu benchmarks/ --ignore=benchmarks/test_kernels.py \
    --benchmark-json "$OUT/bench-suite.json"
step bench-compile 150 "${PYTEST[@]}" benchmarks/test_kernels.py -k "(compile or max_autotune) and b256" \
    --benchmark-json "$OUT/bench-compile.json"
step bench-compile-rest 120 "${PYTEST[@]}" benchmarks/test_kernels.py -k "compile and not b256" \
    --benchmark-json "$OUT/bench-compile-rest.json"
rm -f "$OUT/step.txt"
"$PY" benchmarks/gpu/summarize.py "$OUT" | tee "$OUT/summary.md"
