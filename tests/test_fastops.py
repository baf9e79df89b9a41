"""fastops.py against ops.py: every fast op gives the reference op's outputs and every
gradient (float64 to ~1e-12, float32 to float32 accuracy), the fast ops pass the same
float64 gradient checks as the reference ones, and the whole model computes the same
logits and gradients on both paths (modules.set_ops). Tests that take the `backend` fixture run
once per backend (NumPy, the strict CuPy stand-in, a real GPU where there is one)."""
import math

import numpy as np
import pytest

from minivit import ViT, fastops, get_preset, modules, ops
from minivit.backend import device_of, to_numpy
from minivit.gradcheck import TOLERANCE, rel_error

from test_ops import Q_AND_V_BIAS, _drop_index, assert_all_pass, check

B, N, D, H = 2, 5, 8, 2

# float64: the fast ops do the same arithmetic in another order. float32: also the
# A&S erf of the fast GELU (|error| <= 1.5e-7) and float32 rounding. `scaled` is relative
# to the largest entry: gradients that are ~0 (the key bias) only carry rounding noise.
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12, scaled=1e-12),
       np.float32: dict(rtol=1e-4, atol=1e-6, scaled=1e-5)}
DTYPES = [np.float64, np.float32]


def randn(rng, *shape, scale=1.0, dtype=np.float64):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def assert_same(fast, ref, dtype, what=""):
    """Outputs / gradient tuples of the two ops agree (None where the reference has None), on any device."""
    fast = fast if isinstance(fast, tuple) else (fast,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(fast) == len(ref), what
    for i, (a, b) in enumerate(zip(fast, ref)):
        if b is None:
            assert a is None, f"{what}[{i}]: expected None"
            continue
        assert device_of(a) == device_of(b), f"{what}[{i}]: on the {device_of(a)}, the reference on the {device_of(b)}"
        a, b = to_numpy(a), to_numpy(b)
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} != {b.shape}"
        assert a.dtype == b.dtype == dtype, f"{what}[{i}]: dtype {a.dtype} / {b.dtype}, expected {dtype}"
        tol = TOL[dtype]
        atol = tol["atol"] + tol["scaled"] * float(np.abs(b).max(initial=0.0))
        np.testing.assert_allclose(a, b, rtol=tol["rtol"], atol=atol, err_msg=f"{what}[{i}]")


def compare(name, inputs, dtype, seed=0, backend=None):
    """Run fastops.<name> and ops.<name> forward and backward on the same inputs and upstream
    gradient (NumPy arrays, moved to the backend's device when one is given)."""
    fwd_f, bwd_f = getattr(fastops, f"{name}_forward"), getattr(fastops, f"{name}_backward")
    fwd_r, bwd_r = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
    before = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    if backend is not None:
        inputs = backend.to(inputs)
    out_f, cache_f = fwd_f(**inputs)
    out_r, cache_r = fwd_r(**inputs)
    for k, v in before.items():                      # the fast op must not write into its inputs
        np.testing.assert_array_equal(to_numpy(inputs[k]), v, err_msg=f"{name}_forward changed input {k}")
    assert_same(out_f, out_r, dtype, f"{name} forward")
    dout = randn(np.random.default_rng([seed, 9]), *out_r.shape, dtype=dtype)
    dout_copy = dout.copy()
    if backend is not None:
        dout = backend.to(dout)
    grads_f = bwd_f(dout, cache_f)
    np.testing.assert_array_equal(to_numpy(dout), dout_copy, err_msg=f"{name}_backward changed dout")
    assert_same(grads_f, bwd_r(dout, cache_r), dtype, f"{name} backward")


@pytest.fixture(autouse=True)
def restore_ops_and_threads():
    kind, threads, block = modules.get_ops_kind(), fastops.get_num_threads(), fastops._BLOCK_BYTES
    yield
    modules.set_ops(kind)
    fastops.set_num_threads(threads)
    fastops._BLOCK_BYTES = block


