"""CapsNetEMModel: the network, spread loss, optimiser and summaries of the EM-routing paper.

Hinton, Sabour, Frosst, *Matrix Capsules with EM Routing*, ICLR 2018, section 3 (architecture,
figure 1) and section 4 (spread loss, eq. 3). Graph assembly only: hyperparameters come in as a
plain `HParams` object, flags are read in main.py alone.

Network (paper MNIST config, A=B=C=D=32, batch N):
  images            [N, 28, 28, 1]
  relu_conv1        [N, 12, 12, A]      5x5 conv, stride 2, ReLU
  primary_caps      [N, 12, 12, B, 4, 4] + activations [N, 12, 12, B]
  conv_caps1        [N, 5, 5, C, 4, 4]   K=3, stride 2
  conv_caps2        [N, 3, 3, D, 4, 4]   K=3, stride 1
  class_caps        [N, 10, 4, 4] + activations [N, 10] (coordinate addition)
"""

import collections
import dataclasses
import math
import os

import tensorflow.compat.v1 as tf

import capsule_layers as cl


@dataclasses.dataclass(frozen=True)
class HParams:
    """Every architecture, routing and optimisation setting of a run."""

    # Architecture (paper section 3: A, B, C, D and kernel sizes).
    conv1_filters: int = 32  # A
    conv1_kernel: int = 5
    conv1_stride: int = 2
    primary_types: int = 32  # B
    primary_kernel: int = 1
    conv_caps1_types: int = 32  # C
    conv_caps1_kernel: int = 3
    conv_caps1_stride: int = 2
    conv_caps2_types: int = 32  # D
    conv_caps2_kernel: int = 3
    conv_caps2_stride: int = 1
    padding: str = "VALID"
    num_classes: int = 10
    image_size: int = 28
    image_channels: int = 1
    # Routing (paper Procedure 1; lambda schedule of the official code).
    iterations: int = 3
    final_lambda: float = 0.01
    class_final_lambda: float = 0.01
    weight_stddev: float = 0.5  # conv-capsule transformation matrices ~ N(0, stddev^2)
    class_weight_stddev: float = 0.5
    beta_v_init: float = 0.0
    beta_a_init: float = 0.0
    class_beta_v_init: float = 0.0
    class_beta_a_init: float = 0.0
    beta_a_scale: float = 1.0  # effective beta_a = scale * variable (official code: 5000 * b_a)
    standardise_costs: bool = False  # standardise each position's costs over its parent types (not in the paper)
    # Spread loss margin (paper section 4: m rises from 0.2 to 0.9 during training).
    margin_schedule: str = "sigmoid"  # 'sigmoid' (official code), 'linear' or 'constant'
    margin_ramp_steps: int = 400000  # 'sigmoid': 0.2 + 0.79 sigmoid(min(10, 8 step / ramp - 4)); RUN_LENGTH: the run
    # Optimisation (official code: Adam, lr decay 0.96 every 20k steps, weight decay 2e-7).
    learning_rate: float = 3e-3
    lr_decay_rate: float = 0.96
    lr_decay_steps: int = 20000  # RUN_LENGTH: lr decays by lr_decay_rate over the whole run
    weight_decay: float = 2e-7


# A schedule length (lr_decay_steps, margin_ramp_steps) of RUN_LENGTH stands for the run's own length in
# steps, known only once the data and --max_steps/--epochs are: `with_run_length` fills it in.
RUN_LENGTH = 0

# beta_v that centres the cost at the variance floor: cost_h = beta_v + log(sigma_h) is 0 when sigma_h^2 is
# at the floor, near which the variances start (README "Training recipe"): -log(sqrt(5e-4)) = 3.8005,
# rounded to 3.8 as in every tuning run.
CENTRED_BETA_V = 3.8

PRESETS = {
    # The paper's MNIST network (310K parameters in the paper), with the official code's lambda, margin and
    # optimiser settings.
    "paper": HParams(),
    # The paper's small network of section 5 (68K parameters): A=64, B=8, C=D=16, with the CPU recipe that
    # the README's tuning runs chose: centred costs, lambda 0.1, a constant margin of 0.2, and Adam at
    # 0.01 decayed to a tenth over the run.
    "small": HParams(conv1_filters=64, primary_types=8, conv_caps1_types=16, conv_caps2_types=16, iterations=2,
                     final_lambda=0.1, class_final_lambda=0.1, beta_v_init=CENTRED_BETA_V,
                     class_beta_v_init=CENTRED_BETA_V, margin_schedule="constant", learning_rate=0.01,
                     lr_decay_rate=0.1, lr_decay_steps=RUN_LENGTH),
}

