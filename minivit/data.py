"""CIFAR-10 for minivit: find it, load it safely, batch it, augment it, normalize it.

    find_cifar10(path)         where the data is: --data PATH, $MINIVIT_DATA, the cache, or download
      -> load_cifar10(path)    CIFAR10: uint8 images (B, C, S, S), int64 labels (B,), class names
    cifar10_for_lessons()      the two above for a notebook, or a labelled synthetic stand-in
      -> iterate_batches(...)  one epoch of mini-batches, in a new random order each epoch
      -> augment(images, rng)  random crop (zero padding 4) + horizontal flip, uint8 in, uint8 out
      -> normalize(...)        float32 (B, C, S, S), each channel about zero mean and unit variance
    resize_images(images, S2)  uint8 (B, C, S, S) -> uint8 (B, C, S2, S2), bilinear: to fine-tune at a
                               higher resolution than the model was trained at (paper section 3.2)

Shape legend: B images, C = 3 channels (R, G, B), S = 32 image side, K = 10 classes.

The official archive holds seven pickles, written by Python 2 with NumPy 1:
data_batch_1..5 (10000 training images each), test_batch (10000), batches.meta (class names).
Each batch is {b'batch_label', b'labels': list of K-class ints, b'data': uint8 (10000, 3072),
b'filenames'}; a row of b'data' is the R plane, then G, then B, each S x S row-major.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

from .backend import get_array_module

# The official copy (Krizhevsky, 2009) and the md5 published beside it. Module constants, so that a
# test can point them at a small local archive (a file:// URL) with its own checksum.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

ARCHIVE_NAME = "cifar-10-python.tar.gz"
DIR_NAME = "cifar-10-batches-py"          # the one directory inside the archive
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"

C, S, K = 3, 32, 10                       # channels, image side, classes

# The most bytes one file of the archive may hold. A batch pickle is 10000 x 3072 pixel bytes
# plus labels and file names: 31.0 MB in the real archive (30999582 to 31009716 bytes), so 64 MiB
# leaves twice that; batches.meta is 158 bytes, so 1 MiB is far above it. A member claiming more
# is refused before it is read: a few MB of gzip can hold GBs of zeros (a decompression bomb).
# The whole tar unpacks to 186 MB; reading stops at 512 MiB, so that members the loader skips (or
# padding after the end) cannot make it decompress GBs either. Module constants, so that a test
# can lower them.
MAX_BATCH_BYTES = 64 * 2**20
MAX_META_BYTES = 2**20
MAX_ARCHIVE_BYTES = 512 * 2**20

# Per-channel mean and standard deviation of the training pixels, in units of pixel / 255, measured
# over all 50000 x 32 x 32 training pixels of ../shared/data/cifar-10-python.tar.gz with
#   python -c "from minivit.data import load_cifar10; x = load_cifar10('../shared/data/cifar-10-python.tar.gz').train_images / 255.0; print(x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)))"
# which printed [0.49125038 0.48209027 0.44652094] [0.24523161 0.24278155 0.26062877]. That copy was
# rebuilt from JPEGs, so figures measured on the original archive differ slightly.
CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)
CIFAR10_STD = (0.2452, 0.2428, 0.2606)


@dataclass(frozen=True)
class CIFAR10:
    """The two splits of CIFAR-10 as NumPy arrays, with the class names."""

    train_images: np.ndarray   # uint8 (50000, C, S, S)
    train_labels: np.ndarray   # int64 (50000,), values 0..K-1
    test_images: np.ndarray    # uint8 (10000, C, S, S)
    test_labels: np.ndarray    # int64 (10000,)
    classes: list              # K names: classes[label] is the name of a label
    source: str = "CIFAR-10"   # where the images came from; synthetic_cifar10 says "synthetic ..."

    @property
    def synthetic(self) -> bool:
        """True for the stand-in of synthetic_cifar10: numbers measured on it say nothing about CIFAR-10."""
        return self.source.startswith("synthetic")

    def __repr__(self):        # the default would print the arrays
        return (f"CIFAR10(train: {len(self.train_images)} images, test: {len(self.test_images)} images, "
                f"classes: {', '.join(self.classes)}{', SYNTHETIC' if self.synthetic else ''})")


# ---- reading the pickles safely ----

# NumPy 2 renamed numpy.core to numpy._core. Files written by NumPy 1 (the real ones) name
# numpy.core.multiarray._reconstruct; files written by NumPy 2 name numpy._core.multiarray._reconstruct.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import _reconstruct

# Every global a CIFAR-10 pickle names. Checked on the real archive with pickletools.genops: each batch
# names exactly numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype (to rebuild the
# b'data' array); batches.meta names none. Loading a pickle can call anything it names, so this table
# is the whole of what a file can make us run.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and plain Python data, and nothing else.

    A pickle is a small program: its GLOBAL opcode looks up any name (os.system, builtins.eval)
    and REDUCE calls it, so pickle.load on a downloaded file runs whatever the file says. Every
    name a pickle uses goes through find_class, so refusing here stops an attack before it runs.
    """

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        allowed = ", ".join(sorted({f"{m}.{n}" for m, n in _ALLOWED_GLOBALS}))
        raise pickle.UnpicklingError(
            f"refused to load global '{module}.{name}': a CIFAR-10 pickle only needs {allowed}"
        )


