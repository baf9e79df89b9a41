"""A strict stand-in for CuPy, backed by NumPy, so the CPU CI catches host/device mistakes.

minivit's GPU path has to run on machines that have no GPU. This module looks to minivit like
the `cupy` module (the part of it minivit calls), and its arrays refuse what real CuPy refuses:

    np.asarray(a), np.array(a)        TypeError: Implicit conversion to a NumPy array is not allowed
    np.exp(a), np.add(a, b), ...      TypeError (a NumPy ufunc given a device array)
    np.sum(a), np.concatenate([a])    TypeError (a NumPy function given a device array)
    a + host, host * a, a @ host      TypeError: Unsupported type <class 'numpy.ndarray'>
    a[...] = host, xp.exp(host)       TypeError (a host array where a device array is needed)
    xp.exp(a, out=host)               TypeError

and allows what CuPy allows: Python and NumPy scalars (and 0-d NumPy arrays) mixed with device
arrays; float(a), int(a), bool(a), a.item() on a one-element array (each a host wait on a GPU);
xp.asarray(host) (an explicit copy to the device) and asnumpy(a) / a.get() (an explicit copy back).
A reduction without an axis returns a 0-d device array, as in CuPy, not a NumPy scalar.

How it refuses: `ndarray` here is NOT a numpy.ndarray subclass (NumPy would silently view a subclass
as a plain array in np.asarray). It wraps one, and
  - __array__ raises, so nothing in NumPy can turn it into a NumPy array;
  - __array_ufunc__ = None, so every NumPy ufunc refuses it, and a NumPy array or scalar on the left
    of an operator hands the operation to this class's reflected operator (which refuses arrays
    and accepts scalars);
  - __array_function__ raises for every NumPy function that dispatches on its arguments.
Only the names defined below exist on the module: a call to something CuPy lacks fails too.

It is stricter than CuPy in one place: indexing a device array with a NumPy index array is refused
(CuPy copies such an index to the device implicitly); minivit keeps its index arrays on the device.

Use it through minivit.backend.use_array_module_for_gpu(strict_cupy) (see tests/conftest.py).
"""
from __future__ import annotations

import sys
import types

import numpy as _np
import scipy.special as _scipy_special

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")
_SCALARS = (bool, int, float, complex, _np.generic)


def _unsupported(value, where=""):
    return TypeError(f"Unsupported type {type(value)}{where} (strict_cupy: a host array where a device "
                     f"array is needed; move it with xp.asarray(...) first)")


class ndarray:
    """A device array: a NumPy array in a wrapper that refuses implicit host conversion."""

    __slots__ = ("_a",)
    __array_ufunc__ = None      # NumPy ufuncs refuse it; NumPy operators defer to the reflected ones here

    def __init__(self, shape, dtype=float):
        self._a = _np.empty(shape, dtype)

    # ------------------------------------------------------------------ refusals
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was given a strict_cupy (device) array: use the array's "
                        f"module (xp = minivit.backend.get_array_module(x)) or copy it to the host first. "
                        f"({_IMPLICIT})")

    # ------------------------------------------------------------------ attributes
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: cuda.Device(0))     # the one device the stand-in has
    T = property(lambda self: _wrap(self._a.T))

    # ------------------------------------------------------------------ explicit transfers and host waits
    def get(self):
        """A NumPy copy (an explicit device-to-host transfer)."""
        return self._a.copy()

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __float__(self):
        return float(self._a)       # NumPy itself refuses arrays of more than one element

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __repr__(self):
        return f"strict_cupy.{self._a!r}"

    def __format__(self, spec):
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __reduce__(self):
        return (_from_host, (self._a,))

    # ------------------------------------------------------------------ indexing
    def __getitem__(self, index):
        return _wrap(self._a[_index(index)])

    def __setitem__(self, index, value):
        self._a[_index(index)] = _operand(value, " as the value of a device array's __setitem__")


def _from_host(a):
    return ndarray._make(_np.array(a))


def _make(a):
    obj = ndarray.__new__(ndarray)
    obj._a = a
    return obj


ndarray._make = staticmethod(_make)


