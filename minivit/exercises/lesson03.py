"""Checkers for lesson 03 (the backward passes of LayerNorm and multi-head self-attention).

    check_layernorm_backward(layernorm_backward)              (dx, dw, db) from ops.layernorm_forward's cache
    check_attention_backward(attention_backward)              (dx, dqkv_w, dqkv_b, dproj_w, dproj_b) from
                                                              ops.attention_forward's cache
    check_attention_backward_fixed(attention_backward_fixed)  the same checks, for the find-the-bug exercise

Each runs the learner's backward through minivit.gradcheck.check_op in float64 (every input and every
parameter) on several shapes, then compares it with minivit's own backward on the same cache. The
shapes are chosen to catch what a single shape hides: 2-D and 4-D inputs for LayerNorm (a sum over
axes (0, 1) only fits 3-D), a large eps (a formula that assumes xhat has unit variance only holds for
eps -> 0), one head and several heads for attention (a wrong head split only shows with H > 1), and a
layer without a qkv bias. While a checker runs, ops.<op>_backward and fastops.<op>_backward of the op
being written raise Wrong, so an answer cannot just call them.

Shape legend: B batch, N tokens, D width, H heads, hs = D // H head size.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import fastops, ops
from ..gradcheck import check_op
from . import Wrong, exercise, expect_close, expect_gradients

# minivit's own answers, looked up here, before a check forbids them in their modules.
_layernorm_backward = ops.layernorm_backward
_attention_backward = ops.attention_backward


@contextlib.contextmanager
def _forbidden(name):
    """Make ops.<name> and fastops.<name> raise Wrong for the duration: the exercise is to write it."""
    saved = [(module, getattr(module, name)) for module in (ops, fastops) if hasattr(module, name)]

    def refuse(*args, **kwargs):
        raise Wrong(f"your answer calls {name}, which computes the answer for you; write the backward pass "
                    f"yourself (ops.linear_backward and ops.softmax_backward are fine to use)")

    try:
        for module, _ in saved:
            setattr(module, name, refuse)
        yield
    finally:
        for module, value in saved:
            setattr(module, name, value)


def _gradients(answer, dout, cache, names, where):
    """Call the learner's backward and check it returns one gradient per name, as a tuple or list."""
    got = answer(dout, cache)
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        raise Wrong(f"{where}: expected a tuple of {len(names)} gradients ({', '.join(names)}), "
                    f"got {type(got).__name__}" + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""))
    return tuple(got)


# ----------------------------------------------------------------------------- 3.1 LayerNorm

# (shape of x, eps, scale and offset of x): 2-D, 3-D and 4-D inputs, D from 3 to 16, and an eps
# large next to the variance, where the exact formula and the eps -> 0 one differ.
_LAYERNORM_CASES = [((2, 5, 8), 1e-6, 3.0, 1.5), ((6, 16), 1e-5, 1.0, -2.0), ((2, 3, 4, 7), 1e-6, 0.5, 0.0),
                    ((1, 1, 3), 1e-6, 2.0, 4.0), ((3, 4, 6), 0.5, 0.7, 1.0)]


@exercise("3.1 the LayerNorm backward")
def check_layernorm_backward(layernorm_backward):
    rng = np.random.default_rng(301)
    worst = {}
    with _forbidden("layernorm_backward"):
        for shape, eps, scale, offset in _LAYERNORM_CASES:
            D = shape[-1]
            x = rng.standard_normal(shape) * scale + offset              # (..., D)
            w = rng.standard_normal(D)                                   # (D,)
            b = rng.standard_normal(D)                                   # (D,)
            where = f"x of shape {shape}, eps {eps:g}"
            out, cache = ops.layernorm_forward(x, w, b, eps)
            dout = rng.standard_normal(out.shape)
            got = _gradients(layernorm_backward, dout, cache, ("dx", "dw", "db"), where)
            want = _layernorm_backward(dout, cache)
            for name, g, ref in zip(("dx", "dw", "db"), got, want):
                if getattr(g, "shape", None) != ref.shape:
                    raise Wrong(f"{where}: {name} must have shape {ref.shape}, got "
                                f"{getattr(g, 'shape', type(g).__name__)}")
            errors = check_op(ops.layernorm_forward, layernorm_backward, dict(x=x, w=w, b=b, eps=eps),
                              ("x", "w", "b"), seed=len(worst))
            expect_gradients(where, errors)
            for name, g, ref in zip(("dx", "dw", "db"), got, want):
                expect_close(f"{where}: {name} against ops.layernorm_backward", g, ref)
            for name, e in errors.items():
                worst[name] = max(worst.get(name, 0.0), e)
    return (f"{len(_LAYERNORM_CASES)} shapes and eps values; worst relative error "
            + ", ".join(f"d{k} {v:.1e}" for k, v in worst.items()) + "; equal to ops.layernorm_backward")


