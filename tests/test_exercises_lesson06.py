"""Lesson 6's exercise checkers accept the worked solutions, reject planted wrong answers (each a
mistake a learner is likely to make, most of them named in the message), refuse an answer that
only calls minivit's own function, and report a stub that was not attempted. The wrong answers are
written out here independently of the checkers' own variants."""
from __future__ import annotations

import numpy as np
import pytest

from minivit import ops, pretrained
from minivit.exercises import Wrong, lesson06, load_solutions


@pytest.fixture(scope="module")
def solution():
    return load_solutions("06")


def stub(*args, **kwargs):
    raise NotImplementedError


# ---- 6.1 the 2-D sin-cos table

def _axis(p, channels, denominator=None, interleave=False):
    half = channels // 2
    omega = 1.0 / 10000 ** (np.arange(half) / (denominator or half))
    ang = np.asarray(p, dtype=np.float64)[:, None] * omega
    if interleave:
        return np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(len(p), channels)
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def _table(dim, G, first, second, **kwargs):
    row, col = np.divmod(np.arange(G * G), G)
    p = {"row": row, "col": col}
    grid = np.concatenate([_axis(p[first], dim // 2, **kwargs), _axis(p[second], dim // 2, **kwargs)], axis=1)
    return np.concatenate([np.zeros((1, dim)), grid])[None]


def sincos_rows_first(dim, grid_size):
    """The row (y) embedding first, then the column (x)."""
    return _table(dim, grid_size, "row", "col")


def sincos_frequencies_over_half(dim, grid_size):
    """Frequencies 1 / 10000^(k / (D/2)): the exponent only reaches one half."""
    return _table(dim, grid_size, "col", "row", denominator=dim // 2)


def sincos_interleaved(dim, grid_size):
    """sin, cos, sin, cos ... within each axis (the original Transformer's layout, not minivit's)."""
    return _table(dim, grid_size, "col", "row", interleave=True)


def sincos_no_cls_row(dim, grid_size):
    """The G*G patch rows only."""
    return _table(dim, grid_size, "col", "row")[:, 1:]


def sincos_float32(dim, grid_size):
    """Right, computed in float32: accepted (the model's tables are float32)."""
    return _table(dim, grid_size, "col", "row").astype(np.float32)


def sincos_by_the_library(dim, grid_size):
    return ops.sincos_2d_pos_embed(dim, grid_size, dtype=np.float64)


def test_sincos_2d(solution, capsys):
    assert lesson06.check_sincos_2d(solution.sincos_2d) is True
    assert "PASSED" in capsys.readouterr().out
    assert lesson06.check_sincos_2d(sincos_float32) is True
    for wrong, says in ((sincos_rows_first, "column \\(x\\) comes first"), (sincos_frequencies_over_half, "D/4"),
                        (sincos_interleaved, "sines come first"), (sincos_no_cls_row, "\\[CLS\\]"),
                        (sincos_by_the_library, "by hand")):
        with pytest.raises(Wrong, match=says):
            lesson06.check_sincos_2d(wrong)
    assert lesson06.check_sincos_2d(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out
    assert ops.sincos_2d_pos_embed(8, 2).shape == (1, 5, 8)          # the refusal is undone afterwards


# ---- 6.2 the relative position index

def _index(G, dy_dx):
    width = 2 * G - 1
    T = width * width + 3
    row, col = np.divmod(np.arange(G * G), G)
    index = np.empty((G * G + 1, G * G + 1), np.int64)
    index[1:, 1:] = dy_dx(row, col, G, width)
    index[0, :], index[:, 0], index[0, 0] = T - 3, T - 2, T - 1
    return index


def index_key_minus_query(grid_size):
    """The offset taken key minus query."""
    return _index(grid_size, lambda r, c, G, w: (r[None] - r[:, None] + G - 1) * w + (c[None] - c[:, None] + G - 1))


def index_dx_major(grid_size):
    """dx numbers the rows of the offset grid, dy the position in them."""
    return _index(grid_size, lambda r, c, G, w: (c[:, None] - c[None] + G - 1) * w + (r[:, None] - r[None] + G - 1))


def index_unshifted(grid_size):
    """Offsets not shifted by G - 1: negative entries."""
    return _index(grid_size, lambda r, c, G, w: (r[:, None] - r[None]) * w + (c[:, None] - c[None]))


def index_width_G(grid_size):
    """Numbered with width G instead of 2G - 1: different offsets collide."""
    return _index(grid_size, lambda r, c, G, w: (r[:, None] - r[None] + G - 1) * G + (c[:, None] - c[None] + G - 1))


def index_cls_swapped(grid_size):
    """The [CLS] query row and [CLS] key column swapped."""
    index = _index(grid_size, lambda r, c, G, w: (r[:, None] - r[None] + G - 1) * w + (c[:, None] - c[None] + G - 1))
    T = (2 * grid_size - 1) ** 2 + 3
    index[0, 1:], index[1:, 0] = T - 2, T - 3
    return index


def index_float(grid_size):
    return load_solutions("06").relative_index(grid_size).astype(np.float64)


def test_relative_index(solution, capsys):
    assert lesson06.check_relative_index(solution.relative_index) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong, says in ((index_key_minus_query, "key minus query"), (index_dx_major, "swapped"),
                        (index_unshifted, "shift"), (index_width_G, "should read table row"),
                        (index_cls_swapped, "\\[CLS\\]"), (index_float, "integers"),
                        (lambda G: ops.relative_position_index(G), "by hand")):
        with pytest.raises(Wrong, match=says):
            lesson06.check_relative_index(wrong)
    assert lesson06.check_relative_index(stub) is False
    assert ops.relative_position_index(2).shape == (5, 5)


# ---- 6.3 linear interpolation along one axis

def _sample(table, src):
    table = np.asarray(table, dtype=np.float64)
    src = np.clip(src, 0, table.shape[0] - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, table.shape[0] - 1)
    f = (src - i0)[:, None]
    return table[i0] * (1 - f) + table[i1] * f


def resize_align_corners(table, new_size):
    """align_corners=True: the end rows pinned to the end rows."""
    return _sample(table, np.linspace(0, len(table) - 1, new_size))


def resize_nearest(table, new_size):
    """Copies the old row whose cell holds the new row's centre."""
    G = len(table)
    nearest = np.minimum((np.arange(new_size) + 0.5) * G / new_size, G - 1).astype(int)
    return np.asarray(table, dtype=np.float64)[nearest]


def resize_no_half_cell(table, new_size):
    """Scales j * G / G2, forgetting the half-cell shift of the centres."""
    return _sample(table, np.arange(new_size) * len(table) / new_size)


def resize_unclamped(table, new_size):
    """Extrapolates past the first and last centres instead of clamping."""
    table = np.asarray(table, dtype=np.float64)
    G = len(table)
    src = (np.arange(new_size) + 0.5) * G / new_size - 0.5
    i0 = np.clip(np.floor(src).astype(int), 0, max(G - 2, 0))
    i1 = np.minimum(i0 + 1, G - 1)
    f = (src - i0)[:, None]
    return table[i0] * (1 - f) + table[i1] * f


def test_resize_axis(solution, capsys):
    assert lesson06.check_resize_axis(solution.resize_axis) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong, says in ((resize_align_corners, "align_corners=True"), (resize_nearest, "nearest"),
                        (resize_no_half_cell, "wrong values"), (resize_unclamped, "wrong values"),
                        (lambda t, n: pretrained.resample_axis_embed(t, n), "by hand"),
                        (lambda t, n: pretrained.resample_pos_embed(t, n), "by hand")):
        with pytest.raises(Wrong, match=says):
            lesson06.check_resize_axis(wrong)
    assert lesson06.check_resize_axis(stub) is False
    assert pretrained.resample_axis_embed(np.zeros((2, 3)), 4).shape == (4, 3)


def test_checkers_want_a_function():
    with pytest.raises(TypeError):
        lesson06.check_resize_axis(None)