# Spread-loss margin end points (paper section 4) and the official code's sigmoid ramp.
MARGIN_START = 0.2
MARGIN_END = 0.9
_SIGMOID_MARGIN_RANGE = 0.79  # official: 0.2 + 0.79 * sigmoid(...), tends to 0.99
_SIGMOID_ARG_START = -4.0  # official: sigmoid(step / 50000 - 4)
_SIGMOID_ARG_MAX = 10.0  # official: min(10, ...)
_SIGMOID_ARG_SPAN = 8.0  # ramp_steps = 400000 reproduces step / 50000: 400000 / 8 = 50000

Inference = collections.namedtuple("Inference", ["activations", "poses", "predictions", "end_points"])
Loss = collections.namedtuple("Loss", ["total", "spread", "weight_decay", "margin"])
TrainGraph = collections.namedtuple(
    "TrainGraph", ["train_op", "loss", "accuracy", "predictions", "margin", "learning_rate", "global_step",
                   "summary_op", "inference"]
)


def hparams_for(preset, **overrides):
    """The named preset with `overrides` applied (`ValueError` for an unknown preset or field)."""
    if preset not in PRESETS:
        raise ValueError("unknown preset %r (choose from %s)" % (preset, ", ".join(sorted(PRESETS))))
    unknown = set(overrides) - {field.name for field in dataclasses.fields(HParams)}
    if unknown:
        raise ValueError("unknown hyperparameters: %s" % ", ".join(sorted(unknown)))
    return dataclasses.replace(PRESETS[preset], **overrides)


def with_run_length(hparams, steps):
    """`hparams` with every RUN_LENGTH schedule length set to `steps`, the run's length."""
    lengths = {name: steps for name in ("lr_decay_steps", "margin_ramp_steps")
               if getattr(hparams, name) == RUN_LENGTH}
    return dataclasses.replace(hparams, **lengths)


def _check_run_length(hparams, name):
    """ValueError when the schedule length `name` still stands for the run's length (not yet filled in)."""
    if getattr(hparams, name) == RUN_LENGTH:
        raise ValueError("%s is RUN_LENGTH: set the run's length with with_run_length() first" % name)


def margin_schedule(step, hparams):
    """Spread-loss margin m at `step` (a tensor or a number).

    'sigmoid': 0.2 + 0.79 * sigmoid(min(10, 8 * step / ramp - 4)), the official code's schedule
    with its 50000 written as ramp / 8 (ramp = 400000 gives it exactly).
    'linear': 0.2 + (0.9 - 0.2) * min(1, step / ramp).
    'constant': 0.2 at every step (the CPU recipe's choice, README "Training recipe"; no ramp).
    """
    if hparams.margin_schedule != "constant":
        _check_run_length(hparams, "margin_ramp_steps")
    step = tf.cast(step, tf.float32)
    ramp = float(hparams.margin_ramp_steps)
    if hparams.margin_schedule == "sigmoid":
        arg = tf.minimum(_SIGMOID_ARG_MAX, _SIGMOID_ARG_SPAN * step / ramp + _SIGMOID_ARG_START)
        return MARGIN_START + _SIGMOID_MARGIN_RANGE * tf.sigmoid(arg)
    if hparams.margin_schedule == "linear":
        return MARGIN_START + (MARGIN_END - MARGIN_START) * tf.minimum(1.0, step / ramp)
    if hparams.margin_schedule == "constant":
        return tf.fill(tf.shape(step), MARGIN_START)  # the shape of step (a scalar in training)
    raise ValueError("margin_schedule must be 'sigmoid', 'linear' or 'constant', got %r" % hparams.margin_schedule)


def spread_loss(activations, labels, margin):
    """Spread loss (paper eq. 3): L = sum_{i != t} max(0, m - (a_t - a_i))^2, averaged over the batch.

    Args:
      activations: class activations `[N, C]`.
      labels: int `[N]`.
      margin: scalar m.

    Returns:
      scalar loss.
    """
    with tf.name_scope("spread_loss"):
        num_classes = activations.shape[-1]
        target = tf.one_hot(labels, num_classes, dtype=activations.dtype)  # [N, C]
        a_t = tf.reduce_sum(activations * target, axis=1, keepdims=True)  # [N, 1]
        gaps = tf.square(tf.nn.relu(margin - (a_t - activations))) * (1.0 - target)  # [N, C], 0 at i = t
        return tf.reduce_mean(tf.reduce_sum(gaps, axis=1))


