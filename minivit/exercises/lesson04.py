"""Checkers for lesson 04 (the glue and the whole model).

    check_cls_pos_backward(cls_pos_backward)        exercise 1: [CLS] + position embeddings, backward
    check_mean_pool_backward(mean_pool_backward)    exercise 2: mean pooling over the patch tokens, backward
    check_drop_path_backward(drop_path_backward)    exercise 3: drop-path written with keep / (1 - p), backward

Each checker runs the learner's backward through `check_op` in float64 on several shapes (a batch of one
image and batches of several, so that a gradient not summed over the batch shows up), then compares it
with minivit's own op. Shape legend: B batch, N tokens (patches + 1 [CLS]), D width.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..gradcheck import check_op
from . import Wrong, exercise, expect_close, expect_gradients


def drop_path_forward(x, keep, p):
    """Drop-path (stochastic depth) with one keep-or-drop decision per sample, for exercise 3.

    x (B, N, D), keep (B,) booleans (True: this sample keeps its residual branch), p the drop rate.
    out = x * keep / (1 - p): a kept branch is scaled up by 1 / (1 - p), so that its expected value
    stays x. This is ops.dropout_forward with a (B, 1, 1) mask, the way minivit's Block does it;
    the cache keeps keep and p instead of the mask, so the backward has to rebuild the scale.
    """
    mask = keep.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)) / (1.0 - p)   # (B, 1, 1)
    out, _ = ops.dropout_forward(x, mask)                                           # (B, N, D)
    return out, (keep, p)


def _refuse_calls(answer, names, task):
    """Wrong if the learner's function calls minivit's own backward for the op it is meant to write."""
    code = getattr(answer, "__code__", None)
    used = sorted(set(getattr(code, "co_names", ())) & set(names))
    if used:
        raise Wrong(f"your function calls {', '.join(used)}: the exercise is to write {task} yourself, "
                    f"from the forward pass")


def _as_tuple(got, count, what):
    if not isinstance(got, tuple) or len(got) != count:
        raise Wrong(f"{what} must return a tuple of {count} gradients, got {type(got).__name__}"
                    + (f" of length {len(got)}" if isinstance(got, tuple) else ""))
    return got


def _expect_shape(name, got, shape, hint=""):
    got_shape = getattr(got, "shape", None)
    if got_shape is None or tuple(got_shape) != tuple(shape):
        raise Wrong(f"{name}: expected shape {tuple(shape)}, got "
                    f"{None if got_shape is None else tuple(got_shape)}" + (f". {hint}" if hint else ""))


# ----------------------------------------------------------------------------- exercise 1

@exercise("Exercise 1: backward of [CLS] + position embeddings")
def check_cls_pos_backward(cls_pos_backward):
    """cls_pos_backward(dout, cache) -> (dx, dcls_token, dpos_embed), cache from ops.cls_pos_forward."""
    _refuse_calls(cls_pos_backward, ("cls_pos_backward",), "the backward of [CLS] + positions")
    rng = np.random.default_rng(41)
    worst = 0.0
    # (B, G*G, D, position embeddings?): B = 1 alone cannot tell a sum over the batch from no sum
    cases = [(1, 4, 3, True), (3, 4, 5, True), (2, 9, 4, False), (5, 1, 2, True)]
    for B, M, D, with_pos in cases:
        inputs = {"x": rng.standard_normal((B, M, D)),
                  "cls_token": rng.standard_normal((1, 1, D)),
                  "pos_embed": rng.standard_normal((1, M + 1, D)) if with_pos else None}
        out, cache = ops.cls_pos_forward(**inputs)                      # (B, N, D)
        dout = rng.standard_normal(out.shape)
        dx, dcls, dpos = _as_tuple(cls_pos_backward(dout.copy(), cache), 3, "cls_pos_backward")
        where = f"(B={B}, N={M + 1}, D={D})"
        _expect_shape(f"dx {where}", dx, (B, M, D), "dx is the gradient of the patch tokens only: "
                      "the [CLS] row was not part of x")
        _expect_shape(f"dcls_token {where}", dcls, (1, 1, D), "One cls_token is shared by every image "
                      "of the batch: its gradient is the sum of their contributions")
        if with_pos:
            _expect_shape(f"dpos_embed {where}", dpos, (1, M + 1, D), "One pos_embed is shared by every "
                          "image of the batch: its gradient is the sum of their contributions")
        elif dpos is not None:
            raise Wrong(f"dpos_embed {where}: without position embeddings (cache[0] is False) return None, "
                        f"got {type(dpos).__name__}")
        wrt = ("x", "cls_token", "pos_embed") if with_pos else ("x", "cls_token")
        errors = check_op(ops.cls_pos_forward, cls_pos_backward, inputs, wrt, seed=B)
        expect_gradients(f"cls_pos_backward {where}", errors)
        worst = max(worst, *errors.values())
        want = ops.cls_pos_backward(dout, cache)
        expect_close(f"dx {where}", dx, want[0])
        expect_close(f"dcls_token {where}", dcls, want[1])
        if with_pos:
            expect_close(f"dpos_embed {where}", dpos, want[2])
    return (f"{len(cases)} shapes (B = 1, 3, 2, 5; one without positions): worst rel_error {worst:.1e}, "
            f"and equal to minivit.ops.cls_pos_backward")


# ----------------------------------------------------------------------------- exercise 2

def _mean_pool_forward(x):
    return ops.pool_forward(x, "mean")


@exercise("Exercise 2: backward of mean pooling")
def check_mean_pool_backward(mean_pool_backward):
    """mean_pool_backward(dout, cache) -> dx, cache from ops.pool_forward(x, "mean")."""
    _refuse_calls(mean_pool_backward, ("pool_backward",), "the backward of mean pooling")
    rng = np.random.default_rng(42)
    worst = 0.0
    cases = [(1, 2, 3), (3, 5, 4), (2, 17, 6), (4, 65, 2)]   # (B, N, D); N = 2 is one patch and [CLS]
    for B, N, D in cases:
        inputs = {"x": rng.standard_normal((B, N, D))}
        out, cache = _mean_pool_forward(**inputs)                      # (B, D)
        dout = rng.standard_normal(out.shape)
        dx = mean_pool_backward(dout.copy(), cache)
        where = f"(B={B}, N={N}, D={D})"
        _expect_shape(f"dx {where}", dx, (B, N, D), "dx has the shape of the pooled tokens x (B, N, D)")
        errors = check_op(_mean_pool_forward, mean_pool_backward, inputs, ("x",), seed=N)
        expect_gradients(f"mean_pool_backward {where}", errors)
        worst = max(worst, errors["x"])
        expect_close(f"dx {where}", dx, ops.pool_backward(dout, cache))
    return (f"{len(cases)} shapes (N = 2, 5, 17, 65 tokens): worst rel_error {worst:.1e}, "
            f"and equal to minivit.ops.pool_backward")


# ----------------------------------------------------------------------------- exercise 3

@exercise("Exercise 3: backward of drop-path")
def check_drop_path_backward(drop_path_backward):
    """drop_path_backward(dout, cache) -> dx, cache = (keep, p) from drop_path_forward above."""
    rng = np.random.default_rng(43)
    worst = 0.0
    # (B, N, D, p, keep): a sample dropped and kept in one batch, B = 1, a large p, and random draws.
    cases = [(4, 3, 2, 0.1, [True, False, True, True]),
             (1, 5, 3, 0.25, [True]),
             (3, 2, 4, 0.7, [False, True, False]),
             (6, 4, 3, 0.35, None)]
    for B, N, D, p, keep in cases:
        keep = rng.random(B) >= p if keep is None else np.array(keep)
        inputs = {"x": rng.standard_normal((B, N, D))}

        def forward(x, keep=keep, p=p):
            return drop_path_forward(x, keep, p)

        out, cache = forward(**inputs)                                  # (B, N, D)
        dout = rng.standard_normal(out.shape)
        dx = drop_path_backward(dout.copy(), cache)
        where = f"(B={B}, p={p}, keep={keep.astype(int).tolist()})"
        _expect_shape(f"dx {where}", dx, (B, N, D), "dx has the shape of x (B, N, D)")
        errors = check_op(forward, drop_path_backward, inputs, ("x",), seed=B)
        expect_gradients(f"drop_path_backward {where}", errors)
        worst = max(worst, errors["x"])
        mask = keep.astype(np.float64)[:, None, None] / (1.0 - p)     # (B, 1, 1)
        expect_close(f"dx {where}", dx, ops.dropout_backward(dout, mask))
    return f"{len(cases)} batches (B = 4, 1, 3, 6; p = 0.1 to 0.7): worst rel_error {worst:.1e}, equal to dout * mask"
