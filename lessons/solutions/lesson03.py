"""Worked solutions to lesson 03's exercises (lessons/03_layernorm_attention.ipynb).

Try the exercises first: the notebook states each one, and minivit.exercises.lesson03 grades it.

Shape legend: B batch, N tokens, D width, H heads, hs = D // H head size.
"""
import numpy as np

from minivit import ops


def layernorm_backward(dout, cache):
    """Exercise 3.1. cache = (xhat, rstd, w) from ops.layernorm_forward. Returns (dx, dw, db)."""
    xhat, rstd, w = cache
    lead = tuple(range(dout.ndim - 1))               # every axis but the last: all the tokens
    # forward: out = xhat * w + b, w and b shared by every token  =>  sum over the tokens
    dw = (dout * xhat).sum(axis=lead)                # (D,)
    db = dout.sum(axis=lead)                         # (D,)
    dxhat = dout * w                                 # (..., D)
    # forward: xhat = (x - mean) * rstd, mean and rstd functions of x  =>  three terms:
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    mean_term = dxhat.mean(axis=-1, keepdims=True)                   # (..., 1), the path through the mean
    variance_term = (dxhat * xhat).mean(axis=-1, keepdims=True)      # (..., 1), the path through rstd
    dx = rstd * (dxhat - mean_term - xhat * variance_term)           # (..., D)
    return dx, dw, db


def attention_backward(dout, cache):
    """Exercise 3.2. cache from ops.attention_forward (no attention dropout).
    Returns (dx, dqkv_w, dqkv_b, dproj_w, dproj_b); dqkv_b is None without a qkv bias."""
    qkv_cache, q, k, v, scale, softmax_cache, att_d, drop_cache, proj_cache, H = cache
    A = ops.attention_probs(cache)                   # (B, H, N, N), rows sum to 1
    B, N, D = dout.shape
    hs = D // H
    # forward: out = Y @ proj_w^T + proj_b
    dY, dproj_w, dproj_b = ops.linear_backward(dout, proj_cache)    # (B, N, D)
    # forward: Y = Y.transpose(0, 2, 1, 3).reshape(B, N, D)  =>  split the heads again
    dY = dY.reshape(B, N, H, hs).transpose(0, 2, 1, 3)              # (B, H, N, hs)
    # forward: Y = A @ v  =>  dA = dY @ v^T, dv = A^T @ dY
    dA = dY @ v.swapaxes(-1, -2)                                    # (B, H, N, N)
    dv = A.swapaxes(-1, -2) @ dY                                    # (B, H, N, hs)
    # forward: A = softmax(S) along each row  =>  dS = A * (dA - rowsum(dA * A))
    dS = A * (dA - (dA * A).sum(axis=-1, keepdims=True))            # (B, H, N, N)
    # forward: S = scale * q @ k^T  =>  dq = scale * dS @ k, dk = scale * dS^T @ q
    dq = scale * dS @ k                                             # (B, H, N, hs)
    dk = scale * dS.swapaxes(-1, -2) @ q                            # (B, H, N, hs)
    # forward: q, k, v = qkv.reshape(B, N, 3, H, hs).transpose(2, 0, 3, 1, 4)  =>  undo both
    dqkv = np.stack([dq, dk, dv])                                   # (3, B, H, N, hs)
    dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)       # (B, N, 3D)
    # forward: qkv = x @ qkv_w^T + qkv_b
    dx, dqkv_w, dqkv_b = ops.linear_backward(dqkv, qkv_cache)       # (B, N, D), (3D, D), (3D,) or None
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b


def attention_backward_fixed(dout, cache):
    """Exercise 3.3: the notebook's attention_backward_buggy with its one wrong line fixed.

    The bug: `dY = dY.reshape(B, H, N, hs)` undoes the merge of the heads with a reshape alone. The
    forward pass merged them with a transpose *and* a reshape, (B, H, N, hs) -> (B, N, H, hs) ->
    (B, N, D), so the backward must reshape to (B, N, H, hs) and then transpose. With one head both
    orders are the same array, which is why the bug passes a check with H = 1.
    """
    qkv_cache, q, k, v, scale, softmax_cache, att_d, drop_cache, proj_cache, H = cache
    A = ops.attention_probs(cache)                                  # (B, H, N, N)
    B, N, D = dout.shape
    hs = D // H
    dY, dproj_w, dproj_b = ops.linear_backward(dout, proj_cache)    # (B, N, D)
    dY = dY.reshape(B, N, H, hs).transpose(0, 2, 1, 3)              # (B, H, N, hs): the fixed line
    dA = dY @ v.swapaxes(-1, -2)                                    # (B, H, N, N)
    dv = A.swapaxes(-1, -2) @ dY                                    # (B, H, N, hs)
    dS = ops.softmax_backward(dA, softmax_cache)                    # (B, H, N, N)
    dq = scale * dS @ k                                             # (B, H, N, hs)
    dk = scale * dS.swapaxes(-1, -2) @ q                            # (B, H, N, hs)
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)   # (B, N, 3D)
    dx, dqkv_w, dqkv_b = ops.linear_backward(dqkv, qkv_cache)       # (B, N, D)
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b
