"""Training-step cost per image of several presets, relative to the first, on one thread.

    python scripts/step_cost.py cifar-recipe:64 resnet20:128 [cifar-hybrid:64 resnet56:128 ...] [--steps 16]

Each PRESET:BATCH is one minivit model with AdamW on a random batch; their steps run alternately in
one process (the order reversed every round), so a machine's load falls on all of them alike and
the ratios hold where the absolute images/s do not. `experiments.cnn_vs_vit` uses the ratio of
resnet20 to cifar-recipe to give ResNet-20 the ViT recipe's wall time.
"""
import argparse
import statistics
import time

from minivit.bench import make_batch, make_minivit, minivit_train_step, set_threads
from minivit.config import get_model_preset


def parse_item(text: str) -> tuple[str, int]:
    name, _, batch = text.partition(":")
    if not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"expected PRESET:BATCH such as resnet20:128, got {text!r}")
    try:
        get_model_preset(name)
    except ValueError as e:                                       # argparse would hide its message
        raise argparse.ArgumentTypeError(str(e)) from None
    return name, int(batch)


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=parse_item, metavar="PRESET:BATCH")
    parser.add_argument("--steps", type=positive_int, default=16, help="timed rounds (default 16)")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    steps = []
    for name, batch in args.models:
        config = get_model_preset(name)
        model, opt = make_minivit(config)
        images, labels = make_batch(config, batch)
        steps.append((name, batch, lambda m=model, o=opt, x=images, y=labels: minivit_train_step(m, o, x, y), []))
    for _ in range(2):                                            # warm-up, untimed
        for _, _, step, _ in steps:
            step()
    for i in range(args.steps):
        for _, batch, step, seconds in (steps if i % 2 == 0 else steps[::-1]):
            t0 = time.perf_counter()
            step()
            seconds.append((time.perf_counter() - t0) / batch)
    first = statistics.median(steps[0][3])
    for name, batch, _, seconds in steps:
        per_image = statistics.median(seconds)
        print(f"{name:14s} batch {batch:4d}: {1 / per_image:7.1f} images/s, {per_image / first:.2f} x "
              f"{steps[0][0]}'s time per image")


if __name__ == "__main__":
    main()
