"""IDX files (the format of the MNIST files), gzip-compressed or raw, `DataError`, and the split loading.

`read_idx`/`write_idx` handle one file; `load_split` reads and checks an images file and its labels
(MNIST-style datasets), found by `find_file`, which every dataset module uses to accept its published
.gz files or their uncompressed forms.

The IDX format is described on LeCun's MNIST page (http://yann.lecun.com/exdb/mnist/); Hinton,
Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 reports MNIST test error.
Every malformed-input case becomes a one-line `DataError`.

Axis names used in the docstrings: N examples, H/W image height/width.
"""

import gzip
import math
import os
import struct
import zlib

import numpy as np

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
_GZIP_SUFFIX = ".gz"  # Name ending of a dataset's published (compressed) files.


class DataError(Exception):
    """A data file is missing, unreadable or malformed.

    The message is a single line naming the file and what is wrong with it, fit
    to print before exiting.
    """

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


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
                f"(only 0x{_IDX_UBYTE:02x}, unsigned byte, is supported)"
            )
        raise DataError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected "
            f"{IDX_IMAGES_MAGIC} (images) or {IDX_LABELS_MAGIC} (labels)"
        )
    ndim = _IDX_NDIM[magic]
    header_bytes = _IDX_WORD.size * (1 + ndim)
    if len(data) < header_bytes:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_bytes})")
    dims = tuple(_IDX_WORD.unpack_from(data, _IDX_WORD.size * (1 + i))[0] for i in range(ndim))
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
            f"{path}: truncated IDX payload (header declares shape {list(dims)}, {expected} bytes; found {found})"
        )
    if found > expected:
        raise DataError(
            f"{path}: {found - expected} unexpected trailing bytes after the IDX payload of shape {list(dims)}"
        )
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
    header = _IDX_WORD.pack(_IDX_MAGIC_FOR_NDIM[array.ndim]) + b"".join(_IDX_WORD.pack(d) for d in array.shape)
    data = header + np.ascontiguousarray(array).tobytes()
    if path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: identical bytes on every run.
    with open(path, "wb") as f:
        f.write(data)


def find_file(data_dir, name):
    """Returns the path of `name` or of its uncompressed form in `data_dir`, or None.

    Shared by the dataset modules, whose files are published gzip-compressed (`name` ends in .gz)
    but may be kept uncompressed (`name` without .gz); the .gz is preferred when both exist.

    Args:
        data_dir: directory to look in.
        name: published file name, e.g. "train-images-idx3-ubyte.gz".

    Returns:
        The path of the first of `name`, `name` without .gz that is a file, or None.
    """
    candidates = (name, name[: -len(_GZIP_SUFFIX)]) if name.endswith(_GZIP_SUFFIX) else (name,)
    for candidate in candidates:
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _check_images(path, images, image_size):
    """Raises DataError unless `images` is [N, image_size, image_size]."""
    if images.ndim != 3:
        raise DataError(f"{path}: expected an IDX images file, found a labels file")
    size = images.shape[1:]
    if size != (image_size, image_size):
        raise DataError(f"{path}: images are {size[0]}x{size[1]}, expected {image_size}x{image_size}")


def _check_labels(path, labels, num_classes):
    """Raises DataError unless `labels` is [N] with values in 0..num_classes-1."""
    if labels.ndim != 1:
        raise DataError(f"{path}: expected an IDX labels file, found an images file")
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{num_classes - 1}")


def load_split(data_dir, images_name, labels_name, image_size, num_classes):
    """Loads one split of an IDX image-classification dataset (MNIST, Fashion-MNIST) from `data_dir`.

    Args:
        data_dir: directory holding the files, each as its published .gz or uncompressed (`find_file`).
        images_name: published name of the images file, e.g. "t10k-images-idx3-ubyte.gz".
        labels_name: published name of the labels file.
        image_size: H = W the images must have.
        num_classes: C; labels must lie in 0..C-1.

    Returns:
        (images, labels): uint8 [N, H, W] and int64 [N] with values 0..C-1.

    Raises:
        DataError: a file is missing or malformed, images are not HxW, the image and label counts
            differ, or a label is outside 0..C-1.
    """
    images_path = find_file(data_dir, images_name) or os.path.join(data_dir, images_name)
    labels_path = find_file(data_dir, labels_name) or os.path.join(data_dir, labels_name)
    images = read_idx(images_path)
    _check_images(images_path, images, image_size)
    labels = read_idx(labels_path)
    _check_labels(labels_path, labels, num_classes)
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)
