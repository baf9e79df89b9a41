"""The position-embedding variants of the paper's ablation (App. D.4, Table 8): learned 2-D
embeddings (a row and a column embedding of D/2 each, concatenated), relative position
bias (BEiT's learned per-head bias for each 2-D offset), and positions added at every block.

What is checked: the ops on hand-built cases, their float64 gradient checks (ops.py and
fastops.py), fastops against ops, PyTorch autograd twins (one op, and a whole tiny ViT),
config errors, saving and loading, and resampling to another image size.

Shape legend: B batch, C channels, S image side, P patch side, G patches per side,
N = 1 + G*G tokens, D width, H heads, hs head size, T rows of a relative bias table.
"""
from __future__ import annotations

import numpy as np
import pytest

from minivit import ViT, ViTConfig, fastops, modules, ops
from minivit.gradcheck import TOLERANCE, check_model, check_op, rel_error
from minivit.ops import cross_entropy_backward, cross_entropy_forward
from minivit.pretrained import (
    _timm_rows,
    load_pretrained,
    pad_pos_embed,
    parameter_shapes,
    resample_axis_embed,
    resample_pos_embed,
    resample_rel_pos_bias_table,
    save_pretrained,
)

from test_fastops import attention_inputs, blocks, compare, restore_ops_and_threads  # noqa: F401 (fixtures)
from test_ops import Q_AND_V_BIAS, assert_all_pass

OPS = {"reference": ops, "fast": fastops}
# 3 x 3 patches: offsets from -2 to 2 on each axis, so every kind of pair occurs.
TINY = ViTConfig(img_size=12, patch_size=4, in_chans=2, num_classes=3, dim=8, depth=2, heads=2, mlp_dim=12)


def randn(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def random_model(config, seed=1, scale=0.3):
    """A float64 ViT with random weights of a larger scale than at init (init weights are tiny,
    and relative bias tables start at zero), non-trivial LayerNorm scales included."""
    model = ViT(config, seed=seed).astype(np.float64)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * scale + (1.0 if name.endswith("norm1.weight") else 0.0)
    return model


def batch(config, B=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, config.in_chans, config.img_size, config.img_size))
    return x, rng.integers(0, config.num_classes, B)


def assert_model_passes(errors, model):
    names = {n for n, _ in model.named_parameters()}
    assert names | {"images"} == set(errors), "every parameter tensor and the input must be checked"
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    assert not bad, f"gradient check failed: {bad}"


# ============================================================================= learned 2-D embeddings

def test_pos2d_on_a_hand_built_grid():
    """2 x 2 patches, D = 4: patch (i, j) gets concat(col[j], row[i]), [CLS] its own vector."""
    row = np.array([[1.0, 2.0], [3.0, 4.0]])                  # row i -> (D/2,)
    col = np.array([[10.0, 20.0], [30.0, 40.0]])              # column j -> (D/2,)
    cls_pos = np.full((1, 1, 4), 7.0)
    pos, _ = ops.pos2d_forward(row, col, cls_pos)
    expected = np.array([[7, 7, 7, 7],          # [CLS]
                         [10, 20, 1, 2],        # patch (0, 0)
                         [30, 40, 1, 2],        # patch (0, 1)
                         [10, 20, 3, 4],        # patch (1, 0)
                         [30, 40, 3, 4]])[None]  # patch (1, 1)
    np.testing.assert_array_equal(pos, expected)


