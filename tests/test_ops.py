"""Float64 central-difference gradient checks of every op, for every input and parameter,
plus the facts each op must satisfy (patchify == strided convolution, softmax rows sum
to 1, ...). Relative error below 1e-6 everywhere; see minivit/gradcheck.py.

Tests that take the `backend` fixture (tests/conftest.py) run once per backend: NumPy, the
strict CuPy stand-in, and a real GPU where there is one (float64 there too)."""
import numpy as np
import pytest

from minivit import ops
from minivit.gradcheck import TOLERANCE, check_op, numerical_gradient, rel_error

B, N, D, H = 2, 5, 8, 2   # small but not trivial: 2 heads of size 4, 5 tokens


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def check(backend, forward, backward, inputs, wrt, **kwargs):
    """check_op with the inputs on the backend's device."""
    return check_op(forward, backward, backend.to(inputs), wrt, **kwargs)


def assert_all_pass(errors):
    assert errors, "no gradients were checked"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad} (all: {errors})"


# ----------------------------------------------------------------------------- gradient checks

def test_linear(backend, rng):
    inputs = dict(x=randn(rng, B, N, D), w=randn(rng, 6, D), b=randn(rng, 6))
    assert_all_pass(check(backend, ops.linear_forward, ops.linear_backward, inputs, ("x", "w", "b")))


def test_linear_without_bias(backend, rng):
    inputs = dict(x=randn(rng, B, D), w=randn(rng, 3, D))
    errors = check(backend, ops.linear_forward, lambda d, c: ops.linear_backward(d, c)[:2], inputs, ("x", "w"))
    assert_all_pass(errors)


def test_patchify(backend, rng):
    inputs = dict(x=randn(rng, 2, 3, 8, 8), patch_size=4)
    assert_all_pass(check(backend, ops.patchify_forward, ops.patchify_backward, inputs, ("x",)))


def test_cls_pos(backend, rng):
    inputs = dict(x=randn(rng, B, N - 1, D), cls_token=randn(rng, 1, 1, D), pos_embed=randn(rng, 1, N, D))
    errors = check(backend, ops.cls_pos_forward, ops.cls_pos_backward, inputs, ("x", "cls_token", "pos_embed"))
    assert_all_pass(errors)


def test_cls_without_pos(backend, rng):
    inputs = dict(x=randn(rng, B, N - 1, D), cls_token=randn(rng, 1, 1, D))
    assert_all_pass(check(backend, ops.cls_pos_forward, ops.cls_pos_backward, inputs, ("x", "cls_token")))


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layernorm(backend, rng, eps):
    inputs = dict(x=randn(rng, B, N, D, scale=3.0) + 1.5, w=randn(rng, D), b=randn(rng, D), eps=eps)
    errors = check(backend, ops.layernorm_forward, ops.layernorm_backward, inputs, ("x", "w", "b"))
    assert_all_pass(errors)


@pytest.mark.parametrize("approximate", ["exact", "tanh"])
def test_gelu(backend, rng, approximate):
    # inputs in [-4, 4]: further into the left tail GELU's gradient falls below 1e-7 and its
    # relative error measures float64 rounding, not the backward pass
    inputs = dict(x=np.clip(randn(rng, B, N, D, scale=2.0), -4.0, 4.0), approximate=approximate)
    assert_all_pass(check(backend, ops.gelu_forward, ops.gelu_backward, inputs, ("x",)))


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(backend, rng, axis):
    # scale 1: with very peaked rows some gradients fall to ~1e-7 and their relative error
    # measures float64 rounding, not the backward pass
    inputs = dict(x=randn(rng, B, N, D), axis=axis)
    assert_all_pass(check(backend, ops.softmax_forward, ops.softmax_backward, inputs, ("x",)))


def test_dropout_with_fixed_mask(backend, rng):
    mask = ops.dropout_mask((B, N, D), 0.3, rng, backend.xp, np.float64)
    inputs = dict(x=randn(rng, B, N, D), mask=mask)
    assert_all_pass(check(backend, ops.dropout_forward, ops.dropout_backward, inputs, ("x",)))


