#!/usr/bin/env bash
# Run both fuzz harnesses for RUNS executions each (default 100000) on seed corpora, and print their final
# libFuzzer statistics (executions, coverage, corpus) and any crash files. Needs the `fuzz` extra:
#   .venv/bin/pip install -e '.[fuzz]'
#   bash fuzz/run.sh 100000
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100000}
PY=${PYTHON:-.venv/bin/python}
OUT=fuzz/out
mkdir -p "$OUT"
"$PY" fuzz/seeds.py fuzz/corpus
status=0
for harness in decoder requests; do
  mkdir -p "$OUT/$harness"
  echo "== $harness: $RUNS runs"
  # -artifact_prefix keeps any crashing input; -print_final_stats gives executions and coverage.
  if ! "$PY" "fuzz/$harness.py" "fuzz/corpus/$harness" -runs="$RUNS" -print_final_stats=1 \
      -artifact_prefix="$OUT/$harness/" -rss_limit_mb=4096 > "$OUT/$harness.log" 2>&1; then
    status=1
  fi
  grep -E "^(#[0-9]+\s+DONE|stat::|Done [0-9]+ runs)" "$OUT/$harness.log" | tail -8 || true
  ls "$OUT/$harness" | sed "s/^/  crash: /" || true
done
exit $status
