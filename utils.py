"""MNIST reading, download and image helpers for Matrix Capsules with EM Routing.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5
(experiments) reports MNIST test error alongside smallNORB. This module provides
the data side of that experiment and nothing model-specific:

* IDX reading/writing (the format of the MNIST files, described on LeCun's MNIST
  page), gzip-compressed or raw, with every malformed-input case turned into a
  one-line `DataError`;
* checksum-verified, atomic download of the four MNIST files;
* a deterministic train/validation hold-out split and a `tf.data` input pipeline
  usable from `tensorflow.compat.v1` graph mode;
* PNG plots: digit grids, confusion matrices and training curves.

Axis names used in the docstrings: N examples, B batch, H/W image height/width
(28 for MNIST), C classes (10 for MNIST).

This module never reads command-line flags; callers pass plain values.
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib

import numpy as np

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

# The four standard MNIST files and their gzip SHA-256, as listed in
# shared/data/mnist/README.md (byte-identical to the files once published at
# http://yann.lecun.com/exdb/mnist/).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# Public mirrors of the original files (the ones torchvision and TFDS use), tried
# in order.
MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

# (images file, labels file) per split; keys of MNIST_FILES.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MNIST_IMAGE_SIZE = 28  # MNIST digits are 28x28 pixels (LeCun's MNIST page).
MNIST_NUM_CLASSES = 10  # Digits 0..9.

_PIXEL_MAX = 255.0  # Largest uint8 intensity; dividing by it maps pixels to [0, 1].

# IDX format, from LeCun's MNIST page: a 4-byte big-endian magic number
# (0x00, 0x00, element type, number of dimensions), then one big-endian uint32
# per dimension, then the elements in C order.
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions [N, H, W].
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension [N].
_IDX_UBYTE = 0x08  # IDX element-type code for unsigned byte.
_IDX_WORD = struct.Struct(">I")  # Magic number and each dimension: big-endian uint32.
_IDX_NDIM = {IDX_IMAGES_MAGIC: 3, IDX_LABELS_MAGIC: 1}
_IDX_MAGIC_FOR_NDIM = {3: IDX_IMAGES_MAGIC, 1: IDX_LABELS_MAGIC}

_GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952, section 2.3.1: bytes ID1, ID2 of every member.

_DOWNLOAD_TIMEOUT_S = 30  # Socket timeout per blocking network operation, seconds.
_COPY_CHUNK_BYTES = 1 << 20  # Read size while hashing and downloading (1 MiB).

# Plot layout (inches and points); sized so 10 columns of titled digits stay legible.
_DIGIT_CELL_WIDTH_IN = 1.2
_DIGIT_CELL_HEIGHT_IN = 1.4
_TITLE_FONT_PT = 8
_CONFUSION_CELL_IN = 0.6
_CONFUSION_MIN_SIZE_IN = 4.0
_CURVES_FIGSIZE_IN = (11.0, 4.0)
_PLOT_DPI = 100
_CONFUSION_TEXT_SWITCH = 0.5  # Cells above this fraction of the max get white text.


class DataError(Exception):
    """A data file is missing, unreadable or malformed.

    The message is a single line naming the file and what is wrong with it, fit
    to print before exiting.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------


