"""Every op of the Vision Transformer as a pair of pure functions.

    out, cache = op_forward(inputs...)
    dinputs... = op_backward(dout, cache)

`cache` holds what the backward pass needs from the forward pass. `d<name>` is the
gradient of the loss with respect to `<name>`. Each backward step names the forward
line it undoes. The functions work on NumPy and CuPy arrays alike: `xp` is the array
module of the input (see backend.py). Randomness (dropout) is passed in as a mask so
the functions stay pure and can be gradient-checked with a fixed mask.

Shape legend:
    B batch, C channels, S image side, P patch side, G = S // P patches per side,
    N tokens (G*G patches + 1 [CLS]), D width, H heads, hs head size, F MLP width,
    K classes, Din / Dout a linear layer's input / output width, T = (2G-1)^2 + 3 rows
    of a relative position bias table.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import erf, get_array_module, uniform


# ----------------------------------------------------------------------------- linear

def linear_forward(x, w, b=None):
    """y = x @ w^T + b over the last axis. w is (Dout, Din) as in PyTorch and timm."""
    out = x @ w.T                                   # (..., Din) @ (Din, Dout) -> (..., Dout)
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def linear_backward(dout, cache):
    """Returns (dx, dw, db); db is None when the layer has no bias."""
    x, w, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])                 # (M, Din), M = all leading axes
    dout2 = dout.reshape(-1, dout.shape[-1])        # (M, Dout)
    # forward: out = x @ w^T  =>  dx = dout @ w, dw = dout^T @ x
    dx = dout @ w                                   # (..., Din)
    dw = dout2.T @ x2                               # (Dout, Din)
    # forward: out += b (broadcast over every row)  =>  db = sum of dout over rows
    db = dout2.sum(axis=0) if has_bias else None    # (Dout,)
    return dx, dw, db


# ----------------------------------------------------------------------------- patches

def patchify_forward(x, patch_size):
    """Cut images into non-overlapping patches and flatten each one in (C, P, P) order.

    That order makes a convolution weight (D, C, P, P) reshaped to (D, C*P*P) exactly
    the weight of a linear layer on these patches: a P x P convolution with stride P
    *is* a linear layer applied to each patch.
    """
    B, C, S, S2 = x.shape
    P = patch_size
    G = S // P
    out = x.reshape(B, C, G, P, G, P)               # (B, C, Gy, P, Gx, P)
    out = out.transpose(0, 2, 4, 1, 3, 5)           # (B, Gy, Gx, C, P, P)
    out = out.reshape(B, G * G, C * P * P)          # (B, G*G, C*P*P), patches in row-major order
    return out, (x.shape, P)


def patchify_backward(dout, cache):
    """Route each patch's gradient back to its pixels (the exact inverse rearrangement)."""
    (B, C, S, _), P = cache
    G = S // P
    # forward: reshape(B, G*G, C*P*P)  =>  split the patch axes again
    dx = dout.reshape(B, G, G, C, P, P)             # (B, Gy, Gx, C, P, P)
    # forward: transpose(0, 2, 4, 1, 3, 5)  =>  its inverse permutation
    dx = dx.transpose(0, 3, 1, 4, 2, 5)             # (B, C, Gy, P, Gx, P)
    # forward: reshape(B, C, G, P, G, P)  =>  back to images
    return dx.reshape(B, C, S, S)                   # (B, C, S, S)


# ----------------------------------------------------------------------------- [CLS] and positions

def cls_pos_forward(x, cls_token, pos_embed=None):
    """Prepend the learnable [CLS] token to every sequence, then add position embeddings.

    x (B, G*G, D), cls_token (1, 1, D), pos_embed (1, N, D) or None. Returns (B, N, D).
    """
    xp = get_array_module(x)
    B, _, D = x.shape
    cls = xp.broadcast_to(cls_token, (B, 1, D))     # (B, 1, D), the same token for every image
    out = xp.concatenate([cls, x], axis=1)          # (B, N, D)
    if pos_embed is not None:
        out += pos_embed                            # (B, N, D), one vector per position
    return out, (pos_embed is not None,)


