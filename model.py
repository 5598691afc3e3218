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
import math

import tensorflow.compat.v1 as tf

import capsule_layers as cl
from routing import diagnostics
from hparams import (  # noqa: F401 (re-exported: callers build a model from model.py alone)
    CENTRED_BETA_V,
    COORDINATE_FORMS,
    MARGIN_SCHEDULES,
    PAPER_LR_DECAY_STEPS,
    PRESETS,
    ROUTING_FORMS,
    WHOLE_RUN,
    HParams,
    batch_size_for,
    hparams_for,
    layer_kwargs,
    parse_bool,
)


# Spread-loss margin end points (paper section 4) and the official code's sigmoid ramp.
MARGIN_START = 0.2
MARGIN_END = 0.9
_SIGMOID_MARGIN_RANGE = 0.79  # official: 0.2 + 0.79 * sigmoid(...), tends to 0.99
_SIGMOID_ARG_START = -4.0  # official: sigmoid(step / 50000 - 4)
_SIGMOID_ARG_MAX = 10.0  # official: min(10, ...)
_SIGMOID_ARG_SPAN = 8.0  # ramp_steps = 400000 reproduces step / 50000: 400000 / 8 = 50000

Inference = collections.namedtuple("Inference", ["activations", "poses", "predictions", "end_points"])
# How a training graph is spread (runtime.py and cluster.py make them): `towers`, one device (a name or a device
# function) per tower, the batch split equally among them (empty: one graph, no device set); `wrap_optimizer`,
# a function of the Adam optimiser returning the one to use (SyncReplicasOptimizer for synchronous workers), or None.
Distribution = collections.namedtuple("Distribution", ["towers", "wrap_optimizer"])
SINGLE_DEVICE = Distribution((), None)
Loss = collections.namedtuple("Loss", ["total", "spread", "weight_decay", "margin"])
TrainGraph = collections.namedtuple(
    "TrainGraph",
    [
        "train_op",
        "loss",
        "accuracy",
        "predictions",
        "margin",
        "learning_rate",
        "global_step",
        "summary_op",
        "inference",
        "finite_checks",
        "grads_and_vars",
    ],
)


def _check_schedule_length(hparams, name):
    """ValueError when the schedule length `name` is still WHOLE_RUN, which the caller must set first."""
    if getattr(hparams, name) == WHOLE_RUN:
        raise ValueError(
            "%s is 0 (the whole run): set it to the run's length in steps before building the graph" % name
        )


def margin_schedule(step, hparams):
    """Spread-loss margin m at `step` (a tensor or a number).

    'sigmoid': 0.2 + 0.79 * sigmoid(min(10, 8 * step / ramp - 4)), the official code's schedule
    with its 50000 written as ramp / 8 (ramp = 400000 gives it exactly).
    'linear': 0.2 + (0.9 - 0.2) * min(1, step / ramp).
    'constant': 0.2 at every step (the CPU recipe's choice, docs/experiments.md; no ramp).
    """
    if hparams.margin_schedule != "constant":
        _check_schedule_length(hparams, "margin_ramp_steps")
    step = tf.cast(step, tf.float32)
    ramp = float(hparams.margin_ramp_steps)
    if hparams.margin_schedule == "sigmoid":
        arg = tf.minimum(_SIGMOID_ARG_MAX, _SIGMOID_ARG_SPAN * step / ramp + _SIGMOID_ARG_START)
        return MARGIN_START + _SIGMOID_MARGIN_RANGE * tf.sigmoid(arg)
    if hparams.margin_schedule == "linear":
        return MARGIN_START + (MARGIN_END - MARGIN_START) * tf.minimum(1.0, step / ramp)
    if hparams.margin_schedule == "constant":
        return tf.fill(tf.shape(step), MARGIN_START)  # the shape of step (a scalar in training)
    raise ValueError(
        "margin_schedule must be one of %s, got %r" % ("/".join(MARGIN_SCHEDULES), hparams.margin_schedule)
    )


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


