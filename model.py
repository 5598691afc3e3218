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

import tensorflow.compat.v1 as tf

import capsule_layers as cl
import diagnostics


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
    # Routing form (capsule_layers.RoutingForm): the paper's equations, or pieces of the authors' released code.
    routing: str = "paper"  # the form whose values ROUTING_FORMS applied: 'paper' or 'official'
    activation_form: str = "paper"  # 'paper' or 'official' activation logit
    mean_momentum: float = 0.0  # official 0.1: damped parent means
    conv_mass_epsilon: float = 0.0  # official 1e-7: added to every conv-capsule parent's mass
    class_mass_epsilon: float = 0.0  # official 1e-5: the same in the class layer
    normalise_over: str = "positions_and_types"  # conv E-step normaliser; official 'positions'
    coordinate_addition: str = "paper"  # 'paper' (cell centre in [0, 1], entries [0,3],[1,3]) or 'official'
    # Spread loss margin (paper section 4: m rises from 0.2 to 0.9 during training).
    margin_schedule: str = "sigmoid"  # 'sigmoid' (official code), 'linear' or 'constant'
    margin_ramp_steps: int = 400000  # 'sigmoid': 0.2 + 0.79 sigmoid(min(10, 8 step / ramp - 4)); 0: the whole run
    # Optimisation (official code: Adam, lr decay 0.96 every 20k steps, weight decay 2e-7).
    learning_rate: float = 3e-3
    lr_decay_rate: float = 0.96
    lr_decay_steps: int = 20000  # 0: lr decays by lr_decay_rate over the whole run
    weight_decay: float = 2e-7

    def parse(self, text):
        """A copy with 'name=value,name=value' applied, each value converted to its field's type.

        Raises:
          ValueError: naming the field, for an unknown name or a value of the wrong type.
        """
        types = {field.name: field.type for field in dataclasses.fields(self)}
        overrides = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = (part.strip() for part in item.partition("="))
            if name not in types:
                raise ValueError("unknown hyperparameter %r (see HParams in model.py)" % name)
            try:
                overrides[name] = (parse_bool if types[name] is bool else types[name])(value)
            except ValueError:
                raise ValueError("%s=%r is not a valid %s" % (name, value, types[name].__name__)) from None
        return dataclasses.replace(self, **overrides)

    def validate(self):
        """Returns self; ValueError naming the first field whose value is outside its domain."""
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError("%s must be one of %s, got %r" % (name, "/".join(choices), getattr(self, name)))
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ValueError("%s must be > 0, got %r" % (name, getattr(self, name)))
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError("%s must be >= 0, got %r" % (name, getattr(self, name)))
        if not 0 <= self.mean_momentum < 1:
            raise ValueError("mean_momentum must be in [0, 1), got %r" % self.mean_momentum)
        if self.standardise_costs and self.activation_form != "paper":
            raise ValueError("standardise_costs applies to activation_form=paper only")
        return self


BOOLEAN_WORDS = {"true": True, "false": False}


def parse_bool(value):
    """'True'/'False' (any case) -> bool; anything else is a ValueError (Python's bool('False') is True)."""
    if value.lower() not in BOOLEAN_WORDS:
        raise ValueError(value)
    return BOOLEAN_WORDS[value.lower()]


# A schedule length (lr_decay_steps, margin_ramp_steps) of 0 stands for the run's own length in steps,
# known only once the data and the run's end are: main.py fills it in before the graph is built.
WHOLE_RUN = 0

# beta_v that centres the cost at the variance floor: cost_h = beta_v + log(sigma_h) is 0 when sigma_h^2 is
# at the floor, near which the variances start (docs/experiments.md, "Training recipe"): -log(sqrt(5e-4)) = 3.8005,
# rounded to 3.8 as in every tuning run.
CENTRED_BETA_V = 3.8

PRESETS = {
    # The paper's MNIST network (310K parameters in the paper), with the official code's lambda, margin and
    # optimiser settings.
    "paper": HParams(),
    # The paper's small network of section 5 (68K parameters): A=64, B=8, C=D=16, with the CPU recipe that
    # the tuning runs of docs/experiments.md chose: centred costs, lambda 0.1, a constant margin of 0.2, and Adam at
    # 0.01 decayed to a tenth over the run.
    "small": HParams(conv1_filters=64, primary_types=8, conv_caps1_types=16, conv_caps2_types=16, iterations=2,
                     final_lambda=0.1, class_final_lambda=0.1, beta_v_init=CENTRED_BETA_V,
                     class_beta_v_init=CENTRED_BETA_V, margin_schedule="constant", learning_rate=0.01,
                     lr_decay_rate=0.1, lr_decay_steps=WHOLE_RUN),
}

