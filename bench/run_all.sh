#!/usr/bin/env bash
# Smoke check of every benchmark: each bench/*.py (but the helper module benchlib.py) with
# --quick, stopping at the first failure. Each JSON result is checked to parse and kept in
# $CNNKIT_BENCH_DIR/quick/<name>.json. Figures from --quick runs are not measurements.
# Usage: bench/run_all.sh   (from anywhere; a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${CNNKIT_BENCH_DIR:-/tmp/cnnkit-bench}/quick
mkdir -p "$OUT"
for script in bench/*.py; do
    name=$(basename "$script" .py)
    [ "$name" = benchlib ] && continue
    echo "== $script --quick" >&2
    start=$SECONDS
    "$PY" "$script" --quick > "$OUT/$name.json"
    "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$OUT/$name.json"
    echo "   ok in $((SECONDS - start))s: $OUT/$name.json" >&2
done
echo "all benchmarks ran with --quick (smoke only; see bench/README.md)" >&2
