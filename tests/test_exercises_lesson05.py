"""Lesson 5's exercise checkers accept the worked solutions, reject planted wrong answers and
report a stub that was not attempted."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minivit.exercises import load_solutions, Wrong, lesson05



@pytest.fixture(scope="module")
def solution():
    return load_solutions("05")


def stub(*args, **kwargs):
    raise NotImplementedError


# ---- AdamW

def adamw_l2(p, g, m, v, t, lr, betas, eps, weight_decay):
    """Adam with L2 decay added to the gradient (torch.optim.Adam's weight_decay), not AdamW."""
    beta1, beta2 = betas
    g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def adamw_no_bias_correction(p, g, m, v, t, lr, betas, eps, weight_decay):
    beta1, beta2 = betas
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return p - lr * m / (np.sqrt(v) + eps), m, v


def test_adamw_step(solution, capsys):
    assert lesson05.check_adamw_step(solution.adamw_step) is True
    assert "PASSED" in capsys.readouterr().out
    for wrong in (adamw_l2, adamw_no_bias_correction):
        with pytest.raises(Wrong):
            lesson05.check_adamw_step(wrong)
    assert lesson05.check_adamw_step(stub) is False
    assert "NOT ATTEMPTED" in capsys.readouterr().out


# ---- warmup + cosine

def warmup_off_by_one(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Warmup from 0 (base_lr * step / warmup): step 0 is wasted and base_lr is reached one step late."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps == warmup_steps:
        return base_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_over_all_steps(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Cosine progress counted over all steps, not those after warmup: never reaches min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = step / total_steps
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine(solution):
    assert lesson05.check_warmup_cosine(solution.warmup_cosine_lr) is True
    for wrong in (warmup_off_by_one, cosine_over_all_steps):
        with pytest.raises(Wrong):
            lesson05.check_warmup_cosine(wrong)
    assert lesson05.check_warmup_cosine(stub) is False


# ---- cross-entropy with label smoothing

def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def smoothing_over_other_classes(logits, labels, s):
    """1 - s on the true class and s / (K - 1) on each other one: sums to 1, but is not the target
    of timm, torch (label_smoothing=) or minivit, which spread s / K over all K classes."""
    B, K = logits.shape
    logp = _log_softmax(logits)
    target = np.full((B, K), s / (K - 1))
    target[np.arange(B), labels] = 1 - s
    return -(target * logp).sum() / B, (np.exp(logp) - target) / B


def gradient_without_smoothing(logits, labels, s):
    """The right loss, but the gradient of the plain loss (softmax - onehot)."""
    B, K = logits.shape
    logp = _log_softmax(logits)
    target = np.full((B, K), s / K)
    target[np.arange(B), labels] += 1 - s
    onehot = np.eye(K)[labels]
    return -(target * logp).sum() / B, (np.exp(logp) - onehot) / B


def test_smoothed_cross_entropy(solution):
    assert lesson05.check_smoothed_cross_entropy(solution.smoothed_cross_entropy) is True
    for wrong in (smoothing_over_other_classes, gradient_without_smoothing):
        with pytest.raises(Wrong):
            lesson05.check_smoothed_cross_entropy(wrong)
    assert lesson05.check_smoothed_cross_entropy(stub) is False


# ---- clipping

def clip_each_tensor(grads, max_norm):
    """Each tensor clipped to max_norm on its own: changes the direction, and lets the total exceed it."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6)) for g in grads], total


def clip_always(grads, max_norm):
    """Rescales to max_norm even when the norm is already below it (normalises instead of clipping)."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    return [g * max_norm / total for g in grads], total


def test_clip_by_global_norm(solution):
    assert lesson05.check_clip_by_global_norm(solution.clip_by_global_norm) is True
    for wrong in (clip_each_tensor, clip_always):
        with pytest.raises(Wrong):
            lesson05.check_clip_by_global_norm(wrong)
    assert lesson05.check_clip_by_global_norm(stub) is False


def test_checkers_want_a_function():
    with pytest.raises(TypeError):
        lesson05.check_adamw_step(None)
