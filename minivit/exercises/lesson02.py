"""Checkers for lesson 02 (backward passes by hand, checked by numbers).

    check_gelu_tanh_backward(gelu_tanh_backward)        dx from ops.gelu_forward(x, "tanh")'s cache (x, t, "tanh")
    check_log_softmax_backward(log_softmax_backward)    dx from log_softmax_forward(x, axis)'s cache (out, axis)
    check_fixed_backwards(linear_backward, softmax_backward, cross_entropy_backward)
                                                        the lesson's three buggy backward passes, fixed

Each runs the learner's backward through minivit.gradcheck.check_op in float64 on several shapes and
value ranges, and compares it with minivit's own ops on the same cache. The inputs are chosen to catch
what one input hides: large |x| for GELU (where a sech^2 written with exp overflows to NaN) and its far
left tail (compared with ops only: there a numerical derivative measures float64 rounding, as the lesson
shows), softmax axes other than the last and rows so confident that exp underflows to 0, linear layers on
2-D and on token-shaped (B, N, Din) inputs, cross-entropy with B != K, label smoothing and an upstream
dloss != 1. When an answer matches a usual mistake, the message names it. The learner's function must
leave its inputs unchanged (a backward pass that writes into dout corrupts a gradient that a residual
connection still needs). While a checker runs, the minivit functions that compute the answer raise Wrong
(ops.gelu_backward for 2.1; ops.linear_backward, ops.softmax_backward, ops.cross_entropy_backward for 2.3;
and their fastops versions). minivit has no log-softmax backward, so 2.2 forbids nothing.

Shape legend: B batch, N tokens, Din / Dout a linear layer's input / output width, K classes.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import fastops, ops
from ..backend import erf, get_array_module
from ..gradcheck import TOLERANCE, check_op, numerical_gradient, rel_error
from . import Wrong, exercise, expect_close, expect_gradients

# minivit's own answers, looked up here, before a check forbids them in their modules.
_gelu_backward = ops.gelu_backward
_linear_backward = ops.linear_backward
_softmax_backward = ops.softmax_backward
_cross_entropy_backward = ops.cross_entropy_backward

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def log_softmax_forward(x, axis=-1):
    """log(softmax(x)) along `axis`, as x - max - log(sum(exp(x - max))): never the log of 0.

    Returns (out, cache) with cache = (out, axis): exp(out) is the softmax, so nothing else is kept.
    """
    xp = get_array_module(x)
    shifted = x - x.max(axis=axis, keepdims=True)               # the row maximum becomes 0
    out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))   # same shape as x
    return out, (out, axis)


@contextlib.contextmanager
def _forbidden(*names):
    """Make ops.<name> and fastops.<name> raise Wrong for the duration: the exercise is to write it."""
    saved = [(module, name, getattr(module, name)) for name in names
             for module in (ops, fastops) if hasattr(module, name)]

    def refuse(name):
        def call(*args, **kwargs):
            raise Wrong(f"your answer calls {name}, which computes the answer for you; "
                        f"write the backward pass yourself")
        return call

    try:
        for module, name, _ in saved:
            setattr(module, name, refuse(name))
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _arrays(value):
    """Every ndarray inside value (itself, or inside nested tuples and lists)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []


def _call(name, fn, *args):
    """fn(*args), with the learner's crash turned into Wrong and a check that no input was changed."""
    before = [a.copy() for a in _arrays(args)]
    try:
        result = fn(*args)
    except (NotImplementedError, Wrong):
        raise
    except Exception as exc:                # a crash in the learner's code, e.g. shapes that do not broadcast
        raise Wrong(f"{name} raised {type(exc).__name__}: {exc}") from exc
    for old, new in zip(before, _arrays(args)):
        if not np.array_equal(old, new, equal_nan=True):
            raise Wrong(f"{name} changed one of its inputs (dout or the cache) in place: a backward pass must "
                        f"return new arrays, since the caller may still need dout (a residual connection does)")
    return result


