#!/usr/bin/env bash
# AR baseline of the embedded default (SmolLM2-135M-Instruct, causal attention + KV cache, greedy) on
# HumanEval (164) and MBPP sanitized (427), base and instruct prompts. Resumable: rerun to continue.
# Usage: benchmarks/eval_ar_baseline.sh [RUNS_DIR] [extra eval flags, e.g. --limit 40]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-benchmarks/runs}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=${PYTHONPATH:-src}
PY=${PYTHON:-.venv/bin/python}  # the venv scripts/setup.sh makes
for bench in humaneval mbpp; do
  for style in base instruct; do
    "$PY" -m diffcoder.cli eval "$bench" --ar --prompt-style "$style" --batch-size 8 --max-new-tokens 384 \
      --workers 1 --no-progress --out "$RUNS/ar-$bench-$style" "$@"
  done
done
"$PY" -m diffcoder.cli compare "$RUNS"/ar-*/ --plot "$RUNS/ar-baseline.png"
