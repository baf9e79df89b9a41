"""Optimisers, schedule and clipping: against PyTorch, and against closed forms.

The parity tests run the same random gradients through minivit and torch in float64
for several steps (with a change of lr half-way) and compare every parameter. Tests that take
the `backend` fixture run once per backend (NumPy, the strict CuPy stand-in, a real GPU where
there is one); the optimiser's state following a model from one device to the other is tested in
tests/test_backend.py.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

import minivit
from minivit.backend import to_numpy
from minivit.modules import Parameter
from minivit.optim import SGD, AdamW, clip_grad_norm, param_groups, warmup_cosine, warmup_step

SHAPES = [(4, 3), (5,), (2, 3, 2)]
STEPS = 6


def make_params(rng, dtype=np.float64, backend=None):
    params = [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]
    if backend is not None:
        for p in params:
            p.data = backend.to(p.data)
    return params


def copy_params(params):
    return [Parameter(p.data.copy()) for p in params]


def assert_close(ours, theirs, rtol=1e-12):
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=0)


def run_parity(torch, rng, make_ours, make_theirs, groups, skip=None, backend=None):
    """Step both optimisers STEPS times on the same gradients; halve lr after step 3.

    groups: list of (parameter indices, weight_decay or None for the default).
    skip: (step, index) pairs whose gradient is None at that step.
    backend: where minivit's parameters and gradients live (NumPy when None).
    """
    params = make_params(rng, backend=backend)
    tparams = [torch.nn.Parameter(torch.tensor(to_numpy(p.data).copy())) for p in params]
    to = (lambda a: a) if backend is None else backend.to

    def ours_groups():
        return [dict(params=[params[i] for i in idx], **({} if wd is None else {"weight_decay": wd}))
                for idx, wd in groups]

    def theirs_groups():
        return [dict(params=[tparams[i] for i in idx], **({} if wd is None else {"weight_decay": wd}))
                for idx, wd in groups]

    opt, topt = make_ours(ours_groups()), make_theirs(theirs_groups())
    skip = skip or set()
    for step in range(STEPS):
        if step == 3:   # the schedule changes lr between steps
            opt.lr = opt.lr * 0.5
            for g in topt.param_groups:
                g["lr"] = g["lr"] * 0.5
        for i, (p, tp) in enumerate(zip(params, tparams)):
            if (step, i) in skip:
                p.grad, tp.grad = None, None
            else:
                g = rng.standard_normal(p.data.shape)
                p.grad, tp.grad = to(g), torch.tensor(g.copy())
        grads_before = [None if p.grad is None else to_numpy(p.grad).copy() for p in params]
        opt.step()
        topt.step()
        for p, tp, g in zip(params, tparams, grads_before):
            assert type(p.data) is type(params[0].data)    # still on the backend's device
            assert_close(to_numpy(p.data), tp.detach().numpy())
            if g is not None:   # the optimiser must not write into .grad
                np.testing.assert_array_equal(to_numpy(p.grad), g)
    return opt


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "momentum_weight_decay": dict(lr=0.1, momentum=0.8, weight_decay=0.05),
    "nesterov_weight_decay": dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.05),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(torch, rng, case, backend):
    kw = SGD_CASES[case]
    run_parity(torch, rng, lambda g: SGD(g, **kw), lambda g: torch.optim.SGD(g, **kw),
               groups=[([0, 1, 2], None)], skip={(2, 1)}, backend=backend)


def test_sgd_groups_match_torch(torch, rng):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    run_parity(torch, rng, lambda g: SGD(g, **kw), lambda g: torch.optim.SGD(g, **kw),
               groups=[([0, 2], None), ([1], 0.0)])


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.0),
])
def test_adamw_matches_torch(torch, rng, kw, backend):
    run_parity(torch, rng, lambda g: AdamW(g, **kw), lambda g: torch.optim.AdamW(g, **kw),
               groups=[([0, 1, 2], None)], skip={(1, 0), (2, 0), (4, 2)}, backend=backend)


def test_adamw_groups_match_torch(torch, rng):
    kw = dict(lr=1e-2, weight_decay=0.2)
    run_parity(torch, rng, lambda g: AdamW(g, **kw), lambda g: torch.optim.AdamW(g, **kw),
               groups=[([0, 2], None), ([1], 0.0)], skip={(3, 1)})


def test_adamw_first_step_is_lr_times_sign(rng):
    # t = 1: m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps) ~ lr * sign(g).
    p = Parameter(rng.standard_normal((3, 4)))
    p0, g = p.data.copy(), rng.standard_normal((3, 4))
    p.grad = g
    lr = 1e-3
    AdamW([p], lr=lr, weight_decay=0.0).step()
    assert_close(p.data, p0 - lr * g / (np.abs(g) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(p0 - p.data, lr * np.sign(g), rtol=1e-6)


def test_adamw_decay_alone_shrinks_by_one_minus_lr_wd(rng):
    # With g = 0, m = v = 0 and the Adam step is 0 / (0 + eps) = 0: only the decay acts.
    p = Parameter(rng.standard_normal(5))
    expected = p.data.copy()
    lr, wd = 0.01, 0.1
    opt = AdamW([p], lr=lr, weight_decay=wd)
    for _ in range(3):
        p.grad = np.zeros(5)
        opt.step()
        expected *= 1 - lr * wd
    np.testing.assert_array_equal(p.data, expected)


def test_sgd_momentum_by_hand(rng):
    lr, mu = 0.1, 0.9
    p = Parameter(rng.standard_normal(4))
    p0 = p.data.copy()
    g1, g2, g3 = (rng.standard_normal(4) for _ in range(3))
    opt = SGD([p], lr=lr, momentum=mu)
    for g in (g1, g2, g3):
        p.grad = g
        opt.step()
    b1 = g1                  # the buffer starts at the first gradient
    b2 = mu * b1 + g2
    b3 = mu * b2 + g3
    assert_close(p.data, p0 - lr * b1 - lr * b2 - lr * b3)
    assert_close(opt.state[0]["momentum_buffer"], b3)


def test_sgd_nesterov_by_hand(rng):
    lr, mu = 0.1, 0.9
    p = Parameter(rng.standard_normal(4))
    p0 = p.data.copy()
    g1, g2 = rng.standard_normal(4), rng.standard_normal(4)
    opt = SGD([p], lr=lr, momentum=mu, nesterov=True)
    for g in (g1, g2):
        p.grad = g
        opt.step()
    b1, b2 = g1, mu * g1 + g2
    assert_close(p.data, p0 - lr * (g1 + mu * b1) - lr * (g2 + mu * b2))


def test_params_without_grad_are_skipped(rng):
    a, b = make_params(rng)[:2]
    b0 = b.data.copy()
    a.grad = rng.standard_normal(a.data.shape)
    opt = AdamW([a, b], lr=0.1, weight_decay=0.5)
    opt.step()
    np.testing.assert_array_equal(b.data, b0)   # not moved, not even decayed
    assert opt.state[1] == {} and opt.state[0]["step"] == 1


def test_param_groups_on_vit():
    model = minivit.ViT("cifar-lesson")
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = {names[id(p)] for p in groups[1]["params"]}
    expected = {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{layer}.weight"
        for i in range(model.config.depth) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert decayed == expected
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    for name in ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight",
                 "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias", "norm.weight", "norm.bias", "head.bias"):
        assert name in not_decayed
    # the groups go straight into an optimiser
    opt = AdamW(groups, lr=1e-3)
    assert len(opt.params) == len(names)


def test_float32_stays_float32(rng, backend):
    params = make_params(rng, np.float32, backend)
    for opt in (AdamW(params, lr=np.float64(1e-3), weight_decay=np.float64(0.1)),
                SGD(params, lr=np.float64(0.1), momentum=0.9, nesterov=True, weight_decay=0.1)):
        for _ in range(2):
            for p in params:
                p.grad = backend.to(rng.standard_normal(p.data.shape).astype(np.float32))
            opt.lr = np.float64(opt.lr)   # e.g. straight from a NumPy schedule
            opt.step()
        for p, state in zip(params, opt.state):
            assert p.data.dtype == np.float32
            arrays = [v for v in state.values() if hasattr(v, "dtype")]
            assert arrays and all(v.dtype == np.float32 and type(v) is backend.xp.ndarray for v in arrays)


def save_and_load(state):
    """Through .npz + JSON, as a training loop stores a checkpoint: no pickle."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}
    loaded.update(json.loads(json.dumps(scalars)))
    return loaded


