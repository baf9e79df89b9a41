#!/bin/bash
# Training images/s of several presets on 2 MPI ranks under the same conditions: one short epoch
# (6,400 images) of each, alternately, twice, so a change in the machine's outside load falls on all.
#     bash scripts/rank_speed.sh [PRESET[:BATCH[:OPTIMIZER]] ...]
# Default: the ViT recipe and the hybrid recipe (cifar-recipe cifar-hybrid), each with the defaults of
# `minivit train`. ResNet-20 as cnn_vs_vit trains it: resnet20:128:sgd. DATA (environment) is the
# CIFAR-10 archive, ../shared/data/cifar-10-python.tar.gz by default. Run it on an otherwise idle
# machine. Prints "round preset epoch_seconds images_per_second".
set -euo pipefail
DATA=${DATA:-../shared/data/cifar-10-python.tar.gz}
[ $# -gt 0 ] || set -- cifar-recipe cifar-hybrid
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MINIVIT_NUM_THREADS=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for round in 1 2; do
  for item in "$@"; do
    IFS=: read -r preset batch optimizer <<< "$item"
    options=()
    [ -z "$batch" ] || options+=(--batch-size "$batch")
    [ -z "$optimizer" ] || options+=(--optimizer "$optimizer")
    name="$preset-$round-${batch:-default}-${optimizer:-default}"
    mpiexec -n 2 -bind-to core minivit train --preset "$preset" "${options[@]}" --data "$DATA" \
      --limit-train 6400 --limit-test 200 --epochs 1 --warmup 0.2 --out "$OUT/$name" > "$OUT/$name.log" 2>&1 \
      || { echo "$item failed:" >&2; tail -5 "$OUT/$name.log" >&2; exit 1; }
    echo "$round $item $(tail -1 "$OUT/$name/metrics.csv" | cut -d, -f7,8 | tr , ' ')"
  done
done
