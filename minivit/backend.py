"""The one place minivit chooses between NumPy (CPU) and CuPy (NVIDIA GPU).

Every op asks its input array which module made it (``get_array_module(x)``)
and uses that module's functions, so the same code runs on either device.
Only this file imports CuPy; nothing else in the package knows it exists.
"""
from __future__ import annotations

import numpy as np
import scipy.special

try:  # CuPy is an optional extra: `pip install -e ".[gpu]"`.
    import cupy as _cupy
    import cupyx.scipy.special as _cupy_special
except Exception:  # ImportError, or a CuPy build that cannot find its CUDA libraries
    _cupy = None
    _cupy_special = None

DEVICES = ("cpu", "gpu")


def gpu_available() -> bool:
    """True when CuPy imports and can see at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


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
        if _cupy is None:
            raise RuntimeError(
                "device='gpu' needs CuPy, which is not installed (or failed to import). "
                'Install it with `pip install -e ".[gpu]"` on a machine with an NVIDIA GPU and CUDA 12+.'
            )
        raise RuntimeError("device='gpu' was asked for, but CuPy sees no CUDA device on this machine.")
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


def uniform(rng: np.random.Generator, shape, dtype, xp):
    """Uniform [0, 1) samples on the device of `xp`, drawn from one NumPy Generator.

    All randomness (dropout masks, drop-path, initialisation) comes from a single
    NumPy Generator so a run is reproducible from one seed and its state can be
    saved in a checkpoint. On the GPU a fresh CuPy generator is seeded from it.
    """
    if xp is np:
        return rng.random(shape, dtype=np.float32).astype(dtype, copy=False)
    seed = int(rng.integers(0, 2**63 - 1))
    return _cupy.random.default_rng(seed).random(shape, dtype=np.float32).astype(dtype, copy=False)
