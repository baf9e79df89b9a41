"""The convolutional ops of minivit/cnn_ops.py: float64 gradient checks of every input and
parameter, hand-built cases with known answers, and parity with torch.nn.functional (forward
and backward) on odd shapes: non-square images and kernels, stride 2, padding 0 and 1, one
channel, BatchNorm in training and eval mode with its running averages, max-pool ties.

Shape legend: B batch, C channels (Cin / Cout), H, W height and width, k kernel side.
"""
import numpy as np
import pytest

from minivit import cnn_ops
from minivit.gradcheck import TOLERANCE, check_op


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def assert_all_pass(errors):
    assert errors, "no gradients were checked"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad} (all: {errors})"


# Odd shapes: non-square images, a non-square kernel, one input channel, stride 2, padding 0/1.
# (x shape, w shape, stride, padding)
CONV_CASES = [
    ((2, 3, 7, 5), (4, 3, 3, 3), 1, 1),     # the ResNet 3x3 "same" convolution, non-square image
    ((2, 1, 6, 7), (3, 1, 3, 2), 2, 0),     # one channel, 3x2 kernel, stride 2, no padding
    ((1, 2, 9, 6), (3, 2, 3, 3), 2, 1),     # the ResNet downsampling 3x3 convolution, odd side
    ((3, 4, 5, 7), (2, 4, 1, 1), 2, 0),     # the 1x1 stride-2 projection shortcut
    ((2, 2, 8, 5), (2, 2, 7, 7), 2, 3),     # the ImageNet stem: 7x7, stride 2, padding 3
]
CONV_IDS = ["3x3-s1-p1", "1ch-3x2-s2-p0", "3x3-s2-p1", "1x1-s2", "7x7-s2-p3"]


# ============================================================================= gradient checks

@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_gradients(rng, x_shape, w_shape, stride, padding, bias):
    inputs = dict(x=randn(rng, *x_shape), w=randn(rng, *w_shape), b=randn(rng, w_shape[0]) if bias else None,
                  stride=stride, padding=padding)
    wrt = ("x", "w", "b") if bias else ("x", "w")
    assert_all_pass(check_op(cnn_ops.conv2d_forward, cnn_ops.conv2d_backward, inputs, wrt))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (2, 1, 3, 4)], ids=["4ch", "1ch"])
def test_batchnorm2d_gradients(rng, training, shape):
    C = shape[1]
    inputs = dict(x=randn(rng, *shape, scale=2.0) + 0.7, weight=randn(rng, C), bias=randn(rng, C),
                  running_mean=randn(rng, C), running_var=rng.uniform(0.5, 2.0, C), training=training)
    errors = check_op(cnn_ops.batchnorm2d_forward, cnn_ops.batchnorm2d_backward, inputs, ("x", "weight", "bias"))
    assert_all_pass(errors)


def test_relu_gradient(rng):
    x = randn(rng, 2, 3, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5           # keep the central differences away from the kink at 0
    assert_all_pass(check_op(cnn_ops.relu_forward, cnn_ops.relu_backward, dict(x=x), ("x",)))


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (3, 2, 1, (2, 3, 7, 6)),    # the ImageNet stem's pool: overlapping windows, padding
    (2, 2, 0, (2, 1, 6, 5)),    # non-overlapping, one channel, a leftover column
    (3, 1, 0, (1, 2, 5, 4)),    # stride 1: every pixel in up to 9 windows
], ids=["3-s2-p1", "2-s2-p0", "3-s1-p0"])
def test_maxpool2d_gradient(rng, kernel, stride, padding, shape):
    # a random permutation: distinct values, so no two entries tie and a step of 1e-5 never
    # changes which one is the maximum
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) / 10
    inputs = dict(x=x, kernel=kernel, stride=stride, padding=padding)
    assert_all_pass(check_op(cnn_ops.maxpool2d_forward, cnn_ops.maxpool2d_backward, inputs, ("x",)))


def test_global_avg_pool_gradient(rng):
    inputs = dict(x=randn(rng, 2, 3, 4, 5))
    assert_all_pass(check_op(cnn_ops.global_avg_pool_forward, cnn_ops.global_avg_pool_backward, inputs, ("x",)))


