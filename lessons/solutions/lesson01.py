"""Worked solutions to lesson 01's exercises (lessons/01_shapes.ipynb).

Try the exercises first: the notebook's checkers (minivit.exercises.lesson01) tell you what is wrong.

Shape legend: B batch, C channels, S image side, P patch side, G = S // P patches per side,
N tokens, D width, F MLP width.
"""
from __future__ import annotations


def patchify(x, P):
    """Images (B, C, S, S) -> patches (B, G*G, C*P*P), each flattened in (C, P, P) order."""
    B, C, S, _ = x.shape
    G = S // P
    # Split each side into (grid cell, pixel inside the cell): row y = gy * P + py.
    out = x.reshape(B, C, G, P, G, P)               # (B, C, Gy, Py, Gx, Px)
    # Bring the grid axes forward (row-major over the grid), then the patch's own axes in (C, P, P) order.
    out = out.transpose(0, 2, 4, 1, 3, 5)           # (B, Gy, Gx, C, Py, Px)
    return out.reshape(B, G * G, C * P * P)         # (B, G*G, C*P*P); copies, as the axes are no longer in memory order


def parameter_count(config):
    """Trainable parameters of a ViTConfig, from its sizes alone."""
    C, P, D, F, K = config.in_chans, config.patch_size, config.dim, config.hidden_dim, config.num_classes
    N = config.num_patches + 1                      # patches + [CLS]
    total = D * C * P * P + D                       # patch_embed.proj: weight (D, C, P, P) and bias
    total += D                                      # cls_token (1, 1, D)
    if config.pos_embed == "learned":
        total += N * D                              # pos_embed (1, N, D): [CLS] has a position too
    # ("sincos2d" positions are a fixed table, "none" has none: no parameters either way)
    block = 2 * D                                   # norm1: scale and shift
    block += 3 * D * D + (3 * D if config.qkv_bias else 0)   # attn.qkv
    block += D * D + D                              # attn.proj
    block += 2 * D                                  # norm2
    block += D * F + F                              # mlp.fc1
    block += F * D + D                              # mlp.fc2
    total += config.depth * block
    total += 2 * D                                  # the final norm
    if K > 0:
        total += D * K + K                          # head
    return total


def block_flops(N, D, F):
    """Forward FLOPs of one block for one image: matrix products only, a multiply-add counts as 2."""
    flops = 2 * N * D * (3 * D)                     # attn.qkv: (N, D) @ (D, 3D)
    flops += 2 * N * N * D                          # q @ k^T: H heads x (N, hs) @ (hs, N), H * hs = D
    flops += 2 * N * N * D                          # att @ v: H heads x (N, N) @ (N, hs)
    flops += 2 * N * D * D                          # attn.proj: (N, D) @ (D, D)
    flops += 2 * N * D * F                          # mlp.fc1: (N, D) @ (D, F)
    flops += 2 * N * F * D                          # mlp.fc2: (N, F) @ (F, D)
    return flops                                    # = 24 N D^2 + 4 N^2 D when F = 4D
