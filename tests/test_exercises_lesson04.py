"""Lesson 04's exercise checkers accept the worked solutions, reject planted wrong answers, and report
a stub that still raises NotImplementedError as not attempted."""
from __future__ import annotations


import numpy as np
import pytest

from minivit import ops
from minivit.exercises import load_solutions, Wrong, lesson04

solutions = load_solutions("04")


def stub(dout, cache):
    raise NotImplementedError


CHECKERS = [
    (lesson04.check_cls_pos_backward, solutions.cls_pos_backward),
    (lesson04.check_mean_pool_backward, solutions.mean_pool_backward),
    (lesson04.check_drop_path_backward, solutions.drop_path_backward),
]


@pytest.mark.parametrize("checker, solution", CHECKERS, ids=lambda f: getattr(f, "__name__", ""))
def test_checker_accepts_the_worked_solution(checker, solution, capsys):
    assert checker(solution) is True
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("checker", [c for c, _ in CHECKERS], ids=lambda f: f.__name__)
def test_checker_reports_a_stub_as_not_attempted(checker, capsys):
    assert checker(stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- planted wrong answers

def cls_pos_no_batch_sum(dout, cache):
    # wrong: the shared cls_token and pos_embed get one gradient per image, not their sum
    (has_pos,) = cache
    return dout[:, 1:], dout[:, :1], (dout if has_pos else None)


def cls_pos_mean_over_batch(dout, cache):
    # wrong: averages over the batch instead of summing (right shapes; right only for B = 1)
    (has_pos,) = cache
    dpos = dout.mean(axis=0, keepdims=True) if has_pos else None
    return dout[:, 1:], dout[:, :1].mean(axis=0, keepdims=True), dpos


def cls_pos_keeps_cls_row(dout, cache):
    # wrong: dx keeps the [CLS] row, which was never part of x
    (has_pos,) = cache
    dpos = dout.sum(axis=0, keepdims=True) if has_pos else None
    return dout, dout[:, :1].sum(axis=0, keepdims=True), dpos


def cls_pos_calls_minivit(dout, cache):
    return ops.cls_pos_backward(dout, cache)      # right numbers, but not the exercise


@pytest.mark.parametrize("wrong", [cls_pos_no_batch_sum, cls_pos_mean_over_batch, cls_pos_keeps_cls_row,
                                   cls_pos_calls_minivit], ids=lambda f: f.__name__)
def test_cls_pos_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson04.check_cls_pos_backward(wrong)


def test_a_missing_batch_sum_passes_for_one_image_and_is_caught_by_a_batch():
    # why the checker needs B > 1: for a single image the sum over the batch is the identity
    out, cache = ops.cls_pos_forward(np.ones((1, 4, 3)), np.ones((1, 1, 3)), np.ones((1, 5, 3)))
    dout = np.random.default_rng(0).standard_normal(out.shape)
    for got, want in zip(cls_pos_mean_over_batch(dout, cache), ops.cls_pos_backward(dout, cache)):
        np.testing.assert_array_equal(got, want)


def mean_pool_over_all_tokens(dout, cache):
    # wrong: spreads the gradient over all N tokens, [CLS] included
    _, (B, N, D) = cache
    return np.broadcast_to(dout[:, None, :] / N, (B, N, D)).copy()


def mean_pool_divides_by_n(dout, cache):
    # wrong: the right tokens, but divided by N instead of N - 1
    _, (B, N, D) = cache
    dx = np.zeros((B, N, D))
    dx[:, 1:] = dout[:, None, :] / N
    return dx


def mean_pool_forgets_to_divide(dout, cache):
    _, (B, N, D) = cache
    dx = np.zeros((B, N, D))
    dx[:, 1:] = dout[:, None, :]
    return dx


@pytest.mark.parametrize("wrong", [mean_pool_over_all_tokens, mean_pool_divides_by_n, mean_pool_forgets_to_divide],
                         ids=lambda f: f.__name__)
def test_mean_pool_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson04.check_mean_pool_backward(wrong)


def drop_path_forgets_scale(dout, cache):
    # wrong: multiplies by keep but forgets the 1 / (1 - p) that the forward applied
    keep, p = cache
    return dout * keep[:, None, None]


def drop_path_scales_by_one_minus_p(dout, cache):
    keep, p = cache
    return dout * keep[:, None, None] * (1.0 - p)


def drop_path_passes_everything(dout, cache):
    # wrong: treats drop-path as the identity in the backward pass
    return dout.copy()


@pytest.mark.parametrize("wrong", [drop_path_forgets_scale, drop_path_scales_by_one_minus_p,
                                   drop_path_passes_everything], ids=lambda f: f.__name__)
def test_drop_path_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson04.check_drop_path_backward(wrong)