def _row_offset(block):
    """Where a block (a view) starts in memory: sorts the recorded blocks into block order."""
    return block.__array_interface__["data"][0]


def _short_last_block(sizes):
    """True when the blocks of one call (their row counts, in block order) are several, and
    the last is shorter than the others."""
    return len(sizes) >= 2 and sizes[-1] < sizes[0] and len(set(sizes[:-1])) == 1


@pytest.fixture(params=["one block", "many blocks, 2 threads"])
def blocks(request, monkeypatch, backend):
    """Run each comparison with whole arrays and with small blocks on two threads, so the
    block and thread splitting, and a last block shorter than the others, are exercised.

    A fixed small _BLOCK_BYTES cannot promise a short last block: most rows are longer than
    the blocks, so every block is one row. Instead each call gets blocks of the smallest
    number of rows >= 2 that does not divide its rows (3 rows: 2 + 1, 10 rows: 3 + 3 + 3 + 1;
    2 rows: 1 + 1), and the blocks the kernels really saw are recorded, then checked after the
    test. Returns that record: [(rows, [rows of each block, in block order]), ...]."""
    splits = []
    # ("many blocks" with a device backend is never collected: see conftest.pytest_collection_modifyitems)
    if request.param != "one block":
        fastops.set_num_threads(2)
        blockwise = fastops._blockwise

        def small_blocks(kernel, arrays, row_bytes, min_rows=1):
            rows = next(a for a in arrays if a is not None).shape[0]
            step = next((n for n in range(2, rows) if rows % n), 1)
            seen = {}

            def counting_kernel(*parts):
                start = next(a for a in parts if a is not None)
                seen[_row_offset(start)] = start.shape[0]   # blocks run on two threads, in any order
                return kernel(*parts)

            monkeypatch.setattr(fastops, "_BLOCK_BYTES", step * max(1, row_bytes))
            results = blockwise(counting_kernel, arrays, row_bytes, min_rows)
            splits.append((rows, [seen[k] for k in sorted(seen)]))
            return results

        monkeypatch.setattr(fastops, "_blockwise", small_blocks)
    yield splits
    for rows, sizes in splits:
        assert sum(sizes) == rows, (rows, sizes)
        if rows >= 2:
            assert len(sizes) >= 2, f"{rows} rows ran as one block"
        if rows >= 3:
            assert _short_last_block(sizes), f"{rows} rows split as {sizes}: no short last block"


# ----------------------------------------------------------------------------- fast == reference

def test_fastops_offers_every_op_of_ops():
    public = [n for n in vars(ops) if not n.startswith("_") and callable(getattr(ops, n))
              and getattr(getattr(ops, n), "__module__", "") == "minivit.ops"]
    missing = [n for n in public if not hasattr(fastops, n)]
    assert not missing, f"fastops lacks {missing}"
    rewritten = {"linear_forward", "linear_backward", "layernorm_forward", "layernorm_backward",
                 "gelu_forward", "gelu_backward", "softmax_forward", "softmax_backward",
                 "attention_forward", "attention_backward", "attention_probs", "mlp_forward", "mlp_backward"}
    for n in public:   # everything not rewritten is the reference function itself
        assert (getattr(fastops, n) is getattr(ops, n)) == (n not in rewritten), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(B, N, D), (3, D), (2, 3, 4, D)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(backend, rng, dtype, shape, bias):
    inputs = dict(x=randn(rng, *shape, dtype=dtype), w=randn(rng, 6, D, dtype=dtype),
                  b=randn(rng, 6, dtype=dtype) if bias else None)
    compare("linear", inputs, dtype, backend=backend)


