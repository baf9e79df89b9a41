"""cnn_fastops.py against cnn_ops.py: the fast convolution and BatchNorm give the reference
ops' outputs and every gradient on odd shapes (non-square images and kernels, stride 1, 2 and
3, padding 0 to 3, 1x1, 3x3 and 7x7 kernels, one channel, batch 1, bias and no bias;
float64 to ~1e-12, float32 to float32 accuracy), on NumPy and the CuPy stand-in, whole and
split into blocks of images on two threads; they pass float64 gradient checks of their own;
and a whole ResNet computes the same logits and gradients with modules.set_ops("reference")
(cnn_ops) as with the default (cnn_fastops).

Shape legend: B batch, C channels (Cin / Cout), H, W height and width, k kernel side.
"""
import numpy as np
import pytest

from minivit import cnn_fastops, cnn_ops, fastops, modules
from minivit.backend import to_numpy
from minivit.gradcheck import TOLERANCE, check_op
from minivit.resnet import ResNet, ResNetConfig

# The ViT fastops tests' tolerances and comparison (float64: the same arithmetic in another
# order; float32: rounding of sums over B*H*W values; `scaled` is relative to the largest entry).
from test_fastops import DTYPES, TOL, assert_same  # noqa: E402,F401

# (x shape, w shape, stride, padding): every path of cnn_fastops (the "shifted" columns of
# stride 1, the strided "taps", the 1x1 "pixels") on shapes where a transposed or misplaced
# index would show.
CONV_CASES = [
    ((2, 3, 7, 5), (4, 3, 3, 3), 1, 1),     # ResNet's 3x3 "same" convolution, non-square image
    ((1, 2, 9, 6), (3, 2, 3, 3), 2, 1),     # ResNet's downsampling 3x3, batch 1, odd side
    ((3, 1, 6, 7), (2, 1, 3, 3), 1, 0),     # one input channel, no padding
    ((2, 1, 6, 7), (3, 1, 3, 2), 2, 0),     # a 3x2 kernel, stride 2
    ((2, 2, 5, 8), (3, 2, 2, 3), 1, 2),     # a 2x3 kernel, stride 1, padding wider than needed
    ((3, 4, 5, 7), (2, 4, 1, 1), 1, 0),     # 1x1, stride 1: the columns are the input
    ((3, 4, 5, 7), (6, 4, 1, 1), 2, 0),     # the 1x1 stride-2 projection shortcut
    ((2, 3, 4, 5), (2, 3, 1, 1), 1, 1),     # 1x1 with padding: zero borders in the output
    ((2, 2, 11, 9), (2, 2, 7, 7), 2, 3),    # the ImageNet stem: 7x7, stride 2, padding 3
    ((2, 2, 6, 7), (1, 2, 7, 7), 1, 3),     # 7x7 stride 1: taps reach far past each image
    ((2, 3, 8, 9), (2, 3, 3, 3), 3, 1),     # stride 3
]
CONV_IDS = ["3x3-s1-p1", "3x3-s2-p1-b1", "1ch-3x3-s1-p0", "3x2-s2", "2x3-s1-p2", "1x1-s1", "1x1-s2",
            "1x1-p1", "7x7-s2-p3", "7x7-s1-p3", "3x3-s3"]


def randn(rng, *shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True)
def restore_ops_threads_blocks():
    kind, threads, block = modules.get_ops_kind(), fastops.get_num_threads(), cnn_fastops._BLOCK_BYTES
    yield
    modules.set_ops(kind)
    fastops.set_num_threads(threads)
    cnn_fastops._BLOCK_BYTES = block


@pytest.fixture(params=["one block", "one image per block, 2 threads"])
def blocks(request, backend, monkeypatch):
    """The batch as one block, and one image per block on two threads (the per-block shares of
    dW and db must add up; every block writes only its own images). Blocks are the NumPy path
    (CuPy runs each op once on the whole batch): conftest leaves the second case out of the
    collection for the other backends (it keys on this fixture's name, `blocks`)."""
    if request.param != "one block":
        fastops.set_num_threads(2)
        monkeypatch.setattr(cnn_fastops, "_BLOCK_BYTES", 1)
    return request.param


@pytest.fixture(params=["taps", "shifted"])
def columns(request, monkeypatch):
    """Both ways a stride-1 convolution lays out its columns, on every shape: strided copies per
    tap ("taps"), or contiguous slices of the flattened padded input ("shifted"). cnn_fastops
    picks by the share of wasted grid positions; the tests force each."""
    monkeypatch.setattr(cnn_fastops, "_SHIFTED_WASTE", 0.0 if request.param == "taps" else float("inf"))
    return request.param


