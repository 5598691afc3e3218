"""Capsule layers of *Matrix Capsules with EM Routing*.

Hinton, Sabour, Frosst, ICLR 2018 (https://openreview.net/forum?id=HJWLfGWRb). Section 2 (the
capsule and its pose matrix), section 3 (the architecture: a ReLU convolution, primary, convolutional
and class capsules, coordinate addition). EM routing (section 2.1) is in em_routing.py, the
receptive-field geometry, the fold and the E-step's reductions over a child's parents in receptive_field.py;
this module re-exports their public names.

The layers follow the `tf.layers` form: a class per layer whose `__init__` stores (and checks) hyperparameters,
whose `build(input_shape)` checks shapes and creates variables under the layer's variable scope, and whose
`call()` holds the math; plus a functional alias (`conv_caps(...)` wraps `ConvCaps`; `return_layer=True` gives the
layer object too). As `tf.layers`: unnamed layers get unique names (`conv_caps`, `conv_caps_1`), `trainable`,
`kernel_regularizer` (losses in `tf.GraphKeys.REGULARIZATION_LOSSES`), the dtype of the input, kernel sizes and
strides as ints or pairs, padding in either case, and a `ValueError` naming the layer and the argument for every bad
one (routing/layer_base.py). They are used through `tensorflow.compat.v1` in graph mode. This module imports only
numpy, tensorflow, `routing` (Procedure 1, the geometry, the layers' base) and `capsule_ops` (the fused kernels).

Axis glossary, one meaning per letter in every file (example: the paper's MNIST network, batch 32,
'VALID' padding). A, B, C, D are only the paper's type counts (relu_conv1 filters, primary, conv_caps1,
conv_caps2 capsule types).
  N       batch                                             32
  H, W    input grid of a capsule layer                     12 x 12 (primary caps)
  OH, OW  output grid of a convolutional capsule layer      5 x 5 (conv_caps1), 3 x 3 (conv_caps2)
  P       OH * OW, parent positions; NP = N * P             25
  K       kernel size (square), s the stride                3, s = 2 (conv_caps1), 1 (conv_caps2)
  T       capsule types of a capsule tensor (I in, O out)   32
  KKI     K * K * I, the children in one receptive field    288
  4 x 4   pose matrix; flattened to 16 = (row, column)
  L       classes (labels)                                  10

Capsule tensors: poses `[N, H, W, T, 4, 4]`, activations `[N, H, W, T]`.
  relu_conv1 features [32, 12, 12, 32] -> primary_caps poses [32, 12, 12, 32, 4, 4]
  -> conv_caps1 [32, 5, 5, 32, 4, 4] -> conv_caps2 [32, 3, 3, 32, 4, 4] -> class_caps [32, 10, 4, 4].
Inside routing, votes are parent-major, `[NP, O, KKI, 16]` (em_routing.py).
"""

import numbers

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_ops

from routing.em_routing import DEFAULT_FINAL_LAMBDA, PAPER_FORM, POSE_ENTRIES, POSE_SIZE, RoutingForm
from routing.em_routing import inverse_temperatures
from routing.layer_base import CapsuleLayer, RoutedCapsuleLayer, check_capsules, check_fits, functional, padding_name
from routing.layer_base import positive_int, positive_pair
from routing.receptive_field import PatchLayout, ReceptiveField, conv_geometry, receptive_field_centres

# Re-exported: a network is built from capsule_layers alone.
__all__ = ["PAPER_FORM", "POSE_ENTRIES", "POSE_SIZE", "ReceptiveField", "conv_geometry", "receptive_field_centres"]
__all__ += ["inverse_temperatures", "RoutingForm", "ReluConv", "PrimaryCaps", "ConvCaps", "ClassCaps"]
__all__ += ["RoutedCapsuleLayer", "official_coordinate_offsets", "relu_conv", "primary_caps", "conv_caps"]
__all__ += ["class_caps", "CapsuleLayer", "l2_regularizer"]

OFFICIAL_COORDINATE_SCALE = 0.01  # the released code's coordinate addition: receptive-field centre in pixels / 100


