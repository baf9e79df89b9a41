"""Lesson 07's exercise checkers accept the worked solutions, reject planted wrong answers, and report
a stub that still raises NotImplementedError as not attempted."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from minivit.exercises import Wrong, lesson07, load_solutions

solutions = load_solutions("07")


def stub(*args):
    raise NotImplementedError


# ---- exercise 1: GAP forward and backward

def gap_forward_with_cls(x):
    """The mean over all N tokens, [CLS] included (what a plain x.mean(axis=1) does)."""
    return x.mean(axis=1), x.shape


def gap_backward_over_n(dout, cache):
    """The right slots, but divided by N instead of N - 1 (the number of tokens, not of patches)."""
    B, N, D = cache
    dx = np.zeros((B, N, D))
    dx[:, 1:] = dout[:, None, :] / N
    return dx


def gap_backward_into_cls_too(dout, cache):
    """dout / (N - 1) in every slot, [CLS] included: the forward pass never read token 0."""
    B, N, D = cache
    return np.broadcast_to(dout[:, None, :] / (N - 1), (B, N, D)).copy()


def test_gap(capsys):
    assert lesson07.check_gap(solutions.gap_forward, solutions.gap_backward) is True
    assert "PASSED" in capsys.readouterr().out
    for forward, backward in ((gap_forward_with_cls, solutions.gap_backward),
                              (solutions.gap_forward, gap_backward_over_n),
                              (solutions.gap_forward, gap_backward_into_cls_too)):
        with pytest.raises(Wrong):
            lesson07.check_gap(forward, backward)
    assert lesson07.check_gap(stub, stub) is False
    assert lesson07.check_gap(solutions.gap_forward, stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


# ---- exercise 2: more than seed noise?

def ranges_do_not_overlap(a, b):
    """'Real' when every seed of one beats every seed of the other: weaker than the lesson's rule."""
    d = statistics.fmean(a) - statistics.fmean(b)
    return d, bool(min(a) > max(b) or min(b) > max(a))


def against_the_mean_range(a, b):
    """The difference against the average of the two ranges instead of the larger one."""
    d = statistics.fmean(a) - statistics.fmean(b)
    return d, bool(abs(d) > ((max(a) - min(a)) + (max(b) - min(b))) / 2)


def only_a_ahead_counts(a, b):
    """Forgets the absolute value: a difference in B's favour is never 'real'."""
    d = statistics.fmean(a) - statistics.fmean(b)
    return d, bool(d > max(max(a) - min(a), max(b) - min(b)))


def b_minus_a(a, b):
    d = statistics.fmean(b) - statistics.fmean(a)
    return d, bool(abs(d) > max(max(a) - min(a), max(b) - min(b)))


def a_tie_counts(a, b):
    """>= instead of >: a difference exactly as large as the seed range is called real."""
    d = statistics.fmean(a) - statistics.fmean(b)
    return d, bool(abs(d) >= max(max(a) - min(a), max(b) - min(b)))


@pytest.mark.parametrize("wrong", [ranges_do_not_overlap, against_the_mean_range, only_a_ahead_counts, b_minus_a,
                                   a_tie_counts])
def test_compare_variants_rejects(wrong):
    with pytest.raises(Wrong):
        lesson07.check_compare_variants(wrong)


def test_compare_variants(capsys):
    assert lesson07.check_compare_variants(solutions.compare_variants) is True
    assert "PASSED" in capsys.readouterr().out
    assert lesson07.check_compare_variants(stub) is False


def test_compare_variants_cases_are_what_they_say():
    # independent of the checker's own reference: the cases' verdicts worked by hand
    verdicts = [real for (_, real) in (solutions.compare_variants(a, b) for a, b, _ in lesson07.COMPARE_CASES)]
    assert verdicts == [True, True, False, True, False, False, True, False, True]


# ---- exercise 3: best learning rate per pooling

def best_single_run(rows):
    """The learning rate of the single best run, and its accuracy: picks the luckiest seed."""
    out = {}
    for r in rows:
        if r["pool"] not in out or float(r["test_acc"]) > out[r["pool"]][1]:
            out[r["pool"]] = (float(r["lr"]), float(r["test_acc"]))
    return out


def best_epoch_column(rows):
    """The mean of best_test_acc (each run's best epoch, picked by looking at the test set)."""
    acc = {}
    for r in rows:
        acc.setdefault(r["pool"], {}).setdefault(float(r["lr"]), []).append(float(r["best_test_acc"]))
    return {p: max(((lr, statistics.fmean(v)) for lr, v in d.items()), key=lambda t: t[1]) for p, d in acc.items()}


def sum_not_mean(rows):
    """Sums the seeds' accuracies: favours a learning rate with more finished seeds."""
    acc = {}
    for r in rows:
        acc.setdefault(r["pool"], {}).setdefault(float(r["lr"]), []).append(float(r["test_acc"]))
    return {p: max(((lr, sum(v)) for lr, v in d.items()), key=lambda t: t[1]) for p, d in acc.items()}


@pytest.mark.parametrize("wrong", [best_single_run, best_epoch_column, sum_not_mean])
def test_best_lr_rejects(wrong):
    with pytest.raises(Wrong):
        lesson07.check_best_lr(wrong)


def test_best_lr(capsys):
    assert lesson07.check_best_lr(solutions.best_lr) is True
    assert "PASSED" in capsys.readouterr().out
    assert lesson07.check_best_lr(stub) is False


def test_best_lr_on_a_case_worked_by_hand():
    _, rows = lesson07.BEST_LR_CASES[0]
    assert solutions.best_lr(rows) == {"cls": (0.001, pytest.approx(0.55)), "mean": (0.001, pytest.approx(0.525))}


def test_checkers_want_a_function():
    with pytest.raises(TypeError):
        lesson07.check_best_lr(None)
