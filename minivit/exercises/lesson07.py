"""Checkers for lesson 07 ([CLS] or average pooling, and the learning rate).

    check_gap(gap_forward, gap_backward)     exercise 1: global average pooling of the patch tokens, and its backward
    check_compare_variants(compare_variants) exercise 2: is a difference between two variants more than seed noise?
    check_best_lr(best_lr)                   exercise 3: the best learning rate of each pooling, from a sweep's rows

Shape legend: B batch, N tokens (1 [CLS] + N - 1 patches), D width.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..gradcheck import check_op
from . import Wrong, exercise, expect_close, expect_gradients


# ----------------------------------------------------------------------------- exercise 1

# (B, N, D): the lesson's size, one patch only (N = 2), one image, width 1, an odd token count
GAP_SHAPES = [(2, 65, 8), (1, 2, 3), (3, 5, 1), (2, 17, 4), (4, 10, 6)]


@exercise("global average pooling of the patch tokens: forward and backward")
def check_gap(gap_forward, gap_backward):
    """gap_forward(x) -> (out, cache) with x (B, N, D) whose token 0 is [CLS] and out (B, D) the
    mean of tokens 1..N-1; gap_backward(dout, cache) -> dx (B, N, D). Compared with
    ops.pool_forward / pool_backward(mode="mean") in float64 on several shapes, and gradient-checked
    with check_op."""
    rng = np.random.default_rng(707)
    worst = 0.0
    for B, N, D in GAP_SHAPES:
        x = rng.standard_normal((B, N, D))
        x[:, 0] += 10.0                       # a [CLS] token far from the patches: counting it shows
        given = x.copy()
        where = f"x of shape {(B, N, D)}"
        out = gap_forward(given)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Wrong(f"gap_forward must return a tuple (out, cache), got {type(out).__name__}")
        pooled, cache = out
        if not np.array_equal(given, x):
            raise Wrong("gap_forward changed the array x it was given; leave x as it is")
        want, want_cache = ops.pool_forward(x, "mean")
        try:
            expect_close(f"gap_forward, {where}", pooled, want, rtol=1e-12, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. The mean runs over the patch tokens x[:, 1:] only, N - 1 of them; "
                        f"token 0 is [CLS] and stays out.") from None
        dout = rng.standard_normal((B, D))
        dx = gap_backward(dout.copy(), cache)
        want_dx = ops.pool_backward(dout, want_cache)
        if getattr(dx, "shape", None) == (B, N, D) and np.any(np.asarray(dx)[:, 0] != 0):
            raise Wrong(f"gap_backward, {where}: the [CLS] slot dx[:, 0] is not zero; the forward pass "
                        f"never read token 0, so no gradient goes back to it")
        try:
            expect_close(f"gap_backward, {where}", dx, want_dx, rtol=1e-12, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Each of the N - 1 patch tokens gets dout / (N - 1).") from None
        errors = check_op(gap_forward, gap_backward, {"x": x.copy()}, ("x",), seed=B * N + D)
        summary = expect_gradients(f"gap, {where}", errors)
        worst = max(worst, errors["x"])
    return (f"{len(GAP_SHAPES)} shapes (N = 2 included): equal to minivit.ops.pool_forward/backward(mode='mean'); "
            f"check_op relative error at most {worst:.1e}")


# ----------------------------------------------------------------------------- exercise 2

def _verdict(a, b):
    """The lesson's rule, written independently of the worked solution: the difference of the
    means, and whether it is larger (strictly) than the larger of the two ranges over seeds."""
    mean_a, mean_b = math.fsum(a) / len(a), math.fsum(b) / len(b)
    spread = max(max(a) - min(a), max(b) - min(b))
    return mean_a - mean_b, abs(mean_a - mean_b) > spread


# (accuracies of A over its seeds, of B over its seeds, what each case checks)
COMPARE_CASES = [
    ([0.56, 0.58], [0.50, 0.51], "A clearly ahead: 0.065 apart, ranges 0.02 and 0.01"),
    ([0.50, 0.51], [0.56, 0.58], "B clearly ahead: the difference is negative and still real"),
    ([0.50, 0.56], [0.47, 0.49], "ranges that do not overlap, yet the means (0.05 apart) are within A's range 0.06"),
    ([0.50, 0.54], [0.44, 0.47], "0.065 apart: above the larger range (0.04), below the two ranges summed (0.07)"),
    ([0.50, 0.60], [0.52, 0.545], "0.0175 apart, and A's two seeds 0.10 apart: within seed noise"),
    ([0.5, 0.75], [0.25, 0.5], "exactly as far apart as the larger range (0.25): not more than it, so noise"),
    ([0.40, 0.41, 0.45], [0.52, 0.53], "three seeds against two: the mean of each, the range of each"),
    ([0.61, 0.61], [0.61, 0.61], "identical: a difference of 0"),
    ([0.48, 0.49], [0.45, 0.455], "0.0325 apart, ranges 0.01 and 0.005: real"),
]


@exercise("is the difference between two variants more than seed noise?")
def check_compare_variants(compare_variants):
    """compare_variants(acc_a, acc_b) -> (difference, real): difference = mean(acc_a) - mean(acc_b);
    real is True when |difference| is larger than the larger of the two ranges (max - min over
    seeds), else False. Run on constructed cases, as lists and as arrays."""
    for a, b, what in COMPARE_CASES:
        want_diff, want_real = _verdict(a, b)
        for kind in (list, np.asarray):
            out = compare_variants(kind(list(a)), kind(list(b)))
            if not (isinstance(out, tuple) and len(out) == 2):
                raise Wrong(f"compare_variants must return a tuple (difference, real), got {type(out).__name__}")
            diff, real = out
            try:
                diff = float(diff)
            except (TypeError, ValueError):
                raise Wrong(f"the difference must be a number, got {type(diff).__name__}") from None
            case = f"A = {a}, B = {b} ({what})"
            if not math.isclose(diff, want_diff, rel_tol=1e-9, abs_tol=1e-12):
                raise Wrong(f"{case}: difference {diff:.6g}, expected {want_diff:.6g} = mean(A) - mean(B) "
                            f"(A minus B, so negative when B is ahead)")
            if not isinstance(real, (bool, np.bool_)):
                raise Wrong(f"{case}: `real` must be True or False, got {real!r}")
            if bool(real) != want_real:
                spread = max(max(a) - min(a), max(b) - min(b))
                raise Wrong(f"{case}: real = {bool(real)}, expected {want_real}: |difference| = {abs(want_diff):.4g} "
                            f"against the larger seed range {spread:.4g}. The rule: real only when |difference| "
                            f"is strictly larger than max(range of A, range of B).")
    return f"{len(COMPARE_CASES)} constructed cases (ties, negative differences, 3 seeds against 2): all right"


# ----------------------------------------------------------------------------- exercise 3

def _rows(table, columns=("pool", "lr", "seed", "params", "test_acc", "best_test_acc", "train_acc")):
    """CSV-like rows (every value a string, as csv.DictReader gives them) from tuples."""
    return [{c: str(v) for c, v in zip(columns, r)} for r in table]


def _best(rows):
    """Independent reference: the learning rate with the highest mean final test accuracy, per pool."""
    acc = {}
    for r in rows:
        acc.setdefault(r["pool"], {}).setdefault(float(r["lr"]), []).append(float(r["test_acc"]))
    out = {}
    for pool, by_lr in acc.items():
        lr = max(by_lr, key=lambda k: sum(by_lr[k]) / len(by_lr[k]))
        out[pool] = (lr, sum(by_lr[lr]) / len(by_lr[lr]))
    return out


BEST_LR_CASES = [
    # the best single seed (0.60 at 3e-3) is not the best mean (1e-3: 0.55 against 0.50)
    ("the best single run is not the best on average",
     _rows([("cls", 0.0003, 0, 311338, 0.45, 0.45, 0.44), ("cls", 0.0003, 1, 311338, 0.44, 0.45, 0.44),
            ("cls", 0.001, 0, 311338, 0.55, 0.55, 0.52), ("cls", 0.001, 1, 311338, 0.55, 0.56, 0.53),
            ("cls", 0.003, 0, 311338, 0.60, 0.61, 0.58), ("cls", 0.003, 1, 311338, 0.40, 0.48, 0.40),
            ("mean", 0.0003, 0, 311338, 0.50, 0.50, 0.49), ("mean", 0.0003, 1, 311338, 0.51, 0.51, 0.50),
            ("mean", 0.001, 0, 311338, 0.53, 0.53, 0.52), ("mean", 0.001, 1, 311338, 0.52, 0.52, 0.52),
            ("mean", 0.003, 0, 311338, 0.47, 0.47, 0.47), ("mean", 0.003, 1, 311338, 0.48, 0.48, 0.47)])),
    # best_test_acc (the best epoch, chosen by looking at the test set) points to 3e-3; test_acc to 3e-4
    ("the final accuracy, not the best epoch's",
     _rows([("cls", 0.0003, 0, 9, 0.50, 0.50, 0.5), ("cls", 0.0003, 1, 9, 0.50, 0.51, 0.5),
            ("cls", 0.003, 0, 9, 0.45, 0.58, 0.5), ("cls", 0.003, 1, 9, 0.46, 0.57, 0.5),
            ("mean", 0.0003, 0, 9, 0.42, 0.60, 0.5), ("mean", 0.0003, 1, 9, 0.43, 0.60, 0.5),
            ("mean", 0.003, 0, 9, 0.44, 0.45, 0.5), ("mean", 0.003, 1, 9, 0.44, 0.44, 0.5)])),
    # one seed missing at one learning rate (a sweep still running), rows in no particular order
    ("unequal numbers of seeds, rows shuffled",
     _rows([("mean", 0.001, 1, 9, 0.57, 0.57, 0.5), ("cls", 0.001, 0, 9, 0.52, 0.52, 0.5),
            ("mean", 0.0003, 0, 9, 0.58, 0.58, 0.5), ("cls", 0.0003, 0, 9, 0.51, 0.51, 0.5),
            ("mean", 0.001, 0, 9, 0.56, 0.56, 0.5), ("cls", 0.0003, 1, 9, 0.54, 0.54, 0.5)])),
    # a third pooling, and the learning rates written as a CSV may write them
    ("three variants, learning rates as 3e-05 and 0.01",
     _rows([("cls", "3e-05", 0, 9, 0.30, 0.30, 0.3), ("cls", "0.01", 0, 9, 0.35, 0.35, 0.3),
            ("mean", "3e-05", 0, 9, 0.41, 0.41, 0.4), ("mean", "0.01", 0, 9, 0.20, 0.20, 0.2),
            ("map", "3e-05", 0, 9, 0.33, 0.33, 0.3), ("map", "0.01", 0, 9, 0.33001, 0.34, 0.3)])),
]


@exercise("the best learning rate of each pooling, from the sweep's rows")
def check_best_lr(best_lr):
    """best_lr(rows) -> {pool: (lr, mean_test_acc)}, where rows are dicts of strings (as
    csv.DictReader reads lessons/results/pool_lr.csv): for each pool, the learning rate (a float)
    whose runs have the highest mean final test accuracy (test_acc), and that mean."""
    for what, rows in BEST_LR_CASES:
        want = _best(rows)
        got = best_lr([dict(r) for r in rows])
        if not isinstance(got, dict):
            raise Wrong(f"best_lr must return a dict {{pool: (lr, mean accuracy)}}, got {type(got).__name__}")
        if set(got) != set(want):
            raise Wrong(f"case '{what}': expected one entry per pool {sorted(want)}, got {sorted(map(str, got))}")
        for pool, (lr, acc) in want.items():
            entry = got[pool]
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise Wrong(f"case '{what}': best_lr(rows)[{pool!r}] must be a tuple (lr, mean accuracy), got {entry!r}")
            try:
                got_lr, got_acc = float(entry[0]), float(entry[1])
            except (TypeError, ValueError):
                raise Wrong(f"case '{what}', pool {pool!r}: expected two numbers, got {entry!r} "
                            f"(the CSV's values are strings: convert them with float())") from None
            if not math.isclose(got_lr, lr, rel_tol=1e-12):
                raise Wrong(f"case '{what}', pool {pool!r}: best learning rate {got_lr:g}, expected {lr:g}. Average "
                            f"the final test accuracy (column test_acc) over the seeds of each learning rate, then "
                            f"take the learning rate with the highest average.")
            if not math.isclose(got_acc, acc, rel_tol=1e-9):
                raise Wrong(f"case '{what}', pool {pool!r}: mean accuracy {got_acc:.6g} at lr {lr:g}, expected "
                            f"{acc:.6g}, the mean of test_acc over that learning rate's seeds")
    return f"{len(BEST_LR_CASES)} constructed sweeps (best seed vs best mean, best epoch vs final, missing seeds): all right"
