"""Worked solutions to lesson 08's exercises (lessons/08_inductive_bias.ipynb).

Each function has the name of its stub in the notebook; minivit/exercises/lesson08.py grades them.
Shape legend: B batch, C channels, S image side, P patch side, G = S // P patches per side,
N tokens (G*G patches + 1 [CLS]), D width, H heads.
"""
from __future__ import annotations

import numpy as np


def shift_report(f, x, dy, dx):
    """Exercise 1. Is f equivariant, invariant (or both, or neither) to the circular shift by (dy, dx)?"""
    shifted = np.roll(x, (dy, dx), axis=(-2, -1))                    # (B, C, S, S): pixel (y, x) -> (y + dy, x + dx)
    fx, fs = f(x), f(shifted)
    # equivariant: shifting the input shifts the output the same way. Only an output that still has
    # the image's two spatial axes can be shifted; a mean over the pixels (B, C) cannot.
    equivariant = (np.shape(fx)[-2:] == np.shape(x)[-2:]
                   and np.allclose(fs, np.roll(fx, (dy, dx), axis=(-2, -1)), rtol=1e-9, atol=1e-12))
    # invariant: shifting the input does not change the output. allclose, not ==: an FFT or a sum
    # taken in another order agrees only to float rounding
    invariant = np.shape(fs) == np.shape(fx) and np.allclose(fs, fx, rtol=1e-9, atol=1e-12)
    return bool(equivariant), bool(invariant)


def find_grid_shift(tokens, moved):
    """Exercise 2. tokens, moved (B, G*G, D): the patch tokens of some images and of the same images
    moved. Returns (sy, sx), 0 <= sy, sx < G, if rolling the token grid by sy rows and sx columns
    gives `moved`; else None."""
    B, M, D = tokens.shape
    G = int(round(M ** 0.5))
    grid = tokens.reshape(B, G, G, D)                                # (B, Gy, Gx, D): token t = gy * G + gx
    for sy in range(G):
        for sx in range(G):
            rolled = np.roll(grid, (sy, sx), axis=(1, 2))            # (B, Gy, Gx, D): cell (gy, gx) -> (gy + sy, gx + sx)
            # allclose, not ==: the moved tokens were computed from other pixels' positions, and a
            # matrix product may round a row differently depending on where it sits
            if np.allclose(rolled.reshape(B, M, D), moved, rtol=1e-9, atol=1e-12):
                return sy, sx
    return None                                                      # no roll fits: every token changed


def mean_attention_distance(att, grid_size, patch_size):
    """Exercise 3. att (B, H, N, N), one block's attention with [CLS] as token 0 -> (H,) pixels: how far
    each head looks, the distance between patch centres weighted by the attention, averaged."""
    G, P = grid_size, patch_size
    a = att[:, :, 1:, 1:]                                            # (B, H, G*G, G*G): patch queries, patch keys
    a = a / a.sum(axis=-1, keepdims=True)                            # each query's weights over the patches sum to 1
    row, col = np.divmod(np.arange(G * G), G)                        # (G*G,): patches are numbered row by row
    dist = P * np.hypot(row[:, None] - row[None], col[:, None] - col[None])   # (G*G, G*G) pixels between centres
    per_query = (a * dist).sum(axis=-1)                              # (B, H, G*G): a weighted mean distance per query
    return per_query.mean(axis=(0, 2))                               # (H,): over images and query patches