def _shaped(name, got, shape, hint=""):
    """Raise Wrong unless got is an array of this shape with finite values."""
    if not hasattr(got, "shape"):
        raise Wrong(f"{name}: expected an array of shape {tuple(shape)}, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        raise Wrong(f"{name}: expected shape {tuple(shape)}, got {tuple(got.shape)}")
    if not np.all(np.isfinite(np.asarray(got, dtype=np.float64))):
        raise Wrong(f"{name}: NaN or infinite values. {hint}".rstrip())


def _name_mistake(name, got, right, mistakes: dict, rtol=1e-7, atol=1e-12):
    """Raise Wrong naming the mistake when got equals one of the plausible wrong answers (those that
    differ from the right answer on this input: for large |x| some wrong formulas happen to be right)."""
    for message, wrong in mistakes.items():
        if np.shape(wrong) != np.shape(right) or np.allclose(wrong, right, rtol=rtol, atol=atol):
            continue
        if got.shape == np.shape(wrong) and np.allclose(got, wrong, rtol=rtol, atol=atol):
            raise Wrong(f"{name}: {message}")


# ----------------------------------------------------------------------------- 2.1 tanh GELU backward

def _gelu_tanh_mistakes(dout, x, t):
    """Plausible wrong gradients for the tanh GELU, each named by what went wrong."""
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    phi = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    return {
        "the chain rule through u is missing: d tanh(u)/dx = (1 - t^2) * du/dx, with "
        "du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)":
            dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t)),
        "du/dx lacks the 3 of d(x^3)/dx = 3 x^2: du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)":
            dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 0.044715 * x * x)),
        "this is the derivative of the exact (erf) GELU, Phi(x) + x pdf(x); the forward pass here is the "
        "tanh approximation, whose derivative differs by up to about 1e-3":
            dout * (phi + x * pdf),
        "the local derivative is right, but it is not multiplied by dout (the chain rule: dx = dout * dy/dx)":
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
        "sech^2(u) is 1 - t^2, not 1 - t (or 1 + t)":
            dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t) * du),
    }


def _gelu_inputs(rng):
    """(name, x, gradient-checked?): several shapes and value ranges."""
    big = rng.choice([-1.0, 1.0], 12) * np.exp(rng.uniform(np.log(8.0), np.log(1e3), 12))
    return [
        ("x ~ N(0, 1), shape (3, 5, 4)", rng.standard_normal((3, 5, 4)), True),
        ("x ~ U(-4, 4), shape (2, 1, 3, 6)", rng.uniform(-4, 4, (2, 1, 3, 6)), True),
        ("x ~ 2.5 N(0, 1), shape (7,)", 2.5 * rng.standard_normal(7), True),
        ("large |x| in [8, 1000], shape (2, 6)", big.reshape(2, 6), True),
        ("a single x = 0.3, shape (1,)", np.array([0.3]), True),
        # GELU's far left tail: the numerical derivative measures rounding there (lesson 2, section 3),
        # so this range is compared with ops.gelu_backward only.
        ("the left tail x ~ U(-6, -3), shape (4, 5)", rng.uniform(-6, -3, (4, 5)), False),
    ]


@exercise("2.1 the backward pass of the tanh GELU")
def check_gelu_tanh_backward(gelu_tanh_backward):
    rng = np.random.default_rng(201)
    worst = 0.0
    with _forbidden("gelu_backward"):
        for case, x, gradcheck in _gelu_inputs(rng):
            name = f"gelu_tanh_backward on {case}"
            y, cache = ops.gelu_forward(x, "tanh")
            dout = rng.standard_normal(y.shape)
            got = _call(name, gelu_tanh_backward, dout, cache)
            _shaped(name, got, x.shape, "For large |u|, exp(2u) overflows: write sech^2(u) as 1 - t^2 "
                                        "with the cached t = tanh(u), which stays finite")
            _name_mistake(name, got, _gelu_backward(dout, cache), _gelu_tanh_mistakes(dout, x, cache[1]))
            if gradcheck:
                errors = check_op(lambda x: ops.gelu_forward(x, "tanh"),
                                  lambda d, c: _call(name, gelu_tanh_backward, d, c), {"x": x.copy()}, ("x",))
                expect_gradients(name, errors)
                worst = max(worst, errors["x"])
            # minivit's own backward on the same cache; in the far tail the values are ~1e-10, where
            # 1 - t*t and (1 - t)(1 + t) differ in their last digits, hence rtol 1e-6 and a tiny atol.
            expect_close(name, got, _gelu_backward(dout, cache), rtol=1e-6, atol=1e-14)
    return f"check_op on 5 inputs: worst rel_error {worst:.1e}; equal to ops.gelu_backward on 6 inputs"


