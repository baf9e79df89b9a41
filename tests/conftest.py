"""Shared fixtures.

Reference libraries (torch, transformers) are optional: a test that needs one asks for
the `torch` / `transformers` fixture. Where the library is missing the test is skipped,
unless MINIVIT_REQUIRE_REFERENCE=1 (set by .ci/run), which turns the skip into a failure
so CI can never pass by silently skipping the parity tests.

Real CIFAR-10 comes from $MINIVIT_DATA (a file) or ../shared/data/cifar-10-python.tar.gz beside
the checkout. Tests that need it skip only where it is absent and CI is not set.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

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
