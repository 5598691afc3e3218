"""MNIST: its four IDX files, their verified download, and the train and test splits.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5
(experiments) reports MNIST test error alongside smallNORB. The files are those once
published on LeCun's MNIST page; `SPEC` describes the dataset to `data.get`.

Axis names used in the docstrings: N examples, H/W image height/width (28 for MNIST),
C classes (10 for MNIST).
"""

from data.download import download_missing, ensure_files
from data.idx import load_split
from data.spec import DatasetSpec

NAME = "mnist"

# The four standard MNIST files and their gzip SHA-256, as listed in
# shared/data/mnist/README.md (byte-identical to the files once published at
# http://yann.lecun.com/exdb/mnist/).
FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# Public mirrors of the original files (the ones torchvision and TFDS use), tried
# in order.
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

# (images file, labels file) per split; keys of FILES.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

IMAGE_SIZE = 28  # MNIST digits are 28x28 pixels (LeCun's MNIST page).
CHANNELS = 1  # Grayscale.
NUM_CLASSES = 10  # Digits 0..9.
CLASS_NAMES = tuple(str(digit) for digit in range(NUM_CLASSES))  # "0".."9"


def download(data_dir, mirrors=MIRRORS, urlopen=None):
    """Downloads each of the four MNIST .gz files not already in `data_dir`.

    Every file is written to a temporary file in `data_dir`, checked against its
    SHA-256 in `FILES`, and only then moved into place with `os.replace`.
    Files already present are left untouched.

    Args:
        data_dir: destination directory (created if missing).
        mirrors: base URLs ending in '/', tried in order for each file.
        urlopen: `urllib.request.urlopen`-compatible callable (url, timeout=...)
            returning a context manager with `.read(n)`; None uses urllib's.

    Returns:
        Dict from each `FILES` name to its path in `data_dir`.

    Raises:
        DataError: a file could not be fetched from any mirror, or its SHA-256
            did not match; no partial or unverified file is left behind.
    """
    return download_missing(FILES, data_dir, mirrors, urlopen)


def ensure(data_dir, download=True, urlopen=None):
    """Makes sure the four MNIST files are in `data_dir`, downloading missing ones.

    Each file may be present as `name.gz` or uncompressed (`name` without .gz);
    the .gz is preferred when both exist. Files already present are not
    checksum-checked, so users may supply their own IDX files.

    Args:
        data_dir: directory holding (or to receive) the files.
        download: fetch missing files from `MIRRORS` if True.
        urlopen: passed to the download (see `download`); None uses urllib's.

    Returns:
        Dict from each `FILES` name to the path of the file found or
        downloaded.

    Raises:
        DataError: a file is missing and `download` is False, or its download
            failed.
    """
    return ensure_files(FILES, data_dir, MIRRORS, "MNIST", download, urlopen)


def load(data_dir, split):
    """Loads one MNIST split from IDX files in `data_dir`.

    Files are looked up under their `FILES` names, .gz or uncompressed.

    Args:
        data_dir: directory holding the files (see `ensure`).
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
    return load_split(data_dir, *_SPLIT_FILES[split], IMAGE_SIZE, NUM_CLASSES)


VALIDATION_SIZE = 5000  # default --validation_size: 55,000 to train, 5,000 to validate, as TensorFlow's tutorials
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
