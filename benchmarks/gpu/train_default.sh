#!/usr/bin/env bash
# The embedded default's diffusion adapter, trained on one GPU machine (issue 8, step 2). NOT YET RUN: written and
# checked on a CPU-only machine (the stages' CPU twin is tests/training/test_fim_data.py); expect to adjust.
#
# On the GPU machine, from the repository root; each stage fits one device call (<= 10 min) and the machine's
# files persist only while it stays warm (30 s between calls). See benchmarks/gpu/README.md for the call sequence.
#   bash benchmarks/gpu/train_default.sh receive   # wheels and GGUF halves from .gpu/ (once per carried half)
#   bash benchmarks/gpu/train_default.sh data      # FIM CPT corpus + mined SFT pairs from the machine's own Python
#   bash benchmarks/gpu/train_default.sh cpt       # CPT from the AR origin; stops before BUDGET_S, rerun resumes
#   bash benchmarks/gpu/train_default.sh sft       # SFT continuing the CPT adapter; resumes likewise
#   bash benchmarks/gpu/train_default.sh eval      # HumanEval base prompts, block 4, beside the AR origin
#   bash benchmarks/gpu/train_default.sh export 1  # adapter (tar in <= 15 MiB parts), logs, plots -> $OUT; 'export 2'
#                                                  # sends the parts a 64 MiB call could not
# Several stages in one call: bash benchmarks/gpu/train_default.sh receive data
set -euo pipefail
cd "$(dirname "$0")/../.."

W=${DC_WORK:-/tmp/dc-work}                    # everything the run writes (lost when the machine goes back)
export DIFFCODER_HOME=${DIFFCODER_HOME:-$W/home}
export PYTHONPATH=$W/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DC=("$PY" -m diffcoder.cli)
BUDGET_S=${BUDGET_S:-540}                     # one device call may run 600 s
CPT_TOKENS=${CPT_TOKENS:-60000000}            # corpus size (the recipe's 3000 steps read 49M)
CPT_STEPS=${CPT_STEPS:-3000}
SFT_STEPS=${SFT_STEPS:-800}
SFT_PAIRS=${SFT_PAIRS:-40000}
COMPILE=${COMPILE:-true}
INIT_FROM=${INIT_FROM:-}                      # an adapter from an earlier session (fresh machine): CPT restarts from it
read -r -a EXTRA <<< "${EXTRA:-}"             # more key=value overrides for both trainings (e.g. a CPU smoke test)
GGUF=$DIFFCODER_HOME/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
BASE=$W/base                                  # the AR origin, converted (mask token added, block 4, shift False)
OUT=${OUT:-$W/out}

log() { echo "[train_default $(date +%H:%M:%S)] $*"; }

