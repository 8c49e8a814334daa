#!/usr/bin/env bash
# Reproduces the README's comparison tables and plots: every method at about 10, 20 and 30 % of the
# blocks on the same calibration and held-out text, each choice cut only and with the linear repair
# (REPAIRS=none to skip it), zero-shot accuracy on the two offline tasks (first 100 examples each, 50 on
# Gemma; skipped for models above 5x dense perplexity, 3x on Gemma), and the pruning time as a multiple
# of one plain forward pass measured in the same run. Hours per model on 2 shared CPU cores, most of it
# SLEB and lm-eval; NO_TASKS=1 skips the tasks. Raise --samples/--seq-len/--eval-samples/--limit on
# bigger machines.
#
#   bash benchmarks/compare.sh                 # both models
#   bash benchmarks/compare.sh smollm2-135m    # one
#   NO_TASKS=1 bash benchmarks/compare.sh      # perplexity and time only
set -euo pipefail
cd "$(dirname "$0")/.."
MIPRUN=${MIPRUN:-.venv/bin/miprun}
# the recorded figures' text: wiki needs the BIG-bench archive (MIPRUN_BIGBENCH_ARCHIVE); novel needs nothing
TEXT=${MIPRUN_BENCH_TEXT:-wiki}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m)
for model in "${models[@]}"; do
  case "$model" in
    # Gemma's 262k-token head makes lm-eval about 4x slower than on SmolLM2: fewer examples, fewer rows.
    gemma3-270m) ns=(-n 2 -n 4 -n 5); tasks=(--limit 50 --task-max-ppl 3) ;;   # 18 blocks: 11, 22, 28 %
    *)           ns=(-n 3 -n 6 -n 9); tasks=(--limit 100 --task-max-ppl 5) ;;  # 30 blocks
  esac
  tasks=(--tasks social_iqa,next_sentence "${tasks[@]}")
  [ -z "${NO_TASKS:-}" ] || tasks=()
  "$MIPRUN" compare --model "$model" "${ns[@]}" \
    --methods "${METHODS:-mi-prun,mi-optimal,mi-verified,shortgpt,angular,angular-mean,sleb,ppl-oneshot,last-n,random}" \
    --repairs "${REPAIRS:-none,linear}" \
    --calib "$TEXT" --eval-text "$TEXT" --samples 8 --seq-len 128 --eval-samples 8 --eval-seq-len 256 \
    "${tasks[@]}" \
    --out "benchmarks/results/compare-$model" --overwrite ${EXTRA:-}
done
