"""minivit.backend without a GPU: the strict CuPy stand-in (tests/strict_cupy.py) refuses what
CuPy refuses, the switch makes "gpu" mean it everywhere, the availability check runs a smoke test
and says why it fails, and the optimiser's state follows its model from device to device.

Shape legend: none (tiny arrays of a few numbers).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import strict_cupy

from minivit import ViTConfig, backend
from minivit.backend import device_of
from minivit.modules import Linear
from minivit.optim import SGD, AdamW

A = np.arange(6.0).reshape(2, 3)


def dev(value=A):
    return strict_cupy.asarray(value)


# ----------------------------------------------------------------------------- the stand-in

REFUSED = {
    "np.asarray": lambda: np.asarray(dev()),
    "np.array": lambda: np.array(dev()),
    "np.float64(...)": lambda: np.float64(dev()),
    "a NumPy ufunc": lambda: np.exp(dev()),
    "a NumPy ufunc with out=": lambda: np.exp(A, out=dev()),
    "a NumPy function": lambda: np.sum(dev()),
    "a NumPy function on a list": lambda: np.concatenate([dev(), dev()]),
    "np.testing": lambda: np.testing.assert_allclose(dev(), A),
    "device + host": lambda: dev() + A,
    "host + device": lambda: A + dev(),
    "host @ device": lambda: A.T @ dev(),
    "device += host": lambda: dev().__iadd__(A),
    "device[...] = host": lambda: dev().__setitem__(..., A),
    "a host index": lambda: dev()[np.array([0, 1])],
    "a device function on host": lambda: strict_cupy.exp(A),
    "a device function on a list with host": lambda: strict_cupy.concatenate([dev(), A]),
    "a device function with out=host": lambda: strict_cupy.exp(dev(), out=A.copy()),
    "a method with out=host": lambda: dev().sum(axis=0, out=np.zeros(3)),
    "erf on host": lambda: strict_cupy.special.erf(A),
    "ascontiguousarray of host": lambda: strict_cupy.ascontiguousarray(A),
    "float of many": lambda: float(dev()),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_stand_in_refuses_implicit_host_conversion_and_mixing(what):
    with pytest.raises(TypeError):
        REFUSED[what]()


def test_stand_in_allows_what_cupy_allows():
    a = dev()
    assert type(a) is strict_cupy.ndarray and not isinstance(a, np.ndarray)
    # scalars of every kind, and a 0-d NumPy array, mix with device arrays, on either side
    for s in (2, 2.0, np.float32(2), np.float64(2), np.array(2.0)):
        assert np.array_equal((a * s).get(), A * 2) and np.array_equal((s * a).get(), A * 2)
    # host waits on one element: float, int, bool, item; a reduction is a 0-d DEVICE array
    total = a.sum()
    assert type(total) is strict_cupy.ndarray and total.shape == ()
    assert float(total) == 15.0 and int(total) == 15 and total.item() == 15.0 and bool(total > 14)
    assert f"{total:.1f}" == "15.0"
    # explicit transfers copy: nothing aliases across the "devices"
    host = A.copy()
    d = strict_cupy.asarray(host)
    host[0, 0] = 99.0
    assert float(d[0, 0]) == 0.0
    back = strict_cupy.asnumpy(d)
    back[0, 1] = 99.0
    assert float(d[0, 1]) == 1.0 and type(back) is np.ndarray
    # views stay views, in-place operators stay in place
    v = d[0]
    v += 10.0
    assert np.array_equal(d.get()[0], A[0] + 10) and strict_cupy.asarray(d) is d


def test_stand_in_random_and_erf_are_device_arrays():
    r = strict_cupy.random.default_rng(3).random((4, 5), dtype=np.float32)
    assert type(r) is strict_cupy.ndarray and r.dtype == np.float32
    e = strict_cupy.special.erf(dev())
    table = [0.0, 0.8427007929497149, 0.9953222650189527, 0.9999779095030014, 0.9999999845827421,
             0.9999999999984626]                         # erf(0), ..., erf(5), tabulated
    np.testing.assert_allclose(e.get().ravel(), table, rtol=1e-12)


# ----------------------------------------------------------------------------- the switch

def test_switch_makes_gpu_mean_the_stand_in_everywhere_and_puts_things_back():
    x = np.ones((2, 3), np.float32)
    real = backend._cupy
    with backend.use_array_module_for_gpu(strict_cupy):
        g = backend.to_device(x, "gpu")
        assert type(g) is strict_cupy.ndarray and backend.to_device(g, "gpu") is g
        assert backend.get_array_module(g) is strict_cupy and backend.get_array_module(x) is np
        assert backend.is_array(g) and backend.device_of(g) == "gpu" and backend.device_of(x) == "cpu"
        assert backend.check_device("gpu") == "gpu" and backend.gpu_available()
        assert type(backend.to_device(g, "cpu")) is np.ndarray and type(backend.to_numpy(g)) is np.ndarray
        assert type(backend.erf(g)) is strict_cupy.ndarray
        u = backend.uniform(np.random.default_rng(0), (3,), np.float32, strict_cupy)
        assert type(u) is strict_cupy.ndarray and u.dtype == np.float32
        model = Linear(3, 2).to("gpu")
        assert model.device == "gpu" and type(model.weight.data) is strict_cupy.ndarray
        assert type(model(g)) is strict_cupy.ndarray
    assert backend._cupy is real                       # put back
    assert backend.get_array_module(g) is np           # the stand-in is no longer a device
    if not backend.gpu_available():
        with pytest.raises(RuntimeError, match="GPU cannot be used"):
            backend.to_device(x, "gpu")


# ----------------------------------------------------------------------------- availability

def _break(monkeypatch, part, message):
    """Make one piece of the stand-in fail as a CuPy without its CUDA libraries does."""
    def fail(*args, **kwargs):
        raise RuntimeError(message)
    if part == "matmul":
        monkeypatch.setattr(strict_cupy.ndarray, "__matmul__", fail)
    elif part == "elementwise":
        monkeypatch.setattr(strict_cupy.ndarray, "__mul__", fail)
    elif part == "random":
        monkeypatch.setattr(strict_cupy.random, "default_rng", fail)
    elif part == "no device":
        monkeypatch.setattr(strict_cupy.cuda.runtime, "device_count", 0)


@pytest.mark.parametrize("part, message", [
    ("matmul", "CUBLAS_STATUS_NOT_INITIALIZED"),
    ("elementwise", "CuPy failed to load libnvrtc.so.12"),
    ("random", "CURAND_STATUS_INITIALIZATION_FAILED"),
    ("no device", "sees no CUDA device"),
])
def test_availability_runs_a_smoke_test_and_says_why_it_fails(monkeypatch, part, message):
    _break(monkeypatch, part, message)
    with backend.use_array_module_for_gpu(strict_cupy):
        assert not backend.gpu_available()
        assert message in backend.gpu_status()
        with pytest.raises(RuntimeError, match=message):
            backend.check_device("gpu")
        with pytest.raises(RuntimeError, match=message):
            Linear(2, 2).to("gpu")


def test_availability_catches_a_wrong_answer_and_a_broken_erf(monkeypatch):
    monkeypatch.setattr(strict_cupy.ndarray, "__matmul__", lambda a, b: strict_cupy.zeros((2, 2), np.float32))
    with backend.use_array_module_for_gpu(strict_cupy):
        assert not backend.gpu_available() and "not [[35, 89], [89, 251]]" in backend.gpu_status()
    monkeypatch.undo()

    def erf(x):
        raise ImportError("libnvrtc.so.12: cannot open shared object file")
    with backend.use_array_module_for_gpu(strict_cupy, special=type("special", (), {"erf": staticmethod(erf)})):
        assert not backend.gpu_available() and "libnvrtc.so.12" in backend.gpu_status()


def test_availability_is_checked_once_per_module(monkeypatch):
    calls = []
    count = strict_cupy.cuda.runtime.getDeviceCount
    monkeypatch.setattr(strict_cupy.cuda.runtime, "getDeviceCount", lambda: calls.append(1) or count())
    with backend.use_array_module_for_gpu(strict_cupy):
        for _ in range(3):
            backend.to_device(A, "gpu")
        assert backend.gpu_available() and "smoke test passed" in backend.gpu_status()
    assert len(calls) == 1


def test_without_cupy_the_status_names_the_install():
    if backend._cupy is not None:
        pytest.skip("CuPy is installed here")
    assert not backend.gpu_available()
    assert 'pip install -e ".[gpu]"' in backend.gpu_status()


# ----------------------------------------------------------------------------- the optimiser follows its model

def _model(seed=0):
    rng = np.random.default_rng(seed)
    model = Linear(3, 2)
    model.weight.data = rng.standard_normal((2, 3))
    model.bias.data = rng.standard_normal(2)
    return model


def _step(model, opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = backend.to_device(g, model.device)
    opt.step()


OPTIMIZERS = {
    "adamw": lambda ps: AdamW(ps, lr=0.1, weight_decay=0.1),
    "sgd": lambda ps: SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_follows_the_model_across_devices(name):
    """Step on the CPU, move the model to the "gpu", step, move back, step: the same weights as a
    model that never moved, and the state on the parameters' device after each step."""
    rng = np.random.default_rng(1)
    grads = [[rng.standard_normal((2, 3)), rng.standard_normal(2)] for _ in range(4)]
    still, moved = _model(), _model()
    opt_still, opt_moved = OPTIMIZERS[name](still.parameters()), OPTIMIZERS[name](moved.parameters())
    with backend.use_array_module_for_gpu(strict_cupy):
        for step, device in enumerate(["cpu", "gpu", "gpu", "cpu"]):
            moved.to(device)
            _step(moved, opt_moved, grads[step])
            _step(still, opt_still, grads[step])
            arrays = [v for st in opt_moved.state for v in st.values() if hasattr(v, "dtype")]
            assert arrays and all(backend.device_of(v) == device for v in arrays), step
            for p, q in zip(moved.parameters(), still.parameters()):
                np.testing.assert_array_equal(backend.to_numpy(p.data), q.data)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("saved_on, loaded_on", [("gpu", "cpu"), ("cpu", "gpu"), ("gpu", "gpu")])
