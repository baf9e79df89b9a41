"""Tests for minivit.data: reading the CIFAR-10 format safely, finding and downloading it,
augmentation and batching.

Most tests build a tiny archive in the official format in tmp_path (4 images per batch), written
the way the real files were written; the real archive is checked through the `cifar_archive`
fixture of conftest.py.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import pickletools
import struct
import tarfile

import numpy as np
import pytest

from minivit import data
from minivit.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    RestrictedUnpickler,
    augment,
    find_cifar10,
    iterate_batches,
    load_cifar10,
    normalize,
    random_crop,
    random_flip,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N = 4                      # images per synthetic batch: 20 training and 4 test images in all
TEST_FIRST = 1000          # the test images are numbered from here, so no test image equals a training one

# The globals the real batches name (seen with pickletools on the real archive; see also
# test_real_archive_names_only_the_allowed_globals). The synthetic files must name exactly these.
REAL_GLOBALS = {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}


# ---- writing files in the official format ----

class Py2Pickler(pickle._Pickler):
    """The pure-Python pickler, writing bytes the way Python 2 wrote its str.

    Python 3 at protocol 2 writes bytes as a call to _codecs.encode, a global the real files never
    name (and the loader refuses). Writing SHORT_BINSTRING / BINSTRING instead, as Python 2 did,
    gives files that name exactly the globals the real ones do.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_dumps(obj, numpy1_names=True) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    blob = buf.getvalue()
    if numpy1_names:
        # NumPy 2 names numpy._core.multiarray._reconstruct; the real files, written by NumPy 1, say
        # numpy.core. GLOBAL's arguments are newline-terminated text, so the name can be swapped.
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return blob


def pixel(i, c, h, w):
    """The value of image i at channel c, row h, column w in the synthetic files (works on arrays).
    Not symmetric in h and w, and different per channel, so any misplaced pixel shows."""
    return (i * 11 + c * 80 + h * 5 + w * 3) % 256


def expected_images(first, n):
    i, c, h, w = np.indices((n, 3, 32, 32))
    return pixel(first + i, c, h, w).astype(np.uint8)                   # (n, 3, 32, 32)


def expected_labels(first, n):
    return (np.arange(first, first + n) * 7) % 10


