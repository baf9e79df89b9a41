"""Checkers for lesson 9 (inside a trained ViT): the cosine-similarity grid of a position table, the
mean attention distance of the heads of one block, and attention rollout through a stack of blocks.

Each checker compares the learner's function with minivit.analysis (pos_embed_similarity,
mean_attention_distance, attention_rollout) in float64, on several random inputs of different sizes,
chosen so that the usual mistakes show: a dot product that was not normalised, positions read in the
wrong order, the [CLS] row kept; distances in patches instead of pixels, or with the attention on the
[CLS] column still counted; rollout without the residual's identity, without renormalising, or
multiplied in the wrong order. While the learner's function runs, minivit.analysis's own function is
replaced by one that refuses to answer: the exercise is to compute it by hand.

Shape legend: B batch, H heads, N tokens (prefix + G*G), G patches per side, P patch side (pixels),
D width, L blocks.
"""
from __future__ import annotations


import numpy as np

from .. import analysis
from ..ops import sincos_2d_pos_embed
from . import Wrong, as_float_array, by_hand, exercise, expect_close


def _random_maps(rng: np.random.Generator, B: int, H: int, N: int, prefix: int):
    """Attention probabilities (B, H, N, N), rows summing to 1: a softmax of random scores, some heads
    sharp and some flat, and a good share of every row on the prefix tokens (the [CLS] column), as in
    a real model's early blocks, so that forgetting to drop that share shows."""
    scores = rng.standard_normal((B, H, N, N)) * rng.uniform(0.3, 4.0, (1, H, 1, 1))   # (B, H, N, N)
    if prefix:
        scores[..., :prefix] += 1.5
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)                                                # (B, H, N, N)


@exercise("the cosine-similarity grid of a position table")
def check_position_similarity(position_similarity):
    """position_similarity(table, grid_size, prefix_tokens) -> (G, G, G, G) against
    minivit.analysis.pos_embed_similarity, for random tables whose rows have very different norms
    (so an unnormalised dot product shows), several grid sizes and prefixes, and the sin-cos table."""
    rng = np.random.default_rng(9)
    cases = [(3, 1, 8), (2, 0, 5), (5, 2, 16), (4, 1, 32)]      # (G, prefix tokens, D)
    tables = []
    for G, prefix, D in cases:
        table = rng.standard_normal((prefix + G * G, D)) + 0.5 * rng.standard_normal(D)   # (N, D), correlated rows
        table *= np.exp(rng.uniform(-2, 2, (prefix + G * G, 1)))                          # rows of very different norms
        tables.append((table, G, prefix))
    tables.append((sincos_2d_pos_embed(64, 8, dtype=np.float64)[0], 8, 1))                 # (65, 64), the recipe's kind
    for table, G, prefix in tables:
        want = analysis.pos_embed_similarity(table.copy(), G, prefix_tokens=prefix)          # (G, G, G, G)
        with by_hand(analysis, "pos_embed_similarity"):
            got = position_similarity(table.copy(), G, prefix)
        where = f"a ({table.shape[0]}, {table.shape[1]}) table, grid_size={G}, prefix_tokens={prefix}"
        got = as_float_array(f"similarity for {where}", got)
        if got.shape == want.shape and np.allclose(got, want.transpose(1, 0, 3, 2), atol=1e-9) \
                and not np.allclose(got, want, atol=1e-9):
            raise Wrong(f"similarity for {where}: rows and columns are swapped. Token prefix + r * G + c is the "
                        f"patch in row r, column c (row-major, as patchify cuts them): reshape to (G, G, G, G).")
        try:
            expect_close(f"similarity for {where}", got, want, rtol=1e-9, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Drop the first prefix_tokens rows (the [CLS] token has no grid position), "
                        f"divide each row by its length (cosine, not a plain dot product), then take all "
                        f"dot products and reshape (G*G, G*G) -> (G, G, G, G).") from None
    return f"{len(tables)} tables (grids 2 x 2 to 8 x 8, 0 to 2 prefix tokens, the sin-cos table): equal to minivit.analysis"


