"""Fashion-MNIST: its four IDX files, their verified download, and the train and test splits.

Xiao, Rasul & Vollgraf, "Fashion-MNIST: a novel image dataset for benchmarking machine learning
algorithms", arXiv:1708.07747 (2017): 28x28 grayscale Zalando article images in 10 classes, a
drop-in replacement for MNIST with the same file names and IDX format (data/idx.py). Hinton, Sabour &
Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 evaluates on MNIST and smallNORB; this
module offers the harder MNIST-format set beside them. `SPEC` describes the dataset to `data.get`.

Axis names used in the docstrings: N examples, H/W image height/width (28), C classes (10).
"""

from data.download import download_missing, ensure_files
from data.idx import load_split
from data.spec import DatasetSpec

NAME = "fashion_mnist"

# The four published files and the SHA-256 of each .gz, from tensorflow/datasets
# tensorflow_datasets/url_checksums/fashion_mnist.txt (URL, size in bytes, sha256), which lists:
# train-images 26421880 bytes, train-labels 29515, t10k-images 4422102, t10k-labels 5148.
FILES = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

# Zalando Research's download location (github.com/zalandoresearch/fashion-mnist README). An S3
# website endpoint, so plain http only; the SHA-256 check above guards the bytes.
MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# (images file, labels file) per split; keys of FILES.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

IMAGE_SIZE = 28  # "a 28x28 grayscale image" (fashion-mnist README), as MNIST.
CHANNELS = 1  # Grayscale.
# Labels 0..9 in this order (the fashion-mnist README's "Labels" table).
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASS_NAMES)


def download(data_dir, mirrors=MIRRORS, urlopen=None):
    """Downloads each of the four Fashion-MNIST .gz files not already in `data_dir`.

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
    """Makes sure the four Fashion-MNIST files are in `data_dir`, downloading missing ones.

    Each file may be present as `name.gz` or uncompressed (`name` without .gz); present files are not
    checksum-checked.

    Args:
        data_dir: directory holding (or to receive) the files.
        download: fetch missing files from `MIRRORS` if True.
        urlopen: passed to the download (see `download`); None uses urllib's.

    Returns:
        Dict from each `FILES` name to the path of the file found or downloaded.

    Raises:
        DataError: a file is missing and `download` is False, or its download failed.
    """
    return ensure_files(FILES, data_dir, MIRRORS, "Fashion-MNIST", download, urlopen)


def load(data_dir, split):
    """Loads one Fashion-MNIST split from IDX files in `data_dir`, .gz or uncompressed.

    Args:
        data_dir: directory holding the files (see `ensure`).
        split: 'train' (60000 examples) or 'test' (10000 examples).

    Returns:
        (images, labels): uint8 [N, 28, 28] and int64 [N] with values 0..9 (`CLASS_NAMES` order).

    Raises:
        ValueError: `split` is not 'train' or 'test'.
        DataError: a file is missing or malformed, images are not 28x28, the image and label counts
            differ, or a label is outside 0..9.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    return load_split(data_dir, *_SPLIT_FILES[split], IMAGE_SIZE, NUM_CLASSES)


VALIDATION_SIZE = 5000  # default --validation_size: as MNIST, whose format and size it shares
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
