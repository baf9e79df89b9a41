"""Worked solutions to lesson 7's exercises (lessons/07_cls_vs_pooling.ipynb).

Try the exercises first: the notebook's checkers (minivit.exercises.lesson07) say what is wrong.
Shape legend: B batch, N tokens (token 0 is [CLS], tokens 1..N-1 the patches), D width.
"""
import statistics

import numpy as np


def gap_forward(x):
    """Global average pooling: the mean of the patch tokens. x (B, N, D) -> out (B, D)."""
    out = x[:, 1:].mean(axis=1)                  # (B, D): token 0, [CLS], is left out
    return out, x.shape


def gap_backward(dout, cache):
    """dout (B, D) -> dx (B, N, D)."""
    B, N, D = cache
    dx = np.zeros((B, N, D), dtype=dout.dtype)   # (B, N, D); [CLS] was not read: its gradient is 0
    # forward: out = mean over the N - 1 patch tokens  =>  each of them gets 1 / (N - 1) of dout
    dx[:, 1:] = dout[:, None, :] / (N - 1)       # (B, 1, D) broadcast over the N - 1 patches
    return dx


def compare_variants(acc_a, acc_b):
    """(mean(A) - mean(B), whether that is more than seed noise): real only when the difference
    is larger than the larger of the two ranges over seeds."""
    difference = statistics.fmean(acc_a) - statistics.fmean(acc_b)
    spread = max(max(acc_a) - min(acc_a), max(acc_b) - min(acc_b))   # how far two seeds of one variant can differ
    return difference, bool(abs(difference) > spread)


def best_lr(rows):
    """{pool: (lr, mean test accuracy)}: for each pool, the learning rate whose seeds have the
    highest mean final test accuracy. rows: dicts of strings, as csv.DictReader reads them."""
    accuracies = {}                                          # pool -> lr -> [test_acc of each seed]
    for r in rows:
        accuracies.setdefault(r["pool"], {}).setdefault(float(r["lr"]), []).append(float(r["test_acc"]))
    best = {}
    for pool, by_lr in accuracies.items():
        means = {lr: statistics.fmean(acc) for lr, acc in by_lr.items()}
        lr = max(means, key=means.get)                       # the final accuracy, averaged over seeds
        best[pool] = (lr, means[lr])
    return best
