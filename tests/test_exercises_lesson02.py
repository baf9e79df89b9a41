"""Lesson 02's exercise checkers accept the worked solutions and reject plausible wrong answers.

The find-the-bug exercise (2.3) is tested with the lesson's own buggy functions, read from the notebook,
so the planted bugs here are exactly the ones a learner sees.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from minivit import ops
from minivit.exercises import load_solutions, Wrong, lesson02

ROOT = Path(__file__).resolve().parents[1]
solutions = load_solutions("02")

_C = math.sqrt(2.0 / math.pi)


def _stub(*args):
    raise NotImplementedError


def _lesson_buggy_functions():
    """The three buggy backward passes, executed from the notebook's own cell."""
    cells = json.loads((ROOT / "lessons" / "02_backward_basics.ipynb").read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells
                  if c["cell_type"] == "code" and "def linear_backward_buggy" in "".join(c["source"]))
    source = source.split("\n# the checks their authors ran")[0]       # the definitions only
    namespace = {"np": np, "ops": ops}
    exec(source, namespace)
    return tuple(namespace[f"{op}_backward_buggy"] for op in ("linear", "softmax", "cross_entropy"))


LINEAR_BUGGY, SOFTMAX_BUGGY, CE_BUGGY = _lesson_buggy_functions()


# ----------------------------------------------------------------------------- 2.1 tanh GELU backward

def test_gelu_tanh_accepts_the_solution(capsys):
    assert lesson02.check_gelu_tanh_backward(solutions.gelu_tanh_backward) is True
    assert "PASSED" in capsys.readouterr().out


def _gelu_tanh(local):
    """A backward pass dout * local(x, t) for the tanh GELU's cache (x, t, "tanh")."""
    def backward(dout, cache):
        x, t, _ = cache
        return dout * local(x, t)
    return backward


@pytest.mark.parametrize("answer, message", [
    (_gelu_tanh(lambda x, t: 0.5 * (1 + t) + 0.5 * x * (1 - t * t)), "chain rule through u is missing"),
    (_gelu_tanh(lambda x, t: 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 0.044715 * x * x)), "lacks the 3"),
    (lambda dout, cache: ops.gelu_backward(dout, (cache[0], ops.gelu_forward(cache[0])[1][1], "exact")),
     "computes the answer for you"),
    (_gelu_tanh(lambda x, t: 0.5 * (1 + t) + 0.5 * x * (1 - t) * _C * (1 + 3 * 0.044715 * x * x)), "1 - t"),
    (lambda dout, cache: solutions.gelu_tanh_backward(np.ones_like(dout), cache), "not multiplied by dout"),
])
def test_gelu_tanh_rejects_wrong_derivatives(answer, message):
    with pytest.raises(Wrong, match=message):
        lesson02.check_gelu_tanh_backward(answer)


def test_gelu_tanh_rejects_the_exact_gelus_derivative():
    def exact_derivative(dout, cache):           # Phi + x pdf: right for the other GELU
        x = cache[0]
        return dout * (0.5 * (1 + ops.erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi))
    with pytest.raises(Wrong, match="exact \\(erf\\) GELU"):
        lesson02.check_gelu_tanh_backward(exact_derivative)


def test_gelu_tanh_rejects_an_overflowing_sech2_and_in_place_writes():
    def sech2_with_exp(dout, cache):             # right formula, but exp(2u) overflows for large |x|
        x, t, _ = cache
        u = _C * (x + 0.044715 * x**3)
        with np.errstate(over="ignore", invalid="ignore"):
            sech2 = 4 * np.exp(2 * u) / (np.exp(2 * u) + 1) ** 2
        return dout * (0.5 * (1 + t) + 0.5 * x * sech2 * _C * (1 + 3 * 0.044715 * x * x))

    def in_place(dout, cache):
        dout *= solutions.gelu_tanh_backward(np.ones_like(dout), cache)
        return dout

    with pytest.raises(Wrong, match="NaN or infinite"):
        lesson02.check_gelu_tanh_backward(sech2_with_exp)
    with pytest.raises(Wrong, match="in place"):
        lesson02.check_gelu_tanh_backward(in_place)
    assert ops.gelu_backward.__name__ == "gelu_backward"     # the guard put the real function back


