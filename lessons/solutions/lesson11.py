"""Worked solutions of lesson 11's exercises (ResNet in NumPy). minivit.exercises.lesson11 grades them.

Shape legend: B batch, Cin / Cout input / output channels, H, W input height and width,
Hout, Wout output height and width, kh, kw kernel height and width, L = Hout * Wout.
"""
import numpy as np


def conv2d_im2col(x, w, stride, padding):
    """Exercise 11.1: a convolution (cross-correlation, as torch) as one matrix product."""
    B, Cin, H, W = x.shape
    Cout, _, kh, kw = w.shape
    Hout = (H + 2 * padding - kh) // stride + 1                 # torch's output size formula
    Wout = (W + 2 * padding - kw) // stride + 1
    xpad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))   # (B, Cin, H+2p, W+2p)
    # windows[b, c, i, j, y, x] = the pixel under kernel tap (i, j) when the window sits at (y, x):
    # one strided slice per tap
    windows = np.empty((B, Cin, kh, kw, Hout, Wout), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            windows[:, :, i, j] = xpad[:, :, i:i + stride * Hout:stride, j:j + stride * Wout:stride]
    cols = windows.reshape(B, Cin * kh * kw, Hout * Wout)       # (B, Cin*kh*kw, L), flattened as w is
    out = w.reshape(Cout, Cin * kh * kw) @ cols                 # (B, Cout, L): the matrix product
    return out.reshape(B, Cout, Hout, Wout)                     # (B, Cout, Hout, Wout)


def batchnorm2d_backward(dout, cache):
    """Exercise 11.2: LayerNorm's backward (lesson 3) with the statistics taken over (B, H, W)
    for each channel instead of over D for each token."""
    xhat, inv_std, weight, training = cache
    axes = (0, 2, 3)                                            # what BatchNorm averages over
    M = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]           # values per channel
    # forward: out = weight * xhat + bias
    dbias = dout.sum(axis=axes)                                 # (C,)
    dweight = (dout * xhat).sum(axis=axes)                      # (C,)
    dxhat = dout * weight[None, :, None, None]                  # (B, C, H, W)
    # forward: xhat = (x - mean) * inv_std  =>  the direct term, the mean term, the variance term
    mean_term = dxhat.sum(axis=axes, keepdims=True) / M         # (1, C, 1, 1)
    var_term = (dxhat * xhat).sum(axis=axes, keepdims=True) / M  # (1, C, 1, 1)
    dx = inv_std[None, :, None, None] * (dxhat - mean_term - xhat * var_term)   # (B, C, H, W)
    return dx, dweight, dbias


def bottleneck_num_parameters(in_chans, planes, stride, shortcut):
    """Exercise 11.3: 1x1 (in -> planes), 3x3 (planes -> planes), 1x1 (planes -> 4 planes), each
    without a bias and followed by BN (a scale and a shift per channel), plus the projection
    shortcut (1x1 conv + BN) where option B or C puts one."""
    out_chans = 4 * planes
    convs = in_chans * planes + planes * planes * 9 + planes * out_chans
    bns = 2 * (planes + planes + out_chans)
    changes = stride != 1 or in_chans != out_chans
    projection = shortcut == "C" or (shortcut == "B" and changes)
    return convs + bns + (in_chans * out_chans + 2 * out_chans if projection else 0)
