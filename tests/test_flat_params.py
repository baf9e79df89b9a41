"""Parameters packed in flat buffers (minivit.modules.FlatBuffer) and the optimiser's flat step.

An optimiser packs its parameters into one flat buffer per dtype and device; a backward pass
writes the gradients into the matching flat gradient buffer, and step() then updates the whole
buffer at once. The per-parameter step is the reference (tests/test_optim.py holds it to PyTorch):
the flat step must give the same numbers BIT FOR BIT, since it runs the same elementwise operations,
with the same scalars, in the same order, only over more elements at a time. Clipping over a flat
buffer agrees within float rounding only: the squares of the gradients are added in another
grouping (one sum over the buffer instead of one per parameter, then a sum of those).

Shape legend: n the number of entries of all parameters of one buffer together.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import strict_cupy

from minivit import ViT, ViTConfig, backend as backend_mod, optim
from minivit.modules import Parameter
from minivit.ops import cross_entropy_backward, cross_entropy_forward
from minivit.optim import SGD, AdamW, clip_grad_norm, param_groups

SHAPES = [(4, 3), (5,), (2, 3, 2), (7,), (3, 3)]
TINY = ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=16)

OPTIMIZERS = {
    "adamw": lambda g: AdamW(g, lr=1e-2, weight_decay=0.1),
    "adamw_betas": lambda g: AdamW(g, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3),
    "sgd": lambda g: SGD(g, lr=0.1),
    "sgd_momentum": lambda g: SGD(g, lr=0.1, momentum=0.9, weight_decay=0.05),
    "sgd_nesterov": lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
}


def make_params(backend, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(backend.to(rng.standard_normal(s).astype(dtype))) for s in SHAPES]


def backend_mod_cpu():
    """make_params' backend for tests that need no fixture: NumPy arrays as they are."""
    class Cpu:
        to = staticmethod(lambda x: x)
    return Cpu


def decay_groups(params):
    """Two groups that interleave in the list: decayed 0, 2, 4; not decayed 1, 3."""
    return [{"params": [params[0], params[2], params[4]]},
            {"params": [params[1], params[3]], "weight_decay": 0.0}]


def packed(params):
    """The flat buffers that hold these parameters, checking that each .data is its view."""
    buffers = {}
    for p in params:
        assert p._slot is not None and p.data is p._slot[1], p
        buffers[id(p._slot[0])] = p._slot[0]
    assert all(b.intact() for b in buffers.values())
    return list(buffers.values())


def count_per_parameter_updates(opt):
    calls = [0]
    update = opt._update

    def counting(*args):
        calls[0] += 1
        return update(*args)
    opt._update = counting
    return calls


# ----------------------------------------------------------------------------- the flat step

