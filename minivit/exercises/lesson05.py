"""Checkers for lesson 5 (training a ViT: the recipe): one AdamW step, the warmup + cosine schedule,
cross-entropy with label smoothing, and clipping by the global gradient norm.

Each checker compares the learner's function with minivit's own (`minivit.optim.AdamW`,
`warmup_cosine`, `clip_grad_norm`, `minivit.ops.cross_entropy_forward/backward`) in float64, on
several inputs chosen so that the usual mistakes show: L2-style decay and a missing bias correction
(AdamW), an off-by-one warmup, s / (K - 1) smoothing, clipping each tensor on its own.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..modules import Parameter
from ..optim import AdamW, clip_grad_norm, warmup_cosine
from . import Wrong, exercise, expect_close


@exercise("one AdamW step (decoupled weight decay, bias correction)")
def check_adamw_step(adamw_step):
    """adamw_step(p, g, m, v, t, lr, betas, eps, weight_decay) -> (p, m, v), new arrays, run for
    several steps from m = v = 0 (t = 1, 2, ...) beside minivit's AdamW on the same gradients."""
    rng = np.random.default_rng(5)
    cases = [((3, 4), 0.1, (0.9, 0.999), 1e-2), ((1,), 0.0, (0.9, 0.999), 5e-3),
             ((2, 3, 5), 0.05, (0.8, 0.99), 3e-2), ((6,), 0.3, (0.95, 0.98), 1e-2)]
    steps = 6
    for shape, wd, betas, lr0 in cases:
        p0 = rng.standard_normal(shape)
        reference = Parameter(p0.copy())
        opt = AdamW([reference], lr=lr0, betas=betas, eps=1e-8, weight_decay=wd)
        p, m, v = p0.copy(), np.zeros(shape), np.zeros(shape)
        for t in range(1, steps + 1):
            lr = lr0 * (1 + 0.5 * np.sin(t))              # a learning rate that changes, as under a schedule
            # gradients of very different sizes per entry: Adam's per-entry scaling must be right
            g = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape))
            opt.lr = lr
            reference.grad = g.copy()
            opt.step()
            g_given = g.copy()
            out = adamw_step(p, g_given, m, v, t, lr, betas, 1e-8, wd)
            if not (isinstance(out, tuple) and len(out) == 3):
                raise Wrong(f"adamw_step must return a tuple (p, m, v), got {type(out).__name__}")
            p, m, v = (np.asarray(a, dtype=np.float64) for a in out)
            if not np.array_equal(g_given, g):
                raise Wrong("adamw_step changed the gradient g it was given; leave g as it is")
            where = f"shape {shape}, weight_decay {wd}, betas {betas}, step t={t}"
            state = opt.state[0]
            try:
                expect_close(f"m after {where}", m, state["exp_avg"], rtol=1e-10)
                expect_close(f"v after {where}", v, state["exp_avg_sq"], rtol=1e-10)
            except Wrong as wrong:
                raise Wrong(f"{wrong}. m and v average the gradient g itself and its square (the decay "
                            f"does not enter them): m <- beta1 * m + (1 - beta1) * g, "
                            f"v <- beta2 * v + (1 - beta2) * g^2.") from None
            try:
                expect_close(f"p after {where}", p, reference.data, rtol=1e-10, atol=1e-13)
            except Wrong as wrong:
                raise Wrong(f"{wrong}. Check the decay (p <- p * (1 - lr * wd), applied to p, not added "
                            f"to g) and the bias correction (m / (1 - beta1^t), v / (1 - beta2^t)).") from None
    return f"{len(cases)} parameters x {steps} steps, with and without weight decay: equal to minivit.optim.AdamW"


@exercise("the warmup + cosine learning-rate schedule")
def check_warmup_cosine(warmup_cosine_lr):
    """warmup_cosine_lr(step, total_steps, warmup_steps, base_lr, min_lr) at every step 0..total,
    for several schedules, beside minivit.optim.warmup_cosine."""
    cases = [(100, 10, 1e-3, 0.0), (15640, 1564, 1e-3, 0.0), (50, 0, 0.1, 0.0), (7, 7, 0.5, 0.0),
             (1, 1, 2.0, 0.0), (40, 3, 1e-3, 1e-5), (13, 1, 3e-4, 1e-4)]
    checked = 0
    for total, warmup, base, low in cases:
        for step in range(total + 1):
            want = warmup_cosine(step, total, warmup, base, low)
            got = warmup_cosine_lr(step, total, warmup, base, low)
            try:
                got = float(got)
            except (TypeError, ValueError):
                raise Wrong(f"warmup_cosine_lr must return a number, got {type(got).__name__}") from None
            if not np.isclose(got, want, rtol=1e-9, atol=1e-15):
                if step < warmup:
                    hint = ("warmup: steps are counted from 0; the first warmup step is base_lr / warmup_steps "
                            "(small, not 0) and the last one, warmup_steps - 1, reaches base_lr")
                else:
                    hint = ("cosine decay: progress = (step - warmup_steps) / (total_steps - warmup_steps) goes "
                            "from 0 at the first step after warmup (base_lr) to 1 at total_steps (min_lr)")
                raise Wrong(f"total_steps={total}, warmup_steps={warmup}, base_lr={base}, min_lr={low}: at step "
                            f"{step} expected {want:.6g}, got {got:.6g}. In the {hint}.")
            checked += 1
    return f"{checked} steps of {len(cases)} schedules (no warmup, all warmup, min_lr > 0 included): equal"