def test_pos2d_follows_the_sincos_table_convention():
    """The fixed sin-cos table is itself a 2-D table of this kind (its first D/2 channels depend on
    the column only, the last D/2 on the row only): cut into a column and a row embedding, pos2d
    rebuilds it exactly, so both tables order patches and channels the same way."""
    G, D = 4, 8
    table = ops.sincos_2d_pos_embed(D, G, dtype=np.float64)               # (1, N, D)
    grid = table[0, 1:].reshape(G, G, D)                                  # (G, G, D), [i, j]
    col = grid[0, :, :D // 2]                                             # patches of row 0: j varies
    row = grid[:, 0, D // 2:]                                             # patches of column 0: i varies
    pos, _ = ops.pos2d_forward(row, col, np.zeros((1, 1, D)))
    np.testing.assert_array_equal(pos, table)


def test_pos2d_gradient_check():
    rng = np.random.default_rng(0)
    G, D = 3, 6
    inputs = dict(row=randn(rng, G, D // 2), col=randn(rng, G, D // 2), cls_pos=randn(rng, 1, 1, D))
    assert_all_pass(check_op(ops.pos2d_forward, ops.pos2d_backward, inputs, ("row", "col", "cls_pos")))
    assert fastops.pos2d_forward is ops.pos2d_forward and fastops.pos2d_backward is ops.pos2d_backward


def test_pos2d_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"row and col \(G, D/2\) and cls_pos \(1, 1, D\)"):
        ops.pos2d_forward(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((1, 1, 5)))
    with pytest.raises(ValueError, match="pos2d_forward expects"):
        ops.pos2d_forward(np.zeros((3, 2)), np.zeros((2, 2)), np.zeros((1, 1, 4)))


# ============================================================================= relative position bias

def test_relative_position_index_on_a_2x2_grid_by_hand():
    """Patches 0..3 sit at (0,0) (0,1) (1,0) (1,1). Offset (dy, dx) = query - key, in [-1, 1],
    is entry (dy + 1) * 3 + (dx + 1) of a 3 x 3 grid; T = 9 + 3 = 12, and the [CLS] rows are
    9 ([CLS] -> patch), 10 (patch -> [CLS]) and 11 ([CLS] -> [CLS])."""
    expected = np.array([
        # keys: [CLS] (0,0) (0,1) (1,0) (1,1)
        [11, 9, 9, 9, 9],     # query [CLS]
        [10, 4, 3, 1, 0],     # query (0,0): offsets (0,0) (0,-1) (-1,0) (-1,-1)
        [10, 5, 4, 2, 1],     # query (0,1): offsets (0,1) (0,0) (-1,1) (-1,0)
        [10, 7, 6, 4, 3],     # query (1,0): offsets (1,0) (1,-1) (0,0) (0,-1)
        [10, 8, 7, 5, 4],     # query (1,1): offsets (1,1) (1,0) (0,1) (0,0)
    ])
    index = ops.relative_position_index(2)
    np.testing.assert_array_equal(index, expected)
    assert index.dtype.kind == "i"


def test_relative_position_index_is_one_entry_per_offset():
    """On a 4 x 4 grid every one of the (2G-1)^2 offsets is used, pairs with the same offset share
    an entry, and different offsets never do."""
    G = 4
    index = ops.relative_position_index(G)
    assert index.shape == (1 + G * G, 1 + G * G)
    coords = [(p // G, p % G) for p in range(G * G)]
    by_offset = {}
    for q, (qi, qj) in enumerate(coords):
        for k, (ki, kj) in enumerate(coords):
            by_offset.setdefault((qi - ki, qj - kj), set()).add(int(index[1 + q, 1 + k]))
    assert len(by_offset) == (2 * G - 1) ** 2
    assert all(len(v) == 1 for v in by_offset.values())
    assert len({next(iter(v)) for v in by_offset.values()}) == (2 * G - 1) ** 2


@pytest.mark.parametrize("grid", [0, -1, 2.0, True])
def test_relative_position_index_rejects_bad_grids(grid):
    with pytest.raises(ValueError, match="grid_size must be a positive integer"):
        ops.relative_position_index(grid)


def test_rel_pos_bias_looks_up_the_table():
    rng = np.random.default_rng(0)
    index = ops.relative_position_index(3)                     # (10, 10), T = 28
    table = randn(rng, 28, 2)
    bias, _ = ops.rel_pos_bias_forward(table, index)
    assert bias.shape == (2, 10, 10)
    for h in range(2):
        for q in range(10):
            for k in range(10):
                assert bias[h, q, k] == table[index[q, k], h]


def test_rel_pos_bias_gradient_check():
    rng = np.random.default_rng(1)
    inputs = dict(table=randn(rng, 28, 3), index=ops.relative_position_index(3))
    assert_all_pass(check_op(ops.rel_pos_bias_forward, ops.rel_pos_bias_backward, inputs, ("table",)))


def test_rel_pos_bias_backward_is_a_scatter_add_not_an_assignment():
    """The gradient of a table entry is the sum over every (query, key) pair that reads it. Here it
    is summed pair by pair in a loop; a plain assignment dtable[index] = dbias (which keeps one
    pair per entry) gives a different answer, so this test would catch one."""
    rng = np.random.default_rng(2)
    G, H = 3, 2
    index = ops.relative_position_index(G)
    T = (2 * G - 1) ** 2 + 3
    dbias = randn(rng, H, 1 + G * G, 1 + G * G)
    expected = np.zeros((T, H))
    for q in range(1 + G * G):
        for k in range(1 + G * G):
            expected[index[q, k]] += dbias[:, q, k]
    _, cache = ops.rel_pos_bias_forward(randn(rng, T, H), index)
    dtable = ops.rel_pos_bias_backward(dbias, cache)
    np.testing.assert_allclose(dtable, expected, rtol=1e-12, atol=1e-12)
    assigned = np.zeros((T, H))
    assigned[index.reshape(-1)] = dbias.transpose(1, 2, 0).reshape(-1, H)   # the bug: last pair wins
    assert np.abs(assigned - expected).max() > 0.1
    # offset (0, 0) is read by the G*G pairs of a patch with itself
    counts = ops.rel_pos_bias_backward(np.ones_like(dbias), cache)
    assert counts[(G - 1) * (2 * G - 1) + (G - 1), 0] == G * G


# ============================================================================= attention with a bias

def bias_inputs(rng, dtype=np.float64, B=2, N=5, D=8, H=2, mask_p=None):
    inputs = attention_inputs(rng, dtype, B, N, D, H, True, mask_p)
    # Scores and bias both of order 1: with sharper attention some probabilities fall to ~1e-8, the
    # bias gradients there (p * (dp - sum)) to ~1e-5, and their relative error is rounding noise.
    inputs["qkv_w"] = inputs["qkv_w"] * 0.5
    inputs["attn_bias"] = randn(rng, H, N, N, scale=0.5).astype(dtype)
    return inputs


@pytest.mark.parametrize("kind", ["reference", "fast"])
@pytest.mark.parametrize("mask_p", [None, 0.25])
def test_attention_with_a_bias_gradient_check(kind, mask_p):
    """Every input, the bias included, of attention_forward(..., attn_bias=...)."""
    rng = np.random.default_rng(3)
    op = OPS[kind]
    inputs = bias_inputs(rng, mask_p=mask_p)
    wrt = ("x", "qkv_w", "qkv_b", "proj_w", "proj_b", "attn_bias")
    assert_all_pass(check_op(op.attention_forward, op.attention_backward, inputs, wrt, entries=Q_AND_V_BIAS))


@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_attention_without_a_bias_keeps_its_five_gradients(kind):
    """Lessons and exercises unpack five gradients (and ops.py's cache as 10 entries): a bias
    changes that only when one is given."""
    rng = np.random.default_rng(4)
    op = OPS[kind]
    inputs = bias_inputs(rng)
    out, cache = op.attention_forward(**{k: v for k, v in inputs.items() if k != "attn_bias"})
    assert len(op.attention_backward(np.ones_like(out), cache)) == 5
    if kind == "reference":
        assert len(cache) == 10
    out_b, cache_b = op.attention_forward(**inputs)
    assert len(op.attention_backward(np.ones_like(out_b), cache_b)) == 6
    assert not np.allclose(out, out_b)                        # the bias does change the output


def test_attention_bias_of_zero_changes_nothing_and_a_constant_row_neither():
    """softmax ignores a constant added to a whole row of scores: a bias that is constant along
    the keys gives exactly the output without a bias (to rounding)."""
    rng = np.random.default_rng(5)
    inputs = bias_inputs(rng)
    plain, _ = ops.attention_forward(**{k: v for k, v in inputs.items() if k != "attn_bias"})
    inputs["attn_bias"] = np.broadcast_to(randn(rng, 2, 5, 1), (2, 5, 5)).copy()
    np.testing.assert_allclose(ops.attention_forward(**inputs)[0], plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_attention_rejects_a_misshaped_bias(kind):
    rng = np.random.default_rng(6)
    inputs = bias_inputs(rng)
    inputs["attn_bias"] = inputs["attn_bias"][:, :4]
    with pytest.raises(ValueError, match=r"attn_bias must have shape \(H, N, N\) = \(2, 5, 5\), got \(2, 4, 5\)"):
        OPS[kind].attention_forward(**inputs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mask_p", [None, 0.25])
@pytest.mark.parametrize("size", [(2, 5, 8, 2), (3, 17, 12, 3)])
def test_fast_attention_with_a_bias_equals_reference(dtype, mask_p, size, blocks):
    """Outputs and all six gradients; with small blocks on two threads too, where the bias
    gradient is summed from every block's share."""
    B, N, D, H = size
    compare("attention", bias_inputs(np.random.default_rng(7), dtype, B, N, D, H, mask_p), dtype)


def test_attention_with_a_bias_matches_torch_autograd(torch):
    """The same attention written in torch (BEiT's formula: softmax(q k^T / sqrt(hs) + bias) v),
    its gradients by autograd, on the same inputs, for both sets of ops."""
    rng = np.random.default_rng(8)
    B, N, D, H = 2, 10, 12, 3
    hs = D // H
    inputs = bias_inputs(rng, np.float64, B, N, D, H)
    dout = randn(rng, B, N, D)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items() if isinstance(v, np.ndarray)}
    qkv = torch.nn.functional.linear(t["x"], t["qkv_w"], t["qkv_b"])                  # (B, N, 3D)
    q, k, v = qkv.reshape(B, N, 3, H, hs).permute(2, 0, 3, 1, 4).unbind(0)            # (B, H, N, hs)
    att = ((q @ k.transpose(-2, -1)) / hs**0.5 + t["attn_bias"]).softmax(dim=-1)      # (B, H, N, N)
    y = (att @ v).transpose(1, 2).reshape(B, N, D)
    out = torch.nn.functional.linear(y, t["proj_w"], t["proj_b"])
    out.backward(torch.tensor(dout))
    names = ("x", "qkv_w", "qkv_b", "proj_w", "proj_b", "attn_bias")
    for kind, op in OPS.items():
        ours, cache = op.attention_forward(**inputs)
        np.testing.assert_allclose(ours, out.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=kind)
        for name, grad in zip(names, op.attention_backward(dout, cache)):
            np.testing.assert_allclose(grad, t[name].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=f"{kind} d{name}")


# ============================================================================= the model

@pytest.mark.parametrize("kind, overrides", [
    ("reference", dict(pos_embed="learned2d")),
    ("fast", dict(pos_embed="learned2d")),
    ("reference", dict(pos_embed="relative")),
    ("fast", dict(pos_embed="relative")),
    ("fast", dict(pos_embed="relative", pool="mean")),
    ("reference", dict(pos_embed="learned2d", pos_every_block=True)),
    ("fast", dict(pos_embed="learned", pos_every_block=True, depth=3)),
    ("fast", dict(pos_embed="sincos2d", pos_every_block=True)),
], ids=["learned2d-reference", "learned2d-fast", "relative-reference", "relative-fast", "relative-mean-fast",
        "learned2d-every-reference", "learned-every-fast", "sincos-every-fast"])
def test_whole_model_gradients(kind, overrides):
    """Every parameter tensor (the new ones included) and the images, in float64."""
    modules.set_ops(kind)
    config = TINY.replace(**overrides)
    model = random_model(config)
    x, y = batch(config)
    assert_model_passes(check_model(model, x, y, samples=6), model)


def test_new_parameters_have_timm_names_shapes_and_init():
    model = ViT(TINY.replace(pos_embed="learned2d"), seed=0)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes["pos_embed_row"] == shapes["pos_embed_col"] == (3, 4) and shapes["pos_embed_cls"] == (1, 1, 8)
    assert "pos_embed" not in shapes
    big = ViT(ViTConfig(img_size=32, patch_size=2, dim=64, depth=1, heads=2, pos_embed="learned2d"), seed=0)
    assert 0.015 < big.pos_embed_row.data.std() < 0.025                 # trunc-normal .02, as pos_embed
    model = ViT(TINY.replace(pos_embed="relative"), seed=0)
    for i, block in enumerate(model.blocks):
        table = dict(model.named_parameters())[f"blocks.{i}.attn.relative_position_bias_table"]
        assert table.shape == ((2 * 3 - 1) ** 2 + 3, 2) and not table.data.any()   # zero, as BEiT
        assert block.attn.relative_position_index.shape == (10, 10)
    assert not any("index" in n for n, _ in model.named_parameters())    # a fixed buffer, not trained
    assert "pos_embed" not in shapes and not hasattr(model, "pos_table")


def test_astype_keeps_the_index_an_index():
    model = ViT(TINY.replace(pos_embed="relative"), seed=0).astype(np.float64)
    index = model.blocks[0].attn.relative_position_index
    assert index.dtype.kind == "i"
    np.testing.assert_array_equal(index, ops.relative_position_index(3))
    assert model.blocks[0].attn.relative_position_bias_table.data.dtype == np.float64
    model.astype(np.float32).to("cpu")
    assert model.blocks[1].attn.relative_position_index.dtype.kind == "i"


@pytest.mark.parametrize("overrides", [dict(pos_embed="learned2d"), dict(pos_embed="relative"),
                                       dict(pos_embed="learned2d", pos_every_block=True)])
def test_fast_and_reference_models_agree(overrides):
    config = TINY.replace(**overrides)
    results = []
    for kind in ("reference", "fast"):
        modules.set_ops(kind)
        model = random_model(config)
        x, y = batch(config)
        logits = model(x)
        dx = model.backward(cross_entropy_backward(cross_entropy_forward(logits, y)[1]))
        results.append((logits, dx, {n: p.grad for n, p in model.named_parameters()}))
    (l_ref, dx_ref, g_ref), (l_fast, dx_fast, g_fast) = results
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx_fast, dx_ref, rtol=1e-9, atol=1e-12)
    for name in g_ref:
        np.testing.assert_allclose(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_attention_maps_include_the_relative_bias(kind):
    """keep_attention keeps softmax(q k^T / sqrt(hs) + bias), recomputed here from the block's
    own input and the table looked up pair by pair."""
    modules.set_ops(kind)
    config = TINY.replace(pos_embed="relative", depth=1)
    model = random_model(config).eval()
    x, _ = batch(config, B=2)
    model(x, keep_attention=True)
    (got,) = model.attention_maps()
    attn, H, hs = model.blocks[0].attn, config.heads, config.head_size
    h, _ = ops.patchify_forward(x, config.patch_size)
    h, _ = ops.linear_forward(h, model.patch_embed.proj.weight.data.reshape(config.dim, -1),
                              model.patch_embed.proj.bias.data)
    h, _ = ops.cls_pos_forward(h, model.cls_token.data)                                   # (B, N, D)
    h, _ = ops.layernorm_forward(h, model.blocks[0].norm1.weight.data, model.blocks[0].norm1.bias.data,
                                 config.ln_eps)
    qkv, _ = ops.linear_forward(h, attn.qkv.weight.data, attn.qkv.bias.data)               # (B, N, 3D)
    q, k, _ = qkv.reshape(2, 10, 3, H, hs).transpose(2, 0, 3, 1, 4)                       # (B, H, N, hs)
    table, index = attn.relative_position_bias_table.data, attn.relative_position_index
    bias = np.array([[[table[index[i, j], hh] for j in range(10)] for i in range(10)] for hh in range(H)])
    scores = (q @ k.swapaxes(-1, -2)) / np.sqrt(hs) + bias                                # (B, H, N, N)
    want = np.exp(scores - scores.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    without = np.exp(scores - bias - (scores - bias).max(-1, keepdims=True))
    assert np.abs(got - without / without.sum(-1, keepdims=True)).max() > 0.05   # the bias matters


# ============================================================================= the PyTorch twin of a whole ViT

def torch_beit_index(torch, G):
    """relative_position_index written again in torch, the way timm's beit.py builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")).flatten(1)   # (2, G*G)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)                  # (G*G, G*G, 2)
    rel[:, :, 0] += G - 1
    rel[:, :, 1] += G - 1
    rel[:, :, 0] *= 2 * G - 1
    T = (2 * G - 1) ** 2 + 3
    index = torch.zeros((G * G + 1, G * G + 1), dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = T - 3
    index[0:, 0] = T - 2
    index[0, 0] = T - 1
    return index


def torch_vit_logits(torch, cfg, p, x):
    """minivit's ViT in torch.nn.functional on a dict of tensors with timm's names."""
    F = torch.nn.functional
    B, D, H, G, N = x.shape[0], cfg.dim, cfg.heads, cfg.grid_size, cfg.num_tokens
    hs = D // H
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=cfg.patch_size)  # (B, D, G, G)
    t = torch.cat([p["cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)           # (B, N, D)
    pos = None
    if cfg.pos_embed == "learned":
        pos = p["pos_embed"]
    elif cfg.pos_embed == "learned2d":      # patch by patch: X (column) embedding, then Y (row)
        vectors = [p["pos_embed_cls"][0, 0]]
        for patch in range(G * G):
            i, j = divmod(patch, G)
            vectors.append(torch.cat([p["pos_embed_col"][j], p["pos_embed_row"][i]]))
        pos = torch.stack(vectors)[None]                                                  # (1, N, D)
    if pos is not None:
        t = t + pos
    index = torch_beit_index(torch, G)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        if i > 0 and cfg.pos_every_block:
            t = t + pos
        h = F.layer_norm(t, (D,), p[b + "norm1.weight"], p[b + "norm1.bias"], cfg.ln_eps)
        qkv = F.linear(h, p[b + "attn.qkv.weight"], p.get(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, H, hs).permute(2, 0, 3, 1, 4).unbind(0)           # (B, H, N, hs)
        att = (q * hs**-0.5) @ k.transpose(-2, -1)                                        # (B, H, N, N)
        if cfg.pos_embed == "relative":
            table = p[b + "attn.relative_position_bias_table"]
            att = att + table[index.view(-1)].view(N, N, H).permute(2, 0, 1)
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
        t = t + F.linear(y, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        h = F.layer_norm(t, (D,), p[b + "norm2.weight"], p[b + "norm2.bias"], cfg.ln_eps)
        h = F.gelu(F.linear(h, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"]))
        t = t + F.linear(h, p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
    t = F.layer_norm(t, (D,), p["norm.weight"], p["norm.bias"], cfg.ln_eps)
    t = t[:, 0] if cfg.pool == "cls" else t[:, 1:].mean(dim=1)
    return F.linear(t, p["head.weight"], p["head.bias"])


@pytest.mark.parametrize("overrides", [dict(pos_embed="learned2d"), dict(pos_embed="relative"),
                                       dict(pos_embed="learned2d", pos_every_block=True, pool="mean")],
                         ids=["learned2d", "relative", "learned2d-every-block"])
def test_whole_model_matches_torch_autograd(torch, overrides):
    """Logits, loss and the gradient of every parameter and of the images, float64, same weights."""
    config = TINY.replace(**overrides)
    model = random_model(config)
    x, y = batch(config)
    logits = model(x)
    loss, cache = cross_entropy_forward(logits, y)
    dx = model.backward(cross_entropy_backward(cache))
    params = {n: torch.tensor(p.data, requires_grad=True) for n, p in model.named_parameters()}
    tx = torch.tensor(x, requires_grad=True)
    t_logits = torch_vit_logits(torch, config, params, tx)
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.tensor(y))
    t_loss.backward()
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert abs(float(loss) - t_loss.item()) < 1e-12
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-8, atol=1e-12)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, params[name].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=name)


# ============================================================================= config

@pytest.mark.parametrize("overrides, message", [
    (dict(pos_embed="learned2d", dim=9, heads=3), r"pos_embed='learned2d' needs an even dim .* got dim=9"),
    (dict(pos_embed="relative", pos_every_block=True), r"pos_every_block=True .* pos_embed='relative' has none"),
    (dict(pos_embed="none", pos_every_block=True), r"pos_embed='none' has none"),
    (dict(pos_every_block=1), r"pos_every_block must be True or False, got 1"),
    (dict(pos_embed="rope"), r"pos_embed must be one of \('learned', 'learned2d', 'sincos2d', 'relative', 'none'\)"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**overrides)


def test_config_round_trips_with_the_new_fields():
    config = TINY.replace(pos_embed="learned2d", pos_every_block=True)
    assert ViTConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in config.to_dict().items() if k != "pos_every_block"}   # a config saved before
    assert ViTConfig.from_dict(old).pos_every_block is False


# ============================================================================= saving, loading, resampling

@pytest.mark.parametrize("overrides", [dict(pos_embed="learned2d"), dict(pos_embed="relative"),
                                       dict(pos_embed="learned", pos_every_block=True)])
def test_parameter_shapes_list_the_new_parameters(overrides):
    config = TINY.replace(**overrides)
    assert [row[0] for row in _timm_rows(config)] == [n for n, _ in ViT(config).named_parameters()]
    assert parameter_shapes(config) == {n: p.shape for n, p in ViT(config).named_parameters()}


@pytest.mark.parametrize("overrides", [dict(pos_embed="learned2d"), dict(pos_embed="relative"),
                                       dict(pos_embed="learned2d", pos_every_block=True)])
def test_save_and_load_round_trip(tmp_path, overrides):
    config = TINY.replace(**overrides)
    model = random_model(config).astype(np.float32)
    path = save_pretrained(model, tmp_path / "m.safetensors")
    loaded, _ = load_pretrained(path)
    assert loaded.config == config
    x, _ = batch(config)
    x = x.astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


@pytest.mark.parametrize("pos_embed", ["learned2d", "relative"])
def test_timm_file_without_metadata_reveals_the_kind_by_its_names(tmp_path, pos_embed):
    from safetensors.numpy import load_file, save_file
    config = TINY.replace(pos_embed=pos_embed, mlp_dim=None)
    path = save_pretrained(random_model(config).astype(np.float32), tmp_path / "m.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))                                      # no config in the file
    loaded, _ = load_pretrained(bare, heads=config.heads)
    assert loaded.config.pos_embed == pos_embed and loaded.config.img_size == config.img_size


def test_hf_format_stores_learned2d_as_its_table_and_refuses_relative(tmp_path):
    model = random_model(TINY.replace(pos_embed="learned2d")).astype(np.float32)
    loaded, _ = load_pretrained(save_pretrained(model, tmp_path / "hf", format="hf"))
    assert loaded.config.pos_embed == "learned"
    np.testing.assert_array_equal(loaded.pos_embed.data, model.position_table()[0])
    x = batch(TINY)[0].astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    for overrides in (dict(pos_embed="relative"), dict(pos_every_block=True)):
        with pytest.raises(ValueError, match="format='hf' cannot hold"):
            save_pretrained(random_model(TINY.replace(**overrides)), tmp_path / "x", format="hf")


def test_learned2d_resamples_each_axis_like_the_2d_bilinear_table(tmp_path):
    """Bilinear resampling of a table whose halves depend on one axis each is 1-D linear
    resampling of each axis: the loaded row and column embeddings, assembled, equal the 2-D
    resample_pos_embed of the old assembled table ([CLS] kept)."""
    model = random_model(TINY.replace(pos_embed="learned2d")).astype(np.float32)
    path = save_pretrained(model, tmp_path / "m.safetensors")
    for img_size in (20, 8):                                                # 5 x 5 and 2 x 2 patches
        loaded, meta = load_pretrained(path, img_size=img_size)
        G = img_size // 4
        assert loaded.pos_embed_row.shape == (G, 4) and meta["checkpoint_img_size"] == 12
        np.testing.assert_array_equal(loaded.pos_embed_row.data, resample_axis_embed(model.pos_embed_row.data, G))
        np.testing.assert_array_equal(loaded.pos_embed_cls.data, model.pos_embed_cls.data)
        want = resample_pos_embed(model.position_table()[0].astype(np.float64), G)
        np.testing.assert_allclose(loaded.position_table()[0], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("old,new", [(3, 5), (5, 3), (2, 7), (4, 4)])
def test_relative_table_resample_matches_torch_bilinear(torch, old, new):
    rng = np.random.default_rng(old * 10 + new)
    H, w, w2 = 3, 2 * old - 1, 2 * new - 1
    table = randn(rng, w * w + 3, H)
    ours = resample_rel_pos_bias_table(table, new)
    grid = torch.from_numpy(table[:-3]).T.reshape(1, H, w, w)                       # (1, H, 2G-1, 2G-1)
    ref = torch.nn.functional.interpolate(grid, size=(w2, w2), mode="bilinear", align_corners=False)
    ref = ref.reshape(H, w2 * w2).T.numpy()                                          # ((2G2-1)^2, H)
    assert ours.shape == (w2 * w2 + 3, H)
    np.testing.assert_allclose(ours[:-3], ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours[-3:], table[-3:])                            # the [CLS] rows kept


def test_relative_model_loads_at_another_image_size(tmp_path):
    model = random_model(TINY.replace(pos_embed="relative")).astype(np.float32)
    path = save_pretrained(model, tmp_path / "m.safetensors")
    loaded, _ = load_pretrained(path, img_size=20)                                  # 3 x 3 -> 5 x 5 patches
    for old, new in zip(model.blocks, loaded.blocks):
        t_old, t_new = old.attn.relative_position_bias_table.data, new.attn.relative_position_bias_table.data
        assert t_new.shape == (9 * 9 + 3, 2)
        np.testing.assert_array_equal(t_new, resample_rel_pos_bias_table(t_old, 5))
        centre = lambda t, G: t[(G - 1) * (2 * G - 1) + (G - 1)]                   # noqa: E731, offset (0, 0)
        np.testing.assert_array_equal(centre(t_new, 5), centre(t_old, 3))
    assert np.isfinite(loaded(np.zeros((1, 2, 20, 20), np.float32))).all()


def test_pad_keeps_sequence_rows_and_fills_zeros():
    pos = np.arange(1 * 5 * 2, dtype=np.float64).reshape(1, 5, 2) + 1              # 2 x 2 grid, no zeros
    up = pad_pos_embed(pos, 3)                                                       # 1 + 9 rows
    assert up.shape == (1, 10, 2)
    np.testing.assert_array_equal(up[:, :5], pos)
    np.testing.assert_array_equal(up[:, 5:], 0.0)
    down = pad_pos_embed(up[:, :10] + 1, 2)
    np.testing.assert_array_equal(down, up[:, :5] + 1)


def test_load_with_pad_and_its_errors(tmp_path):
    model = random_model(TINY).astype(np.float32)                                    # learned 1-D, 3 x 3
    path = save_pretrained(model, tmp_path / "m.safetensors")
    loaded, meta = load_pretrained(path, img_size=16, pos_resample="pad")            # 4 x 4
    np.testing.assert_array_equal(loaded.pos_embed.data[:, :10], model.pos_embed.data)
    np.testing.assert_array_equal(loaded.pos_embed.data[:, 10:], 0.0)
    bilinear, _ = load_pretrained(path, img_size=16)
    assert not np.allclose(bilinear.pos_embed.data, loaded.pos_embed.data)
    with pytest.raises(ValueError, match=r"pos_resample must be one of \('bilinear', 'pad'\), got 'nearest'"):
        load_pretrained(path, img_size=16, pos_resample="nearest")
    other = save_pretrained(random_model(TINY.replace(pos_embed="learned2d")), tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"pos_resample='pad' pads a learned 1-D .* pos_embed='learned2d'"):
        load_pretrained(other, img_size=16, pos_resample="pad")


@pytest.mark.parametrize("call, match", [
    (lambda: resample_axis_embed(np.zeros((1, 3, 4)), 2), r"\(G, D/2\)"),
    (lambda: resample_axis_embed(np.zeros((3, 4)), 0), "positive integer"),
    (lambda: resample_rel_pos_bias_table(np.zeros((10, 2)), 2), r"\(\(2G-1\)\^2 \+ 3, H\)"),
    (lambda: resample_rel_pos_bias_table(np.zeros((12, 2)), 2.5), "positive integer"),
    (lambda: pad_pos_embed(np.zeros((1, 11, 4)), 3), r"1 \+ G\*G"),
    (lambda: pad_pos_embed(np.zeros((1, 10, 4)), True), "positive integer"),
])
def test_resampling_helpers_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