def cls_pos_backward(dout, cache):
    """Returns (dx, dcls_token, dpos_embed); dpos_embed is None without position embeddings."""
    (has_pos,) = cache
    # forward: out += pos_embed (broadcast over the batch)  =>  sum over the batch
    dpos = dout.sum(axis=0, keepdims=True) if has_pos else None   # (1, N, D)
    # forward: out = concatenate([cls, x], axis=1)  =>  split the gradient the same way
    dx = dout[:, 1:]                                               # (B, G*G, D)
    # forward: cls = broadcast_to(cls_token, (B, 1, D))  =>  sum over the batch
    dcls = dout[:, :1].sum(axis=0, keepdims=True)                  # (1, 1, D)
    return dx, dcls, dpos


def sincos_2d_pos_embed(dim, grid_size, xp=np, dtype=np.float32):
    """Fixed 2D sine-cosine position embeddings (1, 1 + G*G, D), zero for [CLS].

    A quarter of the channels encode the row with sines, a quarter with cosines, and
    the same for the column, at frequencies 1 / 10000^(i / (D/4)) (MoCo v3, MAE).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)    # (D/4,)
    gy, gx = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    ang_y = gy.reshape(-1, 1) * omega                                          # (G*G, D/4)
    ang_x = gx.reshape(-1, 1) * omega                                          # (G*G, D/4)
    grid = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)  # (G*G, D)
    table = np.concatenate([np.zeros((1, dim)), grid], axis=0)[None]           # (1, N, D)
    return xp.asarray(table.astype(dtype))


def pos2d_forward(row, col, cls_pos):
    """Learned 2-D position embeddings (the paper's App. D.4): a table (1, N, D) built from a
    row embedding and a column embedding of D/2 channels each, plus [CLS]'s own position.

    row (G, D/2): one vector per patch row (the Y embedding); col (G, D/2): one per patch column
    (the X embedding); cls_pos (1, 1, D): [CLS] has no place in the grid, so it gets a vector of
    its own. Patch (i, j) (row i, column j) is token 1 + i*G + j, the row-major order of
    patchify_forward and sincos_2d_pos_embed, and gets concat(col[j], row[i]): X first, then Y,
    as the paper words it and as sincos_2d_pos_embed orders its sines of x before those of y.
    Only 2*G*D/2 + D numbers instead of N*D: the table cannot say anything about a patch that is
    not the sum of what its row and its column say.
    """
    xp = get_array_module(row)
    if row.ndim != 2 or col.shape != row.shape or cls_pos.shape != (1, 1, 2 * row.shape[1]):
        raise ValueError(f"pos2d_forward expects row and col (G, D/2) and cls_pos (1, 1, D), got "
                         f"{tuple(row.shape)}, {tuple(col.shape)} and {tuple(cls_pos.shape)}")
    G, half = row.shape
    cols = xp.broadcast_to(col[None, :, :], (G, G, half))          # (G, G, D/2), [i, j] = col[j]
    rows = xp.broadcast_to(row[:, None, :], (G, G, half))          # (G, G, D/2), [i, j] = row[i]
    grid = xp.concatenate([cols, rows], axis=-1)                    # (G, G, D)
    grid = grid.reshape(1, G * G, 2 * half)                         # (1, G*G, D), row-major
    pos = xp.concatenate([cls_pos, grid], axis=1)                   # (1, N, D)
    return pos, (G, half)


def pos2d_backward(dpos, cache):
    """Returns (drow, dcol, dcls_pos) from dpos (1, N, D)."""
    G, half = cache
    # forward: pos = concatenate([cls_pos, grid], axis=1)  =>  split the gradient the same way
    dcls_pos = dpos[:, :1].copy()                                   # (1, 1, D), a fresh array like every grad
    dgrid = dpos[0, 1:].reshape(G, G, 2 * half)                     # (G, G, D)
    # forward: grid = concatenate([cols, rows], axis=-1)  =>  first half to col, second to row;
    # forward: cols = broadcast of col[j] to every row i  =>  sum over the rows i (axis 0)
    dcol = dgrid[:, :, :half].sum(axis=0)                           # (G, D/2)
    # forward: rows = broadcast of row[i] to every column j  =>  sum over the columns j (axis 1)
    drow = dgrid[:, :, half:].sum(axis=1)                           # (G, D/2)
    return drow, dcol, dcls_pos


# ----------------------------------------------------------------------------- relative position bias

def relative_position_index(grid_size):
    """For every (query token, key token) pair, the row of BEiT's relative position bias table
    that holds its bias: an (N, N) integer array, N = 1 + G*G, [CLS] first.

    Patch p = i*G + j sits at row i, column j. Between query patch (i, j) and key patch (i2, j2)
    the offset is (dy, dx) = (i - i2, j - j2), each in [-(G-1), G-1]: 2G-1 values per axis.
    Shifted by G-1 into [0, 2G-2], the pair is numbered row-major in a (2G-1) x (2G-1) grid,
        index = (dy + G - 1) * (2G - 1) + (dx + G - 1),
    so every pair of patches with the same offset shares one entry, wherever it is in the image
    (translation equivariance). The last three rows are for [CLS], which has no place:
        T-3  [CLS] query -> any patch key,  T-2  patch query -> [CLS] key,  T-1  [CLS] -> [CLS],
    with T = (2G-1)^2 + 3 rows in all, as in BEiT (timm's beit.py gen_relative_position_index).
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size <= 0:
        raise ValueError(f"grid_size must be a positive integer (patches per side), got {grid_size!r}")
    G = int(grid_size)
    width = 2 * G - 1                                               # offsets per axis
    T = width * width + 3                                           # rows of the table
    gy, gx = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")
    gy, gx = gy.reshape(-1), gx.reshape(-1)                         # (G*G,) row and column of each patch
    dy = gy[:, None] - gy[None, :]                                  # (G*G, G*G), query row - key row
    dx = gx[:, None] - gx[None, :]                                  # (G*G, G*G), query col - key col
    index = np.empty((G * G + 1, G * G + 1), np.int64)              # (N, N)
    index[1:, 1:] = (dy + G - 1) * width + (dx + G - 1)
    index[0, :] = T - 3                                             # [CLS] query -> patches
    index[:, 0] = T - 2                                             # patch queries -> [CLS]
    index[0, 0] = T - 1                                             # [CLS] -> [CLS]
    return index


def rel_pos_bias_forward(table, index):
    """Look up each (query, key) pair's bias: table (T, H), index (N, N) ints -> bias (H, N, N)."""
    if table.ndim != 2 or index.ndim != 2 or index.shape[0] != index.shape[1]:
        raise ValueError(f"rel_pos_bias_forward expects table (T, H) and index (N, N), got "
                         f"{tuple(table.shape)} and {tuple(index.shape)}")
    bias = table[index]                                             # (N, N, H)
    bias = bias.transpose(2, 0, 1)                                  # (H, N, N), one map per head
    return bias, (index, table.shape[0])


def rel_pos_bias_backward(dbias, cache):
    """Returns dtable (T, H): each table entry gets the SUM of the gradients of every (query, key)
    pair that reads it. Many pairs share an offset (the G*G pairs of a patch with itself all read
    offset (0, 0)), so assigning dtable[index] = dbias would keep only one of them: a scatter-ADD.
    A weighted bincount per head is that scatter-add (np.add.at is the other spelling; bincount
    exists in CuPy too and is much faster in NumPy)."""
    index, T = cache
    xp = get_array_module(dbias)
    H = dbias.shape[0]
    flat = index.reshape(-1)                                        # (N*N,) table row of each pair
    # forward: bias[h, q, k] = table[index[q, k], h]  =>  dtable[t, h] = sum over pairs with index t
    dtable = xp.empty((T, H), dbias.dtype)                          # (T, H)
    for h in range(H):
        dtable[:, h] = xp.bincount(flat, weights=dbias[h].reshape(-1), minlength=T)
    return dtable


# ----------------------------------------------------------------------------- LayerNorm

def layernorm_forward(x, w, b, eps=1e-6):
    """Normalise each token over its D channels, then scale by w and shift by b."""
    mean = x.mean(axis=-1, keepdims=True)           # (..., 1)
    xc = x - mean                                   # (..., D)
    var = (xc * xc).mean(axis=-1, keepdims=True)    # (..., 1), biased variance as in PyTorch
    rstd = 1.0 / (var + eps) ** 0.5                 # (..., 1)
    xhat = xc * rstd                                # (..., D)
    out = xhat * w + b                              # (..., D)
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """Returns (dx, dw, db)."""
    xhat, rstd, w = cache
    lead = tuple(range(dout.ndim - 1))
    # forward: out = xhat * w + b  =>  dw, db sum over every token; dxhat = dout * w
    dw = (dout * xhat).sum(axis=lead)               # (D,)
    db = dout.sum(axis=lead)                        # (D,)
    dxhat = dout * w                                # (..., D)
    # forward: xhat = (x - mean) * rstd, with mean and rstd themselves functions of x.
    # Differentiating through both gives the classic three-term formula:
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd                                      # (..., D)
    return dx, dw, db


# ----------------------------------------------------------------------------- GELU

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_forward(x, approximate="exact"):
    """GELU(x) = x * Phi(x), Phi the standard normal CDF.

    "exact" uses erf, as timm and Hugging Face do; "tanh" is the approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) used by GPT-2 and by the paper's JAX code
    (flax's nn.gelu defaults to approximate=True).
    """
    if approximate == "exact":
        phi = 0.5 * (1.0 + erf(x * _SQRT_HALF))     # Phi(x)
        return x * phi, (x, phi, approximate)
    if approximate == "tanh":
        xp = get_array_module(x)
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        return 0.5 * x * (1.0 + t), (x, t, approximate)
    raise ValueError(f"gelu approximate must be 'exact' or 'tanh', got {approximate!r}")


def gelu_backward(dout, cache):
    x, saved, approximate = cache
    xp = get_array_module(x)
    if approximate == "exact":
        phi = saved
        # forward: out = x * Phi(x)  =>  d/dx = Phi(x) + x * pdf(x), pdf(x) = exp(-x^2/2) / sqrt(2 pi)
        pdf = xp.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return dout * (phi + x * pdf)
    t = saved
    # forward: out = 0.5 x (1 + t), t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3)
    #   =>  d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx
    du = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


# ----------------------------------------------------------------------------- softmax

def softmax_forward(x, axis=-1):
    """exp(x) / sum(exp(x)) along `axis`.

    The maximum is subtracted first: softmax does not change when a constant is added,
    and it keeps exp() from overflowing (float32 overflows at exp(89)).
    """
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dout, cache):
    y, axis = cache
    # forward: y_i = exp(x_i) / sum_j exp(x_j)  =>  dx_i = y_i * (dy_i - sum_j dy_j y_j)
    return y * (dout - (dout * y).sum(axis=axis, keepdims=True))


# ----------------------------------------------------------------------------- dropout and drop-path

def dropout_mask(shape, p, rng, xp=np, dtype=np.float32):
    """An inverted-dropout mask: 0 with probability p, else 1 / (1 - p).

    Scaling the kept values by 1 / (1 - p) at training time keeps each activation's
    expected value unchanged, so evaluation needs no rescaling at all.
    """
    keep = uniform(rng, shape, dtype, xp) >= p
    return keep.astype(dtype) / (1.0 - p)


def drop_path_mask(batch, ndim, p, rng, xp=np, dtype=np.float32):
    """Stochastic depth: one keep-or-drop decision per sample, shaped (B, 1, 1, ...)."""
    return dropout_mask((batch,) + (1,) * (ndim - 1), p, rng, xp, dtype)


def dropout_forward(x, mask=None):
    """out = x * mask. mask is None in evaluation (the identity). It broadcasts, so a
    (B, 1, 1) drop-path mask drops whole residual branches per sample."""
    if mask is None:
        return x, None
    return x * mask, mask


def dropout_backward(dout, cache):
    mask = cache
    # forward: out = x * mask  =>  dx = dout * mask
    return dout if mask is None else dout * mask


# ----------------------------------------------------------------------------- self-attention

def attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, heads, attn_mask=None, attn_bias=None):
    """Multi-head self-attention with a fused qkv projection in timm's layout.

    x (B, N, D) -> (B, N, D). qkv_w (3D, D) stacks the q, k and v projections, each
    ordered head by head, so qkv splits with reshape(B, N, 3, H, hs). attn_mask is an
    optional dropout mask (B, H, N, N) on the attention probabilities. attn_bias is an
    optional (H, N, N) added to the scaled scores before the softmax, the same for every
    image (a relative position bias, see rel_pos_bias_forward); attention_backward then
    returns its gradient as a sixth value.
    """
    B, N, D = x.shape
    H = heads
    hs = D // H
    _check_attn_bias(attn_bias, H, N)
    qkv, qkv_cache = linear_forward(x, qkv_w, qkv_b)           # (B, N, 3D)
    qkv5 = qkv.reshape(B, N, 3, H, hs).transpose(2, 0, 3, 1, 4)  # (3, B, H, N, hs)
    q, k, v = qkv5[0], qkv5[1], qkv5[2]                        # each (B, H, N, hs)
    # Scaling by 1/sqrt(hs) keeps the dot products at unit variance for unit-variance
    # q and k, so the softmax does not saturate as the head size grows.
    scale = hs**-0.5
    att = (q * scale) @ k.swapaxes(-1, -2)                      # (B, H, N, N)
    if attn_bias is not None:
        att = att + attn_bias                                   # (B, H, N, N), the same bias for every image
    att, softmax_cache = softmax_forward(att, axis=-1)          # (B, H, N, N), rows sum to 1
    att_d, drop_cache = dropout_forward(att, attn_mask)         # (B, H, N, N)
    y = att_d @ v                                               # (B, H, N, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, N, D)                # (B, N, D), heads side by side
    out, proj_cache = linear_forward(y, proj_w, proj_b)         # (B, N, D)
    cache = (qkv_cache, q, k, v, scale, softmax_cache, att_d, drop_cache, proj_cache, H)
    if attn_bias is not None:
        # An 11th entry marks a cache whose backward also returns dattn_bias. Without a bias the
        # cache keeps exactly the 10 entries that lesson 03 and its exercises unpack.
        cache += ("attn_bias",)
    return out, cache


