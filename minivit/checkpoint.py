"""Checkpoints: a whole training run in one .npz file, written atomically, read without pickle.

One file holds three kinds of entries:

    model/<name>   every parameter, by its timm name      e.g. model/blocks.0.attn.qkv.weight
    optim/<key>    every optimiser state array             e.g. optim/exp_avg.3
    ema/<name>     the moving average of model/<name>, when the run keeps one (--ema-decay;
                   minivit.ema), with the shape of model/<name>
    meta.json      one JSON string (a 0-d NumPy str array): the model's kind ("vit", "hybrid",
                   "resnet"; a file without it is a ViT's) and config, the optimiser's scalars
                   (lr, step counts), the epoch, the random generators' states, the training
                   settings, the metrics so far, and a format version

A ResNet's or hybrid's model/ entries include the BatchNorm buffers (running averages and
batch counters): not trained, but part of the state a resumed run must continue from.

An .npz is a zip of .npy files, so anyone can open it with `np.load(path)`. Nothing in it
is pickled, and it is always read with allow_pickle=False: loading a pickle runs whatever
code the file names, which is not something a downloaded checkpoint should be able to do.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import is_array, to_numpy
from .config import CONFIG_CLASSES, KINDS, config_from_dict, model_kind
from .optim import SGD, AdamW
from .pretrained import check_parameter_shapes, read_npz_headers
from .resnet import state_shapes

FORMAT = "minivit-checkpoint"
VERSION = 1                       # bump when the layout changes; load_checkpoint refuses others
META_KEY = "meta.json"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
EMA_PREFIX = "ema/"
# Keys of meta.json that save_checkpoint fills in itself; `extra` may not reuse them.
RESERVED_META_KEYS = ("format", "version", "model", "config", "epoch", "rng", "optimizer")
# The largest meta.json read: it holds the config, the settings and one short row of metrics per
# epoch (about 200 bytes), so even 10000 epochs stay far below. Checked from the entry's header
# before it is read: a compressed entry can otherwise unpack to GBs. A module constant, for tests.
MAX_META_BYTES = 16 * 2**20
# The per-parameter optimiser arrays a checkpoint may hold (optim/<name>.<index>).
OPTIM_ARRAY_NAMES = tuple(sorted({n for cls in (SGD, AdamW) for n in cls.state_names} - {"step"}))
# Random generators a checkpoint's rng states may be for (minivit uses PCG64, default_rng's).
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _default_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (mkstemp's files are 0600)."""
    umask = os.umask(0)     # the only way to read the umask is to set it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


DEFAULT_FILE_MODE = _default_file_mode()


def _to_json(value, key="meta"):
    """JSON text of value; NumPy scalars become Python numbers, anything else unknown is an error."""
    def convert(obj):
        if isinstance(obj, np.generic):       # np.float32(0.5) -> 0.5, np.int64(3) -> 3
            return obj.item()
        raise TypeError(f"checkpoint {key}: {type(obj).__name__} value {obj!r} cannot be stored as JSON")
    # allow_nan=False: NaN is not JSON, and a NaN metric would make the file unreadable elsewhere.
    try:
        return json.dumps(value, default=convert, allow_nan=False, indent=1)
    except ValueError as exc:
        raise ValueError(f"checkpoint {key}: {exc} (a NaN or infinite number cannot be saved)") from None