def test_linear_on_a_strided_view(backend, rng):
    x = randn(rng, B, N, D)[:, 0]                   # (B, D), rows N*D apart (the head's input)
    inputs = dict(x=x, w=randn(rng, 3, D), b=randn(rng, 3))
    compare("linear", inputs, np.float64, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(B, N, D), (7, 16), (3, 33, 12)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_layernorm(backend, rng, dtype, shape, eps, blocks):
    D_ = shape[-1]
    inputs = dict(x=randn(rng, *shape, scale=3.0, dtype=dtype) + 1.5, w=randn(rng, D_, dtype=dtype),
                  b=randn(rng, D_, dtype=dtype), eps=eps)
    compare("layernorm", inputs, dtype, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["exact", "tanh"])
@pytest.mark.parametrize("shape", [(B, N, D), (4, 37), (3, 9, 24)])
def test_gelu(backend, rng, dtype, approximate, shape, blocks):
    x = randn(rng, *shape, scale=3.0, dtype=dtype)
    x.flat[:4] = [0.0, -20.0, 20.0, -1e-3]           # zero, saturated tails, tiny
    compare("gelu", dict(x=x, approximate=approximate), dtype, backend=backend)


def test_gelu_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'exact' or 'tanh'"):
        fastops.gelu_forward(np.zeros(3), "relu")


def test_fast_erf_gelu_is_accurate_in_float32():
    """The float32 GELU (Abramowitz & Stegun erf) against the exact one in float64."""
    from scipy.special import ndtr

    x = np.linspace(-12, 12, 200_001, dtype=np.float32)
    out, (d,) = fastops.gelu_forward(x)
    x64 = x.astype(np.float64)
    exact = x64 * ndtr(x64)
    slope = ndtr(x64) + x64 * np.exp(-0.5 * x64**2) / math.sqrt(2 * math.pi)
    assert np.abs(out - exact).max() < 1e-6            # ~1 ulp of |x| <= 12
    assert np.abs(out - exact)[np.abs(x) < 1].max() < 3e-7
    assert np.abs(d - slope).max() < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax(backend, rng, dtype, axis):
    compare("softmax", dict(x=randn(rng, 3, 4, 6, scale=3.0, dtype=dtype), axis=axis), dtype, backend=backend)


def test_softmax_is_stable():
    x = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0]], dtype=np.float32)
    y, _ = fastops.softmax_forward(x)
    assert np.isfinite(y).all() and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


def attention_inputs(rng, dtype, B_=B, N_=N, D_=D, H_=H, bias=True, mask_p=None):
    inputs = dict(x=randn(rng, B_, N_, D_, dtype=dtype), qkv_w=randn(rng, 3 * D_, D_, scale=0.5, dtype=dtype),
                  qkv_b=randn(rng, 3 * D_, dtype=dtype) if bias else None,
                  proj_w=randn(rng, D_, D_, scale=0.5, dtype=dtype), proj_b=randn(rng, D_, dtype=dtype), heads=H_)
    if mask_p:
        inputs["attn_mask"] = ops.dropout_mask((B_, H_, N_, N_), mask_p, np.random.default_rng(1), np, dtype)
    return inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mask_p", [None, 0.25])
@pytest.mark.parametrize("size", [(B, N, D, H), (3, 17, 12, 3), (1, 4, 6, 1)])
def test_attention(backend, rng, dtype, bias, mask_p, size, blocks):
    B_, N_, D_, H_ = size
    compare("attention", attention_inputs(rng, dtype, B_, N_, D_, H_, bias, mask_p), dtype, backend=backend)


@pytest.mark.parametrize("dtype, weight_scale, least_score", [(np.float32, 3.0, 100.0), (np.float64, 10.0, 1000.0)])
def test_attention_with_large_scores(backend, rng, dtype, weight_scale, least_score, blocks):
    """Scores far beyond where exp() overflows (float32 at ~88, float64 at ~709): the softmax
    must subtract each row's maximum first. With small scores a kernel without it gives the
    same numbers, so the other tests cannot tell."""
    inputs = attention_inputs(rng, dtype, 3, 17, 12, 3, mask_p=0.1)
    inputs["qkv_w"] = inputs["qkv_w"] * weight_scale
    qkv, _ = ops.linear_forward(inputs["x"], inputs["qkv_w"], inputs["qkv_b"])     # (B, N, 3D)
    q, k, _ = qkv.reshape(3, 17, 3, 3, 4).transpose(2, 0, 3, 1, 4)               # (B, H, N, hs)
    scores = (q / 2.0) @ k.swapaxes(-1, -2)                                        # q k^T / sqrt(hs), hs = 4
    assert scores.max() > least_score           # exp() of it overflows: the test is as strong as it claims
    out, cache = fastops.attention_forward(**backend.to(inputs))
    assert np.isfinite(to_numpy(out)).all()
    grads = fastops.attention_backward(backend.xp.ones_like(out), cache)
    assert all(np.isfinite(to_numpy(g)).all() for g in grads)
    compare("attention", inputs, dtype, backend=backend)


