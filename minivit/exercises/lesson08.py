"""Checkers for lesson 08 (inductive bias: translation and locality).

    check_shift_report(shift_report)                 exercise 1: is f equivariant / invariant to a circular shift?
    check_find_grid_shift(find_grid_shift)           exercise 2: which grid step moved these patch tokens, if any?
    check_mean_attention_distance(mean_attention_distance)   exercise 3: how far one block's heads look

Shape legend: B batch, C channels, S image side, P patch side, G = S // P patches per side,
N tokens (G*G patches + 1 [CLS]), D width, H heads.
"""
from __future__ import annotations

import numpy as np

from ..config import ViTConfig
from ..model import ViT
from ..modules import PatchEmbed
from . import Wrong, exercise, expect_close


def shift(x, dy, dx):
    """Circular shift of images (..., S, S): the pixel at (y, x) moves to ((y + dy) % S, (x + dx) % S)."""
    return np.roll(x, (dy, dx), axis=(-2, -1))


# ----------------------------------------------------------------------------- exercise 1

def _fft_circular_conv(kernel):
    """A depthwise 3 x 3 circular convolution computed with the FFT: equivariant to every circular
    shift, but only up to float rounding (the FFT mixes every pixel into every sum)."""

    def f(x):
        S = x.shape[-1]
        k = np.zeros(x.shape[-3:])                                   # (C, S, S), the kernel centred at (0, 0)
        for i in range(3):
            for j in range(3):
                k[:, (i - 1) % S, (j - 1) % S] = kernel[:, i, j]
        # out[y, x] = sum k[y - y', x - x'] x[y', x']: a product in frequency space
        return np.real(np.fft.ifft2(np.fft.fft2(x) * np.fft.fft2(k)))   # (B, C, S, S)

    return f


def _zero_padded_blur(x):
    """A 3 x 3 box blur with zero padding: pixels near the border see zeros, not the other side."""
    S = x.shape[-1]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])   # (B, C, S + 2, S + 2)
    return sum(padded[..., i:i + S, j:j + S] for i in range(3) for j in range(3)) / 9.0   # (B, C, S, S)


def _add_position_map(x):
    """x plus a fixed map that depends on the position: what a position embedding does."""
    S = x.shape[-1]
    ramp = np.add.outer(np.arange(S), 2.0 * np.arange(S)) / S      # (S, S)
    return x + ramp


def _tiny_vit(pos_embed, S, seed):
    """A small float64 ViT with 2 x 2 patches, mean pooling and the given position embedding."""
    cfg = ViTConfig(img_size=S, patch_size=2, in_chans=3, num_classes=4, dim=16, depth=2, heads=2,
                    mlp_dim=32, pool="mean", pos_embed=pos_embed)
    model = ViT(cfg, seed=seed).astype(np.float64).eval()

    def logits(x):
        return model(x)                                              # (B, K)

    return logits


def _exercise1_cases():
    """(name, f, x, dy, dx, equivariant, invariant). The answers follow from what each f computes:
    a per-pixel map and a circular convolution commute with every circular shift; a mean over the
    pixels forgets where they were; zero padding and an added position map break both; a ViT
    without positions and with mean pooling is invariant to shifts by whole patches (its patch
    tokens are only permuted), not to a 1-pixel shift; a shift by (0, 0) or by S changes nothing."""
    rng = np.random.default_rng(81)
    x8 = rng.standard_normal((2, 3, 8, 8))                           # (B, C, S, S)
    x12 = rng.standard_normal((1, 3, 12, 12))
    conv = _fft_circular_conv(rng.standard_normal((3, 3, 3)))
    vit_none = _tiny_vit("none", 8, seed=1)
    vit_sincos = _tiny_vit("sincos2d", 8, seed=2)
    return [
        ("np.tanh (per pixel)", np.tanh, x8, 1, 0, True, False),
        ("a circular 3x3 convolution (by FFT)", conv, x8, 1, 3, True, False),
        ("a circular 3x3 convolution (by FFT)", conv, x8, 0, 0, True, True),
        ("a 3x3 box blur with zero padding", _zero_padded_blur, x12, 2, 5, False, False),
        ("the mean over the pixels, x.mean(axis=(-2, -1))", lambda x: x.mean(axis=(-2, -1)), x12, 5, 7, False, True),
        ("x + a fixed position map", _add_position_map, x8, 0, 2, False, False),
        ("x + a fixed position map", _add_position_map, x8, 8, 0, True, True),
        ("np.zeros_like", np.zeros_like, x8, 3, 1, True, True),
        ("a ViT's logits (no position embedding, mean pooling, 2x2 patches)", vit_none, x8, 2, 4, False, True),
        ("a ViT's logits (no position embedding, mean pooling, 2x2 patches)", vit_none, x8, 1, 0, False, False),
        ("a ViT's logits (sin-cos position embedding, mean pooling, 2x2 patches)", vit_sincos, x8, 2, 2, False, False),
    ]


