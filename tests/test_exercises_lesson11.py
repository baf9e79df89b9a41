"""Lesson 11's exercise checkers accept the worked solutions and reject plausible wrong answers."""

import numpy as np
import pytest

from minivit import cnn_ops
from minivit.exercises import Wrong, lesson11, load_solutions

solutions = load_solutions("11")


def _stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- 11.1 convolution

def _conv(bug):
    """The solution with one plausible mistake planted."""
    def conv(x, w, stride, padding):
        if bug == "a true convolution (flipped kernel)":
            w = w[:, :, ::-1, ::-1]
        if bug == "padding forgotten in the output size":
            B, Cin, H, W = x.shape
            Cout, _, kh, kw = w.shape
            Hout, Wout = (H - kh) // stride + 1, (W - kw) // stride + 1
            return solutions.conv2d_im2col(x, w, stride, padding)[:, :, :Hout, :Wout]
        if bug == "windows flattened as (kh, kw, Cin)":
            # the columns in (kh, kw, Cin) order against a weight flattened in (Cin, kh, kw) order:
            # the same as multiplying by a weight whose axes were mixed up
            Cout, Cin, kh, kw = w.shape
            w = w.transpose(0, 2, 3, 1).reshape(Cout, Cin, kh, kw)
        return solutions.conv2d_im2col(x, w, stride, padding)
    return conv


def test_conv_accepts_the_solution(capsys):
    assert lesson11.check_conv2d_im2col(solutions.conv2d_im2col) is True
    assert "PASSED: 11.1" in capsys.readouterr().out


@pytest.mark.parametrize("bug, message", [
    ("a true convolution (flipped kernel)", "wrong values"),
    ("padding forgotten in the output size", "expected shape"),
    ("windows flattened as (kh, kw, Cin)", "wrong values"),     # invisible with one channel only
])
def test_conv_rejects_planted_bugs(bug, message):
    with pytest.raises(Wrong, match=message):
        lesson11.check_conv2d_im2col(_conv(bug))


def test_conv_rejects_calling_minivit():
    with pytest.raises(Wrong, match="compute it by hand"):
        lesson11.check_conv2d_im2col(lambda x, w, s, p: cnn_ops.conv2d_forward(x, w, None, s, p)[0])
    assert cnn_ops.conv2d_forward.__name__ == "conv2d_forward"       # put back afterwards
    assert cnn_ops.im2col.__name__ == "im2col"


def test_conv_stub_is_not_attempted(capsys):
    assert lesson11.check_conv2d_im2col(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 11.2 BatchNorm backward

def _bn_backward(bug):
    """The solution with one plausible mistake planted."""
    def backward(dout, cache):
        xhat, inv_std, weight, training = cache
        if bug == "eval mode's formula (statistics treated as constants)":
            dxhat = dout * weight[None, :, None, None]
            return dxhat * inv_std[None, :, None, None], (dout * xhat).sum((0, 2, 3)), dout.sum((0, 2, 3))
        if bug == "statistics over (H, W) only, per image":
            axes = (2, 3)
            M = xhat.shape[2] * xhat.shape[3]
            dxhat = dout * weight[None, :, None, None]
            dx = inv_std[None, :, None, None] * (dxhat - dxhat.sum(axes, keepdims=True) / M
                                                 - xhat * (dxhat * xhat).sum(axes, keepdims=True) / M)
            return dx, (dout * xhat).sum((0, 2, 3)), dout.sum((0, 2, 3))
        if bug == "no variance term":
            dx, dw, db = solutions.batchnorm2d_backward(dout, cache)
            dxhat = dout * weight[None, :, None, None]
            M = xhat.shape[0] * xhat.shape[2] * xhat.shape[3]
            dx = dx + inv_std[None, :, None, None] * xhat * (dxhat * xhat).sum((0, 2, 3), keepdims=True) / M
            return dx, dw, db
        return solutions.batchnorm2d_backward(dout, cache)
    return backward


def test_batchnorm_accepts_the_solution(capsys):
    assert lesson11.check_batchnorm2d_backward(solutions.batchnorm2d_backward) is True
    assert "PASSED: 11.2" in capsys.readouterr().out


@pytest.mark.parametrize("bug", ["eval mode's formula (statistics treated as constants)",
                                 "statistics over (H, W) only, per image", "no variance term"])
def test_batchnorm_rejects_planted_bugs(bug):
    with pytest.raises(Wrong, match="gradient check fails: relative error dx"):
        lesson11.check_batchnorm2d_backward(_bn_backward(bug))


def test_batchnorm_rejects_calling_minivit():
    with pytest.raises(Wrong, match="compute it by hand"):
        lesson11.check_batchnorm2d_backward(lambda dout, cache: cnn_ops.batchnorm2d_backward(dout, cache))
    assert cnn_ops.batchnorm2d_backward.__name__ == "batchnorm2d_backward"


def test_batchnorm_stub_is_not_attempted(capsys):
    assert lesson11.check_batchnorm2d_backward(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 11.3 Bottleneck parameters

def test_bottleneck_count_by_hand():
    """ResNet-50's layer1.0 (64 -> 256 channels, so option B projects): counted on paper, 75,008."""
    convs = 64 * 64 + 64 * 64 * 9 + 64 * 256          # 1x1, 3x3, 1x1
    bns = 2 * (64 + 64 + 256)
    projection = 64 * 256 + 2 * 256
    assert solutions.bottleneck_num_parameters(64, 64, 1, "B") == convs + bns + projection == 75_008


def _count(bug):
    def count(in_chans, planes, stride, shortcut):
        n = solutions.bottleneck_num_parameters(in_chans, planes, stride, shortcut)
        if bug == "BatchNorm forgotten":
            n -= 2 * (planes + planes + 4 * planes)
        if bug == "projection only for option C":
            changes = stride != 1 or in_chans != 4 * planes
            if shortcut == "B" and changes:
                n -= in_chans * 4 * planes + 2 * 4 * planes
        if bug == "conv3 without the expansion":
            n -= planes * 4 * planes + 2 * 4 * planes - planes * planes - 2 * planes
        return n
    return count


def test_bottleneck_accepts_the_solution(capsys):
    assert lesson11.check_bottleneck_num_parameters(solutions.bottleneck_num_parameters) is True
    assert "PASSED: 11.3" in capsys.readouterr().out


@pytest.mark.parametrize("bug", ["BatchNorm forgotten", "projection only for option C", "conv3 without the expansion"])
def test_bottleneck_rejects_planted_bugs(bug):
    with pytest.raises(Wrong, match="a built Bottleneck has"):
        lesson11.check_bottleneck_num_parameters(_count(bug))


def test_bottleneck_rejects_a_float():
    with pytest.raises(Wrong, match="expected an integer"):
        lesson11.check_bottleneck_num_parameters(lambda *a: float(solutions.bottleneck_num_parameters(*a)))


def test_bottleneck_stub_is_not_attempted(capsys):
    assert lesson11.check_bottleneck_num_parameters(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out