def _wrap(x):
    """NumPy results -> device arrays (a NumPy scalar becomes a 0-d array, as CuPy returns)."""
    if isinstance(x, _np.ndarray):
        return _make(x)
    if isinstance(x, _np.generic):
        return _make(_np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _operand(x, where=""):
    """A value an operation on device arrays may take: a device array, a scalar or a 0-d NumPy array."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _SCALARS) or x is None:
        return x
    if isinstance(x, _np.ndarray) and x.ndim == 0:
        return x
    raise _unsupported(x, where)


def _args(x, where=""):
    """Arguments of a device function: device arrays unwrapped, scalars, shapes, dtypes and other
    plain values passed through; host arrays refused (also inside lists and tuples)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        return _operand(x, where)
    if isinstance(x, (list, tuple)):
        return type(x)(_args(v, where) for v in x)
    return x


def _index(index):
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    if isinstance(index, ndarray):
        return index._a
    if isinstance(index, (_np.ndarray, list)):
        raise _unsupported(index, " as an index of a device array")
    return index


def _binary(ufunc, reflected=False):
    def op(self, other):
        o = _operand(other)
        return _wrap(ufunc(o, self._a) if reflected else ufunc(self._a, o))
    return op


def _inplace(ufunc):
    def op(self, other):
        ufunc(self._a, _operand(other), out=self._a)
        return self
    return op


for _name, _ufunc in (("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply),
                      ("truediv", _np.true_divide), ("floordiv", _np.floor_divide), ("mod", _np.remainder),
                      ("pow", _np.power), ("matmul", _np.matmul), ("and", _np.bitwise_and),
                      ("or", _np.bitwise_or), ("xor", _np.bitwise_xor)):
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in (("eq", _np.equal), ("ne", _np.not_equal), ("lt", _np.less), ("le", _np.less_equal),
                      ("gt", _np.greater), ("ge", _np.greater_equal)):
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
ndarray.__hash__ = None
for _name, _ufunc in (("neg", _np.negative), ("pos", _np.positive), ("abs", _np.absolute),
                      ("invert", _np.invert)):
    setattr(ndarray, f"__{_name}__", lambda self, _f=_ufunc: _wrap(_f(self._a)))


def _method(name):
    def method(self, *args, **kwargs):
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise _unsupported(out, f" as out= of ndarray.{name}")
        where = f" as an argument of ndarray.{name}"
        result = getattr(self._a, name)(*_args(args, where), **{k: _args(v, where) for k, v in kwargs.items()})
        return out if out is not None else _wrap(result)
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "swapaxes", "ravel", "flatten", "copy", "astype", "view", "squeeze",
              "sum", "mean", "max", "min", "argmax", "argmin", "all", "any", "var", "std", "prod", "cumsum",
              "clip", "dot", "take", "repeat", "nonzero", "conj", "round", "fill", "argsort", "sort"):
    setattr(ndarray, _name, _method(_name))


# ============================================================================= module functions

def _function(np_func, name=None):
    """np_func on device arrays: host arrays refused, results wrapped, out= given back as passed."""
    name = name or np_func.__name__

    def function(*args, **kwargs):
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise _unsupported(out, f" as out= of {name}")
        where = f" as an argument of {__name__}.{name}"
        result = np_func(*_args(args, where), **{k: _args(v, where) for k, v in kwargs.items()})
        return out if out is not None else _wrap(result)
    function.__name__ = name
    return function


_FUNCTIONS = (
    # ufuncs
    "add", "subtract", "multiply", "divide", "true_divide", "floor_divide", "power", "negative", "maximum",
    "minimum", "exp", "exp2", "expm1", "log", "log1p", "log2", "sqrt", "square", "tanh", "sin", "cos",
    "abs", "absolute", "sign", "floor", "ceil", "rint", "hypot", "isfinite", "isnan", "isinf", "equal",
    "not_equal", "less", "less_equal", "greater", "greater_equal", "logical_and", "logical_or",
    "logical_not", "bitwise_and", "bitwise_or", "copysign", "reciprocal", "clip", "where",
    # creation from shapes, and like existing device arrays
    "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like", "arange",
    "eye", "linspace",
    # shapes and joins
    "concatenate", "stack", "broadcast_to", "moveaxis", "swapaxes", "transpose", "reshape", "squeeze",
    "expand_dims", "pad", "tile", "repeat", "flip", "ravel",
    # linear algebra and reductions
    "matmul", "dot", "vdot", "einsum", "tensordot", "outer", "sum", "mean", "max", "min", "amax", "amin",
    "argmax", "argmin", "prod", "cumsum", "var", "std", "all", "any", "count_nonzero", "bincount",
    "sort", "argsort", "unique", "isclose", "allclose", "nonzero", "take",
)
for _name in _FUNCTIONS:
    globals()[_name] = _function(getattr(_np, _name))

for _name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint32",
              "bool_", "complex64", "complex128", "dtype", "inf", "nan", "pi", "e", "newaxis", "finfo", "iinfo"):
    globals()[_name] = getattr(_np, _name)


