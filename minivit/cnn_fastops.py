"""The convolution and batch normalisation of cnn_ops.py again, rewritten for speed: same
names, same signatures, same `op_forward(...) -> (out, cache)` / `op_backward(dout, cache)`
convention.

cnn_ops.py is the version to read and learn from; this file is the one minivit.resnet runs
by default, following the same switch as the ViT's ops (`minivit.modules.set_ops("reference")`
switches back to cnn_ops.py). tests/test_cnn_fastops.py checks every op here against its
cnn_ops.py twin (outputs and every gradient, float32 and float64) and gradient-checks these
too. A cache made here is only understood by the backward here.

Where the time went in cnn_ops.py (a cProfile of a ResNet-20 training step, batch 128,
float32, one thread: ~2 s), and what is done about it (the same step takes ~1 s here):

1. B small matrix products instead of a few large ones. cnn_ops lays the columns out per
   image, (B, Cin*kh*kw, L), so `w_flat @ cols` is a stack of B products, the weight gradient
   `(dout @ cols^T).sum(axis=0)` first builds a (B, Cout, K) stack and then sums it, and
   `w_flat^T @ dout` is B products with an inner dimension of only Cout. Here the columns of
   a BLOCK of b images are (Cin*kh*kw, b*L): channels and taps first, then images and
   positions, so the forward pass, dW and dcols are each one product per block
   (w_flat @ cols, cols @ dout_t^T, w_flat^T @ dout_t) with b*L columns. dW is computed as
   (cols @ dout_t^T)^T: OpenBLAS is ~1.5x faster at that shape than at dout_t @ cols^T.
2. Memory. cnn_ops' columns are kh*kw = 9 times the input (75 MB for ResNet-20's first
   stage), written once, kept in the cache and read twice more in the backward pass, all at
   main-memory speed (and the fresh allocations cost page faults). Here a block is about
   _BLOCK_BYTES (4 MB) of columns, built, multiplied and (backward) scattered back while it is
   in the processor's cache, in scratch arrays reused from block to block. The forward pass
   keeps the INPUT, not its columns; the backward pass rebuilds each block's columns (a
   cheap copy in cache) and writes dcols over them.
3. Copying the windows. cnn_ops copies each tap as strided rows of 8 to 32 pixels, each a
   separate trip through NumPy's inner loop. For stride 1 the columns here are laid out on
   the padded image's grid ("shifted", see below): each tap's row of the columns is one
   contiguous slice of the flattened padded input, and col2im adds contiguous slices back.
   np.pad (several passes) is replaced by one copy into a buffer whose border alone is
   zeroed; the transposes to and from channels first ride on copies that happen anyway.
   A 1x1 convolution without padding needs no windows at all.
4. BatchNorm's reductions. x.mean(axis=(0, 2, 3)) walks short runs of a 4-D array; here
   every per-channel sum is one BLAS matrix-vector product over the contiguous H*W of each
   (image, channel) row, then a sum over the images, and the backward pass uses the closed form
       dx = weight * inv_std * (dout - (dbias + xhat * dweight) / M)
   (cnn_ops' formula, with sum(dxhat) = weight * dbias and sum(dxhat * xhat) = weight * dweight),
   three passes in one buffer.

Measured per ResNet-20 convolution (forward + backward, CPU time): 16 channels at 32 x 32
104 -> 43 ms, 32 at 16 x 16 86 -> 38 ms, 64 at 8 x 8 78 -> 38 ms. What is left is mostly the
matrix products themselves (OpenBLAS on a 16 x 144 weight reaches ~15 GFLOP/s, far below
peak; PyTorch's oneDNN convolutions avoid im2col altogether).

Blocks run on minivit.fastops' threads (`set_num_threads`): each writes only its own images
of the output / dx and returns its share of dW and db, which are added up at the end. On
CuPy there are no blocks: each op runs once on the whole batch.

Every function works on NumPy and CuPy arrays (`xp = get_array_module(x)`, only calls that
exist in both) and keeps the input's dtype (float32 stays float32).

Shape legend:
    B batch, b the images of one block, Cin / Cout a convolution's input / output channels,
    C BatchNorm's channels, H, W height and width of the input, Hout, Wout of the output,
    Hp = H + 2p, Wp = W + 2p of the padded input, kh, kw the kernel, s stride, p padding,
    K = Cin * kh * kw the length of one column, Gh, Gw the grid the columns are laid out on
    (Hp, Wp or Hout, Wout, see _grid), N = b * Gh * Gw the columns of a block, T the zeros
    after the last padded image, HW = H * W.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from .backend import get_array_module
from .cnn_ops import _check_batchnorm, _check_group, _check_images, _check_window
from . import fastops
from .fastops import _blockwise

# ----------------------------------------------------------------------------- scratch and blocks

_BLOCK_BYTES = 4 * 1024 * 1024  # columns per block of images (measured on ResNet-20: 1 MB 14% slower, 8 MB 4%)
_local = threading.local()


def _scratch(xp, shape, dtype, slot):
    """An uninitialised scratch array, reused by each thread from block to block and call to
    call (slot numbers keep one kernel's arrays apart): allocating the columns afresh for
    every block costs page faults on memory the block then fills anyway. Never cached, never
    returned. On CuPy (one block: the whole batch) a fresh array."""
    if xp is not np:
        return xp.empty(shape, dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    buf = buffers.get(slot)
    if buf is None or buf.size < n:
        buf = buffers[slot] = np.empty(n, np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def _by_images(kernel, arrays, column_bytes):
    """kernel(*blocks) on blocks of images (axis 0 of every array), about _BLOCK_BYTES of
    columns per block (column_bytes: per image), on fastops' threads; the kernels' results in
    block order. Small enough to stay in cache while the block's columns are built, multiplied
    and (backward) scattered back; large enough that each matrix product is not tiny."""
    images = max(1, _BLOCK_BYTES // max(1, column_bytes))
    # _blockwise takes max(min_rows, its own block bytes // row_bytes) rows: make the second 0
    return _blockwise(kernel, arrays, row_bytes=fastops._BLOCK_BYTES + 1, min_rows=images)


# ----------------------------------------------------------------------------- im2col, channels first
#
# The columns of a block of b images are (Cin*kh*kw, b*Gh*Gw): channels and taps first, then
# one column per position of an output GRID of Gh x Gw per image, in (image, row, column) order.
#
#  - Stride 1 ("shifted"): the grid is the whole padded image, Gh x Gw = Hp x Wp (Hp = H+2p,
#    Wp = W+2p). Flatten the padded input of the block, channels first, to (Cin, b*Hp*Wp): then
#    tap (i, j) of the window at grid position q is pixel q + i*Wp + j, so the tap's row of the
#    columns is ONE contiguous slice xflat[:, off:off + b*Hp*Wp], off = i*Wp + j. Copying (and
#    in the backward pass adding) long contiguous rows is several times faster than the
#    strided copies of images of 8 to 32 pixels a side. Only the top-left Hout x Wout of each
#    image's grid are real outputs; the rest are computed and thrown away (13% more columns
#    for 32 x 32 maps, 27% for 16 x 16, 56% for 8 x 8), and in the backward pass their
#    gradient is zero, so they add nothing to dW or dx.
#  - Any other stride ("taps"): the grid is the output, Gh x Gw = Hout x Wout, and every tap
#    copies its strided (Cin, b, Hout, Wout) block, as cnn_ops does (but channels first).
#  - 1x1, no padding: the grid is the output, the columns are the (subsampled) input itself.


_SHIFTED_WASTE = 1.4   # the most grid positions per real output for which "shifted" is used: measured
                       # on ResNet-20's layers, shifted is 1.4x faster than taps at 1.27 (16 x 16 maps)
                       # and taps 1.35x faster than shifted at 1.56 (8 x 8)


def _grid(H, W, kh, kw, stride, padding):
    """"shifted", "pixels" or "taps", and (Gh, Gw): the grid the columns are laid out on."""
    s, p = stride, padding
    Hout, Wout = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
    if kh == kw == 1 and p == 0:
        return "pixels", (Hout, Wout)
    if s == 1 and (H + 2 * p) * (W + 2 * p) <= _SHIFTED_WASTE * Hout * Wout:
        return "shifted", (H + 2 * p, W + 2 * p)
    return "taps", (Hout, Wout)


def _padded_flat(x, kh, kw, padding, slot):
    """The block's input channels first with a zero border, flattened: a scratch (Cin, b*Hp*Wp + T)
    whose first b*Hp*Wp entries of each row are the padded images and whose T = (kh-1)*Wp + kw-1
    last are zeros (the shifted slices of the last image's taps run that far past its end).
    Also returns the (Cin, b, Hp, Wp) view of the images. One copy: only the border is zeroed."""
    xp = get_array_module(x)
    b, C, H, W = x.shape
    p = padding
    Hp, Wp = H + 2 * p, W + 2 * p
    n, tail = b * Hp * Wp, (kh - 1) * Wp + kw - 1
    flat = _scratch(xp, (C, n + tail), x.dtype, slot)                    # (Cin, b*Hp*Wp + T)
    flat[:, n:] = 0
    xpad = flat[:, :n].reshape(C, b, Hp, Wp)                             # (Cin, b, Hp, Wp), a view
    if p:
        xpad[:, :, :p] = 0
        xpad[:, :, H + p:] = 0
        xpad[:, :, p:H + p, :p] = 0
        xpad[:, :, p:H + p, W + p:] = 0
    return flat, xpad


def _im2col_t(x, kh, kw, stride, padding):
    """(b, Cin, H, W) -> columns (Cin*kh*kw, b*Gh*Gw) in a scratch array, rows in (Cin, kh, kw)
    order (the order of a weight (Cout, Cin, kh, kw) flattened to (Cout, K)): the convolution
    of the block is w_flat @ cols, on the grid of _grid()."""
    xp = get_array_module(x)
    b, C, H, W = x.shape
    s, p = stride, padding
    kind, (Gh, Gw) = _grid(H, W, kh, kw, s, p)
    N = b * Gh * Gw
    cols = _scratch(xp, (C, kh, kw, N), x.dtype, 0)                      # (Cin, kh, kw, b*Gh*Gw)
    if kind == "pixels":
        # a 1x1 window is one pixel: the columns are the (subsampled) input, channels first
        cols.reshape(C, b, Gh, Gw)[...] = x[:, :, ::s, ::s].transpose(1, 0, 2, 3)
        return cols.reshape(C, N)                                        # (K, N), K = Cin
    if kind == "shifted":
        flat, xpad = _padded_flat(x, kh, kw, p, 1)                       # (Cin, N + T), (Cin, b, Hp, Wp)
        xpad[:, :, p:H + p, p:W + p] = x.transpose(1, 0, 2, 3)           # the transpose is in this copy
        for i in range(kh):
            for j in range(kw):
                off = i * Gw + j
                # tap (i, j) of the window at grid position q is flat pixel q + off
                cols[:, i, j] = flat[:, off:off + N]                     # (Cin, N), contiguous rows
        return cols.reshape(C * kh * kw, N)                              # (K, N), a free reshape
    flat, xpad = _padded_flat(x, 1, 1, p, 1)                             # (Cin, b, H+2p, W+2p)
    xpad[:, :, p:H + p, p:W + p] = x.transpose(1, 0, 2, 3)
    taps = cols.reshape(C, kh, kw, b, Gh, Gw)                            # (Cin, kh, kw, b, Hout, Wout)
    for i in range(kh):
        for j in range(kw):
            # tap (i, j) sees padded rows i, i+s, ..., i+s*(Hout-1) and the same for columns
            taps[:, i, j] = xpad[:, :, i:i + s * Gh:s, j:j + s * Gw:s]   # (Cin, b, Hout, Wout)
    return cols.reshape(C * kh * kw, N)                                  # (K, N)


def _col2im_t(dcols, dx, kh, kw, stride, padding):
    """The backward of _im2col_t: writes the gradient of the columns (Cin*kh*kw, b*Gh*Gw) into
    dx (b, Cin, H, W). Overlapping windows ADD into the pixels they share (a pixel copied into
    several columns gets the sum of their gradients); the padding's share is dropped."""
    b, C, H, W = dx.shape
    s, p = stride, padding
    kind, (Gh, Gw) = _grid(H, W, kh, kw, s, p)
    N = b * Gh * Gw
    if kind == "pixels":
        # forward: cols = x[:, :, ::s, ::s] channels first  =>  the skipped pixels fed nothing
        if s > 1:
            dx[...] = 0
        dx[:, :, ::s, ::s] = dcols.reshape(C, b, Gh, Gw).transpose(1, 0, 2, 3)
        return
    dwin = dcols.reshape(C, kh, kw, N)                                   # (Cin, kh, kw, N)
    if kind == "shifted":
        flat, dxpad = _padded_flat(dx, kh, kw, p, 1)                     # (Cin, N + T), (Cin, b, Hp, Wp)
        flat[:, :N] = 0
        for i in range(kh):
            for j in range(kw):
                off = i * Gw + j
                # forward: cols[:, i, j] = flat[:, off:off + N]
                flat[:, off:off + N] += dwin[:, i, j]
    else:
        flat, dxpad = _padded_flat(dx, 1, 1, p, 1)                       # (Cin, b, H+2p, W+2p)
        flat[...] = 0
        dtaps = dwin.reshape(C, kh, kw, b, Gh, Gw)                       # (Cin, kh, kw, b, Hout, Wout)
        for i in range(kh):
            for j in range(kw):
                # forward: taps[:, i, j] = xpad[:, :, i::s, j::s]
                dxpad[:, :, i:i + s * Gh:s, j:j + s * Gw:s] += dtaps[:, i, j]
    # forward: xpad = x transposed into a zero border  =>  drop the border, transpose back
    dx[...] = dxpad[:, :, p:p + H, p:p + W].transpose(1, 0, 2, 3)


# ----------------------------------------------------------------------------- convolution

def _conv_kernel(x, out, w_flat, bias, kh, kw, stride, padding):
    """One block of b images: x (b, Cin, H, W) -> out (b, Cout, Hout, Wout), written in place."""
    xp = get_array_module(x)
    b, Cout, Hout, Wout = out.shape
    _, (Gh, Gw) = _grid(x.shape[2], x.shape[3], kh, kw, stride, padding)
    cols = _im2col_t(x, kh, kw, stride, padding)                         # (K, b*Gh*Gw)
    out_t = _scratch(xp, (Cout, b * Gh * Gw), out.dtype, 2)              # (Cout, b*Gh*Gw)
    xp.matmul(w_flat, cols, out=out_t)                                   # ONE matmul for the block
    if bias is not None:
        out_t += bias[:, None]                                           # one bias per output channel
    # the real outputs are the top-left Hout x Wout of each image's grid; back to images first
    out[...] = out_t.reshape(Cout, b, Gh, Gw)[:, :, :Hout, :Wout].transpose(1, 0, 2, 3)


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in PyTorch) with zero padding, as
    cnn_ops.conv2d_forward: x (B, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None
    -> out (B, Cout, Hout, Wout). Blocks of images each make one matrix product.
    The cache holds x itself, not a copy (nor its columns): do not write into x before the
    backward pass (minivit's layers never do; each makes a new array)."""
    _check_images("conv2d: x", x)
    if getattr(w, "ndim", None) != 4:
        raise ValueError(f"conv2d: weight must be 4-D (Cout, Cin, kh, kw), got shape {getattr(w, 'shape', None)}")
    xp = get_array_module(x)
    B, Cin, H, W = x.shape
    Cout, Cin_w, kh, kw = w.shape
    if Cin_w != Cin:
        raise ValueError(f"conv2d: the input has {Cin} channels but the weight {tuple(w.shape)} expects {Cin_w}")
    if b is not None and tuple(b.shape) != (Cout,):
        raise ValueError(f"conv2d: bias must have shape ({Cout},), got {tuple(b.shape)}")
    Hout, Wout = _check_window(x, kh, kw, stride, padding, "conv2d")
    w_flat = w.reshape(Cout, Cin * kh * kw)                              # (Cout, K)
    out = xp.empty((B, Cout, Hout, Wout), dtype=xp.result_type(x, w))    # (B, Cout, Hout, Wout)
    _, (Gh, Gw) = _grid(H, W, kh, kw, stride, padding)
    _by_images(lambda x_, o_: _conv_kernel(x_, o_, w_flat, b, kh, kw, stride, padding), [x, out],
               Cin * kh * kw * Gh * Gw * out.itemsize)
    # the input itself is kept, not its columns: the backward pass rebuilds them block by block
    return out, (x, w, b is not None, stride, padding)


def _conv_backward_kernel(x, dout, dx, w_flat, has_bias, kh, kw, stride, padding):
    """One block of b images: writes dx (b, Cin, H, W); returns this block's share of (dw_flat, db)."""
    xp = get_array_module(x)
    b, Cout, Hout, Wout = dout.shape
    _, (Gh, Gw) = _grid(x.shape[2], x.shape[3], kh, kw, stride, padding)
    # forward: out = the grid's top-left Hout x Wout, images first  =>  the gradient on the grid,
    # channels first, zero where the grid had no real output
    dout_t = _scratch(xp, (Cout, b, Gh, Gw), dout.dtype, 3)              # (Cout, b, Gh, Gw)
    if (Gh, Gw) != (Hout, Wout):
        dout_t[...] = 0
    dout_t[:, :, :Hout, :Wout] = dout.transpose(1, 0, 2, 3)
    dout_t = dout_t.reshape(Cout, b * Gh * Gw)                           # (Cout, b*Gh*Gw)
    # forward: out_t += bias[:, None]  =>  db sums each channel's (contiguous) row
    db = dout_t.sum(axis=1) if has_bias else None                        # (Cout,)
    # forward: out_t = w_flat @ cols  =>  dw_flat = dout_t @ cols^T,  dcols = w_flat^T @ dout_t
    cols = _im2col_t(x, kh, kw, stride, padding)                         # (K, b*Gh*Gw), rebuilt
    # (as cols @ dout_t^T, transposed: OpenBLAS is ~1.5x faster at that shape than at dout_t @ cols^T)
    dw = (cols @ dout_t.T).T                                             # (Cout, K)
    xp.matmul(w_flat.T, dout_t, out=cols)                                # (K, b*Gh*Gw) dcols, over cols
    # forward: cols = _im2col_t(x)  =>  add each window's gradient back to its pixels
    _col2im_t(cols, dx, kh, kw, stride, padding)
    return dw, db


def conv2d_backward(dout, cache):
    """Returns (dx, dw, db); db is None when the convolution has no bias."""
    x, w, has_bias, stride, padding = cache
    xp = get_array_module(dout)
    Cout, Cin, kh, kw = w.shape
    B, _, Hout, Wout = dout.shape
    w_flat = w.reshape(Cout, Cin * kh * kw)                              # (Cout, K)
    dx = xp.empty(x.shape, dtype=xp.result_type(dout, w))                # (B, Cin, H, W)
    _, (Gh, Gw) = _grid(x.shape[2], x.shape[3], kh, kw, stride, padding)
    parts = _by_images(lambda x_, d_, dx_: _conv_backward_kernel(x_, d_, dx_, w_flat, has_bias, kh, kw,
                                                                 stride, padding),
                       [x, dout, dx], Cin * kh * kw * Gh * Gw * dx.itemsize)
    dw, db = parts[0]
    for pw, pb in parts[1:]:                 # the blocks' shares of the sums over images
        dw = dw + pw
        db = None if db is None else db + pb
    return dx, dw.reshape(w.shape), db


# ----------------------------------------------------------------------------- batch normalisation

def _channel_sums(a3):
    """Per-channel sums of a (B, C, HW) array: (C,). A sum over the contiguous HW of each
    (image, channel) row as one BLAS matrix-vector product (NumPy's own sum over (0, 2, 3)
    walks the short rows of a 4-D array one at a time), then over the B images."""
    xp = get_array_module(a3)
    ones = xp.ones(a3.shape[2], dtype=a3.dtype)                          # (HW,)
    return (a3 @ ones).sum(axis=0)                                       # (B, C) -> (C,)


def batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch normalisation over (B, H, W) for each channel, as cnn_ops.batchnorm2d_forward
    (the same statistics, the same in-place update of the running averages)."""
    _check_batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    return _batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, None)


def sync_batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, group, momentum=0.1, eps=1e-5):
    """cnn_ops.sync_batchnorm2d_forward: the statistics of the whole batch, split over the ranks
    of `group` (minivit.distributed.BatchGroup). batchnorm2d_backward here takes either cache."""
    _check_batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps, count=False)
    _check_group(group)
    return _batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, group)


def _batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, group):
    """Both forwards: group None (this process has the whole batch) or the ranks that share it."""
    xp = get_array_module(x)
    B, C, H, W = x.shape
    M = B * H * W
    x3 = x.reshape(B, C, H * W)                                          # (B, C, HW), a view when contiguous
    total = (lambda a: a) if group is None else group.sum                # the sums over every rank's shard
    if training:
        if group is not None:
            M = group.count(M)                                           # values per channel, all ranks
            if M < 2:
                raise ValueError(f"sync_batchnorm2d: training needs more than 1 value per channel over all "
                                 f"ranks, got {M}")
        mean = total(_channel_sums(x3)) / M                              # (C,)
        xhat = x3 - mean[:, None]                                        # (B, C, HW), centred
        sq = xhat * xhat                                                 # (B, C, HW)
        var = total(_channel_sums(sq)) / M                               # (C,), biased: divides by M
        inv_std = 1.0 / xp.sqrt(var + eps)                               # (C,)
        xhat *= inv_std[:, None]
        # in place, so a module's buffers (the caller's arrays) carry the new averages
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += momentum * var * (M / (M - 1))                    # unbiased, as torch
        out = sq                                                         # reuse the squares' memory
    else:
        inv_std = 1.0 / xp.sqrt(running_var + eps)                       # (C,)
        xhat = x3 - running_mean[:, None]                                # (B, C, HW)
        xhat *= inv_std[:, None]
        out = xp.empty(xhat.shape, dtype=xp.result_type(xhat, weight))   # (B, C, HW)
    xp.multiply(xhat, weight[:, None], out=out)                          # out = weight * xhat + bias
    out += bias[:, None]
    return out.reshape(B, C, H, W), (xhat, inv_std, weight, training, M, group)


def batchnorm2d_backward(dout, cache):
    """Returns (dx, dweight, dbias), as cnn_ops.batchnorm2d_backward. With M values per channel
    and sum(dxhat) = weight * dbias, sum(dxhat * xhat) = weight * dweight, cnn_ops' formula
        dx = inv_std / M * (M dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))
    is  dx = weight * inv_std * (dout - (dbias + xhat * dweight) / M), three passes in place.
    After sync_batchnorm2d_forward, dbias and dweight in that formula are the whole batch's,
    each rank's weighted as in cnn_ops.sync_batchnorm2d_backward; the ones returned are this rank's."""
    xhat, inv_std, weight, training, M, group = cache
    xp = get_array_module(dout)
    B, C, HW = xhat.shape
    d3 = dout.reshape(B, C, HW)                                          # (B, C, HW)
    # forward: out = weight * xhat + bias
    dbias = _channel_sums(d3)                                            # (C,)
    t = d3 * xhat                                                        # (B, C, HW)
    dweight = _channel_sums(t)                                           # (C,)
    scale = (weight * inv_std)[:, None]                                  # (C, 1)
    if not training:
        # forward: xhat = (x - running_mean) * inv_std, the statistics fixed
        xp.multiply(d3, scale, out=t)
        return t.reshape(dout.shape), dweight, dbias
    # forward: xhat = (x - mean(x)) * inv_std(x)  =>  the formula above
    all_dbias, all_dweight = dbias, dweight
    if group is not None:                                                # the whole batch's, on this rank's scale
        share = group.weight
        all_dbias = group.sum(dbias * share) / share
        all_dweight = group.sum(dweight * share) / share
    xp.multiply(xhat, (all_dweight / M)[:, None], out=t)                 # xhat * dweight / M
    t += (all_dbias / M)[:, None]
    xp.subtract(d3, t, out=t)
    t *= scale
    return t.reshape(dout.shape), dweight, dbias                         # (B, C, H, W)


sync_batchnorm2d_backward = batchnorm2d_backward     # the cache says which
