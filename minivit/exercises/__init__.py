"""Checkers for the lessons' exercises: minivit grades the learner's code with its own tools.

A lesson states an exercise, gives a stub to fill in, and then calls the checker:

    def gelu_tanh_backward(dout, cache):
        raise NotImplementedError   # your code here

    from minivit.exercises import lesson02
    lesson02.check_gelu_tanh_backward(gelu_tanh_backward)

A checker runs the learner's function through the same gradient checks and comparisons the tests
use (`minivit.gradcheck.check_op`, exact comparisons with minivit's own ops) and then

* prints "PASSED: ..." with the numbers it measured and returns True, or
* raises `Wrong` (an AssertionError) saying what it checked, what it expected and what it got, or
* prints "NOT ATTEMPTED YET" and returns False while the stub still raises NotImplementedError, so
  that a lesson runs top to bottom before anyone has done its exercises.

Worked solutions are kept apart, in lessons/solutions/. tests/test_exercises_*.py prove that every
checker accepts its worked solution and rejects at least one planted wrong answer.

One module per lesson: lesson01, lesson02, ...
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import numpy as np

from ..gradcheck import TOLERANCE


class Wrong(AssertionError):
    """The learner's answer is wrong; the message says what was checked and how it failed."""


class _NotAttempted(Exception):
    pass


def exercise(title: str) -> Callable:
    """Decorator for a checker `check(*answers)`: runs it, turns a stub's NotImplementedError into a
    "not attempted" notice (returns False), and prints "PASSED: <title>" with the checker's summary
    (the string it returns) when it passes (returns True). A wrong answer raises Wrong."""

    def decorate(check):
        @functools.wraps(check)
        def run(*answers, **kwargs):
            for answer in answers:
                if not callable(answer):
                    raise TypeError(f"{check.__name__}: expected your function, got {type(answer).__name__} "
                                    f"(pass the function itself, without calling it)")
            try:
                summary = check(*answers, **kwargs)
            except NotImplementedError:
                print(f"NOT ATTEMPTED YET: {title}. Fill in the function above (remove the "
                      f"`raise NotImplementedError`) and run this cell again.")
                return False
            print(f"PASSED: {title}" + (f"\n  {summary}" if summary else ""))
            return True

        run.title = title
        return run

    return decorate


def expect_close(name: str, got, want, *, rtol: float = 1e-7, atol: float = 1e-10):
    """Raise Wrong unless `got` has `want`'s shape and values (within rtol/atol)."""
    got_shape = getattr(got, "shape", None)
    want = np.asarray(want)
    if got_shape is None:
        raise Wrong(f"{name}: expected an array of shape {want.shape}, got {type(got).__name__}")
    if tuple(got_shape) != want.shape:
        raise Wrong(f"{name}: expected shape {want.shape}, got {tuple(got_shape)}")
    got = np.asarray(got, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        raise Wrong(f"{name}: contains NaN or infinite values")
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        err = np.abs(got - want)
        i = np.unravel_index(int(np.argmax(err)), err.shape)
        raise Wrong(f"{name}: wrong values; the largest difference is at index {tuple(int(j) for j in i)}: "
                    f"got {got[i]:.6g}, expected {want[i]:.6g}")


def expect_gradients(name: str, errors: dict, tolerance: float = TOLERANCE) -> str:
    """Raise Wrong unless every relative error from check_op is below `tolerance`; else a summary."""
    bad = {k: v for k, v in errors.items() if not v < tolerance}
    if bad:
        listing = ", ".join(f"d{k} {v:.1e}" for k, v in bad.items())
        raise Wrong(f"{name}: the gradient check fails: relative error {listing} (must be below {tolerance:.0e}). "
                    f"Compare your backward with the forward, line by line.")
    return f"{name}: " + ", ".join(f"d{k} rel_error {v:.1e}" for k, v in errors.items())


def load_solutions(lesson: str):
    """The worked solutions of a lesson ("02" -> lessons/solutions/lesson02.py) as a module, from a
    checkout of the repository (the solutions are not part of the installed package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "lessons" / "solutions" / f"lesson{lesson}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no worked solutions at {path}: they live in a checkout of minivit, "
                                f"in lessons/solutions/")
    spec = importlib.util.spec_from_file_location(f"lesson{lesson}_solutions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def by_hand(module, *names):
    """While the learner's code runs, module.<name> (for each name) raises Wrong: the exercise is
    to compute the thing by hand, not to call the function the checker grades against."""
    originals = {name: getattr(module, name) for name in names}

    def refusing(name):
        def refuse(*args, **kwargs):
            raise Wrong(f"your function called {module.__name__}.{name}: the exercise is to compute it by hand "
                        f"(NumPy only)")
        return refuse

    for name in names:
        setattr(module, name, refusing(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


def as_float_array(name: str, got):
    """The learner's answer as a float64 NumPy array, or Wrong if it is not an array at all."""
    if not hasattr(got, "shape"):
        raise Wrong(f"{name}: expected a NumPy array, got {type(got).__name__}")
    return np.asarray(got, dtype=np.float64)