@pytest.mark.parametrize("make", [
    lambda g: AdamW(g, lr=1e-2, weight_decay=0.1),
    lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
], ids=["adamw", "sgd"])
def test_state_dict_round_trip(rng, make, backend):
    params = make_params(rng, np.float32, backend)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    grads = [[backend.to(rng.standard_normal(s).astype(np.float32)) for s in SHAPES] for _ in range(5)]
    opt = make(groups(params))
    for step in range(3):
        for p, g in zip(params, grads[step]):
            p.grad = g.copy()
        opt.step()
    opt.lr = 3e-3
    state = save_and_load(opt.state_dict())

    params2 = copy_params(params)
    opt2 = make(groups(params2))
    opt2.load_state_dict(state)
    assert opt2.lr == 3e-3
    for step in range(3, 5):
        for ps in (params, params2):
            for p, g in zip(ps, grads[step]):
                p.grad = g.copy()
        opt.step()
        opt2.step()
    for p, p2, s, s2 in zip(params, params2, opt.state, opt2.state):
        np.testing.assert_array_equal(to_numpy(p.data), to_numpy(p2.data))
        assert p2.data.dtype == np.float32
        for k in s:
            if hasattr(s2[k], "dtype"):
                np.testing.assert_array_equal(to_numpy(s[k]), to_numpy(s2[k]))
                assert s2[k].dtype == np.float32 and s2[k] is not s[k] and type(s2[k]) is backend.xp.ndarray
            else:
                assert s[k] == s2[k]


