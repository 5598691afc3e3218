"""Tests for the Fashion-MNIST and smallNORB modules: reading, malformed files, preprocessing, viewpoint
splits, download and the registry.

Every file is generated here in its official format (IDX through data/idx.py's writer, smallNORB's
binary matrices through data/norb_matrix.py's), a few dozen 96x96 stereo pairs at most. No test touches
the network: downloads go through `FakeUrlopen`.
"""

import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import data as datasets
from data import download, fashion_mnist, idx, norb_matrix, smallnorb
from data import smallnorb_preprocess as prep
from data_fakes import FakeUrlopen, mirror_responses, raise_data_error

_PAIRS = 24  # Stereo pairs per generated smallNORB split: a few dozen.
_RAW = smallnorb.RAW_SIZE
_SMALL = smallnorb.DOWNSAMPLED_SIZE
_CROP = smallnorb.IMAGE_SIZE
_FASHION_SIZE = fashion_mnist.IMAGE_SIZE
_DAT, _CAT, _INFO = "dat.mat.gz", "cat.mat.gz", "info.mat.gz"


# ---------------------------------------------------------------------------
# Generated files
# ---------------------------------------------------------------------------


def _norb_name(split, kind):
    """The published name of a split's `kind` file (_DAT, _CAT or _INFO)."""
    return next(name for name in smallnorb.FILES if f"-{split}ing-" in name and name.endswith(kind))


def _norb_arrays(count=_PAIRS, seed=0):
    """(pairs uint8 [N, 2, 96, 96], categories int32 [N] cycling 0..4, info int32 [N, 4] in range)."""
    rng = np.random.RandomState(seed)
    pairs = rng.randint(0, 256, size=(count, smallnorb.STEREO, _RAW, _RAW)).astype(np.uint8)
    categories = (np.arange(count) % smallnorb.NUM_CLASSES).astype(np.int32)
    rows = np.arange(count)
    info = np.stack([rows % 10, rows % 9, 2 * (rows % 18), rows % 6], axis=1).astype(np.int32)  # [N, 4]
    return pairs, categories, info


def _write_norb_split(data_dir, split, arrays, compressed=True):
    """Writes a split's dat, cat and info files under their published names (.mat.gz or .mat)."""
    for kind, array in zip((_DAT, _CAT, _INFO), arrays):
        name = _norb_name(split, kind)
        norb_matrix.write_matrix(os.path.join(data_dir, name if compressed else name[: -len(".gz")]), array)


def _write_fashion_split(data_dir, split, count, compressed=True, seed=0):
    """Writes Fashion-MNIST-format IDX files for `split`; returns (images, labels) written."""
    images = np.random.RandomState(seed).randint(0, 256, (count, _FASHION_SIZE, _FASHION_SIZE)).astype(np.uint8)
    labels = (np.arange(count) % fashion_mnist.NUM_CLASSES).astype(np.uint8)
    for name, array in zip(fashion_mnist._SPLIT_FILES[split], (images, labels)):
        idx.write_idx(os.path.join(data_dir, name if compressed else name[: -len(".gz")]), array)
    return images, labels


@pytest.fixture
def norb_dir(tmp_path):
    """A data directory with a generated smallNORB train split (gzip) and test split (raw).

    Returns:
        (data_dir, {split: (pairs, categories, info)}).
    """
    arrays = {"train": _norb_arrays(seed=1), "test": _norb_arrays(seed=2)}
    _write_norb_split(str(tmp_path), "train", arrays["train"], compressed=True)
    _write_norb_split(str(tmp_path), "test", arrays["test"], compressed=False)
    return str(tmp_path), arrays


def _expected_images(pairs, channels):
    """NumPy reference of `load`'s images: uint8 [N, 96, 96, K] from pairs [N, 2, 96, 96]."""
    return np.stack([pairs[:, k] for k in range(channels)], axis=-1)