# ----------------------------------------------------------------------------- 3.2 and 3.3 attention

# (B, N, D, H, with a qkv bias): one head, several heads, head size 2 to 4, and no qkv bias.
_ATTENTION_CASES = [(2, 5, 8, 2, True), (1, 4, 6, 3, True), (3, 4, 8, 1, True), (2, 3, 12, 4, False),
                    (1, 6, 8, 4, True)]
_NAMES = ("dx", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")


def _check_attention(attention_backward):
    rng = np.random.default_rng(302)
    worst = {}
    with _forbidden("attention_backward"):
        for i, (B, N, D, H, has_bias) in enumerate(_ATTENTION_CASES):
            where = f"(B, N, D, H) = {(B, N, D, H)}" + ("" if has_bias else ", no qkv bias")
            # Weights around 0.5 keep the scores near 1: the softmax is neither uniform nor saturated.
            inputs = dict(x=rng.standard_normal((B, N, D)),                       # (B, N, D)
                          qkv_w=rng.standard_normal((3 * D, D)) * 0.5,             # (3D, D)
                          qkv_b=rng.standard_normal(3 * D) if has_bias else None,  # (3D,)
                          proj_w=rng.standard_normal((D, D)) * 0.5,                # (D, D)
                          proj_b=rng.standard_normal(D),                           # (D,)
                          heads=H)
            out, cache = ops.attention_forward(**inputs)
            dout = rng.standard_normal(out.shape)                                 # (B, N, D)
            got = _gradients(attention_backward, dout, cache, _NAMES, where)
            want = _attention_backward(dout, cache)
            for name, g, ref in zip(_NAMES, got, want):
                if ref is None:
                    if g is not None:
                        raise Wrong(f"{where}: {name} must be None when the layer has no qkv bias "
                                    f"(as ops.linear_backward returns), got {type(g).__name__}")
                elif getattr(g, "shape", None) != ref.shape:
                    raise Wrong(f"{where}: {name} must have shape {ref.shape}, got "
                                f"{getattr(g, 'shape', type(g).__name__)}")
            if has_bias:
                # The key bias's true gradient is exactly 0 (it shifts whole rows of scores, which the
                # softmax ignores): a relative error would only measure rounding noise, so check the q
                # and v thirds numerically and demand the k third be 0.
                wrt, entries = ("x", "qkv_w", "qkv_b", "proj_w", "proj_b"), {"qkv_b": np.r_[0:D, 2 * D:3 * D]}
                backward = attention_backward
            else:
                wrt, entries = ("x", "qkv_w", "proj_w", "proj_b"), None

                def backward(d, c):   # check_op pairs gradients with names in order: leave out dqkv_b (None)
                    dx, dqkv_w, _, dproj_w, dproj_b = attention_backward(d, c)
                    return dx, dqkv_w, dproj_w, dproj_b
            errors = check_op(ops.attention_forward, backward, inputs, wrt, seed=i, entries=entries)
            expect_gradients(where, errors)
            if has_bias and not np.abs(np.asarray(got[2][D:2 * D], dtype=np.float64)).max() < 1e-10:
                raise Wrong(f"{where}: the key bias's gradient dqkv_b[D:2D] must be 0 (it adds the same number "
                            f"to a whole row of scores, which softmax ignores); its largest entry is "
                            f"{np.abs(got[2][D:2 * D]).max():.3g}")
            for name, g, ref in zip(_NAMES, got, want):
                if ref is not None:
                    expect_close(f"{where}: {name} against ops.attention_backward", g, ref)
            for name, e in errors.items():
                worst[name] = max(worst.get(name, 0.0), e)
    return (f"{len(_ATTENTION_CASES)} shapes (1 to 4 heads, with and without a qkv bias); worst relative error "
            + ", ".join(f"d{k} {v:.1e}" for k, v in worst.items()) + "; equal to ops.attention_backward")


@exercise("3.2 the attention backward")
def check_attention_backward(attention_backward):
    return _check_attention(attention_backward)


@exercise("3.3 find the bug in an attention backward")
def check_attention_backward_fixed(attention_backward_fixed):
    return _check_attention(attention_backward_fixed)
