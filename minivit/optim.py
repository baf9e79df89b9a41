"""Optimisers, a learning-rate schedule and gradient clipping, written out by hand.

Each optimiser reproduces its PyTorch namesake exactly (tests/test_optim.py compares
them step by step in float64). With g the gradient, p the parameter, lr the learning
rate, wd the weight decay and t the step count of that parameter (starting at 1):

SGD (torch.optim.SGD, dampening 0)
    g <- g + wd * p                      weight decay is added to the gradient ("L2")
    b <- g                  at t = 1     the momentum buffer starts at the first gradient
    b <- mu * b + g         at t > 1
    d <- g + mu * b  (Nesterov)  or  d <- b  (classic momentum)  or  d <- g  (mu = 0)
    p <- p - lr * d

AdamW (torch.optim.AdamW, Loshchilov & Hutter 2019)
    p <- p * (1 - lr * wd)               decoupled decay: shrink the weights directly
    m <- beta1 * m + (1 - beta1) * g     moving average of the gradient
    v <- beta2 * v + (1 - beta2) * g^2   moving average of its square
    m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)     bias correction
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)

Weight decay is normally kept off biases, LayerNorm and BatchNorm parameters, `pos_embed`
and `cls_token` (`param_groups` below). Parameters whose `.grad` is None are skipped: they
are neither moved nor decayed, and their state (step count, moving averages) waits.

State arrays live on the parameter's device (NumPy or CuPy) and have its dtype: they follow the
parameter when the model moves (`model.to("gpu")` or `.astype(...)` between steps), at the next
step(), or at once with `optimizer.to(device)`. The
hyperparameters are kept as Python floats, because with NumPy 2 an np.float64 scalar
would silently turn a float32 update into float64.

Flat buffers: an optimiser packs its parameters into one FlatBuffer per dtype and device
(minivit.modules), in its own order, so each parameter group is one contiguous range. When every
parameter of a buffer has its gradient in place (a backward pass puts it there) and all share one
state (AdamW: the same step count), step() updates the whole buffer at once (`_update_flat`: a
dozen array operations per step instead of a dozen per parameter; on the CPU per piece of 64K
entries, see FLAT_PIECE); the state arrays are flat too, and each parameter's state holds views
into them. Otherwise (a parameter without a gradient, a gradient assigned by hand) it takes the
clear per-parameter path (`_update`), which is the reference: both compute the same numbers, bit
for bit, as they run the same elementwise operations in the same order (tests/test_flat_params.py).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .backend import check_device, device_of, get_array_module, is_array, to_device, to_numpy
from .modules import FlatBuffer, Module, Parameter, flat_gradients

# Never decayed, whatever their shape (timm's ViT.no_weight_decay(); BEiT's adds the relative
# position tables): positions and the [CLS] token are lookups, not maps of the input, and
# shrinking them only erases what they encode.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "pos_embed_row", "pos_embed_col", "pos_embed_cls",
                  "relative_position_bias_table")


def _check_number(name, value, low=0.0, high=math.inf, high_open=False):
    """value as a Python float, or a ValueError/TypeError that names it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)   # a Python float: keeps float32 arithmetic in float32
    if not (low <= value <= high) or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
    return value