def test_drop_path_with_fixed_mask(backend, rng):
    mask = ops.drop_path_mask(4, 3, 0.5, np.random.default_rng(3), backend.xp, np.float64)
    assert mask.shape == (4, 1, 1) and type(mask) is backend.xp.ndarray
    inputs = dict(x=randn(rng, 4, N, D), mask=mask)
    assert_all_pass(check(backend, ops.dropout_forward, ops.dropout_backward, inputs, ("x",)))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention(backend, rng, qkv_bias):
    inputs = dict(
        x=randn(rng, B, N, D), qkv_w=randn(rng, 3 * D, D, scale=0.5),
        qkv_b=randn(rng, 3 * D) if qkv_bias else None,
        proj_w=randn(rng, D, D, scale=0.5), proj_b=randn(rng, D), heads=H,
    )
    if qkv_bias:
        wrt = ("x", "qkv_w", "qkv_b", "proj_w", "proj_b")
        errors = check(backend, ops.attention_forward, ops.attention_backward, inputs, wrt, entries=Q_AND_V_BIAS)
    else:
        wrt = ("x", "qkv_w", "proj_w", "proj_b")
        errors = check(backend, ops.attention_forward,
                       lambda d, c: _drop_index(ops.attention_backward(d, c), 2), inputs, wrt)
    assert_all_pass(errors)


# The key bias adds q . b_k to every score in a row, and softmax ignores a constant added to
# a whole row: its true gradient is exactly 0, where a relative error only measures noise.
# The q and v biases get the relative-error check; the k bias is tested to be zero.
Q_AND_V_BIAS = {"qkv_b": np.r_[0:D, 2 * D:3 * D]}


def _drop_index(values, i):
    return values[:i] + values[i + 1:]


def test_key_bias_has_zero_gradient(backend, rng):
    inputs = backend.to(dict(x=randn(rng, B, N, D), qkv_w=randn(rng, 3 * D, D, scale=0.5), qkv_b=randn(rng, 3 * D),
                             proj_w=randn(rng, D, D, scale=0.5), proj_b=randn(rng, D), heads=H))
    out, cache = ops.attention_forward(**inputs)
    dout = backend.to(randn(rng, *out.shape))
    dqkv_b = backend.numpy(ops.attention_backward(dout, cache)[2])
    assert np.abs(dqkv_b[D:2 * D]).max() < 1e-12 < np.abs(dqkv_b[:D]).max()
    numeric = numerical_gradient(lambda: ops.attention_forward(**inputs)[0], inputs["qkv_b"],
                                 np.arange(D, 2 * D), dout=dout)
    assert np.abs(numeric[0, D:2 * D] if numeric.ndim == 2 else numeric[D:2 * D]).max() < 1e-8


def test_attention_with_fixed_dropout_mask(backend, rng):
    mask = ops.dropout_mask((B, H, N, N), 0.25, np.random.default_rng(1), backend.xp, np.float64)
    inputs = dict(x=randn(rng, B, N, D), qkv_w=randn(rng, 3 * D, D, scale=0.5), qkv_b=randn(rng, 3 * D),
                  proj_w=randn(rng, D, D, scale=0.5), proj_b=randn(rng, D), heads=H, attn_mask=mask)
    errors = check(backend, ops.attention_forward, ops.attention_backward, inputs,
                      ("x", "qkv_w", "qkv_b", "proj_w", "proj_b"), entries=Q_AND_V_BIAS)
    assert_all_pass(errors)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_mlp(backend, rng, gelu):
    F = 12
    masks = dict(drop_mask1=ops.dropout_mask((B, N, F), 0.2, np.random.default_rng(2), backend.xp, np.float64),
                 drop_mask2=ops.dropout_mask((B, N, D), 0.2, np.random.default_rng(3), backend.xp, np.float64))
    inputs = dict(x=randn(rng, B, N, D), fc1_w=randn(rng, F, D, scale=0.5), fc1_b=randn(rng, F),
                  fc2_w=randn(rng, D, F, scale=0.5), fc2_b=randn(rng, D), gelu=gelu, **masks)
    errors = check(backend, ops.mlp_forward, ops.mlp_backward, inputs, ("x", "fc1_w", "fc1_b", "fc2_w", "fc2_b"))
    assert_all_pass(errors)


