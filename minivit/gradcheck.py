"""Numerical gradient checks: is a hand-written backward pass right?

For a function f with output y and a random upstream gradient g, the scalar
L = sum(g * y) has dL/dx = backward(g). Its numerical estimate, one entry at a time, is
the central difference

    dL/dx_i ~ (L(x_i + h) - L(x_i - h)) / (2 h)

whose error shrinks like h^2. In float64 with h = 1e-5 that leaves about 1e-10 of
truncation and rounding error, so a correct backward gives a relative error

    rel_error(a, b) = max|a - b| / max(1e-8, |a| + |b|)    (elementwise, as CS231n)

around 1e-8 or smaller, and a wrong one gives something near 1. The tests demand < 1e-6.
Used by tests/ and by the lessons.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .backend import DEVICES, check_device, get_array_module, to_device, to_numpy

TOLERANCE = 1e-6


def rel_error(a, b) -> float:
    """max over entries of |a - b| / max(1e-8, |a| + |b|)."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def sample_indices(shape, count, rng: np.random.Generator):
    """All flat indices of an array of `shape`, or `count` of them drawn without replacement."""
    size = int(np.prod(shape))
    if count is None or count >= size:
        return np.arange(size)
    return np.sort(rng.choice(size, size=count, replace=False))


def _snapshot(value):
    return value.copy() if hasattr(value, "copy") else value


def numerical_gradient(f: Callable, x, indices=None, h: float = 1e-5, dout=None):
    """Central-difference gradient with respect to array x (changed in place and restored).

    f() returns the scalar loss, or, when `dout` is given, an output array y and the loss
    is sum(dout * y). In that case the difference y(x+h) - y(x-h) is taken before
    summing (as CS231n does): entries that the perturbation does not touch cancel
    exactly instead of adding rounding noise to a large sum.
    With `indices` (flat), only those entries are estimated; the others are NaN.
    """
    if x.dtype != np.float64:
        raise TypeError(f"numerical gradients need float64 for accuracy, got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient needs a C-contiguous array (its flat view must alias it)")
    grad = np.full(x.shape, np.nan)
    flat = x.reshape(-1)           # a view: writing into it changes x
    for i in (range(x.size) if indices is None else indices):
        old = float(flat[i])
        flat[i] = old + h
        up = _snapshot(f())       # a copy: f may return a view of x itself
        flat[i] = old - h
        down = _snapshot(f())
        flat[i] = old
        diff = (up - down) if dout is None else ((up - down) * dout).sum()
        grad.flat[i] = float(diff) / (2 * h)
    return grad


def check_op(forward: Callable, backward: Callable, inputs: dict, wrt, *, seed=0, samples=None, h=1e-5,
             entries: dict | None = None):
    """Gradient check of a pure op: forward(**inputs) -> (out, cache), backward(dout, cache)
    -> one gradient per name in `wrt` (a tuple, in order; a single array if one name).

    Returns {name: rel_error} between analytic and numerical gradients. `samples` limits
    each check to that many randomly chosen entries (large parameters); `entries` gives
    the flat indices to check for some names explicitly.
    """
    rng = np.random.default_rng([seed, 7])   # not default_rng(seed): callers often use that for inputs
    for name, value in inputs.items():
        if hasattr(value, "dtype") and value.dtype.kind == "f" and value.dtype != np.float64:
            raise TypeError(f"check_op: input {name!r} must be float64, got {value.dtype}")
    out, cache = forward(**inputs)
    xp = get_array_module(out)
    dout = xp.asarray(rng.standard_normal(out.shape))
    grads = backward(dout, cache)
    if len(wrt) == 1 and not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) < len(wrt):
        raise ValueError(f"check_op: backward returned {len(grads)} gradients for wrt={wrt}")

    def output():
        return forward(**inputs)[0]

    errors = {}
    for name, analytic in zip(wrt, grads):
        x = inputs[name]
        idx = entries[name] if entries and name in entries else sample_indices(x.shape, samples, rng)
        numeric = numerical_gradient(output, x, idx, h, dout=dout)
        errors[name] = rel_error(to_numpy(analytic).reshape(-1)[idx], numeric.reshape(-1)[idx])
    return errors