@exercise("the mean attention distance of each head of a block")
def check_attention_distance(attention_distance):
    """attention_distance(attn, grid_size, patch_size, prefix_tokens) -> (H,) pixels, for one block's
    attention (B, H, N, N), against minivit.analysis.mean_attention_distance, on random maps with heads
    sharp and flat, several grids, patch sizes and prefixes."""
    rng = np.random.default_rng(10)
    cases = [(4, 3, 8, 4, 1), (2, 2, 3, 16, 1), (3, 4, 5, 2, 0), (1, 6, 8, 4, 1), (2, 1, 2, 7, 2)]  # (B, H, G, P, prefix)
    for B, H, G, P, prefix in cases:
        attn = _random_maps(rng, B, H, prefix + G * G, prefix)                 # (B, H, N, N)
        want = analysis.mean_attention_distance([attn.copy()], G, P, prefix_tokens=prefix)[0]   # (H,)
        with by_hand(analysis, "mean_attention_distance"):
            got = attention_distance(attn.copy(), G, P, prefix)
        where = f"B={B}, H={H}, grid {G} x {G}, patch {P} px, prefix_tokens={prefix}"
        got = as_float_array(f"distances for {where}", got)
        if got.shape == want.shape and np.allclose(got * P, want, rtol=1e-9) and P != 1:
            raise Wrong(f"distances for {where}: they are in patches; the figure's unit is pixels: "
                        f"multiply by the patch side P = {P}.")
        try:
            expect_close(f"distances for {where}", got, want, rtol=1e-9, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. For each query patch: the attention it puts on the patches (drop the prefix "
                        f"rows and columns, and renormalise what is left to sum to 1), times the Euclidean "
                        f"distance in pixels between patch centres, summed over keys; then the mean over "
                        f"queries and images, one number per head.") from None
    return f"{len(cases)} random blocks (1 to 6 heads, grids 2 x 2 to 8 x 8, patches 2 to 16 px): equal to minivit.analysis"


@exercise("attention rollout through a stack of blocks")
def check_rollout(rollout):
    """rollout(maps) -> (B, N, N) for a list of L attention maps (B, H, N, N), against
    minivit.analysis.attention_rollout(maps, residual=True), on random stacks of 1 to 5 blocks."""
    rng = np.random.default_rng(11)
    cases = [(2, 3, 10, 3), (1, 2, 5, 1), (3, 4, 17, 5), (2, 1, 4, 2), (2, 6, 65, 4)]   # (B, H, N, L)
    for B, H, N, L in cases:
        maps = [_random_maps(rng, B, H, N, 1) for _ in range(L)]                        # L x (B, H, N, N)
        want = analysis.attention_rollout([m.copy() for m in maps], residual=True)      # (B, N, N)
        with by_hand(analysis, "attention_rollout"):
            got = rollout([m.copy() for m in maps])
        where = f"{L} block{'s' if L > 1 else ''} of (B={B}, H={H}, N={N}) maps"
        got = as_float_array(f"rollout of {where}", got)
        if got.shape == want.shape:
            sums = got.sum(-1)
            if not np.allclose(sums, 1.0, atol=1e-8):
                raise Wrong(f"rollout of {where}: its rows sum to {sums.min():.4g} .. {sums.max():.4g}, not 1. "
                            f"After adding the identity, renormalise each row: (A + I) / 2.")
        try:
            expect_close(f"rollout of {where}", got, want, rtol=1e-9, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Per block: the mean over heads, A (B, N, N); the residual's share, "
                        f"(A + I) / 2; then the product with the LAST block on the left: "
                        f"R = A_L @ ... @ A_2 @ A_1 (token i of block L reads the tokens of block L - 1, "
                        f"which read the ones below).") from None
    return f"{len(cases)} random stacks (1 to 5 blocks, up to 6 heads and 65 tokens): equal to minivit.analysis"
