"""smallNORB: its six binary-matrix files, their verified download, the splits and the viewpoint tables.

LeCun, Huang & Bottou, "Learning methods for generic object recognition with invariance to pose and
lighting", CVPR 2004: toys of 5 categories, 10 instances each (5 for training, 5 for test), taken by a
stereo camera pair at 9 elevations, 18 azimuths and 6 lightings — 24300 stereo pairs of 96x96 images
per split. Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 trains and
tests on it (its preprocessing, which needs TensorFlow: data/smallnorb_preprocess.py) and Section 5.1 tests on novel
viewpoints (`viewpoint_split`). `SPEC` describes the dataset to `data.get`.

Axis names used in the docstrings: N examples, S = 2 images of a stereo pair, H/W image height/width
(96 as stored), K channels (1: the first image of each pair, 2: both).
"""

import os

import numpy as np

from data.download import download_missing, ensure_files
from data.idx import DataError, find_file
from data.norb_matrix import open_matrix, read_matrix
from data.spec import DatasetSpec

NAME = "smallnorb"

_TRAIN = "smallnorb-5x46789x9x18x6x2x96x96-training-"  # Training instances 4, 6, 7, 8, 9.
_TEST = "smallnorb-5x01235x9x18x6x2x96x96-testing-"  # Test instances 0, 1, 2, 3, 5.

# The six published files and the SHA-256 of each .gz (sizes in bytes beside them), as given with the
# task and identical in tensorflow/datasets tensorflow_datasets/url_checksums/smallnorb.txt.
FILES = {
    _TRAIN + "dat.mat.gz": "5ffd6272a07d32695ee1082a26a41a93a37aab8c28da047f8c34ed348d214873",  # 131,896,188
    _TRAIN + "cat.mat.gz": "2784e542c1922060691090952b6cd6278879a216c90f81476f0f00256d42cdaa",  # 348
    _TRAIN + "info.mat.gz": "de7eb932ebe7a4ee16217fead60660d0eb3d23632c2f4d1c51f88c501c17bf32",  # 71,052
    _TEST + "dat.mat.gz": "cf7104eed3e51174d2f65b66d1e5878b9da233b886f161b0d88f4510ba2c7474",  # 130,799,817
    _TEST + "cat.mat.gz": "ecaf6d5bb8c3bc5eab9cf0258f6d2198dd474e016e374836fc097f2e5ff509ff",  # 347
    _TEST + "info.mat.gz": "16adf314226327ee006d1a44db8cfef52773c06c829951d5653a9f6f310248a2",  # 10,428
}

MIRRORS = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)  # The dataset's own page.

# (images, categories, info) file per split; keys of FILES.
_SPLIT_FILES = {
    split: (prefix + "dat.mat.gz", prefix + "cat.mat.gz", prefix + "info.mat.gz")
    for split, prefix in (("train", _TRAIN), ("test", _TEST))
}

RAW_SIZE = 96  # Stored images are 96x96 (smallNORB page).
STEREO = 2  # Images per example: the left and right camera of the stereo pair.
CHANNELS = 1  # What `SPEC` and `load` give by default: the first image of each pair.
DOWNSAMPLED_SIZE = 48  # Paper Section 5: smallNORB is downsampled to 48x48 (data/smallnorb_preprocess.py).
IMAGE_SIZE = 32  # Paper Section 5: the network sees 32x32 crops of those (`SPEC.image_size`).
CLASS_NAMES = ("animal", "human", "airplane", "truck", "car")  # Category 0..4 (smallNORB page).
NUM_CLASSES = len(CLASS_NAMES)

# The info file's columns and their ranges (smallNORB page): instance 0..9; elevation 0..8 (30 to 70
# degrees in 5 degree steps); azimuth 0, 2, ..., 34 (times 10 degrees); lighting 0..5.
INFO_COLUMNS = ("instance", "elevation", "azimuth", "lighting")
_INFO_MAX = (9, 8, 34, 5)
_AZIMUTH_STEP = 2  # Azimuth values are even.
_AZIMUTH = INFO_COLUMNS.index("azimuth")
_ELEVATION = INFO_COLUMNS.index("elevation")

_READ_CHUNK_BYTES = 16 << 20  # Stereo pairs are read 16 MiB at a time beside the result array.