def save_checkpoint(path, model, optimizer, epoch: int, rng_state: dict, extra: dict | None = None,
                    ema: dict | None = None) -> Path:
    """Write model weights, optimiser state and metadata to `path` (.npz) atomically.

    model      a minivit model: ViT, HybridViT or ResNet (its kind and config are saved, and its
               state_dict(), buffers included)
    optimizer  a minivit Optimizer, or None (e.g. for best.npz, which only needs weights)
    epoch      the number of completed epochs
    rng_state  JSON-able random-generator states, e.g. {"data": rng.bit_generator.state}
    extra      more JSON-able metadata (training settings, metrics, ...)
    ema        {name: array}: the moving average of the weights (minivit.ema.ModelEma.state_dict()),
               saved as ema/<name>; load_checkpoint_ema reads it back

    The file is written to a temporary file in the same directory, flushed to disk, and
    only then renamed over `path`. A rename within one directory is atomic, so `path` is
    always either the old complete checkpoint or the new complete one, never half of each,
    even if the process dies mid-save; the temporary file is removed on any error.
    """
    path = Path(path)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED_META_KEYS))
    if clash:
        raise ValueError(f"save_checkpoint: extra uses reserved key(s) {clash}")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"save_checkpoint: epoch must be an integer >= 0, got {epoch!r}")
    if not isinstance(rng_state, dict):
        raise TypeError(f"save_checkpoint: rng_state must be a dict of bit_generator.state dicts, got "
                        f"{type(rng_state).__name__}")

    arrays = {}
    for name, value in model.state_dict().items():
        arrays[MODEL_PREFIX + name] = to_numpy(value)            # CuPy -> NumPy; NumPy stays as is
    optimizer_scalars = None
    if optimizer is not None:
        optimizer_scalars = {}
        # Optimizer.state_dict() mixes arrays (moving averages) and JSON scalars (lr, step counts).
        for key, value in optimizer.state_dict().items():
            if is_array(value):
                arrays[OPTIM_PREFIX + key] = to_numpy(value)
            else:
                optimizer_scalars[key] = value
    for name, value in (ema or {}).items():
        arrays[EMA_PREFIX + name] = to_numpy(value)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_kind(model.config),
        "config": model.config.to_dict(),
        "epoch": int(epoch),
        "rng": rng_state,
        "optimizer": optimizer_scalars,
        **extra,
    }
    arrays[META_KEY] = np.array(_to_json(meta))                # 0-d str array: loads without pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())      # the bytes are on disk before the rename makes them `path`
        os.chmod(tmp_name, DEFAULT_FILE_MODE)   # mkstemp made it private (0600)
        os.replace(tmp_name, path)
    except BaseException as exc:      # also KeyboardInterrupt: never leave a half-written temp file
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # A full disk says "[Errno 28] No space left on device" without naming the file.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(path.parent)           # make the rename itself survive a power cut
    return path


def _fsync_dir(directory: Path):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:                   # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> tuple[dict, dict | None, dict]:
    """Read a checkpoint written by save_checkpoint.

    Returns (state_dict, optimizer_state, meta):
        state_dict       {parameter or buffer name: NumPy array}, for model.load_state_dict
                         (checkpoint_config(meta) is the config, minivit.model.build_model the model)
        optimizer_state  the dict Optimizer.load_state_dict takes, or None if none was saved
        meta             the decoded meta.json (config, epoch, rng, ...)

    FileNotFoundError for a missing file; ValueError for a truncated file, a file that is
    not a minivit checkpoint, one written in another format version, one whose entries are not
    what its config describes (checked from the entries' headers before any array is read, so a
    small file cannot make this allocate more than the model it describes), and one whose
    weights are not finite (NaN or infinity).
    """
    path = Path(path)
    headers, meta = _headers_and_meta(path)
    entries = _read_arrays(path, [key for key in headers if key != META_KEY and not key.startswith(EMA_PREFIX)])
    state_dict, optim_arrays = {}, {}
    for key, value in entries.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise ValueError(f"{path}: entry {key!r} holds {bad} non-finite value(s) (NaN or infinity) of "
                             f"{value.size}; refused, as NaN weights make every prediction NaN (a run that "
                             f"diverged, or a damaged file)")
        if key.startswith(MODEL_PREFIX):
            state_dict[key[len(MODEL_PREFIX):]] = value
        elif key.startswith(OPTIM_PREFIX):
            optim_arrays[key[len(OPTIM_PREFIX):]] = value
    optimizer_state = None
    if meta.get("optimizer") is not None:
        optimizer_state = {**meta["optimizer"], **optim_arrays}
    return state_dict, optimizer_state, meta