@exercise("Exercise 1: equivariant, invariant, or neither?")
def check_shift_report(shift_report):
    """shift_report(f, x, dy, dx) -> (equivariant, invariant), two bools."""
    cases = _exercise1_cases()
    for name, f, x, dy, dx, want_eq, want_inv in cases:
        got = shift_report(f, x.copy(), dy, dx)
        if not (isinstance(got, tuple) and len(got) == 2
                and all(isinstance(v, (bool, np.bool_)) for v in got)):
            raise Wrong(f"shift_report must return a tuple of two bools (equivariant, invariant), got {got!r}")
        got_eq, got_inv = bool(got[0]), bool(got[1])
        if (got_eq, got_inv) != (want_eq, want_inv):
            hint = ""
            fx, fs = f(x), f(shift(x, dy, dx))
            if want_eq and not got_eq:
                diff = np.abs(fs - shift(fx, dy, dx)).max()
                hint = (f" f(shift(x)) and shift(f(x)) differ by at most {diff:.1e} here"
                        + (": float rounding, so compare with np.allclose, not exact equality" if diff > 0 else
                           ": shift the output by the same (dy, dx), in the same direction, on the last two axes"))
            elif want_inv and not got_inv:
                diff = np.abs(fs - fx).max()
                hint = f" f(shift(x)) and f(x) differ by at most {diff:.1e} here" + (
                    ": float rounding, so compare with np.allclose, not exact equality" if diff > 0 else "")
            elif got_eq and not want_eq and np.shape(fx)[-2:] != np.shape(x)[-2:]:
                hint = (f" f's output has shape {np.shape(fx)}: it has no image axes to shift, so it cannot be "
                        f"equivariant in this sense")
            raise Wrong(f"f = {name}, x {x.shape}, shift (dy, dx) = ({dy}, {dx}): you said equivariant={got_eq}, "
                        f"invariant={got_inv}; expected equivariant={want_eq}, invariant={want_inv}.{hint}")
    return (f"{len(cases)} cases right: per-pixel maps, convolutions, zero padding, a mean, a position map "
            f"and ViTs, shifts by (0, 0), by S, by whole patches and by 1 pixel")


# ----------------------------------------------------------------------------- exercise 2

def _patch_embed(S, P, D, rng):
    """A PatchEmbed for 3-channel S x S images with random float64 weights."""
    pe = PatchEmbed(S, P, 3, D)
    pe.proj.weight.data = rng.standard_normal((D, 3, P, P))
    pe.proj.bias.data = rng.standard_normal(D)
    return pe


def _rolled_by_index(tokens, sy, sx):
    """The tokens of the shifted image by index arithmetic: the patch at grid cell (gy, gx) moves to
    ((gy + sy) % G, (gx + sx) % G); tokens are numbered row by row, t = gy * G + gx."""
    B, M, D = tokens.shape
    G = int(round(M ** 0.5))
    out = np.empty_like(tokens)
    for gy in range(G):
        for gx in range(G):
            out[:, ((gy + sy) % G) * G + (gx + sx) % G] = tokens[:, gy * G + gx]
    return out