def _check_int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def param_groups(model: Module, weight_decay: float, no_decay_names=NO_DECAY_NAMES) -> list[dict]:
    """Split a model's parameters into a decayed and a non-decayed group, by name.

    Decayed: weight matrices, the patch-embedding kernel and convolution kernels (2-D and up).
    Not decayed: every 1-D parameter (biases, LayerNorm and BatchNorm scale and shift), any
    `*.bias`, and the names
    in `no_decay_names` (position embeddings and tables, `cls_token`). Shrinking a LayerNorm scale or a bias
    towards 0 does not make the model simpler, it only fights the fit.

    Returns [{"params": decayed, "weight_decay": weight_decay},
             {"params": others, "weight_decay": 0.0}], leaving out an empty group.
    """
    if not isinstance(model, Module):
        raise TypeError(f"param_groups expects a minivit Module, got {type(model).__name__}")
    weight_decay = _check_number("weight_decay", weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        if p.data.ndim <= 1 or last == "bias" or last in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Optimizer:
    """What SGD and AdamW share: parameter groups, `lr`, `step()`, checkpoints.

    `params` is a list of Parameters, or a list of groups {"params": [...], "weight_decay": wd}
    (a group without "weight_decay" uses the optimiser's). `lr` is one number for all
    groups and may be set between steps: `opt.lr = warmup_cosine(...)`.

    Building an optimiser packs its parameters into flat buffers (see the module docstring): each
    p.data becomes a view into one, with the same values. Keep the Parameters, not their arrays: an
    array taken from p.data before is no longer the one that step() updates.

    Subclasses name their per-parameter state in `state_names` and write `_update` (the reference),
    and `_begin_flat` and `_update_flat` (the same update over a flat buffer).
    """

    state_names: tuple[str, ...] = ()

    def __init__(self, params, lr, weight_decay):
        self.lr = lr
        weight_decay = _check_number("weight_decay", weight_decay)
        if isinstance(params, (Module, Parameter)):
            raise TypeError(
                f"{type(self).__name__} expects a list of Parameters or of parameter groups, got a "
                f"{type(params).__name__}; pass model.parameters() or param_groups(model, weight_decay)"
            )
        params = list(params)
        if params and all(isinstance(g, dict) for g in params):
            groups = params
        elif all(isinstance(p, Parameter) for p in params):
            groups = [{"params": params}]
        else:
            kinds = sorted({type(p).__name__ for p in params})
            raise TypeError(f"params must be all Parameters or all group dicts, got {kinds}")

        self.param_groups = []
        self.params, self.weight_decays = [], []   # flat, in group order: index i names a parameter
        for k, group in enumerate(groups):
            unknown = set(group) - {"params", "weight_decay"}
            if unknown:
                raise ValueError(f"parameter group {k} has unknown keys {sorted(unknown)}; "
                                 "allowed: 'params', 'weight_decay'")
            if "params" not in group:
                raise ValueError(f"parameter group {k} has no 'params' key")
            group_params = list(group["params"])
            for p in group_params:
                if not isinstance(p, Parameter):
                    raise TypeError(f"parameter group {k} holds a {type(p).__name__}, not a Parameter")
            wd = _check_number(f"weight_decay of group {k}", group.get("weight_decay", weight_decay))
            self.param_groups.append({"params": group_params, "weight_decay": wd})
            self.params += group_params
            self.weight_decays += [wd] * len(group_params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("some parameters appear more than once (in one group or in two)")
        self.state = [{} for _ in self.params]   # state[i] belongs to self.params[i]
        self._buckets = self._pack()

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_number("lr", value)

    def step(self):
        """Update every parameter that has a gradient, in place."""
        if not all(bucket.flat.intact() for bucket in self._buckets):
            self._buckets = self._pack()      # a .data was replaced (p.data = ...): views again, one copy each
        for bucket in self._buckets:
            if self._flat_step_possible(bucket):
                self._step_flat(bucket)
                continue
            for i in bucket.indices:          # the clear way, one parameter at a time
                p, state = self.params[i], self.state[i]
                if p.grad is None:   # unused this step, or frozen: leave it and its state alone
                    continue
                if p.grad.shape != p.data.shape:
                    raise ValueError(f"gradient shape {p.grad.shape} does not match parameter shape {p.data.shape}")
                _follow(state, p.data)
                self._update(p, p.grad, state, self.weight_decays[i])

    # ------------------------------------------------------------------ flat buffers
    def _pack(self):
        """One FlatBuffer per dtype and device, the parameters in this optimiser's order, so each
        group is a contiguous range of it (and weight decay a few slices)."""
        keys = {}
        for i, p in enumerate(self.params):
            keys.setdefault((device_of(p.data), p.data.dtype), []).append(i)
        buckets = []
        for indices in keys.values():
            flat = FlatBuffer([self.params[i] for i in indices])
            ranges = []                       # (lo, hi, weight decay) over runs of neighbours that share one
            for k, i in enumerate(indices):
                lo, hi, wd = flat.offsets[k], flat.offsets[k + 1], self.weight_decays[i]
                if ranges and ranges[-1][2] == wd:
                    ranges[-1] = (ranges[-1][0], hi, wd)
                else:
                    ranges.append((lo, hi, wd))
            buckets.append(_Bucket(flat, indices, ranges))
        return buckets

    def _flat_step_possible(self, bucket) -> bool:
        """Every parameter's gradient in place in the buffer, and one state for all (each fresh, or
        each with the same names and step count)."""
        if not bucket.flat.grads_in_place():
            return False
        first = self.state[bucket.indices[0]]
        kind = (first.keys(), first.get("step"))
        return all((self.state[i].keys(), self.state[i].get("step")) == kind for i in bucket.indices)

    def _step_flat(self, bucket):
        """The update of every parameter in the bucket at once: its state gathered into flat
        arrays, then _update_flat piece by piece over the flat arrays, then each parameter's
        state handed back as views into them."""
        flat, indices = bucket.flat, bucket.indices
        first = self.state[indices[0]]
        state = {name: (bucket.gather(name, [self.state[i][name] for i in indices]) if is_array(value) else value)
                 for name, value in first.items()}
        fresh = self._begin_flat(state, flat.data)
        for a, b, ranges in _pieces(flat.data, bucket.ranges):
            piece = {name: value[a:b] if is_array(value) else value for name, value in state.items()}
            self._update_flat(flat.data[a:b], flat.grad[a:b], piece, ranges, fresh)
        for name, value in state.items():
            if is_array(value):
                for i, view in zip(indices, bucket.scatter(name, value)):
                    self.state[i][name] = view
            else:
                for i in indices:
                    self.state[i][name] = value

    def _begin_flat(self, state, data) -> bool:
        """Before the pieces: make fresh flat state arrays like data (n,), count the step. Returns
        True when the state was fresh (this is the parameters' first step)."""
        raise NotImplementedError

    def _update_flat(self, data, grad, state, ranges, fresh):
        """_update over a piece of the flat buffer: the same operations in the same order, so the
        same numbers. ranges: [(lo, hi, wd)], the piece's slices with weight decay wd != 0."""
        raise NotImplementedError

    def to(self, device: str):
        """Move every state array to 'cpu' or 'gpu' now (step() also moves each parameter's state
        to wherever that parameter is, so this is only needed to free memory or to save early)."""
        check_device(device)
        for bucket in self._buckets:           # flat state: one transfer per array, views handed out again
            for name, flat in list(bucket.state.items()):
                old_views = bucket.views[name]
                for i, old, new in zip(bucket.indices, old_views, bucket.scatter(name, to_device(flat, device))):
                    if self.state[i].get(name) is old:
                        self.state[i][name] = new
        for state in self.state:               # anything else
            for name, value in state.items():
                if is_array(value):
                    state[name] = to_device(value, device)
        return self

    def _update(self, p, g, state, weight_decay):
        raise NotImplementedError

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """A flat dict: JSON-able scalars plus NumPy arrays (copies), keyed "<state>.<index>".

        {"optimizer": "AdamW", "lr": 0.001, "group_sizes": [24, 52],
         "step.0": 3, "exp_avg.0": array, "exp_avg_sq.0": array, ...}

        Index i is the i-th parameter in the optimiser's own order (groups one after the
        other), so build the optimiser the same way before loading. A parameter that never
        had a gradient has no entries. Save the arrays with np.savez, the rest as JSON.
        """
        out = {
            "optimizer": type(self).__name__,
            "lr": self.lr,
            "group_sizes": [len(g["params"]) for g in self.param_groups],
        }
        for i, state in enumerate(self.state):
            for name, value in state.items():
                # copy, so that later steps cannot change a state that was already taken
                out[f"{name}.{i}"] = np.array(to_numpy(value)) if is_array(value) else value
        return out

    def load_state_dict(self, state: dict):
        """Restore lr and every parameter's state. Everything is checked first (optimiser
        type, parameter counts, keys, shapes), so a failed load changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects a dict, got {type(state).__name__}")
        name = type(self).__name__
        if state.get("optimizer") != name:
            raise ValueError(f"state is for optimizer {state.get('optimizer')!r}, not {name!r}")
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [int(n) for n in state.get("group_sizes", [])]
        if saved_sizes != sizes:
            raise ValueError(f"state has parameter groups of sizes {saved_sizes} ({sum(saved_sizes)} parameters), "
                             f"this optimizer has {sizes} ({sum(sizes)} parameters)")
        lr = _check_number("lr", state.get("lr"))

        staged = [{} for _ in self.params]
        for key, value in state.items():
            if key in ("optimizer", "lr", "group_sizes"):
                continue
            what, _, index = key.rpartition(".")
            if what not in self.state_names or not index.isdigit() or int(index) >= len(self.params):
                raise ValueError(f"unexpected key {key!r} in {name} state "
                                 f"(expected <name>.<index> with name in {self.state_names}, "
                                 f"index < {len(self.params)})")
            i = int(index)
            p = self.params[i]
            if what == "step":
                staged[i][what] = _check_int(key, value, low=1)
            else:
                if not hasattr(value, "shape") or tuple(value.shape) != tuple(p.data.shape):
                    shape = getattr(value, "shape", type(value).__name__)
                    raise ValueError(f"{key}: saved shape {shape} does not match parameter shape {p.data.shape}")
                staged[i][what] = value
        for i, st in enumerate(staged):
            if st and set(st) != set(self.state_names):
                raise ValueError(f"state of parameter {i} is incomplete: has {sorted(st)}, "
                                 f"needs {list(self.state_names)}")

        self.lr = lr
        for i, st in enumerate(staged):
            p = self.params[i]
            xp = get_array_module(p.data)
            new = {}
            for what, value in st.items():
                if what == "step":
                    new[what] = value
                else:   # a fresh array on the parameter's device, in its dtype (saved on either device);
                        # the next flat step copies it into the flat state
                    new[what] = xp.zeros_like(p.data)
                    new[what][...] = to_device(value if is_array(value) else np.asarray(value), device_of(p.data))
            self.state[i] = new


# Elements per piece of a flat update on the CPU. A dozen passes over a whole buffer of ~2M
# float32 (8 MB per array) go to memory and back each time; over pieces of 64K (256 KB per array)
# they stay in the core's cache, which makes the flat update as fast as one parameter at a time
# (the pieces are few: ~30 for the recipe). On a GPU the whole buffer is one piece: there each
# array operation is a kernel launch, and few launches are the point.
FLAT_PIECE = 1 << 16


def _pieces(data, ranges):
    """(a, b, decayed) for each piece [a, b) of a flat array: decayed holds the weight-decay
    ranges [(lo, hi, wd)] with wd != 0 that overlap the piece, cut to it and counted from a."""
    n = int(data.size)
    size = FLAT_PIECE if get_array_module(data) is np else max(n, 1)
    for a in range(0, n, size):
        b = min(a + size, n)
        yield a, b, [(max(lo, a) - a, min(hi, b) - a, wd) for lo, hi, wd in ranges if wd != 0 and lo < b and hi > a]


class _Bucket:
    """An optimiser's view of one FlatBuffer: which of its parameters it holds (indices into
    optimizer.params, in order), the weight decay of each range of it ([(lo, hi, wd)]), and the
    state over the whole buffer ({name: (n,) array}) with each parameter's view into it."""

    def __init__(self, flat, indices, ranges):
        self.flat, self.indices, self.ranges = flat, indices, ranges
        self.state, self.views = {}, {}

    def scatter(self, name, array):
        """Make array (n,) the flat state `name`; returns each parameter's view into it."""
        if self.state.get(name) is not array:
            self.state[name] = array
            self.views[name] = [array[lo:hi].reshape(p.data.shape) for p, lo, hi in self.flat._spans()]
        return self.views[name]

    def gather(self, name, arrays):
        """The flat state `name` holding these per-parameter arrays, on the buffer's device and in its
        dtype. Views into it pass through; other arrays (loaded from a checkpoint, left by
        the per-parameter path) are copied into their places; a flat state left on another device or
        dtype by a move of the model is moved or cast as one array."""
        data, flat = self.flat.data, self.state.get(name)
        device = device_of(data)
        if flat is not None and (device_of(flat) != device or flat.dtype != data.dtype):
            if all(a is v for a, v in zip(arrays, self.views[name])):
                flat = to_device(flat, device).astype(data.dtype, copy=False)
                self.scatter(name, flat)
                return flat
            flat = None
        if flat is None:
            flat = get_array_module(data).zeros_like(data)
            self.scatter(name, flat)
        for view, a in zip(self.views[name], arrays):
            if a is not view:
                view[...] = to_device(a, device)
        return flat


def _follow(state, data):
    """Move a parameter's state arrays to its device and dtype, where the model has moved since
    they were made (Module.to / astype know nothing of the optimiser). Two isinstance checks per
    array when nothing moved."""
    device = device_of(data)
    for name, value in state.items():
        if is_array(value):
            if device_of(value) != device:
                value = to_device(value, device)
            if value.dtype != data.dtype:
                value = value.astype(data.dtype)
            state[name] = value


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD."""

    state_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(params, lr, weight_decay)
        self.momentum = _check_number("momentum", momentum)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        if self.momentum == 0:
            self.state_names = ()   # plain SGD keeps no state

    def _update(self, p, g, state, weight_decay):
        xp = get_array_module(p.data)
        # L2 weight decay is the gradient of wd/2 * |p|^2, added to g (a new array:
        # p.grad itself is left as the backward pass wrote it).
        if weight_decay != 0:
            g = g + weight_decay * p.data
        if self.momentum != 0:
            if "momentum_buffer" not in state:
                # torch starts the buffer at the first gradient (not at 0), so the first
                # step is a plain SGD step rather than one (1 - mu) times too small.
                buf = xp.zeros_like(p.data)
                buf[...] = g
                state["momentum_buffer"] = buf
            else:
                buf = state["momentum_buffer"]
                buf *= self.momentum   # b <- mu * b + g, in place
                buf += g
            # Nesterov looks ahead: step along g plus the momentum that will follow.
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g

    def _begin_flat(self, state, data):
        if self.momentum != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = get_array_module(data).empty_like(data)   # filled with g below
            return True
        return False

    def _update_flat(self, data, grad, state, ranges, fresh):
        # _update, line for line, with weight decay on the ranges that have it
        g = grad
        if ranges:
            g = grad.copy()                   # p.grad stays as the backward pass wrote it
            for lo, hi, wd in ranges:
                g[lo:hi] += wd * data[lo:hi]
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if fresh:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        data -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay, as torch.optim.AdamW."""

    state_names = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_check_number("beta1", betas[0], 0.0, 1.0, high_open=True),
                      _check_number("beta2", betas[1], 0.0, 1.0, high_open=True))
        self.eps = _check_number("eps", eps)

    def _update(self, p, g, state, weight_decay):
        xp = get_array_module(p.data)
        beta1, beta2 = self.betas
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1   # per parameter: one skipped while its grad was None lags behind
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]

        # Decoupled weight decay: shrink p itself. Added to g (as in SGD) it would be
        # divided by sqrt(v) below, so weights with large gradients would hardly decay.
        if weight_decay != 0:
            p.data *= 1 - self.lr * weight_decay

        m *= beta1                   # m <- beta1 * m + (1 - beta1) * g, in place
        m += (1 - beta1) * g
        v *= beta2                   # v <- beta2 * v + (1 - beta2) * g^2, in place
        v += (1 - beta2) * (g * g)

        # m and v start at 0, so after t steps they are too small by a factor
        # (1 - beta^t); dividing it out makes the first steps the right size.
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        step = xp.sqrt(v)                            # one scratch array, reused:
        step /= math.sqrt(bias_correction2)          #   sqrt(v_hat)
        step += self.eps                             #   sqrt(v_hat) + eps
        xp.divide(m, step, out=step)                 #   m / (sqrt(v_hat) + eps)
        step *= self.lr / bias_correction1           #   lr * m_hat / (sqrt(v_hat) + eps)
        p.data -= step

    def _begin_flat(self, state, data):
        fresh = not state
        if fresh:
            xp = get_array_module(data)
            state.update(step=0, exp_avg=xp.zeros_like(data), exp_avg_sq=xp.zeros_like(data))
        state["step"] += 1
        return fresh

    def _update_flat(self, data, grad, state, ranges, fresh):
        # _update, line for line, with weight decay on the ranges that have it
        xp = get_array_module(data)
        beta1, beta2 = self.betas
        t, g = state["step"], grad
        m, v = state["exp_avg"], state["exp_avg_sq"]
        for lo, hi, wd in ranges:
            data[lo:hi] *= 1 - self.lr * wd
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * (g * g)
        step = xp.sqrt(v)
        step /= math.sqrt(1 - beta2 ** t)
        step += self.eps
        xp.divide(m, step, out=step)
        step *= self.lr / (1 - beta1 ** t)
        data -= step


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate at `step` (0-based): linear warmup, then cosine decay.

    Steps 0 .. warmup_steps-1 rise linearly, base_lr * (step + 1) / warmup_steps, so the
    first step is small but not zero and the last warmup step reaches base_lr. Then
        lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * progress)) / 2,
        progress = (step - warmup_steps) / (total_steps - warmup_steps),
    which is base_lr at step == warmup_steps and min_lr at step == total_steps.
    Warmup keeps Adam's first, noisy steps small while its averages settle.
    """
    total_steps = _check_int("total_steps", total_steps, low=1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, low=0)
    step = _check_int("step", step, low=0)
    base_lr = _check_number("base_lr", base_lr)
    min_lr = _check_number("min_lr", min_lr)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if step > total_steps:
        raise ValueError(f"step ({step}) is past total_steps ({total_steps})")
    if min_lr > base_lr:
        raise ValueError(f"min_lr ({min_lr}) must not exceed base_lr ({base_lr})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if total_steps == warmup_steps:   # all warmup, no room left to decay
        return base_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step(step: int, total_steps: int, warmup_steps: int, base_lr: float, milestones, gamma: float = 0.1) -> float:
    """The learning rate at `step` (0-based): linear warmup, then a step decay.

    He et al.'s ResNet schedule (§4.2: lr 0.1, divided by 10 at 32k and 48k of 64k iterations):
        lr = base_lr * w * gamma ** (the number of milestones <= step),
    with the warmup factor w = (step + 1) / warmup_steps during the first warmup_steps steps (as
    warmup_cosine) and 1 after. `milestones` are step numbers in [1, total_steps], in order: each
    is the first step that runs at the lower rate (two equal ones divide by gamma twice there, as
    the fractions of a very short run may round to the same step).
    """
    total_steps = _check_int("total_steps", total_steps, low=1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, low=0)
    step = _check_int("step", step, low=0)
    base_lr = _check_number("base_lr", base_lr)
    gamma = _check_number("gamma", gamma, 0.0, 1.0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if step > total_steps:
        raise ValueError(f"step ({step}) is past total_steps ({total_steps})")
    milestones = list(milestones)
    for m in milestones:
        _check_int("a milestone", m, low=1)
    if any(not 1 <= m <= total_steps for m in milestones) or milestones != sorted(milestones):
        raise ValueError(f"milestones must be step numbers in [1, {total_steps}] in increasing order, got {milestones}")
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    return base_lr * warm * gamma ** sum(m <= step for m in milestones)


def clip_grad_norm(params, max_norm: float, *, sync: bool = True):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    As torch.nn.utils.clip_grad_norm_: total = sqrt(sum over parameters of |g|^2), and
    every gradient is multiplied by max_norm / (total + 1e-6) when that is below 1.
    Scaling all of them by one factor keeps the direction of the update. Parameters
    without a gradient are skipped. Returns the norm before clipping, as a float (a
    non-finite value is returned as is, so the training loop can notice it).

    Gradients in a flat buffer (an optimiser packs its parameters, and a backward pass writes
    their gradients in place: modules.FlatBuffer) are summed and scaled as that one array, the
    others one by one; the norm is the same but for float rounding (the squares are added in
    another order).

    sync=False leaves the norm on the device: a 0-d float64 array (a float on the CPU, where
    reading it costs nothing), and the gradients are scaled by min(1, factor) there, so the host
    does not wait for the GPU; float() it later (the training loop checks it every few steps).
    The gradients come out the same as with sync=True (a factor of 1 changes nothing), unless
    the norm is NaN: then they are NaN too, which they already were in part.
    """
    max_norm = _check_number("max_norm", max_norm)
    if max_norm == 0 or math.isinf(max_norm):
        raise ValueError(f"max_norm must be positive and finite, got {max_norm!r}")
    if isinstance(params, Parameter):
        params = [params]
    params = list(params)
    for p in params:
        if not isinstance(p, Parameter):
            raise TypeError(f"clip_grad_norm expects Parameters, got a {type(p).__name__}")
    flat, rest = flat_gradients(params)
    grads = flat + rest
    if not grads:
        return 0.0
    xp = get_array_module(grads[0])
    # vdot(g, g) = |g|^2 without a temporary g*g; summed on the device, one transfer at the end.
    squares = sum(xp.vdot(g.ravel(), g.ravel()) for g in grads)
    if sync or xp is np:
        total = math.sqrt(float(squares))
        factor = max_norm / (total + 1e-6)
        if factor < 1:
            for g in grads:
                g *= factor
        return total
    total = xp.sqrt(squares.astype(np.float64))          # as math.sqrt(float(...)), on the device
    # in the gradients' dtype, as a Python float factor is applied to them on the host path
    factor = xp.minimum(max_norm / (total + 1e-6), 1.0).astype(grads[0].dtype)
    for g in grads:
        g *= factor
    return total
