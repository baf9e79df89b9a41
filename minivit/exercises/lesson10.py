"""Checkers for lesson 10 (transfer: few-shot linear probes, and position embeddings at a new
resolution): the closed-form ridge probe, drawing k images per class, and the bilinear
interpolation of a learned position table.

* check_ridge_probe compares the learner's probe with minivit.analysis.fit_linear_probe in
  float64 on random problems with fewer and with more images than features, features far from
  zero mean, and several ridge strengths, so that a regularised bias, {0, 1} targets or a missing
  l2 all show (each is named when it is the mistake).
* check_draw_shots checks the indices the learner draws: exactly k of each class, no image twice,
  the same draw for the same seed, other draws for other seeds, and every image of a class as
  likely as any other (taking "the first k" is not a random draw).
* check_resample_positions compares the learner's interpolation with
  minivit.pretrained.resample_pos_embed on several tables and grid sizes (larger and smaller),
  naming the usual mistakes: align_corners=True sampling, the [CLS] row interpolated or lost.

While the learner's function runs, the minivit function it re-derives is swapped for one that
refuses to answer: the exercise is to compute it by hand.

Shape legend: B images, D feature width, K classes, G (G2) patches per side before (after),
N = 1 + G*G tokens.
"""
from __future__ import annotations


import numpy as np

from .. import analysis, pretrained
from . import Wrong, as_float_array, by_hand, exercise, expect_close


# ============================================================================= 10.1 the ridge probe

def _ridge(x, t, l2, regularise_bias=False):
    """Reference variants, to name a mistake: ridge with an unregularised bias (or a regularised one)."""
    B, D = x.shape
    if regularise_bias:                                        # the bias as one more feature, always 1
        xa = np.concatenate([x, np.ones((B, 1))], axis=1)      # (B, D + 1)
        wa = np.linalg.solve(xa.T @ xa + l2 * np.eye(D + 1), xa.T @ t)   # (D + 1, K)
        return wa[:-1], wa[-1]
    xm, tm = x.mean(0), t.mean(0)
    w = np.linalg.lstsq(x - xm, t - tm, rcond=None)[0] if l2 == 0 else \
        np.linalg.solve((x - xm).T @ (x - xm) + l2 * np.eye(D), (x - xm).T @ (t - tm))   # (D, K)
    return w, tm - xm @ w


@exercise("the closed-form ridge probe onto {-1, +1}^K")
def check_ridge_probe(ridge_probe):
    """ridge_probe(features (B, D), labels (B,), num_classes, l2) -> (W (D, K), b (K,)) against
    minivit.analysis.fit_linear_probe, on random problems: B < D and B > D, features with a large
    mean (so that a regularised bias pulls b far off), K from 2 to 7, l2 from 0.5 to 200."""
    rng = np.random.default_rng(10)
    cases = [(12, 30, 3, 64.0), (60, 8, 5, 4.0), (25, 25, 5, 200.0), (7, 16, 7, 0.5), (40, 5, 2, 16.0)]  # (B, D, K, l2)
    for B, D, K, l2 in cases:
        labels = np.concatenate([np.arange(K), rng.integers(0, K, B - K)])     # (B,): every class present
        rng.shuffle(labels)
        x = rng.standard_normal((B, D)) * rng.uniform(0.5, 3.0, D) + rng.uniform(2, 6, D)  # (B, D), mean far from 0
        x += 1.5 * np.eye(K, D)[labels]                                       # some signal in the features
        want_w, want_b = analysis.fit_linear_probe(x.copy(), labels.copy(), K, l2)        # (D, K), (K,)
        with by_hand(analysis, "fit_linear_probe"):
            got = ridge_probe(x.copy(), labels.copy(), K, l2)
        where = f"B={B} images, D={D} features, K={K} classes, l2={l2:g}"
        if not isinstance(got, tuple) or len(got) != 2:
            raise Wrong(f"{where}: return a pair (W, b), got {type(got).__name__}")
        w, b = (as_float_array(f"{n} for {where}", g) for n, g in zip(("W", "b"), got))
        if w.shape != (D, K) or b.shape != (K,):
            raise Wrong(f"{where}: W must be (D, K) = ({D}, {K}) and b (K,) = ({K},), got W {w.shape} and b {b.shape}")
        t = -np.ones((B, K))
        t[np.arange(B), labels] = 1.0                                          # (B, K) in {-1, +1}
        hints = [("targets in {0, 1}: the paper's targets are -1 everywhere and +1 at the label "
                  "(2 * one_hot - 1)", _ridge(x, (t + 1) / 2, l2)),
                 ("the bias is regularised (a column of ones in the features): the bias must be free. "
                  "Centre the features and the targets, solve for W, then b = mean(T) - mean(X) @ W",
                  _ridge(x, t, l2, regularise_bias=True)),
                 ("l2 is missing: this is plain least squares. Add l2 * I to the Gram matrix",
                  _ridge(x, t, 0.0)),
                 ("the features were not centred (the bias fitted after W, or left out of the system): "
                  "with a free bias, W is the ridge solution on the CENTRED features and targets",
                  (np.linalg.solve(x.T @ x + l2 * np.eye(D), x.T @ t), np.zeros(K)))]
        for hint, (hw, hb) in hints:
            if np.allclose(w, hw, rtol=1e-6, atol=1e-9) and not np.allclose(w, want_w, rtol=1e-6, atol=1e-9):
                raise Wrong(f"{where}: {hint}.")
            if np.allclose(w, hw, rtol=1e-6, atol=1e-9) and np.allclose(b, hb, rtol=1e-6, atol=1e-9) \
                    and not np.allclose(b, want_b, rtol=1e-6, atol=1e-9):
                raise Wrong(f"{where}: {hint}.")
        try:
            expect_close(f"W for {where}", w, want_w, rtol=1e-6, atol=1e-9)
            expect_close(f"b for {where}", b, want_b, rtol=1e-6, atol=1e-9)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Targets T: -1 everywhere, +1 at the label; centre X and T by their means; "
                        f"W = (Xc^T Xc + l2 I)^-1 Xc^T Tc; b = mean(T) - mean(X) @ W.") from None
    return (f"{len(cases)} random problems (B < D and B > D, K = 2..7, l2 = 0.5..200): equal to "
            f"minivit.analysis.fit_linear_probe to 1e-6")