# ---------------------------------------------------------------------------
# The binary-matrix format
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("file_name", ["m.mat.gz", "m.mat"], ids=["gzip", "raw"])
@pytest.mark.parametrize("shape", [(5,), (5, 4), (3, 2, 7, 7)], ids=["1d", "2d", "4d"])
def test_matrix_round_trip(tmp_path, dtype, file_name, shape):
    """write_matrix then read_matrix gives back the array, every element type, gzip and raw."""
    array = (np.arange(np.prod(shape)) - 3).reshape(shape).astype(dtype)
    path = str(tmp_path / file_name)
    norb_matrix.write_matrix(path, array)
    assert (open(path, "rb").read(2) == b"\x1f\x8b") == file_name.endswith(".gz")
    result = norb_matrix.read_matrix(path)
    assert result.dtype == np.dtype(dtype) and result.shape == shape
    np.testing.assert_array_equal(result, array)


def test_matrix_header_layout(tmp_path):
    """A 1-D int32 file starts with magic 0x1E3D4C54, ndim 1 and three dimension words [N, 1, 1],
    all little-endian int32, as the smallNORB page's cat files do."""
    path = str(tmp_path / "cat.mat")
    norb_matrix.write_matrix(path, np.array([4, 0, 2], np.int32))
    words = struct.unpack("<8i", open(path, "rb").read())
    assert words == (0x1E3D4C54, 1, 3, 1, 1, 4, 0, 2)


