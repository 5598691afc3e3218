"""Tests for the data/ package: IDX files, download, MNIST loading, the registry and the input pipeline.

No test touches the network: downloads go through an injected fake `urlopen`.
The real-MNIST tests read the directory in $MNIST_DIR (default
<repo>/../shared/data/mnist) and are skipped only when it does not exist.
"""

import gzip
import hashlib
import os
import sys
import types

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import data as datasets  # noqa: E402  (needs the repo root on sys.path)
from data import download, idx, mnist, pipeline  # noqa: E402
from data_fakes import FakeUrlopen, mirror_responses, raise_data_error  # noqa: E402  (tests/ is on sys.path)

_SIZE = mnist.IMAGE_SIZE
_MNIST_DIR = os.environ.get("MNIST_DIR", os.path.join(_REPO_ROOT, "..", "shared", "data", "mnist"))
_TRAIN_IMAGES, _TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
_TEST_IMAGES, _TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _random_images(n, size=_SIZE, seed=0):
    """uint8 [n, size, size] with random pixels."""
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size)).astype(np.uint8)


def _digit_labels(n):
    """uint8 [n] cycling through 0..9."""
    return (np.arange(n) % mnist.NUM_CLASSES).astype(np.uint8)


def _write_split(data_dir, split, images, labels):
    """Writes a split under its canonical MNIST .gz names."""
    images_name, labels_name = {"train": (_TRAIN_IMAGES, _TRAIN_LABELS), "test": (_TEST_IMAGES, _TEST_LABELS)}[split]
    idx.write_idx(os.path.join(data_dir, images_name), images)
    idx.write_idx(os.path.join(data_dir, labels_name), labels)


@pytest.fixture
def tiny_mnist_files(tmp_path_factory, monkeypatch):
    """Four tiny gz IDX files; mnist.FILES patched to their digests.

    Returns:
        Dict file name -> file bytes.
    """
    source = tmp_path_factory.mktemp("mirror")  # Outside tmp_path, which tests list.
    _write_split(str(source), "train", _random_images(6, seed=1), _digit_labels(6))
    _write_split(str(source), "test", _random_images(4, seed=2), _digit_labels(4))
    payloads = {name: (source / name).read_bytes() for name in mnist.FILES}
    monkeypatch.setattr(mnist, "FILES", {name: download.sha256_of(str(source / name)) for name in payloads})
    return payloads


def _collect_batches(dataset_fn, num_batches=None):
    """Builds a dataset in a fresh TF1 graph and runs it through a session.

    Args:
        dataset_fn: zero-argument callable returning a tf.data.Dataset.
        num_batches: batches to read; None reads until the dataset ends.

    Returns:
        List of (images, labels) numpy batches.
    """
    with tf.Graph().as_default():
        next_batch = tf.data.make_one_shot_iterator(dataset_fn()).get_next()
        batches = []
        with tf.Session() as sess:
            while num_batches is None or len(batches) < num_batches:
                try:
                    batches.append(sess.run(next_batch))
                except tf.errors.OutOfRangeError:
                    break
    return batches


# ---------------------------------------------------------------------------
# IDX reading and writing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["images.idx3.gz", "images.idx3"])
def test_idx_images_round_trip(tmp_path, file_name):
    """write_idx then read_idx returns identical uint8 images, gzip and raw."""
    images = _random_images(5, size=7)
    path = str(tmp_path / file_name)
    idx.write_idx(path, images)
    assert (open(path, "rb").read(2) == b"\x1f\x8b") == file_name.endswith(".gz")
    result = idx.read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, images)


@pytest.mark.parametrize("file_name", ["labels.idx1.gz", "labels.idx1"])
def test_idx_labels_round_trip(tmp_path, file_name):
    """write_idx then read_idx returns identical uint8 labels [N], gzip and raw."""
    labels = _digit_labels(13)
    path = str(tmp_path / file_name)
    idx.write_idx(path, labels)
    result = idx.read_idx(path)
    assert result.shape == (13,) and result.dtype == np.uint8
    np.testing.assert_array_equal(result, labels)