# ----------------------------------------------------------------------------- 2.2 log-softmax backward

_SOFTMAX_CASES = [    # (shape, axis, scale): last and other axes, negative axes, a length-1 axis, huge logits
    ((2, 3, 4), -1, 1.0), ((2, 3, 4), 0, 1.0), ((2, 3, 4), 1, 2.0), ((3, 5), 0, 1.0),
    ((2, 3, 5, 5), -2, 1.0), ((4, 1, 5), 1, 1.0), ((3, 6), -1, 400.0),
]


def _log_softmax_mistakes(dout, y, axis):
    return {
        "log-softmax treated as elementwise (dx = dout * (1 - y), the diagonal of the Jacobian only): every "
        "output depends on every input along the axis, so dx_j = dout_j - y_j * sum_i dout_i":
            dout - y * dout,
        "the sum of dout along the axis is missing: dx = dout - y * sum(dout, axis) (it equals dout - y only "
        "when the upstream gradient sums to 1)":
            dout - y,
        "the sum runs over the last axis instead of `axis`":
            dout - y * dout.sum(axis=-1, keepdims=True),
    }


@exercise("2.2 the backward pass of log-softmax along any axis")
def check_log_softmax_backward(log_softmax_backward):
    rng = np.random.default_rng(202)
    worst = 0.0
    for shape, axis, scale in _SOFTMAX_CASES:
        name = f"log_softmax_backward on shape {shape}, axis {axis}" + (f", logits x{scale:g}" if scale != 1 else "")
        x = scale * rng.standard_normal(shape)
        out, cache = log_softmax_forward(x, axis)
        y = np.exp(out)
        dout = rng.standard_normal(shape)
        got = _call(name, log_softmax_backward, dout, cache)
        _shaped(name, got, shape, "These logits are so far apart that some softmax values underflow to exactly 0: "
                           "a chain rule through softmax that divides by them (dout / y) gives 0/0. Use "
                           "dx = dout - y * sum(dout, axis), which never divides")
        if shape[axis] > 1:         # along a length-1 axis log-softmax is the constant 0: nothing to name
            _name_mistake(name, got, dout - y * dout.sum(axis=axis, keepdims=True),
                          _log_softmax_mistakes(dout, y, axis))
        errors = check_op(log_softmax_forward, lambda d, c: _call(name, log_softmax_backward, d, c),
                          {"x": x, "axis": axis}, ("x",))
        expect_gradients(name, errors)
        worst = max(worst, errors["x"])
        want = dout - y * dout.sum(axis=axis, keepdims=True)
        expect_close(name, got, want, rtol=1e-9, atol=1e-12)
        if scale == 1.0:
            # the chain rule through minivit's softmax: log(softmax(x)) => dx = softmax_backward(dout / y)
            expect_close(name, got, _softmax_backward(dout / y, (y, axis)), rtol=1e-7, atol=1e-10)
    # Cross-entropy is -sum(target * log_softmax(logits)) / B: with dout = -target / B along the classes,
    # this backward must give minivit's cross_entropy_backward.
    logits = 3.0 * rng.standard_normal((5, 7))                   # (B, K)
    labels = rng.integers(0, 7, 5)                               # (B,)
    _, ce_cache = ops.cross_entropy_forward(logits, labels, 0.1)
    out, cache = log_softmax_forward(logits, -1)
    got = _call("log_softmax_backward", log_softmax_backward, -ce_cache[1] / 5, cache)
    expect_close("log_softmax_backward with dout = -target / B (cross-entropy with label smoothing 0.1)",
                 got, _cross_entropy_backward(ce_cache), rtol=1e-7, atol=1e-12)
    return (f"check_op on {len(_SOFTMAX_CASES)} (shape, axis) cases: worst rel_error {worst:.1e}; "
            f"with dout = -target / B it equals ops.cross_entropy_backward")