@pytest.mark.parametrize("mode", ["cls", "mean"])
def test_pool(backend, rng, mode):
    inputs = dict(x=randn(rng, B, N, D), mode=mode)
    assert_all_pass(check(backend, ops.pool_forward, ops.pool_backward, inputs, ("x",)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy(backend, rng, smoothing):
    logits = backend.to(randn(rng, 4, 7, scale=3.0))
    labels = backend.to(np.array([0, 6, 3, 3]))
    (loss, cache) = ops.cross_entropy_forward(logits, labels, smoothing)
    analytic = ops.cross_entropy_backward(cache)
    numeric = numerical_gradient(lambda: ops.cross_entropy_forward(logits, labels, smoothing)[0], logits)
    assert rel_error(analytic, numeric) < TOLERANCE


# ----------------------------------------------------------------------------- what each op must compute

def test_patch_embedding_equals_strided_convolution(rng):
    """patchify + linear with the conv weight reshaped to (D, C*P*P) is exactly a P x P
    convolution with stride P, computed here directly, output pixel by output pixel."""
    Bc, C, S, P, Dc = 2, 3, 12, 4, 5
    x = randn(rng, Bc, C, S, S)
    w = randn(rng, Dc, C, P, P)
    b = randn(rng, Dc)
    patches, _ = ops.patchify_forward(x, P)
    ours, _ = ops.linear_forward(patches, w.reshape(Dc, -1), b)            # (B, G*G, D)
    G = S // P
    conv = np.zeros((Bc, Dc, G, G))
    for i in range(G):
        for j in range(G):
            window = x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P]        # (B, C, P, P)
            conv[:, :, i, j] = np.einsum("bcuv,dcuv->bd", window, w) + b
    expected = conv.reshape(Bc, Dc, G * G).transpose(0, 2, 1)           # flatten(2).transpose(1, 2), as timm
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_patch_embedding_equals_torch_conv2d(rng, torch):
    x = randn(rng, 2, 3, 16, 16)
    w = randn(rng, 6, 3, 8, 8)
    b = randn(rng, 6)
    patches, _ = ops.patchify_forward(x, 8)
    ours, _ = ops.linear_forward(patches, w.reshape(6, -1), b)
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=8)
    np.testing.assert_allclose(ours, ref.flatten(2).transpose(1, 2).numpy(), rtol=1e-12, atol=1e-12)


def test_softmax_is_stable_and_normalised(backend):
    x = backend.to(np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0]], dtype=np.float32))
    y, _ = ops.softmax_forward(x)
    assert y.dtype == np.float32
    y = backend.numpy(y)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], np.exp([-2, -1, 0]) / np.exp([-2, -1, 0]).sum(), rtol=1e-6)


def test_cross_entropy_values():
    logits = np.array([[0.0, 0.0], [1000.0, 0.0]])
    loss, _ = ops.cross_entropy_forward(logits, np.array([0, 1]))
    assert np.isclose(loss, (np.log(2) + 1000.0) / 2)          # huge logits: no overflow, no inf
    smooth, _ = ops.cross_entropy_forward(np.zeros((3, 4)), np.array([0, 1, 2]), label_smoothing=0.2)
    assert np.isclose(smooth, np.log(4))                        # uniform logits: log K whatever the target