def test_many_blocks_fixture_has_a_short_last_block(rng, blocks, request):
    """The "many blocks, 2 threads" runs really split every op into several blocks, the last
    one shorter (the fixture records the blocks each kernel got, and checks every call)."""
    if request.node.callspec.params["blocks"] == "one block":
        assert blocks == []
        return
    x = randn(rng, 3, 5, 8, dtype=np.float32)                  # 15 rows: 2 + 2 + ... + 1
    out, cache = fastops.layernorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32))
    fastops.layernorm_backward(out, cache)
    fastops.gelu_forward(x)
    inputs = attention_inputs(rng, np.float32, 3, 5, 8, 2)     # 3 images: 2 + 1
    out, cache = fastops.attention_forward(**inputs)
    fastops.attention_backward(out, cache)
    assert len(blocks) == 5
    assert [rows for rows, _ in blocks] == [15, 15, 15, 3, 3]
    assert all(_short_last_block(sizes) for _, sizes in blocks), blocks


def mlp_inputs(rng, dtype, gelu, masks, F=12):
    inputs = dict(x=randn(rng, B, N, D, dtype=dtype), fc1_w=randn(rng, F, D, scale=0.5, dtype=dtype),
                  fc1_b=randn(rng, F, dtype=dtype), fc2_w=randn(rng, D, F, scale=0.5, dtype=dtype),
                  fc2_b=randn(rng, D, dtype=dtype), gelu=gelu)
    if masks:
        inputs["drop_mask1"] = ops.dropout_mask((B, N, F), 0.2, np.random.default_rng(2), np, dtype)
        inputs["drop_mask2"] = ops.dropout_mask((B, N, D), 0.2, np.random.default_rng(3), np, dtype)
    return inputs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", ["exact", "tanh"])
@pytest.mark.parametrize("masks", [False, True])
def test_mlp(backend, rng, dtype, gelu, masks, blocks):
    compare("mlp", mlp_inputs(rng, dtype, gelu, masks), dtype, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_ops_keep_the_dtype(backend, rng, dtype):
    """No float64 temporaries leak into float32 results (and float64 stays float64)."""
    xp = backend.xp
    inputs = backend.to(attention_inputs(rng, dtype, mask_p=0.1))
    out, cache = fastops.attention_forward(**inputs)
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in fastops.attention_backward(xp.ones_like(out), cache))
    out, cache = fastops.mlp_forward(**backend.to(mlp_inputs(rng, dtype, "exact", True)))
    assert out.dtype == dtype
    assert all(g.dtype == dtype for g in fastops.mlp_backward(xp.ones_like(out), cache))
    x = backend.to(randn(rng, B, N, D, dtype=dtype))
    y, cache = fastops.layernorm_forward(x, xp.ones(D, dtype), xp.zeros(D, dtype))
    assert y.dtype == dtype and all(g.dtype == dtype for g in fastops.layernorm_backward(y, cache))
    for kind in ("exact", "tanh"):
        g, cache = fastops.gelu_forward(x, kind)
        assert g.dtype == dtype and fastops.gelu_backward(g, cache).dtype == dtype


# ----------------------------------------------------------------------------- float64 gradient checks of the fast ops

