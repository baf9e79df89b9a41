"""Checkpoints: a whole training run in one .npz file, written atomically, read without pickle.

One file holds three kinds of entries:

    model/<name>   every parameter, by its timm name      e.g. model/blocks.0.attn.qkv.weight
    optim/<key>    every optimiser state array             e.g. optim/exp_avg.3
    meta.json      one JSON string (a 0-d NumPy str array): the ViTConfig, the optimiser's
                   scalars (lr, step counts), the epoch, the random generators' states,
                   the training settings, the metrics so far, and a format version

An .npz is a zip of .npy files, so anyone can open it with `np.load(path)`. Nothing in it
is pickled, and it is always read with allow_pickle=False: loading a pickle runs whatever
code the file names, which is not something a downloaded checkpoint should be able to do.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .backend import is_array, to_numpy

FORMAT = "minivit-checkpoint"
VERSION = 1                       # bump when the layout changes; load_checkpoint refuses others
META_KEY = "meta.json"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"
# Keys of meta.json that save_checkpoint fills in itself; `extra` may not reuse them.
RESERVED_META_KEYS = ("format", "version", "config", "epoch", "rng", "optimizer")


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


def save_checkpoint(path, model, optimizer, epoch: int, rng_state: dict, extra: dict | None = None) -> Path:
    """Write model weights, optimiser state and metadata to `path` (.npz) atomically.

    model      a minivit Module (its config, `model.config`, is saved as a dict)
    optimizer  a minivit Optimizer, or None (e.g. for best.npz, which only needs weights)
    epoch      the number of completed epochs
    rng_state  JSON-able random-generator states, e.g. {"data": rng.bit_generator.state}
    extra      more JSON-able metadata (training settings, metrics, ...)

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
    meta = {
        "format": FORMAT,
        "version": VERSION,
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
    except BaseException:             # also KeyboardInterrupt: never leave a half-written temp file
        Path(tmp_name).unlink(missing_ok=True)
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
        state_dict       {parameter name: NumPy array}, for model.load_state_dict
        optimizer_state  the dict Optimizer.load_state_dict takes, or None if none was saved
        meta             the decoded meta.json (config, epoch, rng, ...)

    FileNotFoundError for a missing file; ValueError for a truncated file, a file that is
    not a minivit checkpoint, or one written in another format version.
    """
    path = Path(path)
    entries = _read_entries(path, everything=True)
    meta = _decode_meta(entries.pop(META_KEY), path)
    state_dict, optim_arrays = {}, {}
    for key, value in entries.items():
        if key.startswith(MODEL_PREFIX):
            state_dict[key[len(MODEL_PREFIX):]] = value
        elif key.startswith(OPTIM_PREFIX):
            optim_arrays[key[len(OPTIM_PREFIX):]] = value
        else:
            raise ValueError(f"{path}: unexpected entry {key!r} (expected model/..., optim/... or {META_KEY})")
    optimizer_state = None
    if meta.get("optimizer") is not None:
        optimizer_state = {**meta["optimizer"], **optim_arrays}
    return state_dict, optimizer_state, meta


def read_checkpoint_meta(path) -> dict:
    """Only the meta.json of a checkpoint (cheap: the arrays are not read). Same errors as load_checkpoint."""
    path = Path(path)
    return _decode_meta(_read_entries(path, everything=False)[META_KEY], path)


def _read_entries(path: Path, everything: bool) -> dict:
    """{entry name: array} from the .npz at path: all entries, or only meta.json."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):    # a plain .npy file gives one array
            raise ValueError("it holds a single array, not an .npz archive")
        with loaded as npz:
            if META_KEY not in npz.files:
                raise ValueError(f"it has no {META_KEY!r} entry (entries: {sorted(npz.files)[:5]})")
            # Read the entries now, inside the try: a damaged file fails here, not later.
            return {key: npz[key] for key in (npz.files if everything else [META_KEY])}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        # np.load raises many things for a bad file: BadZipFile (truncated zip), ValueError
        # (pickled data, bad .npy header), EOFError, OSError. One message for all of them.
        raise ValueError(f"{path} is not a readable minivit checkpoint ({type(exc).__name__}: {exc}); "
                         f"it may be truncated (an interrupted copy?) or a different kind of file") from None


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
    return meta