def _read_bytes(path):
    """Returns the file's bytes, gunzipped when the content starts with the gzip magic.

    Args:
        path: file path. Compression is detected from the content, not the name.

    Returns:
        The (decompressed) file content as `bytes`.

    Raises:
        DataError: the file is missing or unreadable, or its gzip stream is
            truncated or corrupt.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from None


def _parse_idx_header(path, data):
    """Validates an IDX header and returns the array shape it declares.

    Args:
        path: file path, used in error messages only.
        data: the decompressed file content.

    Returns:
        (dims, header_bytes): `dims` is a tuple of ints ([N, H, W] for images,
        [N] for labels); `header_bytes` is where the payload starts.

    Raises:
        DataError: bad magic number, unsupported element type or short header.
    """
    if len(data) < _IDX_WORD.size:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = _IDX_WORD.unpack_from(data, 0)
    if magic not in _IDX_NDIM:
        zero_prefix = (magic >> 16) == 0
        element_type = (magic >> 8) & 0xFF
        if zero_prefix and element_type != _IDX_UBYTE:
            raise DataError(
                f"{path}: unsupported IDX element type 0x{element_type:02x} "
                f"(only 0x{_IDX_UBYTE:02x}, unsigned byte, is supported)")
        raise DataError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected "
            f"{IDX_IMAGES_MAGIC} (images) or {IDX_LABELS_MAGIC} (labels)")
    ndim = _IDX_NDIM[magic]
    header_bytes = _IDX_WORD.size * (1 + ndim)
    if len(data) < header_bytes:
        raise DataError(
            f"{path}: truncated IDX header ({len(data)} bytes, need {header_bytes})")
    dims = tuple(_IDX_WORD.unpack_from(data, _IDX_WORD.size * (1 + i))[0]
                 for i in range(ndim))
    return dims, header_bytes


def read_idx(path):
    """Reads an IDX file of unsigned bytes, gzip-compressed or raw.

    Args:
        path: path to the file. Gzip is detected by its magic bytes, not the name.

    Returns:
        uint8 array: [N, H, W] for an images file (magic 2051) or [N] for a labels
        file (magic 2049).

    Raises:
        DataError: missing file, truncated/corrupt gzip, wrong magic number,
            element type other than unsigned byte, or a payload whose length does
            not match the header.
    """
    data = _read_bytes(path)
    dims, header_bytes = _parse_idx_header(path, data)
    expected = math.prod(dims)
    found = len(data) - header_bytes
    if found < expected:
        raise DataError(
            f"{path}: truncated IDX payload (header declares shape {list(dims)}, "
            f"{expected} bytes; found {found})")
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} unexpected trailing bytes after the IDX "
            f"payload of shape {list(dims)}")
    # copy(): frombuffer over `bytes` is read-only; callers may modify the array.
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def write_idx(path, array):
    """Writes uint8 images or labels as an IDX file, gzip-compressed if path ends in .gz.

    Args:
        path: destination path.
        array: uint8 array, [N, H, W] (written with magic 2051) or [N] (magic 2049).

    Raises:
        ValueError: `array` is not uint8 or not 1-D / 3-D.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx needs a uint8 array, got {array.dtype}")
    if array.ndim not in _IDX_MAGIC_FOR_NDIM:
        raise ValueError(f"write_idx needs a [N, H, W] or [N] array, got shape {array.shape}")
    header = _IDX_WORD.pack(_IDX_MAGIC_FOR_NDIM[array.ndim]) + b"".join(
        _IDX_WORD.pack(d) for d in array.shape)
    data = header + np.ascontiguousarray(array).tobytes()
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: identical bytes on every run.
    with open(path, "wb") as f:
        f.write(data)


