"""Lesson 08's exercise checkers accept the worked solutions, reject planted wrong answers, and report
a stub that still raises NotImplementedError as not attempted."""
from __future__ import annotations

import numpy as np
import pytest

from minivit.exercises import Wrong, lesson08, load_solutions

solutions = load_solutions("08")


def stub(*args):
    raise NotImplementedError


CHECKERS = [
    (lesson08.check_shift_report, solutions.shift_report),
    (lesson08.check_find_grid_shift, solutions.find_grid_shift),
    (lesson08.check_mean_attention_distance, solutions.mean_attention_distance),
]


@pytest.mark.parametrize("checker, solution", CHECKERS, ids=lambda f: getattr(f, "__name__", ""))
def test_checker_accepts_the_worked_solution(checker, solution, capsys):
    assert checker(solution) is True
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("checker", [c for c, _ in CHECKERS], ids=lambda f: f.__name__)
def test_checker_reports_a_stub_as_not_attempted(checker, capsys):
    assert checker(stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- exercise 1

def _roll(x, dy, dx):
    return np.roll(x, (dy, dx), axis=(-2, -1))


def report_exact_equality(f, x, dy, dx):
    # wrong: == instead of allclose; an FFT convolution or a mean in another order agrees only to rounding
    fx, fs = f(x), f(_roll(x, dy, dx))
    eq = np.shape(fx)[-2:] == x.shape[-2:] and np.array_equal(fs, _roll(fx, dy, dx))
    return bool(eq), bool(np.array_equal(fs, fx))


def report_swapped(f, x, dy, dx):
    # wrong: the two words confused
    eq, inv = solutions.shift_report(f, x, dy, dx)
    return inv, eq


def report_output_shifted_back(f, x, dy, dx):
    # wrong: compares f(shift(x)) with the output shifted the opposite way
    fx, fs = f(x), f(_roll(x, dy, dx))
    eq = np.shape(fx)[-2:] == x.shape[-2:] and np.allclose(fs, _roll(fx, -dy, -dx), rtol=1e-9, atol=1e-12)
    return bool(eq), bool(np.allclose(fs, fx, rtol=1e-9, atol=1e-12))


def report_shift_on_wrong_axes(f, x, dy, dx):
    # wrong: rolls the batch and channel axes, not the image's rows and columns
    shifted = np.roll(x, (dy, dx), axis=(0, 1))
    fx, fs = f(x), f(shifted)
    eq = np.shape(fx)[-2:] == x.shape[-2:] and np.allclose(fs, np.roll(fx, (dy, dx), axis=(0, 1)))
    return bool(eq), bool(np.shape(fs) == np.shape(fx) and np.allclose(fs, fx))


@pytest.mark.parametrize("wrong", [report_exact_equality, report_swapped, report_output_shifted_back,
                                   report_shift_on_wrong_axes], ids=lambda f: f.__name__)
def test_shift_report_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson08.check_shift_report(wrong)


def test_exercise1_cases_need_float_tolerance_and_have_the_stated_answers():
    # the FFT convolution, the mean and the patch-shifted ViT agree only to rounding (so == fails),
    # and every stated answer holds by an independent measure: the largest difference, tiny or not
    cases = lesson08._exercise1_cases()
    rounding_only = 0
    for name, f, x, dy, dx, want_eq, want_inv in cases:
        fx, fs = f(x), f(_roll(x, dy, dx))
        d_inv = np.abs(fs - fx).max()
        assert (d_inv < 1e-12 * max(1.0, np.abs(fx).max())) == want_inv, name
        rounding_only += 0 < d_inv < 1e-12
        if np.shape(fx)[-2:] == x.shape[-2:]:
            d_eq = np.abs(fs - _roll(fx, dy, dx)).max()
            assert (d_eq < 1e-12 * max(1.0, np.abs(fx).max())) == want_eq, name
            rounding_only += 0 < d_eq < 1e-12
        else:
            assert not want_eq, name
    assert rounding_only >= 3


# ----------------------------------------------------------------------------- exercise 2

def find_by_flat_roll(tokens, moved):
    # wrong: searches rolls of the flat token axis, so a column move that wraps into the next row is missed
    G = int(round(tokens.shape[1] ** 0.5))
    for k in range(G * G):
        if np.allclose(np.roll(tokens, k, axis=1), moved):
            return divmod(k, G)
    return None


def find_swapped(tokens, moved):
    # wrong: (sx, sy) instead of (sy, sx)
    found = solutions.find_grid_shift(tokens, moved)
    return None if found is None else found[::-1]


def find_wrong_direction(tokens, moved):
    # wrong: the roll that turns the moved tokens back into the original ones
    found = solutions.find_grid_shift(moved, tokens)
    return found


def find_best_even_if_nothing_fits(tokens, moved):
    # wrong: returns the closest roll even when none fits (a 1-pixel move is not a token permutation)
    B, M, D = tokens.shape
    G = int(round(M ** 0.5))
    grid = tokens.reshape(B, G, G, D)
    errors = {(sy, sx): np.abs(np.roll(grid, (sy, sx), axis=(1, 2)).reshape(B, M, D) - moved).max()
              for sy in range(G) for sx in range(G)}
    return min(errors, key=errors.get)


@pytest.mark.parametrize("wrong", [find_by_flat_roll, find_swapped, find_wrong_direction, find_best_even_if_nothing_fits],
                         ids=lambda f: f.__name__)
def test_find_grid_shift_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson08.check_find_grid_shift(wrong)


def test_flat_roll_finds_row_moves_so_the_checker_needs_a_column_move():
    # why the checker moves columns: for a move by whole rows the flat roll by sy * G is the 2-D roll
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((2, 4, 4, 3))
    down = np.roll(grid, (1, 0), axis=(1, 2)).reshape(2, 16, 3)
    right = np.roll(grid, (0, 1), axis=(1, 2)).reshape(2, 16, 3)
    assert find_by_flat_roll(grid.reshape(2, 16, 3), down) == (1, 0) == solutions.find_grid_shift(grid.reshape(2, 16, 3), down)
    assert find_by_flat_roll(grid.reshape(2, 16, 3), right) is None
    assert solutions.find_grid_shift(grid.reshape(2, 16, 3), right) == (0, 1)


# ----------------------------------------------------------------------------- exercise 3

def _distances(G, P):
    row, col = np.divmod(np.arange(G * G), G)
    return P * np.hypot(row[:, None] - row[None], col[:, None] - col[None])


def distance_not_renormalised(att, G, P):
    # wrong: drops [CLS] but does not renormalise, so the share given to [CLS] counts as distance 0
    return (att[:, :, 1:, 1:] * _distances(G, P)).sum(-1).mean(axis=(0, 2))


def distance_in_patches(att, G, P):
    # wrong: grid steps, not pixels
    return solutions.mean_attention_distance(att, G, 1)


def distance_manhattan(att, G, P):
    # wrong: |dy| + |dx| instead of the straight-line distance
    row, col = np.divmod(np.arange(G * G), G)
    dist = P * (np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None]))
    a = att[:, :, 1:, 1:] / att[:, :, 1:, 1:].sum(-1, keepdims=True)
    return (a * dist).sum(-1).mean(axis=(0, 2))


def distance_keys_as_queries(att, G, P):
    # wrong: normalises and sums over the query axis (the transposed map)
    return solutions.mean_attention_distance(att.swapaxes(-1, -2), G, P)


@pytest.mark.parametrize("wrong", [distance_not_renormalised, distance_in_patches, distance_manhattan,
                                   distance_keys_as_queries], ids=lambda f: f.__name__)
def test_mean_attention_distance_checker_rejects(wrong):
    with pytest.raises(Wrong):
        lesson08.check_mean_attention_distance(wrong)