# What `--routing official` sets (the authors' released code, google-research `capsule_em`): every piece of
# their routing, their initial values (b_a 0.5 conv / 1.0 class, b_v 0.5 / 2.0, W std 0.3 / 0.01) and their
# inverse temperature (final 0.01, the class layer's a quarter of it). Later flags and --hparams override.
ROUTING_FORMS = {
    "paper": {},
    "official": dict(
        activation_form="official", mean_momentum=cl.OFFICIAL_MEAN_MOMENTUM,
        conv_mass_epsilon=cl.OFFICIAL_CONV_MASS_EPSILON, class_mass_epsilon=cl.OFFICIAL_CLASS_MASS_EPSILON,
        normalise_over="positions", coordinate_addition="official", final_lambda=0.01, class_final_lambda=0.0025,
        beta_a_init=0.5, class_beta_a_init=1.0, beta_v_init=0.5, class_beta_v_init=2.0, weight_stddev=0.3,
        class_weight_stddev=0.01),
}

MARGIN_SCHEDULES = ("sigmoid", "linear", "constant")
COORDINATE_FORMS = ("paper", "official")

# The domain of each HParams field that has one (HParams.validate).
_CHOICES = {"padding": cl.VALID_PADDINGS, "routing": tuple(ROUTING_FORMS), "activation_form": cl.ACTIVATION_FORMS,
            "normalise_over": cl.NORMALISE_OVER, "coordinate_addition": COORDINATE_FORMS,
            "margin_schedule": MARGIN_SCHEDULES}
_POSITIVE = ("conv1_filters", "conv1_kernel", "conv1_stride", "primary_types", "primary_kernel", "conv_caps1_types",
             "conv_caps1_kernel", "conv_caps1_stride", "conv_caps2_types", "conv_caps2_kernel", "conv_caps2_stride",
             "num_classes", "image_size", "image_channels", "iterations", "final_lambda", "class_final_lambda",
             "weight_stddev", "class_weight_stddev", "learning_rate", "lr_decay_rate")
_NON_NEGATIVE = ("conv_mass_epsilon", "class_mass_epsilon", "margin_ramp_steps", "lr_decay_steps", "weight_decay")

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
                   "summary_op", "inference", "finite_checks"]
)


def hparams_for(preset, routing=None, **overrides):
    """The named preset, then the routing form's values (None: the preset's form), then `overrides`.

    `ValueError` for an unknown preset, routing form or field.
    """
    if preset not in PRESETS:
        raise ValueError("unknown preset %r (choose from %s)" % (preset, ", ".join(sorted(PRESETS))))
    if routing is not None and routing not in ROUTING_FORMS:
        raise ValueError("unknown routing %r (choose from %s)" % (routing, ", ".join(sorted(ROUTING_FORMS))))
    unknown = set(overrides) - {field.name for field in dataclasses.fields(HParams)}
    if unknown:
        raise ValueError("unknown hyperparameters: %s" % ", ".join(sorted(unknown)))
    hparams = PRESETS[preset]
    if routing is not None:
        hparams = dataclasses.replace(hparams, **dict(ROUTING_FORMS[routing], routing=routing))
    return dataclasses.replace(hparams, **overrides).validate()