def _check_attn_bias(attn_bias, H, N):
    if attn_bias is not None and tuple(attn_bias.shape) != (H, N, N):
        raise ValueError(f"attn_bias must have shape (H, N, N) = ({H}, {N}, {N}), "
                         f"got {tuple(attn_bias.shape)}")


def attention_probs(cache):
    """The attention probabilities (B, H, Nq, Nk) kept in an attention_forward cache: row i of
    head h is how query token i spreads its weight over the keys (before attention dropout)."""
    softmax_cache = cache[5]
    return softmax_cache[0]                                     # (B, H, N, N)


def attention_backward(dout, cache):
    """Returns (dx, dqkv_w, dqkv_b, dproj_w, dproj_b), and dattn_bias (H, N, N) as a sixth
    value when the forward pass was given an attn_bias."""
    xp = get_array_module(dout)
    qkv_cache, q, k, v, scale, softmax_cache, att_d, drop_cache, proj_cache, H = cache[:10]
    has_bias = len(cache) > 10
    B, N, D = dout.shape
    hs = D // H
    # forward: out = y @ proj_w^T + proj_b
    dy, dproj_w, dproj_b = linear_backward(dout, proj_cache)     # (B, N, D)
    # forward: y = y.transpose(0, 2, 1, 3).reshape(B, N, D)
    dy = dy.reshape(B, N, H, hs).transpose(0, 2, 1, 3)          # (B, H, N, hs)
    # forward: y = att_d @ v  =>  datt_d = dy @ v^T, dv = att_d^T @ dy
    datt = dy @ v.swapaxes(-1, -2)                              # (B, H, N, N)
    dv = att_d.swapaxes(-1, -2) @ dy                            # (B, H, N, hs)
    # forward: att_d = att * attn_mask
    datt = dropout_backward(datt, drop_cache)                   # (B, H, N, N)
    # forward: att = softmax(att)
    datt = softmax_backward(datt, softmax_cache)                # (B, H, N, N)
    # forward: att = att + attn_bias (broadcast over the batch)  =>  sum over the batch
    dbias = datt.sum(axis=0) if has_bias else None              # (H, N, N)
    # forward: att = (q * scale) @ k^T  =>  dq = scale * datt @ k, dk = scale * datt^T @ q
    dq = (datt @ k) * scale                                     # (B, H, N, hs)
    dk = (datt.swapaxes(-1, -2) @ q) * scale                    # (B, H, N, hs)
    # forward: q, k, v = qkv.reshape(B, N, 3, H, hs).transpose(2, 0, 3, 1, 4)
    dqkv = xp.stack([dq, dk, dv], axis=0)                       # (3, B, H, N, hs)
    dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, N, 3 * D)   # (B, N, 3D)
    # forward: qkv = x @ qkv_w^T + qkv_b
    dx, dqkv_w, dqkv_b = linear_backward(dqkv, qkv_cache)      # (B, N, D)
    if has_bias:
        return dx, dqkv_w, dqkv_b, dproj_w, dproj_b, dbias
    return dx, dqkv_w, dqkv_b, dproj_w, dproj_b


