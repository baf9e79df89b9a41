"""Checkers for lesson 6 (position embeddings): the fixed 2-D sin-cos table built from the 1-D
formula, BEiT's relative position index, and the linear interpolation of a table along one axis
(the step that fine-tuning at a higher resolution, paper section 3.2, repeats along rows and
columns).

Each checker compares the learner's function with minivit's own (ops.sincos_2d_pos_embed,
ops.relative_position_index, pretrained.resample_axis_embed) on several sizes, awkward ones
included (a 1 x 1 grid, a grid of one row, shrinking as well as growing), and names the usual
mistakes when it sees them: rows and columns swapped, the frequencies spread over D/2 instead of
D/4, sines and cosines interleaved; the offset taken key minus query, dx and dy swapped, no shift
into the table; align_corners=True, nearest neighbour. While the learner's function runs, minivit's
own function is replaced by one that refuses to answer: the exercise is to compute it by hand.

Shape legend: G patches per side, N = 1 + G*G tokens ([CLS] first), D width, T = (2G-1)^2 + 3
rows of a relative position bias table, d channels of one axis's table, G2 the new grid side.
"""
from __future__ import annotations


import numpy as np

from .. import ops, pretrained
from . import Wrong, as_float_array, by_hand, exercise, expect_close


def _as_array(name: str, got):
    if not hasattr(got, "shape"):
        raise Wrong(f"{name}: expected a NumPy array, got {type(got).__name__}")
    return np.asarray(got)


# ----------------------------------------------------------------------------- 6.1 sin-cos table