def _unpickle(blob: bytes, where: str):
    """The object in one CIFAR-10 pickle, read with RestrictedUnpickler. ValueError if it is bad."""
    try:
        # Python 2 wrote its str, which is our bytes. encoding="bytes" keeps them bytes: dict keys
        # stay b'data', b'labels', and the 30 MB pixel string goes to NumPy without being decoded.
        return RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:
        # A damaged pickle fails in many ways (EOFError, KeyError, UnpicklingError, ...); the refusal
        # of a global arrives here too, and its message names the global.
        raise ValueError(f"{where} is not a valid CIFAR-10 pickle: {exc}") from exc


def _size_limit(name: str) -> int:
    return MAX_META_BYTES if name == META_FILE else MAX_BATCH_BYTES


def _too_big(where: str, name: str, size: int) -> ValueError:
    return ValueError(f"{where}: {name} holds {size} bytes, more than the {_size_limit(name)} bytes this CIFAR-10 "
                      f"file can need; refused without reading it (a corrupt file, or a decompression bomb)")


def _too_long(where: str, size: int) -> ValueError:
    return ValueError(f"{where} unpacks to at least {size} bytes, more than the {MAX_ARCHIVE_BYTES} bytes the "
                      f"CIFAR-10 archive can need; refused (a corrupt file, or a decompression bomb)")