# ----------------------------------------------------------------------------- MLP

def mlp_forward(x, fc1_w, fc1_b, fc2_w, fc2_b, gelu="exact", drop_mask1=None, drop_mask2=None):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. x (B, N, D) -> (B, N, D)."""
    h, fc1_cache = linear_forward(x, fc1_w, fc1_b)              # (B, N, F)
    h, gelu_cache = gelu_forward(h, gelu)                       # (B, N, F)
    h, drop1_cache = dropout_forward(h, drop_mask1)             # (B, N, F)
    out, fc2_cache = linear_forward(h, fc2_w, fc2_b)            # (B, N, D)
    out, drop2_cache = dropout_forward(out, drop_mask2)         # (B, N, D)
    return out, (fc1_cache, gelu_cache, drop1_cache, fc2_cache, drop2_cache)


def mlp_backward(dout, cache):
    """Returns (dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b)."""
    fc1_cache, gelu_cache, drop1_cache, fc2_cache, drop2_cache = cache
    dout = dropout_backward(dout, drop2_cache)                  # forward: out = dropout(out)
    dh, dfc2_w, dfc2_b = linear_backward(dout, fc2_cache)       # forward: out = fc2(h)
    dh = dropout_backward(dh, drop1_cache)                      # forward: h = dropout(h)
    dh = gelu_backward(dh, gelu_cache)                          # forward: h = gelu(h)
    dx, dfc1_w, dfc1_b = linear_backward(dh, fc1_cache)         # forward: h = fc1(x)
    return dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b


# ----------------------------------------------------------------------------- pooling

def pool_forward(x, mode="cls"):
    """(B, N, D) -> (B, D): the [CLS] token's output, or the mean of the patch tokens."""
    if mode == "cls":
        return x[:, 0], (mode, x.shape)                         # (B, D)
    if mode == "mean":
        return x[:, 1:].mean(axis=1), (mode, x.shape)           # (B, D), [CLS] left out as in timm
    raise ValueError(f"pool mode must be 'cls' or 'mean', got {mode!r}")