def test_write_matrix_rejects_unsupported(tmp_path):
    """int64 arrays and 0-d arrays have no binary-matrix magic number."""
    with pytest.raises(ValueError):
        norb_matrix.write_matrix(str(tmp_path / "x"), np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        norb_matrix.write_matrix(str(tmp_path / "x"), np.uint8(3))


# ---------------------------------------------------------------------------
# smallnorb.load / load_info
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"], ids=["gzip", "raw"])
@pytest.mark.parametrize("channels", [1, 2])
def test_load_smallnorb(norb_dir, split, channels):
    """load gives uint8 [N, 96, 96, K] (K=1: first image of each pair; K=2: both) and int64 labels, from
    .mat.gz (train) and .mat (test) files."""
    data_dir, arrays = norb_dir
    pairs, categories, _ = arrays[split]
    images, labels = smallnorb.load(data_dir, split, channels=channels)
    assert images.dtype == np.uint8 and images.shape == (_PAIRS, _RAW, _RAW, channels)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(images, _expected_images(pairs, channels))
    np.testing.assert_array_equal(labels, categories)


@pytest.mark.parametrize("chunk_pairs", [1, 5, _PAIRS + 3])
def test_load_smallnorb_in_chunks(norb_dir, monkeypatch, chunk_pairs):
    """The image file is streamed in chunks (one pair, 5 with a remainder, more than the file) with the
    same result."""
    data_dir, arrays = norb_dir
    monkeypatch.setattr(smallnorb, "_READ_CHUNK_BYTES", chunk_pairs * smallnorb.STEREO * _RAW * _RAW)
    images, _ = smallnorb.load(data_dir, "train", channels=2)
    np.testing.assert_array_equal(images, _expected_images(arrays["train"][0], 2))


def test_load_smallnorb_info(norb_dir):
    """load_info gives the int64 [N, 4] (instance, elevation, azimuth, lighting) table."""
    data_dir, arrays = norb_dir
    info = smallnorb.load_info(data_dir, "test")
    assert info.dtype == np.int64 and info.shape == (_PAIRS, len(smallnorb.INFO_COLUMNS))
    np.testing.assert_array_equal(info, arrays["test"][2])


def test_load_smallnorb_bad_arguments(norb_dir):
    """An unknown split or a channel count other than 1 or 2 is a ValueError, not a data problem."""
    data_dir, _ = norb_dir
    with pytest.raises(ValueError):
        smallnorb.load(data_dir, "validation")
    with pytest.raises(ValueError):
        smallnorb.load(data_dir, "train", channels=3)
    with pytest.raises(ValueError):
        smallnorb.load_info(data_dir, "valid")


def _rewrite(data_dir, kind, array):
    """Replaces the raw test split's `kind` file by `array` written as a binary matrix."""
    norb_matrix.write_matrix(os.path.join(data_dir, _norb_name("test", kind)[: -len(".gz")]), array)


def _edit_bytes(data_dir, kind, edit):
    """Replaces the raw test split's `kind` file's bytes by edit(bytes)."""
    path = os.path.join(data_dir, _norb_name("test", kind)[: -len(".gz")])
    content = open(path, "rb").read()
    open(path, "wb").write(edit(content))


def _gzip_then_cut(data_dir, kind):
    """Replaces the raw test split's `kind` file by the first half of its gzip compression."""
    path = os.path.join(data_dir, _norb_name("test", kind)[: -len(".gz")])
    compressed = gzip.compress(open(path, "rb").read(), mtime=0)
    open(path, "wb").write(compressed[: len(compressed) // 2])


def _set_info(data_dir, info, column, value):
    """Rewrites the test info file with `value` in row 3 of `column`."""
    info = info.copy()
    info[3, column] = value
    _rewrite(data_dir, _INFO, info)


_BAD_MAGIC = struct.pack("<i", 0x1E3D4C50)  # 0x1E3D4C50: not one of the five element types.

# case id -> (what to do to the raw test split given (data_dir, (pairs, categories, info)), message text).
_MALFORMED = {
    "bad-magic": (lambda d, a: _edit_bytes(d, _DAT, lambda b: _BAD_MAGIC + b[4:]), "magic number 0x1E3D4C50"),
    "empty-file": (lambda d, a: _edit_bytes(d, _CAT, lambda b: b""), "truncated binary-matrix header (0 bytes)"),
    "short-header": (lambda d, a: _edit_bytes(d, _INFO, lambda b: b[:10]), "truncated binary-matrix header"),
    "zero-dimensions": (
        lambda d, a: _edit_bytes(d, _CAT, lambda b: b[:4] + struct.pack("<i", 0) + b[8:]),
        "declares 0 dimensions",
    ),
    "negative-dimension": (
        lambda d, a: _edit_bytes(d, _CAT, lambda b: b[:8] + struct.pack("<i", -4) + b[12:]),
        "negative dimension",
    ),
    "short-dat": (lambda d, a: _edit_bytes(d, _DAT, lambda b: b[:-100]), "truncated binary-matrix payload"),
    "short-cat": (lambda d, a: _edit_bytes(d, _CAT, lambda b: b[:-4]), "truncated binary-matrix payload"),
    "trailing-bytes": (lambda d, a: _edit_bytes(d, _DAT, lambda b: b + b"\0"), "trailing bytes"),
    "truncated-gzip": (lambda d, a: _gzip_then_cut(d, _DAT), "truncated or corrupt gzip data"),
    "dat-fewer-pairs": (lambda d, a: _rewrite(d, _DAT, a[0][:-1]), f"{_PAIRS - 1} stereo pairs but"),
    "info-fewer-rows": (lambda d, a: _rewrite(d, _INFO, a[2][:-2]), f"{_PAIRS - 2} rows but"),
    "dat-not-uint8": (
        lambda d, a: _rewrite(d, _DAT, a[0][:, :, :4, :4].astype(np.int32)),
        "expected uint8 stereo pairs",
    ),
    "dat-48x48": (lambda d, a: _rewrite(d, _DAT, a[0][:, :, :_SMALL, :_SMALL]), "expected uint8 stereo pairs"),
    "cat-not-int32": (lambda d, a: _rewrite(d, _CAT, a[1].astype(np.uint8)), "expected int32 categories"),
    "info-3-columns": (lambda d, a: _rewrite(d, _INFO, a[2][:, :3]), "expected int32 info"),
    "label-5": (
        lambda d, a: _rewrite(d, _CAT, np.where(np.arange(_PAIRS) == 7, 5, a[1]).astype(np.int32)),
        "label 5 at index 7 is outside 0..4",
    ),
    "label-negative": (
        lambda d, a: _rewrite(d, _CAT, np.where(np.arange(_PAIRS) == 2, -1, a[1]).astype(np.int32)),
        "label -1 at index 2",
    ),
    "elevation-9": (lambda d, a: _set_info(d, a[2], 1, 9), "elevation 9 in row 3 is outside 0..8"),
    "azimuth-odd": (lambda d, a: _set_info(d, a[2], 2, 7), "azimuth 7 in row 3 is outside 0, 2, ..., 34"),
    "missing-file": (
        lambda d, a: os.remove(os.path.join(d, _norb_name("test", _CAT)[: -len(".gz")])),
        "file not found",
    ),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED), ids=sorted(_MALFORMED))
def test_load_smallnorb_malformed(norb_dir, case):
    """Every malformed test split raises a one-line DataError naming the file and what is wrong."""
    data_dir, arrays = norb_dir
    damage, expected = _MALFORMED[case]
    damage(data_dir, arrays["test"])
    message = raise_data_error(smallnorb.load, data_dir, "test")
    assert expected in message and "smallnorb-5x01235" in message


# ---------------------------------------------------------------------------
# Preprocessing: the fixed NumPy part
# ---------------------------------------------------------------------------


def test_downsample_is_block_average():
    """downsample equals a float64 loop over 2x2 blocks, float32 [N, 48, 48, K]."""
    images = np.random.RandomState(3).randint(0, 256, (3, _RAW, _RAW, 2)).astype(np.uint8)
    expected = np.zeros((3, _SMALL, _SMALL, 2))
    for n in range(3):
        for i in range(_SMALL):
            for j in range(_SMALL):
                expected[n, i, j] = images[n, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].astype(np.float64).mean(axis=(0, 1))
    result = prep.downsample(images)
    assert result.dtype == np.float32 and result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)  # a mean of 4 bytes is exact in float32
    with pytest.raises(ValueError):
        prep.downsample(images[:, :_SMALL])


def test_standardise_mean_zero_std_one(monkeypatch):
    """Each image gets mean 0 and std 1 over its pixels and channels, equal to a float64 reference, also
    across several chunks; a constant image becomes zeros, not NaN."""
    monkeypatch.setattr(prep, "_STANDARDISE_CHUNK", 2)
    images = np.random.RandomState(4).uniform(0, 255, (5, 6, 7, 2))
    images[4] = 17.0
    result = prep.standardise(images)
    assert result.dtype == np.float32 and result.shape == images.shape
    flat = images.reshape(5, -1)  # [N, H*W*K]
    expected = (flat - flat.mean(axis=1, keepdims=True)) / np.maximum(
        flat.std(axis=1, keepdims=True), 1 / np.sqrt(flat.shape[1])
    )
    np.testing.assert_allclose(result.reshape(5, -1), expected, atol=1e-5)
    np.testing.assert_allclose(result[:4].reshape(4, -1).mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(result[:4].reshape(4, -1).std(axis=1), 1, atol=1e-5)
    assert not np.any(result[4])


def test_preprocess_is_downsample_then_standardise():
    """preprocess: uint8 [N, 96, 96, K] -> float32 [N, 48, 48, K] = standardise(downsample(images))."""
    images = np.random.RandomState(5).randint(0, 256, (2, _RAW, _RAW, 1)).astype(np.uint8)
    result = prep.preprocess(images)
    assert result.shape == (2, _SMALL, _SMALL, 1)
    np.testing.assert_array_equal(result, prep.standardise(prep.downsample(images)))


def test_centre_crop_is_central_window():
    """centre_crop is rows and columns 8..39 of a 48x48 image, [N, 32, 32, K]."""
    images = np.arange(2 * _SMALL * _SMALL * 2).reshape(2, _SMALL, _SMALL, 2)
    margin = (_SMALL - _CROP) // 2
    np.testing.assert_array_equal(
        prep.centre_crop(images), images[:, margin : margin + _CROP, margin : margin + _CROP, :]
    )


def test_multi_crop_offsets():
    """13 distinct offsets, the centre first, then the (+-k, +-k) diagonals for k = 1, 2, 3; crop_at takes the
    window moved by each, and refuses one that leaves the image."""
    offsets = prep.multi_crop_offsets()
    assert len(offsets) == 13 and len(set(offsets)) == 13 and offsets[0] == (0, 0)
    assert set(offsets[1:]) == {(k * sy, k * sx) for k in (1, 2, 3) for sy in (1, -1) for sx in (1, -1)}
    images = np.random.RandomState(6).uniform(size=(3, _SMALL, _SMALL, 1))
    margin = (_SMALL - _CROP) // 2
    for dy, dx in offsets:
        top, left = margin + dy, margin + dx
        np.testing.assert_array_equal(prep.crop_at(images, (dy, dx)), images[:, top : top + _CROP, left : left + _CROP])
    with pytest.raises(ValueError):
        prep.crop_at(images, (margin + 1, 0))


# ---------------------------------------------------------------------------
# Preprocessing: the random TensorFlow part
# ---------------------------------------------------------------------------


def _run_draws(make_op, image, draws, seed=None):
    """Builds make_op(placeholder) in a fresh graph and evaluates it `draws` times on `image`."""
    with tf.Graph().as_default():
        image_in = tf.placeholder(tf.as_dtype(image.dtype), image.shape)
        op = make_op(image_in) if seed is None else make_op(image_in, seed=seed)
        with tf.Session() as sess:
            return [sess.run(op, {image_in: image}) for _ in range(draws)]


def _window_position(window, image):
    """(top, left) of the unique place where `window` [32, 32, K] lies in `image` [48, 48, K]."""
    span = _SMALL - _CROP + 1
    found = [
        (i, j) for i in range(span) for j in range(span) if np.array_equal(image[i : i + _CROP, j : j + _CROP], window)
    ]
    assert len(found) == 1, found
    return found[0]


def test_random_crop_inside_and_varied():
    """Random crops are 32x32 windows lying inside the 48x48 image, at several different places."""
    image = np.arange(_SMALL * _SMALL * 2, dtype=np.float32).reshape(_SMALL, _SMALL, 2)  # unique pixels
    crops = _run_draws(prep.random_crop, image, draws=12)
    assert all(crop.shape == (_CROP, _CROP, 2) for crop in crops)
    positions = {_window_position(crop, image) for crop in crops}
    assert len(positions) > 3


def test_random_brightness_contrast_within_ranges():
    """out - mean(out) = f * (x - mean(x)) and mean(out) = mean(x) + d, with d within +-MAX_BRIGHTNESS_DELTA
    and f within CONTRAST_RANGE; over 40 draws both spread to either side."""
    image = np.random.RandomState(7).standard_normal((_CROP, _CROP, 1)).astype(np.float32)
    centred = image - image.mean()
    deltas, factors = [], []
    for out in _run_draws(prep.random_brightness_contrast, image, draws=40):
        deltas.append(out.mean() - image.mean())
        factors.append(out.std() / image.std())
        np.testing.assert_allclose(out - out.mean(), factors[-1] * centred, atol=1e-4)
    lower, upper = prep.CONTRAST_RANGE
    assert max(np.abs(deltas)) <= prep.MAX_BRIGHTNESS_DELTA + 1e-5
    assert lower - 1e-5 <= min(factors) and max(factors) <= upper + 1e-5
    assert min(deltas) < -prep.MAX_BRIGHTNESS_DELTA / 2 and max(deltas) > prep.MAX_BRIGHTNESS_DELTA / 2
    assert min(factors) < 1 < max(factors)
    assert prep.CONTRAST_RANGE == (0.2, 1.8) and prep.MAX_BRIGHTNESS_DELTA == pytest.approx(63 / 255)


def test_distort_is_crop_then_brightness_contrast():
    """distort gives [32, 32, K] with a static shape; undoing brightness and contrast (standardising) leaves
    a standardised 32x32 window of the input; the same seed repeats the draw."""
    image = prep.standardise(np.random.RandomState(8).uniform(size=(1, _SMALL, _SMALL, 1)))[0]
    with tf.Graph().as_default():
        assert prep.distort(tf.placeholder(tf.float32, [_SMALL, _SMALL, 2])).shape.as_list() == [_CROP, _CROP, 2]
    span = _SMALL - _CROP + 1
    windows = prep.standardise(
        np.stack([image[i : i + _CROP, j : j + _CROP] for i in range(span) for j in range(span)])
    )
    outs = _run_draws(prep.distort, image, draws=6, seed=11)
    for out in outs:
        restored = prep.standardise(out[np.newaxis])  # [1, 32, 32, 1]: brightness and contrast undone
        assert np.abs(windows - restored).max(axis=(1, 2, 3)).min() < 1e-3
    np.testing.assert_array_equal(_run_draws(prep.distort, image, draws=6, seed=11)[0], outs[0])


# ---------------------------------------------------------------------------
# Novel-viewpoint splits
# ---------------------------------------------------------------------------


def test_viewpoint_split_azimuth():
    """Azimuth: familiar = info values 30, 32, 34, 0, 2, 4 (300..40 degrees), novel = 6..28 (60..280)."""
    azimuths = np.arange(0, 36, 2)  # all 18 azimuths
    info = np.stack([np.zeros(18), np.arange(18) % 9, azimuths, np.arange(18) % 6], axis=1).astype(np.int64)
    familiar, novel = smallnorb.viewpoint_split(info, "azimuth")
    assert familiar.dtype == bool and familiar.shape == (18,)
    assert sorted(azimuths[familiar]) == [0, 2, 4, 30, 32, 34]
    assert list(azimuths[novel]) == list(range(6, 29, 2))
    assert not np.any(familiar & novel)


def test_viewpoint_split_elevation():
    """Elevation: familiar = the 3 lowest (0..2), novel = the 6 higher (3..8)."""
    elevations = np.array([0, 8, 3, 2, 1, 5, 2, 7, 4, 6])
    info = np.stack([np.zeros(10), elevations, np.full(10, 4), np.zeros(10)], axis=1).astype(np.int32)
    familiar, novel = smallnorb.viewpoint_split(info, "elevation")
    assert list(np.flatnonzero(familiar)) == [0, 3, 4, 6]  # rows with elevation 0, 2, 1, 2
    assert sorted(elevations[novel]) == [3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError):
        smallnorb.viewpoint_split(info, "lighting")
    with pytest.raises(ValueError):
        smallnorb.viewpoint_split(info[:, :3], "azimuth")


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "raw"])
def test_load_fashion_mnist(tmp_path, compressed):
    """fashion_mnist.load gives uint8 [N, 28, 28] and int64 [N] from .gz or uncompressed IDX files."""
    images, labels = _write_fashion_split(str(tmp_path), "test", 7, compressed)
    got_images, got_labels = fashion_mnist.load(str(tmp_path), "test")
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_fashion_mnist_malformed(tmp_path):
    """A label of 10 and a missing file are one-line DataErrors naming the file."""
    _write_fashion_split(str(tmp_path), "train", 4)
    labels_name = fashion_mnist._SPLIT_FILES["train"][1]
    idx.write_idx(str(tmp_path / labels_name), np.array([0, 10, 2, 3], np.uint8))
    message = raise_data_error(fashion_mnist.load, str(tmp_path), "train")
    assert labels_name in message and "label 10 at index 1" in message
    assert "t10k-images" in raise_data_error(fashion_mnist.load, str(tmp_path), "test")
    with pytest.raises(ValueError):
        fashion_mnist.load(str(tmp_path), "validation")


