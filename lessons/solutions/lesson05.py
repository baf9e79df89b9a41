"""Worked solutions to lesson 5's exercises (lessons/05_training.ipynb).

Try the exercises first: the notebook's checkers (minivit.exercises.lesson05) say what is wrong.
Shape legend: B batch, K classes.
"""
import math

import numpy as np


def adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay):
    """One AdamW step for one parameter; returns new (p, m, v). t counts steps from 1."""
    beta1, beta2 = betas
    # Decoupled decay: shrink p itself, before and apart from the gradient step. Added to g
    # instead ("L2"), it would be divided by sqrt(v_hat) below and hardly act where g is large.
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g              # moving average of the gradient
    v = beta2 * v + (1 - beta2) * g * g          # moving average of its square
    # m and v start at 0, so early on they are too small by (1 - beta^t): divide it out.
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def warmup_cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr=0.0):
    """Learning rate at `step` (from 0): linear warmup to base_lr, then cosine down to min_lr."""
    if step < warmup_steps:
        # step 0 gets base_lr / warmup_steps (not 0: a step at lr 0 would be wasted), and the
        # last warmup step, warmup_steps - 1, gets base_lr.
        return base_lr * (step + 1) / warmup_steps
    if total_steps == warmup_steps:              # no steps left to decay over
        return base_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)     # 0 -> 1 over the decay
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def smoothed_cross_entropy(logits, labels, s):
    """Mean cross-entropy with label smoothing s and its gradient. logits (B, K), labels (B,)."""
    B, K = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)                # (B, K), max 0: exp cannot overflow
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)) # (B, K) log-softmax
    # The smoothed target: s / K on every class, plus 1 - s on the true one (rows sum to 1).
    target = np.full((B, K), s / K)                                     # (B, K)
    target[np.arange(B), labels] += 1 - s
    loss = -(target * logp).sum() / B
    # d/dlogits of -sum(target * log_softmax) is softmax - target (each row of target sums to 1);
    # the mean over the batch divides by B.
    dlogits = (np.exp(logp) - target) / B                               # (B, K)
    return loss, dlogits


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by one factor so that their global norm is at most max_norm."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))         # one norm over every tensor
    factor = max_norm / (total + 1e-6)                                  # torch's + 1e-6 avoids 0 / 0
    if factor < 1:
        grads = [g * factor for g in grads]     # one factor for all: the update keeps its direction
    return grads, total
