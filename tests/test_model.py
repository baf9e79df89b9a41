"""The whole model: float64 gradient checks of every parameter tensor, names, state dicts,
devices, dtypes and clear errors on bad input. Tests that take the `backend` fixture run once per
backend (NumPy, the strict CuPy stand-in, a real GPU where there is one)."""
import numpy as np
import pytest

from minivit import ViT, ViTConfig, get_preset
from minivit.backend import device_of, to_numpy
from minivit.gradcheck import TOLERANCE, check_model
from minivit.ops import cross_entropy_backward, cross_entropy_forward

TINY = ViTConfig(img_size=8, patch_size=4, in_chans=2, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=12)


def tiny_model(**overrides):
    return ViT(TINY.replace(**overrides), seed=1).astype(np.float64)


def batch(rng, cfg=TINY, B=3, dtype=np.float64):
    x = rng.standard_normal((B, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(dtype)
    y = rng.integers(0, cfg.num_classes, B)
    return x, y


def randomise(model, rng, scale=0.3):
    """Initial weights are tiny (std .02) and make some gradients nearly vanish; random
    weights of a larger scale, and non-trivial LayerNorm parameters, test every path."""
    for name, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * scale + (1.0 if name.endswith("norm1.weight") else 0.0)


def assert_all_pass(errors, model):
    names = {n for n, _ in model.named_parameters()}
    assert names | {"images"} == set(errors), "every parameter tensor and the input must be checked"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad}"


# ----------------------------------------------------------------------------- gradient checks

@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d", "none"])
def test_whole_model_gradients(backend, rng, pool, pos_embed):
    model = tiny_model(pool=pool, pos_embed=pos_embed)
    randomise(model, rng)
    model.to(backend.device)
    x, y = backend.to(batch(rng))
    assert_all_pass(check_model(model, x, y, samples=6), model)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_whole_model_gradients_other_options(backend, rng, gelu):
    model = tiny_model(gelu=gelu, qkv_bias=False, ln_eps=1e-5)
    randomise(model, rng)
    model.to(backend.device)
    x, y = backend.to(batch(rng))
    assert_all_pass(check_model(model, x, y, samples=6, label_smoothing=0.1), model)


def test_whole_model_gradients_with_dropout_and_drop_path_fixed_masks(backend, rng):
    """In training mode every pass draws new masks; reseeding before each forward pass
    fixes them, so the loss is one differentiable function and the check applies."""
    model = tiny_model(dropout=0.2, attn_dropout=0.2, drop_path=0.3).train()
    randomise(model, rng)
    model.to(backend.device)
    x, y = backend.to(batch(rng, B=4))
    # the masks really are active: two seeds give different outputs
    assert not np.allclose(to_numpy(model.seed(1)(x)), to_numpy(model.seed(2)(x)))
    assert_all_pass(check_model(model, x, y, samples=6, mask_seed=5), model)


def test_every_gradient_entry_of_a_tiny_model(rng):
    """No sampling: every entry of every parameter of a 1-block model."""
    model = ViT(TINY.replace(depth=1, dim=4, heads=2, mlp_dim=6), seed=0).astype(np.float64)
    randomise(model, rng)
    x, y = batch(rng, B=2)
    assert_all_pass(check_model(model, x, y, samples=None), model)
    # check_model leaves out the key bias, whose true gradient is exactly 0 (softmax
    # ignores a constant added to a row of scores): it must come out as 0.
    model.zero_grad()
    out = model(x)
    model.backward(cross_entropy_backward(cross_entropy_forward(out, y)[1]))
    assert np.abs(model.blocks[0].attn.qkv.bias.grad[4:8]).max() < 1e-12


def test_checker_catches_a_planted_bug_in_the_model(rng, monkeypatch):
    """Break one backward (forget GELU's x * pdf term) and the whole-model check must fail.
    The bug is planted in the reference ops (ops.py), which the model is switched to."""
    from minivit import modules, ops

    model = tiny_model()
    randomise(model, rng)
    x, y = batch(rng)
    wrong = lambda dout, cache: dout * cache[1]     # noqa: E731  d/dx [x Phi(x)] without x * pdf(x)
    monkeypatch.setattr(modules, "OPS", ops)
    assert check_model(model, x, y, samples=6)["blocks.0.mlp.fc1.weight"] < TOLERANCE   # sound before
    monkeypatch.setattr(ops, "gelu_backward", wrong)
    errors = check_model(model, x, y, samples=6)
    assert errors["blocks.0.mlp.fc1.weight"] > 1e-3


# ----------------------------------------------------------------------------- structure

def test_timm_parameter_names_and_shapes():
    cfg = get_preset("vit-ti16", depth=2)
    shapes = {n: p.shape for n, p in ViT(cfg).named_parameters()}
    D, N = 192, 197
    expected = {
        "cls_token": (1, 1, D), "pos_embed": (1, N, D),
        "patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,),
        "blocks.1.norm1.weight": (D,), "blocks.1.norm1.bias": (D,),
        "blocks.1.attn.qkv.weight": (3 * D, D), "blocks.1.attn.qkv.bias": (3 * D,),
        "blocks.1.attn.proj.weight": (D, D), "blocks.1.attn.proj.bias": (D,),
        "blocks.1.norm2.weight": (D,), "blocks.0.mlp.fc1.weight": (4 * D, D), "blocks.0.mlp.fc1.bias": (4 * D,),
        "blocks.0.mlp.fc2.weight": (D, 4 * D), "blocks.0.mlp.fc2.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,), "head.weight": (1000, D), "head.bias": (1000,),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert len(shapes) == 4 + 12 * 2 + 4


def test_parameter_counts_of_the_paper_models():
    """Exact counts with a 1000-class head, from the config alone (ViT-H is 632M parameters:
    not allocated), and the counter agrees with real models where allocating is cheap."""
    from minivit.shapes import count_parameters

    expected = {"vit-ti16": 5_717_416, "vit-s16": 22_050_664, "vit-b16": 86_567_656,
                "vit-b32": 88_224_232, "vit-l16": 304_326_632, "vit-h14": 632_045_800}
    assert {k: count_parameters(get_preset(k)) for k in expected} == expected
    for name in ("vit-ti16", "cifar-lesson", "cifar-recipe", "cifar-vit2"):
        assert ViT(name).num_parameters() == count_parameters(get_preset(name))
    for overrides in ({"qkv_bias": False}, {"pos_embed": "sincos2d"}, {"pos_embed": "none"}, {"num_classes": 0}):
        cfg = TINY.replace(**overrides)
        assert ViT(cfg).num_parameters() == count_parameters(cfg)


def test_cifar_lesson_preset_is_about_one_million_parameters():
    assert 0.9e6 < ViT("cifar-lesson").num_parameters() < 1.1e6


def test_initialisation_is_seeded_and_timm_like():
    a, b, c = ViT("cifar-lesson", seed=0), ViT("cifar-lesson", seed=0), ViT("cifar-lesson", seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert np.array_equal(pa.data, pb.data), name
        assert pa.data.dtype == np.float32
    w = a.blocks[0].mlp.fc1.weight.data
    assert not np.array_equal(w, c.blocks[0].mlp.fc1.weight.data)
    assert abs(w.std() - 0.02 * 0.88) < 0.001          # a normal truncated at 2 std has std 0.88 sigma
    assert np.abs(w).max() <= 0.04 + 1e-7
    assert np.all(a.blocks[0].attn.qkv.bias.data == 0) and np.all(a.norm.weight.data == 1)
    assert np.abs(a.cls_token.data).max() < 1e-5


def _attention_weights(model, block=0):
    """Per head, the (D, D) matrices of the bilinear forms q.k = x W_qh^T W_kh x'^T and of the
    value-then-projection map x -> x W_v^T W_proj^T, straight from the stored weights."""
    attn = model.blocks[block].attn
    w = attn.qkv.weight.data.astype(np.float64)
    D, H = w.shape[1], attn.heads
    hs = D // H
    qk = [w[h * hs:(h + 1) * hs].T @ w[D + h * hs:D + (h + 1) * hs] for h in range(H)]
    vo = w[2 * D:].T @ attn.proj.weight.data.astype(np.float64).T
    return qk, vo, hs


def test_mimetic_init_shapes_attention_like_a_trained_vit():
    cfg = get_preset("cifar-recipe", init="mimetic")
    model, timm = ViT(cfg, seed=0), ViT(cfg.replace(init="timm"), seed=0)
    D = cfg.dim
    for block in range(cfg.depth):
        qk, vo, hs = _attention_weights(model, block)
        # values then projection: -0.4 I + 0.4 Z/sqrt(D), Z of variance 1 (full rank, exact product)
        off = vo[~np.eye(D, dtype=bool)]
        assert abs(np.diag(vo).mean() + 0.4) < 0.01
        assert abs(off.mean()) < 0.002 and abs(off.std() / (0.4 / np.sqrt(D)) - 1) < 0.05
        for m in qk:
            # rank hs, and positive on the whole: each token's query matches its own key
            assert np.linalg.matrix_rank(m) == hs and np.trace(m) > 0.5 * hs
    # Attention at initialisation on the position embeddings alone (each row layer-normed):
    # mimetic heads look at the 3 x 3 neighbourhood of a patch (11.8% of the tokens on this
    # 8 x 8 grid, with the borders) with at least twice that share; timm's heads spread evenly.
    pos = np.asarray(model.pos_table, np.float64)[0, 1:]                        # (64, D)
    x = (pos - pos.mean(1, keepdims=True)) / pos.std(1, keepdims=True)
    G = cfg.grid_size
    r, c = np.divmod(np.arange(G * G), G)
    near = (np.abs(r[:, None] - r) <= 1) & (np.abs(c[:, None] - c) <= 1)       # (64, 64)
    even = near.sum(1).mean() / (G * G)

    def near_share(m):
        s = x @ m @ x.T / np.sqrt(hs)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return (p * near).sum(1).mean()

    for block in range(cfg.depth):
        assert all(near_share(m) > 2 * even for m in _attention_weights(model, block)[0])
        assert all(abs(near_share(m) - even) < 0.02 for m in _attention_weights(timm, block)[0])
    # only the attention weights are drawn differently; everything else, and the seeding, as timm
    again = ViT(cfg, seed=0)
    for (name, p), q, t in zip(model.named_parameters(), again.parameters(), timm.parameters()):
        assert np.array_equal(p.data, q.data) and p.data.dtype == np.float32, name
        if not name.endswith(("attn.qkv.weight", "attn.proj.weight")):
            assert np.array_equal(p.data, t.data), name


def test_forward_backward_shapes_and_dtype(rng):
    model = ViT("cifar-lesson")
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    logits = model(x)
    assert logits.shape == (4, 10) and logits.dtype == np.float32
    dx = model.backward(np.ones_like(logits))
    assert dx.shape == x.shape and dx.dtype == np.float32
    assert all(p.grad is not None and p.grad.dtype == np.float32 and p.grad.shape == p.shape
               for p in model.parameters())


def test_gradients_accumulate_until_zero_grad(backend, rng):
    model = tiny_model().to(backend.device)
    x, y = backend.to(batch(rng))
    for _ in range(2):
        model.backward(cross_entropy_backward(cross_entropy_forward(model(x), y)[1]))
    twice = to_numpy(model.head.weight.grad)
    model.zero_grad()
    assert model.head.weight.grad is None
    model.backward(cross_entropy_backward(cross_entropy_forward(model(x), y)[1]))
    np.testing.assert_allclose(twice, 2 * to_numpy(model.head.weight.grad))


def test_mean_pool_without_head_returns_features(rng):
    model = tiny_model(num_classes=0, pool="mean")
    x, _ = batch(rng)
    assert model(x).shape == (3, TINY.dim)


def test_forward_features_are_what_the_head_reads_and_backpropagate(rng):
    model = tiny_model()
    randomise(model, rng)
    x, _ = batch(rng)
    features = model.forward_features(x)                                  # (B, D)
    assert features.shape == (3, TINY.dim)
    logits = model(x)
    np.testing.assert_allclose(logits, features @ model.head.weight.data.T + model.head.bias.data, rtol=1e-12)
    # backward after forward_features takes the features' gradient and skips the head
    features = model.forward_features(x)
    model.zero_grad()
    dx = model.backward(np.ones_like(features))
    assert dx.shape == x.shape and model.head.weight.grad is None and model.norm.weight.grad is not None
    with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
        model.forward_features(x)
        model.backward(np.ones((3, TINY.num_classes)))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_features_backward_matches_central_differences(rng, pool):
    from minivit.gradcheck import numerical_gradient, rel_error, sample_indices
    model = tiny_model(pool=pool)
    randomise(model, rng)
    x, _ = batch(rng)
    dfeat = rng.standard_normal((3, TINY.dim))
    model.zero_grad()
    model.forward_features(x)
    dx = model.backward(dfeat)
    for name, array, analytic in (("images", x, dx),
                                  ("blocks.1.mlp.fc1.weight", model.blocks[1].mlp.fc1.weight.data,
                                   model.blocks[1].mlp.fc1.weight.grad),
                                  ("norm.bias", model.norm.bias.data, model.norm.bias.grad)):
        idx = sample_indices(array.shape, 8, rng)
        numeric = numerical_gradient(lambda: model.forward_features(x), array, idx, dout=dfeat)
        error = rel_error(analytic.reshape(-1)[idx], numeric.reshape(-1)[idx])
        assert error < TOLERANCE, (name, error)


def test_eval_mode_is_deterministic_and_train_mode_is_not(rng):
    model = ViT(TINY.replace(dropout=0.3, drop_path=0.2), seed=0)
    x, _ = batch(rng, dtype=np.float32)
    model.eval()
    assert np.array_equal(model(x), model(x))
    model.train()
    assert not np.array_equal(model(x), model(x))


# ----------------------------------------------------------------------------- state dict, dtype, device

def test_state_dict_round_trip(backend, rng):
    """From a model on the backend's device to one on the CPU and back (a checkpoint saved on the
    GPU loads on the CPU): the same weights, each model's on its own device."""
    a, b = ViT(TINY, seed=0).to(backend.device), ViT(TINY, seed=1)
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    assert b.device == "cpu" and a.device == backend.device
    x, _ = batch(rng, dtype=np.float32)
    for name, value in a.state_dict().items():
        assert np.array_equal(to_numpy(value), b.state_dict()[name]), name
    # (the CPU's float32 GELU is a rational approximation of erf, the GPU's the exact erf: ~1e-7 apart)
    np.testing.assert_allclose(to_numpy(a(backend.to(x))), b(x), rtol=1e-5, atol=1e-7)
    c = ViT(TINY, seed=2).to(backend.device)
    c.load_state_dict(b.state_dict())
    assert c.device == backend.device
    assert np.array_equal(to_numpy(c(backend.to(x))), to_numpy(a(backend.to(x))))


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    model = ViT(TINY, seed=0)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    good = {k: v.copy() for k, v in before.items()}
    with pytest.raises(KeyError, match="missing keys \\['head.bias'\\]"):
        model.load_state_dict({k: v for k, v in good.items() if k != "head.bias"})
    with pytest.raises(KeyError, match="unexpected keys \\['blocks.9.norm1.weight'\\]"):
        model.load_state_dict({**good, "blocks.9.norm1.weight": np.ones(8)})
    bad_shape = dict(good, **{"head.weight": np.zeros((4, 8), np.float32), "norm.bias": np.ones(8) * 7})
    with pytest.raises(ValueError, match="'head.weight' has shape \\(4, 8\\), the model expects \\(3, 8\\)"):
        model.load_state_dict(bad_shape)
    with pytest.raises(TypeError):
        model.load_state_dict([("head.weight", np.zeros((3, 8)))])
    for k, v in model.state_dict().items():
        assert np.array_equal(v, before[k]), f"{k} changed although loading failed"
    missing, unexpected = model.load_state_dict({"head.bias": np.ones(3)}, strict=False)
    assert "head.weight" in missing and unexpected == [] and np.all(model.head.bias.data == 1)


def test_astype_float64_and_back(rng):
    model = ViT(TINY).astype(np.float64)
    assert all(p.data.dtype == np.float64 for p in model.parameters())
    x, _ = batch(rng)
    assert model(x).dtype == np.float64
    model.astype("float32")
    assert model.dtype == np.float32
    with pytest.raises(TypeError, match="float32 or float64"):
        model.astype(np.int32)


def test_gpu_without_cupy_is_a_clear_error():
    from minivit.backend import gpu_available

    if gpu_available():
        pytest.skip("a GPU is available here; the error path is for machines without one")
    with pytest.raises(RuntimeError, match="CuPy|CUDA device"):
        ViT(TINY).to("gpu")
    with pytest.raises(ValueError, match="'cpu', 'gpu'"):
        ViT(TINY).to("tpu")
    assert ViT(TINY).to("cpu").device == "cpu"


@pytest.mark.parametrize("overrides", [{}, dict(pos_embed="relative", pool="mean", gelu="tanh")])
def test_training_steps_on_every_backend_agree_with_the_cpu(backend, overrides):
    """Three AdamW steps with clipping, through the whole model, on the backend's device and on
    the CPU from the same weights and batches: the same losses and weights (float32 tolerance),
    and every array stays on its device (the strict stand-in refuses any implicit host copy)."""
    from minivit.optim import AdamW, clip_grad_norm, param_groups

    cfg = TINY.replace(**overrides)
    rng = np.random.default_rng(0)
    batches = [batch(rng, cfg, B=4, dtype=np.float32) for _ in range(3)]
    runs = {}
    for device in ("cpu", backend.device):
        model = ViT(cfg, seed=0).to(device)
        opt = AdamW(param_groups(model, 0.05), lr=3e-2)
        losses = []
        for x, y in batches:
            x, y = (backend.to((x, y)) if device != "cpu" else (x, y))
            loss, cache = cross_entropy_forward(model(x), y, label_smoothing=0.1)
            model.zero_grad()
            model.backward(cross_entropy_backward(cache))
            clip_grad_norm(model.parameters(), 0.5)
            opt.step()
            losses.append(float(loss))
        assert all(device_of(p.data) == device_of(p.grad) == device for p in model.parameters())
        assert all(device_of(v) == device for st in opt.state for v in st.values() if hasattr(v, "dtype"))
        runs[device] = losses, {k: to_numpy(v) for k, v in model.state_dict().items()}
    (loss_cpu, w_cpu), (loss_dev, w_dev) = runs["cpu"], runs[backend.device]
    np.testing.assert_allclose(loss_dev, loss_cpu, rtol=1e-5)
    assert loss_cpu[-1] != loss_cpu[0]                  # the weights did move
    for name in w_cpu:
        if name.endswith("attn.qkv.bias"):
            # the key bias (middle third) has a true gradient of exactly 0 (softmax ignores a constant
            # added to a row of scores): AdamW turns its rounding noise into steps of +-lr, which differ
            w_dev[name], w_cpu[name] = (np.r_[w[:cfg.dim], w[2 * cfg.dim:]] for w in (w_dev[name], w_cpu[name]))
        np.testing.assert_allclose(w_dev[name], w_cpu[name], rtol=1e-4, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, error, message", [
    (lambda: [[0.0]], TypeError, "NumPy or CuPy array"),
    (lambda: np.zeros((2, 3, 8, 8), np.float32), ValueError, r"shape \(B, 2, 8, 8\), got \(2, 3, 8, 8\)"),
    (lambda: np.zeros((2, 8, 8, 2), np.float32), ValueError, "channels-last"),
    (lambda: np.zeros((2, 8, 8), np.float32), ValueError, "shape"),
    (lambda: np.zeros((2, 2, 16, 16), np.float32), ValueError, r"got \(2, 2, 16, 16\)"),
    (lambda: np.zeros((0, 2, 8, 8), np.float32), ValueError, "empty"),
    (lambda: np.zeros((2, 2, 8, 8), np.uint8), TypeError, "floating point, got dtype uint8"),
    (lambda: np.zeros((2, 2, 8, 8), np.float64), TypeError, "dtype float64 but the model is float32"),
    (lambda: np.full((2, 2, 8, 8), np.nan, np.float32), ValueError, "NaN or infinite"),
    (lambda: np.full((2, 2, 8, 8), np.inf, np.float32), ValueError, "NaN or infinite"),
])
def test_bad_images_are_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        ViT(TINY)(make())


def test_backward_errors():
    model = ViT(TINY)
    with pytest.raises(RuntimeError, match="without a matching forward"):
        model.backward(np.zeros((2, 3), np.float32))
    model(np.zeros((2, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        model.backward(np.zeros((2, 4), np.float32))


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown preset 'vit-z'"):
        ViT("vit-z")
    with pytest.raises(TypeError, match="ViTConfig or a preset name"):
        ViT({"dim": 8})


# ----------------------------------------------------------------------------- attention maps

def _attention_by_hand(model, x):
    """Every block's attention probabilities recomputed from minivit.ops, block by block."""
    from minivit import ops
    cfg = model.config
    H, hs = cfg.heads, cfg.dim // cfg.heads
    h, _ = ops.patchify_forward(x, cfg.patch_size)                                   # (B, G*G, C*P*P)
    h, _ = ops.linear_forward(h, model.patch_embed.proj.weight.data.reshape(cfg.dim, -1),
                              model.patch_embed.proj.bias.data)                       # (B, G*G, D)
    pos = model.pos_embed.data if hasattr(model, "pos_embed") else model.pos_table
    h, _ = ops.cls_pos_forward(h, model.cls_token.data, pos)                          # (B, N, D)
    maps = []
    for block in model.blocks:
        a, _ = ops.layernorm_forward(h, block.norm1.weight.data, block.norm1.bias.data, cfg.ln_eps)
        qkv, _ = ops.linear_forward(a, block.attn.qkv.weight.data, block.attn.qkv.bias.data)   # (B, N, 3D)
        q, k, _ = qkv.reshape(*qkv.shape[:2], 3, H, hs).transpose(2, 0, 3, 1, 4)            # (B, H, N, hs)
        att, _ = ops.softmax_forward((q * hs**-0.5) @ k.swapaxes(-1, -2))                   # (B, H, N, N)
        maps.append(att)
        h = block(h)
        block.clear_cache()
    return maps


@pytest.mark.parametrize("kind", ["fast", "reference"])
@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d"])
def test_attention_maps_equal_the_probabilities_recomputed_from_ops(kind, pos_embed):
    from minivit import modules
    cfg = get_preset("cifar-lesson", depth=3, pos_embed=pos_embed)
    model = ViT(cfg, seed=0).astype(np.float64).eval()
    rng = np.random.default_rng(1)
    for p in model.parameters():                       # larger weights than at init: maps far from uniform
        p.data[...] = rng.standard_normal(p.shape) * 0.1 + (1.0 if p.shape == (cfg.dim,) else 0.0)
    x = rng.standard_normal((2, 3, 32, 32))
    previous = modules.set_ops(kind)
    try:
        logits = model(x, keep_attention=True)
        maps = model.attention_maps()
        assert np.array_equal(logits, model(x))        # keeping the maps changes nothing else
    finally:
        modules.set_ops(previous)
    expected = _attention_by_hand(model, x)
    assert len(maps) == cfg.depth
    for got, want in zip(maps, expected):
        assert got.shape == (2, cfg.heads, cfg.num_tokens, cfg.num_tokens)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)
    assert np.abs(expected[0] - 1 / cfg.num_tokens).max() > 0.05   # not trivially uniform


def test_attention_maps_survive_backward_and_later_passes_and_need_asking_for():
    from minivit.ops import cross_entropy_backward, cross_entropy_forward
    model = ViT(get_preset("cifar-lesson", depth=2), seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    with pytest.raises(RuntimeError, match="keep_attention=True"):
        model.attention_maps()                          # never asked for
    model(x, keep_attention=True)
    kept = [m.copy() for m in model.attention_maps()]
    _, cache = cross_entropy_forward(model(x, keep_attention=True), np.array([0, 1]))
    model.backward(cross_entropy_backward(cache))       # backward reuses the forward's buffers
    for before, after in zip(kept, model.attention_maps()):
        assert np.array_equal(before, after)
    model(x)                                            # a pass without keep_attention forgets them
    with pytest.raises(RuntimeError, match="keep_attention=True"):
        model.attention_maps()
    with pytest.raises(TypeError, match="keep_attention"):
        model(x, keep_attention="yes")


# ----------------------------------------------------------------------------- switching ops

@pytest.mark.parametrize("first, then", [("fast", "reference"), ("reference", "fast")])
@pytest.mark.parametrize("num_classes", [3, 0])          # 0: no head, the final LayerNorm is the first to see dout
def test_switching_ops_between_forward_and_backward_is_a_clear_error(rng, first, then, num_classes):
    """The two sets of ops lay their caches out differently: a backward handed the other's
    cache used to fail with "too many values to unpack" (or "not enough")."""
    import copy

    from minivit import modules
    model = tiny_model(num_classes=num_classes)
    x, _ = batch(rng)
    previous = modules.set_ops(first)
    try:
        out = model(x)
        modules.set_ops(then)
        with pytest.raises(RuntimeError, match=rf"forward\(\) ran with the '{first}' ops, but "
                                               rf"modules.set_ops\('{then}'\) was called before backward"):
            model.backward(np.ones_like(out))
        assert all(p.grad is None for p in model.parameters())    # refused before any gradient was added
        copy.deepcopy(model)                                      # the note of the ops is a name, not a module
        out = model(x)                                            # a new forward pass with these ops is fine
        assert model.backward(np.ones_like(out)).shape == x.shape
        block = model.blocks[0]                                   # the modules themselves refuse too
        modules.set_ops(first)
        y = block(rng.standard_normal((3, TINY.num_tokens, TINY.dim)))
        modules.set_ops(then)
        with pytest.raises(RuntimeError, match=f"Block.backward.*'{first}' ops"):
            block.backward(np.ones_like(y))
    finally:
        modules.set_ops(previous)