def _read_files(source: Path) -> dict[str, bytes]:
    """The raw bytes of the seven CIFAR-10 files, from the .tar.gz or from the extracted directory."""
    names = (*TRAIN_FILES, TEST_FILE, META_FILE)
    if source.is_dir():
        missing = [name for name in names if not (source / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{source} is missing {missing}; expected the extracted {DIR_NAME}/ directory with {list(names)}"
            )
        for name in names:
            size = (source / name).stat().st_size
            if size > _size_limit(name):
                raise _too_big(str(source), name, size)
        return {name: (source / name).read_bytes() for name in names}

    wanted = {f"{DIR_NAME}/{name}": name for name in names}   # member path in the archive -> file name
    files = {}
    trailing = 0                      # bytes that are not zero after the tar's end-of-archive marker
    with open(source, "rb") as raw:   # a missing or unreadable file fails here, as itself
        try:
            # Iterating the archive reads each member as the decompressed stream passes it, so the
            # archive is decompressed once, in memory, and nothing is extracted to disk. Only regular
            # files with the expected names are read; links and anything else are ignored.
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                with tarfile.open(fileobj=gz, mode="r:") as tar:
                    for member in tar:
                        name = wanted.get(member.name) if member.isfile() else None
                        # The header's size, checked before anything is read (or skipped: skipping
                        # decompresses too); and the read itself is bounded by the limit as well.
                        if name is not None and member.size > _size_limit(name):
                            raise _too_big(str(source), name, member.size)
                        if member.offset_data + member.size > MAX_ARCHIVE_BYTES:
                            raise _too_long(str(source), member.offset_data + member.size)
                        if name is not None:
                            blob = tar.extractfile(member).read(_size_limit(name) + 1)
                            if len(blob) > _size_limit(name):
                                raise _too_big(str(source), name, len(blob))
                            files[name] = blob
                # The tar reader stops at the end-of-archive marker (or, silently, at a damaged
                # header), before the end of the gzip stream: only reading to the end makes gzip
                # check its CRC and length, which is what catches a flipped bit. What follows the
                # marker is zero padding; anything else means the tar headers stopped early.
                while chunk := gz.read(1 << 20):
                    trailing += len(chunk) - chunk.count(0)
                    if gz.tell() > MAX_ARCHIVE_BYTES:
                        raise _too_long(str(source), gz.tell())
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            # gzip.BadGzipFile (an OSError) says "CRC check failed" for a changed byte; EOFError is a
            # file cut short; zlib.error a damaged compressed block.
            raise ValueError(
                f"cannot read {source} as a gzipped tar archive: it is corrupt or truncated ({exc}); expected "
                f"the official {ARCHIVE_NAME}. This is usually an interrupted or damaged download: delete it "
                f"and download it again"
            ) from exc
    missing = [f"{DIR_NAME}/{name}" for name in names if name not in files]
    if missing:
        why = (f"; its tar headers stop before the end of its data ({trailing} more non-zero bytes), so the "
               f"archive is corrupt: delete it and download it again" if trailing else "")
        raise ValueError(f"{source} has no member {missing}; expected the official {ARCHIVE_NAME} layout{why}")
    return files


def _describe(x) -> str:
    """A short description of a value for an error message."""
    if isinstance(x, np.ndarray):
        return f"a {x.dtype} array of shape {x.shape}"
    return f"a {type(x).__name__}"


def _parse_batch(batch, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B, C, S, S), labels int64 (B,)) from one unpickled batch dict, validated."""
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        got = f"a dict with keys {list(batch)}" if isinstance(batch, dict) else _describe(batch)
        raise ValueError(f"{where}: expected a dict with keys b'data' and b'labels', got {got}")
    data, labels = batch[b"data"], batch[b"labels"]
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != C * S * S or len(data) == 0):
        raise ValueError(f"{where}: expected b'data' to be a uint8 array of shape (B, {C * S * S}) with B > 0, "
                         f"got {_describe(data)}")
    labels = np.asarray(labels) if isinstance(labels, (list, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu":
        got = _describe(batch[b"labels"] if labels is None else labels)
        raise ValueError(f"{where}: expected b'labels' to be a list of integers, got {got}")
    if len(labels) != len(data):
        raise ValueError(f"{where}: {len(data)} images but {len(labels)} labels; expected one label per image")
    if labels.min() < 0 or labels.max() >= K:
        bad = labels[(labels < 0) | (labels >= K)]
        raise ValueError(f"{where}: labels must be in 0..{K - 1}, found {sorted(set(bad.tolist()))[:5]}")
    # A row is the R plane, then G, then B, each S x S row-major: that is already the C-order layout of
    # (C, S, S), so this reshape is free (no copy) and gives channels-first images directly.
    images = data.reshape(-1, C, S, S)                                        # (B, 3072) -> (B, C, S, S)
    return images, labels.astype(np.int64)


def _parse_classes(meta, where: str) -> list:
    """The K class names from the unpickled batches.meta."""
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != K or not all(isinstance(n, bytes) for n in names):
        raise ValueError(f"{where}: expected b'label_names', a list of {K} names, got {_describe(names)}")
    # The official names are ASCII; UTF-8 (which ASCII is part of) also serves a home-made copy.
    try:
        return [name.decode("utf-8") for name in names]
    except UnicodeDecodeError:
        bad = next(n for n in names if not _is_utf8(n))
        raise ValueError(f"{where}: class name {bad!r} is not UTF-8 text; expected {K} names such as "
                         f"b'airplane'") from None


def _is_utf8(blob: bytes) -> bool:
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_cifar10(path, limit: int | None = None) -> CIFAR10:
    """CIFAR-10 from the official .tar.gz, the extracted cifar-10-batches-py/ directory, or a directory
    holding either. limit=n keeps only the first n images of each split (for quick tests)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    source = _resolve(Path(path).expanduser())
    if source is None:
        raise FileNotFoundError(f"CIFAR-10 not found at {path}; {_EXPECTED}")
    files = _read_files(source)

    def unpickle(name):
        # pop: each file's raw bytes can be freed as soon as it is parsed.
        return _unpickle(files.pop(name), f"{source} ({name})")

    train = [_parse_batch(unpickle(name), f"{source} ({name})") for name in TRAIN_FILES]
    test_images, test_labels = _parse_batch(unpickle(TEST_FILE), f"{source} ({TEST_FILE})")
    classes = _parse_classes(unpickle(META_FILE), f"{source} ({META_FILE})")
    train_images = np.concatenate([images for images, _ in train])          # (50000, C, S, S)
    train_labels = np.concatenate([labels for _, labels in train])          # (50000,)
    if limit is not None:
        # Copies, so that the full arrays can be freed.
        train_images, train_labels = train_images[:limit].copy(), train_labels[:limit].copy()
        test_images, test_labels = test_images[:limit].copy(), test_labels[:limit].copy()
    return CIFAR10(train_images, train_labels, test_images, test_labels, classes)