@exercise("cross-entropy with label smoothing: loss and gradient")
def check_smoothed_cross_entropy(smoothed_cross_entropy):
    """smoothed_cross_entropy(logits, labels, s) -> (loss, dlogits) against ops.cross_entropy_forward
    and ops.cross_entropy_backward, in float64, for several batch sizes, class counts and s."""
    rng = np.random.default_rng(7)
    cases = [(8, 10, 0.1), (1, 2, 0.2), (5, 3, 0.0), (4, 7, 0.3), (16, 10, 0.1)]
    for B, K, s in cases:
        logits = rng.standard_normal((B, K)) * 3
        labels = rng.integers(0, K, B)
        want_loss, cache = ops.cross_entropy_forward(logits, labels, label_smoothing=s)
        want_grad = ops.cross_entropy_backward(cache)
        out = smoothed_cross_entropy(logits.copy(), labels.copy(), s)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Wrong(f"smoothed_cross_entropy must return a tuple (loss, dlogits), got {type(out).__name__}")
        loss, dlogits = out
        try:
            loss = float(loss)
        except (TypeError, ValueError):
            raise Wrong(f"the loss must be a number (the mean over the batch), got {type(loss).__name__}") from None
        where = f"B={B}, K={K}, s={s}"
        if not np.isclose(loss, float(want_loss), rtol=1e-10, atol=1e-12):
            raise Wrong(f"loss for {where}: expected {float(want_loss):.10g}, got {loss:.10g}. The target is "
                        f"(1 - s) * onehot + s / K on every class (the true one too), and the loss is the mean "
                        f"over the batch of -sum(target * log_softmax(logits)).")
        expect_close(f"dlogits for {where}", dlogits, want_grad, rtol=1e-9, atol=1e-12)
    return f"{len(cases)} cases (B from 1 to 16, K from 2 to 10, s from 0 to 0.3): loss and gradient equal to minivit.ops"


@exercise("clipping by the global gradient norm")
def check_clip_by_global_norm(clip_by_global_norm):
    """clip_by_global_norm(grads, max_norm) -> (clipped, total_norm), against minivit.optim.clip_grad_norm
    on gradients whose global norm is below, at and above max_norm, including a case where every tensor
    alone is below max_norm but all of them together are above it."""
    rng = np.random.default_rng(11)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    cases = [(0.1, 1.0), (0.25, 1.0), (4.0, 1.0), (0.9, 2.0)]    # (scale of each entry, max_norm)
    for scale, max_norm in cases:
        grads = [rng.standard_normal(s) * scale for s in shapes]
        params = [Parameter(np.zeros(s)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.copy()
        want_norm = clip_grad_norm(params, max_norm)
        out = clip_by_global_norm([g.copy() for g in grads], max_norm)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Wrong(f"clip_by_global_norm must return a tuple (clipped gradients, total norm), "
                        f"got {type(out).__name__}")
        clipped, total = out
        if len(clipped) != len(grads):
            raise Wrong(f"expected {len(grads)} clipped gradients, got {len(clipped)}")
        each = [float(np.linalg.norm(g)) for g in grads]
        where = (f"max_norm {max_norm}, tensors of norms {', '.join(f'{n:.2f}' for n in each)} "
                 f"(global norm {want_norm:.2f})")
        if not np.isclose(float(total), want_norm, rtol=1e-9):
            raise Wrong(f"{where}: the total norm returned is {float(total):.6g}, expected {want_norm:.6g} "
                        f"= sqrt(sum over all tensors of sum(g^2)), before clipping")
        for k, (got, p) in enumerate(zip(clipped, params)):
            # rtol 1e-5 accepts max_norm / total with or without torch's + 1e-6 in the denominator
            try:
                expect_close(f"gradient {k} of shape {shapes[k]}", got, p.grad, rtol=1e-5, atol=1e-12)
            except Wrong as wrong:
                raise Wrong(f"{where}: {wrong}. All tensors are scaled by one factor, "
                            f"max_norm / global norm, and only when the global norm is above max_norm.") from None
    return f"{len(cases)} cases (global norm below and above max_norm): equal to minivit.optim.clip_grad_norm"
