"""Turn a finished training run into weights the lessons can load (under 25 MB in all).

    python lessons/weights/ship.py RUN_DIR NAME --command "minivit train ..." [--classes 0,1,2,3,4]

reads RUN_DIR/checkpoint.npz (the last epoch) and RUN_DIR/metrics.csv and writes, in lessons/weights/,

    NAME.safetensors     a ViT's weights in float16, timm's names; the file's metadata holds the
                         config, the class names, the normalisation and "notes": the command that
                         trained it, the recipe, the run's own final test accuracy, and what these
                         float16 weights score on the whole test set and on its first 1,000 images
      or NAME.npz        for a ResNet or a hybrid: a weights-only minivit checkpoint (float32,
                         BatchNorm's running averages included; no optimiser state), whose meta
                         holds the same notes, class names and normalisation
    NAME.metrics.csv     the run's metrics.csv, one row per epoch

--classes: the run was trained on some CIFAR-10 classes only (relabelled 0..k-1 in the order
given, as minivit.experiments.class_subset does); it is scored on those classes' test images.

Load them with `minivit.pretrained.load_pretrained("lessons/weights/NAME.safetensors")` or
`minivit.checkpoint.load_model_checkpoint("lessons/weights/NAME.npz")`;
tests/test_shipped_weights.py re-measures the first-1,000 score and compares it with the notes.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from minivit.checkpoint import checkpoint_config, load_checkpoint, load_model_checkpoint, save_checkpoint
from minivit.config import model_kind
from minivit.data import CIFAR10_MEAN, CIFAR10_STD, find_cifar10, load_cifar10
from minivit.experiments import class_subset
from minivit.model import build_model
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
    parser.add_argument("--classes", type=parse_classes, default=(),
                        help="the CIFAR-10 classes the run was trained on, e.g. 0,1,2,3,4 (default: all ten)")
    args = parser.parse_args(argv)

    state, _, meta = load_checkpoint(args.run_dir / "checkpoint.npz")
    config = checkpoint_config(meta)
    recipe = meta.get("recipe") or {}
    history = read_metrics_csv(args.run_dir / "metrics.csv")
    if int(meta["epoch"]) != recipe.get("epochs"):
        raise SystemExit(f"{args.run_dir}: the checkpoint is from epoch {meta['epoch']} of {recipe.get('epochs')}: "
                         f"ship finished runs only")
    model = build_model(config)
    model.load_state_dict(state)
    norm = meta.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    data = load_cifar10(find_cifar10(args.data, download=False, search_parents=True))
    if args.classes:
        data = class_subset(data, args.classes)
    head = getattr(config, "num_classes", None)
    if head != len(data.classes):
        raise SystemExit(f"{args.run_dir}: the model has {head} classes but the data {len(data.classes)}: "
                         f"use --classes for a run trained on some classes only")

    vit = model_kind(config) == "vit"
    out = args.out_dir / (f"{args.name}.safetensors" if vit else f"{args.name}.npz")
    tmp = args.out_dir / f".{args.name}.unscored{out.suffix}"

    def write(path, notes):
        if vit:
            save_pretrained(model, path, dtype="float16", class_names=data.classes, mean=norm["mean"],
                            std=norm["std"], notes=notes)
        else:
            save_checkpoint(path, model, None, int(meta["epoch"]), {},
                            extra={"class_names": data.classes, "normalize": norm, "notes": notes})

    write(tmp, None)
    # what a lesson will get: float16 values as float32 (a ViT), or the checkpoint as saved
    shipped = load_pretrained(tmp)[0] if vit else load_model_checkpoint(tmp)[0]
    tmp.unlink()
    predictions = predict(shipped, data.test_images, 250, norm["mean"], norm["std"]).argmax(axis=1)
    correct = predictions == data.test_labels
    kind = "float16" if vit else "shipped"
    notes = {
        "command": args.command,
        "recipe": recipe,
        "epochs": int(meta["epoch"]),
        "run_test_accuracy": float(history[-1]["test_acc"]),
        f"{kind}_test_correct": int(correct.sum()),
        f"{kind}_test_images": int(len(correct)),
        "slice": f"the first {SLICE} test images" + (f" of classes {list(args.classes)}" if args.classes else ""),
        f"{kind}_slice_correct": int(correct[:SLICE].sum()),
    }
    if args.classes:
        notes["classes"] = list(args.classes)
    write(out, notes)
    shutil.copyfile(args.run_dir / "metrics.csv", args.out_dir / f"{args.name}.metrics.csv")
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB): {notes}")


def parse_classes(text: str) -> tuple:
    """"0,1,2,3,4" -> (0, 1, 2, 3, 4): distinct CIFAR-10 class indices."""
    try:
        classes = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes class indices like 0,1,2,3,4; got {text!r}") from None
    if len(set(classes)) != len(classes) or not all(0 <= c < 10 for c in classes) or len(classes) < 2:
        raise argparse.ArgumentTypeError(f"--classes takes two or more distinct indices 0-9, got {text!r}")
    return classes


if __name__ == "__main__":
    main()
