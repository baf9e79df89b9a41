"""Worked solutions to lesson 02's exercises (lessons/02_backward_basics.ipynb).

Try the exercises first: the notebook states each one, and minivit.exercises.lesson02 grades it.

Shape legend: B batch, N tokens, Din / Dout a linear layer's input / output width, K classes,
M = all leading axes of a linear layer's input flattened (B * N for tokens).
"""
import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh_backward(dout, cache):
    """Exercise 2.1. cache = (x, t, "tanh") from ops.gelu_forward(x, "tanh"), t = tanh(u). Returns dx."""
    x, t, _ = cache
    # forward: u = sqrt(2/pi) (x + 0.044715 x^3)  =>  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    # forward: t = tanh(u)  =>  dt/dx = (1 - t^2) du/dx; 1 - t^2 from the cached t never overflows
    # (sech^2 written with exp(2u) would give inf / inf = NaN for large |u|)
    dt = (1.0 - t * t) * du
    # forward: y = 0.5 x (1 + t)  =>  product rule: dy/dx = 0.5 (1 + t) + 0.5 x dt/dx
    return dout * (0.5 * (1.0 + t) + 0.5 * x * dt)        # same shape as x, elementwise


def log_softmax_backward(dout, cache):
    """Exercise 2.2. cache = (out, axis) from log_softmax_forward(x, axis). Returns dx."""
    out, axis = cache
    y = np.exp(out)                                        # the softmax: exp(log(softmax))
    # forward: out_i = x_i - log(sum_j exp(x_j))  =>  d out_i / d x_j = [i = j] - y_j, so
    #   dx_j = sum_i dout_i ([i = j] - y_j) = dout_j - y_j * sum_i dout_i
    return dout - y * dout.sum(axis=axis, keepdims=True)   # same shape as x; keepdims broadcasts along axis


def linear_backward_fixed(dout, cache):
    """Exercise 2.3. The bug: db summed over the first axis only. Returns (dx, dw, db)."""
    x, w, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                        # (M, Din), M = all leading axes
    dout2 = dout.reshape(-1, dout.shape[-1])               # (M, Dout)
    # forward: out = x @ w^T  =>  dx = dout @ w, dw = dout^T @ x
    dx = dout @ w                                          # (..., Din)
    dw = dout2.T @ x2                                      # (Dout, Din)
    # forward: out += b, broadcast over every row of every leading axis  =>  sum over all M rows
    db = dout2.sum(axis=0) if has_bias else None           # (Dout,)  (the bug: dout.sum(axis=0))
    return dx, dw, db


def softmax_backward_fixed(dout, cache):
    """Exercise 2.3. The bug: only the Jacobian's diagonal y (1 - y) was used. Returns dx."""
    y, axis = cache
    # forward: y_i = exp(x_i) / sum_j exp(x_j)  =>  J = diag(y) - y y^T, and J^T dout without building J:
    #   dx_j = y_j (dout_j - sum_i dout_i y_i)
    return y * (dout - (dout * y).sum(axis=axis, keepdims=True))


def cross_entropy_backward_fixed(cache, dloss=1.0):
    """Exercise 2.3. The bug: divided by K (logp.shape[-1]) instead of the batch size B. Returns dlogits."""
    logp, target = cache
    B = logp.shape[0]                                      # rows are examples, columns classes
    # forward: loss = -sum(target * logp) / B, and every target row sums to 1  =>  (softmax - target) / B
    return (np.exp(logp) - target) * (dloss / B)           # (B, K)
