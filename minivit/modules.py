"""Parameter, Module and the layers of a Vision Transformer.

A Module holds Parameters and wraps the pure forward/backward functions of ops.py
(or their faster twins in fastops.py, the default: see OPS below):
`forward(x)` runs the op and keeps its cache; `backward(dout)` runs the op's
backward, adds the parameter gradients into `.grad` and returns the gradient of
the module's input. Names follow timm (`blocks.0.attn.qkv.weight`), so a learner
can read minivit beside timm's vision_transformer.py and weights load by name.

Shape legend: B batch, N tokens, D width, H heads, hs head size, F MLP width.
"""
from __future__ import annotations

import numpy as np

from . import fastops
from . import ops as reference_ops
from .backend import check_device, device_of, get_array_module, is_array, to_device

FLOAT_DTYPES = (np.float32, np.float64)

# The one switch between the two sets of ops. Every module (and ViT) calls `OPS.<op>`:
#   "fast"       fastops.py: the same ops, rewritten for speed (fewer temporaries, in-place
#                updates, BLAS-friendly layouts); tested against ops.py op by op
#   "reference"  ops.py: the clear versions, one formula per line, to read and learn from
# Switch between training steps, not between a forward pass and its backward: each set of
# ops reads only the caches it made itself (each module notes which ops made its cache, and
# its backward refuses the other's: Module._check_cache).
OPS_KINDS = ("fast", "reference")
_OPS_BY_KIND = {"fast": fastops, "reference": reference_ops}
OPS = fastops


def set_ops(kind: str) -> str:
    """Make every module use the "fast" or the "reference" ops; returns the previous kind."""
    global OPS
    if kind not in _OPS_BY_KIND:
        raise ValueError(f"ops kind must be one of {OPS_KINDS}, got {kind!r}")
    previous = get_ops_kind()
    OPS = _OPS_BY_KIND[kind]
    return previous


def get_ops_kind() -> str:
    return "fast" if OPS is fastops else "reference"


def get_ops():
    """The ops module in use: minivit.fastops or minivit.ops."""
    return OPS


class Parameter:
    """A trainable array and the gradient accumulated into it (None until a backward pass).

    Packed by an optimiser (FlatBuffer below), .data is a view into a flat buffer that holds all
    of that optimiser's parameters of its dtype and device, and a backward pass writes .grad into
    the parameter's place in the matching flat gradient buffer."""

    __slots__ = ("data", "grad", "_slot")

    def __init__(self, data):
        self.data = data
        self.grad = None
        self._slot = None      # (FlatBuffer, data view, grad view) once packed

    @property
    def shape(self):
        return self.data.shape

    def accumulate(self, g):
        """Add g into .grad. The first gradient is stored as is (ops return fresh arrays), or, for
        a packed parameter, copied into its place in the flat gradient buffer."""
        if self.grad is not None:
            self.grad += g
            return
        slot = self._slot
        if slot is not None and self.data is slot[1]:
            # One copy per parameter and backward pass buys an optimiser step, a clipping norm and
            # an all-reduce of one array each, instead of one per parameter.
            slot[2][...] = g
            self.grad = slot[2]
        else:
            self.grad = g

    # A copy (copy.deepcopy, pickle) is a plain, unpacked Parameter: its arrays would no longer be
    # views of the buffer that the slot names.
    def __getstate__(self):
        return {"data": self.data, "grad": self.grad}

    def __setstate__(self, state):
        self.data, self.grad, self._slot = state["data"], state["grad"], None

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, device={device_of(self.data)})"


