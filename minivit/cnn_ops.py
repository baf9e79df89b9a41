"""The ops of a convolutional network (ResNet) as pairs of pure functions, like ops.py.

    out, cache = op_forward(inputs...)
    dinputs... = op_backward(dout, cache)

`cache` holds what the backward pass needs; `d<name>` is the gradient of the loss with
respect to `<name>`; each backward step names the forward line it undoes. The functions
work on NumPy and CuPy arrays alike (`xp` is the array module of the input, see backend.py).

Convolution is written with im2col: every window the kernel visits is copied out into a
column, and the convolution becomes one matrix product of the flattened kernel with those
columns. It costs kh * kw times the input's memory, and in exchange the whole op is a
reshuffle of data plus a matmul, which is both easy to read and fast in NumPy.

Shape legend:
    B batch, C channels (Cin / Cout a convolution's input / output channels),
    H, W height and width of the input, Hout, Wout of the output,
    k kernel side (kh, kw when the kernel need not be square), s stride, p padding,
    L = Hout * Wout output positions per image.
"""
from __future__ import annotations

import numbers

from .backend import get_array_module


# ----------------------------------------------------------------------------- argument checks

def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_images(name, x):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must be a 4-D array (B, C, H, W), got shape {getattr(x, 'shape', type(x).__name__)}")


def output_size(n, k, stride, padding):
    """How many positions a window of side k takes along a side of n pixels padded by p on
    both ends, moving s at a time: floor((n + 2p - k) / s) + 1 (torch's formula)."""
    return (n + 2 * padding - k) // stride + 1


def _check_window(x, kh, kw, stride, padding, what):
    """Validate stride and padding and return (Hout, Wout); an error if the window does not fit."""
    stride = _check_int(f"{what}: stride", stride, 1)
    padding = _check_int(f"{what}: padding", padding, 0)
    H, W = x.shape[2], x.shape[3]
    if H + 2 * padding < kh or W + 2 * padding < kw:
        raise ValueError(f"{what}: a {kh}x{kw} window does not fit in a {H}x{W} input padded by {padding}")
    return output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)


# ----------------------------------------------------------------------------- windows (im2col)