def test_optimizer_state_dict_round_trip_across_devices(name, saved_on, loaded_on):
    rng = np.random.default_rng(2)
    grads = [[rng.standard_normal((2, 3)), rng.standard_normal(2)] for _ in range(4)]
    with backend.use_array_module_for_gpu(strict_cupy):
        a = _model().to(saved_on)
        opt_a = OPTIMIZERS[name](a.parameters())
        for g in grads[:2]:
            _step(a, opt_a, g)
        state = opt_a.state_dict()
        assert all(isinstance(v, np.ndarray) for k, v in state.items() if hasattr(v, "dtype"))  # host copies
        b = _model(seed=5).to(loaded_on)
        b.load_state_dict(a.state_dict())
        opt_b = OPTIMIZERS[name](b.parameters())
        opt_b.load_state_dict(state)
        arrays = [v for st in opt_b.state for v in st.values() if hasattr(v, "dtype")]
        assert arrays and all(backend.device_of(v) == loaded_on for v in arrays)
        for g in grads[2:]:
            _step(a, opt_a, g)
            _step(b, opt_b, g)
        for p, q in zip(a.parameters(), b.parameters()):
            np.testing.assert_array_equal(backend.to_numpy(p.data), backend.to_numpy(q.data))


def test_optimizer_to_moves_the_state_now_and_state_follows_a_dtype_change():
    model = _model()
    opt = AdamW(model.parameters(), lr=0.1)
    _step(model, opt, [np.ones((2, 3)), np.ones(2)])
    with backend.use_array_module_for_gpu(strict_cupy):
        assert opt.to("gpu") is opt
        assert all(type(st["exp_avg"]) is strict_cupy.ndarray for st in opt.state)
        opt.to("cpu")
    assert all(type(st["exp_avg_sq"]) is np.ndarray for st in opt.state)
    model.astype(np.float32)
    _step(model, opt, [np.ones((2, 3), np.float32), np.ones(2, np.float32)])
    assert all(st["exp_avg"].dtype == np.float32 for st in opt.state)
    with pytest.raises(ValueError, match="device must be one of"):
        opt.to("tpu")