@exercise("Exercise 2: which grid step turned these tokens into those?")
def check_find_grid_shift(find_grid_shift):
    """find_grid_shift(tokens, moved) -> (sy, sx) with 0 <= sy, sx < G, or None: the grid roll that
    turns the tokens of an image into the tokens of the moved image, if there is one."""
    rng = np.random.default_rng(82)
    # (B, S, P, D, dy, dx) in pixels: rows and columns moved by different amounts (a swap shows), a
    # column move that wraps around (a search over rolls of the flat token axis shows), negative and
    # large moves, no move, and moves that are not whole patches (no roll matches them)
    cases = [(2, 32, 4, 16, 4, 0), (1, 32, 4, 16, 0, 4), (3, 16, 4, 5, 4, 8), (2, 12, 2, 6, -2, 8),
             (1, 8, 4, 3, 12, 4), (2, 24, 8, 7, 16, -8), (2, 16, 4, 6, 0, 0),
             (2, 32, 4, 16, 1, 1), (1, 16, 4, 8, 0, 2), (2, 12, 2, 6, 3, 2)]
    for B, S, P, D, dy, dx in cases:
        G = S // P
        pe = _patch_embed(S, P, D, rng)
        x = rng.standard_normal((B, 3, S, S))                         # (B, C, S, S)
        tokens, moved = pe(x), pe(shift(x, dy, dx))                   # (B, G*G, D) each
        whole = dy % P == 0 and dx % P == 0
        want = ((dy // P) % G, (dx // P) % G) if whole else None
        if whole:   # the answer, checked independently: the roll by index arithmetic gives the moved tokens
            expect_close("(checker) tokens rolled by index", _rolled_by_index(tokens, *want), moved,
                         rtol=1e-12, atol=1e-12)
        got = find_grid_shift(tokens.copy(), moved.copy())
        if got is not None:
            if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(v, (int, np.integer)) for v in got)):
                raise Wrong(f"find_grid_shift must return a tuple of two ints (sy, sx) or None, got {got!r}")
            got = (int(got[0]), int(got[1]))
        if got != want:
            where = f"G={G} patches per side of P={P} pixels, image moved by (dy, dx) = ({dy}, {dx}) pixels"
            if want is None:
                raise Wrong(f"{where}: you returned {got}, but no roll of the token grid gives the moved tokens "
                            f"(the move is not a whole number of patches, so every token changed); expected None")
            raise Wrong(f"{where}: you returned {got}, expected {want} (grid steps, each in 0..G-1)")
    return (f"{len(cases)} cases (grids 2x2 to 8x8): whole-patch moves found, and None for the "
            f"{sum(1 for c in cases if c[4] % c[2] or c[5] % c[2])} moves that are not whole patches")


# ----------------------------------------------------------------------------- exercise 3

def _random_maps(rng, B, H, N, concentration):
    """Attention-like maps (B, H, N, N): every row a random probability vector (Dirichlet)."""
    return rng.dirichlet(np.full(N, concentration), size=(B, H, N))    # (B, H, N, N), rows sum to 1


@exercise("Exercise 3: mean attention distance of one block")
def check_mean_attention_distance(mean_attention_distance):
    """mean_attention_distance(att, grid_size, patch_size) -> (H,) pixels, att (B, H, N, N) with [CLS] first."""
    from ..analysis import mean_attention_distance as minivit_mad   # imported here: the lesson imports it later

    # Hand-built cases with a known answer, on a 2 x 2 grid of 4-pixel patches (N = 5 with [CLS]):
    # the four patch centres are 4 px apart side by side and 4 * sqrt(2) px apart across.
    G, P, N = 2, 4, 5
    self_only = np.zeros((1, 1, N, N))
    self_only[0, 0, np.arange(N), np.arange(N)] = 1.0                   # every token looks at itself only
    spread = np.full((1, 1, N, N), 1.0 / N)                             # uniform over [CLS] and the patches
    half_cls = np.zeros((1, 1, N, N))
    half_cls[0, 0, :, 0] = 0.5                                          # half of every row on [CLS] ...
    half_cls[0, 0, 1:, 1:] = np.array([[0, .5, 0, 0], [.5, 0, 0, 0], [0, 0, 0, .5], [0, 0, .5, 0]])   # ... half on the side neighbour
    known = [("every patch attends only to itself", self_only, 0.0),
             ("uniform attention over all 5 tokens", spread, (0 + 4 + 4 + 4 * np.sqrt(2)) / 4),
             ("half on [CLS], half on the neighbour to the side", half_cls, 4.0)]
    for what, att, want in known:
        got = mean_attention_distance(att.copy(), G, P)
        expect_close(f"2x2 grid of 4-pixel patches, {what}", got, np.array([want]), rtol=1e-9, atol=1e-9)

    rng = np.random.default_rng(83)
    # (B, H, G, P, concentration): one head and many, small and large grids, peaked and flat maps
    cases = [(2, 3, 4, 4, 0.3), (1, 1, 3, 2, 1.0), (3, 6, 8, 4, 0.1), (2, 2, 5, 8, 2.0)]
    for B, H, G, P, c in cases:
        att = _random_maps(rng, B, H, G * G + 1, c)                     # (B, H, N, N)
        att[:, :, :, 0] *= 3.0                                          # [CLS] takes a larger share, as after training
        att /= att.sum(-1, keepdims=True)
        got = mean_attention_distance(att.copy(), G, P)
        expect_close(f"random maps (B={B}, H={H}, G={G}, P={P})", got, minivit_mad([att], G, P)[0],
                     rtol=1e-9, atol=1e-9)
    return (f"{len(known)} hand-built maps with known distances and {len(cases)} random ones equal to "
            f"minivit.analysis.mean_attention_distance")
