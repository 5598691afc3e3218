"""The input pipeline: train/validation hold-out, pixel scaling, random shifts, `tf.data` iterators.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5 trains on
MNIST; this module turns a dataset's in-memory arrays into batches usable from
`tensorflow.compat.v1` graph mode. It never reads command-line flags; callers pass plain values.

Axis names used in the docstrings: N examples, B batch, H/W image height/width (28 for MNIST).
"""

import collections

import numpy as np
import tensorflow.compat.v1 as tf

_PIXEL_MAX = 255.0  # Largest uint8 intensity; dividing by it maps pixels to [0, 1].
_NO_PROJECTION = (0.0, 0.0)  # the last two entries of an affine ImageProjectiveTransform: no perspective


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
    height, width = image.shape
    padded = tf.pad(image, [[max_shift, max_shift], [max_shift, max_shift]])  # [H + 2s, W + 2s]
    return tf.image.random_crop(padded, [height, width], seed=seed)  # [H, W]


def rotate(image, angle):
    """`image` turned by `angle` radians about its centre (bilinear, zeros filling in the corners).

    Each output pixel (x, y) reads the input at R(angle) ((x, y) - c) + c, c the centre ((W - 1) / 2, (H - 1) / 2).

    Args:
        image: `[H, W]` tensor of any real dtype, H and W static.
        angle: scalar float tensor, radians.

    Returns:
        `[H, W]` float32.
    """
    height, width = image.shape.as_list()
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    offset_x = centre_x - cos * centre_x + sin * centre_y
    offset_y = centre_y - sin * centre_x - cos * centre_y
    transform = tf.stack([cos, -sin, offset_x, sin, cos, offset_y, *_NO_PROJECTION])[tf.newaxis]  # [1, 8]
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[tf.newaxis, :, :, tf.newaxis],  # [1, H, W, 1]
        transforms=transform,
        output_shape=[height, width],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return rotated[0, :, :, 0]  # [H, W]


def random_rotation(image, max_degrees, seed=None):
    """`image` `[H, W]` turned by an angle drawn uniformly from -max_degrees..max_degrees, anew for every image
    (the released code's MNIST input names 15 degrees; it draws one angle when the graph is built)."""
    limit = np.deg2rad(max_degrees)
    return rotate(image, tf.random.uniform([], -limit, limit, seed=seed))


def augment(image, max_shift=0, crop=0, max_rotation=0.0, seed=None):
    """One training image `[H, W]`: moved by up to `max_shift` pixels, then a random `crop` x `crop` window (0:
    the whole image), then turned by up to `max_rotation` degrees (0: not turned; float32 when turned)."""
    if max_shift:
        image = random_shift(image, max_shift, seed)  # [H, W]
    if crop:
        image = tf.image.random_crop(image, [crop, crop], seed=seed)  # [crop, crop]
    if max_rotation:
        image = random_rotation(image, max_rotation, seed)
    return image