# ----------------------------------------------------------------------------- the backend fixture

def test_backend_fixture_probe(backend):
    """Also run by the next test in a child process, with MINIVIT_REQUIRE_GPU=1."""
    x = backend.to(np.ones(3))
    assert device_of(x) == backend.device == ("cpu" if backend.name == "cpu" else "gpu")
    assert type(x) is backend.xp.ndarray and np.array_equal(backend.numpy(x), np.ones(3))


def test_require_gpu_turns_a_missing_gpu_into_a_failure():
    env = {**os.environ, "MINIVIT_REQUIRE_GPU": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"{__file__}::test_backend_fixture_probe"], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if backend.gpu_available():
        assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout
    else:
        assert run.returncode == 1, run.stdout
        # the fixture fails in setup: reported as an error, and the run fails
        assert "2 passed, 1 error" in run.stdout and "MINIVIT_REQUIRE_GPU is set" in run.stdout, run.stdout


def test_tiny_vit_config_runs_on_the_stand_in():
    """The model a test would build first: to("gpu") and one forward pass, every array a device array."""
    from minivit import ViT
    with backend.use_array_module_for_gpu(strict_cupy):
        model = ViT(ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2)).to("gpu")
        out = model(backend.to_device(np.zeros((1, 3, 8, 8), np.float32), "gpu"))
        assert type(out) is strict_cupy.ndarray and out.shape == (1, 3)