def check_model(model, images, labels, *, seed=0, samples=8, names=None, h=1e-5, check_input=True,
                label_smoothing=0.0, mask_seed=None):
    """Gradient check of a whole model with the cross-entropy loss: every parameter tensor
    (or those in `names`), `samples` random entries each, and the input images.

    The model must be float64; images and labels on its device (on a GPU every forward pass
    runs there, in float64, and only the scalar loss comes back). In training mode with dropout or drop-path, pass
    `mask_seed`: the model is reseeded before every forward pass, so every pass draws
    the same masks and the loss is a fixed, differentiable function of the weights.
    Returns {name: rel_error}; the input's key is "images".

    Every weight of a deep model moves the whole loss, whose float64 rounding noise
    (~1e-16 of the loss) is divided by 2h: for a deep model at its small initial
    weights, h = 1e-4 cuts that noise tenfold (the `minivit gradcheck` command uses it);
    for large random weights h = 1e-5 keeps the truncation error (~h^2) lower.
    """
    from .ops import cross_entropy_backward, cross_entropy_forward

    if model.dtype != np.float64:
        raise TypeError(f"check_model needs a float64 model (model.astype(np.float64)), got {model.dtype}")
    rng = np.random.default_rng([seed, 7])

    def forward():
        if mask_seed is not None:
            model.seed(mask_seed)
        return model(images)

    def loss():
        value, _ = cross_entropy_forward(forward(), labels, label_smoothing)
        model.clear_cache()
        return float(value)

    model.zero_grad()
    logits = forward()
    _, ce_cache = cross_entropy_forward(logits, labels, label_smoothing)
    dimages = model.backward(cross_entropy_backward(ce_cache))

    errors = {}
    for name, p in model.named_parameters():
        if names is not None and name not in names:
            continue
        idx = sample_indices(p.shape, samples, rng)
        if name.endswith("attn.qkv.bias"):
            # The key bias (middle third) adds q . b_k to a whole row of scores, which
            # softmax ignores: its true gradient is exactly 0 and a relative error there
            # would only measure rounding noise. Check the q and v biases; tests check
            # that the key bias gradient is 0.
            third = p.shape[0] // 3
            qv = np.r_[0:third, 2 * third:3 * third]
            idx = qv if samples is None or samples >= qv.size else np.sort(rng.choice(qv, samples, replace=False))
        numeric = numerical_gradient(loss, p.data, idx, h)
        errors[name] = rel_error(to_numpy(p.grad).reshape(-1)[idx], numeric.reshape(-1)[idx])
    if check_input:
        idx = sample_indices(images.shape, samples, rng)
        numeric = numerical_gradient(loss, images, idx, h)
        errors["images"] = rel_error(to_numpy(dimages).reshape(-1)[idx], numeric.reshape(-1)[idx])
    return errors


def register(subparsers):
    p = subparsers.add_parser("gradcheck", help="gradient-check a whole ViT in float64 and print each parameter's error")
    p.add_argument("--preset", default="cifar-lesson")
    # Two blocks by default: at initialisation the weights are small (std .02) and in deep
    # stacks some gradient entries fall to ~1e-6, where float64 rounding noise alone
    # reaches a relative error of 1e-6. Two blocks exercise every op and every path.
    p.add_argument("--set", dest="overrides", action="append", default=["depth=2"], metavar="NAME=VALUE",
                   help="override a config field, e.g. --set dim=64 (repeatable; default --set depth=2)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--samples", type=int, default=4, help="entries checked per parameter tensor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (NumPy) or gpu (CuPy): where the float64 passes run (default cpu)")
    p.set_defaults(func=_run)


def _run(args):
    from .config import get_preset
    from .model import ViT
    from .shapes import parse_overrides

    if args.batch_size < 1 or args.samples < 1:
        raise ValueError(f"--batch-size and --samples must be >= 1, got {args.batch_size} and {args.samples}")
    device = check_device(args.device)      # a GPU that cannot be used: gpu_status() says why
    config = get_preset(args.preset, **parse_overrides(args.overrides))
    print(f"{args.preset} with {', '.join(args.overrides)}: {config}" + (" (float64 on the GPU)" if device == "gpu" else ""))
    model = ViT(config, seed=args.seed).astype(np.float64).eval()
    model.to(device)
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.batch_size, config.in_chans, config.img_size, config.img_size))
    labels = rng.integers(0, max(config.num_classes, 1), args.batch_size)
    images, labels = to_device(images, device), to_device(labels, device)
    errors = check_model(model, images, labels, samples=args.samples, seed=args.seed, h=1e-4)
    width = max(map(len, errors))
    for name, err in errors.items():
        print(f"{name:<{width}}  rel_error {err:.2e}  {'ok' if err < TOLERANCE else 'FAIL'}")
    worst = max(errors.values())
    print(f"{len(errors)} tensors checked, {args.samples} entries each; worst rel_error {worst:.2e} "
          f"({'all below' if worst < TOLERANCE else 'ABOVE'} {TOLERANCE:g})")
    return 0 if worst < TOLERANCE else 1