def test_gradcheck_linear(backend, rng):
    inputs = dict(x=randn(rng, B, N, D), w=randn(rng, 6, D), b=randn(rng, 6))
    assert_all_pass(check(backend, fastops.linear_forward, fastops.linear_backward, inputs, ("x", "w", "b")))


def test_gradcheck_layernorm(backend, rng):
    inputs = dict(x=randn(rng, B, N, D, scale=3.0) + 1.5, w=randn(rng, D), b=randn(rng, D))
    errors = check(backend, fastops.layernorm_forward, fastops.layernorm_backward, inputs, ("x", "w", "b"))
    assert_all_pass(errors)


@pytest.mark.parametrize("approximate", ["exact", "tanh"])
def test_gradcheck_gelu(backend, rng, approximate):
    inputs = dict(x=randn(rng, B, N, D, scale=2.0), approximate=approximate)
    assert_all_pass(check(backend, fastops.gelu_forward, fastops.gelu_backward, inputs, ("x",)))


@pytest.mark.parametrize("axis", [-1, 1])
def test_gradcheck_softmax(backend, rng, axis):
    inputs = dict(x=randn(rng, B, N, D), axis=axis)
    assert_all_pass(check(backend, fastops.softmax_forward, fastops.softmax_backward, inputs, ("x",)))


@pytest.mark.parametrize("mask_p", [None, 0.25])
def test_gradcheck_attention(backend, rng, mask_p):
    inputs = attention_inputs(rng, np.float64, mask_p=mask_p)
    errors = check(backend, fastops.attention_forward, fastops.attention_backward, inputs,
                      ("x", "qkv_w", "qkv_b", "proj_w", "proj_b"), entries=Q_AND_V_BIAS)
    assert_all_pass(errors)


def test_gradcheck_attention_without_qkv_bias(backend, rng):
    inputs = attention_inputs(rng, np.float64, bias=False)
    errors = check(backend, fastops.attention_forward,
                   lambda d, c: _drop_index(fastops.attention_backward(d, c), 2), inputs,
                   ("x", "qkv_w", "proj_w", "proj_b"))
    assert_all_pass(errors)


def test_fast_key_bias_has_zero_gradient(backend, rng):
    inputs = backend.to(attention_inputs(rng, np.float64))
    out, cache = fastops.attention_forward(**inputs)
    dqkv_b = to_numpy(fastops.attention_backward(backend.to(randn(rng, *out.shape)), cache)[2])
    assert np.abs(dqkv_b[D:2 * D]).max() < 1e-12 < np.abs(dqkv_b[:D]).max()


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_gradcheck_mlp(backend, rng, gelu):
    inputs = mlp_inputs(rng, np.float64, gelu, masks=True)
    errors = check(backend, fastops.mlp_forward, fastops.mlp_backward, inputs,
                   ("x", "fc1_w", "fc1_b", "fc2_w", "fc2_b"))
    assert_all_pass(errors)


# ----------------------------------------------------------------------------- the whole model on both paths

def run_model(kind, config, dtype, seed=0, backend=None):
    """Logits, image gradient and parameter gradients (NumPy arrays) of one pass on the backend's device."""
    modules.set_ops(kind)
    model = ViT(config, seed=0).astype(dtype).to("cpu" if backend is None else backend.device)
    model.seed(seed)                                 # the same dropout / drop-path masks on both paths
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, config.in_chans, config.img_size, config.img_size)).astype(dtype)
    labels = np.array([0, 1, 2]) % config.num_classes
    if backend is not None:
        x, labels = backend.to((x, labels))
    logits = model(x)
    _, cache = ops.cross_entropy_forward(logits, labels)
    dx = model.backward(ops.cross_entropy_backward(cache))
    assert device_of(logits) == device_of(dx) == model.device
    return to_numpy(logits), to_numpy(dx), {name: to_numpy(p.grad) for name, p in model.named_parameters()}