def compare(name, inputs, dtype, backend, seed=0):
    """cnn_fastops.<name> and cnn_ops.<name>, forward and backward, on the same inputs and
    upstream gradient; neither input nor dout may be written into by the fast op. Returns the
    inputs as the fast op saw them (the BatchNorm test reads the running averages from them)."""
    fwd_f, bwd_f = getattr(cnn_fastops, f"{name}_forward"), getattr(cnn_fastops, f"{name}_backward")
    fwd_r, bwd_r = getattr(cnn_ops, f"{name}_forward"), getattr(cnn_ops, f"{name}_backward")
    mutable = ("running_mean", "running_var")          # BatchNorm updates these in place, by design
    before = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray) and k not in mutable}
    ref_inputs = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    fast_inputs = backend.to(inputs)
    out_f, cache_f = fwd_f(**fast_inputs)
    out_r, cache_r = fwd_r(**backend.to(ref_inputs))
    assert_same(out_f, out_r, dtype, f"{name} forward")
    dout = randn(np.random.default_rng([seed, 9]), *out_r.shape, dtype=dtype)
    dout_dev = backend.to(dout)
    grads_f = bwd_f(dout_dev, cache_f)
    assert_same(grads_f, bwd_r(backend.to(dout), cache_r), dtype, f"{name} backward")
    np.testing.assert_array_equal(to_numpy(dout_dev), dout, err_msg=f"{name}_backward changed dout")
    for k, v in before.items():
        np.testing.assert_array_equal(to_numpy(fast_inputs[k]), v, err_msg=f"{name} changed its input {k}")
    return fast_inputs


# ============================================================================= fast == reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_matches_reference(backend, blocks, columns, dtype, x_shape, w_shape, stride, padding, bias):
    rng = np.random.default_rng(0)
    inputs = dict(x=randn(rng, *x_shape, dtype=dtype), w=randn(rng, *w_shape, dtype=dtype),
                  b=randn(rng, w_shape[0], dtype=dtype) if bias else None, stride=stride, padding=padding)
    compare("conv2d", inputs, dtype, backend)


def test_conv2d_resnet_layer_float32():
    """A real ResNet-20 layer (16 channels, 32 x 32, a batch large enough for several blocks of
    the default size), float32: the long sums of dW over B*H*W positions stay within tolerance."""
    rng = np.random.default_rng(1)
    x = randn(rng, 24, 16, 32, 32, dtype=np.float32)
    w = randn(rng, 16, 16, 3, 3, dtype=np.float32) * np.float32(0.1)
    assert cnn_fastops._BLOCK_BYTES < 24 * 16 * 9 * 34 * 34 * 4          # more than one block
    assert cnn_fastops._grid(32, 32, 3, 3, 1, 1)[0] == "shifted"          # the default picks shifted here
    compare("conv2d", dict(x=x, w=w, b=None, stride=1, padding=1), np.float32, _CPU)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (1, 2, 3, 4), (3, 1, 2, 2)], ids=["odd", "batch1", "1ch"])
def test_batchnorm2d_matches_reference(backend, dtype, training, shape):
    rng = np.random.default_rng(2)
    C = shape[1]
    x = randn(rng, *shape, dtype=dtype) * dtype(3) + dtype(1.5)        # off-centre, not unit variance
    inputs = dict(x=x, weight=randn(rng, C, dtype=dtype), bias=randn(rng, C, dtype=dtype),
                  running_mean=randn(rng, C, dtype=dtype), running_var=rng.uniform(0.5, 2, C).astype(dtype),
                  training=training, momentum=0.3, eps=1e-5)
    # the running averages the reference ends with, from the same starting values
    rm, rv = inputs["running_mean"].copy(), inputs["running_var"].copy()
    cnn_ops.batchnorm2d_forward(x, inputs["weight"], inputs["bias"], rm, rv, training, 0.3, 1e-5)
    seen = compare("batchnorm2d", inputs, dtype, backend)
    # compare() ran each forward once: the fast op's running averages moved exactly as the reference's
    assert_same((seen["running_mean"], seen["running_var"]), (backend.to(rm), backend.to(rv)), dtype, "running stats")


def test_fast_ops_refuse_bad_input_as_the_reference_does():
    rng = np.random.default_rng(3)
    x, w = randn(rng, 2, 3, 5, 5), randn(rng, 4, 3, 3, 3)
    bad = [
        (lambda m: m.conv2d_forward(x, randn(rng, 4, 2, 3, 3)), "channels"),
        (lambda m: m.conv2d_forward(x[0], w), "4-D"),
        (lambda m: m.conv2d_forward(x, w, stride=0), "stride"),
        (lambda m: m.conv2d_forward(x, randn(rng, 4, 3, 7, 7)), "does not fit"),
        (lambda m: m.conv2d_forward(x, w, b=np.zeros(3)), "bias"),
        (lambda m: m.batchnorm2d_forward(x, np.ones(2), np.zeros(3), np.zeros(3), np.ones(3), True), "weight"),
        (lambda m: m.batchnorm2d_forward(x[:1, :, :1, :1], *[np.ones(3)] * 4, True), "more than 1 value"),
        (lambda m: m.batchnorm2d_forward(x, *[np.ones(3)] * 4, True, momentum=2.0), "momentum"),
    ]
    for call, words in bad:
        for ops in (cnn_ops, cnn_fastops):
            with pytest.raises(ValueError, match=words):
                call(ops)
    with pytest.raises(TypeError, match="training"):
        cnn_fastops.batchnorm2d_forward(x, *[np.ones(3)] * 4, 1)