def make_batch(first, n=N, label="training batch"):
    """A batch dict as the real files hold it, for images numbered first .. first + n - 1."""
    # The row layout as the format describes it, built independently of any reshape:
    # entry k of a row is channel k // 1024, row (k % 1024) // 32, column k % 32.
    k = np.arange(3072)
    rows = pixel(np.arange(first, first + n)[:, None], k // 1024, k % 1024 // 32, k % 32)
    return {
        b"batch_label": label.encode(),
        b"labels": [int(y) for y in expected_labels(first, n)],         # a list, as in the real files
        b"data": rows.astype(np.uint8),                                  # (n, 3072)
        b"filenames": [f"image_{first + j}.png".encode() for j in range(n)],
    }


def make_meta(classes=CLASSES):
    return {b"label_names": [c.encode() for c in classes], b"num_cases_per_batch": N, b"num_vis": 3072}


def official_batches():
    """{file name: batch dict or meta dict} for the seven files, before pickling."""
    batches = {name: make_batch(b * N, label=f"training batch {b + 1} of 5")
               for b, name in enumerate(data.TRAIN_FILES)}
    batches[data.TEST_FILE] = make_batch(TEST_FIRST, label="testing batch 1 of 1")
    batches[data.META_FILE] = make_meta()
    return batches


def pickle_all(batches) -> dict[str, bytes]:
    return {name: obj if isinstance(obj, bytes) else py2_dumps(obj) for name, obj in batches.items()}


def write_archive(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{data.DIR_NAME}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def write_directory(root, files: dict[str, bytes]):
    folder = root / data.DIR_NAME
    folder.mkdir(parents=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def globals_named(blob: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(blob) if op.name in ("GLOBAL", "STACK_GLOBAL")}


@pytest.fixture
def files():
    return pickle_all(official_batches())


@pytest.fixture
def archive(tmp_path, files):
    return write_archive(tmp_path / data.ARCHIVE_NAME, files)


# ---- loading the official format ----

def test_synthetic_files_name_the_same_globals_as_the_real_ones(files):
    for name in data.TRAIN_FILES + (data.TEST_FILE,):
        assert globals_named(files[name]) == REAL_GLOBALS, name
    assert globals_named(files[data.META_FILE]) == set()


@pytest.mark.parametrize("form", ["archive", "extracted directory", "directory holding the archive",
                                  "directory holding the extracted directory"])
def test_load_puts_every_pixel_and_label_in_place(tmp_path, files, form):
    if form == "archive":
        path = write_archive(tmp_path / data.ARCHIVE_NAME, files)
    elif form == "directory holding the archive":
        write_archive(tmp_path / data.ARCHIVE_NAME, files)
        path = tmp_path
    elif form == "extracted directory":
        path = write_directory(tmp_path, files)
    else:
        write_directory(tmp_path, files)
        path = tmp_path
    d = load_cifar10(path)
    assert d.train_images.shape == (5 * N, 3, 32, 32) and d.train_images.dtype == np.uint8
    assert d.test_images.shape == (N, 3, 32, 32) and d.test_images.dtype == np.uint8
    assert d.train_labels.dtype == np.int64 and d.test_labels.dtype == np.int64
    # Training images come in file order: data_batch_1 first, data_batch_5 last.
    np.testing.assert_array_equal(d.train_images, expected_images(0, 5 * N))
    np.testing.assert_array_equal(d.train_labels, expected_labels(0, 5 * N))
    np.testing.assert_array_equal(d.test_images, expected_images(TEST_FIRST, N))
    np.testing.assert_array_equal(d.test_labels, expected_labels(TEST_FIRST, N))
    assert d.classes == CLASSES
    assert "train: 20 images" in repr(d)


def test_one_red_pixel_lands_in_channel_0_at_its_row_and_column(tmp_path):
    batches = official_batches()
    row = np.zeros(3072, np.uint8)
    row[0 * 1024 + 5 * 32 + 20] = 255            # R plane first, then row 5, column 20
    batches["data_batch_1"][b"data"][0] = row
    d = load_cifar10(write_archive(tmp_path / "c.tar.gz", pickle_all(batches)))
    assert list(zip(*np.nonzero(d.train_images[0]))) == [(0, 5, 20)]


def test_limit_keeps_the_first_images_of_each_split(archive):
    d = load_cifar10(archive, limit=3)
    np.testing.assert_array_equal(d.train_images, expected_images(0, 3))
    np.testing.assert_array_equal(d.test_labels, expected_labels(TEST_FIRST, 3))
    with pytest.raises(ValueError, match="limit"):
        load_cifar10(archive, limit=0)


def test_pickles_written_by_numpy2_load_too():
    images = np.arange(6, dtype=np.uint8).reshape(2, 3)
    blob = py2_dumps({b"data": images}, numpy1_names=False)
    assert "numpy._core.multiarray _reconstruct" in globals_named(blob)
    out = RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    np.testing.assert_array_equal(out[b"data"], images)


# ---- malicious pickles are refused before they run ----

class RunsOnLoad:
    """Unpickling this calls func(*args): the classic pickle attack."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def attacks(marker):
    """Payloads that would create `marker` if they ran, and the global each names."""
    return [
        (RunsOnLoad(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        # Protocol 2 writes builtins under its Python 2 name, __builtin__.
        (RunsOnLoad(eval, f"open({str(marker)!r}, 'w').close()"), "__builtin__.eval"),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["os.system", "builtins.eval"])
def test_a_malicious_batch_in_an_archive_is_refused_and_never_runs(tmp_path, which):
    marker = tmp_path / "pwned"
    payload, global_name = attacks(marker)[which]
    batches = official_batches()
    batches["data_batch_2"][b"data"] = payload
    files = pickle_all(batches)
    # The attack is live: the pickle names the dangerous function.
    assert global_name.replace(".", " ", 1) in globals_named(files["data_batch_2"])
    for path in (write_archive(tmp_path / "evil.tar.gz", files), write_directory(tmp_path, files)):
        with pytest.raises(ValueError, match=f"data_batch_2.*refused to load global '{global_name}'"):
            load_cifar10(path)
    assert not marker.exists()


def test_the_unpickler_refuses_with_an_unpickling_error(tmp_path):
    marker = tmp_path / "pwned"
    for payload, global_name in attacks(marker):
        with pytest.raises(pickle.UnpicklingError, match=f"refused to load global '{global_name}'"):
            RestrictedUnpickler(io.BytesIO(py2_dumps(payload)), encoding="bytes").load()
    # A Python 3 pickle of bytes at protocol 2 calls _codecs.encode, which no real file needs.
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps({b"data": b"x"}, protocol=2)), encoding="bytes").load()
    assert not marker.exists()


# ---- bad files give clear errors ----

def test_a_missing_path_is_file_not_found(tmp_path):
    missing = tmp_path / "nowhere" / data.ARCHIVE_NAME
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_cifar10(missing)


def test_a_truncated_or_foreign_archive_is_a_value_error(tmp_path, archive):
    blob = archive.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated.tar.gz as a gzipped tar archive"):
        load_cifar10(truncated)
    not_gzip = tmp_path / "notes.txt"
    not_gzip.write_text("not an archive")
    with pytest.raises(ValueError, match="notes.txt as a gzipped tar archive"):
        load_cifar10(not_gzip)


def test_a_missing_member_is_named(tmp_path, files):
    del files[data.TEST_FILE]
    with pytest.raises(ValueError, match="cifar-10-batches-py/test_batch"):
        load_cifar10(write_archive(tmp_path / "c.tar.gz", files))
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(write_directory(tmp_path, files))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """The uncompressed tar of the seven files, as write_archive lays them out."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{data.DIR_NAME}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def test_a_flipped_bit_fails_the_gzip_crc_and_names_the_file(tmp_path, files):
    # compresslevel=0 stores the tar bytes as they are (deflate's stored blocks), so one bit of a
    # pixel can be flipped in the file itself: the deflate stream stays valid, only the CRC-32 in
    # the gzip trailer disagrees. The tar reader stops before that trailer; before the fix such an
    # archive loaded with one changed pixel.
    path = tmp_path / data.ARCHIVE_NAME
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=0, mtime=0) as gz:
        gz.write(tar_bytes(files))
    blob = bytearray(path.read_bytes())
    row = bytes(expected_images(2 * N + 1, 1).reshape(-1))      # image 9, in data_batch_3
    at = bytes(blob).find(row[:200]) + 100                      # a pixel of some image's row
    assert at >= 100
    blob[at] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(gzip.BadGzipFile, match="CRC check failed"):
        gzip.decompress(bytes(blob))                           # what `gzip -t` reports
    with pytest.raises(ValueError, match=f"{path}.*corrupt or truncated.*CRC check failed"):
        load_cifar10(path)


def test_tar_headers_that_stop_mid_archive_are_called_corrupt(tmp_path, files):
    # A damaged header inside an intact gzip stream (its checksum no longer matches): the tar
    # reader takes it for the end of the archive. The members after it are "missing", and the
    # message must say why rather than suggest a different layout.
    tar = bytearray(tar_bytes(files))
    second = tar.find(f"{data.DIR_NAME}/{data.TRAIN_FILES[1]}".encode())
    assert second % 512 == 0 and second > 0
    tar[second + 5] ^= 0x01                                    # one bit of the member's name
    path = tmp_path / data.ARCHIVE_NAME
    path.write_bytes(gzip.compress(bytes(tar), mtime=0))
    with pytest.raises(ValueError, match=f"{path} has no member .*data_batch_2.*the archive is corrupt"):
        load_cifar10(path)


def test_a_member_above_its_size_limit_is_refused_before_it_is_read(tmp_path, files, monkeypatch):
    # A decompression bomb in miniature: data_batch_1 is 3 MB of zeros (3 KB of gzip) and the
    # limit is lowered to 1 MB. Before the fix the whole member was read, then failed to unpickle.
    monkeypatch.setattr(data, "MAX_BATCH_BYTES", 2**20)
    files["data_batch_1"] = bytes(3 * 2**20)
    path = write_archive(tmp_path / data.ARCHIVE_NAME, files)
    assert path.stat().st_size < 100_000
    reads = []
    real_extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: reads.append(m.name) or real_extractfile(self, m))
    with pytest.raises(ValueError, match=f"{path}: data_batch_1 holds 3145728 bytes, more than the 1048576"):
        load_cifar10(path)
    assert f"{data.DIR_NAME}/data_batch_1" not in reads        # refused from its header alone
    # batches.meta has a limit of its own, and the extracted directory is checked the same way.
    monkeypatch.setattr(data, "MAX_META_BYTES", 100)
    files["data_batch_1"] = pickle_all(official_batches())["data_batch_1"]
    with pytest.raises(ValueError, match="batches.meta holds .* bytes, more than the 100 bytes"):
        load_cifar10(write_directory(tmp_path, files))


def test_the_whole_archive_has_a_size_limit_too(tmp_path, files, monkeypatch):
    # Members that are not read (and padding after the end) are still decompressed to be skipped:
    # 3 MB of zeros in a member named "junk", with the archive's limit lowered to 1 MB.
    monkeypatch.setattr(data, "MAX_ARCHIVE_BYTES", 2**20)
    path = write_archive(tmp_path / data.ARCHIVE_NAME, {**files, "junk": bytes(3 * 2**20)})
    with pytest.raises(ValueError, match=f"{path} unpacks to at least 3.* bytes, more than the 1048576 bytes"):
        load_cifar10(path)
    tar = tar_bytes(files) + bytes(3 * 2**20)                  # the same zeros after the end of the tar
    path.write_bytes(gzip.compress(tar, mtime=0))
    with pytest.raises(ValueError, match=f"{path} unpacks to at least .*, more than the 1048576 bytes"):
        load_cifar10(path)


def test_a_member_whose_header_claims_a_huge_size_is_refused_at_once(tmp_path, files):
    # The header says 1 TiB and no data follows: refused from the header, never allocated or read.
    tar = bytearray(tar_bytes({"data_batch_1": files["data_batch_1"]}))
    info = tarfile.TarInfo(f"{data.DIR_NAME}/data_batch_1")
    info.size = 2**40
    tar[:512] = info.tobuf(format=tarfile.GNU_FORMAT)[:512]
    path = tmp_path / data.ARCHIVE_NAME
    path.write_bytes(gzip.compress(bytes(tar[:512 + 1024]), mtime=0))
    with pytest.raises(ValueError, match=f"{path}: data_batch_1 holds 1099511627776 bytes, more than"):
        load_cifar10(path)


def test_class_names_in_utf8_load_and_undecodable_ones_name_the_file(tmp_path):
    batches = official_batches()
    batches[data.META_FILE] = make_meta(["caf\u00e9", *CLASSES[1:]])
    assert load_cifar10(write_archive(tmp_path / "a.tar.gz", pickle_all(batches))).classes[0] == "caf\u00e9"
    batches[data.META_FILE][b"label_names"][0] = b"\xff\xfe"
    path = write_archive(tmp_path / "b.tar.gz", pickle_all(batches))
    with pytest.raises(ValueError, match=rf"{path} \(batches.meta\): class name b'\\xff\\xfe' is not UTF-8"):
        load_cifar10(path)


def setting(key, make):
    """A change to a batch dict: batch[key] = make(batch)."""
    return lambda batch: batch.update({key: make(batch)})


# case: (file, change, the error message expected). A change either edits the file's dict in place
# (and returns None) or returns what to store in the file instead; bytes are stored as they are.
BAD_BATCHES = {
    "garbage bytes": ("data_batch_3", lambda b: b"\x80\x02not a pickle", "data_batch_3.*not a valid"),
    "cut-off pickle": ("data_batch_3", lambda b: py2_dumps(b)[:1000], "data_batch_3.*not a valid"),
    "not a dict": ("test_batch", lambda b: [1, 2, 3], "test_batch.*expected a dict"),
    "no labels": ("test_batch", lambda b: {b"data": b[b"data"]}, "test_batch.*expected a dict with keys"),
    "wrong row length": ("data_batch_1", setting(b"data", lambda b: b[b"data"][:, :3000]), r"shape \(B, 3072\)"),
    "wrong dtype": ("data_batch_1", setting(b"data", lambda b: b[b"data"].astype(np.float32)), "uint8 array"),
    "label too big": ("data_batch_4", setting(b"labels", lambda b: [10] * N), r"0\.\.9, found \[10\]"),
    "negative label": ("test_batch", setting(b"labels", lambda b: [-1] * N), r"0\.\.9, found \[-1\]"),
    "label missing": ("data_batch_5", setting(b"labels", lambda b: [0] * (N - 1)), "4 images but 3 labels"),
    "labels not ints": ("data_batch_5", setting(b"labels", lambda b: [b"cat"] * N), "list of integers"),
    "nine classes": ("batches.meta", setting(b"label_names", lambda m: [b"cat"] * 9), "list of 10 names"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_a_bad_batch_is_a_value_error_naming_the_file(tmp_path, case):
    name, change, message = BAD_BATCHES[case]
    batches = official_batches()
    replacement = change(batches[name])
    if replacement is not None:
        batches[name] = replacement
    with pytest.raises(ValueError, match=message):
        load_cifar10(write_archive(tmp_path / "c.tar.gz", pickle_all(batches)))


# ---- the real archive ----

@pytest.fixture(scope="module")
def real(cifar_archive):
    return load_cifar10(cifar_archive)


def test_real_archive_has_the_official_splits(real):
    assert real.train_images.shape == (50000, 3, 32, 32) and real.train_images.dtype == np.uint8
    assert real.test_images.shape == (10000, 3, 32, 32) and real.test_images.dtype == np.uint8
    assert real.train_labels.shape == (50000,) and real.train_labels.dtype == np.int64
    assert real.test_labels.shape == (10000,) and real.test_labels.dtype == np.int64
    assert real.train_images.flags.c_contiguous and real.test_images.flags.c_contiguous
    np.testing.assert_array_equal(np.bincount(real.train_labels, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(real.test_labels, minlength=10), [1000] * 10)
    assert real.classes == CLASSES


def test_real_archive_names_only_the_allowed_globals(cifar_archive):
    with tarfile.open(cifar_archive, "r:gz") as tar:
        first = next(iter(tar))                   # data_batch_1 comes first: no need to read the rest
        assert first.name == f"{data.DIR_NAME}/data_batch_1"
        assert globals_named(tar.extractfile(first).read()) == REAL_GLOBALS


def test_mean_and_std_constants_match_the_real_training_set(real):
    levels = np.arange(256) / 255.0
    for c in range(3):
        # A histogram of the 256 levels gives the exact mean and std without a float copy of the data.
        counts = np.bincount(real.train_images[:, c].ravel(), minlength=256) / real.train_images[:, c].size
        mean = counts @ levels
        std = np.sqrt(counts @ (levels - mean) ** 2)
        assert abs(mean - CIFAR10_MEAN[c]) < 1e-4 and abs(std - CIFAR10_STD[c]) < 1e-4, (c, mean, std)


# ---- normalize ----

def test_normalize_subtracts_the_mean_and_divides_by_the_std():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    images[0] = 255
    out = normalize(images, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out[1, :, 0, 0], [-1.0, -1.0, 0.0], rtol=1e-6)
    assert normalize(images, CIFAR10_MEAN, CIFAR10_STD, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("mean, std, message", [
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), "std must be > 0"),
    ((0.5, 0.5, 0.5), (0.2, -0.1, 0.2), "std must be > 0"),
    ((0.5, float("nan"), 0.5), (0.2, 0.2, 0.2), "mean must be finite"),
    ((0.5, 0.5, 0.5), (0.2, float("inf"), 0.2), "std must be finite"),
])
def test_normalize_refuses_a_zero_or_non_finite_std_or_mean_naming_it(mean, std, message):
    # Before: std 0 gave inf pixels and a later "images contain NaN or infinite values" from the model.
    images = np.zeros((1, 3, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=message):
        normalize(images, mean, std)


def test_normalize_refuses_floats_and_wrong_channels():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    with pytest.raises(TypeError, match="uint8"):     # normalizing twice would pass floats
        normalize(images.astype(np.float32), CIFAR10_MEAN, CIFAR10_STD)
    with pytest.raises(ValueError, match="one mean and std per channel"):
        normalize(images[:, :2], CIFAR10_MEAN, CIFAR10_STD)


# ---- augmentation ----

@pytest.fixture
def batch(rng):
    """32 random images with no zero pixel, so the zero padding a crop brings in is visible."""
    return rng.integers(1, 256, size=(32, 3, 32, 32), dtype=np.uint8)


def shifted(image, dy, dx):
    """image moved so that out[:, h, w] = image[:, h + dy, w + dx], zero where that falls outside.
    Written with plain slices, as a reference for random_crop."""
    _, H, W = image.shape
    out = np.zeros_like(image)
    out[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)] = \
        image[:, max(0, dy):H + min(0, dy), max(0, dx):W + min(0, dx)]
    return out


def test_augment_is_deterministic_for_a_seed(batch):
    a = augment(batch, np.random.default_rng(7))
    b = augment(batch, np.random.default_rng(7))
    c = augment(batch, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == batch.shape and a.dtype == batch.dtype


@pytest.mark.parametrize("shape, dtype", [((5, 3, 32, 32), np.uint8), ((4, 2, 8, 12), np.float32)])
def test_random_crop_keeps_shape_and_dtype(rng, shape, dtype):
    images = rng.integers(0, 256, size=shape).astype(dtype)
    out = random_crop(images, rng, padding=3)
    assert out.shape == shape and out.dtype == dtype


def test_random_crop_with_no_padding_is_the_identity(batch, rng):
    np.testing.assert_array_equal(random_crop(batch, rng, padding=0), batch)


def test_each_crop_is_a_shifted_copy_of_its_image(batch, rng):
    p = 4
    out = random_crop(batch, rng, padding=p)
    shifts = []
    for image, crop in zip(batch, out):            # 32 images x 81 shifts: small
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if np.array_equal(crop, shifted(image, dy, dx))]
        assert len(matches) == 1, matches          # exactly one shift within +-p explains the crop
        shifts += matches
    assert len(set(shifts)) > 10                   # and the shifts differ from image to image


@pytest.mark.parametrize("p", [1, 2, 3])
def test_every_shift_from_minus_p_to_plus_p_occurs_each_way(p):
    # One 1 x 7 x 7 image whose pixels are 1..49, many times over: the centre pixel of a crop tells
    # its shift. Offsets drawn from [0, 2p) instead of [0, 2p] would never shift by +p.
    image = np.arange(1, 50, dtype=np.uint8).reshape(1, 1, 7, 7)
    crops = random_crop(np.repeat(image, 2000, axis=0), np.random.default_rng(0), padding=p)
    centre = crops[:, 0, 3, 3].astype(int) - 1                      # = image index (3 + dy) * 7 + (3 + dx)
    seen = {(v // 7 - 3, v % 7 - 3) for v in centre}
    assert seen == {(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)}   # all (2p+1)^2


def test_flip_mirrors_about_half_the_images_and_twice_is_the_identity(batch):
    out = random_flip(batch, np.random.default_rng(3))
    mirrored = [np.array_equal(o, b[..., ::-1]) for o, b in zip(out, batch)]
    kept = [np.array_equal(o, b) for o, b in zip(out, batch)]
    assert all(m != k for m, k in zip(mirrored, kept))   # each image is either mirrored or untouched
    assert 0 < sum(mirrored) < len(batch)
    np.testing.assert_array_equal(random_flip(out, np.random.default_rng(3)), batch)  # same draws undo it
    # Many 1 x 2 images [0, 1]: a mirrored one reads [1, 0]. 20000 draws: the fraction's std is 0.0035.
    pairs = np.broadcast_to(np.array([0, 1], np.uint8), (20000, 1, 1, 2))
    fraction = random_flip(pairs, np.random.default_rng(0))[:, 0, 0, 0].mean()
    assert abs(fraction - 0.5) < 0.02


def test_augmentation_checks_its_arguments(batch, rng):
    with pytest.raises(TypeError, match="Generator"):
        augment(batch, 0)
    with pytest.raises(TypeError, match=r"\(B, C, H, W\)"):
        random_flip(batch[0], rng)
    with pytest.raises(ValueError, match="padding"):
        random_crop(batch, rng, padding=-1)


# ---- batching ----

def numbered(n):
    """n one-pixel images holding their own index, and labels equal to it, to check pairing."""
    return np.arange(n).reshape(n, 1, 1, 1), np.arange(n)


def test_batches_cover_every_index_once_in_a_new_order_each_epoch(rng):
    images, labels = numbered(103)
    epochs = []
    for _ in range(2):
        batches = list(iterate_batches(images, labels, 10, rng))
        assert [len(y) for _, y in batches] == [10] * 10 + [3]
        for x, y in batches:
            np.testing.assert_array_equal(x[:, 0, 0, 0], y)          # images stay with their labels
        order = np.concatenate([y for _, y in batches])
        np.testing.assert_array_equal(np.sort(order), np.arange(103))
        epochs.append(order)
    assert not np.array_equal(epochs[0], epochs[1])
    first = np.concatenate([y for _, y in iterate_batches(images, labels, 10, np.random.default_rng(0))])
    np.testing.assert_array_equal(first, epochs[0])                     # reproducible from the seed


def test_drop_last_and_no_shuffle(rng):
    images, labels = numbered(10)
    assert [len(y) for _, y in iterate_batches(images, labels, 4, rng)] == [4, 4, 2]
    assert [len(y) for _, y in iterate_batches(images, labels, 4, rng, drop_last=True)] == [4, 4]
    assert [len(y) for _, y in iterate_batches(images, labels, 5, rng, drop_last=True)] == [5, 5]
    in_order = [y.tolist() for _, y in iterate_batches(images, labels, 4, shuffle=False)]
    assert in_order == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batching_checks_its_arguments_when_called(rng):
    images, labels = numbered(10)
    with pytest.raises(ValueError, match="shuffle=True needs rng"):
        iterate_batches(images, labels, 4)                 # fails at the call, before any next()
    with pytest.raises(ValueError, match="10 images, 9 labels"):
        iterate_batches(images, labels[:9], 4, rng)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(images, labels, 0, rng)


# ---- finding and downloading ----

@pytest.fixture
def env(tmp_path, monkeypatch):
    """No $MINIVIT_DATA, the cache under tmp_path, and a download URL that leads nowhere."""
    monkeypatch.delenv("MINIVIT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "no-such-file.tar.gz").as_uri())
    return tmp_path / "xdg" / "minivit"


def place_archive(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    return write_archive(folder / data.ARCHIVE_NAME, files)


def test_find_looks_at_the_argument_then_the_variable_then_the_cache(env, tmp_path, files, monkeypatch):
    given, variable = place_archive(tmp_path / "given", files), place_archive(tmp_path / "variable", files)
    cached = place_archive(env, files)
    monkeypatch.setenv("MINIVIT_DATA", str(variable.parent))
    assert find_cifar10(given.parent) == given
    assert find_cifar10() == variable
    monkeypatch.delenv("MINIVIT_DATA")
    assert find_cifar10() == cached


def test_the_cache_defaults_to_home(tmp_path, files, monkeypatch, env):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cached = place_archive(tmp_path / "home" / ".cache" / "minivit", files)
    assert find_cifar10(download=False) == cached


def test_find_accepts_the_archive_or_the_extracted_directory(env, tmp_path, files):
    archive = place_archive(tmp_path / "a", files)
    extracted = write_directory(tmp_path / "b", files)
    assert find_cifar10(archive) == archive
    assert find_cifar10(extracted) == extracted
    assert find_cifar10(extracted.parent) == extracted
    assert load_cifar10(find_cifar10(str(extracted.parent))).classes == CLASSES


def test_a_path_asked_for_must_hold_the_data(env, tmp_path, files, monkeypatch):
    place_archive(env, files)                              # the cache has it, but it is not what was asked for
    with pytest.raises(FileNotFoundError, match="empty.*--data"):
        find_cifar10(tmp_path / "empty")
    monkeypatch.setenv("MINIVIT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere.*MINIVIT_DATA"):
        find_cifar10()


def test_not_found_without_download_says_what_to_do(env):
    with pytest.raises(FileNotFoundError, match="--data PATH.*MINIVIT_DATA") as error:
        find_cifar10(download=False)
    assert str(env) in str(error.value)
    assert not env.exists()


def test_download_from_a_file_url_checks_the_md5_and_renames(env, tmp_path, files, monkeypatch):
    server = place_archive(tmp_path / "server", files)
    monkeypatch.setattr(data, "CIFAR10_URL", server.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(server.read_bytes()).hexdigest())
    path = find_cifar10()
    assert path == env / data.ARCHIVE_NAME
    assert path.read_bytes() == server.read_bytes()
    assert sorted(p.name for p in env.iterdir()) == [data.ARCHIVE_NAME]   # no temporary file left
    assert load_cifar10(path).classes == CLASSES
    server.unlink()                                        # a second call finds the cached copy
    assert find_cifar10() == path


def test_a_download_with_the_wrong_md5_leaves_nothing_behind(env, tmp_path, files, monkeypatch):
    server = place_archive(tmp_path / "server", files)
    monkeypatch.setattr(data, "CIFAR10_URL", server.as_uri())
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(ValueError, match="md5 .* expected 0{32}"):
        find_cifar10()
    assert list(env.iterdir()) == []


def test_a_failed_download_says_what_to_do(env):
    with pytest.raises(FileNotFoundError, match="download of .* failed.*--data PATH.*MINIVIT_DATA"):
        find_cifar10()
    assert list(env.iterdir()) == []


# ---- what the lessons use ----

def test_lessons_find_shared_data_above_the_working_directory_after_the_usual_places(env, tmp_path, files,
                                                                                      monkeypatch):
    shared = place_archive(tmp_path / "project" / "shared" / "data", files)
    deep = tmp_path / "project" / "checkout" / "lessons"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    with pytest.raises(FileNotFoundError):
        find_cifar10(download=False)                       # the CLI never looks above the working directory
    assert find_cifar10(download=False, search_parents=True) == shared
    cached = place_archive(env, files)
    assert find_cifar10(download=False, search_parents=True) == cached    # the cache still comes first
    loaded = data.cifar10_for_lessons(limit=3)
    assert not loaded.synthetic and loaded.classes == CLASSES and len(loaded.train_images) == 3


def test_lessons_fall_back_to_labelled_synthetic_images_without_downloading(env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # No copy anywhere: not in the cache (env), and none of the name searched for above tmp_path (a
    # real shared/data may sit beside the checkout, or above the temporary folder).
    monkeypatch.setattr(data, "ARCHIVE_NAME", "no-such-archive.tar.gz")
    fallback = data.cifar10_for_lessons()                  # env points the download URL nowhere: not tried
    assert "SYNTHETIC" in capsys.readouterr().out
    assert fallback.synthetic and "SYNTHETIC" in repr(fallback) and "not CIFAR-10" in fallback.source
    assert fallback.train_images.shape == (2000, 3, 32, 32) and fallback.train_images.dtype == np.uint8
    assert fallback.test_labels.dtype == np.int64 and set(np.unique(fallback.train_labels)) == set(range(10))
    # learnable: each class has its own mean colour, so the nearest class mean gets most test images right
    means = np.stack([fallback.train_images[fallback.train_labels == k].mean(axis=(0, 2, 3)) for k in range(10)])
    test_colours = fallback.test_images.mean(axis=(2, 3))                               # (n, C)
    nearest = np.argmin(((test_colours[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == fallback.test_labels).mean() > 0.9
    again = data.synthetic_cifar10(seed=0)
    assert np.array_equal(again.train_images, fallback.train_images)                  # seeded
