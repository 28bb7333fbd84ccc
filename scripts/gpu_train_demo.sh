#!/usr/bin/env bash
# Train the embedded zfnet-demo model on a GPU machine (no network needed) and bring it back through $OUT.
#
#   bash scripts/gpu_train_demo.sh          # from the repository root; 8 minutes at most (ZFSERVE_TRAIN_BUDGET_S)
#
# Steps: install the checkout (--no-deps: the GPU image has torch, numpy, pillow, safetensors), render the
# synthetic training set on all CPU cores, train with `zfserve train` under a time budget, record the
# feature evolution, package the run as zfnet-demo (float16, config with provenance, filters.png) with its
# held-out evaluation (seed 3, n 1000), and tar + split the model directory into pieces small enough for
# $OUT (16 MiB per file). Locally: cat zfnet-demo.tar.part-* | tar -x -C zfserve/models
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${ZFSERVE_TRAIN_BUDGET_S:-480}   # the whole script; training gets what the other steps leave
PY=${PYTHON:-python3}
WORK=${ZFSERVE_TRAIN_WORK:-/tmp/zfserve-demo}
CPUS=$(nproc)
DEVICE=${ZFSERVE_TRAIN_DEVICE:-cuda}
# Extra `zfserve train` flags, appended so they override the ones below (the local smoke test uses tiny ones).
read -r -a EXTRA <<<"${ZFSERVE_TRAIN_ARGS:-}"
export PYTHONUNBUFFERED=1
rm -rf "$WORK" && mkdir -p "$WORK"
log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$OUT/train_demo.log"; }

log "install"
if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . >>"$OUT/train_demo.log" 2>&1; then
    # Fallback: a package tree of links (the repository maps kernels/ to zfserve.kernels).
    log "pip install failed; importing from a linked tree"
    mkdir -p "$WORK/path/zfserve"
    for entry in "$PWD"/zfserve/*; do ln -s "$entry" "$WORK/path/zfserve/"; done
    ln -s "$PWD/kernels" "$WORK/path/zfserve/kernels"
    export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import zfserve.train, zfserve.kernels; print('zfserve imports from', zfserve.__file__)" 2>&1 | tee -a "$OUT/train_demo.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/train_demo.log"
# Reserve ~100 s after training (evolution: 8 snapshots x 55 probes; packaging; held-out eval; tar) and
# ~50 s to render the 30,000 training images on all cores.
LEFT=$((BUDGET - ($(date +%s) - START) - 100 - 50))
MINUTES=$(awk "BEGIN {print $LEFT / 60}")
log "train for at most $MINUTES min of epochs"
CMD=("$PY" -m zfserve.cli train --data synthetic --out "$WORK/run" --device "$DEVICE" --amp bf16
     --optimizer adam --lr 1e-3 --warmup-steps 200 --init scaled --batchnorm --tied-fc6 --dropout 0
     --erase 0.5 --conv1-weight-decay 5
     --batch-size 128 --fc-width 512
     --train-seed 1 --train-n 30000 --val-seed 2 --val-n 1000 --seed 0 --epochs 60 --plateau-patience 2
     --max-minutes "$MINUTES" --workers "$CPUS" --evolution "${EXTRA[@]}")
timeout -k 10 $((BUDGET - ($(date +%s) - START) - 60)) "${CMD[@]}" >>"$OUT/train_demo.log" 2>&1
log "train exit $?"
timeout -k 10 $((BUDGET - ($(date +%s) - START) - 10)) "$PY" scripts/package_demo.py "$WORK/run" \
    "$WORK/zfnet-demo" --device "$DEVICE" --workers "$CPUS" --eval-n "${ZFSERVE_EVAL_N:-1000}" 2>&1 | tee -a "$OUT/train_demo.log"
log "package exit ${PIPESTATUS[0]}"
cp "$WORK/zfnet-demo/eval.json" "$OUT/eval.json" 2>/dev/null
tar -C "$WORK" -cf - zfnet-demo | split -b 15M - "$OUT/zfnet-demo.tar.part-"
ls -l "$OUT" | tee -a "$OUT/train_demo.log"
log "done"
