"""Worked solutions to lesson 9's exercises (inside a trained ViT). Try them yourself first.

Shape legend: B batch, H heads, N tokens (prefix + G*G), G patches per side, P patch side (pixels),
D width, L blocks.
"""
import numpy as np


def position_similarity(table, grid_size, prefix_tokens=1):
    """Cosine similarity between the position embeddings of every pair of grid positions."""
    t = np.asarray(table, dtype=np.float64)[prefix_tokens:]          # (G*G, D): [CLS] has no grid position
    t = t / np.linalg.norm(t, axis=1, keepdims=True)                 # (G*G, D), rows of length 1
    sim = t @ t.T                                                    # (G*G, G*G), cosines
    G = grid_size
    return sim.reshape(G, G, G, G)                                   # token r * G + c is row r, column c


def attention_distance(attn, grid_size, patch_size, prefix_tokens=1):
    """Mean attention distance in pixels of each head of one block: how far a query patch looks, the
    distances to the key patches weighted by its attention, averaged over queries and images."""
    G, p = grid_size, prefix_tokens
    row, col = np.divmod(np.arange(G * G), G)                        # (G*G,), (G*G,): each patch's place
    dist = patch_size * np.hypot(row[:, None] - row[None], col[:, None] - col[None])   # (G*G, G*G) pixels
    a = np.asarray(attn, dtype=np.float64)[:, :, p:, p:]             # (B, H, G*G, G*G): patches to patches
    a = a / a.sum(-1, keepdims=True)                                 # what a patch gives the patches sums to 1
    per_query = (a * dist).sum(-1)                                   # (B, H, G*G)
    return per_query.mean(axis=(0, 2))                               # (H,)


def rollout(maps):
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input token
    through every block, counting the residual connection as half of each block's mixing."""
    out = None
    for attn in maps:                                                # first block first
        a = np.asarray(attn, dtype=np.float64).mean(axis=1)          # (B, N, N): the heads' mean
        a = (a + np.eye(a.shape[-1])) / 2                            # (B, N, N): + the residual; rows still sum to 1
        out = a if out is None else a @ out                          # the later block reads the earlier ones' mix
    return out                                                       # (B, N, N)