def test_cross_entropy_rejects_bad_labels(backend):
    logits = backend.to(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="label 3 is out of range"):
        ops.cross_entropy_forward(logits, backend.to(np.array([0, 3])))
    with pytest.raises(ValueError, match="label -1"):
        ops.cross_entropy_forward(logits, backend.to(np.array([-1, 0])))
    with pytest.raises(TypeError, match="integers"):
        ops.cross_entropy_forward(logits, backend.to(np.array([0.0, 1.0])))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ops.cross_entropy_forward(logits, backend.to(np.array([0, 1, 2])))
    with pytest.raises(TypeError):
        ops.cross_entropy_forward(logits, [0, 1])
    if backend.device == "gpu":     # labels left on the host: a clear error, not a failure deep inside
        with pytest.raises(TypeError, match="same device as the logits"):
            ops.cross_entropy_forward(logits, np.array([0, 1]))


@pytest.mark.parametrize("module", ["ops", "fastops"])
@pytest.mark.parametrize("smoothing, error, message", [
    (-0.5, ValueError, "label_smoothing must be a number in \\[0, 1\\], got -0.5"),
    (1.5, ValueError, "got 1.5"),
    (float("nan"), ValueError, "got nan"),
    (np.float32("nan"), ValueError, "got np.float32\\(nan\\)|got nan"),
    (float("inf"), ValueError, "got inf"),
    (True, TypeError, "got True"),
    ("0.1", TypeError, "got '0.1'"),
    (None, TypeError, "got None"),
])
def test_cross_entropy_rejects_bad_label_smoothing(module, smoothing, error, message):
    """Outside [0, 1] the target has negative entries (or NaN), yet the loss looks plausible."""
    from minivit import fastops
    op = (ops if module == "ops" else fastops).cross_entropy_forward
    with pytest.raises(error, match=message):
        op(np.zeros((2, 3)), np.array([0, 1]), smoothing)


def _smoothed_loss_by_hand(logits, labels, s):
    """The definition: target (1 - s) * onehot + s / K, loss = mean over rows of -sum(target * log_softmax)."""
    B, K = logits.shape
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    target = (1 - s) * np.eye(K)[labels] + s / K
    return -(target * logp).sum() / B, (np.exp(logp) - target) / B


@pytest.mark.parametrize("module", ["ops", "fastops"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3, 1.0])
def test_label_smoothing_matches_the_closed_form_and_torch(rng, torch, module, smoothing):
    """(1 - s) on the true class plus s / K on EVERY class (the true one included), as in
    PyTorch. A target with s / (K - 1) on the other classes and 1 - s on the true one also
    sums to 1, so the gradient check cannot tell the two apart: compare the values."""
    from minivit import fastops
    m = ops if module == "ops" else fastops
    logits = randn(rng, 5, 7, scale=3.0)
    labels = np.array([0, 6, 3, 3, 1])
    loss, cache = m.cross_entropy_forward(logits, labels, smoothing)
    grad = m.cross_entropy_backward(cache)
    want_loss, want_grad = _smoothed_loss_by_hand(logits, labels, smoothing)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(labels), label_smoothing=smoothing)
    t_loss.backward()
    np.testing.assert_allclose(loss, t_loss.item(), rtol=1e-12)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_gelu_values():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    from scipy.stats import norm

    np.testing.assert_allclose(ops.gelu_forward(x, "exact")[0], x * norm.cdf(x), rtol=1e-14)
    # the tanh approximation is within 1e-3 of the exact GELU on this range
    assert np.max(np.abs(ops.gelu_forward(x, "tanh")[0] - x * norm.cdf(x))) < 1e-3
    with pytest.raises(ValueError, match="'exact' or 'tanh'"):
        ops.gelu_forward(x, "relu")


def test_dropout_mask_statistics():
    mask = ops.dropout_mask((200_000,), 0.25, np.random.default_rng(0))
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.75)}
    assert abs((mask == 0).mean() - 0.25) < 0.01
    assert abs(mask.mean() - 1.0) < 0.01          # inverted dropout keeps the expected value