@pytest.mark.parametrize("out_channels, stride, shape", [(8, 2, (2, 4, 5, 6)), (7, 1, (2, 3, 4, 4))])
def test_subsample_pad_gradient(rng, out_channels, stride, shape):
    inputs = dict(x=randn(rng, *shape), out_channels=out_channels, stride=stride)
    errors = check_op(cnn_ops.subsample_pad_forward, cnn_ops.subsample_pad_backward, inputs, ("x",))
    assert_all_pass(errors)


def test_gradient_check_catches_a_col2im_that_overwrites(rng, monkeypatch):
    """Why col2im must add: with overlapping windows a col2im that writes (keeping one window's
    share per pixel) gives a wrong gradient, and the check says so."""
    def overwriting_scatter(dwindows, x_shape, stride, padding):
        B, C, H, W = x_shape
        _, _, kh, kw, Hout, Wout = dwindows.shape
        s, p = stride, padding
        dxpad = np.zeros((B, C, H + 2 * p, W + 2 * p))
        for i in range(kh):
            for j in range(kw):
                dxpad[:, :, i:i + s * Hout:s, j:j + s * Wout:s] = dwindows[:, :, i, j]   # the bug: = for +=
        return dxpad[:, :, p:p + H, p:p + W]

    inputs = dict(x=randn(rng, 1, 2, 5, 5), w=randn(rng, 2, 2, 3, 3), stride=1, padding=1)
    assert check_op(cnn_ops.conv2d_forward, cnn_ops.conv2d_backward, inputs, ("x", "w"))["x"] < TOLERANCE
    monkeypatch.setattr(cnn_ops, "scatter_windows", overwriting_scatter)
    assert check_op(cnn_ops.conv2d_forward, cnn_ops.conv2d_backward, inputs, ("x", "w"))["x"] > 0.1


# ============================================================================= known answers

def test_conv2d_matches_a_loop_over_the_definition(rng):
    """out[b, o, y, x] = bias[o] + sum_{c,i,j} w[o, c, i, j] * xpad[b, c, s*y + i, s*x + j], four loops."""
    x, w, b = randn(rng, 2, 2, 6, 5), randn(rng, 3, 2, 3, 2), randn(rng, 3)
    s, p = 2, 1
    xpad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    Hout, Wout = (6 + 2 * p - 3) // s + 1, (5 + 2 * p - 2) // s + 1
    expected = np.zeros((2, 3, Hout, Wout))
    for n in range(2):
        for o in range(3):
            for y in range(Hout):
                for xx in range(Wout):
                    expected[n, o, y, xx] = b[o] + np.sum(w[o] * xpad[n, :, s * y:s * y + 3, s * xx:s * xx + 2])
    out, _ = cnn_ops.conv2d_forward(x, w, b, stride=s, padding=p)
    assert out.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col(rng):
    """<im2col(x), c> = <x, col2im(c)> for every x and c: col2im is the transpose of the linear
    map im2col, which is what a backward pass of a linear map must be (and only holds if
    overlapping windows add)."""
    x = randn(rng, 2, 3, 7, 6)
    cols = cnn_ops.im2col(x, 3, 3, 2, 1)
    c = randn(rng, *cols.shape)
    lhs = np.sum(cols * c)
    rhs = np.sum(x * cnn_ops.col2im(c, x.shape, 3, 3, 2, 1))
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))


def test_batchnorm2d_normalises_each_channel_and_updates_running_stats(rng):
    x = randn(rng, 4, 2, 3, 5, scale=3.0) + np.array([5.0, -2.0])[None, :, None, None]
    rm, rv = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    out, _ = cnn_ops.batchnorm2d_forward(x, np.ones(2), np.zeros(2), rm, rv, training=True, momentum=0.25)
    assert np.allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert np.allclose(out.var(axis=(0, 2, 3)), 1, atol=1e-4)      # biased variance, eps 1e-5
    per_channel = x.transpose(1, 0, 2, 3).reshape(2, -1)            # (C, B*H*W)
    np.testing.assert_allclose(rm, 0.75 * np.array([1.0, 2.0]) + 0.25 * per_channel.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.75 * np.array([3.0, 4.0]) + 0.25 * per_channel.var(axis=1, ddof=1), rtol=1e-12)


