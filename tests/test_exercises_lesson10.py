"""Lesson 10's exercise checkers accept the worked solutions, reject planted wrong answers (each a
mistake a learner is likely to make, most named in the message), refuse an answer that only calls
the minivit function it should re-derive, and report a stub that was not attempted."""
from __future__ import annotations

import numpy as np
import pytest

from minivit import analysis, pretrained
from minivit.exercises import Wrong, lesson10, load_solutions


@pytest.fixture(scope="module")
def solution():
    return load_solutions("10")


def stub(*args, **kwargs):
    raise NotImplementedError


def _targets(labels, K):
    t = -np.ones((len(labels), K))
    t[np.arange(len(labels)), labels] = 1.0
    return t


# ---- 10.1 the ridge probe

def probe_zero_one_targets(features, labels, num_classes, l2):
    """One-hot {0, 1} targets: the same classifier, but not the paper's W and b."""
    x = np.asarray(features, dtype=np.float64)
    t = (_targets(labels, num_classes) + 1) / 2
    xm, tm = x.mean(0), t.mean(0)
    w = np.linalg.solve((x - xm).T @ (x - xm) + l2 * np.eye(x.shape[1]), (x - xm).T @ (t - tm))
    return w, tm - xm @ w


def probe_regularised_bias(features, labels, num_classes, l2):
    """A column of ones appended: the bias is shrunk with W."""
    x = np.asarray(features, dtype=np.float64)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    wa = np.linalg.solve(xa.T @ xa + l2 * np.eye(xa.shape[1]), xa.T @ _targets(labels, num_classes))
    return wa[:-1], wa[-1]


def probe_no_l2(features, labels, num_classes, l2):
    """Least squares: l2 forgotten."""
    x = np.asarray(features, dtype=np.float64)
    t = _targets(labels, num_classes)
    xm, tm = x.mean(0), t.mean(0)
    w = np.linalg.lstsq(x - xm, t - tm, rcond=None)[0]
    return w, tm - xm @ w


def probe_not_centred(features, labels, num_classes, l2):
    """Ridge on the raw features, the bias fitted afterwards from the means."""
    x = np.asarray(features, dtype=np.float64)
    t = _targets(labels, num_classes)
    w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ t)
    return w, t.mean(0) - x.mean(0) @ w


def probe_by_calling_minivit(features, labels, num_classes, l2):
    return analysis.fit_linear_probe(features, labels, num_classes, l2)


def test_ridge_probe(solution, capsys):
    assert lesson10.check_ridge_probe(solution.ridge_probe) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (probe_zero_one_targets, probe_regularised_bias, probe_no_l2, probe_not_centred,
                  probe_by_calling_minivit):
        with pytest.raises(Wrong):
            lesson10.check_ridge_probe(wrong)
    assert lesson10.check_ridge_probe(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [(probe_zero_one_targets, "{0, 1}"), (probe_regularised_bias, "regularised"),
                                          (probe_no_l2, "l2 is missing"), (probe_by_calling_minivit, "by hand")])
def test_ridge_probe_names_the_mistake(wrong, words):
    with pytest.raises(Wrong, match=words.replace("{", r"\{").replace("}", r"\}")):
        lesson10.check_ridge_probe(wrong)


def test_zero_one_targets_change_no_prediction(solution):
    """What the lesson's question says: {0, 1} targets halve W and move b alike for every class
    (the bias is free), so every argmax, and the accuracy, is the same."""
    rng = np.random.default_rng(1)
    x, labels = rng.standard_normal((30, 8)) + 3, rng.integers(0, 4, 30)
    w, b = solution.ridge_probe(x, labels, 4, 16.0)
    w01, b01 = probe_zero_one_targets(x, labels, 4, 16.0)
    np.testing.assert_allclose(w01, w / 2, rtol=1e-9)
    np.testing.assert_allclose(b01, (b + 1) / 2, rtol=1e-9)


# ---- 10.2 k images per class

def draw_first_k(labels, shots, seed):
    """The first k of each class: not random."""
    labels = np.asarray(labels)
    return np.concatenate([np.flatnonzero(labels == k)[:shots] for k in range(labels.max() + 1)])


def draw_k_in_all(labels, shots, seed):
    """k images in all, not k per class: the counts are unequal."""
    return np.random.default_rng(seed).permutation(len(labels))[:shots]


