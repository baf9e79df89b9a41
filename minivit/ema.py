"""An exponential moving average (EMA) of a model's weights, kept beside it during training.

After every optimiser step t (1, 2, ...):

    ema = decay_t * ema + (1 - decay_t) * weights

so the EMA averages the last ~1 / (1 - decay) steps' weights: with decay 0.999, about the last
thousand. Near the end of a run the weights still jitter from step to step; their average often
tests a little better, at no cost to training (Polyak averaging; timm's ModelEmaV3, which this
follows). Every floating entry of the model's state is averaged (BatchNorm's running averages
too, as timm's default); integer ones (BatchNorm's batch counter) are copied.

decay_t, as timm's ModelEmaV3.get_decay with update_after_step 0:
    step 1:         0 (the EMA starts as a copy of the weights after the first step)
    without warmup: decay
    with warmup:    min(decay, 1 - (1 + t) ** (-2/3)), t = step - 1 (timm's warmup_gamma 1, warmup_power 2/3),
                    so early on, when the weights move fast, the average is short (t = 10: 0.80,
                    t = 100: 0.954, t = 1000: 0.990) and the random initial weights are forgotten quickly

The parameters' averages live in flat arrays laid out as the optimiser's flat parameter buffers
(minivit.modules.FlatBuffer), so an update is one pass over one array per buffer; each name's
average is a view into them. The averages have the dtype and device of the weights they follow.

Shape legend: n the number of entries of a flat buffer.
"""
from __future__ import annotations

from contextlib import contextmanager

from .backend import device_of, to_device, to_numpy

WARMUP_POWER = 2 / 3        # timm ModelEmaV3's warmup_power (and warmup_gamma 1)


def ema_decay_at(step: int, decay: float, warmup: bool = False) -> float:
    """The decay of the update after optimiser step `step` (1-based): timm's ModelEmaV3.get_decay."""
    t = step - 1
    if t <= 0:
        return 0.0
    if warmup:
        return min(decay, 1.0 - (1.0 + t) ** -WARMUP_POWER)
    return decay


class ModelEma:
    """The EMA of `model`'s state: ModelEma(model, decay, warmup), then update(model, step) after
    each optimiser step. Build it after the optimiser (which packs the parameters into flat
    buffers) and after the model is on its device."""

    def __init__(self, model, decay: float, warmup: bool = False):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay, self.warmup = float(decay), bool(warmup)
        live = model.state_dict()                                     # name -> the live array
        slots = {name: p._slot for name, p in model.named_parameters()}
        self.ema, self._flats = {}, []          # name -> average; [(FlatBuffer, flat average (n,))]
        packed = {}
        for name, slot in slots.items():
            if slot is not None and slot[0].intact():                 # .data is a view into slot[0]
                packed.setdefault(id(slot[0]), (slot[0], []))[1].append(name)
        params = dict(model.named_parameters())
        for flat, names in packed.values():
            average = flat.data.copy()                                                 # (n,)
            self._flats.append((flat, average))
            span = {id(p): (lo, hi) for p, lo, hi in flat._spans()}
            for name in names:
                lo, hi = span[id(params[name])]
                self.ema[name] = average[lo:hi].reshape(live[name].shape)             # a view
        for name, value in live.items():
            if name not in self.ema:
                self.ema[name] = value.copy()
        self.names = list(live)                                       # the model's order, for saving
        self.ema = {name: self.ema[name] for name in self.names}

    def update(self, model, step: int):
        """ema = d * ema + (1 - d) * weights with d = ema_decay_at(step): one pass per flat buffer
        still intact, one per array for the rest."""
        d = ema_decay_at(step, self.decay, self.warmup)
        done = set()
        for flat, average in self._flats:
            if flat.intact():
                average *= d
                average += (1.0 - d) * flat.data                                       # (n,)
                done.update(id(p) for p in flat.params)
        params = {name: p for name, p in model.named_parameters()}
        for name, value in model.state_dict().items():
            if name in params and id(params[name]) in done:
                continue
            average = self.ema[name]
            if average.dtype.kind == "f":
                average *= d
                average += (1.0 - d) * value
            else:
                average[...] = value                  # integer buffers (batch counters): copied

    def state_dict(self) -> dict:
        """{name: NumPy copy of the average}, in the model's state_dict order."""
        return {name: to_numpy(value).copy() for name, value in self.ema.items()}

    def load_state_dict(self, state: dict):
        """Copy saved averages in (every name, with its shape)."""
        if set(state) != set(self.ema):
            missing, unexpected = sorted(set(self.ema) - set(state)), sorted(set(state) - set(self.ema))
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.ema[name].shape):
                raise ValueError(f"EMA entry {name!r} has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(self.ema[name].shape)}")
        for name, value in state.items():
            target = self.ema[name]
            target[...] = to_device(value, device_of(target)).astype(target.dtype, copy=False)

    @contextmanager
    def applied_to(self, model):
        """Within `with`, the model holds the averages (to evaluate or save them); afterwards its
        own weights again, exactly (copied out and back)."""
        live = model.state_dict()
        saved = {name: value.copy() for name, value in live.items()}
        try:
            for name, value in live.items():
                value[...] = self.ema[name]
            yield model
        finally:
            for name, value in live.items():
                value[...] = saved[name]