# Novel viewpoints (paper Section 5.1), in info-table units. Azimuth: train on 300, 320, 340, 0, 20 and
# 40 degrees, test on 60 to 280. Elevation: train on the 3 smallest (30, 35, 40 degrees), test on the
# 6 larger.
_FAMILIAR = {
    "azimuth": (_AZIMUTH, (30, 32, 34, 0, 2, 4)),
    "elevation": (_ELEVATION, (0, 1, 2)),
}


def download(data_dir, mirrors=MIRRORS, urlopen=None):
    """Downloads each of the six smallNORB .mat.gz files not already in `data_dir`.

    Every file is written to a temporary file in `data_dir`, checked against its SHA-256 in `FILES`,
    and only then moved into place with `os.replace`. Files already present are left untouched.

    Args:
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/', tried in order for each file.
        urlopen: `urllib.request.urlopen`-compatible callable (url, timeout=...) returning a context
            manager with `.read(n)`; None uses urllib's.

    Returns:
        Dict from each `FILES` name to its path in `data_dir`.

    Raises:
        DataError: a file could not be fetched from any mirror, or its SHA-256 did not match; no
            partial or unverified file is left behind.
    """
    return download_missing(FILES, data_dir, mirrors, urlopen)


def ensure(data_dir, download=True, urlopen=None):
    """Makes sure the six smallNORB files are in `data_dir` (.mat.gz or .mat), downloading missing ones.

    Args:
        data_dir: directory holding (or to receive) the files.
        download: fetch missing files from `MIRRORS` if True.
        urlopen: passed to the download (see `download`); None uses urllib's.

    Returns:
        Dict from each `FILES` name to the path of the file found or downloaded.

    Raises:
        DataError: a file is missing and `download` is False, or its download failed.
    """
    return ensure_files(FILES, data_dir, MIRRORS, "smallNORB", download, urlopen)


def _split_paths(data_dir, split):
    """(dat, cat, info) paths of `split` in `data_dir`, .mat.gz preferred over .mat."""
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    return tuple(find_file(data_dir, name) or os.path.join(data_dir, name) for name in _SPLIT_FILES[split])


def _read_labels(path):
    """Reads a cat file: int32 [N] categories, each in 0..C-1."""
    labels = read_matrix(path)
    if labels.dtype != np.int32 or labels.ndim != 1:
        raise DataError(f"{path}: expected int32 categories [N], found {labels.dtype} {list(labels.shape)}")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0..{NUM_CLASSES - 1}")
    return labels


def _read_info(path):
    """Reads an info file: int32 [N, 4] (instance, elevation, azimuth, lighting), each in its range."""
    info = read_matrix(path)
    if info.dtype != np.int32 or info.shape[1:] != (len(INFO_COLUMNS),):
        raise DataError(f"{path}: expected int32 info [N, {len(INFO_COLUMNS)}], found {info.dtype} {list(info.shape)}")
    for column, (name, largest) in enumerate(zip(INFO_COLUMNS, _INFO_MAX)):
        values = info[:, column]  # [N]
        step = _AZIMUTH_STEP if column == _AZIMUTH else 1
        bad = np.flatnonzero((values < 0) | (values > largest) | (values % step != 0))
        if bad.size:
            allowed = f"0, {step}, ..., {largest}" if step > 1 else f"0..{largest}"
            raise DataError(f"{path}: {name} {values[bad[0]]} in row {bad[0]} is outside {allowed}")
    return info