def draw_with_replacement(labels, shots, seed):
    """rng.choice with replacement: an image can come twice."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), shots, replace=True)
                           for k in range(labels.max() + 1)])


def draw_global_state(labels, shots, seed):
    """Ignores the seed: np.random's global state, a new draw every call."""
    labels = np.asarray(labels)
    return np.concatenate([np.random.permutation(np.flatnonzero(labels == k))[:shots]
                           for k in range(labels.max() + 1)])


def draw_from_other_split(labels, shots, seed):
    """Indices into a different (larger) array than the labels given: out of range."""
    return np.arange(len(labels), len(labels) + shots * (np.asarray(labels).max() + 1))


def draw_biased(labels, shots, seed):
    """Random, but from the first half of each class only."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = []
    for k in range(labels.max() + 1):
        idx = np.flatnonzero(labels == k)
        half = idx[:max(shots, len(idx) // 2)]
        out.append(rng.permutation(half)[:shots])
    return np.concatenate(out)


def test_draw_shots(solution, capsys):
    assert lesson10.check_draw_shots(solution.draw_shots) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (draw_first_k, draw_k_in_all, draw_with_replacement, draw_global_state, draw_from_other_split,
                  draw_biased):
        with pytest.raises(Wrong):
            lesson10.check_draw_shots(wrong)
    assert lesson10.check_draw_shots(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [(draw_k_in_all, "EACH class"), (draw_with_replacement, "twice"),
                                          (draw_global_state, "default_rng"), (draw_from_other_split, "must lie"),
                                          (draw_first_k, "same draw"), (draw_biased, "equally likely")])
def test_draw_shots_names_the_mistake(wrong, words):
    with pytest.raises(Wrong, match=words):
        lesson10.check_draw_shots(wrong)


# ---- 10.3 positions at a new grid

def positions_align_corners(pos_embed, new_grid):
    """align_corners=True: the old and new grids' corner cells matched."""
    t = np.asarray(pos_embed, dtype=np.float64)
    G, D = int(round((t.shape[1] - 1) ** 0.5)), t.shape[2]
    s = np.linspace(0, G - 1, new_grid)
    i0 = np.minimum(np.floor(s).astype(int), G - 2)
    f = s - i0
    g = t[0, 1:].reshape(G, G, D)
    g = g[i0] * (1 - f)[:, None, None] + g[i0 + 1] * f[:, None, None]
    g = g[:, i0] * (1 - f)[None, :, None] + g[:, i0 + 1] * f[None, :, None]
    return np.concatenate([t[:, :1], g.reshape(1, -1, D)], axis=1)


def positions_cls_interpolated(pos_embed, new_grid):
    """The [CLS] row treated as part of the sequence: interpolated in 1-D with everything else."""
    t = np.asarray(pos_embed, dtype=np.float64)[0]
    n = 1 + new_grid * new_grid
    s = np.linspace(0, len(t) - 1, n)
    return np.stack([np.interp(s, np.arange(len(t)), t[:, d]) for d in range(t.shape[1])], axis=1)[None]


def positions_cls_dropped(pos_embed, new_grid, solution=load_solutions("10")):
    return solution.resample_positions(pos_embed, new_grid)[:, 1:]


def positions_transposed(pos_embed, new_grid, solution=load_solutions("10")):
    """Reshapes the patch rows column-major: rows and columns swapped."""
    t = np.asarray(pos_embed, dtype=np.float64)
    G, D = int(round((t.shape[1] - 1) ** 0.5)), t.shape[2]
    g = t[0, 1:].reshape(G, G, D).transpose(1, 0, 2).reshape(1, G * G, D)
    return solution.resample_positions(np.concatenate([t[:, :1], g], axis=1), new_grid)


def positions_by_calling_minivit(pos_embed, new_grid):
    return pretrained.resample_pos_embed(pos_embed, new_grid)


def test_resample_positions(solution, capsys):
    assert lesson10.check_resample_positions(solution.resample_positions) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (positions_align_corners, positions_cls_interpolated, positions_cls_dropped, positions_transposed,
                  positions_by_calling_minivit):
        with pytest.raises(Wrong):
            lesson10.check_resample_positions(wrong)
    assert lesson10.check_resample_positions(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, words", [(positions_align_corners, "align_corners=True"),
                                          (positions_cls_interpolated, r"\[CLS\]"),
                                          (positions_cls_dropped, "lost"),
                                          (positions_by_calling_minivit, "by hand")])
def test_resample_positions_names_the_mistake(wrong, words):
    with pytest.raises(Wrong, match=words):
        lesson10.check_resample_positions(wrong)