@pytest.mark.parametrize("piece", ["default", 7])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_step_is_the_per_parameter_step_bit_for_bit(backend, name, piece, monkeypatch):
    """Same parameters, same gradients: one optimiser gets them into its flat buffer (as a backward
    pass leaves them) and takes the flat step, the other gets them assigned (p.grad = g) and takes
    the per-parameter step. Weight decay in two interleaved groups; gradient accumulation (two
    backward passes) at step 1; at step 3 one parameter has no gradient, so that step is taken per
    parameter on the flat state's views, and the flat step resumes where the state allows it
    (SGD; not AdamW, whose step counts then differ). piece=7 cuts the CPU's pieces through
    parameters and decay ranges."""
    if piece != "default":
        monkeypatch.setattr(optim, "FLAT_PIECE", piece)
    rng = np.random.default_rng(1)
    flat_params, ref_params = make_params(backend), make_params(backend)
    flat_opt, ref_opt = OPTIMIZERS[name](decay_groups(flat_params)), OPTIMIZERS[name](decay_groups(ref_params))
    per_parameter = count_per_parameter_updates(flat_opt)
    sgd = name.startswith("sgd")
    expect_flat = {0: True, 1: True, 2: True, 3: False, 4: sgd, 5: sgd}
    for step in range(6):
        before = per_parameter[0]
        for k, (p, q) in enumerate(zip(flat_params, ref_params)):
            p.grad = q.grad = None
            if step == 3 and k == 1:
                continue
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.accumulate(backend.to(g))              # as a backward pass: into the flat gradient buffer
            q.grad = backend.to(g)                   # assigned: a separate array, so the per-parameter path
            if step == 1:                            # a second backward pass adds into the first's
                g2 = rng.standard_normal(p.shape).astype(np.float32)
                p.accumulate(backend.to(g2))
                q.grad = backend.to(g + g2)
        flat_opt.step()
        ref_opt.step()
        assert (per_parameter[0] == before) == expect_flat[step], step
        for p, q in zip(flat_params, ref_params):
            np.testing.assert_array_equal(backend.numpy(p.data), backend.numpy(q.data), err_msg=f"step {step}")
        packed(flat_params)
    # the state is the same too, and saves in the same per-parameter format
    flat_state, ref_state = flat_opt.state_dict(), ref_opt.state_dict()
    assert flat_state.keys() == ref_state.keys()
    for key, value in flat_state.items():
        if isinstance(value, np.ndarray):
            assert value.shape == ref_state[key].shape and np.array_equal(value, ref_state[key]), key
        else:
            assert value == ref_state[key], key


@pytest.mark.parametrize("name", ["adamw", "sgd_nesterov"])
def test_flat_state_round_trip_through_state_dict(backend, name):
    """Three flat steps, state_dict, a new optimiser loads it (the loaded arrays are gathered into its
    flat state at the next step), two more steps: as one optimiser that never stopped."""
    rng = np.random.default_rng(2)
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(5)]

    def fill(params, step):
        for p, g in zip(params, grads[step]):
            p.grad = None
            p.accumulate(backend.to(g))

    a, b = make_params(backend), make_params(backend)
    opt_a, opt_b = OPTIMIZERS[name](decay_groups(a)), OPTIMIZERS[name](decay_groups(b))
    for step in range(3):
        fill(a, step)
        fill(b, step)
        opt_a.step()
        opt_b.step()
    state = opt_b.state_dict()
    opt_b = OPTIMIZERS[name](decay_groups(b))
    opt_b.load_state_dict(state)
    per_parameter = count_per_parameter_updates(opt_b)
    for step in range(3, 5):
        fill(a, step)
        fill(b, step)
        opt_a.step()
        opt_b.step()
    assert per_parameter[0] == 0                     # the loaded state went into the flat step
    for p, q in zip(a, b):
        np.testing.assert_array_equal(backend.numpy(p.data), backend.numpy(q.data))


# ----------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_over_the_flat_buffer_matches_per_parameter_clipping(backend, dtype, rtol, max_norm):
    """One norm over the flat gradient buffer against a sum of one per parameter: equal within float
    rounding (the squares are added in another grouping), and the scaled gradients too; below
    max_norm nothing is scaled, so they are exactly the same."""
    rng = np.random.default_rng(3)
    flat_params, plain = make_params(backend, dtype), make_params(backend, dtype)
    SGD(flat_params, lr=0.1)                         # packs them
    for p, q in zip(flat_params, plain):
        g = rng.standard_normal(p.shape).astype(dtype)
        p.accumulate(backend.to(g))
        q.grad = backend.to(g)
    total, reference = clip_grad_norm(flat_params, max_norm), clip_grad_norm(plain, max_norm)
    assert type(total) is float
    np.testing.assert_allclose(total, reference, rtol=rtol)
    np.testing.assert_allclose(total, np.sqrt(sum(np.sum(backend.numpy(q.grad) ** 2) for q in plain))
                               if max_norm > total else total, rtol=rtol)
    for p, q in zip(flat_params, plain):
        assert p.grad is p._slot[2]                  # scaled where it is
        if max_norm > total:
            np.testing.assert_array_equal(backend.numpy(p.grad), backend.numpy(q.grad))
        else:
            np.testing.assert_allclose(backend.numpy(p.grad), backend.numpy(q.grad), rtol=rtol * 4)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_on_the_device_is_clip_on_the_host_bit_for_bit(backend, max_norm):
    """sync=False (the norm stays on the device, the gradients are scaled by min(1, factor) there)
    gives the very numbers of sync=True (the factor is read and compared on the host)."""
    rng = np.random.default_rng(4)
    a, b = make_params(backend), make_params(backend)
    SGD(a, lr=0.1), SGD(b, lr=0.1)
    for p, q in zip(a, b):
        g = backend.to(rng.standard_normal(p.shape).astype(np.float32))
        p.accumulate(g)
        q.accumulate(g.copy())
    total = clip_grad_norm(a, max_norm)
    on_device = clip_grad_norm(b, max_norm, sync=False)
    assert float(on_device) == total
    for p, q in zip(a, b):
        np.testing.assert_array_equal(backend.numpy(p.grad), backend.numpy(q.grad))


