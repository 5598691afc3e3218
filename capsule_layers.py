"""Capsule layers and EM routing of *Matrix Capsules with EM Routing*.

Hinton, Sabour, Frosst, ICLR 2018 (https://openreview.net/forum?id=HJWLfGWRb). Section 2 (the
capsule and its pose matrix), section 2.1 / Procedure 1 (EM routing), section 3 (the architecture:
primary, convolutional and class capsules, coordinate addition).

The layers follow the `tf.layers` form: a class per layer whose `__init__` stores hyperparameters,
whose `build()` checks shapes and creates variables under the layer's variable scope, and whose
`call()` holds the math; plus a functional alias (`conv_caps(...)` wraps `ConvCaps`). They are used
through `tensorflow.compat.v1` in graph mode. This module imports only numpy and tensorflow.

Axis glossary (example: the paper's MNIST network, A=B=C=D=32, batch 32, 'VALID' padding):
  N       batch                                             32
  H, W    input grid of a capsule layer                     12 x 12 (primary caps)
  OH, OW  output grid of a convolutional capsule layer      5 x 5 (conv_caps1), 3 x 3 (conv_caps2)
  P       OH * OW, parent positions                         25
  K       kernel size (square), s the stride                3, s = 2 (conv_caps1), 1 (conv_caps2)
  T       capsule types of a capsule tensor (I in, O out)   32
  KKI     K * K * I, the children in one receptive field    288
  4 x 4   pose matrix; flattened to 16 = (row, column)
  C       classes                                           10

Capsule tensors: poses `[N, H, W, T, 4, 4]`, activations `[N, H, W, T]`.
  conv1 features [32, 12, 12, 32] -> primary_caps poses [32, 12, 12, 32, 4, 4]
  -> conv_caps1 [32, 5, 5, 32, 4, 4] -> conv_caps2 [32, 3, 3, 32, 4, 4] -> class_caps [32, 10, 4, 4].

Routing layout. Inside routing, votes are parent-major, `[B, O, children, 16]` (B = N * P parent
positions of a conv layer, or N for the class layer; children = K*K*I patch entries ordered
(kh, kw, i), exactly the channel order of `tf.image.extract_patches`). Then the M-step sums
(sum_i r V and sum_i r V^2) are batched matmuls over the votes and their squares, so is the
E-step's Mahalanobis term, and per-child values move between patch and child layouts with a
reshape, a fold and a patch extraction, never a transpose. The routing's gradient with respect to
the votes is assembled by hand (`_VoteContractions`): one batched matmul instead of one vote-sized
gradient per use of the votes.

Receptive fields. In a convolutional capsule layer a child is seen by every parent whose receptive
field contains it (up to ceil(K/s)^2 positions times O types). The E-step normalises each child over
all of them: the per-patch values are summed back onto child positions (the "fold", the transpose of
patch extraction). 1-D example: the size-2, stride-1 patches of [1, 2, 3, 4] are [[1, 2], [2, 3],
[3, 4]]; folded back they give [1, 4, 6, 4].
"""

import math

import numpy as np
import tensorflow.compat.v1 as tf

POSE_SIZE = 4  # a pose is a 4x4 matrix (paper section 2)
POSE_ENTRIES = POSE_SIZE * POSE_SIZE

# Numerical guards, each with its reason.
_VARIANCE_FLOOR = 5e-4  # added to every sigma^2, as in the official code: keeps log(sigma) finite
_SAFE_DIVIDE_EPSILON = 1e-9  # a parent with no active children has mass 0: its mean becomes 0
_LOG_FLOOR = 1e-30  # log of an empty E-step denominator (a child no parent sees) stays finite
_LOG_2PI = math.log(2.0 * math.pi)  # Gaussian normaliser
_COST_VARIANCE_EPSILON = 1e-6  # standardised costs: sqrt stays differentiable when all costs are equal

# Inverse temperature schedule of the official code: lambda_i = final_lambda * (1 - 0.95^(i+1)).
_LAMBDA_DECAY = 0.95
DEFAULT_FINAL_LAMBDA = 0.01

# Default initialisers. Each vote entry is a sum of 4 products, so N(0, 0.5^2) weights keep the
# vote scale equal to the pose scale.
_DEFAULT_WEIGHT_STDDEV = 0.5

VALID_PADDINGS = ("VALID", "SAME")


def inverse_temperatures(final_lambda, iterations):
    """Per-iteration inverse temperatures lambda_i = final_lambda * (1 - 0.95^(i+1)).

    The schedule of the official code (the paper only says lambda grows). Returns a list of
    `iterations` Python floats.
    """
    return [final_lambda * (1.0 - _LAMBDA_DECAY ** (i + 1)) for i in range(iterations)]