def sha256_of(path):
    """Returns the hex SHA-256 digest of a file's bytes (as stored, not decompressed).

    Args:
        path: file path.

    Returns:
        64-character lowercase hex string.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Download and location of the MNIST files
# ---------------------------------------------------------------------------


def _fetch_to(url, out_file, urlopen):
    """Streams `url` into an open binary file and returns the SHA-256 of the bytes."""
    digest = hashlib.sha256()
    with urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        for chunk in iter(lambda: response.read(_COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
            out_file.write(chunk)
    return digest.hexdigest()


def _try_mirror(url, dest, expected_sha256, urlopen):
    """Downloads `url` to a temp file beside `dest`, verifies it, then moves it into place.

    Args:
        url: full URL of the file.
        dest: final path.
        expected_sha256: hex digest the downloaded bytes must have.
        urlopen: `urllib.request.urlopen`-compatible callable.

    Returns:
        None on success, else a one-line reason this mirror failed. The temp file
        never survives a failure.
    """
    fd, tmp_path = tempfile.mkstemp(
        prefix=f".{os.path.basename(dest)}.", suffix=".part", dir=os.path.dirname(dest))
    try:
        with os.fdopen(fd, "wb") as out_file:
            try:
                got = _fetch_to(url, out_file, urlopen)
            except (OSError, ValueError, http.client.HTTPException) as e:
                return f"{url}: {e}"
        if got != expected_sha256:
            return f"{url}: SHA-256 mismatch (expected {expected_sha256}, got {got})"
        os.replace(tmp_path, dest)  # Atomic: readers never see a partial file.
        tmp_path = None
        return None
    finally:
        if tmp_path is not None:
            os.remove(tmp_path)


def _download_file(name, data_dir, mirrors, urlopen):
    """Downloads one MNIST file into `data_dir`, trying `mirrors` in order.

    Args:
        name: key of `MNIST_FILES`.
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/'.
        urlopen: `urllib.request.urlopen`-compatible callable.

    Returns:
        Path of the verified file.

    Raises:
        DataError: no mirror delivered bytes with the expected SHA-256.
    """
    dest = os.path.join(data_dir, name)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"{data_dir}: cannot create data directory ({e})") from None
    reasons = []
    for mirror in mirrors:
        reason = _try_mirror(mirror + name, dest, MNIST_FILES[name], urlopen)
        if reason is None:
            return dest
        reasons.append(reason)
    raise DataError(f"cannot download {name}: " + ("; ".join(reasons) or "no mirrors given"))


def download_mnist(data_dir, mirrors=MNIST_MIRRORS, urlopen=None):
    """Downloads each of the four MNIST .gz files not already in `data_dir`.

    Every file is written to a temporary file in `data_dir`, checked against its
    SHA-256 in `MNIST_FILES`, and only then moved into place with `os.replace`.
    Files already present are left untouched.

    Args:
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/', tried in order for each file.
        urlopen: `urllib.request.urlopen`-compatible callable (url, timeout=...)
            returning a context manager with `.read(n)`; None uses urllib's.

    Returns:
        Dict from each `MNIST_FILES` name to its path in `data_dir`.

    Raises:
        DataError: a file could not be fetched from any mirror, or its SHA-256
            did not match; no partial or unverified file is left behind.
    """
    urlopen = urlopen or urllib.request.urlopen
    paths = {}
    for name in MNIST_FILES:
        path = os.path.join(data_dir, name)
        paths[name] = path if os.path.exists(path) else _download_file(
            name, data_dir, mirrors, urlopen)
    return paths


def _find_mnist_file(data_dir, name):
    """Returns the path of `name` (.gz) or its uncompressed form in `data_dir`, or None."""
    for candidate in (name, name[:-len(".gz")]):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing_file_error(data_dir, name):
    """The DataError for an MNIST file absent (in both forms) when download is off."""
    path = os.path.join(data_dir, name)
    return DataError(
        f"{path}: MNIST file not found (nor uncompressed {name[:-len('.gz')]}) "
        "and download is disabled")


def ensure_mnist(data_dir, download=True, urlopen=None):
    """Makes sure the four MNIST files are in `data_dir`, downloading missing ones.

    Each file may be present as `name.gz` or uncompressed (`name` without .gz);
    the .gz is preferred when both exist. Files already present are not
    checksum-checked, so users may supply their own IDX files.

    Args:
        data_dir: directory holding (or to receive) the files.
        download: fetch missing files from `MNIST_MIRRORS` if True.
        urlopen: passed to the download (see `download_mnist`); None uses urllib's.

    Returns:
        Dict from each `MNIST_FILES` name to the path of the file found or
        downloaded.

    Raises:
        DataError: a file is missing and `download` is False, or its download
            failed.
    """
    urlopen = urlopen or urllib.request.urlopen
    paths = {}
    for name in MNIST_FILES:
        path = _find_mnist_file(data_dir, name)
        if path is None:
            if not download:
                raise _missing_file_error(data_dir, name)
            path = _download_file(name, data_dir, MNIST_MIRRORS, urlopen)
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------
# Loading and splitting
# ---------------------------------------------------------------------------


def _check_images(path, images):
    """Raises DataError unless `images` is [N, 28, 28]."""
    if images.ndim != 3:
        raise DataError(f"{path}: expected an IDX images file, found a labels file")
    size = images.shape[1:]
    if size != (MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE):
        raise DataError(
            f"{path}: images are {size[0]}x{size[1]}, expected "
            f"{MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE}")


def _check_labels(path, labels):
    """Raises DataError unless `labels` is [N] with values in 0..C-1."""
    if labels.ndim != 1:
        raise DataError(f"{path}: expected an IDX labels file, found an images file")
    bad = np.flatnonzero(labels >= MNIST_NUM_CLASSES)
    if bad.size:
        raise DataError(
            f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside "
            f"0..{MNIST_NUM_CLASSES - 1}")


def load_mnist(data_dir, split):
    """Loads one MNIST split from IDX files in `data_dir`.

    Files are looked up under their `MNIST_FILES` names, .gz or uncompressed.

    Args:
        data_dir: directory holding the files (see `ensure_mnist`).
        split: 'train' (60000 examples) or 'test' (10000 examples).

    Returns:
        (images, labels): uint8 [N, 28, 28] and int64 [N] with values 0..9.

    Raises:
        ValueError: `split` is not 'train' or 'test'.
        DataError: a file is missing or malformed, images are not 28x28, the
            image and label counts differ, or a label is outside 0..9.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    images_name, labels_name = _SPLIT_FILES[split]
    images_path = _find_mnist_file(data_dir, images_name) or os.path.join(data_dir, images_name)
    labels_path = _find_mnist_file(data_dir, labels_name) or os.path.join(data_dir, labels_name)
    images = read_idx(images_path)
    _check_images(images_path, images)
    labels = read_idx(labels_path)
    _check_labels(labels_path, labels)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path} has "
            f"{len(labels)} labels")
    return images, labels.astype(np.int64)