def test_gelu_tanh_stub_is_not_attempted(capsys):
    assert lesson02.check_gelu_tanh_backward(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2.2 log-softmax backward

def test_log_softmax_accepts_the_solution(capsys):
    assert lesson02.check_log_softmax_backward(solutions.log_softmax_backward) is True
    assert "PASSED" in capsys.readouterr().out


def _log_softmax(rule):
    def backward(dout, cache):
        out, axis = cache
        return rule(dout, np.exp(out), axis)
    return backward


@pytest.mark.parametrize("answer, message", [
    (_log_softmax(lambda g, y, axis: g - y * g), "treated as elementwise"),
    (_log_softmax(lambda g, y, axis: g - y), "sum of dout along the axis is missing"),
    (_log_softmax(lambda g, y, axis: g - y * g.sum(axis=-1, keepdims=True)), "last axis instead of `axis`"),
    (_log_softmax(lambda g, y, axis: g - y * g.sum(axis=axis)), None),  # no keepdims: wrong broadcast or a crash
    # the chain rule through softmax, dividing by y: 0/0 where softmax underflows
    (_log_softmax(lambda g, y, axis: ops.softmax_backward(g / y, (y, axis))), "underflow"),
])
def test_log_softmax_rejects_wrong_answers(answer, message):
    with np.errstate(divide="ignore", invalid="ignore"):
        with pytest.raises(Wrong, match=message):
            lesson02.check_log_softmax_backward(answer)


def test_log_softmax_stub_is_not_attempted(capsys):
    assert lesson02.check_log_softmax_backward(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2.3 find the bug

FIXED = (solutions.linear_backward_fixed, solutions.softmax_backward_fixed, solutions.cross_entropy_backward_fixed)


def test_fixed_backwards_accepts_the_solutions(capsys):
    assert lesson02.check_fixed_backwards(*FIXED) is True
    assert "PASSED" in capsys.readouterr().out


def test_the_lessons_buggy_functions_are_really_wrong():
    # each bug is real: the buggy function disagrees with the fixed one on a ViT-shaped input ...
    x, w, b = np.ones((2, 5, 4)), np.ones((3, 4)), np.ones(3)
    cache = ops.linear_forward(x, w, b)[1]
    assert LINEAR_BUGGY(np.ones((2, 5, 3)), cache)[2].shape == (5, 3)
    y, cache = ops.softmax_forward(np.arange(6.0).reshape(2, 3))
    dout = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    assert not np.allclose(SOFTMAX_BUGGY(dout, cache), solutions.softmax_backward_fixed(dout, cache))
    _, cache = ops.cross_entropy_forward(np.zeros((4, 7)), np.arange(4))
    assert np.allclose(CE_BUGGY(cache) * 7, solutions.cross_entropy_backward_fixed(cache) * 4)


@pytest.mark.parametrize("which, message", [
    (0, "sums dout over the first axis only"),          # the lesson's linear_backward_buggy
    (1, "only the Jacobian's diagonal"),                # the lesson's softmax_backward_buggy
    (2, "divided by K"),                                # the lesson's cross_entropy_backward_buggy
])
def test_fixed_backwards_rejects_each_original_bug(which, message):
    answers = list(FIXED)
    answers[which] = (LINEAR_BUGGY, SOFTMAX_BUGGY, CE_BUGGY)[which]
    with pytest.raises(Wrong, match=message):
        lesson02.check_fixed_backwards(*answers)


def _linear_transposed_dw(dout, cache):
    dx, dw, db = solutions.linear_backward_fixed(dout, cache)
    return dx, dw.T, db


def _linear_zero_bias_grad(dout, cache):                # returns zeros instead of None without a bias
    dx, dw, db = solutions.linear_backward_fixed(dout, cache)
    return dx, dw, np.zeros(cache[1].shape[0]) if db is None else db


def _softmax_missing_term(dout, cache):
    y, axis = cache
    return dout * y


def _ce_without_mean(cache, dloss=1.0):
    logp, target = cache
    return (np.exp(logp) - target) * dloss


def _ce_ignores_dloss(cache, dloss=1.0):
    return solutions.cross_entropy_backward_fixed(cache)


@pytest.mark.parametrize("which, answer, message", [
    (0, _linear_transposed_dw, "transpose"),
    (0, _linear_zero_bias_grad, "db must be None"),
    (0, lambda dout, cache: ops.linear_backward(dout, cache), "computes the answer for you"),
    (1, _softmax_missing_term, "term is missing"),
    (1, lambda dout, cache: cache[0] * (dout - (dout * cache[0]).sum(axis=-1, keepdims=True)), "last axis"),
    (2, _ce_without_mean, "1/B of the mean"),
    (2, _ce_ignores_dloss, "dloss is ignored"),
])
def test_fixed_backwards_rejects_other_wrong_fixes(which, answer, message):
    answers = list(FIXED)
    answers[which] = answer
    with pytest.raises(Wrong, match=message):
        lesson02.check_fixed_backwards(*answers)
    assert ops.linear_backward.__name__ == "linear_backward"   # the guard put the real functions back


def test_fixed_backwards_stub_is_not_attempted(capsys):
    assert lesson02.check_fixed_backwards(*FIXED[:2], _stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out