def _read_images(path, channels, cat_path, count):
    """Streams a dat file of `count` (as in `cat_path`) uint8 stereo pairs [N, 2, 96, 96] into [N, 96, 96, K].

    The result is allocated once; pairs are read a chunk at a time, so the whole file is never held
    twice in memory.
    """
    with open_matrix(path) as reader:
        if reader.dtype != np.uint8 or reader.shape[1:] != (STEREO, RAW_SIZE, RAW_SIZE):
            raise DataError(
                f"{path}: expected uint8 stereo pairs [N, {STEREO}, {RAW_SIZE}, {RAW_SIZE}], found "
                f"{reader.dtype} {list(reader.shape)}"
            )
        if reader.shape[0] != count:
            raise DataError(f"{path}: {reader.shape[0]} stereo pairs but {cat_path} has {count} labels")
        images = np.empty((count, RAW_SIZE, RAW_SIZE, channels), np.uint8)  # [N, 96, 96, K]
        step = max(1, _READ_CHUNK_BYTES // (STEREO * RAW_SIZE * RAW_SIZE))
        for start in range(0, count, step):
            pairs = reader.read_rows(min(step, count - start))  # [n, 2, 96, 96]
            images[start : start + len(pairs)] = np.moveaxis(pairs[:, :channels], 1, -1)  # [n, 96, 96, K]
        reader.check_end()
    return images


def load(data_dir, split, channels=CHANNELS):
    """Loads one smallNORB split from its binary-matrix files in `data_dir`, .mat.gz or .mat.

    The category and info files are read and checked against each other first, then the image file's
    header against them, before its 430 MB (uncompressed) are streamed in.

    Args:
        data_dir: directory holding the files (see `ensure`).
        split: 'train' or 'test' (24300 stereo pairs each).
        channels: 1 for the first image of each stereo pair, 2 for both as two channels.

    Returns:
        (images, labels): uint8 [N, 96, 96, K] and int64 [N] with values 0..4 (`CLASS_NAMES` order).

    Raises:
        ValueError: `split` is not 'train' or 'test', or `channels` is not 1 or 2.
        DataError: a file is missing or malformed (magic number, header, truncated or trailing data),
            the three files disagree on the number of examples, or a label or info value is out of range.
    """
    if channels not in (1, STEREO):
        raise ValueError(f"channels must be 1 or {STEREO}, got {channels!r}")
    dat_path, cat_path, info_path = _split_paths(data_dir, split)
    labels = _read_labels(cat_path)
    info = _read_info(info_path)
    if len(info) != len(labels):
        raise DataError(f"{info_path}: {len(info)} rows but {cat_path} has {len(labels)} labels")
    images = _read_images(dat_path, channels, cat_path, len(labels))
    return images, labels.astype(np.int64)


def load_info(data_dir, split):
    """Loads one split's viewpoint and lighting table from its info file in `data_dir`.

    Args:
        data_dir: directory holding the files (see `ensure`).
        split: 'train' or 'test'.

    Returns:
        int64 [N, 4]: the columns `INFO_COLUMNS` (instance, elevation, azimuth, lighting), rows in the
        order of `load`'s examples.

    Raises:
        ValueError: `split` is not 'train' or 'test'.
        DataError: the file is missing or malformed, or a value is outside its range.
    """
    _, _, info_path = _split_paths(data_dir, split)
    return _read_info(info_path).astype(np.int64)


def viewpoint_split(info, kind):
    """Masks of the familiar and the novel viewpoints of the paper's Section 5.1.

    Azimuth: familiar = azimuths 300, 320, 340, 0, 20, 40 degrees (info values 30, 32, 34, 0, 2, 4),
    novel = 60 to 280 degrees (6..28). Elevation: familiar = the 3 smallest elevations (0..2, 30 to 40
    degrees), novel = the 6 larger (3..8).

    Args:
        info: integer [N, 4] info table (`load_info`).
        kind: 'azimuth' or 'elevation'.

    Returns:
        (familiar, novel): bool [N] each, complementary.

    Raises:
        ValueError: unknown `kind` or `info` not [N, 4].
    """
    if kind not in _FAMILIAR:
        raise ValueError(f"kind must be one of {sorted(_FAMILIAR)}, got {kind!r}")
    info = np.asarray(info)
    if info.ndim != 2 or info.shape[1] != len(INFO_COLUMNS):
        raise ValueError(f"info must be [N, {len(INFO_COLUMNS)}], got shape {info.shape}")
    column, familiar_values = _FAMILIAR[kind]
    familiar = np.isin(info[:, column], familiar_values)  # [N]
    return familiar, ~familiar


VALIDATION_SIZE = 0  # default --validation_size: the paper trains on all 24,300 training images
SPEC = DatasetSpec(
    name=NAME,
    image_size=IMAGE_SIZE,
    channels=CHANNELS,
    num_classes=NUM_CLASSES,
    class_names=CLASS_NAMES,
    validation_size=VALIDATION_SIZE,
    ensure=ensure,
    load=load,
)