class FlatBuffer:
    """Parameters of one dtype on one device, packed into two flat arrays:

        data  (n,)   every parameter's values, one parameter after the other
        grad  (n,)   their gradients, in the same places

    Parameter i occupies [offsets[i], offsets[i + 1]); its .data is a view into `data` (reshaped to
    its shape), and its .grad, once a backward pass has written it, a view into `grad`. So an
    elementwise update of all the parameters (AdamW, SGD), the norm of all their gradients
    (clipping) or an all-reduce of them is one operation on one array, not one per parameter.

    The views stay views: Module.to() and astype() move or cast the two flat arrays and hand out
    new views, load_state_dict copies into the views, and an optimiser packs its parameters again
    (one copy each) when something replaced a parameter's .data since (p.data = new_array).
    The buffer is an in-memory layout only: state_dict and checkpoints keep one array per name.
    """

    def __init__(self, params):
        self.params = list(params)
        first = self.params[0].data
        xp = get_array_module(first)
        sizes = [int(p.data.size) for p in self.params]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        data = xp.empty(self.offsets[-1], first.dtype)                   # (n,)
        for p, lo, hi in self._spans():
            if get_array_module(p.data) is not xp or p.data.dtype != first.dtype:
                raise TypeError(f"FlatBuffer packs parameters of one dtype and device; got {p!r} "
                                f"beside {first.dtype} arrays on the {device_of(first)}")
            data[lo:hi] = p.data.reshape(-1)
        self._attach(data, xp.zeros_like(data), [p.grad for p in self.params])

    def _spans(self):
        return zip(self.params, self.offsets, self.offsets[1:])

    def _attach(self, data, grad, grads):
        """Make every parameter's .data a view into `data`; a gradient in grads is copied into its
        place in `grad` (and .grad becomes that view), None stays None."""
        self.data, self.grad = data, grad
        for (p, lo, hi), g in zip(self._spans(), grads):
            shape = p.data.shape
            data_view, grad_view = data[lo:hi].reshape(shape), grad[lo:hi].reshape(shape)
            p.data, p._slot = data_view, (self, data_view, grad_view)
            if g is not None:
                grad_view[...] = g
                p.grad = grad_view
            else:
                p.grad = None

    def intact(self) -> bool:
        """True while every parameter's .data is still its view into this buffer."""
        return all(p._slot is not None and p._slot[0] is self and p.data is p._slot[1] for p in self.params)

    def grads_in_place(self) -> bool:
        """True when every parameter has a gradient and it is its view into `grad` (as a backward
        pass leaves it; a gradient assigned by hand, p.grad = g, is a separate array)."""
        return all(p._slot is not None and p._slot[0] is self and p.grad is p._slot[2] for p in self.params)

    def map(self, fn):
        """fn (a move to a device, a cast) applied to the two flat arrays, each in one call; the
        parameters become views of the results. A gradient that is not in the buffer is mapped
        on its own and stays separate."""
        in_place = [p._slot is not None and p.grad is p._slot[2] for p in self.params]
        others = [None if p.grad is None or kept else fn(p.grad) for p, kept in zip(self.params, in_place)]
        self._attach(fn(self.data), fn(self.grad), [None] * len(self.params))
        for p, kept, other in zip(self.params, in_place, others):
            p.grad = p._slot[2] if kept else other
        return self


def flat_gradients(params):
    """(flat, rest): the flat gradient arrays of the FlatBuffers whose parameters are all in
    `params` with their gradients in place, and the gradients of the other parameters (None
    left out). Together they hold every gradient exactly once: a sum over all the gradients'
    entries may run over these arrays instead of one array per parameter."""
    packed, rest = {}, []
    for p in params:
        slot = p._slot
        if slot is not None and p.data is slot[1] and p.grad is slot[2]:
            packed.setdefault(id(slot[0]), (slot[0], {}))[1][id(p)] = p
        elif p.grad is not None:
            rest.append(p.grad)
    flat = []
    for buffer, members in packed.values():
        if len(members) == len(buffer.params):
            flat.append(buffer.grad)
        else:
            rest += [p.grad for p in members.values()]
    return flat, rest


