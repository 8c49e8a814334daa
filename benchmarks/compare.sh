#!/usr/bin/env bash
# Reproduces the README's comparison table and plots: every method at every N on the same calibration
# and held-out text, plus the pruning time as a multiple of one plain forward pass measured in the same
# run. The reduced configuration (8 x 128 calibration tokens, 8 x 256 held-out tokens) finishes in about
# ten minutes per model on 2 CPU cores; raise --samples/--seq-len/--eval-samples on bigger machines.
#
#   bash benchmarks/compare.sh                 # both models
#   bash benchmarks/compare.sh smollm2-135m    # one
set -euo pipefail
cd "$(dirname "$0")/.."
MIPRUN=${MIPRUN:-.venv/bin/miprun}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2-135m gemma3-270m)
for model in "${models[@]}"; do
  case "$model" in
    gemma3-270m) ns=(-n 2 -n 4) ;;   # 18 blocks: about 10 % and 20 %
    *)           ns=(-n 3 -n 6) ;;   # 30 blocks
  esac
  "$MIPRUN" compare --model "$model" "${ns[@]}" \
    --methods mi-prun,mi-optimal,shortgpt,angular,sleb,ppl-oneshot,last-n,random \
    --samples 8 --seq-len 128 --eval-samples 8 --eval-seq-len 256 \
    --out "benchmarks/results/compare-$model" ${EXTRA:-}  # EXTRA="--tasks social_iqa --limit 200"
done
