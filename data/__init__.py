"""The datasets of the experiments (Section 5 of "Matrix capsules with EM routing") and Fashion-MNIST, by name.

One module per dataset (`data.mnist`, `data.fashion_mnist`, `data.smallnorb`), each with a `SPEC`;
beside them the shared readers (`data.idx`, `data.norb_matrix`), the verified download
(`data.download`), and the TensorFlow parts, imported on their own so that reading data never needs
TensorFlow: the `tf.data` input pipeline (`data.pipeline`) and smallNORB's preprocessing
(`data.smallnorb_preprocess`).
"""

import numpy as np

from data import fashion_mnist, mnist, smallnorb
from data.spec import DatasetSpec

__all__ = ["DATASETS", "DatasetSpec", "get", "load_arrays", "for_evaluation", "evaluation_views", "PREPROCESSED"]
__all__ += ["check_augmentation"]

DATASETS = {spec.name: spec for spec in (mnist.SPEC, fashion_mnist.SPEC, smallnorb.SPEC)}


def get(name):
    """Returns the `DatasetSpec` called `name`.

    Args:
        name: a key of `DATASETS`, e.g. "mnist".

    Returns:
        The dataset's `DatasetSpec`.

    Raises:
        ValueError: no dataset has that name.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


MIN_CROP = 17  # --crop: VALID padding needs 17 (conv1 5x5/2 -> 7, conv_caps1 3x3/2 -> 3, conv_caps2 3x3/1 -> 1)
MAX_ROTATION = 180.0  # --max_rotation, degrees: every orientation

# Datasets fed to the network as preprocessed float images (data.pipeline.build_preprocessed_pipeline).
PREPROCESSED = (smallnorb.SPEC.name,)


def load_arrays(name, data_dir, split, channels=smallnorb.CHANNELS):
    """The split's images and labels as the input pipeline takes them, the files downloaded when missing.

    Args:
        name: a key of `DATASETS`.
        data_dir: the dataset's folder.
        split: 'train' or 'test'.
        channels: smallNORB only: 1 (the first image of each stereo pair) or 2 (both).

    Returns:
        (images, int64 labels [N]): uint8 [N, H, W] for the IDX datasets; for smallNORB float32
        [N, 48, 48, channels], downsampled and standardised (smallnorb_preprocess.preprocess).
    """
    spec = get(name)
    spec.ensure(data_dir)
    if name not in PREPROCESSED:
        return spec.load(data_dir, split)
    from data import smallnorb_preprocess  # needs TensorFlow

    images, labels = smallnorb.load(data_dir, split, channels)
    return smallnorb_preprocess.preprocess(images), labels


def for_evaluation(name, images, crop=0):
    """Images as evaluation feeds them: smallNORB's centre 32x32 crop of `load_arrays` output; the others' centre
    `crop` x `crop` window (a run trained on random crops, --crop) or the images as they are (crop 0)."""
    if name not in PREPROCESSED:
        return _window(images, crop, (0, 0)) if crop else images
    from data import smallnorb_preprocess  # needs TensorFlow

    return smallnorb_preprocess.centre_crop(images)


def check_augmentation(name, max_shift, crop, max_rotation):
    """ValueError naming the flag unless the training augmentation suits dataset `name`: --max_shift below its
    image size, --crop 0 or MIN_CROP..its size - 1 (not smallNORB, cropped by its own preprocessing), and
    --max_rotation within 0..MAX_ROTATION degrees."""
    size = get(name).image_size
    if not 0 <= max_shift < size:
        raise ValueError("--max_shift must be in 0..%d, got %r" % (size - 1, max_shift))
    if crop and (name in PREPROCESSED or not MIN_CROP <= crop < size):
        raise ValueError("--crop must be 0 or in %d..%d (not smallNORB), got %r" % (MIN_CROP, size - 1, crop))
    if not 0 <= max_rotation <= MAX_ROTATION:
        raise ValueError("--max_rotation must be in 0..%g degrees, got %r" % (MAX_ROTATION, max_rotation))


def _window(images, size, offset):
    """The `size` x `size` window of every image of `images` [N, H, W] `offset` = (dy, dx) pixels from the centre
    one (top-left corner ((H - size) // 2, (W - size) // 2)), zeros beyond the image's edge: [N, size, size]."""
    (dy, dx), (height, width) = offset, images.shape[1:3]
    margin = max(abs(dy), abs(dx))
    padded = np.pad(images, ((0, 0), (margin, margin), (margin, margin)))  # [N, H + 2m, W + 2m]
    top, left = (height - size) // 2 + margin + dy, (width - size) // 2 + margin + dx
    return padded[:, top : top + size, left : left + size]  # [N, size, size]


def _shifted(images, offset):
    """`images` [N, H, W] with their content moved by `offset` = (dy, dx) pixels, zeros filling in."""
    out = np.zeros_like(images)  # [N, H, W]
    (dy, dx), (height, width) = offset, images.shape[1:3]
    rows_to, rows_from = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height + min(-dy, 0))
    cols_to, cols_from = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width + min(-dx, 0))
    out[:, rows_to, cols_to] = images[:, rows_from, cols_from]
    return out


def evaluation_views(name, images, count, crop=0):
    """The `count` views of the multi-crop test: the centre view (`for_evaluation`) first, then the authors'
    offsets (+-1, +-2, +-3 pixels on the diagonals; at most 13 views in all).

    smallNORB: 32x32 crops of the preprocessed 48x48 images at those offsets. The IDX datasets with `crop`
    (--crop): the `crop` x `crop` windows at those offsets; without, the images, which are the network's size,
    moved by the opposite offsets, zeros filling in (the same view change).
    """
    from data import smallnorb_preprocess  # needs TensorFlow

    offsets = smallnorb_preprocess.multi_crop_offsets()
    if not 1 <= count <= len(offsets):
        raise ValueError("multi_crop must be in 1..%d, got %r" % (len(offsets), count))
    if name in PREPROCESSED:
        return [smallnorb_preprocess.crop_at(images, offset) for offset in offsets[:count]]
    if crop:
        return [_window(images, crop, offset) for offset in offsets[:count]]
    return [_shifted(images, (-dy, -dx)) for dy, dx in offsets[:count]]


def viewpoint_masks(name, data_dir, split, kind):
    """(familiar, novel) boolean masks over a smallNORB split's images for `kind` 'azimuth' or 'elevation'
    (smallnorb.viewpoint_split); None for kind 'none'."""
    if kind == "none":
        return None
    if name not in PREPROCESSED:
        raise ValueError("viewpoint splits need smallNORB's info files, not %s" % name)
    return smallnorb.viewpoint_split(smallnorb.load_info(data_dir, split), kind)
