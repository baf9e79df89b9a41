"""Worked solutions to lesson 6's exercises (position embeddings). Try them yourself first.

Shape legend: G patches per side, N = 1 + G*G tokens ([CLS] first), D width, d channels of one
axis's table, G2 the new grid side.
"""
import numpy as np


def sincos_1d(positions, channels):
    """The 1-D sin-cos embedding of integer positions (n,) -> (n, channels): channels/2 sines, then
    channels/2 cosines, at frequencies 1 / 10000^(k / (channels/2)), the highest first."""
    half = channels // 2
    omega = 1.0 / 10000 ** (np.arange(half) / half)                  # (channels/2,)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * omega   # (n, channels/2)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)    # (n, channels)


def sincos_2d(dim, grid_size):
    """The fixed 2-D table (1, 1 + G*G, D): half the channels encode the column (x), half the row
    (y), each with the 1-D formula; the [CLS] row is zeros."""
    G = grid_size
    row, col = np.divmod(np.arange(G * G), G)                        # (G*G,): patch r * G + c is (r, c)
    grid = np.concatenate([sincos_1d(col, dim // 2),                 # (G*G, D/2): x first ...
                           sincos_1d(row, dim // 2)], axis=1)        # (G*G, D): ... then y
    table = np.concatenate([np.zeros((1, dim)), grid], axis=0)       # (N, D): [CLS] has no place
    return table[None]                                               # (1, N, D)


def relative_index(grid_size):
    """For every (query, key) pair of tokens, the row of the relative position bias table it
    reads: (N, N) integers."""
    G = grid_size
    width = 2 * G - 1                                                # offsets per axis: -(G-1) .. G-1
    T = width * width + 3                                            # table rows: the offsets, then 3 for [CLS]
    row, col = np.divmod(np.arange(G * G), G)                        # (G*G,) each
    dy = row[:, None] - row[None, :]                                 # (G*G, G*G): query row - key row
    dx = col[:, None] - col[None, :]                                 # (G*G, G*G): query column - key column
    index = np.empty((G * G + 1, G * G + 1), np.int64)               # (N, N)
    index[1:, 1:] = (dy + G - 1) * width + (dx + G - 1)              # shifted to 0 .. 2G-2, numbered row-major
    index[0, :] = T - 3                                              # [CLS] query -> any patch
    index[:, 0] = T - 2                                              # any patch query -> [CLS]
    index[0, 0] = T - 1                                              # [CLS] -> [CLS]
    return index


def resize_axis(table, new_size):
    """Linear interpolation of (G, d) rows to (G2, d), torch's align_corners=False: rows are the
    centres of G equal cells covering [0, G), so new row j sits at old position
    (j + 0.5) * G / G2 - 0.5; positions beyond the first or last centre take that row."""
    table = np.asarray(table, dtype=np.float64)
    G = table.shape[0]
    src = (np.arange(new_size) + 0.5) * G / new_size - 0.5           # (G2,) sampling positions
    src = np.clip(src, 0, G - 1)                                     # clamped to the outer centres
    i0 = np.floor(src).astype(np.int64)                              # (G2,) the row on the left
    i1 = np.minimum(i0 + 1, G - 1)                                   # (G2,) and the one on the right
    frac = (src - i0)[:, None]                                       # (G2, 1) weight of the right one
    return table[i0] * (1 - frac) + table[i1] * frac                 # (G2, d)