class _ReluConv1:
    """Layer A (paper section 3): a 5x5, stride-2 ReLU convolution; variables made on the first call."""

    name = "relu_conv1"

    def __init__(self, hparams):
        self.hparams = hparams
        self.kernel = self.bias = None

    def __call__(self, images):
        """`[n, 28, 28, 1]` -> `[n, 12, 12, A]`."""
        hp = self.hparams
        if self.kernel is None:
            with tf.variable_scope(self.name):
                self.kernel = tf.get_variable(
                    "kernel", [hp.conv1_kernel, hp.conv1_kernel, hp.image_channels, hp.conv1_filters],
                    initializer=tf.glorot_uniform_initializer())
                self.bias = tf.get_variable("bias", [hp.conv1_filters], initializer=tf.zeros_initializer())
        strides = [1, hp.conv1_stride, hp.conv1_stride, 1]
        with tf.name_scope(self.name):
            return tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides, hp.padding) + self.bias)


def split_batch(tensor, parts):
    """`tensor` `[N, ...]` as `parts` equal micro-batches `[ceil(N / parts), ...]`, in order.

    The last part is filled up with zeros when `parts` does not divide N (no part is empty, even
    for N < parts); callers keep the first N rows of the concatenated outputs.
    """
    if parts == 1:
        return [tensor]
    batch = tf.shape(tensor)[0]
    part_size = (batch + parts - 1) // parts
    padding = [[0, part_size * parts - batch]] + [[0, 0]] * (tensor.shape.rank - 1)
    return tf.split(tf.pad(tensor, padding), parts)  # parts x [ceil(N / parts), ...]


def micro_batches_for(batch_size, micro_batch_size):
    """How many micro-batches of at most `micro_batch_size` images a batch needs (1 when it is 0)."""
    return -(-batch_size // micro_batch_size) if micro_batch_size else 1


def session_config(threads, micro_batches):
    """Session settings for `threads` CPU threads (0: every core).

    With micro-batches, each thread runs one micro-batch's ops at a time (inter-op `threads`,
    intra-op 1); without, TensorFlow spreads every op over all of them.
    """
    if micro_batches > 1:
        return tf.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=threads or os.cpu_count())
    return tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)