def test_maxpool_ties_send_the_gradient_to_the_first_max_in_row_major_order():
    x = np.zeros((1, 1, 2, 2))
    x[0, 0] = [[1.0, 2.0], [2.0, 2.0]]       # three tie for the maximum: (0, 1) comes first
    out, cache = cnn_ops.maxpool2d_forward(x, 2, 2, 0)
    dx = cnn_ops.maxpool2d_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx[0, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_global_avg_pool_and_relu_values():
    x = np.arange(12.0).reshape(1, 2, 2, 3) - 3.0
    out, _ = cnn_ops.global_avg_pool_forward(x)
    np.testing.assert_allclose(out, [[-0.5, 5.5]])
    np.testing.assert_array_equal(cnn_ops.relu_forward(x)[0], np.maximum(x, 0))


def test_subsample_pad_places_the_input_between_zero_channels():
    x = np.arange(2 * 2 * 3 * 3, dtype=np.float64).reshape(2, 2, 3, 3) + 1
    out, _ = cnn_ops.subsample_pad_forward(x, 6, 2)
    assert out.shape == (2, 6, 2, 2)
    np.testing.assert_array_equal(out[:, 2:4], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 4:].any()


# ============================================================================= bad input

@pytest.mark.parametrize("call, message", [
    (lambda: cnn_ops.conv2d_forward(np.zeros((1, 3, 5, 5)), np.zeros((2, 4, 3, 3))), "3 channels"),
    (lambda: cnn_ops.conv2d_forward(np.zeros((3, 5, 5)), np.zeros((2, 3, 3, 3))), "4-D"),
    (lambda: cnn_ops.conv2d_forward(np.zeros((1, 3, 5, 5)), np.zeros((2, 3, 3, 3)), stride=0), "stride"),
    (lambda: cnn_ops.conv2d_forward(np.zeros((1, 3, 5, 5)), np.zeros((2, 3, 3, 3)), padding=-1), "padding"),
    (lambda: cnn_ops.conv2d_forward(np.zeros((1, 3, 2, 2)), np.zeros((2, 3, 3, 3))), "does not fit"),
    (lambda: cnn_ops.conv2d_forward(np.zeros((1, 3, 5, 5)), np.zeros((2, 3, 3, 3)), np.zeros(3)), "bias"),
    (lambda: cnn_ops.maxpool2d_forward(np.zeros((1, 1, 5, 5)), 3, 2, 2), "at most kernel // 2"),
    (lambda: cnn_ops.batchnorm2d_forward(np.zeros((1, 2, 1, 1)), np.ones(2), np.zeros(2), np.zeros(2),
                                         np.ones(2), True), "more than 1 value"),
    (lambda: cnn_ops.batchnorm2d_forward(np.zeros((2, 2, 3, 3)), np.ones(3), np.zeros(2), np.zeros(2),
                                         np.ones(2), True), "weight must have shape"),
    (lambda: cnn_ops.batchnorm2d_forward(np.zeros((2, 2, 3, 3)), np.ones(2), np.zeros(2), np.zeros(2),
                                         np.ones(2), True, momentum=1.5), "momentum"),
    (lambda: cnn_ops.subsample_pad_forward(np.zeros((1, 4, 4, 4)), 2, 2), "out_channels"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ============================================================================= parity with torch

def _torch_grads(torch, fn, arrays, dout):
    """Run fn on float64 torch copies of `arrays`, backpropagate dout; output and gradients."""
    ts = [None if a is None else torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*ts)
    out.backward(torch.tensor(dout))
    return out.detach().numpy(), [None if t is None else t.grad.numpy() for t in ts]


def _close(a, b, tol=1e-12):
    """The error relative to the array's scale (some entries are sums that nearly cancel)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a - b)) / max(1e-8, np.max(np.abs(a) + np.abs(b)))
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_matches_torch(torch, rng, x_shape, w_shape, stride, padding, bias):
    x, w, b = randn(rng, *x_shape), randn(rng, *w_shape), randn(rng, w_shape[0]) if bias else None
    out, cache = cnn_ops.conv2d_forward(x, w, b, stride, padding)
    dout = randn(rng, *out.shape)
    dx, dw, db = cnn_ops.conv2d_backward(dout, cache)
    t_out, (t_dx, t_dw, t_db) = _torch_grads(
        torch, lambda x, w, b: torch.nn.functional.conv2d(x, w, b, stride, padding), (x, w, b), dout)
    _close(out, t_out)
    _close(dx, t_dx)
    _close(dw, t_dw)
    if bias:
        _close(db, t_db)
    else:
        assert db is None


@pytest.mark.parametrize("shape", [(3, 4, 5, 3), (2, 1, 3, 4)], ids=["4ch", "1ch"])
def test_batchnorm2d_train_and_eval_match_torch(torch, rng, shape):
    """Training: output, dx, dweight, dbias and the running averages after two steps (torch's
    unbiased running variance); then eval with those averages."""
    C = shape[1]
    weight, bias = randn(rng, C), randn(rng, C)
    rm, rv = randn(rng, C), rng.uniform(0.5, 2.0, C)
    t_rm, t_rv = torch.tensor(rm.copy()), torch.tensor(rv.copy())
    for step in range(2):
        x = randn(rng, *shape, scale=2.0) + 0.5
        out, cache = cnn_ops.batchnorm2d_forward(x, weight, bias, rm, rv, True, momentum=0.3, eps=1e-4)
        dout = randn(rng, *out.shape)
        grads = cnn_ops.batchnorm2d_backward(dout, cache)
        t_out, t_grads = _torch_grads(
            torch, lambda x, w, b: torch.nn.functional.batch_norm(x, t_rm, t_rv, w, b, True, 0.3, 1e-4),
            (x, weight, bias), dout)
        _close(out, t_out)
        for g, tg in zip(grads, t_grads):
            _close(g, tg)
        _close(rm, t_rm.numpy())
        _close(rv, t_rv.numpy())
    x = randn(rng, *shape)
    out, cache = cnn_ops.batchnorm2d_forward(x, weight, bias, rm, rv, False)
    dout = randn(rng, *out.shape)
    grads = cnn_ops.batchnorm2d_backward(dout, cache)
    t_out, t_grads = _torch_grads(
        torch, lambda x, w, b: torch.nn.functional.batch_norm(x, t_rm, t_rv, w, b, False), (x, weight, bias), dout)
    _close(out, t_out)
    for g, tg in zip(grads, t_grads):
        _close(g, tg)


@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (3, 2, 1, (2, 3, 7, 6)), (2, 2, 0, (2, 1, 6, 5)), (3, 1, 1, (1, 2, 5, 4)), (3, 2, 0, (1, 1, 8, 9)),
], ids=["3-s2-p1", "2-s2-p0", "3-s1-p1", "3-s2-p0"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_maxpool2d_matches_torch(torch, rng, kernel, stride, padding, shape, ties):
    """With ties (values from {0, 1, 2}, so most windows hold several maxima) torch's gradient
    goes to one of them; minivit must pick the same one."""
    x = rng.integers(0, 3, shape).astype(np.float64) if ties else randn(rng, *shape)
    out, cache = cnn_ops.maxpool2d_forward(x, kernel, stride, padding)
    dout = randn(rng, *out.shape)
    dx = cnn_ops.maxpool2d_backward(dout, cache)
    t_out, (t_dx,) = _torch_grads(
        torch, lambda x: torch.nn.functional.max_pool2d(x, kernel, stride, padding), (x,), dout)
    _close(out, t_out)
    _close(dx, t_dx)


def test_relu_and_global_avg_pool_match_torch(torch, rng):
    x = randn(rng, 2, 3, 5, 4)
    x[0, 0, 0, :2] = 0.0                       # torch's relu passes no gradient at exactly 0
    out, cache = cnn_ops.relu_forward(x)
    dout = randn(rng, *out.shape)
    t_out, (t_dx,) = _torch_grads(torch, torch.relu, (x,), dout)
    _close(out, t_out)
    _close(cnn_ops.relu_backward(dout, cache), t_dx)
    out, cache = cnn_ops.global_avg_pool_forward(x)
    dout = randn(rng, *out.shape)
    t_out, (t_dx,) = _torch_grads(
        torch, lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1), (x,), dout)
    _close(out, t_out)
    _close(cnn_ops.global_avg_pool_backward(dout, cache), t_dx)
