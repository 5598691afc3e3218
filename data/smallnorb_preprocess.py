"""The paper's smallNORB preprocessing: NumPy for the fixed part, TensorFlow ops for the random part.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 (Table 1): "We downsample
smallNORB to 48x48 pixels and normalize each image to have zero mean and unit variance. During
training, we randomly crop 32x32 patches and add random brightness and contrast to the cropped images.
During test, we crop a 32x32 patch from the center of the image." Here: `preprocess` (= `downsample`
then `standardise`) once over the loaded arrays; `distort` per training image inside a `tf.data` map;
`centre_crop` for test; `multi_crop_offsets` and `crop_at` for the authors' 13-crop test. Its own
module, as data/pipeline.py, so that reading the data never needs TensorFlow.

Axis names used in the docstrings: N examples, H/W image height/width (96 stored, 48 downsampled,
32 cropped), K channels.
"""

import numpy as np
import tensorflow.compat.v1 as tf

from data.smallnorb import DOWNSAMPLED_SIZE, IMAGE_SIZE, RAW_SIZE

_DOWNSAMPLE_FACTOR = RAW_SIZE // DOWNSAMPLED_SIZE  # 96 -> 48: each output pixel averages a 2x2 block.
_STANDARDISE_CHUNK = 1024  # Images standardised per step: bounds the float64 temporaries.

# Contrast factor range of the authors' released code (google-research capsule_em/norb/norb_record.py:
# tf.image.random_contrast(image, lower=0.2, upper=1.8)). A factor about the image mean, so it means the
# same on standardised images.
CONTRAST_RANGE = (0.2, 1.8)
# The authors' code adds a brightness delta of up to 63 grey levels (tf.image.random_brightness(image,
# max_delta=63)) to 0..255 pixels and standardises each crop afterwards, which removes any shift and any
# positive contrast factor again: in that code neither distortion changes the network's input. Here they
# follow the paper and act on standardised crops, where a delta is in standard deviations; the value is
# our choice, not the authors': their 63 as a fraction of the 0..255 range, about 0.25.
_AUTHORS_MAX_BRIGHTNESS_DELTA = 63  # grey levels, norb_record.py
_PIXEL_RANGE = 255  # uint8 grey levels
MAX_BRIGHTNESS_DELTA = _AUTHORS_MAX_BRIGHTNESS_DELTA / _PIXEL_RANGE

# The authors' multi-crop test (norb_record.py with patching=True): the centre crop, then glimpses whose
# centres move by (+-k, +-k) pixels for k = 1, 2, 3, the diagonals in their order ("bxs_m2"): 13 crops.
_MULTI_CROP_STEPS = (1, 2, 3)
_DIAGONALS = ((1, 1), (1, -1), (-1, 1), (-1, -1))