def test_clip_with_a_missing_gradient_falls_back_to_each_parameter():
    a = make_params(backend_mod_cpu())
    b = make_params(backend_mod_cpu())
    SGD(a, lr=0.1)
    rng = np.random.default_rng(5)
    for k, (p, q) in enumerate(zip(a, b)):
        if k == 2:
            continue                                 # no gradient: skipped, as by the reference
        g = rng.standard_normal(p.shape)
        p.accumulate(g.astype(np.float32))
        q.grad = g.astype(np.float32)
    assert clip_grad_norm(a, 0.1) == clip_grad_norm(b, 0.1)   # the same per-parameter sums
    assert a[2].grad is None


# ----------------------------------------------------------------------------- views stay views

def tiny_step(model, opt, seed, per_parameter=False):
    """One training step on a fixed random batch; per_parameter=True copies the gradients out of the
    flat buffer first, so that the optimiser takes its per-parameter (reference) path."""
    rng = np.random.default_rng(seed)
    x = backend_mod.to_device(rng.standard_normal((2, 3, 8, 8)).astype(model.dtype), model.device)
    y = backend_mod.to_device(rng.integers(0, 3, 2), model.device)
    model.zero_grad()
    loss, cache = cross_entropy_forward(model(x), y)
    model.backward(cross_entropy_backward(cache))
    if per_parameter:
        for p in model.parameters():
            p.grad = p.grad.copy()
    opt.step()


def test_views_stay_views_through_to_astype_and_load_state_dict(backend):
    """The optimiser packs the model; model.to(), astype() and load_state_dict() keep every .data a
    view into a flat buffer (moved or cast as one array), a backward pass writes its gradients into
    the flat gradient buffer, and the flat step then gives the weights of the per-parameter step."""
    model, twin = ViT(TINY, seed=0), ViT(TINY, seed=0)
    other = ViT(TINY, seed=1)
    opt = AdamW(param_groups(model, 0.1), lr=1e-2)
    twin_opt = AdamW(param_groups(twin, 0.1), lr=1e-2)
    buffers = packed(model.parameters())
    assert len(buffers) == 1 and buffers[0].data.shape == (model.num_parameters(),)

    model.to(backend.device)
    (buffer,) = packed(model.parameters())
    assert type(buffer.data) is backend.xp.ndarray and type(buffer.grad) is backend.xp.ndarray
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        np.testing.assert_array_equal(backend.numpy(p.data), q.data, err_msg=name)

    model.astype(np.float64)
    (buffer,) = packed(model.parameters())
    assert buffer.data.dtype == np.float64 and buffer.grad.dtype == np.float64
    model.load_state_dict(other.state_dict())
    packed(model.parameters())
    for p, q in zip(model.parameters(), other.parameters()):
        np.testing.assert_array_equal(backend.numpy(p.data), q.data)

    twin.to(backend.device).astype(np.float64).load_state_dict(other.state_dict())
    per_parameter = count_per_parameter_updates(opt)
    for seed in range(3):
        tiny_step(model, opt, seed)
        (buffer,) = packed(model.parameters())
        assert buffer.grads_in_place()
        tiny_step(twin, twin_opt, seed, per_parameter=True)
    assert per_parameter[0] == 0
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(backend.numpy(p.data), backend.numpy(q.data))


