#!/usr/bin/env bash
# The prepared GPU run of issue 21, part 2: everything that needs a real NVIDIA GPU, in one command
# that fits one call of the lent machine (10 minutes), its logs written to $OUT.
#
# The lent machine has python3 with CuPy (cupy-cuda13x), PyTorch CUDA, pytest, numpy, scipy,
# safetensors and tqdm, and no network: minivit runs from the checkout (PYTHONPATH), nothing is
# installed. CIFAR-10 travels as ../shared/data/cifar10-jpeg.npz (56 MB; the tarball is too big):
# here, once,
#     mkdir -p .gpudata && cp ../shared/data/cifar10-jpeg.npz ../shared/data/cifar10_jpeg.py .gpudata/
#     echo /.gpudata/ >> .git/info/exclude
# then run this script on the device with `carry: [".gpudata"]`:
#     bash scripts/gpu_run.sh            # all four parts (about 9 minutes)
#     bash scripts/gpu_run.sh tests bench   # some parts: status, tests, bench, train
# Parts: status (gpu_status, nvidia-smi); tests (every test that runs on the "gpu" backend, with
# MINIVIT_REQUIRE_GPU=1 so a GPU that cannot be used fails them); bench (cifar-recipe at batch 512 and
# ViT-B/16 at 224 px batch 64 beside PyTorch CUDA, TF32 off in both); train (the 20-epoch recipe on the
# GPU, stopped at TRAIN_SECONDS, default 240, with its metrics.csv: resume it in a later call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minivit-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MINIVIT_REQUIRE_GPU=1
PY="${PYTHON:-python3}"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(status tests bench train)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
status=0

if want status; then
    nvidia-smi 2>&1 | head -15 | tee "$OUT/nvidia-smi.txt"
    $PY -c "import minivit, cupy; from minivit.backend import gpu_status; print('minivit', minivit.__file__); print('cupy', cupy.__version__); print(gpu_status())" \
        2>&1 | tee "$OUT/status.txt" || status=1
fi
if want tests; then
    # the backend fixture's "gpu" cases (op gradient checks in float64, fast-vs-reference, optimizers,
    # whole-model steps) and the CPU-vs-GPU agreement tests
    timeout 200 $PY -m pytest -q -p no:cacheprovider -k "gpu" tests/ 2>&1 | tail -40 | tee "$OUT/tests.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want bench; then
    { timeout 100 $PY -m minivit.cli bench --device gpu --preset cifar-recipe --batch-size 512 --steps 20 --json "$OUT/bench-recipe.json"
      timeout 100 $PY -m minivit.cli bench --device gpu --preset vit-b16 --batch-size 64 --steps 10 --json "$OUT/bench-vitb16.json"
    } 2>&1 | tee "$OUT/bench.txt" || status=1
fi
if want train; then
    data=/tmp/minivit-cifar
    if [ ! -f "$data/cifar-10-python.tar.gz" ]; then
        [ -f .gpudata/cifar10-jpeg.npz ] || { echo "no .gpudata/cifar10-jpeg.npz: see the top of this script"; exit 1; }
        $PY .gpudata/cifar10_jpeg.py .gpudata/cifar10-jpeg.npz "$data" || exit 1
    fi
    run="${TRAIN_DIR:-/tmp/minivit-gpu-recipe}"
    resume=(); [ -f "$run/checkpoint.npz" ] && resume=(--resume)
    timeout -s INT "${TRAIN_SECONDS:-240}" $PY -m minivit.cli train --device gpu --data "$data/cifar-10-python.tar.gz" \
        --out "$run" --log-every 100 "${resume[@]}" 2>&1 | tr '\r' '\n' | grep -v "img/s, acc" | tail -30 | tee "$OUT/train.txt"
    cp "$run/metrics.csv" "$OUT/train-metrics.csv" 2>/dev/null
fi
exit $status
