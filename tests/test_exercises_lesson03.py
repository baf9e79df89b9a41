"""Lesson 03's exercise checkers accept the worked solutions and reject plausible wrong answers."""

import numpy as np
import pytest

from minivit import fastops, ops
from minivit.exercises import load_solutions, Wrong, lesson03

solutions = load_solutions("03")


def _stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- 3.1 LayerNorm

def _layernorm_backward(bug):
    """The solution with one plausible mistake planted."""
    def backward(dout, cache):
        xhat, rstd, w = cache
        lead = (0, 1) if bug == "sums over axes (0, 1)" else tuple(range(dout.ndim - 1))
        dw, db = (dout * xhat).sum(axis=lead), dout.sum(axis=lead)
        dxhat = dout * w
        dx = dxhat.copy()
        if bug != "no mean term":
            dx -= dxhat.mean(-1, keepdims=True)
        if bug == "eps -> 0":        # right only if xhat had unit variance, i.e. eps = 0
            dx -= xhat * (dxhat * xhat).mean(-1, keepdims=True) / (xhat * xhat).mean(-1, keepdims=True)
        elif bug != "no variance term":
            dx -= xhat * (dxhat * xhat).mean(-1, keepdims=True)
        return dx * rstd, dw, db
    return backward


def test_layernorm_accepts_the_solution(capsys):
    assert lesson03.check_layernorm_backward(solutions.layernorm_backward) is True
    assert "PASSED: 3.1" in capsys.readouterr().out


@pytest.mark.parametrize("bug, message", [
    ("no variance term", "gradient check fails: relative error dx"),
    ("no mean term", "gradient check fails: relative error dx"),
    ("eps -> 0", "relative error dx"),              # small at eps 1e-6 (4e-6), large at eps 0.5
    ("sums over axes (0, 1)", "dw must have shape"),  # only 3-D inputs hide it
])
def test_layernorm_rejects_planted_bugs(bug, message):
    with pytest.raises(Wrong, match=message):
        lesson03.check_layernorm_backward(_layernorm_backward(bug))


def test_layernorm_rejects_calling_the_reference():
    with pytest.raises(Wrong, match="computes the answer for you"):
        lesson03.check_layernorm_backward(lambda dout, cache: ops.layernorm_backward(dout, cache))
    assert ops.layernorm_backward.__name__ == "layernorm_backward"        # put back afterwards
    assert fastops.layernorm_backward.__name__ == "layernorm_backward"


def test_layernorm_stub_is_not_attempted(capsys):
    assert lesson03.check_layernorm_backward(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3.2 and 3.3 attention

def _attention_backward(bug):
    """The solution with one plausible mistake planted."""
    def backward(dout, cache):
        qkv_cache, q, k, v, scale, softmax_cache, att_d, drop_cache, proj_cache, H = cache
        A = ops.attention_probs(cache)
        B, N, D = dout.shape
        hs = D // H
        dY, dproj_w, dproj_b = ops.linear_backward(dout, proj_cache)
        if bug == "heads merged back by a reshape only":
            dY = dY.reshape(B, H, N, hs)
        else:
            dY = dY.reshape(B, N, H, hs).transpose(0, 2, 1, 3)
        dA = dY @ v.swapaxes(-1, -2)
        dv = A.swapaxes(-1, -2) @ dY
        dS = dA if bug == "no softmax backward" else A * (dA - (dA * A).sum(-1, keepdims=True))
        c = 1.0 if bug == "no scale" else scale
        dq = c * dS @ k
        dk = c * (dS if bug == "dS not transposed in dk" else dS.swapaxes(-1, -2)) @ q
        dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)
        dx, dqkv_w, dqkv_b = ops.linear_backward(dqkv, qkv_cache)
        if bug == "zeros instead of None" and dqkv_b is None:
            dqkv_b = np.zeros(3 * D)
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b
    return backward


ATTENTION_BUGS = [
    ("no softmax backward", "gradient check fails: relative error dx"),
    ("dS not transposed in dk", "gradient check fails: relative error dx"),
    ("no scale", "gradient check fails: relative error dx"),
    ("heads merged back by a reshape only", r"H\) = \(2, 5, 8, 2\).*gradient check fails"),
    ("zeros instead of None", "must be None"),
]


def test_attention_accepts_the_solutions(capsys):
    assert lesson03.check_attention_backward(solutions.attention_backward) is True
    assert lesson03.check_attention_backward_fixed(solutions.attention_backward_fixed) is True
    out = capsys.readouterr().out
    assert "PASSED: 3.2" in out and "PASSED: 3.3" in out


@pytest.mark.parametrize("bug, message", ATTENTION_BUGS)
def test_attention_rejects_planted_bugs(bug, message):
    with pytest.raises(Wrong, match=message):
        lesson03.check_attention_backward(_attention_backward(bug))


@pytest.mark.parametrize("bug", ["heads merged back by a reshape only", "dS not transposed in dk"])
def test_find_the_bug_rejects_the_bug_and_another(bug):
    with pytest.raises(Wrong):
        lesson03.check_attention_backward_fixed(_attention_backward(bug))


def test_the_head_merge_bug_hides_with_one_head():
    """Why the checkers run several heads: with H = 1 the buggy reshape is the right array."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 4, 6)), rng.standard_normal((18, 6)), rng.standard_normal(18)
    pw, pb = rng.standard_normal((6, 6)), rng.standard_normal(6)
    for H, same in [(1, True), (2, False)]:
        out, cache = ops.attention_forward(x, w, b, pw, pb, H)
        dout = rng.standard_normal(out.shape)
        got = _attention_backward("heads merged back by a reshape only")(dout, cache)[0]
        assert np.allclose(got, ops.attention_backward(dout, cache)[0]) is same


def test_attention_rejects_calling_the_reference():
    with pytest.raises(Wrong, match="computes the answer for you"):
        lesson03.check_attention_backward(lambda dout, cache: ops.attention_backward(dout, cache))
    with pytest.raises(Wrong, match="computes the answer for you"):
        lesson03.check_attention_backward_fixed(lambda dout, cache: fastops.attention_backward(dout, cache))
    assert ops.attention_backward.__name__ == "attention_backward"
    assert fastops.attention_backward.__name__ == "attention_backward"


def test_attention_stubs_are_not_attempted(capsys):
    assert lesson03.check_attention_backward(_stub) is False
    assert lesson03.check_attention_backward_fixed(_stub) is False
    assert capsys.readouterr().out.count("NOT ATTEMPTED YET") == 2