SMALL = get_preset("cifar-lesson", img_size=16, dim=24, depth=2, heads=3, mlp_dim=40)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("overrides", [
    {},
    dict(qkv_bias=False, gelu="tanh", pool="mean", pos_embed="sincos2d"),
    dict(dropout=0.2, attn_dropout=0.2, drop_path=0.3),
])
def test_model_same_logits_and_gradients_on_both_paths(backend, dtype, overrides):
    config = SMALL.replace(**overrides)
    ref = run_model("reference", config, dtype, backend=backend)
    fast = run_model("fast", config, dtype, backend=backend)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(fast[0], ref[0], **tol)
    np.testing.assert_allclose(fast[1], ref[1], **tol)
    assert fast[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert fast[2][name].dtype == dtype, name
        scale = max(np.abs(ref[2][name]).max(), 1e-30)
        assert np.abs(fast[2][name] - ref[2][name]).max() / scale < (1e-9 if dtype == np.float64 else 1e-3), name


def test_model_gradcheck_on_the_fast_path(backend):
    """Every parameter tensor and the images, through the fast ops, with attention dropout and
    drop-path masks fixed. (No MLP dropout: a dropped hidden unit makes its fc2 weights'
    gradient exactly 0, where a relative error measures only the numerical noise.)"""
    from minivit.gradcheck import check_model

    modules.set_ops("fast")
    model = ViT(SMALL.replace(depth=1, attn_dropout=0.1, drop_path=0.2), seed=0).astype(np.float64)
    rng = np.random.default_rng(4)
    for name, p in model.named_parameters():   # init weights (std .02) make some gradients nearly vanish
        p.data[...] = rng.standard_normal(p.shape) * 0.3 + (1.0 if name.endswith(".weight") and p.data.ndim == 1 else 0.0)
    model.to(backend.device)
    x = backend.to(rng.standard_normal((2, 3, 16, 16)))
    errors = check_model(model, x, backend.to(np.array([1, 7])), samples=4, mask_seed=5)
    assert len(errors) == len(model.parameters()) + 1
    assert all(v < TOLERANCE for v in errors.values()), errors


# ----------------------------------------------------------------------------- the switch and the threads

def test_set_ops_switches_and_reports():
    assert modules.get_ops_kind() == "fast" and modules.get_ops() is fastops    # the default
    assert modules.set_ops("reference") == "fast"
    assert modules.get_ops() is ops
    assert modules.set_ops("fast") == "reference"
    with pytest.raises(ValueError, match="fast"):
        modules.set_ops("quick")


def test_thread_count_does_not_change_results(rng):
    inputs = attention_inputs(rng, np.float32, 4, 17, 12, 3, mask_p=0.1)
    results = []
    for threads in (1, 2):
        fastops.set_num_threads(threads)
        fastops._BLOCK_BYTES = 4096
        out, cache = fastops.attention_forward(**inputs)
        results.append((out,) + fastops.attention_backward(np.ones_like(out), cache))
    for a, b in zip(*results):
        assert rel_error(a, b) < 1e-6
    with pytest.raises(ValueError):
        fastops.set_num_threads(0)


@pytest.mark.parametrize("env, expected", [
    ({"MINIVIT_NUM_THREADS": "1"}, "1"),
    ({"OMP_NUM_THREADS": "3"}, "3"),
    ({"MINIVIT_NUM_THREADS": "2", "OMP_NUM_THREADS": "5"}, "2"),   # minivit's own setting wins
    ({"OMP_NUM_THREADS": "4,2"}, None),                             # an OpenMP list: fall back to the cores
    ({"MINIVIT_NUM_THREADS": "many"}, "error"),
])
def test_thread_count_from_environment(env, expected):
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("MINIVIT_NUM_THREADS", "OMP_NUM_THREADS")}
    code = "import os; from minivit import fastops; print(fastops.get_num_threads(), len(os.sched_getaffinity(0)))"
    run = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    if expected == "error":
        assert run.returncode != 0 and "$MINIVIT_NUM_THREADS must be a positive integer, got 'many'" in run.stderr
        return
    assert run.returncode == 0, run.stderr
    threads, cores = run.stdout.split()
    assert threads == (expected or cores)