def test_fashion_mnist_published_files():
    """The four official file names, SHA-256 digests of 64 hex digits, and Zalando's mirror."""
    assert sorted(fashion_mnist.FILES) == sorted(
        [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ]
    )
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in fashion_mnist.FILES.values())
    assert len(set(fashion_mnist.FILES.values())) == 4
    assert fashion_mnist.MIRRORS == ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


# ---------------------------------------------------------------------------
# Download (fake network only)
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny_norb_files(tmp_path_factory, monkeypatch):
    """The six smallNORB files, tiny and gzip-compressed; smallnorb.FILES patched to their digests.

    Returns:
        Dict file name -> file bytes.
    """
    source = tmp_path_factory.mktemp("mirror")
    for split, seed in (("train", 1), ("test", 2)):
        _write_norb_split(str(source), split, _norb_arrays(count=3, seed=seed))
    payloads = {name: (source / name).read_bytes() for name in smallnorb.FILES}
    monkeypatch.setattr(smallnorb, "FILES", {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()})
    return payloads


def test_download_smallnorb_verified_and_atomic(tmp_path, tiny_norb_files):
    """Verified files land under their names with nothing else left beside them; present files are not
    fetched again; the downloaded split loads."""
    data_dir = str(tmp_path / "norb")
    fake = FakeUrlopen(mirror_responses("https://a/", tiny_norb_files))
    paths = smallnorb.download(data_dir, mirrors=("https://a/",), urlopen=fake)
    assert sorted(os.listdir(data_dir)) == sorted(smallnorb.FILES)
    for name, path in paths.items():
        assert open(path, "rb").read() == tiny_norb_files[name]
        assert download.sha256_of(path) == smallnorb.FILES[name]
    smallnorb.download(data_dir, mirrors=("https://a/",), urlopen=fake)
    assert len(fake.calls) == len(smallnorb.FILES)
    assert smallnorb.load(data_dir, "train")[0].shape == (3, _RAW, _RAW, 1)