def test_load_state_dict_errors(rng):
    params = make_params(rng)
    opt = AdamW(params, lr=1e-3)
    for p in params:
        p.grad = np.ones(p.data.shape)
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match="parameters"):
        AdamW(params[:2], lr=1e-3).load_state_dict(state)
    with pytest.raises(ValueError, match="'AdamW', not 'SGD'"):
        SGD(params, lr=1e-3).load_state_dict(state)
    bad = dict(state, **{"exp_avg.1": np.zeros((7,))})
    fresh = AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match=r"exp_avg\.1.*shape"):
        fresh.load_state_dict(bad)
    assert fresh.state[0] == {}   # nothing was loaded
    with pytest.raises(ValueError, match="unexpected key 'momentum_buffer.0'"):
        fresh.load_state_dict(dict(state, **{"momentum_buffer.0": np.zeros((4, 3))}))
    incomplete = {k: v for k, v in state.items() if k != "exp_avg_sq.2"}
    with pytest.raises(ValueError, match="incomplete"):
        fresh.load_state_dict(incomplete)


def test_bad_arguments(rng):
    params = make_params(rng)
    with pytest.raises(ValueError, match="lr"):
        SGD(params, lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta2"):
        AdamW(params, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="param_groups"):
        AdamW(minivit.ViT("cifar-lesson"), lr=0.1)
    with pytest.raises(ValueError, match="unknown keys.*'lr'"):
        AdamW([{"params": params, "lr": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        AdamW([{"params": params}, {"params": params[:1]}], lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    opt = SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = float("nan")


def test_warmup_cosine_values():
    base, low = 1e-3, 1e-5
    lr = lambda s: warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=base, min_lr=low)  # noqa: E731
    assert math.isclose(lr(0), base / 10)            # small, not zero
    assert math.isclose(lr(4), base * 5 / 10)
    assert math.isclose(lr(9), base)                 # last warmup step
    assert math.isclose(lr(10), base)                # cosine starts at the top
    assert math.isclose(lr(60), (base + low) / 2)    # half-way down
    assert math.isclose(lr(110), low)                # the end
    decay = [lr(s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert isinstance(lr(3), float)
    assert warmup_cosine(0, 5, 0, 0.1) == 0.1        # no warmup
    assert warmup_cosine(5, 5, 5, 0.1) == 0.1        # all warmup


@pytest.mark.parametrize("args, error", [
    ((-1, 100, 10, 1e-3), ValueError),
    ((101, 100, 10, 1e-3), ValueError),
    ((0, 100, 101, 1e-3), ValueError),
    ((0, 0, 0, 1e-3), ValueError),
    ((0, 100, -1, 1e-3), ValueError),
    ((0, 100, 10, -1e-3), ValueError),
    ((0, 100, 10, 1e-3, 1e-2), ValueError),
    ((0.5, 100, 10, 1e-3), TypeError),
])
def test_warmup_cosine_rejects_nonsense(args, error):
    with pytest.raises(error):
        warmup_cosine(*args)


def test_warmup_step_values():
    """He et al.'s CIFAR schedule: 0.1, divided by 10 at 32k and 48k of 64k iterations (no warmup)."""
    lr = lambda s: warmup_step(s, 64_000, 0, 0.1, [32_000, 48_000])   # noqa: E731
    assert [lr(s) for s in (0, 31_999, 32_000, 47_999, 48_000, 64_000)] == \
           [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 * 0.1, 0.1 * 0.1 * 0.1]
    # warmup multiplies: 4 warmup steps, a milestone at step 2 inside it, gamma 0.5
    assert [warmup_step(s, 8, 4, 1.0, [2], gamma=0.5) for s in range(6)] == [0.25, 0.5, 0.375, 0.5, 0.5, 0.5]
    assert warmup_step(1, 1, 0, 1.0, [1, 1]) == 0.1 * 0.1              # two milestones on one step
    assert warmup_step(5, 10, 2, 0.3, []) == 0.3                       # none: constant after warmup


@pytest.mark.parametrize("args, error, message", [
    ((0, 10, 0, 0.1, [5, 3]), ValueError, "in increasing order"),
    ((0, 10, 0, 0.1, [0]), ValueError, "a milestone must be >= 1, got 0"),
    ((0, 10, 0, 0.1, [11]), ValueError, r"in \[1, 10\]"),
    ((0, 10, 0, 0.1, [2.5]), TypeError, "a milestone must be an integer"),
    ((11, 10, 0, 0.1, [5]), ValueError, "past total_steps"),
    ((0, 10, 0, 0.1, [5], 1.5), ValueError, "gamma"),
])
def test_warmup_step_rejects_nonsense(args, error, message):
    with pytest.raises(error, match=message):
        warmup_step(*args)


def test_clip_grad_norm_closed_form():
    a, b, c = Parameter(np.zeros(2)), Parameter(np.zeros(1)), Parameter(np.zeros(3))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])   # c has no grad: skipped
    assert clip_grad_norm([a, b, c], max_norm=10.0) == 5.0
    np.testing.assert_array_equal(a.grad, [3.0, 0.0])        # below max_norm: untouched
    assert clip_grad_norm([a, b, c], max_norm=4.0) == 5.0    # returns the norm before clipping
    np.testing.assert_allclose(np.concatenate([a.grad, b.grad]), np.array([3.0, 0.0, 4.0]) * 4.0 / (5 + 1e-6),
                               rtol=1e-15)
    assert math.isclose(clip_grad_norm([a, b, c], max_norm=10.0), 4.0, rel_tol=1e-6)   # now about 4


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(torch, rng, max_norm, backend):
    params = make_params(rng, backend=backend)
    tparams = [torch.nn.Parameter(torch.tensor(to_numpy(p.data))) for p in params]
    for p, tp in zip(params, tparams):
        g = rng.standard_normal(p.data.shape)
        p.grad = backend.to(g)
        tp.grad = torch.tensor(g.copy())
    total = clip_grad_norm(params, max_norm)
    assert type(total) is float
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert math.isclose(total, float(ttotal), rel_tol=1e-12)
    for p, tp in zip(params, tparams):
        assert_close(to_numpy(p.grad), tp.grad.numpy())


def test_clip_grad_norm_float32_in_place(rng):
    p = Parameter(np.zeros(10, np.float32))
    g = (rng.standard_normal(10) * 10).astype(np.float32)
    p.grad = g
    clip_grad_norm([p], np.float64(1.0))
    assert p.grad is g and g.dtype == np.float32
    assert math.isclose(float(np.linalg.norm(g)), 1.0, rel_tol=1e-5)


def test_position_tables_of_every_kind_are_not_decayed():
    from minivit import ViT, ViTConfig
    for kind, names in (("learned2d", {"pos_embed_row", "pos_embed_col", "pos_embed_cls"}),
                        ("relative", {"blocks.0.attn.relative_position_bias_table"})):
        model = ViT(ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, pos_embed=kind))
        decayed, other = param_groups(model, 0.1)
        named = {id(p): n for n, p in model.named_parameters()}
        assert names <= {named[id(p)] for p in other["params"]}
        assert not names & {named[id(p)] for p in decayed["params"]}