class Module:
    """Finds its parameters by walking its attributes: Parameters, Modules and lists of Modules."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ walking the tree
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)) and value and all(isinstance(m, Module) for m in value):
                for i, m in enumerate(value):
                    yield f"{name}.{i}", m

    def modules(self):
        """This module and every module below it."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix=""):
        """(timm-style dotted name, Parameter) for every parameter, in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(int(p.data.size) for p in self.parameters())

    # ------------------------------------------------------------------ state
    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True):
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def dtype(self):
        return self.parameters()[0].data.dtype

    @property
    def device(self) -> str:
        return device_of(self.parameters()[0].data)

    def _map_arrays(self, fn):
        """Apply fn to every parameter, gradient and array buffer (e.g. a fixed pos table).
        Parameters packed in a FlatBuffer (by an optimiser) that this module holds all of are
        mapped as the buffer, in one call, and stay views into it."""
        params = {id(p): p for p in self.parameters()}
        buffers = {id(p._slot[0]): p._slot[0] for p in params.values() if p._slot is not None}
        mapped = set()
        for buffer in buffers.values():
            if buffer.intact() and all(id(q) in params for q in buffer.params):
                buffer.map(fn)
                mapped.update(id(q) for q in buffer.params)
        for m in self.modules():
            for name, value in list(vars(m).items()):
                if isinstance(value, Parameter):
                    if id(value) not in mapped:
                        value.data = fn(value.data)
                        value.grad = None if value.grad is None else fn(value.grad)
                elif is_array(value):
                    setattr(m, name, fn(value))
        self.clear_cache()
        return self

    def to(self, device: str):
        """Move every parameter to 'cpu' (NumPy) or 'gpu' (CuPy)."""
        check_device(device)
        return self._map_arrays(lambda a: to_device(a, device))

    def astype(self, dtype):
        """Cast every parameter to float32 or float64 (float64 for gradient checks)."""
        dtype = np.dtype(dtype)
        if dtype.type not in FLOAT_DTYPES:
            raise TypeError(f"astype: dtype must be float32 or float64, got {dtype}")
        # Only float arrays: an integer buffer (a relative_position_index) stays an index.
        return self._map_arrays(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a)

    def clear_cache(self):
        """Drop what the last forward pass kept for backward, here and below (frees its memory)."""
        for m in self.modules():
            m._cache = None
            m._cache_ops = None

    def state_dict(self) -> dict:
        """{name: array} for every parameter; the arrays are the live ones, as in PyTorch."""
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays into the parameters, checking names and shapes first (nothing is
        changed unless every check passes). strict=False allows missing and unexpected
        keys and returns them."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects a dict of arrays, got {type(state).__name__}")
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"state dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for name, value in state.items():
            if name not in params:
                continue
            p = params[name]
            if not (is_array(value) or isinstance(value, (list, tuple))):
                raise TypeError(f"state dict entry {name!r} must be an array, got {type(value).__name__}")
            shape = tuple(value.shape) if is_array(value) else np.shape(value)   # np.* only on host values
            if shape != tuple(p.data.shape):
                raise ValueError(f"state dict entry {name!r} has shape {shape}, the model expects {tuple(p.data.shape)}")
            arr = to_device(value if is_array(value) else np.asarray(value), device_of(p.data))
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"state dict entry {name!r} has non-numeric dtype {arr.dtype}")
            staged[name] = arr
        for name, arr in staged.items():
            params[name].data[...] = arr.astype(params[name].data.dtype, copy=False)
        return missing, unexpected

    def check_images(self, x):
        """For a whole model (one with a .config: ViT, ResNet, the hybrid): raise a clear error
        unless x is a finite float batch (B, C, S, S) of the model's size, dtype and device."""
        cfg = self.config
        expected = f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        if not is_array(x):
            raise TypeError(f"images must be a NumPy or CuPy array of shape {expected}, got {type(x).__name__}")
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_chans, cfg.img_size, cfg.img_size):
            hint = ""
            if x.ndim == 4 and x.shape[-1] == cfg.in_chans and x.shape[1] == cfg.img_size:
                hint = " (channels-last? use x.transpose(0, 3, 1, 2))"
            elif x.ndim == 3:
                hint = " (a single image? add a batch axis with x[None])"
            raise ValueError(f"images must have shape {expected}, got {tuple(x.shape)}{hint}")
        if x.shape[0] == 0:
            raise ValueError("images: the batch is empty (B = 0)")
        if x.dtype.kind != "f":
            raise TypeError(f"images must be floating point, got dtype {x.dtype} "
                            f"(for uint8 pixels use x.astype(np.float32) / 255 and normalise)")
        if x.dtype != self.dtype:
            raise TypeError(f"images have dtype {x.dtype} but the model is {self.dtype}; "
                            f"cast one of them (x.astype(...) or model.astype(...))")
        if device_of(x) != self.device:
            raise ValueError(f"images are on the {device_of(x)} but the model is on the {self.device}; "
                             f"use model.to(...) or move the images")
        if not bool(get_array_module(x).isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")

    def _check_cache(self, cache):
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() was called without a matching forward() "
                f"(each forward keeps its cache for exactly one backward)"
            )
        # The two sets of ops lay their caches out differently: handed the other one's cache,
        # a backward would fail deep inside with "too many values to unpack".
        made_by = getattr(self, "_cache_ops", None)     # "fast" or "reference" (a name: models stay deep-copyable)
        if made_by is not None and made_by != get_ops_kind():
            raise RuntimeError(
                f"{type(self).__name__}.backward(): its forward() ran with the {made_by!r} ops, but "
                f"modules.set_ops({get_ops_kind()!r}) was called before backward(); each set of ops reads "
                f"only the caches it made itself. Switch ops between training steps, not between a forward "
                f"pass and its backward: run forward() again."
            )
        return cache

    def _dropout_mask(self, shape, p, like):
        """A dropout mask when training with p > 0, else None (the identity)."""
        if not self.training or p == 0.0:
            return None
        return OPS.dropout_mask(shape, p, self.rng, get_array_module(like), like.dtype)