# ----------------------------------------------------------------------------- 2.3 find the bug

_LINEAR_CASES = [     # (x shape, Dout, bias): 2-D rows, token-shaped (B, N, Din), 4-D, square and not
    ((5, 4), 3, True), ((2, 5, 4), 3, True), ((2, 3, 4), 4, True), ((2, 3, 2, 4), 4, False), ((1, 6), 2, True),
]

_CE_CASES = [         # (B, K, label smoothing, dloss): B != K and B == K, one row, dloss != 1
    (4, 7, 0.0, 1.0), (7, 4, 0.1, 1.0), (5, 5, 0.0, 1.0), (1, 10, 0.2, 1.0), (6, 4, 0.1, 0.5),
]


def _check_linear(linear_backward, rng):
    worst = 0.0
    for x_shape, Dout, has_bias in _LINEAR_CASES:
        name = f"linear_backward on x {x_shape}, w ({Dout}, {x_shape[-1]})" + ("" if has_bias else ", no bias")
        inputs = {"x": rng.standard_normal(x_shape), "w": rng.standard_normal((Dout, x_shape[-1]))}
        if has_bias:
            inputs["b"] = rng.standard_normal(Dout)
        y, cache = ops.linear_forward(**inputs)
        dout = rng.standard_normal(y.shape)
        got = _call(name, linear_backward, dout, cache)
        if not isinstance(got, tuple) or len(got) != 3:
            raise Wrong(f"{name}: expected a tuple (dx, dw, db), got {type(got).__name__}")
        dx, dw, db = got
        want = _linear_backward(dout, cache)
        if not has_bias:
            if db is not None:
                raise Wrong(f"{name}: the layer has no bias, so db must be None (as in ops.linear_backward)")
        elif getattr(db, "shape", None) == (x_shape[-2], Dout) and len(x_shape) > 2:
            raise Wrong(f"{name}: db has shape {db.shape}: it sums dout over the first axis only. The bias is "
                        f"added to every row of every leading axis (every token of every image), so db sums "
                        f"over all of them: dout.reshape(-1, Dout).sum(axis=0)")
        if getattr(dw, "shape", None) == (x_shape[-1], Dout) != (Dout, x_shape[-1]):
            raise Wrong(f"{name}: dw has shape {dw.shape}, the transpose of w's {(Dout, x_shape[-1])}: "
                        f"dw = dout^T @ x, (Dout, M) @ (M, Din)")
        for label, a, b in zip(("dx", "dw", "db"), (dx, dw, db), want):
            if b is not None:
                _shaped(f"{name}: {label}", a, b.shape)
        if x_shape[-1] == Dout:
            _name_mistake(f"{name}: dw", dw, want[1], {"dw is transposed: dw = dout^T @ x, shape (Dout, Din); with a "
                                              "square w the shapes cannot tell": want[1].T})
        wrt = ("x", "w", "b") if has_bias else ("x", "w")
        errors = check_op(ops.linear_forward, lambda d, c: _call(name, linear_backward, d, c), inputs, wrt)
        expect_gradients(name, errors)
        worst = max(worst, *errors.values())
        for label, a, b in zip(("dx", "dw", "db"), (dx, dw, db), want):
            if b is not None:
                expect_close(f"{name}: {label}", a, b, rtol=1e-9, atol=1e-12)
    return worst


