#!/usr/bin/env bash
# Threshold sweep of the diffusion default (block 4, shift False) on HumanEval, greedy, beside the
# one-token-per-step setting ("none"). Resumable: rerun to continue. TPF and pass counts are deterministic;
# tokens/s depends on the machine's load.
# Usage: [STYLE=base|instruct] [THRESHOLDS="none 0.9 ..."] benchmarks/eval_default_sweep.sh [RUNS_DIR] [MODEL]
#        [extra eval flags, e.g. --limit 20]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-benchmarks/runs/default-sweep}
MODEL=${2:-smollm2}
shift 2 || shift $#
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=${PYTHONPATH:-src}
PY=${PYTHON:-.venv/bin/python}  # the venv scripts/setup.sh makes
STYLE=${STYLE:-base}
for th in ${THRESHOLDS:-none 0.95 0.9 0.8 0.7 0.5}; do
  "$PY" -m diffcoder.cli eval humaneval --model "$MODEL" --prompt-style "$STYLE" --block-length 4 --no-shift \
    --max-new-tokens 384 --batch-size 8 --workers 1 --no-progress --out "$RUNS/he-$STYLE-th-$th" --threshold "$th" "$@"
done
"$PY" -m diffcoder.cli compare "$RUNS"/he-"$STYLE"-th-*/ --plot "$RUNS/threshold-sweep-$STYLE.png"