# ============================================================================= gradient checks

def _assert_all_pass(errors):
    assert errors, "no gradients were checked"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad} (all: {errors})"


@pytest.mark.parametrize("x_shape, w_shape, stride, padding",
                         [CONV_CASES[i] for i in (0, 1, 3, 6, 8)], ids=[CONV_IDS[i] for i in (0, 1, 3, 6, 8)])
def test_conv2d_gradcheck(columns, x_shape, w_shape, stride, padding):
    rng = np.random.default_rng(4)
    inputs = dict(x=randn(rng, *x_shape), w=randn(rng, *w_shape), b=randn(rng, w_shape[0]),
                  stride=stride, padding=padding)
    _assert_all_pass(check_op(cnn_fastops.conv2d_forward, cnn_fastops.conv2d_backward, inputs, ("x", "w", "b"),
                              samples=40))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm2d_gradcheck(training):
    rng = np.random.default_rng(5)
    C = 3
    inputs = dict(x=randn(rng, 3, C, 4, 5) * 2 + 1, weight=randn(rng, C), bias=randn(rng, C),
                  running_mean=randn(rng, C), running_var=rng.uniform(0.5, 2, C), training=training)
    # check_op runs the forward many times: each training call moves the running averages,
    # which the training-mode output does not read (and eval mode does not move them)
    _assert_all_pass(check_op(cnn_fastops.batchnorm2d_forward, cnn_fastops.batchnorm2d_backward, inputs,
                              ("x", "weight", "bias"), samples=40))


# ============================================================================= the whole network

def _grads_after_one_step(model, x, dlogits):
    model.zero_grad()
    logits = model(x)
    dx = model.backward(dlogits)
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    return logits, dx, grads


@pytest.mark.parametrize("config, dtype", [
    (ResNetConfig(block="basic", layers=(3, 3, 3), widths=(16, 32, 64), stem="cifar", shortcut="A",
                  num_classes=10, img_size=32), np.float32),                        # ResNet-20
    (ResNetConfig(block="bottleneck", layers=(1, 1), widths=(2, 4), stem="imagenet", shortcut="B",
                  num_classes=5, img_size=16), np.float64),                         # 1x1, 7x7, projections
], ids=["resnet20-float32", "bottleneck-float64"])
def test_resnet_step_same_with_reference_ops(config, dtype):
    """One training step of a ResNet with cnn_fastops (the default) and with cnn_ops
    (set_ops("reference")) from the same weights: the same logits, input gradient, parameter
    gradients and BatchNorm running averages."""
    rng = np.random.default_rng(6)
    x = randn(rng, 4, 3, config.img_size, config.img_size, dtype=dtype)
    results = {}
    for kind in ("reference", "fast"):
        modules.set_ops(kind)
        model = ResNet(config, seed=0).astype(dtype)
        model.train()
        logits, dx, grads = _grads_after_one_step(model, x, randn(np.random.default_rng(7), 4, config.num_classes,
                                                                  dtype=dtype))
        buffers = {k: v.copy() for k, v in model.named_buffers()}
        results[kind] = (logits, dx, grads, buffers)
    ref, fast = results["reference"], results["fast"]
    assert_same((fast[0], fast[1]), (ref[0], ref[1]), dtype, "logits, dx")
    assert fast[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert_same(fast[2][name], ref[2][name], dtype, name)
    for name in ref[3]:
        if ref[3][name].dtype.kind == "f":
            assert_same(fast[3][name], ref[3][name], dtype, name)


def test_ops_switch_reaches_the_resnet():
    """set_ops("reference") makes the ResNet's layers run cnn_ops, "fast" cnn_fastops, and a
    backward after a switch is refused (each set reads only the caches it made)."""
    called = []
    model = ResNet(ResNetConfig(block="basic", layers=(1,), widths=(4,), stem="cifar", num_classes=3, img_size=8))
    x = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for kind, ops in (("reference", cnn_ops), ("fast", cnn_fastops)):
        modules.set_ops(kind)
        original = ops.conv2d_forward
        try:
            ops.conv2d_forward = lambda *a, **k: called.append(kind) or original(*a, **k)
            model(x)
        finally:
            ops.conv2d_forward = original
    assert called == ["reference"] * 3 + ["fast"] * 3              # conv1 and the block's two
    modules.set_ops("reference")
    with pytest.raises(RuntimeError, match="ops"):
        model.backward(np.ones((2, 3), np.float32))


class _Cpu:
    name = "cpu"

    @staticmethod
    def to(value):
        return value


_CPU = _Cpu()
