"""Worked solutions to lesson 04's exercises (lessons/04_whole_model.ipynb).

Each function has the name of its stub in the notebook; minivit/exercises/lesson04.py grades them.
Shape legend: B batch, N tokens (G*G patches + 1 [CLS]), D width.
"""
from __future__ import annotations

import numpy as np


def cls_pos_backward(dout, cache):
    """Exercise 1. dout (B, N, D), cache = (has_pos,) from ops.cls_pos_forward.
    Returns (dx, dcls_token, dpos_embed); dpos_embed is None without position embeddings."""
    (has_pos,) = cache
    # forward: out += pos_embed, one (1, N, D) table added to every image  =>  sum over the batch
    dpos = dout.sum(axis=0, keepdims=True) if has_pos else None     # (1, N, D)
    # forward: out = concatenate([cls, x], axis=1)  =>  row 0 belongs to [CLS], rows 1: to x
    dx = dout[:, 1:]                                                 # (B, N - 1, D)
    # forward: cls = broadcast_to(cls_token, (B, 1, D)), one token copied to every image  =>  sum
    dcls = dout[:, :1].sum(axis=0, keepdims=True)                    # (1, 1, D)
    return dx, dcls, dpos


def mean_pool_backward(dout, cache):
    """Exercise 2. dout (B, D), cache = ("mean", (B, N, D)) from ops.pool_forward(x, "mean")."""
    _, (B, N, D) = cache
    dx = np.zeros((B, N, D), dtype=dout.dtype)                       # (B, N, D); [CLS] stays 0
    # forward: out = x[:, 1:].mean(axis=1), the mean of N - 1 patch tokens
    #   =>  each patch token gets dout / (N - 1); [CLS] was not in the mean
    dx[:, 1:] = dout[:, None, :] / (N - 1)                           # (B, 1, D) broadcast over N - 1
    return dx


def drop_path_backward(dout, cache):
    """Exercise 3. dout (B, N, D), cache = (keep, p) from drop_path_forward."""
    keep, p = cache
    # forward: out = x * keep / (1 - p), one factor per sample  =>  dx = dout * keep / (1 - p)
    scale = keep.astype(dout.dtype)[:, None, None] / (1.0 - p)      # (B, 1, 1)
    return dout * scale                                              # (B, N, D)
