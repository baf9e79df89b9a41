"""The ops of ops.py again, rewritten for speed: same names, same signatures, same
`op_forward(...) -> (out, cache)` / `op_backward(dout, cache)` convention.

ops.py is the version to read and learn from; this file is the one the modules run by
default (`minivit.modules.set_ops("reference")` switches back). tests/test_fastops.py
checks every op here against its ops.py twin (outputs and every gradient, float32 and
float64) and gradient-checks these too. A cache made here is only understood by the
backward here: switch between steps, not between a forward pass and its backward.

Where the time went in ops.py, and what is done about it (see `minivit bench --profile`
and the README's performance section for the measurements):

1. Linear layers on (B, N, D) arrays. NumPy's matmul on a stack (B, N, Din) @ (Din, Dout)
   calls BLAS once per image: B small products, each too small to use both cores.
   Here x is flattened to (B*N, Din) first, so each linear layer is ONE matrix product.
2. Elementwise work. NumPy runs one ufunc over the whole array before the next starts, on
   one core, and allocates a new array for each intermediate: a chain of ten ufuncs on a
   17 MB activation reads and writes main memory ten times. Here such chains (LayerNorm,
   GELU, softmax) run on blocks of rows that fit in the L2 cache, into reused scratch
   arrays (`out=`), on a few threads: NumPy releases the GIL inside ufuncs and matrix
   products, so the blocks really run in parallel (`set_num_threads`). Biases are added
   inside those blocks too (fc1's in the GELU, qkv's in the attention kernel).
3. Reductions over short rows. x.mean(axis=-1) on rows of D = 128 values is slow in NumPy
   (it walks one short row at a time); LayerNorm's row means and column sums are
   matrix-vector products (BLAS) instead.
4. GELU. scipy.special.erf takes ~27 ns per float32 value (it computes in float64),
   more than the fc1 matrix product before it. For float32 NumPy arrays the fast GELU
   uses the rational approximation of Abramowitz & Stegun 7.1.26 (|error of erf| <= 1.5e-7,
   the formula of PyTorch's vectorized CPU erf), built from SIMD ufuncs. float64 and CuPy
   arrays keep the exact erf. The forward pass stores GELU'(x), so the backward pass is
   one multiplication and the pre-activation need not be kept.
5. Attention. q, k and v stay strided views of the qkv output (BLAS reads strided rows
   directly), att @ v is written straight into the (B, N, H, hs) layout the output
   projection needs, and dq, dk, dv are written into one (B, N, 3, H, hs) buffer: no
   split/merge transposes and no np.stack. The probabilities are stored keys first, so the
   softmax reduces along long contiguous runs (see the attention section). Scores, softmax
   and att @ v of a block of images stay in cache; blocks run on parallel threads. An attention
   bias (the relative position bias) is added to each block's scores there too, and its gradient
   summed over the block's images before the scratch array is reused: no cost without one.

Every function works on NumPy and CuPy arrays: `xp = get_array_module(x)`, and only
calls that exist in both (ufuncs with `out=`, matmul with `out=`). On CuPy the blocks and
threads are skipped: each kernel runs once on the whole array.

Shape legend: B batch, N tokens, D width, H heads, hs head size, F MLP width,
M = B*N rows of a flattened activation, r rows of one block.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import erf, get_array_module

# These are as fast as they need to be in ops.py already, so they are shared.
from .ops import (  # noqa: F401  (re-exported: fastops offers every op of ops.py)
    check_label_smoothing,
    check_labels,
    cls_pos_backward,
    cls_pos_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    drop_path_mask,
    dropout_backward,
    dropout_forward,
    dropout_mask,
    patchify_backward,
    patchify_forward,
    pool_backward,
    pool_forward,
    pos2d_backward,
    pos2d_forward,
    rel_pos_bias_backward,
    rel_pos_bias_forward,
    relative_position_index,
    sincos_2d_pos_embed,
)
from .ops import _check_attn_bias

# ----------------------------------------------------------------------------- threads and blocks

_BLOCK_BYTES = 512 * 1024      # one block of one array (measured best: 256 KB pays more per-call
                               # overhead, 2 MB and up spill the working set out of L2)


def _default_threads() -> int:
    """$MINIVIT_NUM_THREADS, else $OMP_NUM_THREADS (what users already set to limit BLAS), else
    every core this process may run on."""
    value = os.environ.get("MINIVIT_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"$MINIVIT_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:         # OpenMP also allows lists such as "4,2": ignored here
        return int(value)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


_threads = _default_threads()
_pool = None
_pool_lock = threading.Lock()


def set_num_threads(n: int) -> int:
    """Threads for the blockwise elementwise work (default: every core). Returns the old value."""
    global _threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    old, _threads = _threads, n
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
    return old


def get_num_threads() -> int:
    return _threads


def _get_pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads - 1, thread_name_prefix="minivit")
        return _pool


def _forget_pool_after_fork():
    """A forked child has none of the parent's threads: it must start its own pool."""
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _blockwise(kernel, arrays, row_bytes, min_rows=1):
    """kernel(*blocks) on consecutive blocks of rows (axis 0) of every array in `arrays`
    (None entries are passed through), in parallel threads. Returns the kernels' results,
    in block order.

    The blocks are about _BLOCK_BYTES each, so the temporaries a kernel makes stay in
    cache. Threads take the next unprocessed block until none is left (not a fixed half
    each): on a busy machine a thread that loses its core does not hold up the others.
    A kernel must only write into its own blocks. On CuPy the kernel runs once on the
    whole arrays.
    """
    first = next(a for a in arrays if a is not None)
    rows = first.shape[0]
    if get_array_module(first) is not np:
        return [kernel(*arrays)]
    step = max(min_rows, _BLOCK_BYTES // max(1, row_bytes))
    starts = range(0, rows, step)
    results = [None] * len(starts)
    counter = itertools.count()                     # next() on it is atomic under the GIL

    def work():
        while (k := next(counter)) < len(starts):
            i = starts[k]
            results[k] = kernel(*(None if a is None else a[i:i + step] for a in arrays))

    helpers = min(_threads, len(starts)) - 1        # no more threads than blocks
    futures = [_get_pool().submit(work) for _ in range(helpers)]
    work()                                          # the calling thread works too
    for f in futures:
        f.result()
    return results


_local = threading.local()


def _scratch(like, slot, dtype=None):
    """A scratch array shaped like `like`, reused by each thread from block to block (slot
    numbers keep a kernel's scratch arrays apart). Allocating fresh temporaries for every
    block costs more than the arithmetic on them."""
    xp = get_array_module(like)
    dtype = np.dtype(dtype or like.dtype)
    if xp is not np:
        return xp.empty(like.shape, dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    n = int(np.prod(like.shape)) * dtype.itemsize
    buf = buffers.get(slot)
    if buf is None or buf.size < n:
        buf = buffers[slot] = np.empty(n, np.uint8)
    return buf[:n].view(dtype).reshape(like.shape)


def _rows(x):
    """x as a 2-D (M, last) array: a view when x is contiguous."""
    return x.reshape(-1, x.shape[-1])


def _column_sum(x):
    """Sum over every axis but the last: the gradient of a bias broadcast over rows."""
    return _rows(x).sum(axis=0)


# ----------------------------------------------------------------------------- linear

def linear_forward(x, w, b=None):
    """y = x @ w^T + b, computed as ONE (M, Din) @ (Din, Dout) product with M = all leading axes."""
    x2 = _rows(x)                                   # (M, Din)
    out = x2 @ w.T                                  # (M, Dout), one BLAS call
    if b is not None:
        out += b
    return out.reshape(x.shape[:-1] + (w.shape[0],)), (x2, w, b is not None, x.shape)


def linear_backward(dout, cache):
    """Returns (dx, dw, db); db is None when the layer has no bias."""
    x2, w, has_bias, x_shape = cache
    dout2 = _rows(dout)                             # (M, Dout)
    # forward: out = x @ w^T  =>  dx = dout @ w, dw = dout^T @ x  (BLAS reads the transposes in place)
    dx = (dout2 @ w).reshape(x_shape)               # (..., Din)
    dw = dout2.T @ x2                               # (Dout, Din)
    db = _column_sum(dout2) if has_bias else None   # (Dout,)
    return dx, dw, db


# ----------------------------------------------------------------------------- LayerNorm

def _row_mean(x, inv_d):
    """Mean over the last axis of a 2-D block, as one BLAS matrix-vector product (r,).
    NumPy's own x.mean(axis=-1) walks short rows one at a time and is ~4x slower."""
    return x @ inv_d


def _layernorm_kernel(x, w, b, eps, out, xhat, rstd):
    """One block of rows: x (r, D) -> out, xhat (r, D), rstd (r, 1)."""
    xp = get_array_module(x)
    inv_d = xp.full(x.shape[-1], 1.0 / x.shape[-1], dtype=xhat.dtype)
    mean = _row_mean(x, inv_d)                      # (r,)
    xp.subtract(x, mean[:, None], out=xhat)         # x - mean
    xp.multiply(xhat, xhat, out=out)                # out is scratch here: (x - mean)^2
    var = _row_mean(out, inv_d)                     # (r,), biased as in PyTorch
    var += eps
    xp.sqrt(var, out=var)
    xp.divide(1.0, var[:, None], out=rstd)          # 1 / sqrt(var + eps)
    xhat *= rstd
    xp.multiply(xhat, w, out=out)
    out += b


def layernorm_forward(x, w, b, eps=1e-6):
    """Normalise each token over its D channels, then scale by w and shift by b."""
    xp = get_array_module(x)
    D = x.shape[-1]
    x2 = _rows(x)                                   # (M, D)
    dtype = xp.result_type(x, w, b)
    out = xp.empty(x2.shape, dtype)
    xhat = xp.empty(x2.shape, dtype)
    rstd = xp.empty((x2.shape[0], 1), dtype)
    _blockwise(lambda x_, o_, h_, r_: _layernorm_kernel(x_, w, b, eps, o_, h_, r_),
               [x2, out, xhat, rstd], D * out.itemsize)
    return out.reshape(x.shape), (xhat, rstd, w, x.shape)


def _layernorm_backward_kernel(dout, xhat, rstd, w, dx):
    """One block: writes dx (r, D); returns this block's share of (dw, db)."""
    xp = get_array_module(dout)
    ones = xp.ones(dout.shape[0], dtype=dx.dtype)
    w_d = w * (1.0 / w.shape[0])                    # w / D: mean(a * w) over a row is a @ (w / D)
    db = ones @ dout                                # (D,), column sums as one BLAS product
    t = dout * xhat                                 # (r, D)
    dw = ones @ t                                   # (D,)
    # With dxhat = dout * w (forward: out = xhat * w + b), ops.py's formula
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    # needs the row means mean(dout * w) = dout @ (w/D) and mean(dout * xhat * w) = t @ (w/D).
    m1 = dout @ w_d                                 # (r,) mean(dxhat)
    m2 = t @ w_d                                    # (r,) mean(dxhat * xhat)
    xp.multiply(dout, w, out=dx)                    # dxhat
    xp.multiply(xhat, m2[:, None], out=t)
    dx -= t
    dx -= m1[:, None]
    dx *= rstd
    return dw, db


def layernorm_backward(dout, cache):
    """Returns (dx, dw, db)."""
    xhat, rstd, w, x_shape = cache
    xp = get_array_module(dout)
    dout2 = _rows(dout)
    dx = xp.empty(xhat.shape, xp.result_type(dout, xhat))
    parts = _blockwise(lambda d_, h_, r_, dx_: _layernorm_backward_kernel(d_, h_, r_, w, dx_),
                       [dout2, xhat, rstd, dx], xhat.shape[-1] * dx.itemsize)
    dw = parts[0][0]
    db = parts[0][1]
    for pw, pb in parts[1:]:                        # add up the blocks' column sums
        dw = dw + pw
        db = db + pb
    return dx.reshape(x_shape), dw, db


# ----------------------------------------------------------------------------- GELU

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)   # pdf(x) = exp(_LOG_INV_SQRT_2PI - x^2 / 2)

# Abramowitz & Stegun 7.1.26: erfc(z) = t (a1 + a2 t + ... + a5 t^4) exp(-z^2) + e(z),
# t = 1 / (1 + p z), z >= 0, |e(z)| <= 1.5e-7 (PyTorch's vectorized CPU erf is this formula).
# For Phi(-|x|) = erfc(|x| / sqrt 2) / 2 the factor 1/2 and exp(-z^2) = sqrt(2 pi) pdf(x)
# are folded into the coefficients Q. (np.exp2 would be faster than np.exp, but it takes a
# ~30x slower path whenever its result is subnormal, i.e. for |x| > 13 here.)
_AS_P = 0.3275911
_AS_Q = tuple(0.5 * math.sqrt(2.0 * math.pi) * a
              for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_SIGN_BIT = np.int32(-(2**31))


def _gelu_erf_f32_kernel(x, out, d):
    """float32 NumPy block: out = x Phi(x), d = GELU'(x) = Phi(x) + x pdf(x). out may be x."""
    z, t, phi = _scratch(x, 0), _scratch(x, 1), _scratch(x, 2)
    np.multiply(x, _SQRT_HALF, out=z)
    np.abs(z, out=z)                                # z = |x| / sqrt(2)
    np.add(z, 1.0 / _AS_P, out=t)
    np.divide(1.0 / _AS_P, t, out=t)                # t = 1 / (1 + p z)
    np.multiply(z, z, out=z)
    np.subtract(_LOG_INV_SQRT_2PI, z, out=z)
    pdf = np.exp(z, out=z)                          # pdf(x) = exp(-x^2 / 2) / sqrt(2 pi)
    np.multiply(t, _AS_Q[4], out=phi)               # Horner: t * Q(t)
    for q in _AS_Q[3::-1]:
        phi += q
        phi *= t
    phi *= pdf                                      # Phi(-|x|)
    # Phi(x) = Phi(-|x|) for x < 0 and 1 - Phi(-|x|) for x >= 0, i.e. 1/2 + copysign(1/2 - Phi(-|x|), x).
    # np.copysign and np.sign have no SIMD loop (8x slower than a multiply), so the sign bit of
    # x is copied with integer ops on the float32 bits.
    np.subtract(0.5, phi, out=phi)
    np.bitwise_and(x.view(np.int32), _SIGN_BIT, out=t.view(np.int32))
    np.bitwise_or(phi.view(np.int32), t.view(np.int32), out=phi.view(np.int32))
    phi += 0.5                                      # Phi(x)
    np.multiply(x, pdf, out=d)
    d += phi                                        # GELU'(x) = Phi(x) + x pdf(x)
    np.multiply(x, phi, out=out)                    # last: out may be the same array as x


def _gelu_erf_kernel(x, out, d):
    """Any dtype, NumPy or CuPy: the same, with the exact erf."""
    xp = get_array_module(x)
    phi = erf(x * _SQRT_HALF)
    phi += 1.0
    phi *= 0.5                                      # Phi(x)
    xp.multiply(x, x, out=d)
    d *= -0.5
    d += _LOG_INV_SQRT_2PI
    xp.exp(d, out=d)                                # pdf(x)
    d *= x
    d += phi                                        # GELU'(x) = Phi(x) + x pdf(x)
    xp.multiply(x, phi, out=out)


def _gelu_tanh_kernel(x, out, d):
    """out = 0.5 x (1 + t), t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3); d = GELU'(x)."""
    xp = get_array_module(x)
    c = _SQRT_2_OVER_PI
    x2 = x * x
    t = x2 * (c * 0.044715)
    t += c
    t *= x                                          # u
    xp.tanh(t, out=t)                               # t
    x2 *= 3 * c * 0.044715
    x2 += c                                         # du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    xp.multiply(t, t, out=d)
    xp.subtract(1.0, d, out=d)                      # 1 - t^2
    d *= x2
    d *= x
    d *= 0.5                                        # 0.5 x (1 - t^2) du/dx
    t += 1.0
    t *= 0.5                                        # 0.5 (1 + t)
    d += t
    xp.multiply(x, t, out=out)                      # last: out may be the same array as x


def _gelu(x, out, approximate, bias=None):
    """GELU of x (+ bias, added in place into x first) into `out` (may be x itself);
    returns GELU'(x), the backward cache."""
    xp = get_array_module(x)
    if approximate == "exact":
        kernel = _gelu_erf_f32_kernel if (xp is np and x.dtype == np.float32) else _gelu_erf_kernel
    elif approximate == "tanh":
        kernel = _gelu_tanh_kernel
    else:
        raise ValueError(f"gelu approximate must be 'exact' or 'tanh', got {approximate!r}")
    if bias is not None:                             # the bias of the layer before, added while in cache
        unbiased = kernel

        def kernel(x_, out_, d_):
            x_ += bias
            unbiased(x_, out_, d_)

    d = xp.empty_like(x)
    _blockwise(kernel, [_rows(x), _rows(out), _rows(d)], x.shape[-1] * x.itemsize)
    return d


def gelu_forward(x, approximate="exact"):
    """GELU(x) = x * Phi(x) ("exact") or its tanh approximation. The cache is GELU'(x)."""
    xp = get_array_module(x)
    out = xp.empty_like(x)
    d = _gelu(x, out, approximate)
    return out, (d,)


def gelu_backward(dout, cache):
    (d,) = cache
    # forward: out = gelu(x)  =>  dx = dout * gelu'(x), computed in the forward pass
    return dout * d


# ----------------------------------------------------------------------------- softmax

def _softmax_rows(x):
    """Softmax over the last axis, in place (x is overwritten with the probabilities)."""
    xp = get_array_module(x)
    x -= x.max(axis=-1, keepdims=True)              # the max subtraction keeps exp() finite
    xp.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)


def _softmax_rows_backward(dy, y):
    """dx = y * (dy - sum(dy * y)) over the last axis, in place in dy."""
    xp = get_array_module(dy)
    s = (dy * y).sum(axis=-1, keepdims=True)
    dy -= s
    xp.multiply(dy, y, out=dy)


def softmax_forward(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis` (the maximum subtracted first)."""
    xp = get_array_module(x)
    y = xp.moveaxis(x, axis, -1).copy()             # the copy we overwrite; x is left alone
    _softmax_rows(y)
    y = xp.moveaxis(y, -1, axis)
    return y, (y, axis)


def softmax_backward(dout, cache):
    y, axis = cache
    xp = get_array_module(dout)
    dx = xp.moveaxis(dout, axis, -1).copy()
    _softmax_rows_backward(dx, xp.moveaxis(y, axis, -1))
    return xp.moveaxis(dx, -1, axis)


# ----------------------------------------------------------------------------- self-attention
#
# Layout of the attention probabilities. ops.py keeps att as (B, H, Nq, Nk) and takes the
# softmax along its last axis: rows of only N values, which NumPy reduces one short row at
# a time (max and sum there cost more than the exp). Here they are stored keys first,
#
#     att[b, j, h, i] = probability that query i of head h attends to key j   (B, Nk, H, Nq)
#
# so the softmax reduces over axis 1 and every reduction and broadcast runs along
# contiguous runs of H*N values. For each (image, head) the (Nk, Nq) slice is an ordinary
# strided matrix, and matmul writes the scores straight into it (out=).


def _heads(a5, i):
    """Slot i (0 q, 1 k, 2 v) of a (b, N, 3, H, hs) array as a (b, H, N, hs) strided view."""
    return a5[:, :, i].transpose(0, 2, 1, 3)


def _by_head(att):
    """A keys-first (b, Nk, H, Nq) array as (b, H, Nk, Nq): per image and head, P^T."""
    return att.transpose(0, 2, 1, 3)


def _key_sum(att):
    """Sum over the keys (axis 1) of a (b, Nk, H, Nq) block: one BLAS product per image."""
    xp = get_array_module(att)
    b, N = att.shape[:2]
    ones = xp.ones(N, dtype=att.dtype)
    return (ones @ att.reshape(b, N, -1)).reshape(b, 1, *att.shape[2:])    # (b, 1, H, Nq)


def _attention_kernel(qkv5, att, mask, att_d, y, qkv_b5, scale, bias_kf):
    """One block of images: qkv bias, scores, attention bias, softmax over the keys, dropout, att @ v.

    qkv5 (b, N, 3, H, hs) holds x @ qkv_w^T; here the bias qkv_b5 (3, H, hs) is added and
    q scaled by 1/sqrt(hs), in place (the backward pass reads them so).
    att, att_d and mask are (b, Nk, H, Nq), keys first; y (b, N, D) gets the output with
    the heads side by side. bias_kf (Nk, H, Nq) is the attention bias, keys first, or None.
    """
    xp = get_array_module(att)
    b, N, _, H, hs = qkv5.shape
    if qkv_b5 is not None:
        qkv5 += qkv_b5
    qkv5[:, :, 0] *= scale
    q, k, v = _heads(qkv5, 0), _heads(qkv5, 1), _heads(qkv5, 2)     # each (b, H, N, hs)
    xp.matmul(k, q.swapaxes(-1, -2), out=_by_head(att))             # scores^T (b, H, Nk, Nq)
    if bias_kf is not None:
        att += bias_kf                              # (b, Nk, H, Nq), added while the block is in cache
    att -= att.max(axis=1, keepdims=True)           # the max subtraction keeps exp() finite
    xp.exp(att, out=att)
    att /= _key_sum(att)                            # softmax over the keys
    if mask is not None:
        xp.multiply(att, mask, out=att_d)
    else:
        att_d = att
    # y = att_d @ v per image and head: (Nq, Nk) @ (Nk, hs), written into y's (b, N, H, hs) layout
    xp.matmul(_by_head(att_d).swapaxes(-1, -2), v, out=y.reshape(b, N, H, hs).transpose(0, 2, 1, 3))


def attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, heads, attn_mask=None, attn_bias=None):
    """Multi-head self-attention with a fused qkv projection in timm's layout (as ops.py).
    attn_mask, the dropout mask on the probabilities, is (B, H, N, N) as in ops.py; attn_bias
    (H, N, N), added to the scaled scores, too (attention_backward then returns its gradient
    as a sixth value)."""
    xp = get_array_module(x)
    B, N, D = x.shape
    H = heads
    hs = D // H
    scale = hs**-0.5
    _check_attn_bias(attn_bias, H, N)
    # The bias in the keys-first layout of att, made contiguous once (H*N*N values, tiny next to
    # the scores), so that each block adds it with one broadcast add.
    bias_kf = None if attn_bias is None else xp.ascontiguousarray(attn_bias.transpose(2, 0, 1))  # (Nk, H, Nq)
    qkv, qkv_cache = linear_forward(x, qkv_w)                       # (B, N, 3D); bias added per block
    qkv5 = qkv.reshape(B, N, 3, H, hs)                              # a view: no transpose, no copy
    qkv_b5 = None if qkv_b is None else qkv_b.reshape(3, H, hs)
    att = xp.empty((B, N, H, N), qkv.dtype)                         # keys first, see above
    mask = att_d = None
    if attn_mask is not None:
        mask = xp.broadcast_to(attn_mask, (B, H, N, N)).transpose(0, 3, 1, 2)   # (B, Nk, H, Nq) view
        att_d = xp.empty(att.shape, xp.result_type(att, attn_mask))
    y = xp.empty((B, N, D), qkv.dtype)
    _blockwise(lambda *a: _attention_kernel(*a, qkv_b5, scale, bias_kf), [qkv5, att, mask, att_d, y],
               H * N * N * att.itemsize)
    out, proj_cache = linear_forward(y, proj_w, proj_b)             # (B, N, D)
    cache = (qkv_cache, qkv_b is not None, qkv5, att, mask, att_d, proj_cache, scale, attn_bias is not None)
    return out, cache


def _attention_backward_kernel(dy, qkv5, att, mask, att_d, dqkv5, scale, has_bias):
    """One block of images: from dy (b, N, D) to dq, dk, dv written into dqkv5 (b, N, 3, H, hs).
    Returns this block's sum over its images of the score gradients (Nk, H, Nq) when the
    forward pass added an attention bias, else None."""
    xp = get_array_module(dy)
    b, N, _, H, hs = qkv5.shape
    q, k, v = _heads(qkv5, 0), _heads(qkv5, 1), _heads(qkv5, 2)     # q is q / sqrt(hs)
    dq, dk, dv = _heads(dqkv5, 0), _heads(dqkv5, 1), _heads(dqkv5, 2)
    dy = dy.reshape(b, N, H, hs).transpose(0, 2, 1, 3)              # (b, H, Nq, hs) view
    p = att if mask is None else att_d
    datt = _scratch(att, 0)                                         # (b, Nk, H, Nq), keys first
    # forward: y = att_d @ v  =>  datt_d = dy @ v^T, dv = att_d^T @ dy
    xp.matmul(v, dy.swapaxes(-1, -2), out=_by_head(datt))           # datt_d^T (b, H, Nk, Nq)
    xp.matmul(_by_head(p), dy, out=dv)                              # (Nk, Nq) @ (Nq, hs)
    if mask is not None:
        datt *= mask                                                # forward: att_d = att * mask
    # forward: att = softmax over the keys  =>  ds = att * (datt - sum_keys(datt * att))
    t = xp.multiply(datt, att, out=_scratch(att, 1))
    datt -= _key_sum(t)
    datt *= att                                                     # ds^T, keys first
    # forward: s += bias (the same for every image)  =>  dbias = sum of ds over the images
    dbias_kf = datt.sum(axis=0) if has_bias else None               # (Nk, H, Nq), before datt is reused
    # forward: s = (q / sqrt(hs)) @ k^T  =>  dq = ds @ k / sqrt(hs), dk = ds^T @ (q / sqrt(hs))
    xp.matmul(_by_head(datt).swapaxes(-1, -2), k, out=dq)           # (Nq, Nk) @ (Nk, hs)
    dq *= scale
    xp.matmul(_by_head(datt), q, out=dk)                            # (Nk, Nq) @ (Nq, hs)
    return dbias_kf


def attention_probs(cache):
    """The attention probabilities as ops.attention_probs gives them, (B, H, Nq, Nk): a view of
    the keys-first (B, Nk, H, Nq) array this forward pass keeps."""
    att = cache[3]
    return att.transpose(0, 2, 3, 1)                                # (B, H, Nq, Nk)


def attention_backward(dout, cache):
    """Returns (dx, dqkv_w, dqkv_b, dproj_w, dproj_b), and dattn_bias (H, N, N) as a sixth
    value when the forward pass was given an attn_bias (as ops.py)."""
    xp = get_array_module(dout)
    qkv_cache, has_qkv_bias, qkv5, att, mask, att_d, proj_cache, scale, has_bias = cache
    B, N, _, H, hs = qkv5.shape
    dy, dproj_w, dproj_b = linear_backward(dout, proj_cache)        # (B, N, D)
    dqkv5 = xp.empty(qkv5.shape, xp.result_type(dy, qkv5))          # (B, N, 3, H, hs)
    parts = _blockwise(lambda *a: _attention_backward_kernel(*a, scale, has_bias),
                       [dy, qkv5, att, mask, att_d, dqkv5], H * N * N * att.itemsize)
    # forward: qkv = x @ qkv_w^T + qkv_b; dq, dk, dv already sit in qkv's (B, N, 3D) layout
    dqkv = dqkv5.reshape(B, N, 3 * H * hs)
    dqkv_b = _column_sum(dqkv) if has_qkv_bias else None
    dx, dqkv_w, _ = linear_backward(dqkv, qkv_cache)
    if has_bias:
        dbias_kf = parts[0]
        for part in parts[1:]:                                      # add up the blocks' sums
            dbias_kf = dbias_kf + part
        dbias = xp.ascontiguousarray(dbias_kf.transpose(1, 2, 0))   # (H, Nq, Nk), as ops.py gives it
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, dbias
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b


# ----------------------------------------------------------------------------- MLP

def mlp_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, gelu="exact", drop_mask1=None, drop_mask2=None):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. x (B, N, D) -> (B, N, D)."""
    h, fc1_cache = linear_forward(x, fc1_w)                     # (B, N, F), the bias is added below
    gelu_cache = (_gelu(h, h, gelu, bias=fc1_b),)               # h + fc1_b, then GELU, in place
    h, drop1_cache = dropout_forward(h, drop_mask1)             # (B, N, F)
    out, fc2_cache = linear_forward(h, fc2_w, fc2_b)            # (B, N, D)
    out, drop2_cache = dropout_forward(out, drop_mask2)         # (B, N, D)
    return out, (fc1_cache, gelu_cache, drop1_cache, fc2_cache, drop2_cache)


def mlp_backward(dout, cache):
    """Returns (dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b)."""
    fc1_cache, gelu_cache, drop1_cache, fc2_cache, drop2_cache = cache
    dout = dropout_backward(dout, drop2_cache)                  # forward: out = dropout(out)
    dh, dfc2_w, dfc2_b = linear_backward(dout, fc2_cache)       # forward: out = fc2(h); dh is ours
    if drop1_cache is not None:
        dh *= drop1_cache                                       # forward: h = dropout(h)
    dh = gelu_backward(dh, gelu_cache)                          # forward: h = gelu(h)
    dfc1_b = _column_sum(dh)                                    # forward: h += fc1_b
    dx, dfc1_w, _ = linear_backward(dh, fc1_cache)              # forward: h = x @ fc1_w^T
    return dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b
