"""Turn a finished training run into weights the lessons can load (float16 safetensors, under 25 MB in all).

    python lessons/weights/ship.py RUN_DIR NAME --command "minivit train ..."

reads RUN_DIR/checkpoint.npz (the last epoch) and RUN_DIR/metrics.csv and writes, in lessons/weights/,

    NAME.safetensors     the weights in float16, timm's names; the file's metadata holds the config,
                         the class names, the normalisation and "notes": the command that trained it,
                         the recipe, the run's own final test accuracy, and what these float16 weights
                         score on the whole test set and on its first 1,000 images
    NAME.metrics.csv     the run's metrics.csv, one row per epoch

Load them with `minivit.pretrained.load_pretrained("lessons/weights/NAME.safetensors")`;
tests/test_shipped_weights.py re-measures the first-1,000 score and compares it with the notes.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from minivit import ViT, ViTConfig
from minivit.checkpoint import load_checkpoint
from minivit.data import CIFAR10_MEAN, CIFAR10_STD, find_cifar10, load_cifar10
from minivit.pretrained import load_pretrained, save_pretrained
from minivit.train import predict, read_metrics_csv

HERE = Path(__file__).resolve().parent
SLICE = 1000                  # the fixed slice the test re-measures: the first 1,000 test images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", required=True, help="the exact command that produced the run")
    parser.add_argument("--data", help="CIFAR-10 archive (default: as minivit finds it)")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write (default: lessons/weights)")
    args = parser.parse_args(argv)

    state, _, meta = load_checkpoint(args.run_dir / "checkpoint.npz")
    config = ViTConfig.from_dict(meta["config"])
    recipe = meta.get("recipe") or {}
    history = read_metrics_csv(args.run_dir / "metrics.csv")
    if int(meta["epoch"]) != recipe.get("epochs"):
        raise SystemExit(f"{args.run_dir}: the checkpoint is from epoch {meta['epoch']} of {recipe.get('epochs')}: "
                         f"ship finished runs only")
    model = ViT(config)
    model.load_state_dict(state)
    norm = meta.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    data = load_cifar10(find_cifar10(args.data, download=False, search_parents=True))

    out = args.out_dir / f"{args.name}.safetensors"
    tmp = args.out_dir / f".{args.name}.unscored.safetensors"
    save_pretrained(model, tmp, dtype="float16", class_names=data.classes, mean=norm["mean"], std=norm["std"])
    shipped, _ = load_pretrained(tmp)                 # what a lesson will get: float16 values, as float32
    tmp.unlink()
    predictions = predict(shipped, data.test_images, 250, norm["mean"], norm["std"]).argmax(axis=1)
    correct = predictions == data.test_labels
    notes = {
        "command": args.command,
        "recipe": recipe,
        "epochs": int(meta["epoch"]),
        "run_test_accuracy": float(history[-1]["test_acc"]),
        "float16_test_correct": int(correct.sum()),
        "float16_test_images": int(len(correct)),
        "slice": f"the first {SLICE} test images",
        "float16_slice_correct": int(correct[:SLICE].sum()),
    }
    save_pretrained(model, out, dtype="float16", class_names=data.classes, mean=norm["mean"], std=norm["std"],
                    notes=notes)
    shutil.copyfile(args.run_dir / "metrics.csv", args.out_dir / f"{args.name}.metrics.csv")
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB): {notes}")


if __name__ == "__main__":
    main()