def _check_schedule_length(hparams, name):
    """ValueError when the schedule length `name` is still WHOLE_RUN, which the caller must set first."""
    if getattr(hparams, name) == WHOLE_RUN:
        raise ValueError("%s is 0 (the whole run): set it to the run's length in steps before building the graph"
                         % name)


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
    raise ValueError("margin_schedule must be one of %s, got %r"
                     % ("/".join(MARGIN_SCHEDULES), hparams.margin_schedule))


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

    def _forms(self):
        """The `RoutingForm` of the conv-capsule layers and of the class layer."""
        hp = self.hparams
        conv = cl.RoutingForm(hp.activation_form, hp.mean_momentum, hp.conv_mass_epsilon, hp.normalise_over)
        return conv, dataclasses.replace(conv, mass_epsilon=hp.class_mass_epsilon)

    def _coordinate_offsets(self):
        """The class layer's coordinate-addition offsets `[H, W, 16]` (None: the paper's, made by the layer)."""
        hp = self.hparams
        if hp.coordinate_addition == "paper":
            return None
        convolutions = [(hp.conv1_kernel, hp.conv1_stride, hp.padding), (hp.primary_kernel, 1, hp.padding),
                        (hp.conv_caps1_kernel, hp.conv_caps1_stride, hp.padding),
                        (hp.conv_caps2_kernel, hp.conv_caps2_stride, hp.padding)]
        return cl.official_coordinate_offsets(cl.receptive_field_centres(hp.image_size, convolutions))

    def _layers(self):
        """The network's layers, in order; variables are made on their first call."""
        hp = self.hparams
        conv_init = lambda stddev: tf.random_normal_initializer(stddev=stddev)  # noqa: E731
        conv_form, class_form = self._forms()
        layers = [cl.ReluConv(hp.conv1_filters, hp.conv1_kernel, hp.conv1_stride, hp.padding, name="relu_conv1"),
                  cl.PrimaryCaps(hp.primary_types, hp.primary_kernel, padding=hp.padding)]
        for name, types, kernel_size, stride in (
            ("conv_caps1", hp.conv_caps1_types, hp.conv_caps1_kernel, hp.conv_caps1_stride),
            ("conv_caps2", hp.conv_caps2_types, hp.conv_caps2_kernel, hp.conv_caps2_stride),
        ):
            layers.append(cl.ConvCaps(
                types, kernel_size, stride, hp.padding, hp.iterations, hp.final_lambda,
                weights_initializer=conv_init(hp.weight_stddev),
                beta_v_initializer=tf.constant_initializer(hp.beta_v_init),
                beta_a_initializer=tf.constant_initializer(hp.beta_a_init), beta_a_scale=hp.beta_a_scale,
                standardise_costs=hp.standardise_costs, form=conv_form, name=name,
            ))
        layers.append(cl.ClassCaps(
            hp.num_classes, hp.iterations, hp.class_final_lambda, coordinate_addition=True,
            weights_initializer=conv_init(hp.class_weight_stddev),
            beta_v_initializer=tf.constant_initializer(hp.class_beta_v_init),
            beta_a_initializer=tf.constant_initializer(hp.class_beta_a_init), beta_a_scale=hp.beta_a_scale,
            standardise_costs=hp.standardise_costs, form=class_form, coordinate_offsets=self._coordinate_offsets(),
            name="class_caps",
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
        weights = [w for layer in self.layers for w in layer.weights_to_decay]  # kernels and matrices
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
        _check_schedule_length(hp, "lr_decay_steps")
        global_step = tf.train.get_or_create_global_step()
        inference = self.inference(images)
        loss = self.loss(inference.activations, labels, global_step)
        learning_rate = tf.train.exponential_decay(hp.learning_rate, global_step, hp.lr_decay_steps,
                                                   hp.lr_decay_rate)
        optimizer = tf.train.AdamOptimizer(learning_rate)
        grads_and_vars = optimizer.compute_gradients(loss.total)
        described = [(loss.total, "loss")] + [(g, "gradient of %s" % v.op.name) for g, v in grads_and_vars]
        checks = [tf.debugging.check_numerics(tensor, what) for tensor, what in described]
        with tf.control_dependencies(checks):  # all checks pass before any update
            grads_and_vars = [(tf.identity(g), v) for g, v in grads_and_vars]
        train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(inference.predictions, labels), tf.float32))
        summary_op = self._summaries(loss, accuracy, learning_rate, inference.end_points, grads_and_vars)
        return TrainGraph(train_op, loss.total, accuracy, inference.predictions, loss.margin, learning_rate,
                          global_step, summary_op, inference,
                          {check.op.name: what for check, (_, what) in zip(checks, described)})

    def _summaries(self, loss, accuracy, learning_rate, end_points, grads_and_vars):
        """Loss, accuracy, learning rate, mean activations, betas, routing statistics and gradient norms."""
        scalars = [
            tf.summary.scalar("loss/total", loss.total), tf.summary.scalar("loss/spread", loss.spread),
            tf.summary.scalar("loss/margin", loss.margin), tf.summary.scalar("accuracy/train_batch", accuracy),
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