def _sincos_variant(dim, G, *, y_first=False, spread=4, interleave=False):
    """The table with one of the usual mistakes, to name it when the learner's answer equals it."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / (dim / spread))            # (D/4,)
    row, col = np.divmod(np.arange(G * G), G)                               # (G*G,) each

    def one_axis(p):
        ang = p[:, None] * omega                                            # (G*G, D/4)
        if interleave:
            return np.stack([np.sin(ang), np.cos(ang)], axis=-1).reshape(len(p), -1)   # (G*G, D/2)
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)           # (G*G, D/2)

    first, second = (row, col) if y_first else (col, row)
    grid = np.concatenate([one_axis(first), one_axis(second)], axis=1)      # (G*G, D)
    return np.concatenate([np.zeros((1, dim)), grid])[None]                 # (1, N, D)


@exercise("the 2-D sin-cos table from the 1-D formula")
def check_sincos_2d(sincos_2d):
    """sincos_2d(dim, grid_size) -> (1, 1 + G*G, D) against ops.sincos_2d_pos_embed in float64, for
    grids of 1 x 1 to 14 x 14 and widths 8 to 96."""
    cases = [(8, 1), (8, 3), (16, 4), (96, 8), (64, 5), (32, 14)]           # (D, G)
    for dim, G in cases:
        want = ops.sincos_2d_pos_embed(dim, G, dtype=np.float64)            # (1, N, D)
        with by_hand(ops, "sincos_2d_pos_embed"):
            got = sincos_2d(dim, G)
        where = f"dim={dim}, grid_size={G}"
        got = _as_array(f"table for {where}", got)
        if tuple(got.shape) == (1, G * G, dim) or tuple(got.shape) == (G * G, dim):
            raise Wrong(f"table for {where}: shape {tuple(got.shape)}; the model adds it to [CLS] and the "
                        f"{G * G} patches, so it needs a first row for [CLS] (zeros: [CLS] has no place on the "
                        f"grid) and a leading batch axis of 1: ({1}, {1 + G * G}, {dim}).")
        if got.shape == want.shape and not np.allclose(got.astype(np.float64), want, rtol=0, atol=1e-6):
            got64 = got.astype(np.float64)
            for hint, kwargs in (
                    ("the column (x) comes first and the row (y) second: patch (r, c) gets concat(emb(c), emb(r)), "
                     "as the paper's 'X-embedding, then Y-embedding'", {"y_first": True}),
                    ("the frequencies are 1 / 10000^(k / (D/4)), k = 0 .. D/4 - 1: each axis has D/4 of them, "
                     "so the exponent runs from 0 up to almost 1", {"spread": 2}),
                    ("within one axis all D/4 sines come first, then all D/4 cosines (not sin, cos, sin, cos)",
                     {"interleave": True})):
                if np.allclose(got64, _sincos_variant(dim, G, **kwargs), atol=1e-6):
                    raise Wrong(f"table for {where}: {hint}.")
        try:
            expect_close(f"table for {where}", got, want, rtol=0, atol=1e-6)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Patch (r, c) is token 1 + r * G + c; its row is concat(emb(c), emb(r)) with "
                        f"emb(p) = [sin(p w_0) .. sin(p w_(D/4-1)), cos(p w_0) .. cos(p w_(D/4-1))], "
                        f"w_k = 1 / 10000^(k / (D/4)); the [CLS] row is zeros.") from None
    return f"{len(cases)} tables (grids 1 x 1 to 14 x 14, D = 8 to 96): equal to ops.sincos_2d_pos_embed"


# ----------------------------------------------------------------------------- 6.2 relative position index

def _index_variant(G, *, sign=1, swap=False, shift=True):
    """The index with one of the usual mistakes."""
    width = 2 * G - 1
    T = width * width + 3
    row, col = np.divmod(np.arange(G * G), G)                               # (G*G,) each
    dy = sign * (row[:, None] - row[None, :])                               # (G*G, G*G)
    dx = sign * (col[:, None] - col[None, :])                               # (G*G, G*G)
    if swap:
        dy, dx = dx, dy
    s = G - 1 if shift else 0
    index = np.empty((G * G + 1, G * G + 1), np.int64)                      # (N, N)
    index[1:, 1:] = (dy + s) * width + (dx + s)
    index[0, :], index[:, 0], index[0, 0] = T - 3, T - 2, T - 1
    return index


@exercise("the relative position index")
def check_relative_index(relative_index):
    """relative_index(grid_size) -> (N, N) integers, equal to ops.relative_position_index, for grids of
    1 x 1 to 7 x 7."""
    sizes = (1, 2, 3, 4, 7)
    for G in sizes:
        want = ops.relative_position_index(G)                               # (N, N)
        with by_hand(ops, "relative_position_index"):
            got = relative_index(G)
        where = f"grid_size={G}"
        got = _as_array(f"index for {where}", got)
        if tuple(got.shape) != want.shape:
            raise Wrong(f"index for {where}: expected shape {want.shape} (one row and one column per token, "
                        f"[CLS] first, then the {G * G} patches), got {tuple(got.shape)}")
        if got.dtype.kind not in "iu":
            raise Wrong(f"index for {where}: dtype {got.dtype}; an index into the table's rows must be integers "
                        f"(use .astype(np.int64))")
        if np.array_equal(got, want):
            continue
        patches = got[1:, 1:]
        width = 2 * G - 1
        for hint, kwargs in () if np.array_equal(patches, want[1:, 1:]) else (
                ("the offset is query minus key: (dy, dx) = (i - i2, j - j2) for query patch (i, j) and key "
                 "patch (i2, j2); yours is key minus query", {"sign": -1}),
                ("dy (rows) picks the row of the (2G-1) x (2G-1) grid of offsets and dx (columns) the position "
                 "in it: index = (dy + G - 1) * (2G - 1) + (dx + G - 1); yours has dx and dy swapped", {"swap": True}),
                ("each offset lies in [-(G-1), G-1]: shift it by G - 1 into [0, 2G-2] before numbering, or "
                 "negative offsets index the table from its end", {"shift": False})):
            if np.array_equal(patches, _index_variant(G, **kwargs)[1:, 1:]):
                raise Wrong(f"index for {where}: {hint}.")
        if not np.array_equal(patches, want[1:, 1:]):
            bad = np.argwhere(patches != want[1:, 1:])[0]
            q, k = (int(i) for i in bad)
            raise Wrong(f"index for {where}: query patch {q} (row {q // G}, column {q % G}) and key patch {k} "
                        f"(row {k // G}, column {k % G}) should read table row {int(want[1 + q, 1 + k])}, yours "
                        f"reads {int(patches[q, k])}. index = (dy + G - 1) * (2G - 1) + (dx + G - 1) with "
                        f"(dy, dx) = query minus key, 2G - 1 = {width}.")
        T = width * width + 3
        raise Wrong(f"index for {where}: the [CLS] row and column are wrong. They use the last three table rows: "
                    f"[CLS] query -> patch keys {T - 3} (row 0), patch queries -> [CLS] key {T - 2} (column 0), "
                    f"[CLS] -> [CLS] {T - 1} (index[0, 0]); you have index[0, 1] = {int(got[0, 1])}, "
                    f"index[1, 0] = {int(got[1, 0])}, index[0, 0] = {int(got[0, 0])}.")
    return f"grids {', '.join(f'{G} x {G}' for G in sizes)}: equal to ops.relative_position_index"


# ----------------------------------------------------------------------------- 6.3 interpolation along one axis

def _resize_variant(table, new_size, kind):
    G = table.shape[0]
    if kind == "corners":                                                   # align_corners=True
        src = np.linspace(0, G - 1, new_size) if new_size > 1 else np.zeros(1)
    else:                                                                   # nearest cell centre
        src = np.floor((np.arange(new_size) + 0.5) * G / new_size)
    src = np.clip(src, 0, G - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, G - 1)
    frac = (src - i0)[:, None]
    return table[i0] * (1 - frac) + table[i1] * frac                        # (G2, d)


@exercise("linear interpolation of a position table along one axis")
def check_resize_axis(resize_axis):
    """resize_axis(table, new_size) -> (G2, d) against pretrained.resample_axis_embed (torch's
    interpolate(mode="linear", align_corners=False)) in float64: growing, shrinking, the same size,
    and a table of one row."""
    rng = np.random.default_rng(6)
    cases = [(8, 4, 12), (4, 2, 7), (5, 3, 3), (8, 3, 8), (1, 3, 4), (2, 5, 9), (7, 6, 14)]   # (G, d, G2)
    for G, d, G2 in cases:
        table = rng.standard_normal((G, d)).cumsum(axis=0)                  # (G, d), rows that drift like a path
        want = pretrained.resample_axis_embed(table.copy(), G2)             # (G2, d)
        with by_hand(pretrained, "resample_axis_embed", "resample_pos_embed", "_linear_taps"):
            got = resize_axis(table.copy(), G2)
        where = f"a ({G}, {d}) table resized to {G2} rows"
        got = _as_array(f"result for {where}", got)
        if tuple(got.shape) == want.shape and not np.allclose(got.astype(np.float64), want, rtol=1e-9, atol=1e-9):
            got64 = got.astype(np.float64)
            if np.allclose(got64, _resize_variant(table, G2, "corners"), atol=1e-9):
                raise Wrong(f"result for {where}: you put the first and last new rows exactly on the first and last "
                            f"old ones (align_corners=True). Here rows are the centres of G equal cells covering "
                            f"[0, G): new row j samples old position (j + 0.5) * G / G2 - 0.5, clamped to [0, G - 1].")
            if np.allclose(got64, _resize_variant(table, G2, "nearest"), atol=1e-9):
                raise Wrong(f"result for {where}: each new row copies the nearest old row; interpolate linearly "
                            f"between the two old rows on either side of the sampling position.")
        try:
            expect_close(f"result for {where}", got, want, rtol=1e-9, atol=1e-9)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. New row j samples old position s = (j + 0.5) * G / G2 - 0.5, clamped to "
                        f"[0, G - 1]; it is (1 - f) * table[i0] + f * table[i1] with i0 = floor(s), "
                        f"i1 = min(i0 + 1, G - 1), f = s - i0.") from None
    return f"{len(cases)} tables (1 to 8 rows, resized to 3 to 14): equal to pretrained.resample_axis_embed"