def pool_backward(dout, cache):
    mode, shape = cache
    xp = get_array_module(dout)
    dx = xp.zeros(shape, dtype=dout.dtype)                     # (B, N, D)
    if mode == "cls":
        dx[:, 0] = dout                                         # forward: out = x[:, 0]
    else:
        dx[:, 1:] = dout[:, None, :] / (shape[1] - 1)           # forward: out = mean(x[:, 1:])
    return dx


# ----------------------------------------------------------------------------- loss

def check_labels(labels, logits):
    """Labels must be integer class indices, one per row of logits, each in [0, K)."""
    xp = get_array_module(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    B, K = logits.shape
    if B == 0:
        raise ValueError("cannot compute a loss on an empty batch (logits have 0 rows)")
    if not hasattr(labels, "dtype") or get_array_module(labels) is not xp:
        raise TypeError(
            f"labels must be a {xp.__name__} integer array on the same device as the logits, "
            f"got {type(labels).__name__}"
        )
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= K:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is out of range: labels must be in [0, {K}) for {K} classes")


def check_label_smoothing(label_smoothing) -> float:
    """label_smoothing must be a number in [0, 1] (as in PyTorch); returned as a Python float.
    Outside that range the target has negative entries (or NaN) and the "loss" still comes
    out as a plausible number, so it is refused here rather than trained on."""
    if isinstance(label_smoothing, (bool, np.bool_)) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:                       # also refuses NaN
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return float(label_smoothing)


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy over the batch. logits (B, K), labels (B,) integers.

    With label smoothing s (in [0, 1]) the target is (1 - s) on the true class plus s / K on
    every class, as in PyTorch. log-softmax is computed as x - max - log(sum(exp(x - max))),
    which never overflows and never takes the log of 0.
    """
    xp = get_array_module(logits)
    check_labels(labels, logits)
    label_smoothing = check_label_smoothing(label_smoothing)
    B, K = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)        # (B, K), max is 0
    logsumexp = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))  # (B, 1)
    logp = shifted - logsumexp                                  # (B, K), log-probabilities
    target = xp.full((B, K), label_smoothing / K, dtype=logits.dtype)  # (B, K)
    target[xp.arange(B), labels] += 1.0 - label_smoothing
    loss = -(target * logp).sum() / B                           # scalar
    return loss, (logp, target)


def cross_entropy_backward(cache, dloss=1.0):
    """Gradient of the mean loss with respect to the logits: (softmax - target) / B.

    Unlike every other `x_backward(dout, cache)`, the cache comes first: the loss is where the
    backward pass starts, its upstream gradient is d loss / d loss = 1, so dloss is optional."""
    logp, target = cache
    xp = get_array_module(logp)
    B = logp.shape[0]
    # forward: loss = -sum(target * log_softmax(logits)) / B, and sum(target) = 1 per row
    return (xp.exp(logp) - target) * (dloss / B)                # (B, K)