# ============================================================================= 10.2 k images per class

@exercise("drawing k images of each class, seeded")
def check_draw_shots(draw_shots):
    """draw_shots(labels (B,), shots, seed) -> indices into labels: exactly `shots` of each class
    0..K-1 (K = labels.max() + 1), no index twice, reproducible from seed, different for other
    seeds, and uniform: over many seeds every image of a class is drawn about as often."""
    rng = np.random.default_rng(20)
    cases = [(np.repeat(np.arange(3), [7, 12, 5]), 2), (rng.integers(0, 5, 200), 10),
             (np.repeat(np.arange(4), 25), 25), (rng.integers(0, 10, 400), 1)]        # (labels, shots)
    for labels, k in cases:
        rng.shuffle(labels)                              # the classes interleaved, as in a real split
        K = int(labels.max()) + 1
        where = f"{len(labels)} labels of {K} classes (the smallest has {np.bincount(labels).min()}), shots={k}"
        picks = []
        for seed in (0, 1, 0):
            got = draw_shots(labels.copy(), k, seed)
            got = np.asarray(got)
            if got.ndim != 1 or got.dtype.kind not in "iu":
                raise Wrong(f"{where}: return a 1-D array of integer indices into labels, got "
                            f"{got.dtype} of shape {got.shape}")
            if got.size and (got.min() < 0 or got.max() >= len(labels)):
                raise Wrong(f"{where}: indices must lie in 0..{len(labels) - 1} (rows of THIS split: the shots come "
                            f"from the training images you were given), got {got.min()}..{got.max()}")
            if len(np.unique(got)) != len(got):
                raise Wrong(f"{where}: an image is drawn twice; draw without replacement (a permutation)")
            counts = np.bincount(labels[got], minlength=K)
            if not (counts == k).all():
                raise Wrong(f"{where}: expected exactly {k} image(s) of EACH class, got counts per class "
                            f"{counts.tolist()} ({len(got)} in all, {k * K} expected)")
            picks.append(np.sort(got))
        if not np.array_equal(picks[0], picks[2]):
            raise Wrong(f"{where}: seed 0 gave two different draws; use np.random.default_rng(seed), not the "
                        f"global random state, so that a draw can be repeated")
        if np.array_equal(picks[0], picks[1]) and (np.bincount(labels) > k).any():
            raise Wrong(f"{where}: seeds 0 and 1 gave the same draw; the draw must depend on the seed")
    # uniform within a class: 3 classes of 7, 12 and 5 images, 2 shots, 600 seeds
    labels = np.repeat(np.arange(3), [7, 12, 5])
    hits = np.zeros(len(labels))
    seeds = 600
    for seed in range(seeds):
        hits[np.asarray(draw_shots(labels.copy(), 2, seed))] += 1
    expected = 2 * seeds / np.bincount(labels)[labels]                        # (B,): k / n_c of the draws
    worst = float(np.abs(hits / expected - 1).max())
    if worst > 0.35:
        i = int(np.abs(hits / expected - 1).argmax())
        raise Wrong(f"over {seeds} seeds, image {i} (class {labels[i]}) was drawn {int(hits[i])} times, against "
                    f"about {expected[i]:.0f} if every image of its class were equally likely: draw at random "
                    f"within each class (e.g. rng.permutation of the class's indices, then its first k)")
    return (f"{len(cases)} label sets: exactly k per class, no repeats, seeded; over {seeds} seeds every image "
            f"drawn within {worst:.0%} of its fair share")


