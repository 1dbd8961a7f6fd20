#!/usr/bin/env bash
# Issue 13 measurements: CRUXEval-O/-I and HumanEval infilling, greedy, base prompts.
#   - CRUXEval: the diffusion default (smollm2) at one token per step (--threshold none) and at its checkpoint
#     threshold, beside the AR origin (--ar: smollm2-ar, causal + KV cache).
#   - HumanEval infilling, every split: FIM infilling where the checkpoint has FIM tokens (the script checks; the
#     provisional shipped default has none, so those rows are n/a), and the prefix-only baseline (left-to-right
#     completion of the prefix, cut where the suffix begins, suffix appended) at both settings.
# Then one Markdown table (pass@1, tokens/s, tokens per forward) into benchmarks/results/issue13/.
# Resumable: rerun the same command to continue. pass counts and TPF are deterministic; tokens/s depends on load.
# Usage: [CRUX_LIMIT=100] [INFILL_N=164] [INFILL_N_LIGHT=N] [SPLITS="random-span-light ..."] [SETTINGS="none ckpt"]
#        benchmarks/eval_issue13.sh [RUNS_DIR] [MODEL] [extra eval flags]
#   CRUX_LIMIT: the first N CRUXEval tasks; INFILL_N: that many tasks spread evenly over each larger infilling
#   split; INFILL_N_LIGHT: the first N of random-span-light (default INFILL_N); SETTINGS: `none` (one token per step) and/or
#   `ckpt` (the checkpoint's threshold). TABLE_ONLY=1: only write the table of the runs finished so far.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/issue13}
MODEL=${2:-smollm2}
shift 2 || shift $#
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=${PYTHONPATH:-src}
PY=${PYTHON:-.venv/bin/python}  # the venv scripts/setup.sh makes
CRUX_LIMIT=${CRUX_LIMIT:-100}
INFILL_N=${INFILL_N:-164}
INFILL_N_LIGHT=${INFILL_N_LIGHT:-$INFILL_N}  # random-span-light (164 gaps, one per task) may be run in full
SPLITS=${SPLITS:-random-span-light single-line multi-line random-span}
SETTINGS=${SETTINGS:-none ckpt}
OUT=benchmarks/results/issue13
mkdir -p "$RUNS" "$OUT"
COMMON=(--batch-size 8 --workers 1 --no-progress)

eval_run() {  # eval_run RUN_NAME ARGS...: one resumable run, its command logged
  local name=$1; shift
  echo "diffcoder eval $* --out $RUNS/$name ${COMMON[*]} $EXTRA" >> "$RUNS/commands.txt"
  "$PY" -m diffcoder.cli eval "$@" --out "$RUNS/$name" "${COMMON[@]}" "${EXTRA_ARGS[@]}" \
    || echo "run $name failed (rerun to resume)" >&2
}
EXTRA_ARGS=("$@")
EXTRA="$*"
threshold_flags() { [ "$1" = none ] && echo "--threshold none" || true; }  # ckpt: the checkpoint's own
[ -n "${TABLE_ONLY:-}" ] || : > "$RUNS/commands.txt"

[ -n "${TABLE_ONLY:-}" ] || for task in output input; do
  for s in $SETTINGS; do
    # shellcheck disable=SC2046
    eval_run "crux-$task-diff-$s" cruxeval --task "$task" --model "$MODEL" --limit "$CRUX_LIMIT" \
      --max-new-tokens 48 $(threshold_flags "$s")
  done
  eval_run "crux-$task-ar" cruxeval --task "$task" --ar --limit "$CRUX_LIMIT" --max-new-tokens 48
done

HAS_FIM=$("$PY" - "$MODEL" <<'PY'
import sys
from diffcoder.checkpoint import load_tokenizer
from diffcoder.fim import find_fim_tokens
from diffcoder.pull import resolve_model
print("yes" if find_fim_tokens(load_tokenizer(resolve_model(sys.argv[1]))) else "no")
PY
) || HAS_FIM=no
[ -n "${TABLE_ONLY:-}" ] || for split in $SPLITS; do
  pick=(--spread "$INFILL_N"); [ "$split" = random-span-light ] && pick=(--limit "$INFILL_N_LIGHT")
  for s in $SETTINGS; do
    # shellcheck disable=SC2046
    eval_run "infill-$split-prefix-only-$s" humaneval-infilling --split "$split" --model "$MODEL" --prefix-only \
      "${pick[@]}" --max-new-tokens 96 $(threshold_flags "$s")
    if [ "$HAS_FIM" = yes ]; then
      # shellcheck disable=SC2046
      eval_run "infill-$split-fim-$s" humaneval-infilling --split "$split" --model "$MODEL" "${pick[@]}" \
        --max-new-tokens 96 $(threshold_flags "$s")
    fi
  done
done

{
  echo "# Issue 13: CRUXEval and HumanEval infilling ($(date -u +%Y-%m-%d), $(nproc --all) CPU cores, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
  echo
  echo "Subset: CRUXEval the first $CRUX_LIMIT tasks of 800; infilling the first $INFILL_N_LIGHT of random-span-light's"
  echo "164 and $INFILL_N spread evenly over each other split. Greedy, base prompts, batch 8."
  echo "Settings (the run name's last part): \`none\` one token per step (--threshold none); \`ckpt\` the checkpoint's threshold."
  if [ "$HAS_FIM" = yes ]; then
    echo "FIM rows: the model's fill-in-the-middle tokens, prefix and suffix in the prompt."
  else
    echo "FIM infilling: n/a, $MODEL has no FIM tokens (the provisional shipped default); only the prefix-only"
    echo "baseline is measured. The AR origin has none either, so infilling is n/a for it."
  fi
  echo
  finished=()
  for d in "$RUNS"/*/; do [ -f "$d/summary.json" ] && finished+=("$d"); done
  if [ ${#finished[@]} -gt 0 ]; then
    "$PY" -m diffcoder.cli compare "${finished[@]}" --plot "$OUT/compare.png" --force 2>/dev/null
  else
    echo "(no finished runs)"
  fi
  echo
  echo "Commands (resumable; \`benchmarks/eval_issue13.sh\` runs them all):"
  echo
  echo '```'
  cat "$RUNS/commands.txt"
  echo '```'
} > "$OUT/table.md"
cat "$OUT/table.md"
