"""Checkers for lesson 01 (walking the dimensions of ViT-B/16).

    check_patchify(patchify)                 images (B, C, S, S) -> patches (B, G*G, C*P*P), by reshape/transpose
    check_parameter_count(parameter_count)   the number of parameters of any ViTConfig, from its sizes
    check_block_flops(block_flops)           forward FLOPs of one Transformer block from N, D, F

Each compares the learner's answer with minivit's own (ops.patchify_forward, minivit.shapes) on
many inputs, exactly, and names the usual mistake when the answer matches one. While a checker runs,
the minivit functions that would give the answer away raise Wrong, so an answer cannot just call them.

Shape legend: B batch, C channels, S image side, P patch side, G = S // P, N tokens, D width, F MLP width.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import ops, shapes
from ..config import PRESETS, ViTConfig, get_preset
from . import Wrong, exercise


# minivit's own answers, looked up here, before a check forbids them in their module.
_count = shapes.count_parameters
_flops = shapes.count_flops


@contextlib.contextmanager
def _forbidden(module, *names):
    """Make module.<name> raise Wrong for the duration: the exercise is to compute what it computes."""
    saved = {name: getattr(module, name) for name in names}

    def refuse(name):
        def call(*args, **kwargs):
            raise Wrong(f"your answer calls {module.__name__}.{name}, which computes the answer for you; "
                        f"write the computation yourself")
        return call

    try:
        for name in names:
            setattr(module, name, refuse(name))
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


# ----------------------------------------------------------------------------- 1.1 patchify

# (B, C, S, P): C in {1, 3}, P in {2, 4, 16}, B > 1 mostly, grids from 1 x 1 to 8 x 8.
_PATCHIFY_CASES = [(2, 3, 32, 4), (3, 1, 8, 2), (2, 3, 64, 16), (1, 3, 48, 16), (4, 1, 12, 4),
                   (2, 3, 6, 2), (2, 1, 16, 16), (5, 3, 20, 4)]


def _patch_orders(x, P):
    """Plausible wrong orders, each named by what went wrong."""
    B, C, S, _ = x.shape
    G = S // P
    x6 = x.reshape(B, C, G, P, G, P)                 # (B, C, Gy, Py, Gx, Px)
    return {
        "each patch is flattened in (P, P, C) order (pixel by pixel, channels last, as in the JAX "
        "release); minivit flattens in (C, P, P) order: first the whole R plane, then G, then B":
            x6.transpose(0, 2, 4, 3, 5, 1),
        "the patches run down the columns of the grid instead of along its rows (Gy and Gx swapped): "
        "patch 1 must be the square to the right of patch 0":
            x6.transpose(0, 4, 2, 1, 3, 5),
        "inside each patch, rows and columns are swapped (Py and Px): each channel's P x P square "
        "must be flattened row by row":
            x6.transpose(0, 2, 4, 1, 5, 3),
    }


@exercise("1.1 patchify with reshape and transpose")
def check_patchify(patchify):
    rng = np.random.default_rng(101)
    for i, (B, C, S, P) in enumerate(_PATCHIFY_CASES):
        G = S // P
        dtype = np.float32 if i % 2 else np.float64
        x = rng.standard_normal((B, C, S, S)).astype(dtype)   # distinct values: any reordering shows
        want, _ = ops.patchify_forward(x, P)                 # (B, G*G, C*P*P)
        x_before = x.copy()
        with _forbidden(ops, "patchify_forward"):
            got = patchify(x, P)
        where = f"images of shape {(B, C, S, S)} with P = {P}"
        if isinstance(got, tuple):
            raise Wrong(f"{where}: return only the patches array (B, G*G, C*P*P), not a tuple")
        if not np.array_equal(x, x_before):
            raise Wrong(f"{where}: your function changed the input images; it must only rearrange a copy or a view")
        if getattr(got, "shape", None) != want.shape:
            raise Wrong(f"{where}: expected shape (B, G*G, C*P*P) = {want.shape}, "
                        f"got {getattr(got, 'shape', type(got).__name__)}")
        got = np.asarray(got)
        if np.array_equal(got, want):
            continue
        for mistake, wrong in _patch_orders(x, P).items():
            if np.array_equal(got, wrong.reshape(B, G * G, C * P * P)):
                raise Wrong(f"{where}: {mistake}")
        if np.array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1)):
            raise Wrong(f"{where}: every patch holds the right {C * P * P} numbers, in the wrong order; "
                        f"flatten each patch in (C, P, P) order")
        b, n = np.argwhere((got != want).any(-1))[0]
        raise Wrong(f"{where}: patch {n} of image {b} (grid row {n // G}, column {n % G}) does not hold "
                    f"the pixels x[{b}, :, {P * (n // G)}:{P * (n // G + 1)}, {P * (n % G)}:{P * (n % G + 1)}]")
    return f"equal, element for element, to ops.patchify_forward on {len(_PATCHIFY_CASES)} batches " \
           f"(C in {{1, 3}}, P in {{2, 4, 16}}, float32 and float64)"


# ----------------------------------------------------------------------------- 1.2 parameter count

def _random_configs(rng, n):
    out = []
    while len(out) < n:
        P = int(rng.choice([2, 4, 7, 8, 14, 16]))
        heads = int(rng.integers(1, 9))
        dim = heads * int(rng.choice([4, 8, 12, 16, 32]))
        pos = str(rng.choice(["learned", "sincos2d", "none"]))
        if pos == "sincos2d" and dim % 4:
            continue
        out.append(ViTConfig(img_size=P * int(rng.integers(1, 11)), patch_size=P, in_chans=int(rng.choice([1, 3])),
                             num_classes=int(rng.choice([0, 10, 100, 1000])), dim=dim, depth=int(rng.integers(1, 7)),
                             heads=heads, mlp_dim=None if rng.random() < 0.5 else int(rng.integers(1, 4 * dim)),
                             mlp_ratio=float(rng.choice([2.0, 4.0])), qkv_bias=bool(rng.random() < 0.5),
                             pool=str(rng.choice(["cls", "mean"])), pos_embed=pos))
    return out


def _parameter_cases():
    named = [(f"preset {name!r}", cfg) for name, cfg in PRESETS.items()]
    b16 = get_preset("vit-b16")
    named += [(f"vit-b16 with {k}={v!r}", b16.replace(**{k: v}))
              for k, v in [("qkv_bias", False), ("pos_embed", "none"), ("pos_embed", "sincos2d"),
                           ("pool", "mean"), ("num_classes", 0), ("mlp_dim", 1000), ("in_chans", 1)]]
    named += [(f"random config {c}", c) for c in _random_configs(np.random.default_rng(102), 40)]
    return named


def _parameter_hint(cfg, diff):
    D, depth = cfg.dim, cfg.depth
    if diff == -D and cfg.pos_embed == "learned":
        return (f" You are short by exactly D = {D}: the [CLS] token's own position? pos_embed has "
                f"N = G*G + 1 = {cfg.num_tokens} rows, one for [CLS] as well (or you left out cls_token itself).")
    if diff == -D:
        return f" You are short by exactly D = {D}: the [CLS] token (D parameters)."
    if diff == D and cfg.pos_embed != "learned":
        return f" You have D = {D} too many: with pos_embed={cfg.pos_embed!r} there is no learned position table."
    if diff == -2 * D * (2 * depth + 1):
        return (f" You are short by 2 D (2 depth + 1) = {-diff:,}: the LayerNorms (a scale and a shift of D each; "
                f"two per block and the final norm).")
    if diff == -3 * D * depth:
        return f" You are short by 3 D depth = {-diff:,}: the qkv biases (unless qkv_bias is False)."
    if diff == 3 * D * depth and not cfg.qkv_bias:
        return f" You have 3 D depth = {diff:,} too many: this config has qkv_bias=False."
    return ""


@exercise("1.2 count the parameters of any ViTConfig")
def check_parameter_count(parameter_count):
    cases = [(where, cfg, _count(cfg)) for where, cfg in _parameter_cases()]
    for where, cfg, want in cases:
        with _forbidden(shapes, "count_parameters", "walk"):
            got = parameter_count(cfg)
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, np.integer)):
            raise Wrong(f"{where}: return an int, got {type(got).__name__} {got!r}")
        if int(got) != want:
            raise Wrong(f"{where}: expected {want:,} parameters, got {int(got):,} "
                        f"(difference {int(got) - want:+,}).{_parameter_hint(cfg, int(got) - want)}")
    return f"equal to minivit.shapes.count_parameters on all {len(PRESETS)} presets and {len(cases) - len(PRESETS)} " \
           f"other configs (qkv_bias False, pos_embed none / sincos2d, pool mean, no head, odd MLP widths)"


# ----------------------------------------------------------------------------- 1.3 FLOPs of a block

def _block_reference(G, D, F, heads):
    """One block's forward FLOPs from minivit.shapes: a 2-block model minus a 1-block model."""
    cfg = ViTConfig(img_size=2 * G, patch_size=2, in_chans=1, num_classes=0, dim=D, heads=heads, mlp_dim=F, depth=1)
    return _flops(cfg.replace(depth=2)) - _flops(cfg)