def make_dataset(
    images,
    labels,
    batch_size,
    shuffle=False,
    repeat=False,
    seed=None,
    drop_remainder=False,
    max_shift=0,
    crop=0,
    max_rotation=0.0,
    feed_size=None,
):
    """Builds the tf.data input pipeline over in-memory MNIST arrays.

    Order: from_tensor_slices -> shuffle (buffer = whole set, reshuffled every epoch) -> repeat -> `augment`
    (random shift, crop, rotation, each only when asked for) -> batch -> scale to [0, 1] -> prefetch;
    shuffling before repeat keeps epochs disjoint. NumPy arrays become graph constants (47 MB for MNIST's train
    set): pass `tf.placeholder`s and an initializable iterator to keep them out of the graph and its meta graphs.

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
        crop: a random `crop` x `crop` window of every image, a new draw each time (0: the whole image).
        max_rotation: turn every image by up to this many degrees, a new draw each time (0: not turned).
        feed_size: the side of the fed images where `images` leaves it open (a `[None, None, None]`
            placeholder); None: `images`' own static shape.

    Returns:
        `tf.data.Dataset` of (images float32 [B, H, W, 1] in [0, 1], labels
        int64 [B]).

    Raises:
        ValueError: length mismatch, non-positive `batch_size`, negative `max_shift`, `crop` or `max_rotation`.
    """
    if isinstance(images, np.ndarray) and len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for name, value in (("max_shift", max_shift), ("crop", crop), ("max_rotation", max_rotation)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))  # ([H, W], [])
    if feed_size:
        dataset = dataset.map(lambda image, label: (tf.ensure_shape(image, [feed_size, feed_size]), label))
    if shuffle:
        whole_set = tf.shape(images, out_type=tf.int64)[0]
        dataset = dataset.shuffle(buffer_size=whole_set, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    if max_shift or crop or max_rotation:
        dataset = dataset.map(
            lambda image, label: (augment(image, max_shift, crop, max_rotation, seed), label)
        )  # ([H, W] or [crop, crop], [])
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)  # ([B, H, W], [B])
    dataset = dataset.map(_scale_batch)  # ([B, H, W, 1], [B])
    return dataset.prefetch(tf.data.experimental.AUTOTUNE)


Pipeline = collections.namedtuple(
    "Pipeline",
    [
        "images_in",
        "labels_in",
        "train_iterator",
        "eval_iterator",
        "train_images",
        "train_labels",
        "eval_images",
        "eval_labels",
    ],
)
Pipeline.__doc__ = """The placeholders, iterators and batches `build_pipeline` returns.

Attributes:
    images_in: uint8 placeholder [N, H, W], fed when an iterator is initialised.
    labels_in: int64 placeholder [N].
    train_iterator: initializable iterator over shuffled, repeated, (optionally) shifted batches.
    eval_iterator: initializable iterator over every example once, in order.
    train_images: float32 [batch_size, H, W, 1] in [0, 1].
    train_labels: int64 [batch_size].
    eval_images: float32 [<= eval_batch_size, H, W, 1] in [0, 1].
    eval_labels: int64 [<= eval_batch_size].
"""


def build_pipeline(hparams, batch_size, eval_batch_size, seed, max_shift=0, crop_from=0, max_rotation=0.0):
    """Training (shuffled, repeated) and evaluation (in order, every image) iterators and their batches.

    Training batches have a static size (`[batch_size, H, W, 1]`; the repeated stream has no
    remainder), so the training graph's micro-batches have static shapes: with a dynamic batch
    size the shape arithmetic of every micro-batch costs the speed they bring (README,
    performance). Training images are moved by up to `max_shift` pixels (`random_shift`), and with
    `crop_from` fed at that size and cropped at random to H = `hparams.image_size`, then turned by up to
    `max_rotation` degrees (`augment`). Evaluation batches are `[<= eval_batch_size, H, W, 1]`, fed as
    the network sees them (`data.for_evaluation`), never moved. The arrays are fed through placeholders,
    so they stay out of the graph and the checkpoints.

    Args:
        hparams: hyperparameters; `hparams.image_size` gives H = W.
        batch_size: training examples per batch, > 0.
        eval_batch_size: evaluation examples per batch, > 0 (the last batch may hold fewer).
        seed: op-level seed of the shuffle and the shifts.
        max_shift: largest training shift in pixels, >= 0; 0 leaves the images as they are.
        crop_from: side of the fed training images, of which random H x H windows are trained on; 0: H.
        max_rotation: largest training rotation in degrees, >= 0; 0: not turned.

    Returns:
        A `Pipeline`.
    """
    size = hparams.image_size
    fed = [None, None, None] if crop_from else [None, size, size]  # training and evaluation feeds differ in size
    images_in = tf.placeholder(tf.uint8, fed, name="images_in")
    labels_in = tf.placeholder(tf.int64, [None], name="labels_in")
    train_iterator = tf.data.make_initializable_iterator(
        make_dataset(
            images_in,
            labels_in,
            batch_size,
            shuffle=True,
            repeat=True,
            seed=seed,
            drop_remainder=True,
            max_shift=max_shift,
            crop=size if crop_from else 0,
            max_rotation=max_rotation,
            feed_size=crop_from or None,
        )
    )
    evaluation = make_dataset(images_in, labels_in, eval_batch_size, feed_size=size if crop_from else None)
    eval_iterator = tf.data.make_initializable_iterator(evaluation)
    train_images, train_labels = train_iterator.get_next()  # [batch_size, H, W, 1], [batch_size]
    eval_images, eval_labels = eval_iterator.get_next()  # [<= eval_batch_size, H, W, 1], [<= eval_batch_size]
    return Pipeline(
        images_in, labels_in, train_iterator, eval_iterator, train_images, train_labels, eval_images, eval_labels
    )