def extract_windows(x, kh, kw, stride, padding, fill=0.0):
    """Every kh x kw window of the padded input: (B, C, H, W) -> (B, C, kh, kw, Hout, Wout).

    [b, c, i, j, y, x] is the input pixel under kernel tap (i, j) when the window sits at
    output position (y, x), i.e. padded pixel (s*y + i, s*x + j). One strided slice per tap:
    kh * kw copies of a (B, C, Hout, Wout) block, whatever the image size.
    Padding is `fill` (zeros for a convolution, -inf for max-pooling).
    """
    xp = get_array_module(x)
    B, C, H, W = x.shape
    s, p = stride, padding
    Hout, Wout = output_size(H, kh, s, p), output_size(W, kw, s, p)
    xpad = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)   # (B, C, H+2p, W+2p)
    windows = xp.empty((B, C, kh, kw, Hout, Wout), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # tap (i, j) sees padded rows i, i+s, ..., i+s*(Hout-1) and the same for columns
            windows[:, :, i, j] = xpad[:, :, i:i + s * Hout:s, j:j + s * Wout:s]   # (B, C, Hout, Wout)
    return windows


def scatter_windows(dwindows, x_shape, stride, padding):
    """The backward of extract_windows: (B, C, kh, kw, Hout, Wout) -> (B, C, H, W).

    It ADDS each window's gradient into the pixels it was copied from. When windows overlap
    (a 3x3 kernel moving 1 or 2 pixels at a time) one pixel was copied into several windows,
    i.e. it feeds several outputs, and by the chain rule its gradient is the sum of what
    every copy received. Writing instead of adding would keep only the last window's share.
    Padding positions get gradients too; they are not inputs, so they are cut off at the end.
    """
    xp = get_array_module(dwindows)
    B, C, H, W = x_shape
    _, _, kh, kw, Hout, Wout = dwindows.shape
    s, p = stride, padding
    dxpad = xp.zeros((B, C, H + 2 * p, W + 2 * p), dtype=dwindows.dtype)          # (B, C, H+2p, W+2p)
    for i in range(kh):
        for j in range(kw):
            # forward: windows[:, :, i, j] = xpad[:, :, i::s, j::s] (Hout x Wout of them)
            dxpad[:, :, i:i + s * Hout:s, j:j + s * Wout:s] += dwindows[:, :, i, j]
    # forward: xpad = pad(x)  =>  drop the gradient of the padding
    return dxpad[:, :, p:p + H, p:p + W]                                           # (B, C, H, W)


def im2col(x, kh, kw, stride, padding):
    """(B, Cin, H, W) -> columns (B, Cin*kh*kw, L): column l of image b is the window that
    output position l sees, flattened in (Cin, kh, kw) order, the order of a weight
    (Cout, Cin, kh, kw) flattened to (Cout, Cin*kh*kw). So a convolution is w_flat @ cols."""
    B, C = x.shape[:2]
    windows = extract_windows(x, kh, kw, stride, padding)       # (B, Cin, kh, kw, Hout, Wout)
    return windows.reshape(B, C * kh * kw, -1)                  # (B, Cin*kh*kw, L), a free reshape


def col2im(dcols, x_shape, kh, kw, stride, padding):
    """The backward of im2col: (B, Cin*kh*kw, L) -> (B, Cin, H, W). Overlapping windows ADD
    into the pixels they share (see scatter_windows: a pixel copied into several columns
    gets the sum of their gradients)."""
    B, C, H, W = x_shape
    Hout, Wout = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    dwindows = dcols.reshape(B, C, kh, kw, Hout, Wout)          # (B, Cin, kh, kw, Hout, Wout)
    return scatter_windows(dwindows, x_shape, stride, padding)  # (B, Cin, H, W)


# ----------------------------------------------------------------------------- convolution

def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in PyTorch) with zero padding.

    x (B, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None -> out (B, Cout, Hout, Wout),
    Hout = floor((H + 2p - kh) / s) + 1 and likewise Wout.
        out[b, o, y, x] = b[o] + sum_{c, i, j} w[o, c, i, j] * xpad[b, c, s*y + i, s*x + j]
    """
    _check_images("conv2d: x", x)
    if getattr(w, "ndim", None) != 4:
        raise ValueError(f"conv2d: weight must be 4-D (Cout, Cin, kh, kw), got shape {getattr(w, 'shape', None)}")
    B, Cin, H, W = x.shape
    Cout, Cin_w, kh, kw = w.shape
    if Cin_w != Cin:
        raise ValueError(f"conv2d: the input has {Cin} channels but the weight {tuple(w.shape)} expects {Cin_w}")
    if b is not None and tuple(b.shape) != (Cout,):
        raise ValueError(f"conv2d: bias must have shape ({Cout},), got {tuple(b.shape)}")
    Hout, Wout = _check_window(x, kh, kw, stride, padding, "conv2d")
    cols = im2col(x, kh, kw, stride, padding)      # (B, Cin*kh*kw, L)
    w_flat = w.reshape(Cout, Cin * kh * kw)        # (Cout, Cin*kh*kw)
    out = w_flat @ cols                            # (B, Cout, L): one matmul per image
    out = out.reshape(B, Cout, Hout, Wout)         # (B, Cout, Hout, Wout)
    if b is not None:
        out += b[:, None, None]                    # one bias per output channel
    return out, (cols, x.shape, w, b is not None, stride, padding)


def conv2d_backward(dout, cache):
    """Returns (dx, dw, db); db is None when the convolution has no bias."""
    cols, x_shape, w, has_bias, stride, padding = cache
    Cout, Cin, kh, kw = w.shape
    B = dout.shape[0]
    # forward: out += b[:, None, None]  =>  db sums dout over every image and position
    db = dout.sum(axis=(0, 2, 3)) if has_bias else None          # (Cout,)
    # forward: out = out.reshape(B, Cout, Hout, Wout)
    dout_flat = dout.reshape(B, Cout, -1)                          # (B, Cout, L)
    # forward: out = w_flat @ cols  =>  dw_flat = sum_b dout_b @ cols_b^T,  dcols = w_flat^T @ dout
    w_flat = w.reshape(Cout, -1)                                   # (Cout, Cin*kh*kw)
    dw = (dout_flat @ cols.transpose(0, 2, 1)).sum(axis=0)         # (Cout, Cin*kh*kw)
    dw = dw.reshape(w.shape)                                       # (Cout, Cin, kh, kw)
    dcols = w_flat.T @ dout_flat                                   # (B, Cin*kh*kw, L)
    # forward: cols = im2col(x)  =>  col2im adds each window's gradient back to its pixels
    dx = col2im(dcols, x_shape, kh, kw, stride, padding)           # (B, Cin, H, W)
    return dx, dw, db


# ----------------------------------------------------------------------------- batch normalisation

def _check_batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps, count=True):
    """batchnorm2d_forward's argument checks (cnn_fastops' twin shares them, messages and all).
    count=False leaves out the check of the values per channel (SyncBatchNorm checks the whole
    batch's count, after adding it up over the ranks)."""
    _check_images("batchnorm2d: x", x)
    C = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if tuple(getattr(a, "shape", ())) != (C,):
            raise ValueError(f"batchnorm2d: {name} must have shape ({C},) for {C} channels, "
                             f"got {getattr(a, 'shape', type(a).__name__)}")
    if not isinstance(training, bool):
        raise TypeError(f"batchnorm2d: training must be True or False, got {training!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"batchnorm2d: momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"batchnorm2d: eps must be a number > 0, got {eps!r}")
    M = x.shape[0] * x.shape[2] * x.shape[3]
    if count and training and M < 2:
        raise ValueError(f"batchnorm2d: training needs more than 1 value per channel (B*H*W = {M}), "
                         f"got input shape {tuple(x.shape)}: there is no variance to normalise by")


def batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch normalisation over (B, H, W) for each channel, as torch.nn.BatchNorm2d.

    x (B, C, H, W); weight, bias, running_mean, running_var (C,) -> out (B, C, H, W).
    With M = B * H * W values per channel:

      training  mean = x.mean over (B, H, W),  var = the BIASED variance (divide by M);
                xhat = (x - mean) / sqrt(var + eps);  out = weight * xhat + bias.
                The running averages are updated IN PLACE (the caller's arrays change), as
                torch does, with the UNBIASED variance (divide by M - 1), also as torch does:
                    running_mean = (1 - momentum) * running_mean + momentum * mean
                    running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)
                So a network normalises with the batch's own statistics while training and
                keeps an estimate of the data's (an unbiased one) for evaluation.
      eval      xhat = (x - running_mean) / sqrt(running_var + eps);  out = weight * xhat + bias:
                a fixed affine map of x, the same for every image; nothing is updated.
    """
    xp = get_array_module(x)
    _check_batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps)
    w4, b4 = weight[None, :, None, None], bias[None, :, None, None]     # (1, C, 1, 1), broadcast
    if training:
        M = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean(axis=(0, 2, 3))                                    # (C,)
        xc = x - mean[None, :, None, None]                               # (B, C, H, W), centred
        var = (xc * xc).mean(axis=(0, 2, 3))                             # (C,), biased: divides by M
        inv_std = 1.0 / xp.sqrt(var + eps)                               # (C,)
        xhat = xc * inv_std[None, :, None, None]                         # (B, C, H, W)
        # in place, so a module's buffers (the caller's arrays) carry the new averages
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean
        running_var *= 1.0 - momentum
        running_var += momentum * var * (M / (M - 1))                    # unbiased, as torch
    else:
        inv_std = 1.0 / xp.sqrt(running_var + eps)                       # (C,)
        xhat = (x - running_mean[None, :, None, None]) * inv_std[None, :, None, None]   # (B, C, H, W)
    out = w4 * xhat + b4                                                 # (B, C, H, W)
    return out, (xhat, inv_std, weight, training)


def batchnorm2d_backward(dout, cache):
    """Returns (dx, dweight, dbias).

    out = weight * xhat + bias, so for both modes
        dbias = sum over (B, H, W) of dout,   dweight = sum of dout * xhat,   dxhat = dout * weight.

    Eval: xhat = (x - running_mean) * inv_std with fixed statistics, so dx = dxhat * inv_std.

    Training: mean and var depend on x too. Per channel, over its M values (sums over B, H, W):
        xhat_i = (x_i - mean) * inv_std,   mean = sum_j x_j / M,   inv_std = (var + eps)^(-1/2),
        var = sum_j (x_j - mean)^2 / M.
    Then  d mean / d x_i = 1/M  and  d var / d x_i = 2 (x_i - mean) / M  (the sum of the
    (x_j - mean) is 0, so the mean's own change drops out), and
        d xhat_j / d x_i = inv_std * (delta_ij - 1/M) - (x_j - mean) * inv_std^3 * (x_i - mean) / M
                         = inv_std / M * (M delta_ij - 1 - xhat_j xhat_i).
    Summing dxhat_j times that over j:
        dx_i = inv_std / M * (M dxhat_i - sum_j dxhat_j - xhat_i * sum_j dxhat_j xhat_j).
    (The running averages are not part of the training-mode output: no gradient reaches them.)
    """
    xhat, inv_std, weight, training = cache
    # forward: out = weight * xhat + bias
    dbias = dout.sum(axis=(0, 2, 3))                                     # (C,)
    dweight = (dout * xhat).sum(axis=(0, 2, 3))                          # (C,)
    dxhat = dout * weight[None, :, None, None]                           # (B, C, H, W)
    inv = inv_std[None, :, None, None]                                   # (1, C, 1, 1)
    if not training:
        # forward: xhat = (x - running_mean) * inv_std, the statistics fixed
        return dxhat * inv, dweight, dbias
    # forward: xhat = (x - mean(x)) * inv_std(x)  =>  the formula derived above
    M = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
    sum_dxhat = dxhat.sum(axis=(0, 2, 3), keepdims=True)                 # (1, C, 1, 1)
    sum_dxhat_xhat = (dxhat * xhat).sum(axis=(0, 2, 3), keepdims=True)   # (1, C, 1, 1)
    dx = inv / M * (M * dxhat - sum_dxhat - xhat * sum_dxhat_xhat)       # (B, C, H, W)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- synchronised batch normalisation

def _check_group(group):
    if not (callable(getattr(group, "sum", None)) and callable(getattr(group, "count", None))
            and isinstance(getattr(group, "weight", None), float) and 0.0 < group.weight <= 1.0):
        raise TypeError(f"sync_batchnorm2d: group must have sum(array), count(int) and a weight in (0, 1] "
                        f"(minivit.distributed's BatchGroup), got {group!r}")


def sync_batchnorm2d_forward(x, weight, bias, running_mean, running_var, training, group, momentum=0.1, eps=1e-5):
    """batchnorm2d_forward when the batch is split over K processes (data-parallel training:
    minivit.distributed), as torch.nn.SyncBatchNorm. x (b, C, H, W) is this rank's shard of the
    batch; the statistics are the WHOLE batch's, so K ranks normalise exactly as one process
    with the whole batch would:

      group.sum(a)     a per-channel array summed over the ranks (an all-reduce): every rank
                       gets the same sum
      group.count(n)   an integer summed over the ranks
      group.weight     this rank's share of the batch's mean loss, n_r / B (the backward's)

    Training adds up the shards' per-channel sums before dividing: M = count(b * H * W) values
    per channel, mean = sum(x) / M, then var = sum((x - mean)^2) / M (two all-reduces, centred
    like batchnorm2d_forward's, so no large sums of squares cancel). The running averages are
    then the same on every rank. Eval mode has nothing to share: it is batchnorm2d_forward's.
    """
    xp = get_array_module(x)
    _check_batchnorm(x, weight, bias, running_mean, running_var, training, momentum, eps, count=False)
    _check_group(group)
    if not training:
        out, (xhat, inv_std, weight, training) = batchnorm2d_forward(x, weight, bias, running_mean, running_var,
                                                                     training, momentum, eps)
        return out, (xhat, inv_std, weight, training, None, group)
    w4, b4 = weight[None, :, None, None], bias[None, :, None, None]     # (1, C, 1, 1), broadcast
    M = group.count(x.shape[0] * x.shape[2] * x.shape[3])              # values per channel, all ranks
    if M < 2:
        raise ValueError(f"sync_batchnorm2d: training needs more than 1 value per channel over all ranks, got {M}")
    mean = group.sum(x.sum(axis=(0, 2, 3))) / M                          # (C,), the whole batch's
    xc = x - mean[None, :, None, None]                                   # (b, C, H, W), centred
    var = group.sum((xc * xc).sum(axis=(0, 2, 3))) / M                   # (C,), biased: divides by M
    inv_std = 1.0 / xp.sqrt(var + eps)                                   # (C,)
    xhat = xc * inv_std[None, :, None, None]                             # (b, C, H, W)
    running_mean *= 1.0 - momentum                                       # in place, as batchnorm2d_forward
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += momentum * var * (M / (M - 1))                        # unbiased, as torch
    out = w4 * xhat + b4                                                 # (b, C, H, W)
    return out, (xhat, inv_std, weight, training, M, group)


def sync_batchnorm2d_backward(dout, cache):
    """Returns (dx, dweight, dbias) of this rank's shard: batchnorm2d_backward's formula
        dx_i = inv_std / M * (M dxhat_i - sum_j dxhat_j - xhat_i * sum_j dxhat_j xhat_j)
    with the two sums over the WHOLE batch, since every image's statistics depend on every rank's
    images. The scales differ by rank: dout here is the gradient of this rank's own mean loss,
    which the step weighs by group.weight = n_r / B (distributed.sum_gradients), so the whole
    batch's sum is group.sum(weight * this rank's sum), and dividing it by this rank's weight
    puts it on dout's scale. dweight and dbias stay this rank's sums: sum_gradients adds them up.
    """
    xhat, inv_std, weight, training, M, group = cache
    # forward: out = weight * xhat + bias
    dbias = dout.sum(axis=(0, 2, 3))                                     # (C,), this rank's
    dweight = (dout * xhat).sum(axis=(0, 2, 3))                          # (C,)
    dxhat = dout * weight[None, :, None, None]                           # (b, C, H, W)
    inv = inv_std[None, :, None, None]                                   # (1, C, 1, 1)
    if not training:
        # forward: xhat = (x - running_mean) * inv_std, the statistics fixed
        return dxhat * inv, dweight, dbias
    # forward: mean and var summed over the ranks  =>  the sums of the backward too, each rank's
    # weighted as the loss weighs it, on this rank's scale
    share = group.weight
    sum_dxhat = group.sum(dxhat.sum(axis=(0, 2, 3)) * share) / share                    # (C,)
    sum_dxhat_xhat = group.sum((dxhat * xhat).sum(axis=(0, 2, 3)) * share) / share      # (C,)
    dx = inv / M * (M * dxhat - sum_dxhat[None, :, None, None]
                    - xhat * sum_dxhat_xhat[None, :, None, None])        # (b, C, H, W)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- ReLU

def relu_forward(x):
    """max(x, 0), elementwise."""
    mask = x > 0                                # where the input passes through
    return x * mask, mask


def relu_backward(dout, cache):
    # forward: out = x * (x > 0)  =>  the gradient passes where x > 0, and not at 0 (as torch)
    return dout * cache


# ----------------------------------------------------------------------------- max-pooling

def maxpool2d_forward(x, kernel, stride, padding=0):
    """Max over every kernel x kernel window: (B, C, H, W) -> (B, C, Hout, Wout).

    Padding counts as -inf (it never wins), and as in torch it may be at most kernel // 2,
    so every window holds at least one real pixel. Where several pixels of a window tie for
    the maximum, the gradient goes to the first of them in row-major order (top row first,
    then left to right) - what torch's CPU kernel does, and what argmax returns.
    """
    xp = get_array_module(x)
    _check_images("maxpool2d: x", x)
    k = _check_int("maxpool2d: kernel", kernel, 1)
    padding = _check_int("maxpool2d: padding", padding, 0)
    if padding > k // 2:
        raise ValueError(f"maxpool2d: padding must be at most kernel // 2 = {k // 2}, got {padding} "
                         f"(a window could then lie wholly in the padding)")
    Hout, Wout = _check_window(x, k, k, stride, padding, "maxpool2d")
    B, C = x.shape[:2]
    windows = extract_windows(x, k, k, stride, padding, fill=-xp.inf)   # (B, C, k, k, Hout, Wout)
    windows = windows.reshape(B, C, k * k, Hout, Wout)                 # (B, C, k*k, Hout, Wout)
    winner = windows.argmax(axis=2)                                    # (B, C, Hout, Wout): first max
    out = windows.max(axis=2)                                          # (B, C, Hout, Wout)
    return out, (winner, x.shape, k, stride, padding)


def maxpool2d_backward(dout, cache):
    winner, x_shape, k, stride, padding = cache
    xp = get_array_module(dout)
    B, C, Hout, Wout = dout.shape
    # forward: out = windows.max(axis=2)  =>  each window's gradient goes to its winning tap only
    taps = xp.arange(k * k).reshape(1, 1, k * k, 1, 1)                 # (1, 1, k*k, 1, 1)
    dwindows = (taps == winner[:, :, None]) * dout[:, :, None]         # (B, C, k*k, Hout, Wout)
    # forward: windows = extract_windows(x)  =>  add back; a pixel that wins in several
    # overlapping windows gets the sum of their gradients
    dwindows = dwindows.reshape(B, C, k, k, Hout, Wout)                # (B, C, k, k, Hout, Wout)
    return scatter_windows(dwindows, x_shape, stride, padding)         # (B, C, H, W)


# ----------------------------------------------------------------------------- global average pool

def global_avg_pool_forward(x):
    """The mean of each channel over the image: (B, C, H, W) -> (B, C)."""
    _check_images("global_avg_pool: x", x)
    return x.mean(axis=(2, 3)), x.shape                # (B, C)


def global_avg_pool_backward(dout, cache):
    xp = get_array_module(dout)
    B, C, H, W = cache
    # forward: out = x.mean over (H, W)  =>  every pixel gets 1/(H*W) of its channel's gradient
    return xp.broadcast_to(dout[:, :, None, None] / (H * W), (B, C, H, W)).copy()   # (B, C, H, W)


# ----------------------------------------------------------------------------- shortcut option A

def subsample_pad_forward(x, out_channels, stride):
    """The parameter-free shortcut of He et al. (option A): keep every stride-th pixel and
    pad the channels with zeros, (B, Cin, H, W) -> (B, Cout, Hout, Wout), Hout = ceil(H / s).

    The Cout - Cin new channels are zeros split between both ends (half before, the rest
    after), as the widely used CIFAR ResNet code pads planes // 4 on each side. The output
    grid is the one a 3x3 convolution with stride s and padding 1 produces, so it adds to
    the block's main path.
    """
    xp = get_array_module(x)
    _check_images("subsample_pad: x", x)
    s = _check_int("subsample_pad: stride", stride, 1)
    B, Cin, H, W = x.shape
    Cout = _check_int("subsample_pad: out_channels", out_channels, Cin)
    sub = x[:, :, ::s, ::s]                                            # (B, Cin, Hout, Wout)
    front = (Cout - Cin) // 2
    out = xp.zeros((B, Cout) + sub.shape[2:], dtype=x.dtype)           # (B, Cout, Hout, Wout)
    out[:, front:front + Cin] = sub
    return out, (x.shape, front, s)


def subsample_pad_backward(dout, cache):
    x_shape, front, s = cache
    xp = get_array_module(dout)
    Cin = x_shape[1]
    dx = xp.zeros(x_shape, dtype=dout.dtype)                           # (B, Cin, H, W)
    # forward: out[:, front:front + Cin] = x[:, :, ::s, ::s]  =>  the zero channels had no source,
    # and the skipped pixels fed nothing
    dx[:, :, ::s, ::s] = dout[:, front:front + Cin]
    return dx