# ============================================================================= layers

class Linear(Module):
    """y = x @ weight^T + bias. weight is (Dout, Din); the patch embedding stores it as a
    convolution weight (D, C, P, P), as timm does, and it is flattened to (D, C*P*P) here."""

    def __init__(self, in_features, out_features, bias=True, weight_shape=None):
        self.weight = Parameter(np.zeros(weight_shape or (out_features, in_features), np.float32))
        self.bias = Parameter(np.zeros(out_features, np.float32)) if bias else None
        self._cache = None

    def forward(self, x):
        w = self.weight.data
        out, self._cache = OPS.linear_forward(x, w.reshape(w.shape[0], -1), None if self.bias is None else self.bias.data)
        self._cache_ops = get_ops_kind()    # which ops made the cache: backward checks it is the same
        return out

    def backward(self, dout):
        dx, dw, db = OPS.linear_backward(dout, self._check_cache(self._cache))
        self._cache = None
        self.weight.accumulate(dw.reshape(self.weight.data.shape))
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx


class LayerNorm(Module):
    def __init__(self, dim, eps=1e-6):
        self.weight = Parameter(np.ones(dim, np.float32))
        self.bias = Parameter(np.zeros(dim, np.float32))
        self.eps = eps
        self._cache = None

    def forward(self, x):
        out, self._cache = OPS.layernorm_forward(x, self.weight.data, self.bias.data, self.eps)
        self._cache_ops = get_ops_kind()
        return out

    def backward(self, dout):
        dx, dw, db = OPS.layernorm_backward(dout, self._check_cache(self._cache))
        self._cache = None
        self.weight.accumulate(dw)
        self.bias.accumulate(db)
        return dx


class PatchEmbed(Module):
    """Images (B, C, S, S) -> patch embeddings (B, G*G, D): patchify, then one linear map.
    Equivalent to timm's Conv2d(C, D, kernel_size=P, stride=P) followed by flatten."""

    def __init__(self, img_size, patch_size, in_chans, dim):
        self.patch_size = patch_size
        self.proj = Linear(in_chans * patch_size**2, dim, weight_shape=(dim, in_chans, patch_size, patch_size))
        self._cache = None

    def forward(self, x):
        patches, self._cache = OPS.patchify_forward(x, self.patch_size)   # (B, G*G, C*P*P)
        self._cache_ops = get_ops_kind()
        return self.proj(patches)                                         # (B, G*G, D)

    def backward(self, dout):
        dpatches = self.proj.backward(dout)                               # (B, G*G, C*P*P)
        dx = OPS.patchify_backward(dpatches, self._check_cache(self._cache))  # (B, C, S, S)
        self._cache = None
        return dx


class Attention(Module):
    """Multi-head self-attention: fused qkv projection, softmax(q k^T / sqrt(hs) + bias) v, output
    projection. With rel_pos_grid=G the bias is a learned relative position bias (BEiT): one
    number per head for each 2-D offset between a query and a key patch (a table of
    (2G-1)^2 + 3 rows, the 3 for [CLS]), looked up through the fixed relative_position_index;
    without it there is no bias."""

    def __init__(self, dim, heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, rng=None, rel_pos_grid=None):
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.relative_position_bias_table = None
        self.relative_position_index = None
        if rel_pos_grid is not None:
            rows = (2 * rel_pos_grid - 1) ** 2 + 3
            self.relative_position_bias_table = Parameter(np.zeros((rows, heads), np.float32))   # (T, H)
            # fixed, not trained: an integer buffer, not a Parameter (timm registers it as a buffer)
            self.relative_position_index = reference_ops.relative_position_index(rel_pos_grid)   # (N, N)
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop
        self.rng = rng
        self.keep_attention = False     # set by ViT.forward(x, keep_attention=True)
        self.attention = None           # then: this forward pass's probabilities (B, H, N, N)
        self._cache = None

    def forward(self, x):
        B, N, _ = x.shape
        attn_mask = self._dropout_mask((B, self.heads, N, N), self.attn_drop, x)
        qkv_b = None if self.qkv.bias is None else self.qkv.bias.data
        bias = bias_cache = None
        if self.relative_position_bias_table is not None:
            bias, bias_cache = OPS.rel_pos_bias_forward(self.relative_position_bias_table.data,
                                                        self.relative_position_index)    # (H, N, N)
        out, attn_cache = OPS.attention_forward(
            x, self.qkv.weight.data, qkv_b, self.proj.weight.data, self.proj.bias.data, self.heads, attn_mask, bias
        )                                                                 # (B, N, D)
        # a copy, so that it stays what this pass computed whatever later passes do to their buffers
        self.attention = OPS.attention_probs(attn_cache).copy() if self.keep_attention else None
        out, drop_cache = OPS.dropout_forward(out, self._dropout_mask(out.shape, self.proj_drop, x))
        self._cache = (attn_cache, drop_cache, bias_cache)
        self._cache_ops = get_ops_kind()
        return out

    def backward(self, dout):
        attn_cache, drop_cache, bias_cache = self._check_cache(self._cache)
        self._cache = None
        dout = OPS.dropout_backward(dout, drop_cache)
        grads = OPS.attention_backward(dout, attn_cache)
        dx, dqkv_w, dqkv_b, dproj_w, dproj_b = grads[:5]
        if bias_cache is not None:
            # forward: bias = table[index]  =>  each table entry gathers the gradients of its pairs
            self.relative_position_bias_table.accumulate(OPS.rel_pos_bias_backward(grads[5], bias_cache))
        self.qkv.weight.accumulate(dqkv_w)
        if self.qkv.bias is not None:
            self.qkv.bias.accumulate(dqkv_b)
        self.proj.weight.accumulate(dproj_w)
        self.proj.bias.accumulate(dproj_b)
        return dx