def _preprocessed_datasets(images_in, labels_in, batch_size, eval_batch_size, image_size, seed):
    """Training and evaluation datasets of float images that `smallnorb_preprocess.preprocess` prepared.

    Training images `[N, 48, 48, K]` get the paper's random crop, brightness and contrast per image; evaluation
    images are fed already cropped to `[N, image_size, image_size, K]`.
    """
    from data import smallnorb_preprocess  # TensorFlow ops; smallNORB only

    channels = images_in.shape.as_list()[-1]
    train = tf.data.Dataset.from_tensor_slices((images_in, labels_in))  # ([H, W, K], [])
    train = train.shuffle(tf.shape(images_in, out_type=tf.int64)[0], seed=seed, reshuffle_each_iteration=True)
    train = train.repeat().map(lambda image, label: (smallnorb_preprocess.distort(image, seed), label))
    train = train.batch(batch_size, drop_remainder=True)  # ([B, 32, 32, K], [B])

    def fixed_shape(image, label):
        image.set_shape([image_size, image_size, channels])  # [32, 32, K], fed cropped
        return image, label

    evaluation = tf.data.Dataset.from_tensor_slices((images_in, labels_in)).map(fixed_shape)
    return train.prefetch(tf.data.experimental.AUTOTUNE), evaluation.batch(eval_batch_size)


def build_preprocessed_pipeline(hparams, batch_size, eval_batch_size, seed):
    """`build_pipeline` for smallNORB: float32 images fed as `smallnorb_preprocess.preprocess` gives them.

    Training feeds `[N, 48, 48, K]` (cropped and distorted per image in the graph), evaluation feeds
    `[N, image_size, image_size, K]` (the centre crop, or any crop of the multi-crop test).
    """
    channels = hparams.image_channels
    images_in = tf.placeholder(tf.float32, [None, None, None, channels], name="images_in")
    labels_in = tf.placeholder(tf.int64, [None], name="labels_in")
    train, evaluation = _preprocessed_datasets(
        images_in, labels_in, batch_size, eval_batch_size, hparams.image_size, seed
    )
    train_iterator = tf.data.make_initializable_iterator(train)
    eval_iterator = tf.data.make_initializable_iterator(evaluation)
    train_images, train_labels = train_iterator.get_next()  # [batch_size, 32, 32, K], [batch_size]
    eval_images, eval_labels = eval_iterator.get_next()  # [<= eval_batch_size, 32, 32, K], [<= eval_batch_size]
    return Pipeline(
        images_in, labels_in, train_iterator, eval_iterator, train_images, train_labels, eval_images, eval_labels
    )


def build_for(dataset, hparams, batch_size, eval_batch_size, seed, max_shift=0, crop_from=0, max_rotation=0.0):
    """The pipeline for `dataset`: `build_preprocessed_pipeline` for smallNORB, else `build_pipeline`."""
    from data import PREPROCESSED

    if dataset in PREPROCESSED:
        return build_preprocessed_pipeline(hparams, batch_size, eval_batch_size, seed)
    return build_pipeline(hparams, batch_size, eval_batch_size, seed, max_shift, crop_from, max_rotation)