def test_attention_matches_a_per_head_loop(rng):
    """The batched reshape(B, N, 3, H, hs) layout equals slicing q, k, v head by head."""
    x, qkv_w, qkv_b = randn(rng, B, N, D), randn(rng, 3 * D, D), randn(rng, 3 * D)
    proj_w, proj_b = randn(rng, D, D), randn(rng, D)
    out, _ = ops.attention_forward(x, qkv_w, qkv_b, proj_w, proj_b, H)
    hs = D // H
    qkv = x @ qkv_w.T + qkv_b                     # (B, N, 3D): [q | k | v], each head-major
    heads = []
    for h in range(H):
        q = qkv[..., 0 * D + h * hs: 0 * D + (h + 1) * hs]
        k = qkv[..., 1 * D + h * hs: 1 * D + (h + 1) * hs]
        v = qkv[..., 2 * D + h * hs: 2 * D + (h + 1) * hs]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hs)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v)
    expected = np.concatenate(heads, axis=-1) @ proj_w.T + proj_b
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_ops_keep_float32(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, N, D)).astype(np.float32)
    w = rng.standard_normal((3 * D, D)).astype(np.float32)
    b = np.zeros(3 * D, np.float32)
    pw, pb = rng.standard_normal((D, D)).astype(np.float32), np.zeros(D, np.float32)
    x, w, b, pw, pb = backend.to((x, w, b, pw, pb))
    xp = backend.xp
    out, cache = ops.attention_forward(x, w, b, pw, pb, H)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in ops.attention_backward(xp.ones_like(out), cache))
    y, cache = ops.layernorm_forward(x, xp.ones(D, np.float32), xp.zeros(D, np.float32))
    assert y.dtype == np.float32 and all(g.dtype == np.float32 for g in ops.layernorm_backward(y, cache))
    for kind in ("exact", "tanh"):
        g, cache = ops.gelu_forward(x, kind)
        assert g.dtype == np.float32 and ops.gelu_backward(g, cache).dtype == np.float32
    loss, cache = ops.cross_entropy_forward(x[:, 0], backend.to(np.array([0, 1])))
    assert ops.cross_entropy_backward(cache).dtype == np.float32


# ----------------------------------------------------------------------------- the checker itself

def test_checker_catches_a_wrong_backward(rng):
    """A LayerNorm backward that forgets the variance term (a classic mistake) must fail."""
    def wrong_backward(dout, cache):
        xhat, rstd, w = cache
        dxhat = dout * w
        dx = (dxhat - dxhat.mean(-1, keepdims=True)) * rstd       # missing: - xhat * mean(dxhat * xhat)
        return dx, (dout * xhat).sum((0, 1)), dout.sum((0, 1))

    inputs = dict(x=randn(rng, B, N, D), w=randn(rng, D), b=randn(rng, D))
    errors = check_op(ops.layernorm_forward, wrong_backward, inputs, ("x", "w", "b"))
    assert errors["x"] > 1e-2                     # caught, by a wide margin
    assert errors["w"] < TOLERANCE and errors["b"] < TOLERANCE   # and only the broken gradient fails


def test_checker_catches_a_transposed_weight_gradient(rng):
    def wrong_backward(dout, cache):
        dx, dw, db = ops.linear_backward(dout, cache)
        return dx, dw.T.reshape(dw.shape), db      # right shape, wrong layout

    inputs = dict(x=randn(rng, 3, 4), w=randn(rng, 4, 4), b=randn(rng, 4))
    assert check_op(ops.linear_forward, wrong_backward, inputs, ("x", "w", "b"))["w"] > 1e-2


def test_checker_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        check_op(ops.gelu_forward, ops.gelu_backward, dict(x=np.zeros(3, np.float32)), ("x",))


def test_rel_error():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert np.isclose(rel_error(np.array([1.0]), np.array([3.0])), 0.5)
    assert rel_error(np.zeros(2), np.zeros(2)) == 0.0              # 0 / max(1e-8, 0): no division by zero