def test_download_smallnorb_mismatch(tmp_path, tiny_norb_files):
    """Bytes with the wrong SHA-256 give a one-line DataError with both digests; no file, not even a
    temporary one, is left."""
    bad = {name: b"<html>moved</html>" for name in tiny_norb_files}
    fake = FakeUrlopen(mirror_responses("https://a/", bad))
    name = next(iter(smallnorb.FILES))
    message = raise_data_error(smallnorb.download, str(tmp_path), mirrors=("https://a/",), urlopen=fake)
    assert name in message and smallnorb.FILES[name] in message
    assert hashlib.sha256(bad[name]).hexdigest() in message
    assert os.listdir(str(tmp_path)) == []


def test_ensure_smallnorb_and_fashion(tmp_path, tiny_norb_files, monkeypatch):
    """ensure(download=False) with a file missing is a one-line DataError; with download=True only the
    missing file is fetched from the dataset's mirror; uncompressed files count as present."""
    monkeypatch.setattr(smallnorb, "MIRRORS", ("https://a/",))
    missing = _norb_name("test", _INFO)
    for name, payload in tiny_norb_files.items():
        if name != missing:
            (tmp_path / name).write_bytes(payload)
    os.rename(str(tmp_path / _norb_name("train", _DAT)), str(tmp_path / _norb_name("train", _DAT)[: -len(".gz")]))
    assert "smallNORB file not found" in raise_data_error(smallnorb.ensure, str(tmp_path), download=False)
    fake = FakeUrlopen(mirror_responses("https://a/", tiny_norb_files))
    paths = smallnorb.ensure(str(tmp_path), urlopen=fake)
    assert fake.calls == ["https://a/" + missing]
    assert paths[_norb_name("train", _DAT)].endswith(".mat")
    message = raise_data_error(fashion_mnist.ensure, str(tmp_path / "fashion"), urlopen=FakeUrlopen({}))
    assert message.startswith("cannot download ") and fashion_mnist.MIRRORS[0] in message