def test_the_model_and_its_flat_state_move_between_devices():
    """Flat steps on the CPU, the "gpu" (the strict stand-in), the CPU again: the parameters are views
    after each move, the flat state follows them to their device, and the weights are those of a twin
    that moves the same way and takes per-parameter steps (whose state following the model is tested
    against a model that never moved in tests/test_backend.py)."""
    with backend_mod.use_array_module_for_gpu(strict_cupy):
        moved, twin = ViT(TINY, seed=0), ViT(TINY, seed=0)
        opt_moved, opt_twin = AdamW(param_groups(moved, 0.1), lr=1e-2), AdamW(param_groups(twin, 0.1), lr=1e-2)
        per_parameter = count_per_parameter_updates(opt_moved)
        for seed, device in enumerate(["cpu", "gpu", "gpu", "cpu"]):
            moved.to(device)
            twin.to(device)
            (buffer,) = packed(moved.parameters())
            assert backend_mod.device_of(buffer.data) == device
            tiny_step(moved, opt_moved, seed)
            tiny_step(twin, opt_twin, seed, per_parameter=True)
            arrays = [v for st in opt_moved.state for v in st.values() if hasattr(v, "dtype")]
            assert arrays and all(backend_mod.device_of(v) == device for v in arrays)
            for p, q in zip(moved.parameters(), twin.parameters()):
                np.testing.assert_array_equal(backend_mod.to_numpy(p.data), backend_mod.to_numpy(q.data))
        assert per_parameter[0] == 0


def test_moving_part_of_a_model_splits_its_buffer_by_device():
    with backend_mod.use_array_module_for_gpu(strict_cupy):
        model = ViT(TINY, seed=0)
        opt = SGD(model.parameters(), lr=0.1)
        model.head.to("gpu")                         # half a buffer cannot move: these move on their own
        assert backend_mod.device_of(model.head.weight.data) == "gpu"
        for p in model.parameters():
            p.grad = None
            p.accumulate(backend_mod.to_device(np.ones(p.shape, np.float32), backend_mod.device_of(p.data)))
        opt.step()                                   # packs again: one buffer per device
        buffers = packed(model.parameters())
        assert sorted(backend_mod.device_of(b.data) for b in buffers) == ["cpu", "gpu"]
        head = [p for n, p in model.named_parameters() if n.startswith("head.")]
        assert all(backend_mod.device_of(p.data) == "gpu" for p in head)


def test_a_replaced_data_array_is_packed_again_at_the_next_step():
    params = make_params(backend_mod_cpu(), np.float64)
    opt = SGD(params, lr=0.5)
    new = np.full(SHAPES[2], 3.0)
    params[2].data = new                             # by hand, after the optimiser packed them
    for p in params:
        p.grad = None
        p.accumulate(np.ones(p.shape))
    assert params[2].grad is not params[2]._slot[2]  # not packed any more: its gradient went elsewhere
    opt.step()
    packed(params)
    np.testing.assert_array_equal(params[2].data, np.full(SHAPES[2], 2.5))   # 3 - 0.5 * 1, from the new array


def test_a_deep_copy_is_unpacked_and_independent():
    model = ViT(TINY, seed=0)
    AdamW(model.parameters(), lr=1e-2)
    clone = copy.deepcopy(model)
    assert all(p._slot is None for p in clone.parameters())
    before = [p.data.copy() for p in model.parameters()]
    opt = SGD(clone.parameters(), lr=1.0)
    tiny_step(clone, opt, 0)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.data, b)


def test_packing_refuses_mixed_dtypes_in_one_buffer():
    from minivit.modules import FlatBuffer
    with pytest.raises(TypeError, match="one dtype and device"):
        FlatBuffer([Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(2, np.float64))])