def downsample(images):
    """Averages each 2x2 pixel block (area downsampling, 96x96 -> 48x48).

    Args:
        images: [N, 96, 96, K], uint8 or float.

    Returns:
        float32 [N, 48, 48, K].

    Raises:
        ValueError: the images are not [N, 96, 96, K].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:3] != (RAW_SIZE, RAW_SIZE):
        raise ValueError(f"downsample needs [N, {RAW_SIZE}, {RAW_SIZE}, K] images, got shape {images.shape}")
    count, _, _, channels = images.shape
    blocks = images.reshape(
        count, DOWNSAMPLED_SIZE, _DOWNSAMPLE_FACTOR, DOWNSAMPLED_SIZE, _DOWNSAMPLE_FACTOR, channels
    )  # [N, 48, 2, 48, 2, K]
    return blocks.mean(axis=(2, 4), dtype=np.float32)  # [N, 48, 48, K]


def standardise(images):
    """Scales each image to zero mean and unit variance over all its pixels and channels.

    As tf.image.per_image_standardization: (x - mean) / max(std, 1/sqrt(H*W*K)), so a constant image
    becomes zeros instead of NaN. Statistics are taken in float64.

    Args:
        images: [N, H, W, K], uint8 or float.

    Returns:
        float32 [N, H, W, K].
    """
    images = np.asarray(images)
    result = np.empty(images.shape, np.float32)
    min_std = 1.0 / np.sqrt(np.prod(images.shape[1:]))
    for start in range(0, len(images), _STANDARDISE_CHUNK):
        chunk = images[start : start + _STANDARDISE_CHUNK].astype(np.float64)  # [n, H, W, K]
        mean = chunk.mean(axis=(1, 2, 3), keepdims=True)  # [n, 1, 1, 1]
        std = np.maximum(chunk.std(axis=(1, 2, 3), keepdims=True), min_std)  # [n, 1, 1, 1]
        result[start : start + len(chunk)] = (chunk - mean) / std
    return result


def preprocess(images):
    """The fixed part of the paper's preprocessing: downsample to 48x48, then standardise each image.

    Args:
        images: uint8 [N, 96, 96, K] (`data.smallnorb.load`).

    Returns:
        float32 [N, 48, 48, K], each image with zero mean and unit variance.
    """
    return standardise(downsample(images))


def _op_seed(seed, index):
    """The op-level seed of the `index`-th random op of `distort`: distinct ops, independent draws."""
    return None if seed is None else seed + index


def random_crop(image, seed=None):
    """A random 32x32 window of one image, every position equally likely.

    Args:
        image: [48, 48, K] tensor (static K).
        seed: op-level seed.

    Returns:
        [32, 32, K] tensor, the same dtype.
    """
    channels = image.shape.as_list()[-1]
    return tf.image.random_crop(image, [IMAGE_SIZE, IMAGE_SIZE, channels], seed=seed)  # [32, 32, K]


def random_brightness_contrast(image, seed=None, max_delta=MAX_BRIGHTNESS_DELTA, contrast_range=CONTRAST_RANGE):
    """Adds a random brightness delta, then scales each channel about its mean by a random factor.

    Output = (x + d - m) * f + m with d ~ U[-max_delta, max_delta] and f ~ U[contrast_range], m the
    channel mean of x + d (tf.image.random_brightness, then tf.image.random_contrast).

    Args:
        image: float [H, W, K] tensor (a standardised crop).
        seed: op-level seed; the two draws use different seeds derived from it.
        max_delta: largest brightness shift, >= 0 (in the image's units: standard deviations).
        contrast_range: (lower, upper) contrast factors, 0 <= lower < upper.

    Returns:
        float [H, W, K] tensor.
    """
    image = tf.image.random_brightness(image, max_delta, seed=_op_seed(seed, 0))  # [H, W, K]
    return tf.image.random_contrast(image, *contrast_range, seed=_op_seed(seed, 1))  # [H, W, K]


def distort(image, seed=None):
    """The paper's training distortion of one preprocessed image: a random 32x32 crop, then random
    brightness and contrast (`MAX_BRIGHTNESS_DELTA`, `CONTRAST_RANGE`).

    Meant for `tf.data.Dataset.map` over the examples (one draw per image), before batching.

    Args:
        image: float32 [48, 48, K] tensor (`preprocess`ed).
        seed: op-level seed (None: nondeterministic unless a graph seed is set).

    Returns:
        float32 [32, 32, K] tensor.
    """
    crop = random_crop(image, seed=_op_seed(seed, 0))  # [32, 32, K]
    return random_brightness_contrast(crop, seed=_op_seed(seed, 1))  # [32, 32, K]


def multi_crop_offsets():
    """The 13 crop offsets of the authors' multi-crop test, the centre crop first.

    Returns:
        List of (dy, dx) pixel offsets from the centre crop: (0, 0), then (k, k), (k, -k), (-k, k),
        (-k, -k) for k = 1, 2, 3.
    """
    return [(0, 0)] + [(k * dy, k * dx) for k in _MULTI_CROP_STEPS for dy, dx in _DIAGONALS]


def crop_at(images, offset):
    """The 32x32 window of every image moved `offset` pixels from the centre window.

    Args:
        images: [N, H, W, K] array (48x48 after `preprocess`).
        offset: (dy, dx), rows down and columns right of the centre crop (`multi_crop_offsets`).

    Returns:
        [N, 32, 32, K] view of `images`.

    Raises:
        ValueError: the window would leave the image.
    """
    height, width = images.shape[1:3]
    top = (height - IMAGE_SIZE) // 2 + offset[0]
    left = (width - IMAGE_SIZE) // 2 + offset[1]
    if not (0 <= top <= height - IMAGE_SIZE and 0 <= left <= width - IMAGE_SIZE):
        raise ValueError(
            f"a {IMAGE_SIZE}x{IMAGE_SIZE} crop at offset {tuple(offset)} leaves the {height}x{width} image"
        )
    return images[:, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE, :]  # [N, 32, 32, K]


def centre_crop(images):
    """The central 32x32 window of every image (the paper's test crop).

    Args:
        images: [N, H, W, K] array (48x48 after `preprocess`).

    Returns:
        [N, 32, 32, K] view of `images`.
    """
    return crop_at(images, (0, 0))
