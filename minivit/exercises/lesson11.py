"""Checkers for lesson 11 (ResNet in NumPy).

    check_conv2d_im2col(conv2d_im2col)                      out = conv2d_im2col(x, w, stride, padding)
    check_batchnorm2d_backward(batchnorm2d_backward)        (dx, dweight, dbias) from a training-mode
                                                            cnn_ops.batchnorm2d_forward cache
    check_bottleneck_num_parameters(bottleneck_num_parameters)
                                                            the parameter count of one Bottleneck block

The convolution is compared with minivit.cnn_ops.conv2d_forward in float64 on shapes chosen to catch
what one shape hides: one input channel and several (the order in which a window is flattened only
matters with Cin > 1), stride 2 and padding 0 (an output size formula that ignores either), a
non-square image and a non-square kernel (rows and columns swapped), a 1x1 kernel. The BatchNorm
backward goes through minivit.gradcheck.check_op in float64 (every input and parameter) on shapes
including a batch of one image and a 1 x 1 feature map (where only the batch axis is left to average
over), then is compared with cnn_ops.batchnorm2d_backward. While a checker runs, the cnn_ops
functions that would compute the answer raise Wrong. The parameter count is compared with a built
minivit.resnet.Bottleneck for every shortcut option, both strides, and input widths equal to and
different from the output's.

Shape legend: B batch, Cin / Cout input / output channels, H, W input height and width,
Hout, Wout output height and width, kh, kw kernel height and width.
"""
from __future__ import annotations

import numpy as np

from .. import cnn_ops
from ..gradcheck import check_op
from ..resnet import Bottleneck
from . import Wrong, as_float_array, by_hand, exercise, expect_close, expect_gradients

# minivit's own answers, looked up here, before a check forbids them in their module.
_conv2d_forward = cnn_ops.conv2d_forward
_batchnorm2d_forward = cnn_ops.batchnorm2d_forward
_batchnorm2d_backward = cnn_ops.batchnorm2d_backward


# ----------------------------------------------------------------------------- 11.1 convolution

# (B, Cin, H, W), (Cout, kh, kw), stride, padding
_CONV_CASES = [((2, 3, 7, 7), (4, 3, 3), 1, 1),     # the ResNet 3x3 convolution
               ((2, 1, 6, 5), (3, 3, 3), 2, 0),     # one channel, stride 2, no padding, H != W
               ((1, 2, 5, 8), (2, 2, 3), 1, 1),     # a non-square kernel
               ((3, 4, 6, 6), (5, 1, 1), 2, 0),     # the 1x1 stride-2 projection shortcut
               ((2, 3, 9, 7), (2, 3, 3), 2, 1),     # the stride-2 3x3 of a stage's first block
               ((1, 2, 4, 4), (3, 4, 4), 1, 2)]     # padding 2, kernel as large as the image


@exercise("11.1 convolution as one matrix product (im2col)")
def check_conv2d_im2col(conv2d_im2col):
    rng = np.random.default_rng(1101)
    for (B, Cin, H, W), (Cout, kh, kw), stride, padding in _CONV_CASES:
        x = rng.standard_normal((B, Cin, H, W))                        # (B, Cin, H, W)
        w = rng.standard_normal((Cout, Cin, kh, kw))                   # (Cout, Cin, kh, kw)
        where = f"x {x.shape}, w {w.shape}, stride {stride}, padding {padding}"
        want, _ = _conv2d_forward(x, w, None, stride, padding)         # (B, Cout, Hout, Wout)
        # minivit's im2col is the answer: hidden while the learner's function runs (only then,
        # as conv2d_forward itself calls it)
        with by_hand(cnn_ops, "conv2d_forward", "im2col", "extract_windows"):
            got = conv2d_im2col(x, w, stride, padding)
        got = as_float_array(where, got)
        expect_close(where + ": the output against cnn_ops.conv2d_forward", got, want, rtol=1e-9, atol=1e-9)
    return f"{len(_CONV_CASES)} shapes (1 to 4 channels, strides 1 and 2, padding 0 to 2); equal to cnn_ops.conv2d_forward"