class CapsNetEMModel:
    """The paper's network: relu_conv1 -> primary_caps -> conv_caps1 -> conv_caps2 -> class_caps.

    `micro_batches` > 1 builds the network once per micro-batch (shared variables, outputs
    concatenated in order, see `split_batch`): the same function of the batch, computed in
    independent parts that a CPU runs side by side on its inter-op threads, each small enough that
    routing's vote tensors can stay in cache (README, performance: a gain only while the CPU's L3
    cache is free). Each image is routed on its own, so only float summation order changes.
    """

    def __init__(self, hparams, micro_batches=1):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1, got %r" % micro_batches)
        self.hparams = hparams
        self.micro_batches = micro_batches

    def inference(self, images):
        """Forward pass.

        Args:
          images: `[N, 28, 28, 1]` in [0, 1].

        Returns:
          `Inference`: class activations `[N, C]`, class poses `[N, C, 4, 4]`, predictions `[N]` and
          end_points (per-layer activations, concatenated over micro-batches, and the layers themselves).
        """
        layers = self._layers()
        parts = [self._forward(layers, part) for part in split_batch(images, self.micro_batches)]
        batch = tf.shape(images)[0]

        def whole(tensors):  # the parts' outputs as one batch, padded rows dropped
            return tf.concat(tensors, axis=0)[:batch]

        class_activations = whole([activations for activations, _, _ in parts])  # [N, C]
        class_poses = whole([poses for _, poses, _ in parts])  # [N, C, 4, 4]
        end_points = {name: whole([points[name] for _, _, points in parts]) for name in parts[0][2]}
        end_points["layers"] = list(layers)
        predictions = tf.argmax(class_activations, axis=1)  # [N]
        return Inference(class_activations, class_poses, predictions, end_points)

    def _layers(self):
        """The network's layers, in order; variables are made on their first call."""
        hp = self.hparams
        conv_init = lambda stddev: tf.random_normal_initializer(stddev=stddev)  # noqa: E731
        layers = [_ReluConv1(hp), cl.PrimaryCaps(hp.primary_types, hp.primary_kernel, padding=hp.padding)]
        for name, types, kernel_size, stride in (
            ("conv_caps1", hp.conv_caps1_types, hp.conv_caps1_kernel, hp.conv_caps1_stride),
            ("conv_caps2", hp.conv_caps2_types, hp.conv_caps2_kernel, hp.conv_caps2_stride),
        ):
            layers.append(cl.ConvCaps(
                types, kernel_size, stride, hp.padding, hp.iterations, hp.final_lambda,
                weights_initializer=conv_init(hp.weight_stddev),
                beta_v_initializer=tf.constant_initializer(hp.beta_v_init),
                beta_a_initializer=tf.constant_initializer(hp.beta_a_init), beta_a_scale=hp.beta_a_scale,
                standardise_costs=hp.standardise_costs, name=name,
            ))
        layers.append(cl.ClassCaps(
            hp.num_classes, hp.iterations, hp.class_final_lambda, coordinate_addition=True,
            weights_initializer=conv_init(hp.class_weight_stddev),
            beta_v_initializer=tf.constant_initializer(hp.class_beta_v_init),
            beta_a_initializer=tf.constant_initializer(hp.class_beta_a_init), beta_a_scale=hp.beta_a_scale,
            standardise_costs=hp.standardise_costs, name="class_caps",
        ))
        return layers

    @staticmethod
    def _forward(layers, images):
        """The network on `images` `[n, 28, 28, 1]`: class activations `[n, C]`, poses `[n, C, 4, 4]`, end points."""
        relu_conv1, primary, *conv_layers, class_layer = layers
        features = relu_conv1(images)  # [n, 12, 12, A]
        poses, activations = primary(features)  # [n, 12, 12, B, 4, 4], [n, 12, 12, B]
        end_points = {"relu_conv1": features, "primary_caps": activations}
        for layer in conv_layers:
            poses, activations = layer(poses, activations)  # [n, OH, OW, T, 4, 4], [n, OH, OW, T]
            end_points[layer.name] = activations
        class_poses, class_activations = class_layer(poses, activations)  # [n, C, 4, 4], [n, C]
        end_points["class_caps"] = class_activations
        return class_activations, class_poses, end_points

    def loss(self, activations, labels, global_step):
        """Spread loss with the margin schedule, plus weight decay on every weight matrix/kernel."""
        hp = self.hparams
        margin = margin_schedule(global_step, hp)
        spread = spread_loss(activations, labels, margin)
        weights = [v for v in tf.trainable_variables() if "beta" not in v.op.name and "bias" not in v.op.name]
        decay = hp.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in weights])
        return Loss(spread + decay, spread, decay, margin)

    def train(self, images, labels):
        """Builds the training graph: inference, loss, Adam with exponential lr decay, summaries.

        Every gradient passes a finite check before any variable is updated: a non-finite loss or
        gradient fails the step with an error naming the tensor, and no variable changes.

        Returns:
          `TrainGraph`.
        """
        hp = self.hparams
        _check_run_length(hp, "lr_decay_steps")
        global_step = tf.train.get_or_create_global_step()
        inference = self.inference(images)
        loss = self.loss(inference.activations, labels, global_step)
        learning_rate = tf.train.exponential_decay(hp.learning_rate, global_step, hp.lr_decay_steps,
                                                   hp.lr_decay_rate)
        optimizer = tf.train.AdamOptimizer(learning_rate)
        grads_and_vars = optimizer.compute_gradients(loss.total)
        checks = [tf.debugging.check_numerics(loss.total, "loss")]
        checks += [tf.debugging.check_numerics(g, "gradient of %s" % v.op.name) for g, v in grads_and_vars]
        with tf.control_dependencies(checks):  # all checks pass before any update
            grads_and_vars = [(tf.identity(g), v) for g, v in grads_and_vars]
        train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(inference.predictions, labels), tf.float32))
        summary_op = self._summaries(loss, accuracy, learning_rate, inference.end_points)
        return TrainGraph(train_op, loss.total, accuracy, inference.predictions, loss.margin, learning_rate,
                          global_step, summary_op, inference)

    @staticmethod
    def _summaries(loss, accuracy, learning_rate, end_points):
        scalars = [
            tf.summary.scalar("loss/total", loss.total), tf.summary.scalar("loss/spread", loss.spread),
            tf.summary.scalar("loss/margin", loss.margin), tf.summary.scalar("accuracy/train_batch", accuracy),
            tf.summary.scalar("learning_rate", learning_rate),
        ]
        for name in ("primary_caps", "conv_caps1", "conv_caps2", "class_caps"):
            scalars.append(tf.summary.scalar("mean_activation/" + name, tf.reduce_mean(end_points[name])))
        histograms = [tf.summary.histogram(v.op.name, v) for v in tf.trainable_variables() if "beta" in v.op.name]
        return tf.summary.merge(scalars + histograms)


def count_parameters(variables):
    """Total number of scalars in `variables`."""
    return sum(int(math.prod(v.shape.as_list())) for v in variables)