def split_train_validation(images, labels, validation_size, seed):
    """Holds out a deterministic random subset of examples for validation.

    Both parts keep the examples' original relative order, so
    `validation_size=0` returns the input unchanged.

    Args:
        images: [N, ...] array.
        labels: [N] array.
        validation_size: number of examples to hold out, 0..N.
        seed: integer seed of the permutation that picks the held-out examples.

    Returns:
        (train_images [N-V, ...], train_labels [N-V],
         val_images [V, ...], val_labels [V]) with V = validation_size.

    Raises:
        ValueError: length mismatch or `validation_size` outside 0..N.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if not 0 <= validation_size <= n:
        raise ValueError(f"validation_size must be in 0..{n}, got {validation_size}")
    order = np.random.RandomState(seed).permutation(n)
    val_idx = np.sort(order[:validation_size])
    train_idx = np.sort(order[validation_size:])
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


# ---------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------


def scale_images(images):
    """Scales uint8 pixels to float32 in [0, 1] and adds a channel axis.

    pixel / 255 keeps the raw intensities, only rescaled to [0, 1]. The EM-routing
    paper states no other MNIST preprocessing (its per-image standardisation is
    for smallNORB); Sabour et al.'s research/capsules MNIST input also feeds
    pixel * (1/255).

    Args:
        images: uint8 [N, H, W].

    Returns:
        float32 [N, H, W, 1] in [0, 1].
    """
    images = np.asarray(images)
    return (images.astype(np.float32) / np.float32(_PIXEL_MAX))[..., np.newaxis]


def _scale_batch(images, labels):
    """tf.data map: uint8 [B, H, W], labels [B] -> float32 [B, H, W, 1], int64 [B]."""
    import tensorflow.compat.v1 as tf

    scaled = tf.cast(images, tf.float32) / _PIXEL_MAX  # [B, H, W] in [0, 1], as scale_images.
    scaled = tf.expand_dims(scaled, axis=-1)  # [B, H, W, 1]
    return scaled, tf.cast(labels, tf.int64)


def random_shift(image, max_shift, seed=None):
    """Moves `image` by up to `max_shift` pixels along each axis, zeros filling in.

    The two offsets are drawn uniformly and independently from -max_shift..max_shift
    (pad by max_shift, then crop a random window of the original size). Sabour et
    al. (2017) train their MNIST capsule network on images shifted by up to 2 pixels
    this way; the EM-routing paper states no MNIST augmentation.

    Args:
        image: `[H, W]` tensor of any dtype.
        max_shift: largest offset in pixels, >= 0.
        seed: op-level seed of the offsets.

    Returns:
        `[H, W]`, the same dtype.
    """
    import tensorflow.compat.v1 as tf

    height, width = image.shape
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift]])  # [H + 2s, W + 2s]
    return tf.image.random_crop(padded, [height, width], seed=seed)  # [H, W]


def make_dataset(images, labels, batch_size, shuffle=False, repeat=False, seed=None,
                 drop_remainder=False, max_shift=0):
    """Builds the tf.data input pipeline over in-memory MNIST arrays.

    Order: from_tensor_slices -> shuffle (buffer = whole set, reshuffled every
    epoch) -> repeat -> random shift (only with max_shift > 0) -> batch -> scale
    to [0, 1] -> prefetch. Shuffling before repeat keeps epochs disjoint. Works in
    `tensorflow.compat.v1` graph mode with `tf.data.make_one_shot_iterator` /
    `make_initializable_iterator`.

    NumPy arrays are embedded in the graph as constants (about 47 MB for the
    MNIST train set); pass `tf.placeholder`s and feed them to an initializable
    iterator to keep them out of the graph (and out of checkpoints' meta graphs).

    Args:
        images: uint8 [N, H, W], an array or a tensor.
        labels: integer [N], an array or a tensor.
        batch_size: examples per batch, > 0.
        shuffle: shuffle the examples (differently each epoch).
        repeat: repeat indefinitely.
        seed: op-level shuffle seed (None: nondeterministic unless a graph seed
            is set).
        drop_remainder: drop the last partial batch; if False the last batch
            may hold fewer than `batch_size` examples.
        max_shift: move every image by up to this many pixels along each axis
            (`random_shift`, a new draw each time it is read); 0: unchanged.

    Returns:
        `tf.data.Dataset` of (images float32 [B, H, W, 1] in [0, 1], labels
        int64 [B]).

    Raises:
        ValueError: length mismatch, non-positive `batch_size` or negative `max_shift`.
    """
    import tensorflow.compat.v1 as tf

    if isinstance(images, np.ndarray) and len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))  # ([H, W], [])
    if shuffle:
        whole_set = tf.shape(images, out_type=tf.int64)[0]
        dataset = dataset.shuffle(
            buffer_size=whole_set, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if max_shift:
        dataset = dataset.map(lambda image, label: (random_shift(image, max_shift, seed), label))  # ([H, W], [])
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)  # ([B, H, W], [B])
    dataset = dataset.map(_scale_batch)  # ([B, H, W, 1], [B])
    return dataset.prefetch(tf.data.experimental.AUTOTUNE)


# ---------------------------------------------------------------------------
# Metrics and plots
# ---------------------------------------------------------------------------


def confusion_matrix(labels, predictions, num_classes):
    """Counts (true class, predicted class) pairs.

    Args:
        labels: integer [N], values in 0..C-1.
        predictions: integer [N], values in 0..C-1.
        num_classes: C.

    Returns:
        int64 [C, C]; entry [i, j] counts examples of true class i predicted as j.

    Raises:
        ValueError: length mismatch or values outside 0..C-1.
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _new_figure(figsize):
    """Returns a matplotlib Figure drawn by the Agg backend, without touching pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=_PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path):
    """Writes `figure` to `path` as PNG, creating the parent directory if needed."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    figure.savefig(path, format="png")


def _as_grayscale_2d(images):
    """[N, H, W] or [N, H, W, 1] -> ([N, H, W], vmax) with vmax 255 for uint8, 1 for floats."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # [N, H, W]
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, 1], got {images.shape}")
    vmax = _PIXEL_MAX if images.dtype == np.uint8 else 1.0
    return images, vmax


def save_mnist_as_image(images, labels, path, predictions=None, columns=10):
    """Saves a PNG grid of digits, each titled with its label (and prediction).

    Titles read "5", or "5 pred 3" when predictions are given; wrong predictions
    get a red title.

    Args:
        images: [N, H, W] or [N, H, W, 1]; uint8 in 0..255 or float in [0, 1].
        labels: integer [N].
        path: output PNG path.
        predictions: optional integer [N].
        columns: digits per row, > 0.

    Raises:
        ValueError: empty input, bad shapes or mismatched lengths.
    """
    images, vmax = _as_grayscale_2d(images)
    n = len(images)
    if n == 0 or len(labels) != n or (predictions is not None and len(predictions) != n):
        raise ValueError("need N > 0 images with N labels (and N predictions if given)")
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    figure = _new_figure((columns * _DIGIT_CELL_WIDTH_IN, rows * _DIGIT_CELL_HEIGHT_IN))
    for i in range(n):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(images[i], cmap="gray", vmin=0.0, vmax=vmax)
        axes.set_axis_off()
        title, color = f"{labels[i]}", "black"
        if predictions is not None:
            title = f"{labels[i]} pred {predictions[i]}"
            color = "black" if predictions[i] == labels[i] else "red"
        axes.set_title(title, color=color, fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)


def plot_confusion_matrix(matrix, path, class_names=None):
    """Saves a confusion matrix as an annotated PNG heat map.

    Args:
        matrix: integer [C, C], rows = true class, columns = predicted class (as
            returned by `confusion_matrix`).
        path: output PNG path.
        class_names: optional C tick labels; defaults to "0".."C-1".

    Raises:
        ValueError: `matrix` is not square or `class_names` has the wrong length.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be [C, C], got {matrix.shape}")
    num_classes = matrix.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    side = max(_CONFUSION_MIN_SIZE_IN, num_classes * _CONFUSION_CELL_IN)
    figure = _new_figure((side, side))
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(matrix, cmap="Blues")
    threshold = _CONFUSION_TEXT_SWITCH * matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center", fontsize=_TITLE_FONT_PT,
                  color="white" if count > threshold else "black")
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks)
    axes.set_xticklabels(names)
    axes.set_yticks(ticks)
    axes.set_yticklabels(names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    figure.tight_layout()
    _save_png(figure, path)


def plot_training_curves(history, path):
    """Saves loss and accuracy curves as a two-panel PNG.

    Args:
        history: dict of equal-length lists 'step', 'loss', 'train_accuracy', and
            optionally 'val_step' with 'val_accuracy' (equal length to each other).
        path: output PNG path.

    Raises:
        KeyError: a required key is missing.
        ValueError: paired lists differ in length.
    """
    steps, loss, train_acc = history["step"], history["loss"], history["train_accuracy"]
    val_steps, val_acc = history.get("val_step", []), history.get("val_accuracy", [])
    if not len(steps) == len(loss) == len(train_acc) or len(val_steps) != len(val_acc):
        raise ValueError("history lists must pair up: step/loss/train_accuracy, "
                         "val_step/val_accuracy")
    figure = _new_figure(_CURVES_FIGSIZE_IN)
    loss_axes = figure.add_subplot(1, 2, 1)
    loss_axes.plot(steps, loss, label="train loss")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    acc_axes = figure.add_subplot(1, 2, 2)
    acc_axes.plot(steps, train_acc, label="train accuracy")
    if val_steps:
        acc_axes.plot(val_steps, val_acc, marker="o", label="validation accuracy")
    acc_axes.set_xlabel("step")
    acc_axes.set_ylabel("accuracy")
    acc_axes.legend()
    figure.tight_layout()
    _save_png(figure, path)