# ----------------------------------------------------------------------------- 11.2 BatchNorm backward

# (B, C, H, W): a usual map, one image (the statistics come from its pixels alone), 1 x 1 maps
# (the statistics come from the batch alone), one channel.
_BN_SHAPES = [(4, 3, 5, 5), (1, 2, 4, 3), (6, 4, 1, 1), (3, 1, 2, 6)]


@exercise("11.2 the BatchNorm2d backward (training mode)")
def check_batchnorm2d_backward(batchnorm2d_backward):
    rng = np.random.default_rng(1102)
    worst = {}
    with by_hand(cnn_ops, "batchnorm2d_backward"):
        for i, shape in enumerate(_BN_SHAPES):
            C = shape[1]
            where = f"x of shape {shape}"
            inputs = dict(x=rng.standard_normal(shape) * 2.0 + 1.0,     # (B, C, H, W), not centred
                          weight=rng.uniform(0.5, 1.5, C), bias=rng.standard_normal(C),
                          running_mean=np.zeros(C), running_var=np.ones(C), training=True)
            out, cache = _batchnorm2d_forward(**inputs)
            dout = rng.standard_normal(out.shape)                       # (B, C, H, W)
            got = batchnorm2d_backward(dout, cache)
            if not isinstance(got, (tuple, list)) or len(got) != 3:
                raise Wrong(f"{where}: expected a tuple (dx, dweight, dbias), got {type(got).__name__}")
            want = _batchnorm2d_backward(dout, cache)
            for name, g, ref in zip(("dx", "dweight", "dbias"), got, want):
                if tuple(getattr(g, "shape", ())) != ref.shape:
                    raise Wrong(f"{where}: {name} must have shape {ref.shape}, got "
                                f"{getattr(g, 'shape', type(g).__name__)}")
            errors = check_op(_batchnorm2d_forward, batchnorm2d_backward, inputs, ("x", "weight", "bias"), seed=i)
            expect_gradients(where, errors)
            for name, g, ref in zip(("dx", "dweight", "dbias"), got, want):
                expect_close(f"{where}: {name} against cnn_ops.batchnorm2d_backward", g, ref, rtol=1e-7, atol=1e-9)
            for name, e in errors.items():
                worst[name] = max(worst.get(name, 0.0), e)
    return (f"{len(_BN_SHAPES)} shapes incl. one image and 1 x 1 maps; worst relative error "
            + ", ".join(f"d{k} {v:.1e}" for k, v in worst.items()) + "; equal to cnn_ops.batchnorm2d_backward")


# ----------------------------------------------------------------------------- 11.3 Bottleneck parameters

# (in_chans, planes, stride): a stage's first block (the width changes, maybe the side too) and
# its later blocks (in_chans = 4 * planes, stride 1), as in ResNet-50, and some odd widths
_BOTTLENECK_CASES = [(64, 64, 1), (256, 64, 1), (256, 128, 2), (512, 128, 1), (3, 5, 2), (20, 5, 1), (7, 2, 1)]


@exercise("11.3 the parameters of a Bottleneck block")
def check_bottleneck_num_parameters(bottleneck_num_parameters):
    checked = 0
    for in_chans, planes, stride in _BOTTLENECK_CASES:
        for shortcut in ("A", "B", "C", "none"):
            if shortcut == "A" and in_chans > 4 * planes:
                continue                      # option A only pads channels: it cannot drop any
            want = Bottleneck(in_chans, planes, stride, shortcut).num_parameters()
            got = bottleneck_num_parameters(in_chans, planes, stride, shortcut)
            if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
                raise Wrong(f"expected an integer, got {type(got).__name__} {got!r}")
            if int(got) != want:
                raise Wrong(f"in_chans={in_chans}, planes={planes}, stride={stride}, shortcut={shortcut!r}: "
                            f"got {int(got):,} parameters, a built Bottleneck has {want:,}")
            checked += 1
    return f"{checked} blocks (shortcuts A, B, C and none, strides 1 and 2) counted like minivit.resnet.Bottleneck"
