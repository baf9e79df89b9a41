"""The exercise-checker convention of minivit.exercises (each lesson's checkers are tested in
tests/test_exercises_lessonNN.py: they accept the worked solution and reject planted wrong answers)."""
from __future__ import annotations

import numpy as np
import pytest

from minivit.exercises import Wrong, exercise, expect_close, expect_gradients


@exercise("double it")
def check_double(fn):
    for x in (np.arange(3.0), np.ones((2, 2))):
        expect_close("double(x)", fn(x), 2 * x)
    return "2 inputs"


def test_a_right_answer_passes_and_says_so(capsys):
    assert check_double(lambda x: x + x) is True
    assert "PASSED: double it" in capsys.readouterr().out


def test_a_stub_is_not_attempted_yet_and_does_not_stop_the_lesson(capsys):
    def stub(x):
        raise NotImplementedError

    assert check_double(stub) is False
    assert "NOT ATTEMPTED YET: double it" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (lambda x: 3 * x, "wrong values"),
    (lambda x: (2 * x)[:1], "expected shape"),
    (lambda x: x.tolist(), "expected an array"),
    (lambda x: x * np.nan, "NaN"),
])
def test_a_wrong_answer_raises_wrong_saying_what_differs(wrong, message):
    with pytest.raises(Wrong, match=message):
        check_double(wrong)


def test_passing_a_result_instead_of_the_function_is_a_type_error():
    with pytest.raises(TypeError, match="pass the function itself"):
        check_double(np.arange(3.0))


def test_gradient_errors_above_the_tolerance_are_wrong():
    assert "dx rel_error 1.0e-09" in expect_gradients("op", {"x": 1e-9})
    with pytest.raises(Wrong, match=r"dw 3\.0e-02"):
        expect_gradients("op", {"x": 1e-9, "w": 3e-2})
    with pytest.raises(Wrong):
        expect_gradients("op", {"x": float("nan")})