class CapsNetEMModel:
    """The paper's network: relu_conv1 -> primary_caps -> conv_caps1 -> conv_caps2 -> class_caps.

    `micro_batches` > 1 builds the network once per micro-batch (shared variables, outputs
    concatenated in order, see `split_batch`): the same function of the batch, computed in
    independent parts that a CPU runs side by side on its inter-op threads, each small enough that
    routing's vote tensors can stay in cache (docs/performance.md: a gain only while the CPU's L3
    cache is free). Each image is routed on its own, so only float summation order changes.
    """

    def __init__(self, hparams, micro_batches=1):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1, got %r" % micro_batches)
        self.hparams = hparams.validate()
        self.micro_batches = micro_batches
        self.layers = self._layers()  # variables are made on the first call; later calls share them

    def inference(self, images):
        """Forward pass.

        Args:
          images: `[N, 28, 28, 1]` in [0, 1].

        Returns:
          `Inference`: class activations `[N, L]`, class poses `[N, L, 4, 4]`, predictions `[N]` and
          end_points (per-layer activations, concatenated over micro-batches, and the layers themselves).
          Every call builds another graph on the same variables (e.g. training and evaluation batches).
        """
        layers = self.layers
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

    def _coordinate_offsets(self):
        """The class layer's coordinate-addition offsets `[H, W, 16]` (None: the paper's, made by the layer)."""
        hp = self.hparams
        if hp.coordinate_addition == "paper":
            return None
        convolutions = [
            (hp.conv1_kernel, hp.conv1_stride, hp.padding),
            (hp.primary_kernel, 1, hp.padding),
            (hp.conv_caps1_kernel, hp.conv_caps1_stride, hp.padding),
            (hp.conv_caps2_kernel, hp.conv_caps2_stride, hp.padding),
        ]
        return cl.official_coordinate_offsets(cl.receptive_field_centres(hp.image_size, convolutions))

    def _layers(self):
        """The network's layers, in order; variables are made on their first call.

        Each layer gets `hparams.layer_kwargs` but its `kernel_regularizer`: `loss` adds the weight decay after the
        network, so the network's ops, and with them the seeded initial values of saved runs, stay as they were.
        """
        hp = self.hparams

        def recipe(layer):
            return {key: value for key, value in layer_kwargs(hp, layer).items() if key != "kernel_regularizer"}

        layers = [
            cl.ReluConv(hp.conv1_filters, hp.conv1_kernel, hp.conv1_stride, hp.padding, name="relu_conv1"),
            cl.PrimaryCaps(hp.primary_types, hp.primary_kernel, padding=hp.padding, name="primary_caps"),
        ]
        for name, types, kernel_size, stride in (
            ("conv_caps1", hp.conv_caps1_types, hp.conv_caps1_kernel, hp.conv_caps1_stride),
            ("conv_caps2", hp.conv_caps2_types, hp.conv_caps2_kernel, hp.conv_caps2_stride),
        ):
            layers.append(cl.ConvCaps(types, kernel_size, stride, hp.padding, name=name, **recipe(name)))
        offsets = self._coordinate_offsets()
        layers.append(
            cl.ClassCaps(hp.num_classes, coordinate_offsets=offsets, name="class_caps", **recipe("class_caps"))
        )
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
        weights = [w for layer in self.layers for w in layer.weights_to_decay]  # kernels and matrices
        decay = hp.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in weights])
        return Loss(spread + decay, spread, decay, margin)

    def train(self, images, labels, distribution=SINGLE_DEVICE):
        """Builds the training graph: inference, loss, Adam with exponential lr decay, summaries.

        Every gradient passes a finite check before any variable is updated: a non-finite loss or
        gradient fails the step with an error naming the tensor, and no variable changes. With towers
        (`distribution.towers`), each tower's gradients are computed on its device and averaged: the
        same update as one graph on the whole batch, as the towers' parts are equal.

        Returns:
          `TrainGraph`.
        """
        _check_schedule_length(self.hparams, "lr_decay_steps")  # before any variable is made
        global_step = tf.train.get_or_create_global_step()
        if distribution.towers:
            inference, losses = self._towers(images, labels, global_step, distribution.towers)
        else:
            inference = self.inference(images)
            losses = [self.loss(inference.activations, labels, global_step)]
        loss = Loss(*(mean_of([getattr(part, field) for part in losses]) for field in Loss._fields))
        step = checked_adam([part.total for part in losses], self.hparams, global_step, distribution.wrap_optimizer)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(inference.predictions, labels), tf.float32))
        summary_op = self._summaries(loss, accuracy, step.learning_rate, inference.end_points, step.grads_and_vars)
        return TrainGraph(
            step.train_op,
            loss.total,
            accuracy,
            inference.predictions,
            loss.margin,
            step.learning_rate,
            global_step,
            summary_op,
            inference,
            step.finite_checks,
            step.grads_and_vars,
        )

    def _towers(self, images, labels, global_step, towers):
        """The network and its loss once per tower, on the tower's device, on an equal part of the batch.

        Args:
          images: `[N, H, W, K]`, N divisible by the number of towers.
          labels: int `[N]`.
          towers: the towers' devices.

        Returns:
          (`Inference` of the whole batch, the parts' outputs concatenated in order, a `Loss` per tower).
        """
        parts = zip(towers, split_batch(images, len(towers)), split_batch(labels, len(towers)))
        inferences, losses = [], []
        for index, (device, part_images, part_labels) in enumerate(parts):
            with tf.device(device), tf.name_scope("tower_%d" % index):
                inferences.append(self.inference(part_images))  # [N / towers, ...] per output
                losses.append(self.loss(inferences[-1].activations, part_labels, global_step))
        end_points = {
            name: tf.concat([part.end_points[name] for part in inferences], axis=0)  # [N, ...]
            for name in inferences[0].end_points
            if name != "layers"
        }
        end_points["layers"] = list(self.layers)
        whole = [tf.concat(tensors, axis=0) for tensors in zip(*[part[:3] for part in inferences])]  # [N, ...]
        return Inference(*whole, end_points), losses

    def _summaries(self, loss, accuracy, learning_rate, end_points, grads_and_vars):
        """Loss, accuracy, learning rate, mean activations, betas, routing statistics and gradient norms."""
        scalars = [
            tf.summary.scalar("loss/total", loss.total),
            tf.summary.scalar("loss/spread", loss.spread),
            tf.summary.scalar("loss/margin", loss.margin),
            tf.summary.scalar("accuracy/train_batch", accuracy),
            tf.summary.scalar("learning_rate", learning_rate),
        ]
        for name in ("primary_caps", "conv_caps1", "conv_caps2", "class_caps"):
            scalars.append(tf.summary.scalar("mean_activation/" + name, tf.reduce_mean(end_points[name])))
        routed = [layer for layer in self.layers if isinstance(layer, cl.RoutedCapsuleLayer)]
        betas = [beta for layer in routed for beta in (layer.beta_v, layer.beta_a)]
        histograms = [tf.summary.histogram(beta.op.name, beta) for beta in betas]
        scalars += diagnostics.routing_summaries(self.layers)
        scalars += diagnostics.gradient_norm_summaries(grads_and_vars, self.layers)
        return tf.summary.merge(scalars + histograms)