# (G, D, F, heads): N = G*G + 1 tokens, from 2 to 577; F = 4D and F != 4D.
_BLOCK_CASES = [(14, 768, 3072, 12), (8, 128, 512, 4), (24, 1024, 4096, 16), (7, 768, 3072, 12), (2, 16, 40, 2),
                (16, 1280, 5120, 16), (1, 64, 256, 4), (5, 96, 192, 6), (3, 12, 100, 3), (10, 192, 384, 6)]


@exercise("1.3 forward FLOPs of one Transformer block")
def check_block_flops(block_flops):
    for G, D, F, heads in _BLOCK_CASES:
        N = G * G + 1
        want = _block_reference(G, D, F, heads)
        with _forbidden(shapes, "count_flops", "walk"):
            got = block_flops(N, D, F)
        where = f"N = {N}, D = {D}, F = {F}"
        if isinstance(got, (bool, np.bool_)) or not isinstance(got, (int, float, np.integer, np.floating)):
            raise Wrong(f"{where}: return a number, got {type(got).__name__} {got!r}")
        if not np.isfinite(got) or got != want:
            hint = ""
            if got * 2 == want:
                hint = " That is exactly half: a multiply-add counts as 2 FLOPs, so (n, k) @ (k, m) costs 2 n k m."
            elif got == want - 4 * N * N * D:
                hint = (" You are short by exactly 4 N^2 D: the two attention products q @ k^T and att @ v "
                        "(each 2 N^2 hs per head, H heads).")
            elif got == want - 2 * N * N * D:
                hint = " You are short by exactly 2 N^2 D: one of the two attention products (q @ k^T or att @ v)."
            elif got == want - 2 * N * D * D:
                hint = " You are short by exactly 2 N D^2: the output projection attn.proj."
            elif got == 2 * N * D * 4 * D + 4 * N * N * D + 16 * N * D * D and F != 4 * D:
                hint = f" You assumed F = 4 D; this case has F = {F}."
            raise Wrong(f"{where}: expected {want:,} FLOPs, got {got:,}.{hint}")
    return f"equal to minivit.shapes on {len(_BLOCK_CASES)} cases (N from 2 to 577, F = 4D and F != 4D)"