def test_smallnorb_published_files():
    """The six official names with the published SHA-256 digests, and the dataset page as mirror."""
    assert smallnorb.FILES[_norb_name("train", _DAT)] == (
        "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873"
    )
    assert smallnorb.FILES[_norb_name("test", _INFO)] == (
        "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2"
    )
    assert (
        sorted(name.split("-")[1] for name in smallnorb.FILES)
        == ["5x01235x9x18x6x2x96x96"] * 3 + ["5x46789x9x18x6x2x96x96"] * 3
    )
    assert smallnorb.MIRRORS == ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


def test_registry_specs():
    """data.get gives each module's SPEC: Fashion-MNIST 28x28x1, 10 classes; smallNORB 32x32 crops of 1
    channel, 5 classes."""
    assert sorted(datasets.DATASETS) == ["fashion_mnist", "mnist", "smallnorb"]
    fashion, norb = datasets.get("fashion_mnist"), datasets.get("smallnorb")
    assert (fashion.image_size, fashion.channels, fashion.num_classes) == (28, 1, 10)
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[-1] == "Ankle boot"
    assert (norb.image_size, norb.channels, norb.num_classes) == (32, 1, 5)
    assert norb.class_names == ("animal", "human", "airplane", "truck", "car")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "smallnorb"])
def test_spec_load_reads_generated_files(tmp_path, name):
    """Every registered spec's load(data_dir, split) reads generated files of its format."""
    data_dir = str(tmp_path)
    if name == "smallnorb":
        _write_norb_split(data_dir, "test", _norb_arrays(count=5))
        shape = (5, _RAW, _RAW, 1)
    else:
        _write_fashion_split(data_dir, "test", 5)  # MNIST's file names are the same
        shape = (5, _FASHION_SIZE, _FASHION_SIZE)
    images, labels = datasets.get(name).load(data_dir, "test")
    assert images.shape == shape and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(5) % datasets.get(name).num_classes)