# ============================================================================= 10.3 positions at a new grid

@exercise("bilinear interpolation of a learned position table to a new grid")
def check_resample_positions(resample_positions):
    """resample_positions(pos_embed (1, 1 + G*G, D), new_grid) -> (1, 1 + G2*G2, D) against
    minivit.pretrained.resample_pos_embed (torch's interpolate, bilinear, align_corners=False),
    for grids 8 -> 12 (the lesson's), 3 -> 5, 4 -> 7, 6 -> 4 (smaller) and 5 -> 5."""
    rng = np.random.default_rng(30)
    cases = [(8, 12, 6), (3, 5, 4), (4, 7, 3), (6, 4, 5), (5, 5, 2)]         # (G, G2, D)
    for G, G2, D in cases:
        table = rng.standard_normal((1, 1 + G * G, D))                        # (1, N, D)
        table[0, 0] += 5.0                                                    # [CLS] unlike any patch
        want = pretrained.resample_pos_embed(table.copy(), G2)                # (1, 1 + G2*G2, D)
        with by_hand(pretrained, "resample_pos_embed"):
            got = resample_positions(table.copy(), G2)
        where = f"a {G} x {G} grid (D={D}) to {G2} x {G2}"
        got = as_float_array(f"positions for {where}", got)
        if got.shape != want.shape:
            hint = " (the [CLS] row is lost: keep it first, as it is)" if got.shape == (1, G2 * G2, D) else ""
            raise Wrong(f"positions for {where}: expected shape {want.shape}, got {got.shape}{hint}")
        if not np.allclose(got[0, 0], table[0, 0]):
            raise Wrong(f"positions for {where}: row 0 is the [CLS] token's, which has no place in the image: "
                        f"keep it unchanged and interpolate only the G*G patch rows")
        if G2 > 1 and G > 1:
            corners = np.linspace(0, G - 1, G2)                               # align_corners=True's positions
            grid = table[0, 1:].reshape(G, G, D)
            i0 = np.minimum(np.floor(corners).astype(int), G - 2)
            f = corners - i0
            rows = grid[i0] * (1 - f)[:, None, None] + grid[i0 + 1] * f[:, None, None]
            aligned = rows[:, i0] * (1 - f)[None, :, None] + rows[:, i0 + 1] * f[None, :, None]
            if np.allclose(got[0, 1:], aligned.reshape(-1, D)) and not np.allclose(got, want):
                raise Wrong(f"positions for {where}: these are align_corners=True positions (the corners of the "
                            f"old and new grids matched). The paper's (torch's default, align_corners=False) "
                            f"treats each patch as a cell: new cell j samples old position "
                            f"(j + 0.5) * G / G2 - 0.5, clamped to 0 .. G - 1")
        try:
            expect_close(f"positions for {where}", got, want, rtol=1e-9, atol=1e-12)
        except Wrong as wrong:
            raise Wrong(f"{wrong}. Keep row 0 ([CLS]); reshape the rest to (G, G, D), row-major; for each new "
                        f"index j along an axis sample old position s = max((j + 0.5) * G / G2 - 0.5, 0) between "
                        f"i0 = floor(s) and i1 = min(i0 + 1, G - 1) with weights 1 - (s - i0) and s - i0; "
                        f"rows first, then columns.") from None
    return (f"{len(cases)} tables (grids 3 to 8, larger, smaller and equal): equal to "
            f"minivit.pretrained.resample_pos_embed")