# ---- finding (or downloading) the data ----

_EXPECTED = f"expected {ARCHIVE_NAME}, the extracted {DIR_NAME}/ directory, or a directory containing either"


def _resolve(path: Path) -> Path | None:
    """The archive or extracted directory that `path` is or contains, or None."""
    if path.is_file():
        return path
    if path.is_dir():
        if (path / META_FILE).is_file() or (path / TRAIN_FILES[0]).is_file():
            return path                                    # the extracted directory itself
        if (path / DIR_NAME).is_dir():                     # preferred: loads without decompressing
            return path / DIR_NAME
        if (path / ARCHIVE_NAME).is_file():
            return path / ARCHIVE_NAME
    return None


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/minivit, or ~/.cache/minivit where that variable is not set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivit"


def _how_to_fix(cache: Path) -> str:
    return (f"To fix: download {CIFAR10_URL} (md5 {CIFAR10_MD5}) on a machine with internet access, copy it "
            f"here, and pass --data PATH/TO/{ARCHIVE_NAME} (or set MINIVIT_DATA=PATH, or put it in {cache}/)")


def find_cifar10(path=None, download: bool = True, search_parents: bool = False) -> Path:
    """The CIFAR-10 archive or extracted directory to give load_cifar10.

    Looks, in order, at `path` (the CLI's --data PATH), $MINIVIT_DATA, then the cache directory
    ($XDG_CACHE_HOME/minivit or ~/.cache/minivit). Each may be the .tar.gz, the extracted
    cifar-10-batches-py/ directory, or a directory containing either. With search_parents=True
    (the lessons) it then looks for shared/data/cifar-10-python.tar.gz in the working directory
    and each folder above it, the layout of this project's checkout. If none has it and
    download=True, downloads the official archive into the cache.
    """
    for given, origin in ((path, "the path given (--data)"), (os.environ.get("MINIVIT_DATA"), "$MINIVIT_DATA")):
        if given:
            found = _resolve(Path(given).expanduser())
            # A place asked for explicitly must hold the data: falling back to some other copy
            # would silently train on data the user did not choose.
            if found is None:
                raise FileNotFoundError(f"CIFAR-10 not found at {given} ({origin}); {_EXPECTED}")
            return found
    cache = _cache_dir()
    found = _resolve(cache)
    if found is not None:
        return found
    if search_parents:
        for folder in [Path.cwd(), *Path.cwd().parents]:
            candidate = folder / "shared" / "data" / ARCHIVE_NAME
            if candidate.is_file():
                return candidate
    if not download:
        raise FileNotFoundError(f"CIFAR-10 not found: no --data PATH given, MINIVIT_DATA not set, and nothing in "
                                f"{cache}. {_how_to_fix(cache)}")
    # A file already on disk is not checksummed (that would hash the whole archive on every run, and
    # rebuilt copies such as ../shared/data's differ from the official one): load_cifar10 validates
    # its contents instead. A download is checked before it is kept.
    return _download(CIFAR10_URL, cache / ARCHIVE_NAME, CIFAR10_MD5)


