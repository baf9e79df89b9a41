"""Shared fixtures.

Reference libraries (torch, transformers) are optional: a test that needs one asks for
the `torch` / `transformers` fixture. Where the library is missing the test is skipped,
unless MINIVIT_REQUIRE_REFERENCE=1 (set by .ci/run), which turns the skip into a failure
so CI can never pass by silently skipping the parity tests.

Backends: a test that asks for the `backend` fixture runs once per backend: "cpu" (NumPy),
"strict" (tests/strict_cupy.py put in CuPy's place: NumPy arrays that refuse implicit host
conversion as CuPy's do, so host/device mistakes fail in the CPU CI) and "gpu" (real CuPy) where
CuPy runs on a device. With MINIVIT_REQUIRE_GPU=1 the "gpu" case is always there and FAILS on a
machine whose GPU cannot be used, so a GPU CI cannot pass by silently running no GPU test.

Real CIFAR-10 comes from $MINIVIT_DATA (a file) or ../shared/data/cifar-10-python.tar.gz beside
the checkout. Tests that need it skip only where it is absent and CI is not set.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

import strict_cupy
from minivit import backend as _backend

REPO = Path(__file__).resolve().parents[1]


def _reference(name):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("MINIVIT_REQUIRE_REFERENCE"):
            pytest.fail(f"reference library {name!r} is required (MINIVIT_REQUIRE_REFERENCE is set) but: {exc}")
        pytest.skip(f"{name} not installed (pip install -e '.[reference]')")


@pytest.fixture(scope="session")
def torch():
    return _reference("torch")


@pytest.fixture(scope="session")
def transformers():
    _reference("torch")
    return _reference("transformers")


@pytest.fixture(scope="session")
def cifar_archive():
    """Path of the real CIFAR-10 archive."""
    env = os.environ.get("MINIVIT_DATA")
    path = Path(env) if env and Path(env).is_file() else REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"real CIFAR-10 archive not found at {path}; CI must run the real-data tests")
        pytest.skip(f"real CIFAR-10 archive not found at {path}")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------- backends

REQUIRE_GPU = os.environ.get("MINIVIT_REQUIRE_GPU", "") not in ("", "0")
BACKENDS = ["cpu", "strict"] + (["gpu"] if REQUIRE_GPU or _backend.gpu_available() else [])


class Backend:
    """Where a test's arrays live: name ("cpu", "strict", "gpu"), device ("cpu" or "gpu": what
    to_device and Module.to take) and xp (the array module: numpy, strict_cupy or cupy)."""

    def __init__(self, name, device, xp):
        self.name, self.device, self.xp = name, device, xp

    def to(self, value):
        """NumPy arrays (also inside dicts, lists and tuples) copied to this backend; others as they are."""
        if isinstance(value, dict):
            return {k: self.to(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.to(v) for v in value)
        return _backend.to_device(value, self.device) if isinstance(value, np.ndarray) else value

    @staticmethod
    def numpy(value):
        """A NumPy array (a copy to the host for a device array)."""
        return _backend.to_numpy(value)

    def __repr__(self):
        return f"Backend({self.name!r})"


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cpu":
        yield Backend("cpu", "cpu", np)
    elif name == "strict":
        with _backend.use_array_module_for_gpu(strict_cupy):
            yield Backend("strict", "gpu", strict_cupy)
    else:
        if not _backend.gpu_available():
            pytest.fail(f"MINIVIT_REQUIRE_GPU is set but the GPU cannot be used: {_backend.gpu_status()}")
        yield Backend("gpu", "gpu", _backend._cupy)


def pytest_collection_modifyitems(config, items):
    """Blocks and threads are the NumPy path of fastops (on a GPU each kernel runs once on the
    whole array), so test_fastops' "many blocks, 2 threads" cases run on the "cpu" backend only:
    the other combinations are left out of the collection rather than skipped, so that a skip
    always means something is missing."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("blocks", "one block") != "one block" and params.get("backend", "cpu") != "cpu":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
