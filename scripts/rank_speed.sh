#!/bin/bash
# Training images/s of the ViT recipe (cifar-recipe) and the hybrid recipe (cifar-hybrid) on 2 MPI
# ranks under the same conditions: one short epoch (6,400 images) of each, alternately, twice.
#     bash scripts/rank_speed.sh [DATA]        (DATA: default ../shared/data/cifar-10-python.tar.gz)
# Run it on an otherwise idle machine. Prints "round preset epoch_seconds images_per_second".
set -euo pipefail
DATA=${1:-../shared/data/cifar-10-python.tar.gz}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MINIVIT_NUM_THREADS=1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for round in 1 2; do
  for preset in cifar-recipe cifar-hybrid; do
    mpiexec -n 2 -bind-to core minivit train --preset "$preset" --data "$DATA" --limit-train 6400 \
      --limit-test 200 --epochs 1 --warmup 0.2 --out "$OUT/$preset-$round" > "$OUT/$preset-$round.log" 2>&1
    echo "$round $preset $(tail -1 "$OUT/$preset-$round/metrics.csv" | cut -d, -f7,8 | tr , ' ')"
  done
done
