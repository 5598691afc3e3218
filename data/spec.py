"""`DatasetSpec`, the one description every dataset module gives of itself.

Its own module so that data/__init__.py can list the dataset modules while each of them builds
its `SPEC` without importing the package it is part of (no import cycle).
"""

import collections

DatasetSpec = collections.namedtuple(
    "DatasetSpec", ["name", "image_size", "channels", "num_classes", "class_names", "validation_size", "ensure", "load"]
)
DatasetSpec.__doc__ = """A dataset as the training code sees it.

Attributes:
    name: the key in `data.DATASETS`, e.g. "mnist".
    image_size: H = W, pixels per image side of what the network sees (smallNORB: 32, its crops).
    channels: colour channels per pixel (1 for grayscale).
    num_classes: C.
    class_names: C display names, in class-index order.
    validation_size: training images held out for validation when --validation_size is not given (MNIST's
        5,000, the 55,000/5,000 split of the official TensorFlow tutorials; smallNORB 0, the paper trains on
        all 24,300).
    ensure: callable(data_dir) that makes sure the files are in `data_dir` (downloading missing ones)
        and raises `data.idx.DataError` when it cannot.
    load: callable(data_dir, split) returning (uint8 images, int64 labels [N]) for the split 'train'
        or 'test'. Images are [N, H, W] as stored: for MNIST and Fashion-MNIST H = W = image_size;
        smallNORB's are [N, 96, 96, channels] and become image_size crops only through
        `data.smallnorb_preprocess`.
"""