def load_checkpoint_ema(path) -> dict | None:
    """{name: array} of the moving average of the weights a checkpoint holds (its ema/ entries,
    checked as load_checkpoint checks the rest), or None when it holds none."""
    path = Path(path)
    headers, _ = _headers_and_meta(path)
    keys = [key for key in headers if key.startswith(EMA_PREFIX)]
    if not keys:
        return None
    ema = {}
    for key, value in _read_arrays(path, keys).items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{path}: entry {key!r} holds non-finite values (NaN or infinity); refused")
        ema[key[len(EMA_PREFIX):]] = value
    return ema


def checkpoint_config(meta: dict):
    """The config of the model a checkpoint holds (ViTConfig, HybridConfig or ResNetConfig), by
    the kind its meta records; files written before kinds were recorded hold ViTs."""
    kind = meta.get("model", "vit")
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(KINDS)})")
    return config_from_dict(meta.get("config"), kind)


def read_checkpoint_meta(path) -> dict:
    """Only the meta.json of a checkpoint (cheap: the arrays are not read, only their headers,
    which are checked against the config as load_checkpoint does). Same errors as load_checkpoint
    but for non-finite weights."""
    return _headers_and_meta(Path(path))[1]


def _headers_and_meta(path: Path):
    """({entry name: its .npy header}, the decoded meta.json), every entry checked against the
    config in meta.json before any array is read."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):   # an .npz is a zip archive
        raise ValueError(f"{path} is not a readable minivit checkpoint: {_what_it_is(path)}")
    try:
        headers = read_npz_headers(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable minivit checkpoint: {exc}") from None
    if META_KEY not in headers:
        raise ValueError(f"{path} is not a readable minivit checkpoint: it has no {META_KEY!r} entry "
                         f"(entries: {sorted(headers)[:5]})")
    meta_header = headers[META_KEY]
    if meta_header.dtype.kind != "U" or meta_header.shape != () or meta_header.nbytes > MAX_META_BYTES:
        raise ValueError(f"{path}: {META_KEY} should be one JSON string of at most {MAX_META_BYTES} bytes, got "
                         f"a {meta_header.dtype} array of shape {meta_header.shape} ({meta_header.nbytes} bytes)")
    meta = _decode_meta(_read_arrays(path, [META_KEY])[META_KEY], path)
    _check_entries(headers, meta, path)
    return headers, meta


def _what_it_is(path: Path) -> str:
    """What a file that is not an .npz (zip) archive seems to be, from its first bytes, for messages."""
    with open(path, "rb") as f:
        head = f.read(16)
    kinds = [(b"\x93NUMPY", "a single array (.npy)"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
             (b"\x1f\x8b", "gzip-compressed (a .tar.gz?)"), (b"\x80", "a pickle, which minivit never loads")]
    kind = next((kind for magic, kind in kinds if head.startswith(magic)), None)
    # safetensors: an 8-byte little-endian header length, then the JSON header itself.
    if kind is None and head[8:9] == b"{":
        kind = ("a safetensors file (pretrained weights: `minivit predict --weights` and `minivit train --init` "
                "read those)")
    what = (f"it is {kind}, not" if kind else
            "it may be truncated (an interrupted copy?) or a different kind of file: not")
    return f"{what} an .npz archive; expected an .npz written by minivit train (checkpoint.npz or best.npz)"


def _read_arrays(path: Path, keys) -> dict:
    """{entry name: array} for the given entries of the .npz at path (already checked by their headers)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            # Read the entries now, inside the try: a damaged file fails here, not later.
            return {key: npz[key] for key in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # A damaged member fails in many ways: BadZipFile (bad CRC), EOFError, ValueError (short data).
        raise ValueError(f"{path} is not a readable minivit checkpoint ({type(exc).__name__}: {exc}); "
                         f"it may be truncated (an interrupted copy?) or damaged") from None


def _check_entries(headers: dict, meta: dict, path: Path):
    """ValueError unless the entries are exactly what the saved config's model (and an optimiser
    for it) needs: model/<name> for every parameter with its shape, optim/<state>.<index> shaped
    like a parameter, and nothing else. Only headers are read, nothing is built."""
    try:
        config = checkpoint_config(meta)
    except (ValueError, TypeError, OverflowError) as exc:
        kind = meta.get("model", "vit")
        what = CONFIG_CLASSES[kind].__name__ if kind in CONFIG_CLASSES else f"config (model kind {kind!r})"
        raise ValueError(f"{path}: the config in its {META_KEY} is not a valid {what} ({exc})") from None
    model = {k[len(MODEL_PREFIX):]: h.shape for k, h in headers.items() if k.startswith(MODEL_PREFIX)}
    others = [k for k in headers if not k.startswith((MODEL_PREFIX, OPTIM_PREFIX, EMA_PREFIX)) and k != META_KEY]
    if others:
        raise ValueError(f"{path}: unexpected entry {others[0]!r} (expected model/..., optim/..., ema/... or "
                         f"{META_KEY})")
    for key, header in headers.items():
        name = key[len(EMA_PREFIX):]
        if key.startswith(EMA_PREFIX) and (name not in model or tuple(header.shape) != tuple(model[name])):
            raise ValueError(f"{path}: entry {key!r} of shape {header.shape} is not the average of a model entry "
                             f"(expected ema/<name> shaped like model/<name>)")
    expected = _check_model_entries(config, model, path)                  # the parameters' shapes
    shapes, n = set(expected.values()), len(expected)
    for key, header in headers.items():
        if header.dtype.kind not in "fiu" and key != META_KEY:
            raise ValueError(f"{path}: entry {key!r} has non-numeric dtype {header.dtype}")
        if key.startswith(OPTIM_PREFIX):
            what, _, index = key[len(OPTIM_PREFIX):].rpartition(".")
            if what not in OPTIM_ARRAY_NAMES or not index.isdigit() or int(index) >= n or header.shape not in shapes:
                raise ValueError(f"{path}: entry {key!r} of shape {header.shape} is not an optimiser state the "
                                 f"model can have (expected optim/<name>.<index> with name in {OPTIM_ARRAY_NAMES}, "
                                 f"index < {n}, shaped like a parameter)")


def _check_model_entries(config, entries: dict, path: Path) -> dict:
    """ValueError unless the model/ entries ({name: shape}) are exactly the state dict of the
    config's model (a ViT's parameters; a ResNet's parameters and buffers; a hybrid's, both).
    Returns {name: shape} of the parameters (the optimiser has state for those only)."""
    spell = lambda name: repr(MODEL_PREFIX + name)       # noqa: E731
    kind = model_kind(config)
    if kind == "vit":
        return check_parameter_shapes(config, entries, str(path), spell=spell)
    prefix = "patch_embed.backbone." if kind == "hybrid" else ""
    backbone = config.backbone_config if kind == "hybrid" else config
    params = {}
    if kind == "hybrid":                                  # the ViT that reads the feature map
        vit_entries = {k: v for k, v in entries.items() if not k.startswith(prefix)}
        params.update(check_parameter_shapes(config.vit_config, vit_entries, str(path), spell=spell))
    # Count the file's residual blocks before listing the config's (a config may claim 10**9).
    blocks = {m.group(1, 2) for m in map(re.compile(re.escape(prefix) + r"layer(\d+)\.(\d+)\.").match, entries) if m}
    if len(blocks) != sum(backbone.layers):
        raise ValueError(f"{path}: the config has {sum(backbone.layers)} residual blocks (layers="
                         f"{backbone.layers}), the weights {len(blocks)}")
    expected = {prefix + k: v for k, v in state_shapes(backbone).items()}
    given = {k: v for k, v in entries.items() if k.startswith(prefix)}
    missing = [n for n in expected if n not in given]
    unexpected = [n for n in given if n not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match the config: missing {[spell(n) for n in missing[:6]]}"
                         f"{' ...' * (len(missing) > 6)}, unexpected {[spell(n) for n in unexpected[:6]]}"
                         f"{' ...' * (len(unexpected) > 6)}")
    for name, shape in expected.items():
        if tuple(given[name]) != shape:
            raise ValueError(f"{path}: {spell(name)} has shape {tuple(given[name])}, but the config "
                             f"({type(backbone).__name__} layers={backbone.layers}, widths={backbone.widths}) "
                             f"needs {shape}")
    buffers = set(state_shapes(backbone)) - set(state_shapes(backbone, buffers=False))
    params.update({k: v for k, v in expected.items() if k[len(prefix):] not in buffers})
    return params


def _decode_meta(meta_array, path) -> dict:
    try:
        meta = json.loads(str(meta_array[()]))
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: {META_KEY} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a minivit checkpoint ({META_KEY} has no \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path} is a version {meta.get('version')!r} checkpoint; this minivit reads version "
                         f"{VERSION} only")
    epoch = meta.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{path}: {META_KEY} gives epoch {epoch!r}; expected the number of completed epochs, "
                         f"an integer >= 0 (the file is damaged)")
    rng = meta.get("rng")
    if not isinstance(rng, dict):
        raise ValueError(f"{path}: {META_KEY} gives rng {rng!r}; expected a dict of random generator states")
    for name, state in rng.items():
        _check_rng_state(state, f"{path}: {META_KEY}'s rng[{name!r}]")
    return meta