class Mlp(Module):
    """fc1 (D -> F), GELU, dropout, fc2 (F -> D), dropout."""

    def __init__(self, dim, hidden, gelu="exact", drop=0.0, rng=None):
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)
        self.gelu = gelu
        self.drop = drop
        self.rng = rng
        self._cache = None

    def forward(self, x):
        B, N, _ = x.shape
        mask1 = self._dropout_mask((B, N, self.fc1.weight.shape[0]), self.drop, x)
        mask2 = self._dropout_mask(x.shape, self.drop, x)
        out, self._cache = OPS.mlp_forward(
            x, self.fc1.weight.data, self.fc1.bias.data, self.fc2.weight.data, self.fc2.bias.data,
            self.gelu, mask1, mask2,
        )                                                                 # (B, N, D)
        self._cache_ops = get_ops_kind()
        return out

    def backward(self, dout):
        dx, dfc1_w, dfc1_b, dfc2_w, dfc2_b = OPS.mlp_backward(dout, self._check_cache(self._cache))
        self._cache = None
        self.fc1.weight.accumulate(dfc1_w)
        self.fc1.bias.accumulate(dfc1_b)
        self.fc2.weight.accumulate(dfc2_w)
        self.fc2.bias.accumulate(dfc2_b)
        return dx


class Block(Module):
    """A pre-norm Transformer encoder block:
        x = x + drop_path(attn(norm1(x)))
        x = x + drop_path(mlp(norm2(x)))
    drop_path drops a whole residual branch for some samples (stochastic depth)."""

    def __init__(self, dim, heads, hidden, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 gelu="exact", eps=1e-6, rng=None, rel_pos_grid=None):
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, heads, qkv_bias, attn_drop, drop, rng, rel_pos_grid)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, hidden, gelu, drop, rng)
        self.drop_path = drop_path
        self.rng = rng
        self._cache = None

    def forward(self, x):
        B = x.shape[0]
        mask1 = self._dropout_mask((B, 1, 1), self.drop_path, x)         # one decision per sample
        mask2 = self._dropout_mask((B, 1, 1), self.drop_path, x)
        a, drop1 = OPS.dropout_forward(self.attn(self.norm1(x)), mask1)  # (B, N, D)
        x = x + a
        m, drop2 = OPS.dropout_forward(self.mlp(self.norm2(x)), mask2)   # (B, N, D)
        x = x + m
        self._cache = (drop1, drop2)
        self._cache_ops = get_ops_kind()
        return x

    def backward(self, dout):
        drop1, drop2 = self._check_cache(self._cache)
        self._cache = None
        # forward: x = x + drop_path(mlp(norm2(x)))  =>  the residual passes dout straight through
        dm = OPS.dropout_backward(dout, drop2)
        dx = dout + self.norm2.backward(self.mlp.backward(dm))
        # forward: x = x + drop_path(attn(norm1(x)))
        da = OPS.dropout_backward(dx, drop1)
        dx = dx + self.norm1.backward(self.attn.backward(da))
        return dx
