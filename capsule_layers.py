"""Capsule layers of *Matrix Capsules with EM Routing*.

Hinton, Sabour, Frosst, ICLR 2018 (https://openreview.net/forum?id=HJWLfGWRb). Section 2 (the
capsule and its pose matrix), section 3 (the architecture: a ReLU convolution, primary, convolutional
and class capsules, coordinate addition). EM routing (section 2.1) is in em_routing.py, the
receptive-field geometry, the fold and the E-step's reductions over a child's parents in receptive_field.py;
this module re-exports their public names.

The layers follow the `tf.layers` form: a class per layer whose `__init__` stores hyperparameters,
whose `build()` checks shapes and creates variables under the layer's variable scope, and whose
`call()` holds the math; plus a functional alias (`conv_caps(...)` wraps `ConvCaps`). They are used
through `tensorflow.compat.v1` in graph mode. This module imports only numpy and tensorflow (and the
two modules above, and `capsule_ops`, the fused routing kernels).

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

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_ops

from routing.em_routing import DEFAULT_FINAL_LAMBDA, PAPER_FORM, POSE_ENTRIES, POSE_SIZE, RoutingForm, em_routing
from routing.em_routing import inverse_temperatures
from routing.receptive_field import PatchLayout, ReceptiveField, conv_geometry, receptive_field_centres

# Re-exported: a network is built from capsule_layers alone.
__all__ = ["PAPER_FORM", "POSE_ENTRIES", "POSE_SIZE", "ReceptiveField", "conv_geometry", "receptive_field_centres"]
__all__ += ["inverse_temperatures", "RoutingForm", "ReluConv", "PrimaryCaps", "ConvCaps", "ClassCaps"]
__all__ += ["RoutedCapsuleLayer", "official_coordinate_offsets", "relu_conv", "primary_caps", "conv_caps"]
__all__ += ["class_caps"]

# Default initialisers. Each vote entry is a sum of 4 products, so N(0, 0.5^2) weights keep the
# vote scale equal to the pose scale.
_DEFAULT_WEIGHT_STDDEV = 0.5

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


# Layers.
# ----------------------------------------------------------------------------------------------


class _CapsuleLayer:
    """Base class in the `tf.layers` form: variables are made once, under the layer's scope.

    Subclasses implement `build(*input_shapes)` (check shapes, create variables with
    `self._variable`) and `call(*inputs)` (the math). Calling the layer again reuses its variables.
    After a call, `end_points` holds intermediate tensors for tests and pictures. `variables` lists every
    variable, `weights_to_decay` the kernels and transformation matrices (no biases, no betas).
    """

    def __init__(self, name, dtype=tf.float32):
        self.name = name
        self.dtype = tf.as_dtype(dtype)
        self.built = False
        self.variables = []
        self.weights_to_decay = []
        self.end_points = {}
        self._scope = None

    def _variable(self, name, shape, initializer, decay=False):
        variable = tf.get_variable(name, shape=shape, dtype=self.dtype, initializer=initializer)
        self.variables.append(variable)
        if decay:
            self.weights_to_decay.append(variable)
        return variable

    def __call__(self, *inputs):
        inputs = [tf.convert_to_tensor(x, dtype=self.dtype) for x in inputs]
        # reuse=None inherits the enclosing scope's reuse, so a whole model rebuilt under reuse=True
        # shares its variables; a second layer of the same name otherwise fails like tf.get_variable.
        with tf.variable_scope(self._scope or self.name, reuse=self.built or None) as self._scope:
            if not self.built:
                self.build(*[x.shape for x in inputs])
                self.built = True
            with tf.name_scope("call"):
                return self.call(*inputs)


def _apply(layer, inputs, reuse):
    """Calls `layer` on `inputs` inside the current variable scope with `reuse` (None: inherit it)."""
    with tf.variable_scope(tf.get_variable_scope(), reuse=reuse):
        return layer(*inputs)


class ReluConv(_CapsuleLayer):
    """Layer A (paper section 3): a K x K, stride-s convolution of the images with a ReLU.

    Input images `[N, H, W, channels]` -> features `[N, OH, OW, F]` (F = A filters).
    Variables: kernel `[K, K, channels, F]` (Glorot uniform), bias `[F]` (zeros).
    """

    def __init__(self, filters, kernel_size=5, stride=2, padding="VALID", name="relu_conv1", dtype=tf.float32):
        super().__init__(name, dtype)
        conv_geometry(kernel_size, kernel_size, kernel_size, stride, padding)  # validates padding
        self.filters, self.kernel_size, self.stride, self.padding = filters, kernel_size, stride, padding

    def build(self, image_shape):
        if image_shape.rank != 4 or image_shape[-1] is None:
            raise ValueError("%s: images must be [N, H, W, channels], got %s" % (self.name, image_shape))
        k = self.kernel_size
        self.kernel = self._variable(
            "kernel", [k, k, int(image_shape[-1]), self.filters], tf.glorot_uniform_initializer(), decay=True
        )
        self.bias = self._variable("bias", [self.filters], tf.zeros_initializer())

    def call(self, images):
        strides = [1, self.stride, self.stride, 1]
        return tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides, self.padding) + self.bias)  # [N, OH, OW, F]


def relu_conv(inputs, *args, reuse=None, **kwargs):
    """Functional form of `ReluConv(*args, **kwargs)` applied to `inputs`, `reuse` as in tf.layers."""
    return _apply(ReluConv(*args, **kwargs), [inputs], reuse)


def _check_capsules(layer, pose_shape, activation_shape):
    """Validates a capsule input: poses `[N, H, W, T, 4, 4]`, activations `[N, H, W, T]`."""
    if pose_shape.rank != 6 or tuple(pose_shape[-2:]) != (POSE_SIZE, POSE_SIZE):
        raise ValueError("%s: poses must be [N, H, W, T, 4, 4], got %s" % (layer, pose_shape))
    if activation_shape.rank != 4 or tuple(activation_shape[1:]) != tuple(pose_shape[1:4]):
        raise ValueError("%s: activations must be [N, H, W, T] matching poses, got %s" % (layer, activation_shape))
    if None in tuple(pose_shape[1:]):
        raise ValueError("%s: H, W and T must be known when the graph is built, got %s" % (layer, pose_shape))


class PrimaryCaps(_CapsuleLayer):
    """Primary capsules (paper section 3): a convolution of a feature map to T poses + activations.

    Input features `[N, H, W, F]` -> poses `[N, OH, OW, T, 4, 4]`, activations `[N, OH, OW, T]`.
    Variables: pose_kernel `[k, k, F, T*16]`, pose_bias `[T*16]` (channel t*16 + row*4 + col),
    activation_kernel `[k, k, F, T]`, activation_bias `[T]`; activations are sigmoids.
    """

    def __init__(self, types, kernel_size=1, stride=1, padding="VALID", name="primary_caps", dtype=tf.float32):
        super().__init__(name, dtype)
        conv_geometry(kernel_size, kernel_size, kernel_size, stride, padding)  # validates padding
        self.types, self.kernel_size, self.stride, self.padding = types, kernel_size, stride, padding

    def build(self, feature_shape):
        if feature_shape.rank != 4 or feature_shape[-1] is None:
            raise ValueError("%s: features must be [N, H, W, F], got %s" % (self.name, feature_shape))
        k, features = self.kernel_size, int(feature_shape[-1])
        glorot = tf.glorot_uniform_initializer()
        self.pose_kernel = self._variable(
            "pose_kernel", [k, k, features, self.types * POSE_ENTRIES], glorot, decay=True
        )
        self.pose_bias = self._variable("pose_bias", [self.types * POSE_ENTRIES], tf.zeros_initializer())
        self.activation_kernel = self._variable("activation_kernel", [k, k, features, self.types], glorot, decay=True)
        self.activation_bias = self._variable("activation_bias", [self.types], tf.zeros_initializer())

    def call(self, features):
        strides = [1, self.stride, self.stride, 1]
        pose = tf.nn.conv2d(features, self.pose_kernel, strides, self.padding) + self.pose_bias  # [N, OH, OW, T*16]
        logits = tf.nn.conv2d(features, self.activation_kernel, strides, self.padding) + self.activation_bias
        out_h, out_w = int(pose.shape[1]), int(pose.shape[2])
        poses = tf.reshape(pose, [-1, out_h, out_w, self.types, POSE_SIZE, POSE_SIZE])  # [N, OH, OW, T, 4, 4]
        activations = tf.sigmoid(logits)  # [N, OH, OW, T]
        self.end_points = {"poses": poses, "activations": activations}
        return poses, activations


def primary_caps(inputs, *args, reuse=None, **kwargs):
    """Functional form of `PrimaryCaps(*args, **kwargs)` applied to `inputs`, `reuse` as in tf.layers."""
    return _apply(PrimaryCaps(*args, **kwargs), [inputs], reuse)


class RoutedCapsuleLayer(_CapsuleLayer):
    """Shared variables and routing settings of the convolutional and class capsule layers.

    Routing options (keyword arguments of ConvCaps, ClassCaps and their functional forms): weights_initializer
    (default N(0, 0.5^2)), beta_v_initializer and beta_a_initializer (default 0), beta_a_scale (beta_a = scale *
    variable; 1.0), standardise_costs (paper form only; False), form (`RoutingForm`; the paper's), routing_kernel
    ('tf', 'fused' or 'auto': see `capsule_ops.resolve`; 'tf').
    """

    def __init__(
        self,
        name,
        dtype,
        iterations,
        final_lambda,
        weights_initializer=None,
        beta_v_initializer=None,
        beta_a_initializer=None,
        beta_a_scale=1.0,
        standardise_costs=False,
        form=PAPER_FORM,
        routing_kernel="tf",
    ):
        super().__init__(name, dtype)
        self.routing_kernel = capsule_ops.resolve(routing_kernel)  # 'auto' -> 'fused' when it builds, else 'tf'
        if standardise_costs and form.activation != "paper":
            raise ValueError("%s: standardise_costs applies to the paper's activation form only" % name)
        self.standardise_costs = standardise_costs
        self.form = form
        # beta_a = beta_a_scale * (the variable): the official code's activation bias enters the logit
        # scaled by 5000, so Adam moves it that much faster than the other weights; 1.0 is the plain form.
        self.beta_a_scale = beta_a_scale
        if iterations < 1:
            raise ValueError("%s: routing iterations must be >= 1, got %r" % (name, iterations))
        self.iterations = iterations
        self.inverse_temps = inverse_temperatures(final_lambda, iterations)
        self.weights_initializer = weights_initializer or tf.random_normal_initializer(stddev=_DEFAULT_WEIGHT_STDDEV)
        self.beta_v_initializer = beta_v_initializer or tf.zeros_initializer()
        self.beta_a_initializer = beta_a_initializer or tf.zeros_initializer()

    def _build_routing_variables(self, weight_shape, num_parents):
        self.weights = self._variable("weights", weight_shape, self.weights_initializer, decay=True)
        self.beta_v = self._variable("beta_v", [num_parents], self.beta_v_initializer)  # one per parent type
        self.beta_a = self._variable("beta_a", [num_parents], self.beta_a_initializer)

    def _route(self, votes, child_activations, initial_assignments, normalise):
        with tf.name_scope("em_routing"):
            routing = em_routing(
                votes,
                child_activations,
                initial_assignments,
                self.beta_v,
                self.beta_a_scale * self.beta_a,
                self.inverse_temps,
                normalise,
                self.standardise_costs,
                self.form,
                self.routing_kernel,
            )
        self.end_points = {
            "votes": routing.votes,
            "assignments": tf.broadcast_to(routing.assignments, tf.shape(routing.votes)[:3]),
            "activations_per_iteration": [parents.activations for parents in routing.per_iteration],
            "parents_per_iteration": routing.per_iteration,
        }
        return routing.poses, routing.activations


class ConvCaps(RoutedCapsuleLayer):
    """Convolutional capsules with EM routing (paper section 3, ConvCaps1/ConvCaps2).

    Each parent (position, type o) sees the K x K x I children of its receptive field; the vote of
    child i at kernel offset (kh, kw) is V_ij = M_i W[kh, kw, i, o] (pose on the left).

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, OH, OW, O, 4, 4]`,
    activations `[N, OH, OW, O]`. Variables: weights `[K, K, I, O, 4, 4]`, beta_v `[O]`, beta_a `[O]`.
    end_points: 'votes' `[N*P, O, KKI, 16]`, 'assignments' (final R) `[N*P, O, KKI]` with parent
    positions ordered (n, oh, ow) and children (kh, kw, i), 'activations_per_iteration' (list of
    `[N*P, O]`), 'parents_per_iteration' (list of `Parents`).
    """

    def __init__(
        self,
        types,
        kernel_size=3,
        stride=1,
        padding="VALID",
        iterations=3,
        final_lambda=DEFAULT_FINAL_LAMBDA,
        name="conv_caps",
        dtype=tf.float32,
        **routing_options,
    ):
        super().__init__(name, dtype, iterations, final_lambda, **routing_options)
        conv_geometry(kernel_size, kernel_size, kernel_size, stride, padding)  # validates padding
        self.types, self.kernel_size, self.stride, self.padding = types, kernel_size, stride, padding

    def build(self, pose_shape, activation_shape):
        _check_capsules(self.name, pose_shape, activation_shape)
        height, width, self.input_types = int(pose_shape[1]), int(pose_shape[2]), int(pose_shape[3])
        self.field = ReceptiveField(height, width, self.kernel_size, self.stride, self.padding)
        self.patches = PatchLayout(self.field, self.input_types, self.types, self.dtype, self.routing_kernel)
        k = self.kernel_size
        self._build_routing_variables([k, k, self.input_types, self.types, POSE_SIZE, POSE_SIZE], self.types)

    def call(self, poses, activations):
        field, out_types = self.field, self.types
        batch = tf.shape(poses)[0]
        votes = self._votes(poses, batch)  # [NP, O, KKI, 16], or its factors (fused)
        child_activations = self.patches.extract(activations)  # [NP, 1, KKI]
        if self.form.normalise_over == "positions":
            initial = self.patches.constant(field.valid / out_types, batch)  # 1/O, as the released code
        else:
            initial = self.patches.constant(field.inverse_count / out_types, batch)  # uniform over its parents
        pose_means, out_activations = self._route(votes, child_activations, initial, self._normalise)
        out_shape = [batch, field.out_height, field.out_width, out_types]
        out_poses = tf.reshape(pose_means, out_shape + [POSE_SIZE, POSE_SIZE])  # [N, OH, OW, O, 4, 4]
        return out_poses, tf.reshape(out_activations, out_shape)  # [N, OH, OW, O]

    def _votes(self, poses, batch):
        """V_ij = M_i W_ij as one batched matmul per child capsule of the kernel: `[NP, O, KKI, 16]`; on the fused
        path its factors, `capsule_ops.VoteFactors` (poses `[NP, KKI, 16]`, weights `[O, KKI, 16]`)."""
        field, out_types, kki = self.field, self.types, self.patches.children
        with tf.name_scope("votes"):
            flat = tf.reshape(poses, [batch, field.height, field.width, -1])  # [N, H, W, I*16]
            if self.routing_kernel == "fused":  # one kernel writes the parent-major votes
                patches = tf.reshape(field.extract(flat), [-1, kki, POSE_ENTRIES])  # [NP, KKI, 16]
                weights = tf.reshape(self.weights, [kki, out_types, POSE_ENTRIES])  # [KKI, O, 16]
                return capsule_ops.VoteFactors(patches, tf.transpose(weights, [1, 0, 2]))  # V: [NP, O, KKI, 16]
            patches = tf.reshape(field.extract(flat), [-1, kki, POSE_SIZE, POSE_SIZE])  # [NP, KKI, 4, 4]
            rows = tf.reshape(tf.transpose(patches, [1, 0, 2, 3]), [kki, -1, POSE_SIZE])  # [KKI, NP*4, 4]
            weights = tf.transpose(self.weights, [0, 1, 2, 4, 3, 5])  # [K, K, I, 4, O, 4]
            weights = tf.reshape(weights, [kki, POSE_SIZE, out_types * POSE_SIZE])  # [KKI, 4, O*4]
            votes = tf.matmul(rows, weights)  # [KKI, NP*4, O*4]
            votes = tf.reshape(votes, [kki, -1, POSE_SIZE, out_types, POSE_SIZE])  # [KKI, NP, 4, O, 4]
            votes = tf.transpose(votes, [1, 3, 0, 2, 4])  # [NP, O, KKI, 4, 4]
            return tf.reshape(votes, [-1, out_types, kki, POSE_ENTRIES])  # [NP, O, KKI, 16]

    def _normalise(self, log_numerators):
        """R `[NP, O, KKI]` from log(a_j p_ij) `[NP, O, KKI]`, normalised over the parents that see each child
        (`RoutingForm.normalise_over`; `PatchLayout.normalise`)."""
        with tf.name_scope("receptive_field_normalise"):
            batch = tf.shape(log_numerators)[0] // (self.field.out_height * self.field.out_width)
            return self.patches.normalise(log_numerators, self.form.normalise_over == "positions", batch)


def conv_caps(poses, activations, *args, reuse=None, **kwargs):
    """Functional form of `ConvCaps(*args, **kwargs)` applied to (poses, activations), `reuse` as in tf.layers.

    (`[N, H, W, I, 4, 4]`, `[N, H, W, I]`) -> (`[N, OH, OW, O, 4, 4]`, `[N, OH, OW, O]`).
    """
    return _apply(ConvCaps(*args, **kwargs), [poses, activations], reuse)


class ClassCaps(RoutedCapsuleLayer):
    """Class capsules with coordinate addition (paper section 3).

    Every capsule of the input grid is a child of every class. The transformation W[i, c] is shared
    over positions; the vote is V_ic = M_i W[i, c], and then coordinate addition: for a child at
    cell (h, w) of an H x W grid, (h + 0.5) / H is added to vote entry [0, 3] and (w + 0.5) / W to
    entry [1, 3] -- the cell centre's row and column, scaled to (0, 1), added to the first two
    entries of the right-hand (translation) column of the vote matrix. `coordinate_offsets` `[H, W, 16]`
    replaces these offsets (e.g. `official_coordinate_offsets`, the released code's form).

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, L, 4, 4]`,
    activations `[N, L]`. Variables: weights `[I, L, 4, 4]`, beta_v `[L]`, beta_a `[L]`.
    end_points: 'votes' `[N, L, H*W*I, 16]`, 'assignments' `[N, L, H*W*I]` (children ordered
    (h, w, i)), 'activations_per_iteration' (list of `[N, L]`), 'parents_per_iteration' (list of `Parents`).
    """

    def __init__(
        self,
        classes,
        iterations=3,
        final_lambda=DEFAULT_FINAL_LAMBDA,
        coordinate_addition=True,
        coordinate_offsets=None,
        name="class_caps",
        dtype=tf.float32,
        **routing_options,
    ):
        super().__init__(name, dtype, iterations, final_lambda, **routing_options)
        self.classes, self.coordinate_addition = classes, coordinate_addition
        self.coordinate_offsets = coordinate_offsets

    def build(self, pose_shape, activation_shape):
        _check_capsules(self.name, pose_shape, activation_shape)
        self.height, self.width, self.input_types = int(pose_shape[1]), int(pose_shape[2]), int(pose_shape[3])
        self._build_routing_variables([self.input_types, self.classes, POSE_SIZE, POSE_SIZE], self.classes)

    def _coordinates(self):
        """Coordinate-addition offsets `[1, 1, H*W*I, 16]`: zeros but entries [0, 3] and [1, 3] (the paper's
        form), or `coordinate_offsets` repeated over the input types."""
        if self.coordinate_offsets is not None:
            per_cell = np.asarray(self.coordinate_offsets, np.float64)  # [H, W, 16]
            if per_cell.shape != (self.height, self.width, POSE_ENTRIES):
                raise ValueError(
                    "%s: coordinate_offsets must be [%d, %d, %d], got %s"
                    % (self.name, self.height, self.width, POSE_ENTRIES, per_cell.shape)
                )
            offsets = np.repeat(per_cell[:, :, None, :], self.input_types, axis=2)  # [H, W, I, 16]
        else:
            offsets = np.zeros([self.height, self.width, self.input_types, POSE_SIZE, POSE_SIZE])
            offsets[..., 0, POSE_SIZE - 1] = ((np.arange(self.height) + 0.5) / self.height)[:, None, None]  # row
            offsets[..., 1, POSE_SIZE - 1] = ((np.arange(self.width) + 0.5) / self.width)[None, :, None]  # column
        return tf.constant(offsets.reshape(1, 1, -1, POSE_ENTRIES), self.dtype)  # [1, 1, H*W*I, 16]

    def _votes(self, poses, batch):
        """V_ic = M_i W[i, c] for every child (h, w, i) and class: `[N, L, H*W*I, 16]`."""
        in_types, classes, cells = self.input_types, self.classes, self.height * self.width
        if self.routing_kernel == "fused":  # one kernel writes the parent-major votes
            weights = tf.transpose(tf.reshape(self.weights, [in_types, classes, POSE_ENTRIES]), [1, 0, 2])  # [L, I, 16]
            children = tf.reshape(poses, [batch, cells * in_types, POSE_ENTRIES])  # [N, H*W*I, 16]
            return capsule_ops.votes(children, tf.tile(weights, [1, cells, 1]))  # W tiled: [L, H*W*I, 16]
        type_major = tf.transpose(poses, [3, 0, 1, 2, 4, 5])  # [I, N, H, W, 4, 4]
        rows = tf.reshape(type_major, [in_types, -1, POSE_SIZE])  # [I, N*H*W*4, 4]
        weights = tf.transpose(self.weights, [0, 2, 1, 3])  # [I, 4, L, 4]
        weights = tf.reshape(weights, [in_types, POSE_SIZE, classes * POSE_SIZE])  # [I, 4, L*4]
        votes = tf.matmul(rows, weights)  # [I, N*H*W*4, L*4]
        votes = tf.reshape(votes, [in_types, batch, cells, POSE_SIZE, classes, POSE_SIZE])
        votes = tf.transpose(votes, [1, 4, 2, 0, 3, 5])  # [N, L, H*W, I, 4, 4]
        return tf.reshape(votes, [batch, classes, cells * in_types, POSE_ENTRIES])  # [N, L, H*W*I, 16]

    def call(self, poses, activations):
        in_types, classes = self.input_types, self.classes
        children = self.height * self.width * in_types
        batch = tf.shape(poses)[0]
        with tf.name_scope("votes"):
            votes = self._votes(poses, batch)  # [N, L, H*W*I, 16]
            if self.coordinate_addition:
                votes = votes + self._coordinates()
        child_activations = tf.reshape(activations, [-1, 1, children])  # [N, 1, H*W*I]
        initial = tf.constant(1.0 / classes, self.dtype)  # every child sees every class
        pose_means, out_activations = self._route(
            votes, child_activations, initial, lambda log_numerators: tf.nn.softmax(log_numerators, axis=1)
        )
        return tf.reshape(pose_means, [batch, classes, POSE_SIZE, POSE_SIZE]), out_activations  # [N, L, 4, 4], [N, L]


def class_caps(poses, activations, *args, reuse=None, **kwargs):
    """Functional form of `ClassCaps(*args, **kwargs)` applied to (poses, activations), `reuse` as in tf.layers.

    (`[N, H, W, I, 4, 4]`, `[N, H, W, I]`) -> (`[N, L, 4, 4]`, `[N, L]`).
    """
    return _apply(ClassCaps(*args, **kwargs), [poses, activations], reuse)