def asarray(a, dtype=None, order=None):
    """A device array: `a` itself when it is one already (and of that dtype), else a COPY of the host
    data, as CuPy copies host memory to the device (so nothing aliases the host array afterwards)."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _make(_np.array(_args_host(a), dtype=dtype, order=order or "K", copy=True))


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return a.astype(a.dtype if dtype is None else dtype, copy=True) if copy else asarray(a, dtype)
    return asarray(a, dtype)


def _args_host(a):
    """What asarray may copy from: host data, device arrays inside a list unwrapped."""
    if isinstance(a, (list, tuple)):
        return type(a)(_args_host(v) for v in a)
    return a._a if isinstance(a, ndarray) else a


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise _unsupported(a, f" as the argument of {__name__}.ascontiguousarray")
    return _make(_np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a):
    """A NumPy copy of a device array (an explicit transfer); NumPy input is returned as an array."""
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def result_type(*args):
    """Device arrays count by their dtype; dtypes and scalars as in NumPy; host arrays are refused."""
    def arg(a):
        if isinstance(a, ndarray):
            return a.dtype
        return _operand(a, f" as an argument of {__name__}.result_type") if isinstance(a, _np.ndarray) else a
    return _np.result_type(*(arg(a) for a in args))


def can_cast(from_, to, casting="safe"):
    return _np.can_cast(from_.dtype if isinstance(from_, ndarray) else from_, to, casting)


linalg = types.SimpleNamespace(**{n: _function(getattr(_np.linalg, n), f"linalg.{n}")
                                  for n in ("svd", "lstsq", "solve", "norm", "inv", "eigh", "qr", "det")})


# ----------------------------------------------------------------------------- random, cuda, cupyx.scipy.special

class Generator:
    """cupy.random.Generator: its draws are device arrays. `created` counts the constructions
    (each of CuPy's fills a large per-thread state with a kernel of its own)."""

    created = 0

    def __init__(self, seed):
        Generator.created += 1
        self._rng = _np.random.default_rng(seed)

    def random(self, size=None, dtype=_np.float64, out=None):
        if out is not None:
            raise NotImplementedError("strict_cupy: Generator.random(out=...)")
        return _make(_np.asarray(self._rng.random(size, dtype=dtype)))

    def standard_normal(self, size=None, dtype=_np.float64):
        return _make(_np.asarray(self._rng.standard_normal(size, dtype=dtype)))

    def integers(self, low, high=None, size=None, dtype=_np.int64):
        return _make(_np.asarray(self._rng.integers(low, high, size, dtype=dtype)))


def _default_rng(seed=None):
    if seed is not None and not isinstance(seed, (int, _np.integer)):
        raise TypeError(f"strict_cupy: default_rng takes an integer seed, got {type(seed).__name__}")
    return Generator(seed)


class RandomState:
    """cupy.random.RandomState (cuRAND's host API): a seed of 0 .. 2**64 - 1 and a method.
    `created` counts the constructions (cuRAND allocates a generator for each), so that a test
    can prove minivit makes one and re-keys it rather than making one per draw."""

    created = 0

    def __init__(self, seed=None, method=None):
        if method not in _CURAND_METHODS:
            raise ValueError(f"strict_cupy: RandomState method must be one of cupy.cuda.curand's "
                             f"CURAND_RNG_PSEUDO_* values {sorted(_CURAND_METHODS)}, got {method!r}")
        RandomState.created += 1
        self.method = method
        self.seed(seed)

    def seed(self, seed=None):
        # CuPy takes an integer seed that fits in uint64 (cuRAND's unsigned long long); no seed
        # means fresh entropy, which minivit never wants
        if seed is None or not isinstance(seed, (int, _np.integer)) or isinstance(seed, bool):
            raise TypeError(f"strict_cupy: RandomState.seed takes an integer, got {seed!r}")
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"strict_cupy: RandomState seed must be in [0, 2**64), got {seed}")
        self._rng = _np.random.Generator(_np.random.Philox(key=int(seed)))

    def random_sample(self, size=None, dtype=float):
        dtype = _np.dtype(dtype)
        if dtype not in (_np.float32, _np.float64):
            raise TypeError(f"strict_cupy: RandomState.random_sample dtype must be float32 or float64, got {dtype}")
        return _make(_np.asarray(self._rng.random(() if size is None else size, dtype=dtype)))


random = types.SimpleNamespace(default_rng=_default_rng, Generator=Generator, RandomState=RandomState)


class _Runtime:
    device_count = 1

    @classmethod
    def getDeviceCount(cls):     # noqa: N802  (CuPy's name)
        return cls.device_count


# Every synchronisation asked of the stand-in, in order ("device 0" or "stream"): a test can
# clear it and check that a timer waited for the device before reading its clock.
synchronizations = []


class _Stream:
    def synchronize(self):
        synchronizations.append("stream")


class _Device:
    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        synchronizations.append(f"device {self.id}")


_CURAND_METHODS = {100, 101, 121, 141, 142, 161}      # cuRAND's curandRngType_t pseudo-random values
curand = types.SimpleNamespace(CURAND_RNG_PSEUDO_DEFAULT=100, CURAND_RNG_PSEUDO_XORWOW=101,
                               CURAND_RNG_PSEUDO_MRG32K3A=121, CURAND_RNG_PSEUDO_MTGP32=141,
                               CURAND_RNG_PSEUDO_MT19937=142, CURAND_RNG_PSEUDO_PHILOX4_32_10=161)
cuda = types.SimpleNamespace(runtime=_Runtime, Device=_Device, get_device_id=lambda: 0,
                             get_current_stream=lambda: _Stream(), Stream=_Stream, curand=curand)


def _erf(x):
    if not isinstance(x, ndarray):
        raise _unsupported(x, " as the argument of cupyx.scipy.special.erf")
    return _make(_np.asarray(_scipy_special.erf(x._a)))


special = types.SimpleNamespace(erf=_erf)   # what minivit takes from cupyx.scipy.special

del _name, _ufunc
