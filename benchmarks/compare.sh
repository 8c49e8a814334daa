#!/usr/bin/env bash
# Reproduces the README's comparison table and plots: every method at about 10, 20 and 30 % of the
# blocks on the same calibration and held-out text, zero-shot accuracy on the two offline tasks (first
# 100 examples each; skipped for models above 5x dense perplexity, which answer at chance), and the
# pruning time as a multiple of one plain forward pass measured in the same run. About an hour per model
# on 2 shared CPU cores, most of it lm-eval and SLEB; NO_TASKS=1 skips the tasks and takes about
# ten minutes for SmolLM2. Raise --samples/--seq-len/--eval-samples/--limit on bigger machines.
#
#   bash benchmarks/compare.sh                 # both models
#   bash benchmarks/compare.sh smollm2-135m    # one
#   NO_TASKS=1 bash benchmarks/compare.sh      # perplexity and time only
set -euo pipefail
cd "$(dirname "$0")/.."
MIPRUN=${MIPRUN:-.venv/bin/miprun}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m)
tasks=(--tasks social_iqa,next_sentence --limit 100 --task-max-ppl 5)
[ -z "${NO_TASKS:-}" ] || tasks=()
for model in "${models[@]}"; do
  case "$model" in
    gemma3-270m) ns=(-n 2 -n 4 -n 5) ;;   # 18 blocks: 11, 22, 28 %
    *)           ns=(-n 3 -n 6 -n 9) ;;   # 30 blocks
  esac
  "$MIPRUN" compare --model "$model" "${ns[@]}" \
    --methods mi-prun,mi-optimal,shortgpt,angular,sleb,ppl-oneshot,last-n,random \
    --samples 8 --seq-len 128 --eval-samples 8 --eval-seq-len 256 \
    "${tasks[@]}" \
    --out "benchmarks/results/compare-$model" ${EXTRA:-}
done
