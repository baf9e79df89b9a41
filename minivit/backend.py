"""The one place minivit chooses between NumPy (CPU) and CuPy (NVIDIA GPU).

Every op asks its input array which module made it (``get_array_module(x)``)
and uses that module's functions, so the same code runs on either device.
Only this file imports CuPy; nothing else in the package knows it exists.

Tests without a GPU put a stand-in for CuPy in its place (tests/strict_cupy.py, a NumPy-backed
module whose arrays refuse implicit host conversion, as CuPy's do) with
``use_array_module_for_gpu``: then "gpu" means that module everywhere, in to_device, Module.to,
get_array_module, erf, uniform and synchronize, so host/device mistakes show up in the CPU CI.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import scipy.special

_cupy_import_error = None
try:  # CuPy is an optional extra: `pip install -e ".[gpu]"`.
    import cupy as _cupy
    import cupyx.scipy.special as _cupy_special
except Exception as exc:  # ImportError, or a CuPy build that cannot find its CUDA libraries
    _cupy = None
    _cupy_special = None
    _cupy_import_error = f"{type(exc).__name__}: {exc}"

DEVICES = ("cpu", "gpu")
INSTALL_HINT = 'pip install -e ".[gpu]" (CuPy with its CUDA libraries) on a machine with an NVIDIA GPU and driver'

_status = None        # (available, reason) of the GPU module in use, found once: see gpu_status
_mask_generators = {}  # {(GPU module, device id): its one mask generator}: see uniform
_mask_lock = threading.Lock()


def _smoke_test(cp, special) -> tuple[bool, str]:
    """Run what training needs once, on a tiny array: an elementwise kernel (NVRTC compiles it),
    erf, a matrix product (cuBLAS) and a random draw, each checked against its known answer.
    CuPy imports and counts devices without any of the CUDA libraries that these need, so a
    device count alone says nothing about whether the first kernel will run."""
    count = cp.cuda.runtime.getDeviceCount()
    if count < 1:
        return False, "CuPy sees no CUDA device on this machine"
    x = cp.arange(6, dtype=np.float32).reshape(2, 3)                   # (2, 3): [[0, 1, 2], [3, 4, 5]]
    y = x * 2 + 1                                                      # [[1, 3, 5], [7, 9, 11]]
    m = cp.asnumpy(y @ y.T)                                            # (2, 2)
    if not np.array_equal(m, np.array([[35, 89], [89, 251]], np.float32)):
        return False, (f"smoke test: the elementwise kernel and matrix product gave {m.tolist()}, "
                       f"not [[35, 89], [89, 251]]")
    e = cp.asnumpy(special.erf(x[0]))
    if not np.allclose(e, scipy.special.erf(np.arange(3.0)), rtol=1e-5, atol=1e-6):
        return False, f"smoke test: erf(0, 1, 2) gave {e.tolist()}"
    r = cp.asnumpy(cp.random.default_rng(0).random(1000, dtype=np.float32))
    if r.shape != (1000,) or not (0.0 <= r.min() and r.max() < 1.0 and 0.4 < r.mean() < 0.6):
        return False, "smoke test: the random draw is not uniform on [0, 1)"
    r = cp.asnumpy(_draw_uniform(cp, 0, (1000,)))                       # the dropout masks' generator
    if r.shape != (1000,) or not (0.0 <= r.min() and r.max() < 1.0 and 0.4 < r.mean() < 0.6):
        return False, "smoke test: the dropout masks' generator (cuRAND Philox) is not uniform on [0, 1)"
    return True, (f"{count} CUDA device{'s' * (count != 1)}; "
                  f"smoke test passed (elementwise kernel, erf, matmul, random draw)")


def _check_gpu() -> tuple[bool, str]:
    global _status
    if _status is None:
        if _cupy is None:
            _status = (False, f"CuPy is not installed or failed to import ({_cupy_import_error}); "
                              f"install it with {INSTALL_HINT}")
        else:
            try:
                _status = _smoke_test(_cupy, _cupy_special)
            except Exception as exc:   # a missing CUDA library surfaces here, at the first kernel
                _status = (False, f"CuPy imports but cannot run on the GPU: {type(exc).__name__}: {exc}. "
                                  f"Is the CUDA toolkit extra installed? {INSTALL_HINT}")
    return _status


def gpu_available() -> bool:
    """True when CuPy imports, sees a CUDA device and runs a tiny smoke test (an elementwise
    kernel, erf, a matrix product, a random draw). Checked once per process (see gpu_status)."""
    return _check_gpu()[0]


def gpu_status() -> str:
    """Why the GPU can or cannot be used, in words: the device count and smoke test, or the error."""
    return _check_gpu()[1]


@contextlib.contextmanager
def use_array_module_for_gpu(module, special=None):
    """For tests: make `module` (a stand-in for cupy, e.g. tests/strict_cupy.py) the GPU backend
    inside the `with` block, and put the real one (or none) back after it.

        with use_array_module_for_gpu(strict_cupy):
            model.to("gpu")     # strict_cupy arrays; every op now runs on them

    special is what gives erf (cupyx.scipy.special for CuPy); default `module.special`. The
    availability check (gpu_available, gpu_status) runs again, on the new module."""
    global _cupy, _cupy_special, _status, _mask_generators
    saved = _cupy, _cupy_special, _status, _mask_generators
    _cupy, _cupy_special, _status = module, special if special is not None else module.special, None
    _mask_generators = {}          # generators made inside the block are the block's own
    try:
        yield module
    finally:
        _cupy, _cupy_special, _status, _mask_generators = saved


def get_array_module(x):
    """numpy for a NumPy array (or anything else), cupy for a CuPy array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def is_array(x) -> bool:
    """True for a NumPy or CuPy ndarray."""
    return isinstance(x, np.ndarray) or (_cupy is not None and isinstance(x, _cupy.ndarray))