def _check_softmax(softmax_backward, rng):
    worst = 0.0
    for shape, axis, scale in _SOFTMAX_CASES:
        name = f"softmax_backward on shape {shape}, axis {axis}" + (f", logits x{scale:g}" if scale != 1 else "")
        x = scale * rng.standard_normal(shape)
        y, cache = ops.softmax_forward(x, axis)
        dout = rng.standard_normal(shape)
        got = _call(name, softmax_backward, dout, cache)
        _shaped(name, got, shape)
        if shape[axis] > 1:
            _name_mistake(name, got, _softmax_backward(dout, cache), {
                "only the Jacobian's diagonal y_i (1 - y_i) is used, as if softmax acted on each entry alone; "
                "the off-diagonal -y_i y_j terms are missing: dx = y * (dout - sum(dout * y, axis))":
                    dout * y * (1 - y),
                "the -y * sum(dout * y, axis) term is missing: dx = y * (dout - sum(dout * y, axis))":
                    dout * y,
                "the sum runs over the last axis instead of `axis`":
                    y * (dout - (dout * y).sum(axis=-1, keepdims=True)),
            })
        errors = check_op(ops.softmax_forward, lambda d, c: _call(name, softmax_backward, d, c),
                          {"x": x, "axis": axis}, ("x",))
        expect_gradients(name, errors)
        worst = max(worst, errors["x"])
        expect_close(name, got, _softmax_backward(dout, cache), rtol=1e-9, atol=1e-12)
    return worst


def _check_cross_entropy(cross_entropy_backward, rng):
    worst = 0.0
    for B, K, smoothing, dloss in _CE_CASES:
        name = (f"cross_entropy_backward on logits ({B}, {K}), label smoothing {smoothing:g}"
                + (f", dloss {dloss:g}" if dloss != 1 else ""))
        logits = 2.0 * rng.standard_normal((B, K))               # (B, K)
        labels = rng.integers(0, K, B)                           # (B,)
        _, cache = ops.cross_entropy_forward(logits, labels, smoothing)
        got = (_call(name, cross_entropy_backward, cache) if dloss == 1.0
               else _call(name, cross_entropy_backward, cache, dloss))
        want = _cross_entropy_backward(cache, dloss)
        _shaped(name, got, (B, K))
        p, target = np.exp(cache[0]), cache[1]
        mistakes = {
            f"the gradient is divided by K = {K} (the number of classes, logp.shape[1]) instead of by the "
            f"batch size B = {B} (logp.shape[0])": (p - target) * (dloss / K),
            "the 1/B of the mean over the batch is missing": (p - target) * dloss,
        }
        if dloss != 1.0:
            mistakes["dloss is ignored: the upstream gradient of the loss scales the whole result"] = (p - target) / B
        if B != K:
            _name_mistake(name, got, want, mistakes)
        numeric = numerical_gradient(lambda: dloss * ops.cross_entropy_forward(logits, labels, smoothing)[0], logits)
        error = rel_error(got, numeric)
        expect_gradients(name, {"logits": error})
        worst = max(worst, error)
        expect_close(name, got, want, rtol=1e-9, atol=1e-12)
    return worst


@exercise("2.3 find the bug: linear, softmax and cross-entropy backward, fixed")
def check_fixed_backwards(linear_backward, softmax_backward, cross_entropy_backward):
    rng = np.random.default_rng(203)
    with _forbidden("linear_backward", "softmax_backward", "cross_entropy_backward"):
        linear = _check_linear(linear_backward, rng)
        softmax = _check_softmax(softmax_backward, rng)
        cross_entropy = _check_cross_entropy(cross_entropy_backward, rng)
    return (f"worst rel_error against numerical gradients: linear {linear:.1e} ({len(_LINEAR_CASES)} shapes), "
            f"softmax {softmax:.1e} ({len(_SOFTMAX_CASES)} axes and shapes), "
            f"cross-entropy {cross_entropy:.1e} ({len(_CE_CASES)} cases); all equal to minivit's ops "
            f"(below {TOLERANCE:.0e} required)")
