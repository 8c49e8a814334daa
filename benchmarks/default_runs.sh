#!/bin/sh
# the new default (mi-search + linear) on the comparison's data; one prune per N
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-out/default}"
for spec in "smollm2-135m 3" "smollm2-135m 6" "smollm2-135m 9" "gemma3-270m 2" "gemma3-270m 4" "gemma3-270m 5"; do
  set -- $spec
  miprun prune --model $1 -n $2 --samples 8 --seq-len 128 --eval --eval-samples 8 --no-cache --out ${OUT:-out/default}/$1-n$2 --overwrite > ${OUT:-out/default}/$1-n$2.log 2>&1
done
