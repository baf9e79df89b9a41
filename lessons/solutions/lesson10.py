"""Worked solutions to lesson 10's exercises (transfer: few-shot linear probes; positions at a new grid).

Shape legend: B images, D feature width, K classes, G (G2) patches per side before (after),
N = 1 + G*G tokens.
"""
import numpy as np


def ridge_probe(features, labels, num_classes, l2):
    """Closed-form ridge regression onto {-1, +1}^K targets with a free (unregularised) bias."""
    x = np.asarray(features, dtype=np.float64)                  # (B, D)
    B, D = x.shape
    t = -np.ones((B, num_classes))                              # (B, K): -1 everywhere ...
    t[np.arange(B), labels] = 1.0                               # ... and +1 at the label
    # d/db of ||X W + b - T||^2 = 0 gives b = mean(T) - mean(X) @ W: with it, the problem is plain
    # ridge regression on the centred features and targets, and the bias is never shrunk.
    x_mean, t_mean = x.mean(axis=0), t.mean(axis=0)             # (D,), (K,)
    xc, tc = x - x_mean, t - t_mean                             # (B, D), (B, K)
    w = np.linalg.solve(xc.T @ xc + l2 * np.eye(D), xc.T @ tc)  # (D, D) system -> (D, K)
    return w, t_mean - x_mean @ w                               # (D, K), (K,)


def draw_shots(labels, shots, seed):
    """`shots` random indices of each class 0..K-1, without repeats, reproducible from seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)                           # its own generator: the same seed, the same draw
    K = int(labels.max()) + 1
    picks = [rng.permutation(np.flatnonzero(labels == k))[:shots] for k in range(K)]   # K x (shots,)
    return np.concatenate(picks)                                # (K * shots,)


def _taps(n_in, n_out):
    """align_corners=False: new cell j's centre is at old position (j + 0.5) * n_in / n_out - 0.5."""
    s = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)   # (n_out,), clamped at the first centre
    i0 = np.minimum(np.floor(s).astype(int), n_in - 1)                   # (n_out,)
    i1 = np.minimum(i0 + 1, n_in - 1)                                    # (n_out,): the last cell repeats at the edge
    return i0, i1, s - i0                                                # s - i0: the weight of i1


def resample_positions(pos_embed, new_grid):
    """A learned table (1, 1 + G*G, D) -> (1, 1 + G2*G2, D): [CLS] kept, the patch rows bilinear in 2-D."""
    table = np.asarray(pos_embed, dtype=np.float64)
    D = table.shape[2]
    G = int(round((table.shape[1] - 1) ** 0.5))
    grid = table[0, 1:].reshape(G, G, D)                                # (G, G, D): row-major, as the patches
    i0, i1, f = _taps(G, new_grid)
    grid = grid[i0] * (1 - f)[:, None, None] + grid[i1] * f[:, None, None]         # (G2, G, D): along rows
    grid = grid[:, i0] * (1 - f)[None, :, None] + grid[:, i1] * f[None, :, None]   # (G2, G2, D): along columns
    return np.concatenate([table[:, :1], grid.reshape(1, new_grid * new_grid, D)], axis=1)   # (1, 1 + G2*G2, D)