def official_coordinate_offsets(centres):
    """The released code's coordinate addition for a class layer: `[H, W, 16]` vote offsets.

    Vote entries 0 and 1 (the first row's first two entries, not the paper's translation column) get the
    receptive-field centre's column and row, in pixels from the image centre, times 1/100. (Their grid
    swaps its two channels at every convolution; after the paper network's three it holds (column, row).)

    Args:
      centres: `[H, W, 2]` (row, column) from `receptive_field_centres`.
    """
    centres = np.asarray(centres, np.float64)
    offsets = np.zeros(centres.shape[:2] + (POSE_ENTRIES,))  # [H, W, 16]
    offsets[:, :, 0] = OFFICIAL_COORDINATE_SCALE * centres[:, :, 1]  # column
    offsets[:, :, 1] = OFFICIAL_COORDINATE_SCALE * centres[:, :, 0]  # row
    return offsets


def l2_regularizer(scale):
    """A `kernel_regularizer` of the paper's weight decay: w -> scale * sum(w^2) / 2 (`tf.nn.l2_loss`)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or scale < 0:
        raise ValueError("l2_regularizer: scale must be a number >= 0, got %r" % (scale,))
    return lambda weights: scale * tf.nn.l2_loss(weights)


# Layers.
# ----------------------------------------------------------------------------------------------


class ReluConv(CapsuleLayer):
    """Layer A (paper section 3): a K x K, stride-s convolution of the images with a ReLU.

    Input images `[N, H, W, channels]` -> features `[N, OH, OW, F]` (F = A filters).
    Variables: kernel `[K, K, channels, F]` (Glorot uniform; regularized), bias `[F]` (zeros).

    Args:
      filters: F. kernel_size, stride: ints or (height, width) pairs. padding: 'VALID' or 'SAME', either case.
      name ('relu_conv' made unique when None), trainable, kernel_regularizer, dtype: as `CapsuleLayer`.
    """

    INPUT_NAMES = ("images",)

    def __init__(
        self,
        filters,
        kernel_size=5,
        stride=2,
        padding="VALID",
        name=None,
        dtype=None,
        trainable=True,
        kernel_regularizer=None,
    ):
        super().__init__(name, "relu_conv", trainable, kernel_regularizer, dtype)
        self.filters = positive_int(self.name, "filters", filters)
        self.kernel_size = positive_pair(self.name, "kernel_size", kernel_size)
        self.stride = positive_pair(self.name, "stride", stride)
        self.padding = padding_name(self.name, padding)

    def _check(self, image_shape):
        if image_shape.rank != 4 or image_shape[-1] is None:
            raise ValueError("%s: images must be [N, H, W, channels], got %s" % (self.name, image_shape))
        if self.built and int(image_shape[-1]) != self.channels:
            raise ValueError("%s: built for %d channels, got %s" % (self.name, self.channels, image_shape))
        check_fits(self.name, image_shape, self.kernel_size, self.stride, self.padding)

    def _build(self, image_shape):
        self.channels = int(image_shape[-1])
        shape = [*self.kernel_size, self.channels, self.filters]
        self.kernel = self._variable("kernel", shape, tf.glorot_uniform_initializer(), decay=True)
        self.bias = self._variable("bias", [self.filters], tf.zeros_initializer())

    def call(self, images):
        strides = [1, *self.stride, 1]
        return tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides, self.padding) + self.bias)  # [N, OH, OW, F]


def relu_conv(inputs, *args, reuse=None, return_layer=False, **kwargs):
    """Functional form of `ReluConv(*args, **kwargs)` applied to `inputs`, `reuse` as in tf.layers.

    Returns the features, or (features, the `ReluConv`) with `return_layer`.
    """
    return functional(ReluConv(*args, **kwargs), [inputs], reuse, return_layer)


class PrimaryCaps(CapsuleLayer):
    """Primary capsules (paper section 3): a convolution of a feature map to T poses + activations.

    Input features `[N, H, W, F]` -> poses `[N, OH, OW, T, 4, 4]`, activations `[N, OH, OW, T]`.
    Variables: pose_kernel `[k, k, F, T*16]`, pose_bias `[T*16]` (channel t*16 + row*4 + col),
    activation_kernel `[k, k, F, T]`, activation_bias `[T]`; activations are sigmoids. The kernels are regularized.

    Args:
      types: T. kernel_size, stride: ints or pairs. padding: 'VALID' or 'SAME', either case.
      name ('primary_caps' made unique when None), trainable, kernel_regularizer, dtype: as `CapsuleLayer`.
    """

    INPUT_NAMES = ("features",)

    def __init__(
        self,
        types,
        kernel_size=1,
        stride=1,
        padding="VALID",
        name=None,
        dtype=None,
        trainable=True,
        kernel_regularizer=None,
    ):
        super().__init__(name, "primary_caps", trainable, kernel_regularizer, dtype)
        self.types = positive_int(self.name, "types", types)
        self.kernel_size = positive_pair(self.name, "kernel_size", kernel_size)
        self.stride = positive_pair(self.name, "stride", stride)
        self.padding = padding_name(self.name, padding)

    def _check(self, feature_shape):
        if feature_shape.rank != 4 or feature_shape[-1] is None:
            raise ValueError("%s: features must be [N, H, W, F], got %s" % (self.name, feature_shape))
        if self.built and int(feature_shape[-1]) != self.features:
            raise ValueError("%s: built for %d features, got %s" % (self.name, self.features, feature_shape))
        check_fits(self.name, feature_shape, self.kernel_size, self.stride, self.padding)

    def _build(self, feature_shape):
        self.features = features = int(feature_shape[-1])
        glorot = tf.glorot_uniform_initializer()
        pose_shape = [*self.kernel_size, features, self.types * POSE_ENTRIES]
        self.pose_kernel = self._variable("pose_kernel", pose_shape, glorot, decay=True)
        self.pose_bias = self._variable("pose_bias", [self.types * POSE_ENTRIES], tf.zeros_initializer())
        activation_shape = [*self.kernel_size, features, self.types]
        self.activation_kernel = self._variable("activation_kernel", activation_shape, glorot, decay=True)
        self.activation_bias = self._variable("activation_bias", [self.types], tf.zeros_initializer())

    def call(self, features):
        strides = [1, *self.stride, 1]
        pose = tf.nn.conv2d(features, self.pose_kernel, strides, self.padding) + self.pose_bias  # [N, OH, OW, T*16]
        logits = tf.nn.conv2d(features, self.activation_kernel, strides, self.padding) + self.activation_bias
        grid = [
            size if size is not None else tf.shape(pose)[axis]
            for axis, size in ((1, pose.shape[1]), (2, pose.shape[2]))
        ]
        poses = tf.reshape(pose, [-1, *grid, self.types, POSE_SIZE, POSE_SIZE])  # [N, OH, OW, T, 4, 4]
        activations = tf.sigmoid(logits)  # [N, OH, OW, T]
        self._record(poses=poses, activations=activations)
        return poses, activations


def primary_caps(inputs, *args, reuse=None, return_layer=False, **kwargs):
    """Functional form of `PrimaryCaps(*args, **kwargs)` applied to `inputs`, `reuse` as in tf.layers.

    Returns (poses, activations), or ((poses, activations), the `PrimaryCaps`) with `return_layer`.
    """
    return functional(PrimaryCaps(*args, **kwargs), [inputs], reuse, return_layer)


class ConvCaps(RoutedCapsuleLayer):
    """Convolutional capsules with EM routing (paper section 3, ConvCaps1/ConvCaps2).

    Each parent (position, type o) sees the K x K x I children of its receptive field; the vote of
    child i at kernel offset (kh, kw) is V_ij = M_i W[kh, kw, i, o] (pose on the left).

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, OH, OW, O, 4, 4]`,
    activations `[N, OH, OW, O]`. Variables: weights `[K, K, I, O, 4, 4]`, beta_v `[O]`, beta_a `[O]`.
    One layer object takes any input grid the kernel fits (the weights do not depend on it).
    end_points (per call, `calls`): 'votes' `[N*P, O, KKI, 16]`, 'assignments' (final R) `[N*P, O, KKI]` with
    parent positions ordered (n, oh, ow) and children (kh, kw, i), 'activations_per_iteration' (list of
    `[N*P, O]`), 'parents_per_iteration' (list of `Parents`).

    Args:
      types: O. kernel_size, stride: ints or pairs. padding: 'VALID' or 'SAME', either case. iterations, final_lambda:
      routing (Procedure 1). name ('conv_caps' made unique when None), dtype, **routing_options: as
      `RoutedCapsuleLayer`.
    """

    def __init__(
        self,
        types,
        kernel_size=3,
        stride=1,
        padding="VALID",
        iterations=3,
        final_lambda=DEFAULT_FINAL_LAMBDA,
        name=None,
        dtype=None,
        **routing_options,
    ):
        super().__init__(name, "conv_caps", dtype, iterations, final_lambda, **routing_options)
        self.types = positive_int(self.name, "types", types)
        self.kernel_size = positive_pair(self.name, "kernel_size", kernel_size)
        self.stride = positive_pair(self.name, "stride", stride)
        self.padding = padding_name(self.name, padding)
        self._layouts = {}

    def _check(self, pose_shape, activation_shape):
        check_capsules(self, pose_shape, activation_shape)
        check_fits(self.name, pose_shape, self.kernel_size, self.stride, self.padding)

    def _build(self, pose_shape, activation_shape):
        self.input_types = int(pose_shape[3])
        self.field, self.patches = self._layout(int(pose_shape[1]), int(pose_shape[2]))  # the first grid's
        weight_shape = [*self.kernel_size, self.input_types, self.types, POSE_SIZE, POSE_SIZE]
        self._build_routing_variables(weight_shape, self.types)

    def _layout(self, height, width):
        """The `ReceptiveField` and `PatchLayout` of an H x W input grid, made once per grid size."""
        if (height, width) not in self._layouts:
            field = ReceptiveField(height, width, self.kernel_size, self.stride, self.padding)
            patches = PatchLayout(field, self.input_types, self.types, self.dtype, self.routing_kernel)
            self._layouts[(height, width)] = field, patches
        return self._layouts[(height, width)]

    def call(self, poses, activations):
        field, patches = self._layout(int(poses.shape[1]), int(poses.shape[2]))
        out_types, batch = self.types, tf.shape(poses)[0]
        votes = self._votes(poses, batch, field, patches)  # [NP, O, KKI, 16], or its factors (fused)
        child_activations = patches.extract(activations)  # [NP, 1, KKI]
        if self.form.normalise_over == "positions":
            initial = patches.constant(field.valid / out_types, batch)  # 1/O, as the released code
        else:
            initial = patches.constant(field.inverse_count / out_types, batch)  # uniform over its parents
        normalise = lambda log_numerators: self._normalise(log_numerators, field, patches)  # noqa: E731
        pose_means, out_activations = self._route(votes, child_activations, initial, normalise)
        out_shape = [batch, field.out_height, field.out_width, out_types]
        out_poses = tf.reshape(pose_means, out_shape + [POSE_SIZE, POSE_SIZE])  # [N, OH, OW, O, 4, 4]
        return out_poses, tf.reshape(out_activations, out_shape)  # [N, OH, OW, O]

    def _votes(self, poses, batch, field, patches):
        """V_ij = M_i W_ij as one batched matmul per child capsule of the kernel: `[NP, O, KKI, 16]`; on the fused
        path its factors, `capsule_ops.VoteFactors` (poses `[NP, KKI, 16]`, weights `[O, KKI, 16]`)."""
        out_types, kki = self.types, patches.children
        with tf.name_scope("votes"):
            flat = tf.reshape(poses, [batch, field.height, field.width, -1])  # [N, H, W, I*16]
            if self.routing_kernel == "fused":  # the kernels recompute the parent-major votes from these factors
                children = tf.reshape(field.extract(flat), [-1, kki, POSE_ENTRIES])  # [NP, KKI, 16]
                weights = tf.reshape(self.weights, [kki, out_types, POSE_ENTRIES])  # [KKI, O, 16]
                return capsule_ops.VoteFactors(children, tf.transpose(weights, [1, 0, 2]))  # V: [NP, O, KKI, 16]
            children = tf.reshape(field.extract(flat), [-1, kki, POSE_SIZE, POSE_SIZE])  # [NP, KKI, 4, 4]
            rows = tf.reshape(tf.transpose(children, [1, 0, 2, 3]), [kki, -1, POSE_SIZE])  # [KKI, NP*4, 4]
            weights = tf.transpose(self.weights, [0, 1, 2, 4, 3, 5])  # [K, K, I, 4, O, 4]
            weights = tf.reshape(weights, [kki, POSE_SIZE, out_types * POSE_SIZE])  # [KKI, 4, O*4]
            votes = tf.matmul(rows, weights)  # [KKI, NP*4, O*4]
            votes = tf.reshape(votes, [kki, -1, POSE_SIZE, out_types, POSE_SIZE])  # [KKI, NP, 4, O, 4]
            votes = tf.transpose(votes, [1, 3, 0, 2, 4])  # [NP, O, KKI, 4, 4]
            return tf.reshape(votes, [-1, out_types, kki, POSE_ENTRIES])  # [NP, O, KKI, 16]

    def _normalise(self, log_numerators, field, patches):
        """R `[NP, O, KKI]` from log(a_j p_ij) `[NP, O, KKI]`, normalised over the parents that see each child
        (`RoutingForm.normalise_over`; `PatchLayout.normalise`)."""
        with tf.name_scope("receptive_field_normalise"):
            batch = tf.shape(log_numerators)[0] // (field.out_height * field.out_width)
            return patches.normalise(log_numerators, self.form.normalise_over == "positions", batch)


def conv_caps(poses, activations, *args, reuse=None, return_layer=False, **kwargs):
    """Functional form of `ConvCaps(*args, **kwargs)` applied to (poses, activations), `reuse` as in tf.layers.

    (`[N, H, W, I, 4, 4]`, `[N, H, W, I]`) -> (`[N, OH, OW, O, 4, 4]`, `[N, OH, OW, O]`); with `return_layer`,
    (that pair, the `ConvCaps`).
    """
    return functional(ConvCaps(*args, **kwargs), [poses, activations], reuse, return_layer)


class ClassCaps(RoutedCapsuleLayer):
    """Class capsules with coordinate addition (paper section 3).

    Every capsule of the input grid is a child of every class. The transformation W[i, c] is shared
    over positions; the vote is V_ic = M_i W[i, c], and then coordinate addition: for a child at
    cell (h, w) of an H x W grid, (h + 0.5) / H is added to vote entry [0, 3] and (w + 0.5) / W to
    entry [1, 3] -- the cell centre's row and column, scaled to (0, 1), added to the first two
    entries of the right-hand (translation) column of the vote matrix. `coordinate_offsets` `[H, W, 16]`
    replaces these offsets (e.g. `official_coordinate_offsets`, the released code's form).

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, L, 4, 4]`,
    activations `[N, L]`. Variables: weights `[I, L, 4, 4]`, beta_v `[L]`, beta_a `[L]`. One layer object takes
    any input grid (with `coordinate_offsets`, only theirs).
    end_points (per call, `calls`): 'votes' `[N, L, H*W*I, 16]`, 'assignments' `[N, L, H*W*I]` (children ordered
    (h, w, i)), 'activations_per_iteration' (list of `[N, L]`), 'parents_per_iteration' (list of `Parents`).

    Args:
      classes: L. iterations, final_lambda: routing. coordinate_addition: True or False. coordinate_offsets: None
      or `[H, W, 16]`. name ('class_caps' made unique when None), dtype, **routing_options: as
      `RoutedCapsuleLayer`.
    """

    def __init__(
        self,
        classes,
        iterations=3,
        final_lambda=DEFAULT_FINAL_LAMBDA,
        coordinate_addition=True,
        coordinate_offsets=None,
        name=None,
        dtype=None,
        **routing_options,
    ):
        super().__init__(name, "class_caps", dtype, iterations, final_lambda, **routing_options)
        self.classes = positive_int(self.name, "classes", classes)
        if not isinstance(coordinate_addition, bool):
            raise ValueError("%s: coordinate_addition must be True or False, got %r" % (self.name, coordinate_addition))
        self.coordinate_addition = coordinate_addition
        if coordinate_offsets is not None:
            coordinate_offsets = np.asarray(coordinate_offsets, np.float64)  # [H, W, 16]
            if coordinate_offsets.ndim != 3 or coordinate_offsets.shape[-1] != POSE_ENTRIES:
                raise ValueError(
                    "%s: coordinate_offsets must be [H, W, %d], got %s"
                    % (self.name, POSE_ENTRIES, coordinate_offsets.shape)
                )
        self.coordinate_offsets = coordinate_offsets

    def _check(self, pose_shape, activation_shape):
        check_capsules(self, pose_shape, activation_shape)
        grid = (int(pose_shape[1]), int(pose_shape[2]))
        if (
            self.coordinate_addition
            and self.coordinate_offsets is not None
            and self.coordinate_offsets.shape[:2] != grid
        ):
            raise ValueError(
                "%s: coordinate_offsets must be [%d, %d, %d] for a %dx%d grid, got %s"
                % (self.name, *grid, POSE_ENTRIES, *grid, self.coordinate_offsets.shape)
            )

    def _build(self, pose_shape, activation_shape):
        self.input_types = int(pose_shape[3])
        self._build_routing_variables([self.input_types, self.classes, POSE_SIZE, POSE_SIZE], self.classes)

    def _coordinates(self, height, width):
        """Coordinate-addition offsets `[1, 1, H*W*I, 16]`: zeros but entries [0, 3] and [1, 3] (the paper's
        form), or `coordinate_offsets` repeated over the input types."""
        if self.coordinate_offsets is not None:
            offsets = np.repeat(self.coordinate_offsets[:, :, None, :], self.input_types, axis=2)  # [H, W, I, 16]
        else:
            offsets = np.zeros([height, width, self.input_types, POSE_SIZE, POSE_SIZE])
            offsets[..., 0, POSE_SIZE - 1] = ((np.arange(height) + 0.5) / height)[:, None, None]  # row
            offsets[..., 1, POSE_SIZE - 1] = ((np.arange(width) + 0.5) / width)[None, :, None]  # column
        return tf.constant(offsets.reshape(1, 1, -1, POSE_ENTRIES), self.dtype)  # [1, 1, H*W*I, 16]

    def _votes(self, poses, batch, cells):
        """V_ic = M_i W[i, c] for every child (h, w, i) of the H*W `cells` and class: `[N, L, H*W*I, 16]`; on the
        fused path its factors, `capsule_ops.VoteFactors` (poses `[N, H*W*I, 16]`, weights `[L, H*W*I, 16]`)."""
        in_types, classes = self.input_types, self.classes
        if self.routing_kernel == "fused":  # the kernels recompute the parent-major votes from these factors
            weights = tf.transpose(tf.reshape(self.weights, [in_types, classes, POSE_ENTRIES]), [1, 0, 2])  # [L, I, 16]
            children = tf.reshape(poses, [batch, cells * in_types, POSE_ENTRIES])  # [N, H*W*I, 16]
            return capsule_ops.VoteFactors(children, tf.tile(weights, [1, cells, 1]))  # W tiled: [L, H*W*I, 16]
        type_major = tf.transpose(poses, [3, 0, 1, 2, 4, 5])  # [I, N, H, W, 4, 4]
        rows = tf.reshape(type_major, [in_types, -1, POSE_SIZE])  # [I, N*H*W*4, 4]
        weights = tf.transpose(self.weights, [0, 2, 1, 3])  # [I, 4, L, 4]
        weights = tf.reshape(weights, [in_types, POSE_SIZE, classes * POSE_SIZE])  # [I, 4, L*4]
        votes = tf.matmul(rows, weights)  # [I, N*H*W*4, L*4]
        votes = tf.reshape(votes, [in_types, batch, cells, POSE_SIZE, classes, POSE_SIZE])
        votes = tf.transpose(votes, [1, 4, 2, 0, 3, 5])  # [N, L, H*W, I, 4, 4]
        return tf.reshape(votes, [batch, classes, cells * in_types, POSE_ENTRIES])  # [N, L, H*W*I, 16]

    def call(self, poses, activations):
        height, width, classes = int(poses.shape[1]), int(poses.shape[2]), self.classes
        children = height * width * self.input_types
        batch = tf.shape(poses)[0]
        with tf.name_scope("votes"):
            votes = self._votes(poses, batch, height * width)  # [N, L, H*W*I, 16], or its factors (fused)
            if self.coordinate_addition:  # V + offsets has no factors: stored (1/80 of conv_caps1's votes, paper)
                if isinstance(votes, capsule_ops.VoteFactors):
                    votes = capsule_ops.votes(*votes)  # [N, L, H*W*I, 16]
                votes = votes + self._coordinates(height, width)
        child_activations = tf.reshape(activations, [-1, 1, children])  # [N, 1, H*W*I]
        initial = tf.constant(1.0 / classes, self.dtype)  # every child sees every class
        pose_means, out_activations = self._route(
            votes, child_activations, initial, lambda log_numerators: tf.nn.softmax(log_numerators, axis=1)
        )
        return tf.reshape(pose_means, [batch, classes, POSE_SIZE, POSE_SIZE]), out_activations  # [N, L, 4, 4], [N, L]


def class_caps(poses, activations, *args, reuse=None, return_layer=False, **kwargs):
    """Functional form of `ClassCaps(*args, **kwargs)` applied to (poses, activations), `reuse` as in tf.layers.

    (`[N, H, W, I, 4, 4]`, `[N, H, W, I]`) -> (`[N, L, 4, 4]`, `[N, L]`); with `return_layer`, (that pair, the
    `ClassCaps`).
    """
    return functional(ClassCaps(*args, **kwargs), [poses, activations], reuse, return_layer)