# The optimiser's part of a training graph (checked_adam).
CheckedStep = collections.namedtuple("CheckedStep", ["train_op", "learning_rate", "grads_and_vars", "finite_checks"])


def mean_of(tensors):
    """The mean of equally shaped `tensors` (the tensor itself when there is one: nothing is added to the graph)."""
    return tensors[0] if len(tensors) == 1 else tf.add_n(tensors) / float(len(tensors))


def average_gradients(tower_grads_and_vars):
    """One (gradient, variable) list from one per tower (the same variables in the same order): the mean gradients."""
    averaged = []
    for pairs in zip(*tower_grads_and_vars):  # one variable's (gradient, variable) of every tower
        averaged.append((mean_of([gradient for gradient, _ in pairs]), pairs[0][1]))
    return averaged


def checked_adam(tower_losses, hparams, global_step, wrap_optimizer=None):
    """Adam with exponential learning-rate decay, every value checked finite before any update.

    Args:
      tower_losses: the scalar total loss of each tower (one: a single graph); their gradients are averaged,
        each tower's computed on its own device (colocated with its forward ops).
      hparams: `HParams` (learning rate and its decay).
      global_step: the step variable the update increments.
      wrap_optimizer: None, or a function of the Adam optimiser returning the one to apply the update with.

    A non-finite loss or gradient fails the step with an error naming the tensor (see `run_step`), and no
    variable changes. Returns `CheckedStep`; its finite_checks map each check op's name to what it checks.
    """
    _check_schedule_length(hparams, "lr_decay_steps")
    learning_rate = tf.train.exponential_decay(
        hparams.learning_rate, global_step, hparams.lr_decay_steps, hparams.lr_decay_rate
    )
    optimizer = tf.train.AdamOptimizer(learning_rate)
    if wrap_optimizer is not None:
        optimizer = wrap_optimizer(optimizer)
    colocate = len(tower_losses) > 1
    grads_and_vars = average_gradients(
        [optimizer.compute_gradients(loss, colocate_gradients_with_ops=colocate) for loss in tower_losses]
    )
    loss_total = mean_of(tower_losses)
    described = [(loss_total, "loss")] + [(g, "gradient of %s" % v.op.name) for g, v in grads_and_vars]
    checks = [tf.debugging.check_numerics(tensor, what) for tensor, what in described]
    with tf.control_dependencies(checks):  # all checks pass before any update
        grads_and_vars = [(tf.identity(g), v) for g, v in grads_and_vars]
    train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
    finite_checks = {check.op.name: what for check, (_, what) in zip(checks, described)}
    return CheckedStep(train_op, learning_rate, grads_and_vars, finite_checks)


class NonFiniteError(Exception):
    """A finite check of the training step failed: the loss or a gradient was NaN or Inf, no variable changed."""


def run_step(sess, graph, fetches, feed_dict=None):
    """`sess.run(fetches, feed_dict)`, with a failed finite check of the `TrainGraph` `graph` as a `NonFiniteError`.

    Its message names the tensor, e.g. 'gradient of conv_caps1/weights is NaN or Inf'.
    """
    try:
        return sess.run(fetches, feed_dict)
    except tf.errors.InvalidArgumentError as error:
        if error.op is None or error.op.name not in graph.finite_checks:
            raise
        raise NonFiniteError("%s is NaN or Inf" % graph.finite_checks[error.op.name]) from None


def count_parameters(variables):
    """Total number of scalars in `variables`."""
    return sum(int(math.prod(v.shape.as_list())) for v in variables)
