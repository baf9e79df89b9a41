"""Lesson 9's exercise checkers accept the worked solutions, reject planted wrong answers (each a
mistake a learner is likely to make), refuse an answer that only calls minivit.analysis, and report
a stub that was not attempted."""
from __future__ import annotations

import numpy as np
import pytest

from minivit import analysis
from minivit.exercises import Wrong, lesson09, load_solutions


@pytest.fixture(scope="module")
def solution():
    return load_solutions("09")


def stub(*args, **kwargs):
    raise NotImplementedError


def _grid_distances(G, P):
    row, col = np.divmod(np.arange(G * G), G)
    return row, col, P * np.hypot(row[:, None] - row[None], col[:, None] - col[None])


# ---- 9.1 position similarity

def similarity_dot_product(table, grid_size, prefix_tokens=1):
    """Plain dot products: large-norm rows look similar to everything."""
    t = np.asarray(table, dtype=np.float64)[prefix_tokens:]
    return (t @ t.T).reshape(grid_size, grid_size, grid_size, grid_size)


def similarity_prefix_kept(table, grid_size, prefix_tokens=1):
    """Drops the last rows instead of the [CLS] row: every position is shifted by one."""
    t = np.asarray(table, dtype=np.float64)[:grid_size * grid_size]
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return (t @ t.T).reshape(grid_size, grid_size, grid_size, grid_size)


def similarity_transposed(table, grid_size, prefix_tokens=1):
    """Reads token r * G + c as row c, column r."""
    t = np.asarray(table, dtype=np.float64)[prefix_tokens:]
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    G = grid_size
    return (t @ t.T).reshape(G, G, G, G).transpose(1, 0, 3, 2)


def test_position_similarity(solution, capsys):
    assert lesson09.check_position_similarity(solution.position_similarity) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (similarity_dot_product, similarity_prefix_kept, similarity_transposed):
        with pytest.raises(Wrong):
            lesson09.check_position_similarity(wrong)
    assert lesson09.check_position_similarity(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


def test_position_similarity_names_the_swap():
    with pytest.raises(Wrong, match="swapped"):
        lesson09.check_position_similarity(similarity_transposed)


# ---- 9.2 mean attention distance

def distance_in_patches(attn, grid_size, patch_size, prefix_tokens=1):
    """Right, but in patches: forgets the patch side."""
    _, _, dist = _grid_distances(grid_size, 1)
    a = np.asarray(attn, dtype=np.float64)[:, :, prefix_tokens:, prefix_tokens:]
    a = a / a.sum(-1, keepdims=True)
    return (a * dist).sum(-1).mean(axis=(0, 2))


def distance_not_renormalised(attn, grid_size, patch_size, prefix_tokens=1):
    """Drops the [CLS] column but does not renormalise: the share on [CLS] counts as distance 0."""
    _, _, dist = _grid_distances(grid_size, patch_size)
    a = np.asarray(attn, dtype=np.float64)[:, :, prefix_tokens:, prefix_tokens:]
    return (a * dist).sum(-1).mean(axis=(0, 2))


def distance_manhattan(attn, grid_size, patch_size, prefix_tokens=1):
    """City-block distance between patches instead of the straight line."""
    row, col, _ = _grid_distances(grid_size, patch_size)
    dist = patch_size * (np.abs(row[:, None] - row[None]) + np.abs(col[:, None] - col[None]))
    a = np.asarray(attn, dtype=np.float64)[:, :, prefix_tokens:, prefix_tokens:]
    a = a / a.sum(-1, keepdims=True)
    return (a * dist).sum(-1).mean(axis=(0, 2))


def distance_by_the_library(attn, grid_size, patch_size, prefix_tokens=1):
    return analysis.mean_attention_distance([attn], grid_size, patch_size, prefix_tokens=prefix_tokens)[0]


def test_attention_distance(solution, capsys):
    assert lesson09.check_attention_distance(solution.attention_distance) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (distance_in_patches, distance_not_renormalised, distance_manhattan, distance_by_the_library):
        with pytest.raises(Wrong):
            lesson09.check_attention_distance(wrong)
    assert lesson09.check_attention_distance(stub) is False
    with pytest.raises(Wrong, match="pixels"):
        lesson09.check_attention_distance(distance_in_patches)
    with pytest.raises(Wrong, match="by hand"):
        lesson09.check_attention_distance(distance_by_the_library)
    # the refusal is undone afterwards
    assert analysis.mean_attention_distance([np.full((1, 1, 5, 5), 0.2)], 2, 4).shape == (1, 1)


# ---- 9.3 rollout

def _mean_heads(maps):
    return [np.asarray(m, dtype=np.float64).mean(axis=1) for m in maps]


def rollout_no_identity(maps):
    """Multiplies the attention alone: the residual connection is forgotten."""
    out = None
    for a in _mean_heads(maps):
        out = a if out is None else a @ out
    return out


def rollout_not_renormalised(maps):
    """A + I without halving: rows sum to 2^L."""
    out = None
    for a in _mean_heads(maps):
        a = a + np.eye(a.shape[-1])
        out = a if out is None else a @ out
    return out


def rollout_reversed(maps):
    """The first block on the left: A_1 @ A_2 @ ... @ A_L."""
    out = None
    for a in _mean_heads(maps):
        a = (a + np.eye(a.shape[-1])) / 2
        out = a if out is None else out @ a
    return out


def rollout_max_heads(maps):
    """The heads fused by their maximum (renormalised), not their mean."""
    out = None
    for m in maps:
        a = np.asarray(m, dtype=np.float64).max(axis=1)
        a = a / a.sum(-1, keepdims=True)
        a = (a + np.eye(a.shape[-1])) / 2
        out = a if out is None else a @ out
    return out


def test_rollout(solution, capsys):
    assert lesson09.check_rollout(solution.rollout) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (rollout_no_identity, rollout_not_renormalised, rollout_reversed, rollout_max_heads):
        with pytest.raises(Wrong):
            lesson09.check_rollout(wrong)
    with pytest.raises(Wrong, match="sum to"):
        lesson09.check_rollout(rollout_not_renormalised)
    assert lesson09.check_rollout(stub) is False


def test_checkers_want_a_function():
    with pytest.raises(TypeError):
        lesson09.check_rollout(None)