stage_receive() {
  mkdir -p "$W/site" "$W/parts" "$(dirname "$GGUF")"
  if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .gpu/whl/*.whl
    log "wheels installed into $W/site"
  fi
  for half in part1 part2; do
    [ -f ".gpu/$half/gguf.part" ] && cp ".gpu/$half/gguf.part" "$W/parts/$half" && log "received GGUF $half"
  done
  if [ ! -f "$GGUF" ] && [ -f "$W/parts/part1" ] && [ -f "$W/parts/part2" ]; then
    cat "$W/parts/part1" "$W/parts/part2" > "$GGUF"
  fi
  if [ -f "$GGUF" ] && [ ! -f "$BASE/config.json" ]; then
    "$PY" -c "from diffcoder.pull import ensure_default_gguf; ensure_default_gguf()"  # checks the pinned sha256
    "${DC[@]}" convert "$GGUF" "$BASE" --block-size 4 --no-shift
    log "AR origin converted into $BASE"
  fi
  [ -f "$BASE/config.json" ] || log "still waiting for the other GGUF half"
}

stage_data() {
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  "${DC[@]}" data build python-env --out "$W/data/cpt" --tokenizer "$BASE" --fim-rate 0.5 --val-fraction 0.005 \
    --max-tokens "$CPT_TOKENS"
  "${DC[@]}" data sft python-env --mine --out "$W/data/sft" --tokenizer "$BASE" --max-pairs "$SFT_PAIRS"
}

# Run a training command until done or BUDGET_S; a stopped run is resumed by calling the stage again.
train_within_budget() {
  local out=$1; shift
  local resume=()
  [ -f "$out/run.json" ] && resume=(--resume)
  set +e
  timeout --signal=TERM "$BUDGET_S" "${DC[@]}" train "$@" "train.out_dir=$out" "train.compile=$COMPILE" \
    "${EXTRA[@]}" "${resume[@]}"
  local rc=$?
  set -e
  if [ $rc -eq 124 ]; then
    log "stopped at the ${BUDGET_S}s budget; run this stage again to resume from the last checkpoint"
  elif [ $rc -ne 0 ]; then
    return $rc
  else
    log "finished: $out/final"
  fi
}

stage_cpt() {
  local init=()
  if [ -n "$INIT_FROM" ]; then  # continuing an earlier session's adapter on a fresh machine: no second warmup
    init=("lora.init_from=$INIT_FROM" "objective.warmup_steps=0" "optim.warmup_steps=10")
  fi
  train_within_budget "$W/runs/cpt" cpt-default "model.path=$BASE" "data.path=$W/data/cpt" \
    "train.steps=$CPT_STEPS" "${init[@]}"
}

stage_sft() {
  train_within_budget "$W/runs/sft" sft-default "model.path=$BASE" "data.path=$W/data/sft" \
    "lora.init_from=$W/runs/cpt" "train.steps=$SFT_STEPS"
}

stage_eval() {
  local model=$W/runs/sft/final
  [ -d "$model" ] || model=$W/runs/cpt/final
  for style in base instruct; do
    "${DC[@]}" eval humaneval --model "$model" --out "$W/eval/humaneval-$style" --prompt-style "$style" \
      --block-length 4 --no-shift --max-new-tokens 384 --device cuda || log "eval $style failed"
    "${DC[@]}" eval humaneval --model "$BASE" --ar --out "$W/eval/humaneval-$style-ar" --prompt-style "$style" \
      --max-new-tokens 384 --device cuda || log "AR eval $style failed"
  done
}

stage_export() {
  local which=${1:-1}
  local final=$W/runs/sft/final
  [ -d "$final" ] || final=$W/runs/cpt/final
  mkdir -p "$OUT" "$W/export"
  if [ "$which" = 1 ]; then
    tar -C "$final" -cf "$W/export/adapter.tar" .
    (cd "$W/export" && rm -f adapter.tar.part-* && split -b 15M -d adapter.tar adapter.tar.part-)
    for run in cpt sft; do
      [ -d "$W/runs/$run" ] || continue
      "${DC[@]}" plot "$W/runs/$run" --out "$W/export/$run.png" || true
    done
    tar -C "$W" -cf "$OUT/logs.tar" --ignore-failed-read export/cpt.png export/sft.png runs/cpt/log.jsonl \
      runs/sft/log.jsonl runs/cpt/run.json runs/sft/run.json eval data/cpt/index.json data/sft/index.json \
      2>/dev/null || true
    (cd "$W/export" && sha256sum adapter.tar) | tee "$OUT/adapter.tar.sha256"
  fi
  # at most 64 MiB per call: four 15 MiB parts per export call
  local parts
  mapfile -t parts < <(ls "$W/export"/adapter.tar.part-* | sort)
  local first=$(( (which - 1) * 4 ))
  for p in "${parts[@]:$first:4}"; do cp "$p" "$OUT/"; done
  local last=$(( first + 4 < ${#parts[@]} ? first + 4 : ${#parts[@]} ))
  log "sent adapter parts $(( first + 1 ))..$last of ${#parts[@]}$([ "$last" -lt ${#parts[@]} ] && echo "; next: export $(( which + 1 ))")"
  log "here: cat adapter.tar.part-* > adapter.tar && sha256sum -c adapter.tar.sha256"
}

[ $# -ge 1 ] || { sed -n '2,16p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  stage=$1; shift
  case $stage in
    receive|data|cpt|sft|eval) "stage_$stage" ;;
    export)
      if [[ ${1:-} =~ ^[0-9]+$ ]]; then stage_export "$1"; shift; else stage_export 1; fi ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