def _check_rng_state(state, where):
    """ValueError unless `state` is one NumPy accepts as a bit generator's state."""
    kind = state.get("bit_generator") if isinstance(state, dict) else None
    if kind not in BIT_GENERATORS:
        raise ValueError(f"{where} is not a random generator state (expected a dict with \"bit_generator\" "
                         f"one of {BIT_GENERATORS}, as bit_generator.state gives); the file is damaged")
    try:
        getattr(np.random, kind)().state = state
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ValueError(f"{where} is not a valid {kind} state ({type(exc).__name__}: {exc}); "
                         f"the file is damaged") from None


def is_train_checkpoint(path) -> bool:
    """A `minivit train` checkpoint is an .npz (a zip) with a meta.json entry; the paper's .npz
    files have none. An .npz that is not a zip counts as one, so that load_checkpoint says
    what is wrong with it."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    if not zipfile.is_zipfile(path):
        return True
    with zipfile.ZipFile(path) as archive:
        return f"{META_KEY}.npy" in archive.namelist()


def load_model_checkpoint(path):
    """(model with the checkpoint's weights and buffers, its meta), for a checkpoint of any kind:
    ViT, HybridViT or ResNet (a training checkpoint or weights only, e.g. lessons/weights/*.npz).
    The model is in training mode, as built; call .eval() to predict with BatchNorm's running
    averages."""
    from .model import build_model
    state, _, meta = load_checkpoint(path)
    model = build_model(checkpoint_config(meta))
    model.load_state_dict(state)
    return model, meta


def load_vit_checkpoint(path, why: str):
    """(ViT with the checkpoint's weights, its meta) for commands that only make sense for a
    ViT; `why` finishes the error for another kind of model: "... holds a resnet model; {why}"."""
    from .config import model_kind
    from .model import ViT
    state, _, meta = load_checkpoint(path)
    config = checkpoint_config(meta)
    if model_kind(config) != "vit":
        raise ValueError(f"{str(path)!r} holds a {model_kind(config)} model; {why}")
    model = ViT(config)
    model.load_state_dict(state)
    return model, meta