def test_read_idx_detects_gzip_by_content(tmp_path):
    """A gzip file without a .gz name is still decompressed."""
    labels = _digit_labels(4)
    gz_path, plain_name = str(tmp_path / "l.gz"), str(tmp_path / "labels")
    idx.write_idx(gz_path, labels)
    os.rename(gz_path, plain_name)
    np.testing.assert_array_equal(idx.read_idx(plain_name), labels)


def test_read_idx_returns_writable_array(tmp_path):
    """The returned array owns writable memory (not a read-only view of bytes)."""
    path = str(tmp_path / "labels")
    idx.write_idx(path, _digit_labels(3))
    result = idx.read_idx(path)
    result[0] = 9
    assert result[0] == 9


def test_write_idx_rejects_bad_arrays(tmp_path):
    """write_idx refuses non-uint8 data and 2-D arrays."""
    with pytest.raises(ValueError):
        idx.write_idx(str(tmp_path / "x"), np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        idx.write_idx(str(tmp_path / "x"), np.zeros((3, 4), np.uint8))


def test_read_idx_missing_file(tmp_path):
    """A missing file raises DataError naming the file."""
    path = str(tmp_path / "absent.gz")
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "not found" in message


def test_read_idx_truncated_gzip(tmp_path):
    """A gzip file cut in half raises DataError about the gzip data."""
    path = str(tmp_path / "images.gz")
    idx.write_idx(path, _random_images(4))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "gzip" in message


def test_read_idx_corrupt_gzip_checksum(tmp_path):
    """A gzip file whose CRC-32 trailer is damaged raises DataError."""
    path = str(tmp_path / "labels.gz")
    idx.write_idx(path, _digit_labels(20))
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF  # Inside the CRC-32 field (RFC 1952: last 8 bytes are CRC32, ISIZE).
    open(path, "wb").write(bytes(data))
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "gzip" in message


def test_read_idx_garbage_named_gz(tmp_path):
    """Non-gzip garbage named .gz is read as raw IDX and rejected by its magic."""
    path = str(tmp_path / "train-images-idx3-ubyte.gz")
    open(path, "wb").write(b"<html>404 Not Found</html>")
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "magic" in message


def test_read_idx_wrong_magic(tmp_path):
    """An IDX header with magic 2050 raises DataError quoting the magic."""
    path = str(tmp_path / "bad")
    open(path, "wb").write((2050).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "2050" in message


def test_read_idx_wrong_element_type(tmp_path):
    """An IDX file of floats (type byte 0x0d) raises DataError about the type."""
    path = str(tmp_path / "floats")
    open(path, "wb").write(bytes([0, 0, 0x0D, 1]) + (0).to_bytes(4, "big"))
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "0x0d" in message


def test_read_idx_empty_and_short_header(tmp_path):
    """An empty file, or one whose dimension words are cut off, raises DataError."""
    empty, short = str(tmp_path / "empty"), str(tmp_path / "short")
    open(empty, "wb").close()
    open(short, "wb").write((idx.IDX_IMAGES_MAGIC).to_bytes(4, "big") + b"\x00\x00")
    assert empty in raise_data_error(idx.read_idx, empty)
    assert "header" in raise_data_error(idx.read_idx, short)


def test_read_idx_truncated_payload(tmp_path):
    """An images file missing its last bytes raises DataError with both sizes."""
    path = str(tmp_path / "images")
    idx.write_idx(path, _random_images(3))
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    message = raise_data_error(idx.read_idx, path)
    assert path in message and "truncated" in message
    assert str(3 * _SIZE * _SIZE) in message and str(3 * _SIZE * _SIZE - 10) in message


def test_read_idx_trailing_bytes(tmp_path):
    """Bytes after the declared payload raise DataError."""
    path = str(tmp_path / "labels.gz")
    with gzip.open(path, "wb") as f:
        header = idx.IDX_LABELS_MAGIC.to_bytes(4, "big") + (2).to_bytes(4, "big")
        f.write(header + b"\x01\x02\x03")  # Declares 2 labels, holds 3.
    assert "trailing" in raise_data_error(idx.read_idx, path)


def test_sha256_of_matches_hashlib(tmp_path):
    """sha256_of gives the standard digest of the stored bytes."""
    path = str(tmp_path / "f")
    open(path, "wb").write(b"abc")
    assert download.sha256_of(path) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )  # FIPS 180-2 "abc".


# ---------------------------------------------------------------------------
# mnist.load
# ---------------------------------------------------------------------------


def test_load_mnist_tiny_split(tmp_path):
    """mnist.load returns uint8 [N, 28, 28] images and int64 labels from .gz or raw files."""
    images, labels = _random_images(5), _digit_labels(5)
    _write_split(str(tmp_path), "test", images, labels)
    os.remove(str(tmp_path / _TEST_LABELS))
    idx.write_idx(str(tmp_path / _TEST_LABELS[:-3]), labels)  # Uncompressed, no .gz.
    got_images, got_labels = mnist.load(str(tmp_path), "test")
    assert got_images.dtype == np.uint8 and got_images.shape == (5, _SIZE, _SIZE)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_mnist_bad_split(tmp_path):
    """An unknown split name is a ValueError, not a data problem."""
    with pytest.raises(ValueError):
        mnist.load(str(tmp_path), "validation")


def test_load_mnist_missing_files(tmp_path):
    """A split whose files are absent raises DataError naming the file."""
    message = raise_data_error(mnist.load, str(tmp_path), "train")
    assert _TRAIN_IMAGES in message


def test_load_mnist_wrong_image_size(tmp_path):
    """32x32 images raise DataError naming the file and the size found."""
    _write_split(str(tmp_path), "train", _random_images(3, size=32), _digit_labels(3))
    message = raise_data_error(mnist.load, str(tmp_path), "train")
    assert _TRAIN_IMAGES in message and "32x32" in message


def test_load_mnist_swapped_files(tmp_path):
    """A labels file where the images file should be raises DataError."""
    _write_split(str(tmp_path), "train", _random_images(3), _digit_labels(3))
    idx.write_idx(str(tmp_path / _TRAIN_IMAGES), _digit_labels(3))
    message = raise_data_error(mnist.load, str(tmp_path), "train")
    assert _TRAIN_IMAGES in message and "labels" in message


def test_load_mnist_count_mismatch(tmp_path):
    """3 images with 2 labels raise DataError giving both counts."""
    _write_split(str(tmp_path), "train", _random_images(3), _digit_labels(2))
    message = raise_data_error(mnist.load, str(tmp_path), "train")
    assert "3 images" in message and "2 labels" in message


def test_load_mnist_label_out_of_range(tmp_path):
    """A label of 10 raises DataError naming the labels file, value and index."""
    labels = _digit_labels(4)
    labels[2] = 10
    _write_split(str(tmp_path), "test", _random_images(4), labels)
    message = raise_data_error(mnist.load, str(tmp_path), "test")
    assert _TEST_LABELS in message and "label 10 at index 2" in message


# ---------------------------------------------------------------------------
# The dataset registry
# ---------------------------------------------------------------------------


def test_get_mnist_spec():
    """data.get("mnist") is mnist.SPEC, describing 28x28 grayscale digits in 10 classes "0".."9"."""
    spec = datasets.get("mnist")
    assert spec is mnist.SPEC and datasets.DATASETS["mnist"] is mnist.SPEC
    assert (spec.name, spec.image_size, spec.channels, spec.num_classes) == ("mnist", _SIZE, 1, 10)
    assert list(spec.class_names) == [str(digit) for digit in range(10)]
    assert spec.ensure is mnist.ensure and spec.load is mnist.load


def test_get_unknown_dataset():
    """An unknown dataset name is a ValueError naming the known ones."""
    with pytest.raises(ValueError, match="mnist"):
        datasets.get("cifar10")


# ---------------------------------------------------------------------------
# mnist.download / mnist.ensure (fake network only)
# ---------------------------------------------------------------------------


def test_download_mnist_good_bytes(tmp_path, tiny_mnist_files):
    """Verified files land in place, nothing else is left, and present files are skipped."""
    data_dir = str(tmp_path / "data")
    fake = FakeUrlopen(mirror_responses("https://a/", tiny_mnist_files))
    paths = mnist.download(data_dir, mirrors=("https://a/",), urlopen=fake)
    assert sorted(os.listdir(data_dir)) == sorted(mnist.FILES)
    for name, path in paths.items():
        assert path == os.path.join(data_dir, name)
        assert open(path, "rb").read() == tiny_mnist_files[name]
    assert len(fake.calls) == 4
    mnist.download(data_dir, mirrors=("https://a/",), urlopen=fake)
    assert len(fake.calls) == 4
    assert mnist.load(data_dir, "train")[0].shape == (6, _SIZE, _SIZE)


def test_download_mnist_falls_back_to_next_mirror(tmp_path, tiny_mnist_files):
    """When the first mirror fails, the second mirror is tried and used."""
    fake = FakeUrlopen(mirror_responses("https://b/", tiny_mnist_files))
    mnist.download(str(tmp_path), mirrors=("https://a/", "https://b/"), urlopen=fake)
    first = sorted(mnist.FILES)[0]
    assert fake.calls.index("https://a/" + first) < fake.calls.index("https://b/" + first)
    assert sorted(os.listdir(str(tmp_path))) == sorted(mnist.FILES)


def test_download_mnist_bad_bytes(tmp_path, tiny_mnist_files):
    """Bytes with the wrong SHA-256 raise DataError with both digests; no file is left."""
    bad = {name: b"corrupted " + data for name, data in tiny_mnist_files.items()}
    fake = FakeUrlopen(mirror_responses("https://a/", bad))
    name = next(iter(mnist.FILES))
    got = hashlib.sha256(bad[name]).hexdigest()
    message = raise_data_error(mnist.download, str(tmp_path), mirrors=("https://a/",), urlopen=fake)
    assert name in message and mnist.FILES[name] in message and got in message
    assert os.listdir(str(tmp_path)) == []


def test_download_mnist_no_network(tmp_path):
    """A urlopen that raises gives DataError 'cannot download X: <reason>'; no file left."""
    fake = FakeUrlopen({})
    message = raise_data_error(mnist.download, str(tmp_path), urlopen=fake)
    assert message.startswith("cannot download ") and "no route to host" in message
    assert fake.calls[0].startswith(mnist.MIRRORS[0])
    assert len(fake.calls) == len(mnist.MIRRORS)
    assert os.listdir(str(tmp_path)) == []


def test_ensure_mnist_missing_without_download(tmp_path):
    """mnist.ensure(download=False) with no files raises DataError and fetches nothing."""
    message = raise_data_error(mnist.ensure, str(tmp_path), download=False)
    assert "not found" in message and "download" in message
    assert os.listdir(str(tmp_path)) == []


def test_ensure_mnist_accepts_present_files_unchecked(tmp_path):
    """Present .gz or uncompressed files are accepted without checksum checks."""
    _write_split(str(tmp_path), "train", _random_images(2), _digit_labels(2))
    _write_split(str(tmp_path), "test", _random_images(2), _digit_labels(2))
    raw = str(tmp_path / _TEST_IMAGES[:-3])
    os.rename(str(tmp_path / _TEST_IMAGES), raw)
    paths = mnist.ensure(str(tmp_path), download=False)
    assert paths[_TEST_IMAGES] == raw
    assert paths[_TRAIN_LABELS] == str(tmp_path / _TRAIN_LABELS)


def test_ensure_mnist_downloads_only_missing(tmp_path, tiny_mnist_files, monkeypatch):
    """With download=True only the absent file is fetched (through the injected urlopen)."""
    monkeypatch.setattr(mnist, "MIRRORS", ("https://a/",))
    for name, data in tiny_mnist_files.items():
        if name != _TEST_LABELS:
            (tmp_path / name).write_bytes(data)
    fake = FakeUrlopen(mirror_responses("https://a/", tiny_mnist_files))
    paths = mnist.ensure(str(tmp_path), download=True, urlopen=fake)
    assert fake.calls == ["https://a/" + _TEST_LABELS]
    assert open(paths[_TEST_LABELS], "rb").read() == tiny_mnist_files[_TEST_LABELS]


# ---------------------------------------------------------------------------
# Splitting and scaling
# ---------------------------------------------------------------------------


def test_split_train_validation_sizes_and_determinism():
    """Sizes add up, parts are disjoint, the same seed repeats, another seed differs."""
    images = np.arange(100).reshape(100, 1, 1)
    labels = np.arange(100)
    train_x, train_y, val_x, val_y = pipeline.split_train_validation(images, labels, 20, seed=3)
    assert (len(train_x), len(train_y), len(val_x), len(val_y)) == (80, 80, 20, 20)
    np.testing.assert_array_equal(train_x[:, 0, 0], train_y)
    np.testing.assert_array_equal(val_x[:, 0, 0], val_y)
    assert sorted(np.concatenate([train_y, val_y])) == list(range(100))
    again = pipeline.split_train_validation(images, labels, 20, seed=3)
    np.testing.assert_array_equal(again[3], val_y)
    other = pipeline.split_train_validation(images, labels, 20, seed=4)
    assert not np.array_equal(other[3], val_y)


def test_split_train_validation_zero_and_invalid():
    """validation_size 0 keeps everything for training; out-of-range sizes are rejected."""
    images, labels = _random_images(7, size=2), _digit_labels(7)
    train_x, train_y, val_x, val_y = pipeline.split_train_validation(images, labels, 0, seed=0)
    np.testing.assert_array_equal(train_x, images)
    np.testing.assert_array_equal(train_y, labels)
    assert val_x.shape == (0, 2, 2) and val_y.shape == (0,)
    with pytest.raises(ValueError):
        pipeline.split_train_validation(images, labels, 8, seed=0)


def test_scale_images():
    """uint8 [N, H, W] becomes float32 [N, H, W, 1] equal to pixel / 255."""
    images = np.array([[[0, 128], [255, 1]]], np.uint8)
    scaled = pipeline.scale_images(images)
    assert scaled.dtype == np.float32 and scaled.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(scaled[..., 0], images / 255.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# make_dataset (TF1 graph mode)
# ---------------------------------------------------------------------------


def test_make_dataset_shapes_dtypes_scaling():
    """Batches are float32 [B, 28, 28, 1] = pixel/255 and int64 [B], in input order."""
    images, labels = _random_images(10), _digit_labels(10)
    batches = _collect_batches(lambda: pipeline.make_dataset(images, labels, batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]  # Remainder kept: all 10 examples.
    batch_images, batch_labels = batches[0]
    assert batch_images.dtype == np.float32 and batch_images.shape == (4, _SIZE, _SIZE, 1)
    assert batch_labels.dtype == np.int64
    all_images = np.concatenate([b[0] for b in batches])
    np.testing.assert_allclose(all_images, pipeline.scale_images(images), rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), labels)


def test_make_dataset_static_shape_with_drop_remainder():
    """drop_remainder=True drops the partial batch and gives a static batch dimension."""
    images, labels = _random_images(10), _digit_labels(10)
    with tf.Graph().as_default():
        dataset = pipeline.make_dataset(images, labels, batch_size=4, drop_remainder=True)
        assert tf.data.get_output_shapes(dataset)[0].as_list() == [4, _SIZE, _SIZE, 1]
    batches = _collect_batches(lambda: pipeline.make_dataset(images, labels, batch_size=4, drop_remainder=True))
    assert [len(b[1]) for b in batches] == [4, 4]


def test_make_dataset_shuffle_repeat():
    """With shuffle+repeat each epoch is a permutation of all examples, reshuffled per epoch,
    and the same seed gives the same order."""
    labels = np.arange(10, dtype=np.int64)
    images = _random_images(10)

    def epochs():
        batches = _collect_batches(
            lambda: pipeline.make_dataset(images, labels, batch_size=10, shuffle=True, repeat=True, seed=7),
            num_batches=2,
        )
        return [b[1] for b in batches]

    first, second = epochs()
    assert sorted(first) == sorted(second) == list(range(10))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(epochs()[0], first)


def _shifted(image, dy, dx):
    """NumPy reference: `image` [H, W] moved dy rows down and dx columns right, zeros filling in."""
    height, width = image.shape
    out = np.zeros_like(image)
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def _offsets_of(shifted, image, max_shift):
    """Every (dy, dx) within max_shift whose NumPy shift of `image` equals `shifted`."""
    offsets = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in offsets for dx in offsets if np.array_equal(_shifted(image, dy, dx), shifted)]


def test_make_dataset_random_shift():
    """With max_shift=2 every image is its NumPy shift by some (dy, dx) in -2..2 with zero fill (labels
    untouched); over 40 images more than 5 distinct offsets occur, each axis moves both ways, and the same
    seed gives the same shifts. max_shift=0 leaves images as they are (the other make_dataset tests)."""
    max_shift, count = 2, 40
    images = np.random.RandomState(3).randint(1, 256, size=(count, _SIZE, _SIZE)).astype(np.uint8)  # no zeros
    labels = _digit_labels(count)

    def shifted_batch():
        batches = _collect_batches(
            lambda: pipeline.make_dataset(images, labels, batch_size=count, seed=5, max_shift=max_shift), num_batches=1
        )
        return batches[0]

    batch_images, batch_labels = shifted_batch()
    np.testing.assert_array_equal(batch_labels, labels)
    pixels = np.rint(batch_images[..., 0] * 255.0).astype(np.uint8)
    offsets = []
    for shifted, image in zip(pixels, images):
        found = _offsets_of(shifted, image, max_shift)
        assert len(found) == 1, found  # exactly one offset explains it (no zero pixels in the input)
        offsets.append(found[0])
    assert len(set(offsets)) > 5
    assert {dy for dy, _ in offsets} >= {-1, 1} and {dx for _, dx in offsets} >= {-1, 1}
    np.testing.assert_array_equal(shifted_batch()[0], batch_images)
    with pytest.raises(ValueError, match="max_shift"):
        pipeline.make_dataset(images, labels, batch_size=4, max_shift=-1)


def test_make_dataset_initializable_iterator_reruns():
    """An initializable iterator yields every example again after re-initialisation."""
    images, labels = _random_images(5), _digit_labels(5)
    with tf.Graph().as_default():
        iterator = tf.data.make_initializable_iterator(pipeline.make_dataset(images, labels, batch_size=2))
        next_labels = iterator.get_next()[1]
        with tf.Session() as sess:
            for _ in range(2):
                sess.run(iterator.initializer)
                seen = []
                while True:
                    try:
                        seen.extend(sess.run(next_labels))
                    except tf.errors.OutOfRangeError:
                        break
                assert seen == list(labels)


def test_build_pipeline_batches():
    """Training batches have the static shape [batch_size, 28, 28, 1]; evaluation reads every image once in
    order, in batches of eval_batch_size with the remainder kept."""
    images, labels = _random_images(5), _digit_labels(5)
    with tf.Graph().as_default():
        built = pipeline.build_pipeline(types.SimpleNamespace(image_size=_SIZE), 2, 3, seed=1)
        assert built.train_images.shape.as_list() == [2, _SIZE, _SIZE, 1]
        with tf.Session() as sess:
            sess.run(built.eval_iterator.initializer, {built.images_in: images, built.labels_in: labels})
            first, second = sess.run(built.eval_labels), sess.run(built.eval_labels)
            with pytest.raises(tf.errors.OutOfRangeError):
                sess.run(built.eval_labels)
    assert (len(first), len(second)) == (3, 2)
    np.testing.assert_array_equal(np.concatenate([first, second]), labels)


# ---------------------------------------------------------------------------
# Real MNIST
# ---------------------------------------------------------------------------

_real_mnist = pytest.mark.skipif(not os.path.isdir(_MNIST_DIR), reason=f"MNIST directory {_MNIST_DIR} not found")


@_real_mnist
def test_real_mnist_contents():
    """The real files hold 60000/10000 28x28 examples with the known first labels."""
    train_images, train_labels = mnist.load(_MNIST_DIR, "train")
    test_images, test_labels = mnist.load(_MNIST_DIR, "test")
    assert train_images.shape == (60000, _SIZE, _SIZE) and train_labels.shape == (60000,)
    assert test_images.shape == (10000, _SIZE, _SIZE) and test_labels.shape == (10000,)
    assert list(train_labels[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(test_labels[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train_images.max() == 255 and test_images.min() == 0


@_real_mnist
def test_real_mnist_checksums():
    """Every .gz file present in the MNIST directory matches its SHA-256 in mnist.FILES."""
    present = [n for n in mnist.FILES if os.path.isfile(os.path.join(_MNIST_DIR, n))]
    if not present:
        pytest.skip(f"no .gz files in {_MNIST_DIR} (uncompressed copies only)")
    for name in present:
        assert download.sha256_of(os.path.join(_MNIST_DIR, name)) == mnist.FILES[name]
