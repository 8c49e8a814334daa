#!/bin/sh
# Zero-shot accuracy of the models the default command makes (mi-search + linear, the sets recorded in
# results/default/) and of SLEB's sets (results/compare-MODEL/) with the same linear repair, at every N,
# plus the dense models. Each distinct set is pruned once with --blocks (no search) on the comparison's
# calibration data and saved under $OUT; `miprun eval` measures the saved folder: held-out perplexity on the
# first 8 x 256 tokens and acc_norm on the first 100 examples of each task (50 on Gemma, as compare.sh).
# benchmarks/zero_shot_table.py then writes results/default/zero-shot.{json,md}. Other sets: DEFAULT_RUNS, a
# folder of the default's MODEL-nN.json manifests (e.g. benchmarks/results/default-novel); SLEB_RUNS, the
# `miprun compare` folders holding SLEB's sets, one per model, separated by spaces (e.g.
# "benchmarks/results/sleb-novel-smollm2-135m benchmarks/results/sleb-novel-gemma3-270m"); TABLE_OUT, where
# the table goes (e.g. benchmarks/results/default-novel). Unset, they are the three folders above. A run whose
# eval JSON is already in $OUT is skipped, and so is a prune whose folder is there, so an interrupted run goes
# on where it stopped (FORCE=1 redoes everything).
#
# Text: MIPRUN_BENCH_TEXT, for the calibration (the repair's fit), the held-out perplexity and next_sentence:
# wiki (the default table's and compare.sh's text; needs the BIG-bench archive, MIPRUN_BIGBENCH_ARCHIVE) or
# novel (needs nothing). Tasks: next_sentence, plus social_iqa where the text is wiki (the same archive), or
# TASKS=... . Time on 2 CPU cores (novel): 1-1.5 min per SmolLM2 prune (the repair's fresh 32 k-token capture),
# 1.5-2.5 per Gemma prune, under 1 min per eval: about 25 min in all (43.5 min for the recorded run, whose
# first SmolLM2 half shared the cores with another job and ran 5x slower).
#
#   MIPRUN_BENCH_TEXT=novel sh benchmarks/zero_shot.sh    # the recorded table (next_sentence only)
#   sh benchmarks/zero_shot.sh                            # on wiki, with social_iqa (needs the archive)
#   OUT=out/zero-shot-novel MIPRUN_BENCH_TEXT=novel DEFAULT_RUNS=benchmarks/results/default-novel \
#     SLEB_RUNS="benchmarks/results/sleb-novel-smollm2-135m benchmarks/results/sleb-novel-gemma3-270m" \
#     TABLE_OUT=benchmarks/results/default-novel sh benchmarks/zero_shot.sh   # the novel runs' sets
set -eu
cd "$(dirname "$0")/.."
MIPRUN=${MIPRUN:-.venv/bin/miprun}
PYTHON=${PYTHON:-.venv/bin/python}
TEXT=${MIPRUN_BENCH_TEXT:-wiki}
export MIPRUN_BENCH_TEXT=$TEXT
if [ "$TEXT" = wiki ]; then TASKS=${TASKS:-social_iqa,next_sentence}; else TASKS=${TASKS:-next_sentence}; fi
OUT=${OUT:-out/zero-shot}
# the table script's options, split into words where used (folder names without spaces)
SETS=""
if [ -n "${DEFAULT_RUNS:-}" ]; then SETS="--default-runs $DEFAULT_RUNS"; fi
if [ -n "${SLEB_RUNS:-}" ]; then SETS="$SETS --sleb $SLEB_RUNS"; fi
TABLE=""
if [ -n "${TABLE_OUT:-}" ]; then TABLE="--out $TABLE_OUT"; fi
mkdir -p "$OUT"
"$PYTHON" benchmarks/zero_shot_table.py $SETS --sets > "$OUT/sets.txt"
while read -r model name blocks limit; do
  json="$OUT/$name.eval.json"
  if [ -f "$json" ] && [ -z "${FORCE:-}" ]; then echo "$name: done ($json)"; continue; fi
  target=$model
  if [ "$blocks" != - ]; then
    target="$OUT/$name"
  fi
  if [ "$blocks" != - ] && { [ ! -f "$target/miprun.json" ] || [ -n "${FORCE:-}" ]; }; then
    echo "$name: prune $blocks"
    "$MIPRUN" prune --model "$model" --blocks "$blocks" --repair linear --calib "$TEXT" \
      --samples 8 --seq-len 128 --no-cache --out "$target" --overwrite > "$OUT/$name.prune.log" 2>&1
  fi
  echo "$name: eval"
  "$MIPRUN" eval --model "$target" --ppl "$TEXT" --ppl-windows 8 --ppl-seq-len 256 \
    --tasks "$TASKS" --task-text "$TEXT" --limit "$limit" --batch-size 8 --json "$json" --overwrite > "$OUT/$name.eval.log" 2>&1
done < "$OUT/sets.txt"
"$PYTHON" benchmarks/zero_shot_table.py $SETS --runs "$OUT" $TABLE
