#!/bin/sh
# the new default (mi-search + linear) on the comparison's data; one prune per N
# (the recorded figures' text: wiki needs the BIG-bench archive, MIPRUN_BIGBENCH_ARCHIVE; novel needs nothing)
cd "$(dirname "$0")/.."
TEXT=${MIPRUN_BENCH_TEXT:-wiki}
mkdir -p "${OUT:-out/default}"
for spec in "smollm2-135m 3" "smollm2-135m 6" "smollm2-135m 9" "gemma3-270m 2" "gemma3-270m 4" "gemma3-270m 5"; do
  set -- $spec
  miprun prune --model $1 -n $2 --calib $TEXT --eval-text $TEXT --samples 8 --seq-len 128 --eval --eval-samples 8 --no-cache --out ${OUT:-out/default}/$1-n$2 --overwrite > ${OUT:-out/default}/$1-n$2.log 2>&1
done