def _safe_divide(numerator, denominator):
    """numerator / denominator that is 0, not NaN, where the denominator is 0 (denominator >= 0)."""
    return numerator / (denominator + _SAFE_DIVIDE_EPSILON)


def _safe_log(x):
    """log(x) clamped below at log(_LOG_FLOOR); its gradient is 0 (not inf) at x = 0."""
    return tf.log(tf.maximum(x, _LOG_FLOOR))


def _pair(value):
    """An int or a pair of ints as a pair (height, width)."""
    return (value, value) if isinstance(value, int) else tuple(value)


# ----------------------------------------------------------------------------------------------
# Receptive-field geometry and the fold.
# ----------------------------------------------------------------------------------------------


def conv_geometry(height, width, kernel_size, stride, padding):
    """Output size and leading padding of a convolution, with the rules of `tf.nn.conv2d`.

    Args:
      height, width: input grid size.
      kernel_size, stride: ints or (height, width) pairs.
      padding: 'VALID' or 'SAME'.

    Returns:
      (out_height, out_width, pad_top, pad_left).
    """
    if padding not in VALID_PADDINGS:
        raise ValueError("padding must be one of %s, got %r" % (VALID_PADDINGS, padding))
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride)
    out, pad = [], []
    for size, k, s in ((height, kh, sh), (width, kw, sw)):
        if padding == "VALID":
            n = (size - k) // s + 1
            out.append(n)
            pad.append(0)
        else:
            n = -(-size // s)  # ceil(size / s)
            out.append(n)
            pad.append(max((n - 1) * s + k - size, 0) // 2)
    if out[0] < 1 or out[1] < 1:
        raise ValueError(
            "a %dx%d kernel with %s padding does not fit a %dx%d input" % (kh, kw, padding, height, width)
        )
    return out[0], out[1], pad[0], pad[1]


class ReceptiveField:
    """Which child position each (parent position, kernel offset) sees, and the fold over it.

    Built once from static sizes with numpy; the graph then uses dense ops only:
    `tf.image.extract_patches` (child -> patch layout) and `unsorted_segment_{sum,max}` with
    precomputed child ids (patch -> child layout, the "fold"). Offsets that fall in 'SAME' padding
    map to one extra dump segment that is dropped.

    Fold timings, paper conv_caps1 at batch 32 ([32, 5, 5, 3, 3, 32] -> [32, 12, 12, 32]), medians of
    30 runs on the 2-core AVX2 dev machine, result fetched: unsorted_segment_sum 0.79 ms
    (unsorted_segment_max 1.08 ms), gradient of extract_patches 0.88 ms, conv2d_transpose with a
    one-hot kernel 1.92 ms (shared TF-NOTES: 6-D SparseTensor 35-55 ms). All agree exactly. Segment
    ops win, and the same ids give the fold-max that the stable log-space E-step needs.
    """

    def __init__(self, height, width, kernel_size, stride, padding):
        self.height, self.width = height, width
        self.kernel_size, self.stride, self.padding = _pair(kernel_size), _pair(stride), padding
        self.out_height, self.out_width, pad_top, pad_left = conv_geometry(
            height, width, kernel_size, stride, padding
        )
        kh, kw = self.kernel_size
        sh, sw = self.stride
        rows = np.arange(self.out_height)[:, None] * sh + np.arange(kh)[None, :] - pad_top  # [OH, kh]
        cols = np.arange(self.out_width)[:, None] * sw + np.arange(kw)[None, :] - pad_left  # [OW, kw]
        rows = rows[:, None, :, None]  # [OH, 1, kh, 1]
        cols = cols[None, :, None, :]  # [1, OW, 1, kw]
        valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # [OH, OW, kh, kw]
        self.num_children = height * width
        child = np.where(valid, rows * width + cols, self.num_children)  # [OH, OW, kh, kw]
        self.child_ids = child.reshape(-1).astype(np.int32)  # [OH*OW*kh*kw], dump id = H*W
        self.valid = valid.reshape(self.out_height * self.out_width, kh * kw)  # [P, kh*kw]
        counts = np.bincount(self.child_ids, minlength=self.num_children + 1)[: self.num_children]
        # parent positions that see each child (0 for a child no parent sees)
        self.parent_positions = counts.reshape(height, width)  # [H, W]
        padded_counts = np.append(counts, 1)[child]  # [OH, OW, kh, kw]
        self.inverse_count = np.where(valid, 1.0 / padded_counts, 0.0).reshape(
            self.out_height * self.out_width, kh * kw
        )  # [P, kh*kw]

    def fold(self, patches, reduce="sum"):
        """Sums (or maxes) patch values back onto the child positions they came from.

        Args:
          patches: `[N, OH, OW, kh, kw, T]` (or `[N, OH, OW, kh*kw, T]`).
          reduce: 'sum' or 'max'. An unseen child gets 0 ('sum') or the dtype's lowest ('max').

        Returns:
          `[N, H, W, T]`.
        """
        segment_op = {"sum": tf.math.unsorted_segment_sum, "max": tf.math.unsorted_segment_max}[reduce]
        num_types = patches.shape[-1]
        batch = tf.shape(patches)[0]
        segments = self.num_children + 1  # + the dump segment of padded offsets
        flat = tf.reshape(patches, [batch, len(self.child_ids), num_types])  # [N, OH*OW*kh*kw, T]
        ids = tf.range(batch)[:, None] * segments + self.child_ids[None, :]  # [N, OH*OW*kh*kw]
        folded = segment_op(flat, ids, batch * segments)  # [N*(H*W+1), T]
        folded = tf.reshape(folded, [batch, segments, num_types])[:, : self.num_children]  # [N, H*W, T]
        return tf.reshape(folded, [batch, self.height, self.width, num_types])  # [N, H, W, T]

    def extract(self, children):
        """Patch extraction: `[N, H, W, D]` -> `[N, OH, OW, kh*kw*D]`, zeros at padded offsets."""
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return tf.image.extract_patches(
            children, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, 1, 1, 1], padding=self.padding
        )


# ----------------------------------------------------------------------------------------------
# EM routing (paper Procedure 1).
# ----------------------------------------------------------------------------------------------


class _VoteContractions:
    """The routing's only uses of the votes, and their hand-written gradient.

    EM routing touches the votes V `[B, O, children, 16]` in exactly two ways: the M-step sums
    sum_i r_i V_i and sum_i r_i V_i^2 (`weighted_sums`), and the E-step's Mahalanobis term
    V a + V^2 b per child (`quadratic_forms`, a and b per parent). Autodiff would write one
    vote-sized gradient per use and iteration (an outer product each) and add them up. Every one of
    these gradients is an outer product u (x) w of a per-child vector u `[B, O, children]` and a
    per-parent vector w `[B, O, 16]` (times 2V for the V^2 uses), so their total is
        dL/dV = U W_lin + 2 V * (U W_sq),   U `[B, O, children, k]`, W `[B, O, k, 16]`,
    one batched matmul with k = (M-steps + E-steps) columns. The routing sees the votes through
    `tf.stop_gradient`, autodiff gives the per-use gradients (dL/d sum, dL/d form), and
    `votes_gradient` assembles dL/dV from them.
    """

    def __init__(self, votes):
        self.votes = tf.stop_gradient(votes)  # [B, O, children, 16]
        self.squared_votes = tf.square(self.votes)  # [B, O, children, 16]
        self._sums = []  # (r `[B, O, children]`, sum r V `[B, O, 1, 16]`, sum r V^2 `[B, O, 1, 16]`)
        self._forms = []  # (a `[B, O, 16]`, b `[B, O, 16]`, V a + V^2 b `[B, O, children]`)

    def weighted_sums(self, weights):
        """sum_i r_i V_i and sum_i r_i V_i^2 for r `[B, O, children]` (O may be 1): two `[B, O, 16]`."""
        r = weights[:, :, None, :]  # [B, O, 1, children]
        vote_sum = tf.matmul(r, self.votes)  # [B, O, 1, 16]
        squared_sum = tf.matmul(r, self.squared_votes)  # [B, O, 1, 16]
        self._sums.append((weights, vote_sum, squared_sum))
        return vote_sum[:, :, 0, :], squared_sum[:, :, 0, :]

    def quadratic_forms(self, linear, quadratic):
        """sum_h V_ih a_h + V_ih^2 b_h for every child: a, b `[B, O, 16]` -> `[B, O, children]`."""
        forms = (tf.matmul(self.votes, linear[..., None])[..., 0]
                 + tf.matmul(self.squared_votes, quadratic[..., None])[..., 0])  # [B, O, children]
        self._forms.append((linear, quadratic, forms))
        return forms

    def votes_gradient(self, outputs, output_gradients, inputs):
        """dL/dV and dL/d inputs, given dL/d outputs (None where an output is unused).

        Returns a list: the votes gradient `[B, O, children, 16]`, then one gradient per tensor of
        `inputs` (None where it does not reach the outputs).
        """
        used = [(y, dy) for y, dy in zip(outputs, output_gradients) if dy is not None]
        num_sums = len(self._sums)
        contractions = ([vote_sum for _, vote_sum, _ in self._sums] + [squared for _, _, squared in self._sums]
                        + [form for _, _, form in self._forms])
        grads = tf.gradients([y for y, _ in used], contractions + list(inputs), [dy for _, dy in used])
        input_grads = grads[len(contractions):]
        # A contraction that does not reach the used outputs contributes nothing to dL/dV.
        grads = [tf.zeros_like(x) if g is None else g for x, g in zip(contractions, grads[:len(contractions)])]
        vote_sum_grads, squared_sum_grads = grads[:num_sums], grads[num_sums:2 * num_sums]  # [B, O, 1, 16] each
        form_grads = grads[2 * num_sums:]  # [B, O, children] each
        shape = tf.shape(self.votes)[:3]
        # Column k of U is the per-child factor of use k; row k of W_lin / W_sq its per-parent factor.
        per_child = [tf.broadcast_to(r, shape) for r, _, _ in self._sums] + form_grads  # k x [B, O, children]
        lin_rows = vote_sum_grads + [a[:, :, None, :] for a, _, _ in self._forms]  # k x [B, O, 1, 16]
        sq_rows = squared_sum_grads + [b[:, :, None, :] for _, b, _ in self._forms]  # k x [B, O, 1, 16]
        u_transposed = tf.stack(per_child, axis=2)  # [B, O, k, children]
        lin = tf.matmul(u_transposed, tf.concat(lin_rows, axis=2), transpose_a=True)  # [B, O, children, 16]
        sq = tf.matmul(u_transposed, tf.concat(sq_rows, axis=2), transpose_a=True)  # [B, O, children, 16]
        votes_grad = lin + 2.0 * self.votes * sq  # [B, O, children, 16]
        return [votes_grad] + input_grads


def _activation_logits(cost, beta_a, inverse_temperature, standardise_costs):
    """The M-step's activation logit of every parent from its total cost `[B, O]`: `[B, O]`.

    Paper form: lambda (beta_a - cost). With `standardise_costs`, the costs of the O parent types at
    one position are first standardised to mean 0 and variance 1 -- lambda (beta_a + (mean - cost) /
    std) -- which keeps the logit's scale independent of how many children a parent has (not in the
    paper; the gyang274 and IBM (Gritzman, 2019) TensorFlow implementations do this).
    """
    if not standardise_costs:
        return inverse_temperature * (beta_a - cost)
    mean = tf.reduce_mean(cost, axis=1, keepdims=True)  # [B, 1]
    variance = tf.reduce_mean(tf.square(cost - mean), axis=1, keepdims=True)  # [B, 1]
    return inverse_temperature * (beta_a + (mean - cost) * tf.rsqrt(variance + _COST_VARIANCE_EPSILON))


def _m_step(weighted_assignments, contractions, beta_v, beta_a, inverse_temperature, standardise_costs):
    """M-step: every parent's Gaussian from its weighted votes, then its activation.

    sigma^2 = E[V^2] - mu^2, clamped at 0 against float rounding.

    Args:
      weighted_assignments: r_ij = R_ij * a_i, `[B, O, children]` (O may be 1 and broadcast).
      contractions: the `_VoteContractions` of the votes.
      beta_v, beta_a: `[O]`.
      inverse_temperature: lambda, a float.
      standardise_costs: see `_activation_logits`.

    Returns:
      mean `[B, O, 16]`, variance `[B, O, 16]`, activations `[B, O]` and their logs `[B, O]`.
    """
    with tf.name_scope("m_step"):
        mass = tf.reduce_sum(weighted_assignments, axis=-1, keepdims=True)  # [B, O, 1], sum_i r_ij
        vote_sum, squared_sum = contractions.weighted_sums(weighted_assignments)  # [B, O, 16] each
        mean = _safe_divide(vote_sum, mass)  # [B, O, 16]
        mean_square = _safe_divide(squared_sum, mass)  # [B, O, 16]
        variance = tf.nn.relu(mean_square - tf.square(mean)) + _VARIANCE_FLOOR  # [B, O, 16]
        # cost_h = (beta_v + log sigma_h) * sum_i r_ij  (paper eq. 2; log sigma = log(sigma^2) / 2)
        cost = (beta_v[:, None] + 0.5 * tf.log(variance)) * mass  # [B, O, 16]
        logits = _activation_logits(tf.reduce_sum(cost, axis=-1), beta_a, inverse_temperature,
                                    standardise_costs)  # [B, O]
        return mean, variance, tf.sigmoid(logits), tf.log_sigmoid(logits)


def _e_step_log_numerators(contractions, mean, variance, log_activations):
    """log(a_j p_ij), the E-step numerators, in log space.

    sum_h (V_h - mu_h)^2 / (2 sigma_h^2) = sum_h [V_h^2 / (2 sigma_h^2) - V_h mu_h / sigma_h^2]
    + sum_h mu_h^2 / (2 sigma_h^2): the votes part is one quadratic form per child.

    Args:
      contractions: the `_VoteContractions` of the votes `[B, O, children, 16]`.
      mean, variance: `[B, O, 16]`.
      log_activations: `[B, O]`.

    Returns:
      `[B, O, children]`.
    """
    with tf.name_scope("e_step"):
        votes_part = contractions.quadratic_forms(mean / variance, -0.5 / variance)  # [B, O, children]
        parent_part = tf.reduce_sum(0.5 * tf.square(mean) / variance + 0.5 * (tf.log(variance) + _LOG_2PI), -1)
        return (log_activations - parent_part)[..., None] + votes_part  # [B, O, children]


def em_routing(votes, child_activations, initial_assignments, beta_v, beta_a, inverse_temps, normalise,
               standardise_costs=False):
    """EM routing (paper Procedure 1) in the parent-major layout.

    The votes gradient is assembled by `_VoteContractions` (one batched matmul), the gradients of
    all other inputs by autodiff.

    Args:
      votes: `[B, O, children, 16]`, B parent positions (N * P, or N for the class layer).
      child_activations: `[B, 1, children]`, zero for padded children.
      initial_assignments: R before the first M-step, broadcastable to `[B, O, children]`.
      beta_v, beta_a: `[O]`.
      inverse_temps: list of per-iteration lambdas; its length is the number of iterations.
      normalise: maps E-step log numerators `[B, O, children]` to assignments R `[B, O, children]`
        that sum to 1 over every parent of each child.
      standardise_costs: see `_activation_logits`.

    Returns:
      poses `[B, O, 16]` (the parent means), activations `[B, O]`, the assignments used by the last
      M-step (broadcastable to `[B, O, children]`) and the list of per-iteration activations.
    """

    @tf.custom_gradient
    def route(votes, child_activations, initial_assignments, beta_v, beta_a):
        contractions = _VoteContractions(votes)
        assignments = initial_assignments
        activations_per_iteration = []
        for iteration, inverse_temperature in enumerate(inverse_temps):
            with tf.name_scope("iteration_%d" % iteration):
                weighted = assignments * child_activations  # [B, O, children]
                mean, variance, activations, log_activations = _m_step(weighted, contractions, beta_v, beta_a,
                                                                       inverse_temperature, standardise_costs)
                activations_per_iteration.append(activations)
                if iteration < len(inverse_temps) - 1:
                    log_numerators = _e_step_log_numerators(contractions, mean, variance, log_activations)
                    assignments = normalise(log_numerators)
        outputs = [mean, activations, assignments] + activations_per_iteration

        def gradient(*output_gradients):
            other_inputs = [child_activations, initial_assignments, beta_v, beta_a]
            return contractions.votes_gradient(outputs, output_gradients, other_inputs)

        return outputs, gradient

    mean, activations, assignments, *activations_per_iteration = route(
        votes, child_activations, initial_assignments, beta_v, beta_a)
    return mean, activations, assignments, activations_per_iteration


# ----------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------


class _CapsuleLayer:
    """Base class in the `tf.layers` form: variables are made once, under the layer's scope.

    Subclasses implement `build(*input_shapes)` (check shapes, create variables with
    `self._variable`) and `call(*inputs)` (the math). Calling the layer again reuses its variables.
    After a call, `end_points` holds intermediate tensors for tests and pictures.
    """

    def __init__(self, name, dtype=tf.float32):
        self.name = name
        self.dtype = tf.as_dtype(dtype)
        self.built = False
        self.variables = []
        self.end_points = {}
        self._scope = None

    def _variable(self, name, shape, initializer):
        variable = tf.get_variable(name, shape=shape, dtype=self.dtype, initializer=initializer)
        self.variables.append(variable)
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
        self.pose_kernel = self._variable("pose_kernel", [k, k, features, self.types * POSE_ENTRIES], glorot)
        self.pose_bias = self._variable("pose_bias", [self.types * POSE_ENTRIES], tf.zeros_initializer())
        self.activation_kernel = self._variable("activation_kernel", [k, k, features, self.types], glorot)
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


def primary_caps(features, types, kernel_size=1, stride=1, padding="VALID", name="primary_caps", dtype=tf.float32):
    """Functional form of `PrimaryCaps`: `[N, H, W, F]` -> (poses `[N, OH, OW, T, 4, 4]`, acts `[N, OH, OW, T]`)."""
    return PrimaryCaps(types, kernel_size, stride, padding, name=name, dtype=dtype)(features)


class _RoutedCapsuleLayer(_CapsuleLayer):
    """Shared variables and routing settings of the convolutional and class capsule layers."""

    def __init__(self, name, dtype, iterations, final_lambda, weights_initializer, beta_v_initializer,
                 beta_a_initializer, beta_a_scale, standardise_costs):
        super().__init__(name, dtype)
        self.standardise_costs = standardise_costs
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
        self.weights = self._variable("weights", weight_shape, self.weights_initializer)
        self.beta_v = self._variable("beta_v", [num_parents], self.beta_v_initializer)  # one per parent type
        self.beta_a = self._variable("beta_a", [num_parents], self.beta_a_initializer)

    def _route(self, votes, child_activations, initial_assignments, normalise):
        with tf.name_scope("em_routing"):
            poses, activations, assignments, per_iteration = em_routing(
                votes, child_activations, initial_assignments, self.beta_v, self.beta_a_scale * self.beta_a,
                self.inverse_temps, normalise, self.standardise_costs
            )
        self.end_points = {
            "votes": votes,
            "assignments": tf.broadcast_to(assignments, tf.shape(votes)[:3]),
            "activations_per_iteration": per_iteration,
        }
        return poses, activations


class ConvCaps(_RoutedCapsuleLayer):
    """Convolutional capsules with EM routing (paper section 3, ConvCaps1/ConvCaps2).

    Each parent (position, type o) sees the K x K x I children of its receptive field; the vote of
    child i at kernel offset (kh, kw) is V_ij = M_i W[kh, kw, i, o] (pose on the left).

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, OH, OW, O, 4, 4]`,
    activations `[N, OH, OW, O]`. Variables: weights `[K, K, I, O, 4, 4]`, beta_v `[O]`, beta_a `[O]`.
    end_points: 'votes' `[N*P, O, KKI, 16]`, 'assignments' (final R) `[N*P, O, KKI]` with parent
    positions ordered (n, oh, ow) and children (kh, kw, i), 'activations_per_iteration' (list of
    `[N*P, O]`).
    """

    def __init__(self, types, kernel_size=3, stride=1, padding="VALID", iterations=3,
                 final_lambda=DEFAULT_FINAL_LAMBDA, weights_initializer=None, beta_v_initializer=None,
                 beta_a_initializer=None, beta_a_scale=1.0, standardise_costs=False, name="conv_caps",
                 dtype=tf.float32):
        super().__init__(name, dtype, iterations, final_lambda, weights_initializer, beta_v_initializer,
                         beta_a_initializer, beta_a_scale, standardise_costs)
        conv_geometry(kernel_size, kernel_size, kernel_size, stride, padding)  # validates padding
        self.types, self.kernel_size, self.stride, self.padding = types, kernel_size, stride, padding

    def build(self, pose_shape, activation_shape):
        _check_capsules(self.name, pose_shape, activation_shape)
        height, width, self.input_types = int(pose_shape[1]), int(pose_shape[2]), int(pose_shape[3])
        self.field = ReceptiveField(height, width, self.kernel_size, self.stride, self.padding)
        k = self.kernel_size
        self.patch_children = k * k * self.input_types  # KKI
        self._build_routing_variables([k, k, self.input_types, self.types, POSE_SIZE, POSE_SIZE], self.types)

    def call(self, poses, activations):
        field, out_types = self.field, self.types
        batch = tf.shape(poses)[0]
        votes = self._votes(poses, batch)  # [NP, O, KKI, 16]
        child_activations = self._extract(activations)  # [NP, 1, KKI]
        initial = self._per_patch_constant(field.inverse_count / out_types, batch)  # uniform over seeing parents
        pose_means, out_activations = self._route(votes, child_activations, initial, self._normalise)
        out_shape = [batch, field.out_height, field.out_width, out_types]
        out_poses = tf.reshape(pose_means, out_shape + [POSE_SIZE, POSE_SIZE])  # [N, OH, OW, O, 4, 4]
        return out_poses, tf.reshape(out_activations, out_shape)  # [N, OH, OW, O]

    def _votes(self, poses, batch):
        """V_ij = M_i W_ij as one batched matmul per child capsule of the kernel: `[NP, O, KKI, 16]`."""
        field, out_types, kki = self.field, self.types, self.patch_children
        with tf.name_scope("votes"):
            flat = tf.reshape(poses, [batch, field.height, field.width, -1])  # [N, H, W, I*16]
            patches = tf.reshape(field.extract(flat), [-1, kki, POSE_SIZE, POSE_SIZE])  # [NP, KKI, 4, 4]
            rows = tf.reshape(tf.transpose(patches, [1, 0, 2, 3]), [kki, -1, POSE_SIZE])  # [KKI, NP*4, 4]
            weights = tf.transpose(self.weights, [0, 1, 2, 4, 3, 5])  # [K, K, I, 4, O, 4]
            weights = tf.reshape(weights, [kki, POSE_SIZE, out_types * POSE_SIZE])  # [KKI, 4, O*4]
            votes = tf.matmul(rows, weights)  # [KKI, NP*4, O*4]
            votes = tf.reshape(votes, [kki, -1, POSE_SIZE, out_types, POSE_SIZE])  # [KKI, NP, 4, O, 4]
            votes = tf.transpose(votes, [1, 3, 0, 2, 4])  # [NP, O, KKI, 4, 4]
            return tf.reshape(votes, [-1, out_types, kki, POSE_ENTRIES])  # [NP, O, KKI, 16]

    def _per_patch_constant(self, values, batch):
        """A per-(position, kernel offset) constant `[P, K*K]`, repeated over types and batch: `[NP, 1, KKI]`."""
        per_type = np.repeat(values, self.input_types, axis=1)  # [P, KKI]
        ones = tf.ones([batch, 1, 1], self.dtype)
        return tf.reshape(tf.constant(per_type, self.dtype) * ones, [-1, 1, self.patch_children])

    def _to_patch_major(self, values, batch):
        """`[NP, KKI]` -> `[N, OH, OW, K*K, I]` (a reshape: the layouts agree)."""
        field = self.field
        kk = self.kernel_size * self.kernel_size
        return tf.reshape(values, [batch, field.out_height, field.out_width, kk, self.input_types])

    def _extract(self, children):
        """Child values `[N, H, W, I]` at every parent's patch: `[NP, 1, KKI]`."""
        return tf.reshape(self.field.extract(children), [-1, 1, self.patch_children])

    def _normalise(self, log_numerators):
        """E-step normalisation over every parent that sees each child, in log space.

        Args:
          log_numerators: log(a_j p_ij), `[NP, O, KKI]`.

        Returns:
          R `[NP, O, KKI]`: exp(log numerator - log sum over all parents of the child), 0 at padded
          offsets.
        """
        with tf.name_scope("receptive_field_normalise"):
            batch = tf.shape(log_numerators)[0] // (self.field.out_height * self.field.out_width)
            # A per-child shift (its largest numerator) makes every child's denominator >= 1.
            local_max = self._to_patch_major(tf.reduce_max(log_numerators, axis=1), batch)  # [N, OH, OW, KK, I]
            shift = self._extract(tf.stop_gradient(self.field.fold(local_max, "max")))  # [NP, 1, KKI]
            shifted = tf.exp(log_numerators - shift)  # [NP, O, KKI]
            local_sum = self._to_patch_major(tf.reduce_sum(shifted, axis=1), batch)  # [N, OH, OW, KK, I]
            log_denominator = self._extract(_safe_log(self.field.fold(local_sum, "sum")))  # [NP, 1, KKI]
            valid = self._per_patch_constant(self.field.valid, batch)  # [NP, 1, KKI], 0 at padded offsets
            return shifted * tf.exp(-log_denominator) * valid


def conv_caps(poses, activations, types, kernel_size=3, stride=1, padding="VALID", iterations=3,
              final_lambda=DEFAULT_FINAL_LAMBDA, name="conv_caps", dtype=tf.float32, **initializers):
    """Functional form of `ConvCaps`.

    (poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`) -> (`[N, OH, OW, O, 4, 4]`, `[N, OH, OW, O]`).
    """
    layer = ConvCaps(types, kernel_size, stride, padding, iterations, final_lambda, name=name, dtype=dtype,
                     **initializers)
    return layer(poses, activations)


class ClassCaps(_RoutedCapsuleLayer):
    """Class capsules with coordinate addition (paper section 3).

    Every capsule of the input grid is a child of every class. The transformation W[i, c] is shared
    over positions; the vote is V_ic = M_i W[i, c], and then coordinate addition: for a child at
    cell (h, w) of an H x W grid, (h + 0.5) / H is added to vote entry [0, 3] and (w + 0.5) / W to
    entry [1, 3] -- the cell centre's row and column, scaled to (0, 1), added to the first two
    entries of the right-hand (translation) column of the vote matrix.

    Input poses `[N, H, W, I, 4, 4]`, activations `[N, H, W, I]`; output poses `[N, C, 4, 4]`,
    activations `[N, C]`. Variables: weights `[I, C, 4, 4]`, beta_v `[C]`, beta_a `[C]`.
    end_points: 'votes' `[N, C, H*W*I, 16]`, 'assignments' `[N, C, H*W*I]` (children ordered
    (h, w, i)), 'activations_per_iteration' (list of `[N, C]`).
    """

    def __init__(self, classes, iterations=3, final_lambda=DEFAULT_FINAL_LAMBDA, coordinate_addition=True,
                 weights_initializer=None, beta_v_initializer=None, beta_a_initializer=None, beta_a_scale=1.0,
                 standardise_costs=False, name="class_caps", dtype=tf.float32):
        super().__init__(name, dtype, iterations, final_lambda, weights_initializer, beta_v_initializer,
                         beta_a_initializer, beta_a_scale, standardise_costs)
        self.classes, self.coordinate_addition = classes, coordinate_addition

    def build(self, pose_shape, activation_shape):
        _check_capsules(self.name, pose_shape, activation_shape)
        self.height, self.width, self.input_types = int(pose_shape[1]), int(pose_shape[2]), int(pose_shape[3])
        self._build_routing_variables([self.input_types, self.classes, POSE_SIZE, POSE_SIZE], self.classes)

    def _coordinates(self):
        """Coordinate-addition offsets `[1, 1, H*W*I, 16]`: zeros but entries [0, 3] and [1, 3]."""
        offsets = np.zeros([self.height, self.width, self.input_types, POSE_SIZE, POSE_SIZE])
        offsets[..., 0, POSE_SIZE - 1] = ((np.arange(self.height) + 0.5) / self.height)[:, None, None]  # scaled row
        offsets[..., 1, POSE_SIZE - 1] = ((np.arange(self.width) + 0.5) / self.width)[None, :, None]  # scaled col
        return tf.constant(offsets.reshape(1, 1, -1, POSE_ENTRIES), self.dtype)  # [1, 1, H*W*I, 16]

    def call(self, poses, activations):
        in_types, classes = self.input_types, self.classes
        children = self.height * self.width * in_types
        batch = tf.shape(poses)[0]
        with tf.name_scope("votes"):
            type_major = tf.transpose(poses, [3, 0, 1, 2, 4, 5])  # [I, N, H, W, 4, 4]
            rows = tf.reshape(type_major, [in_types, -1, POSE_SIZE])  # [I, N*H*W*4, 4]
            weights = tf.transpose(self.weights, [0, 2, 1, 3])  # [I, 4, C, 4]
            weights = tf.reshape(weights, [in_types, POSE_SIZE, classes * POSE_SIZE])  # [I, 4, C*4]
            votes = tf.matmul(rows, weights)  # [I, N*H*W*4, C*4]
            votes = tf.reshape(votes, [in_types, batch, self.height * self.width, POSE_SIZE, classes, POSE_SIZE])
            votes = tf.transpose(votes, [1, 4, 2, 0, 3, 5])  # [N, C, H*W, I, 4, 4]
            votes = tf.reshape(votes, [batch, classes, children, POSE_ENTRIES])  # [N, C, H*W*I, 16]
            if self.coordinate_addition:
                votes = votes + self._coordinates()
        child_activations = tf.reshape(activations, [-1, 1, children])  # [N, 1, H*W*I]
        initial = tf.constant(1.0 / classes, self.dtype)  # every child sees every class
        pose_means, out_activations = self._route(
            votes, child_activations, initial, lambda log_numerators: tf.nn.softmax(log_numerators, axis=1)
        )
        return tf.reshape(pose_means, [batch, classes, POSE_SIZE, POSE_SIZE]), out_activations  # [N, C, 4, 4], [N, C]


def class_caps(poses, activations, classes, iterations=3, final_lambda=DEFAULT_FINAL_LAMBDA,
               coordinate_addition=True, name="class_caps", dtype=tf.float32, **initializers):
    """Functional form of `ClassCaps`: (`[N, H, W, I, 4, 4]`, `[N, H, W, I]`) -> (`[N, C, 4, 4]`, `[N, C]`)."""
    layer = ClassCaps(classes, iterations, final_lambda, coordinate_addition, name=name, dtype=dtype, **initializers)
    return layer(poses, activations)