def device_of(x) -> str:
    return "gpu" if get_array_module(x) is not np else "cpu"


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError(f"device='gpu' was asked for, but the GPU cannot be used: {gpu_status()}")
    return device


def to_device(x, device: str):
    """Copy an array to 'cpu' (NumPy) or 'gpu' (CuPy); a no-op when it is already there."""
    check_device(device)
    if device == "cpu":
        return _cupy.asnumpy(x) if get_array_module(x) is not np else x
    return _cupy.asarray(x)


def to_numpy(x):
    """A NumPy array for any array (copies a CuPy array to the host)."""
    return _cupy.asnumpy(x) if get_array_module(x) is not np else np.asarray(x)


def erf(x):
    """The exact error function, elementwise, on either device."""
    if get_array_module(x) is np:
        return scipy.special.erf(x)
    return _cupy_special.erf(x)


def synchronize(x_or_device="gpu"):
    """Wait until the GPU has finished the work queued so far (for timing: CuPy returns from a
    call once its kernels are queued, so a clock read without this measures the queueing).

    x_or_device is "cpu" / "gpu" or an array (its device is the one waited on). A no-op on the
    CPU, where NumPy has finished when its call returns."""
    if isinstance(x_or_device, str):
        if check_device(x_or_device) == "cpu":
            return
        _cupy.cuda.Device().synchronize()          # the current device, all of its streams
    elif get_array_module(x_or_device) is not np:
        x_or_device.device.synchronize()           # the device that holds this array
    elif not isinstance(x_or_device, np.ndarray):
        raise TypeError(f"synchronize takes 'cpu', 'gpu' or an array, got {type(x_or_device).__name__}")


def _mask_generator(cp):
    """The one cuRAND generator that draws the dropout masks on the current device, made on
    first use. A CuPy RandomState with the Philox4x32-10 method: cuRAND's host-API Philox is
    counter-based, so setting its 64-bit key (seed) only sets two numbers on the host and
    launches nothing, where constructing a generator allocates and where a cupy.random.Generator
    (XORWOW) fills a large per-thread state with a kernel of its own and keeps 32 bits of its seed."""
    key = (cp, cp.cuda.Device().id)
    generator = _mask_generators.get(key)
    if generator is None:
        generator = cp.random.RandomState(np.uint64(0), method=cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
        _mask_generators[key] = generator
    return generator


def _draw_uniform(cp, key: int, shape):
    """float32 uniform [0, 1) samples on the GPU: the mask generator keyed with `key` (64 bits),
    from its counter 0. The key and draw happen together (the generator is shared by threads)."""
    with _mask_lock:
        generator = _mask_generator(cp)
        generator.seed(np.uint64(key))        # Philox: key = the 64-bit seed, counter (offset) back to 0
        return generator.random_sample(shape, dtype=np.float32)


def uniform(rng: np.random.Generator, shape, dtype, xp):
    """Uniform [0, 1) samples on the device of `xp`, drawn from one NumPy Generator.

    All randomness (dropout masks, drop-path, initialisation) comes from a single
    NumPy Generator so a run is reproducible from one seed and its state can be
    saved in a checkpoint. On the CPU the samples are that Generator's own draws. On the GPU
    the Generator gives a 64-bit key per draw, and the device's one Philox generator (made
    once, see _mask_generator) draws the samples under that key: the masks are a function of
    the NumPy Generator's state alone, so a resumed run (whose checkpoint holds that state)
    draws the same masks as one that never stopped, with no device state in the checkpoint.
    (The GPU's masks are not the CPU's: the two devices draw with different generators.)
    """
    if xp is np:
        return rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
    key = int(rng.integers(0, 2**64, dtype=np.uint64))                       # 64 bits
    return _draw_uniform(xp, key, shape).astype(dtype, copy=False)