def synthetic_cifar10(n_train: int = 2000, n_test: int = 1000, seed: int = 0) -> CIFAR10:
    """A stand-in with CIFAR-10's shapes and types for when the real data is not at hand: each of the
    10 classes has its own mean colour, and an image is that colour plus noise (uint8). A model can
    learn it, so code runs end to end, but what it measures says nothing about CIFAR-10."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(K, C, 1, 1))

    def split(n):
        labels = rng.integers(0, K, n)                                        # (n,)
        pixels = colours[labels] + rng.normal(0, 40, size=(n, C, S, S))       # (n, C, S, S)
        return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)

    (train_x, train_y), (test_x, test_y) = split(n_train), split(n_test)
    return CIFAR10(train_x, train_y, test_x, test_y, [f"colour {k}" for k in range(K)],
                   source="synthetic (10 colours plus noise), not CIFAR-10")


def cifar10_for_lessons(download: bool = False, limit: int | None = None) -> CIFAR10:
    """CIFAR-10 for a lesson: find_cifar10(download=download, search_parents=True), loaded; where
    it is not found and download is False, synthetic_cifar10() with a loud notice, so that the
    lesson still runs (its figures must then say SYNTHETIC: check data.synthetic)."""
    try:
        path = find_cifar10(download=download, search_parents=True)
    except FileNotFoundError as exc:
        print(f"!! CIFAR-10 NOT FOUND: using SYNTHETIC images instead; the numbers below mean little.\n"
              f"!! To use the real data, set MINIVIT_DATA to the path of {ARCHIVE_NAME}, or call "
              f"cifar10_for_lessons(download=True).\n!! ({exc})", file=sys.stdout)
        return synthetic_cifar10()
    return load_cifar10(path, limit=limit)


def _download(url: str, dest: Path, md5: str) -> Path:
    """Download `url` to `dest` with a progress bar, check its md5, and only then name it `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading CIFAR-10 from {url} to {dest}", file=sys.stderr)
    # Write to a temporary file beside dest and rename it at the end: a rename within one directory is
    # atomic, so an interrupted or bad download never leaves a file at dest for a later run to trust.
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)   # a checksum against damage, not a security measure
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    size = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=ARCHIVE_NAME) as bar:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except OSError as exc:  # urllib.error.URLError, timeouts, resets are all OSErrors
                raise FileNotFoundError(f"CIFAR-10 not found locally and the download of {url} failed ({exc}). "
                                        f"{_how_to_fix(dest.parent)}") from exc
        if digest.hexdigest() != md5:
            raise ValueError(f"the download of {url} has md5 {digest.hexdigest()}, expected {md5}, so it was "
                             f"deleted (cut short or altered on the way). Try again. Or: {_how_to_fix(dest.parent)}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)                   # does nothing after a successful rename
    return dest


# ---- resizing: fine-tuning at a higher resolution (paper section 3.2) ----

# The float64 working arrays of resize_images are made for this many output pixels at a time
# (a chunk of images), so resizing all of CIFAR-10 never holds a float64 copy of all of it.
# Module constant, so that a test can make the chunks tiny.
RESIZE_CHUNK_PIXELS = 2**21


def _bilinear_taps(n_in: int, n_out: int):
    """For each of n_out output positions along one axis: the two input positions it reads and
    the weight of the second, as torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=False) places them.

    align_corners=False treats the n pixels of a side as n equal cells covering [0, n): output
    pixel j has its centre at (j + 0.5) * n_in / n_out in input units, which is input position
    (j + 0.5) * n_in / n_out - 0.5. Left of the first input centre torch clamps to it (a negative
    position becomes 0); right of the last, both taps are the last pixel.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5    # (n_out,)
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)                    # (n_out,)
    i1 = np.minimum(i0 + 1, n_in - 1)                                            # (n_out,)
    frac = src - i0                                      # (n_out,) weight of i1; 1 - frac is that of i0
    return i0, i1, frac


def resize_images(images, size: int):
    """uint8 images (B, C, S, S) -> uint8 (B, C, size, size), by bilinear interpolation.

    The paper fine-tunes at a higher resolution than it pre-trains (section 3.2); on CIFAR-10
    that means upsampling the 32 x 32 images, here to e.g. 48 or 64. The sampling positions are
    those of torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
    antialias=False); the result is computed in float64, rounded to the nearest integer (halves
    up) and clipped to 0..255, so it equals torch's float64 interpolation of the same images,
    rounded (up to the float rounding of exact halves). torch's own uint8 path uses fixed-point
    weights and differs from both by 1 at about a quarter of the pixels (32 -> 48 px, random
    images). size == S gives the images back exactly.
    size < S downsamples without an anti-aliasing filter (as antialias=False does): each output
    pixel reads only its 2 x 2 nearest input pixels, so fine detail aliases.

    Bilinear is separable: interpolate along the rows (height), then along the columns (width).
    Each pass is a product with an interpolation matrix W (size, S), whose row j holds the two
    weights of output pixel j: images = W @ images @ W^T. Images are done a chunk at a time
    (RESIZE_CHUNK_PIXELS output pixels: 170 images of 3 x 64 x 64), so the float64 working arrays
    peak at about 50 MiB whatever B is (measured with tracemalloc), besides the uint8 result
    (B * C * size * size bytes: 614 MB for 50000 images at 64 px, 346 MB at 48). 50000 images
    take about 3 s to 48 px and 4 s to 64 px on one core.
    Works on NumPy or CuPy arrays.
    """
    if not hasattr(images, "dtype") or images.dtype != np.uint8:
        raise TypeError(f"resize_images expects uint8 images (0..255), got {_describe(images)}")
    if images.ndim != 4 or images.shape[2] != images.shape[3] or images.shape[2] == 0:
        raise ValueError(f"resize_images expects square images (B, C, S, S) with S >= 1, got shape "
                         f"{tuple(images.shape)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an integer (the new image side in pixels), got {size!r}")
    if size <= 0:
        raise ValueError(f"size must be a positive integer (the new image side in pixels), got {size}")
    xp = get_array_module(images)
    B, C, S, _ = images.shape
    size = int(size)
    i0, i1, frac = _bilinear_taps(S, size)                                           # (size,) each
    W = np.zeros((size, S))                                                          # (size, S)
    # add.at, not assignment: at the clamped edges i0 == i1 and the two weights add up.
    np.add.at(W, (np.arange(size), i0), 1.0 - frac)
    np.add.at(W, (np.arange(size), i1), frac)
    W = xp.asarray(W)                                    # the same matrix serves both axes (square images)
    out = xp.empty((B, C, size, size), dtype=np.uint8)                               # (B, C, size, size)
    chunk = max(1, RESIZE_CHUNK_PIXELS // (C * size * max(size, S)))                 # images per chunk
    for start in range(0, B, chunk):
        x = images[start:start + chunk].astype(xp.float64)                           # (b, C, S, S)
        b = len(x)
        rows = W @ x                                     # (b, C, size, S) output row r mixes rows i0[r], i1[r]
        # Along the columns as one large matrix product: every row of every image at once.
        y = (rows.reshape(-1, S) @ W.T).reshape(b, C, size, size)                    # (b, C, size, size)
        # The weights are >= 0 and add up to 1, so y is already within 0..255 up to float
        # rounding; the clip only guards against that rounding.
        y += 0.5
        xp.floor(y, out=y)                                                           # nearest, halves up
        xp.clip(y, 0, 255, out=y)
        out[start:start + chunk] = y
    return out


# ---- normalization ----

def normalize(images, mean, std, dtype=np.float32):
    """uint8 images (B, C, S, S) in 0..255 -> `dtype` (B, C, S, S): (images / 255 - mean) / std per channel.

    mean and std are per channel, in units of pixel / 255 (CIFAR10_MEAN, CIFAR10_STD). Works on NumPy
    or CuPy arrays, so a uint8 batch can travel to the GPU (4x fewer bytes than float32) and be
    normalized there.
    """
    if not hasattr(images, "dtype") or images.dtype != np.uint8:
        # Only uint8 is accepted so that normalizing twice (a classic silent bug) fails loudly.
        raise TypeError(f"normalize expects uint8 images (0..255), got {_describe(images)}")
    if images.ndim != 4 or not len(mean) == len(std) == images.shape[1]:
        raise ValueError(f"normalize expects images (B, C, S, S) and one mean and std per channel, got images "
                         f"of shape {images.shape}, {len(mean)} means and {len(std)} stds")
    for name, values in (("mean", mean), ("std", std)):
        try:
            finite = all(np.isfinite(float(v)) for v in values)
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(f"normalize: {name} must be finite numbers (pixel / 255 units), got {tuple(values)}")
    if not all(float(v) > 0 for v in std):
        raise ValueError(f"normalize: every std must be > 0 (it divides the pixels), got std={tuple(std)}")
    xp = get_array_module(images)
    mean = xp.asarray(mean, dtype=dtype).reshape(-1, 1, 1)                    # (C, 1, 1): broadcasts over B, S, S
    std = xp.asarray(std, dtype=dtype).reshape(-1, 1, 1)                      # (C, 1, 1)
    return (images.astype(dtype) / 255 - mean) / std                          # (B, C, S, S)


# ---- augmentation: NumPy on the CPU, one random draw per image, no loop over images ----

def _check_batch(images, rng, caller):
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise TypeError(f"{caller} expects a NumPy array of images (B, C, H, W), got {_describe(images)}; "
                        f"augment on the CPU, before moving a batch to the GPU")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{caller} expects rng to be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")


def random_crop(images, rng: np.random.Generator, padding: int = 4):
    """Each image shifted by its own random -padding..padding pixels each way, zeros filling in.

    Pads every side with `padding` zeros (black for uint8 images), then cuts an H x W window from each
    padded image at a random offset. Returns a new array with the shape and dtype of `images`.
    """
    _check_batch(images, rng, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    B, _, H, W = images.shape
    p = padding
    padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)))                # (B, C, H+2p, W+2p)
    # Every H x W window of every padded image, as a view (nothing is copied yet).
    windows = sliding_window_view(padded, (H, W), axis=(2, 3))               # (B, C, 2p+1, 2p+1, H, W)
    top, left = rng.integers(0, 2 * p + 1, size=(2, B))                      # (B,), (B,): each window's corner
    # Pick window (top[i], left[i]) of image i. The three index arrays are split by the ':' for the
    # channels, so NumPy puts their shared dimension B first: the result is (B, C, H, W), a copy.
    return windows[np.arange(B), :, top, left]                               # (B, C, H, W)


def random_flip(images, rng: np.random.Generator):
    """Each image mirrored left-right with probability 1/2 (a mirrored cat is still a cat; an
    upside-down one is not a photo CIFAR-10 contains, so there is no vertical flip)."""
    _check_batch(images, rng, "random_flip")
    flip = rng.random(len(images)) < 0.5                                     # (B,) which images to mirror
    return np.where(flip[:, None, None, None], images[..., ::-1], images)    # (B, C, H, W)


def augment(images, rng: np.random.Generator, padding: int = 4):
    """The usual CIFAR-10 training augmentation: random_crop with 4 pixels of padding, then random_flip."""
    return random_flip(random_crop(images, rng, padding), rng)


# ---- batching ----

def iterate_batches(images, labels, batch_size: int, rng: np.random.Generator | None = None,
                    shuffle: bool = True, drop_last: bool = False):
    """One epoch of mini-batches (images[idx], labels[idx]), every index exactly once.

    shuffle=True draws a new order from `rng` on each call, so each epoch sees a different order and
    the whole run is reproducible from one seed. drop_last=True leaves out a final batch smaller than
    batch_size. The arguments are checked here, when called, not at the first batch.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} images, {len(labels)} labels")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shuffle and not isinstance(rng, np.random.Generator):
        raise ValueError(f"shuffle=True needs rng, a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {rng!r}; pass shuffle=False for the stored order")
    n = len(images)
    order = rng.permutation(n) if shuffle else np.arange(n)                 # (n,) drawn now, once per epoch
    stop = n - n % batch_size if drop_last else n
    return _batches(images, labels, order[:stop], batch_size)


def _batches(images, labels, order, batch_size):
    """The generator behind iterate_batches: consecutive slices of `order`."""
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]                              # (batch_size,) or fewer at the end
        yield images[index], labels[index]
