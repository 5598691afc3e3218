"""Hyperparameters of a run: `HParams`, the presets, the routing forms, parsing and validation.

Every architecture, routing and optimisation setting lives in one frozen `HParams`; a run's are resolved
once (preset, routing form, dataset sizes, flags, --hparams), validated here and saved in its flags.json.
The network (model.py) is built from them alone. No flags are read here.
"""

import dataclasses

import tensorflow.compat.v1 as tf

import capsule_layers
import capsule_ops
from routing import em_routing
from routing import receptive_field


@dataclasses.dataclass(frozen=True)
class HParams:
    """Every architecture, routing and optimisation setting of a run."""

    model: str = "capsules"  # 'capsules' (the paper's network) or 'cnn' (its baseline CNN, section 5; cnn.py)
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
    # The baseline CNN (paper section 5): 5x5 convolutions of 32 and 64 channels, 1024 hidden units, dropout.
    cnn_conv1_filters: int = 32
    cnn_conv2_filters: int = 64
    cnn_kernel: int = 5
    cnn_hidden: int = 1024
    cnn_dropout: float = 0.5  # the paper says dropout, not its rate
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
    routing: str = "paper"  # the form whose values ROUTING_FORMS applied: 'paper', 'official', 'official-activation'
    activation_form: str = "paper"  # 'paper' or 'official' activation logit
    mean_momentum: float = 0.0  # official 0.1: damped parent means
    conv_mass_epsilon: float = 0.0  # official 1e-7: added to every conv-capsule parent's mass
    class_mass_epsilon: float = 0.0  # official 1e-5: the same in the class layer
    normalise_over: str = "positions_and_types"  # conv E-step normaliser; official 'positions'
    assignment_gradient: bool = True  # False: no gradient through the E-steps' assignments (a variant)
    cost_scale: float = 0.0  # IBM's fix (a variant): logit mass x cost_scale O / children; 0: off, IBM: 100
    coordinate_addition: str = "paper"  # 'paper' (cell centre in [0, 1], entries [0,3],[1,3]) or 'official'
    # How routing contracts the votes (capsule_ops): 'fused' C++ kernels, 'tf' ops, or 'auto' (fused when it builds).
    routing_kernel: str = "auto"
    # Spread loss margin (paper section 4: m rises from 0.2 to 0.9 during training).
    margin_schedule: str = "sigmoid"  # 'sigmoid' (official code), 'linear' or 'constant'
    margin_ramp_steps: int = 400000  # 'sigmoid': 0.2 + 0.79 sigmoid(min(10, 8 step / ramp - 4)); 0: the whole run
    # Optimisation (official code: Adam, lr decay 0.96 every 20k steps, weight decay 2e-7).
    learning_rate: float = 3e-3
    lr_decay_rate: float = 0.96
    lr_decay_steps: int = 20000  # 0: lr decays by lr_decay_rate over the whole run
    lr_decay_epochs: float = 0.0  # > 0: lr_decay_steps is this many epochs of the run's data (main.py sets it)
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
                raise ValueError("unknown hyperparameter %r (see HParams in hparams.py)" % name)
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
        for name in ("mean_momentum", "cnn_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError("%s must be in [0, 1), got %r" % (name, getattr(self, name)))
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

# The released code's routing pieces (the authors' google-research `capsule_em`), without its activation logit:
# damped centres, mass epsilons, the per-type E-step normaliser, their coordinate addition and W std 0.3 / 0.01.
OFFICIAL_PIECES = dict(
    mean_momentum=em_routing.OFFICIAL_MEAN_MOMENTUM,
    conv_mass_epsilon=em_routing.OFFICIAL_CONV_MASS_EPSILON,
    class_mass_epsilon=em_routing.OFFICIAL_CLASS_MASS_EPSILON,
    normalise_over="positions",
    coordinate_addition="official",
    weight_stddev=0.3,
    class_weight_stddev=0.01,
)
# The paper's activation logit lambda (beta_a - cost) with its defaults: beta 0, final lambda 0.01 in every layer.
PAPER_ACTIVATION = dict(
    activation_form="paper",
    beta_v_init=0.0,
    beta_a_init=0.0,
    class_beta_v_init=0.0,
    class_beta_a_init=0.0,
    final_lambda=0.01,
    class_final_lambda=0.01,
)

# What `--routing FORM` sets. 'paper': the paper's equations (its structural pieces; a preset's lambda, beta and
# W std stay). 'official': every piece of the released code, its initial values (b_a 0.5 conv / 1.0 class, b_v
# 0.5 / 2.0) and its inverse temperature (final 0.01, the class layer's a quarter of it). 'official-activation':
# the released code's pieces with the paper's activation logit, the form with which three iterations learn
# (docs/experiments.md, ninth round). Later flags and --hparams override.
ROUTING_FORMS = {
    "paper": dict(
        activation_form="paper",
        mean_momentum=0.0,
        conv_mass_epsilon=0.0,
        class_mass_epsilon=0.0,
        normalise_over="positions_and_types",
        coordinate_addition="paper",
    ),
    "official": dict(
        OFFICIAL_PIECES,
        activation_form="official",
        final_lambda=0.01,
        class_final_lambda=0.0025,
        beta_a_init=0.5,
        class_beta_a_init=1.0,
        beta_v_init=0.5,
        class_beta_v_init=2.0,
    ),
    "official-activation": dict(OFFICIAL_PIECES, **PAPER_ACTIVATION),
}

# The best trial of a 16-trial Optuna study of the three-iteration `small` net in the form 'official-activation'
# (search.py, 600 steps a trial; values as sampled), with the `small` preset's schedule: Adam decayed to a tenth
# over the run and a constant margin of 0.2 (docs/experiments.md, tenth round).
SEARCHED_THREE_ITERATIONS = dict(
    learning_rate=0.009983403368615425,
    lr_decay_rate=0.1,
    lr_decay_steps=WHOLE_RUN,
    margin_schedule="constant",
    final_lambda=0.09125946388242702,
    class_final_lambda=0.004567049719690861,
    beta_a_init=0.2907782752359498,
    beta_v_init=2.1100943634835785,
    class_beta_v_init=0.26231104233182423,
    weight_stddev=0.487134551414604,
    class_weight_stddev=0.08052043008024132,
)

# Two epochs of MNIST's 55,000 training images at the paper network's batch of 32 (2 x 1,719 = 3,438 steps), as the
# fourteenth round ran them: --max_steps 3440, twice the 1,720 steps of its 2-epoch runs at batch 64.
PAPER_LR_DECAY_STEPS = 3440
# The same interval in epochs, so that the preset means the same schedule on every dataset and batch size: 3,440
# steps of 32 of MNIST's 55,000 training images = 2.0015 epochs. main.py turns it back into steps from the run's
# own data (runtime.with_run_length): MNIST at batch 32 gets exactly 3,440 again, smallNORB's 24,300 images 1,520.
_MNIST_TRAINING_IMAGES = 55000  # 60,000 less the 5,000 that --validation_size holds out
_FOURTEENTH_ROUND_BATCH = 32
PAPER_LR_DECAY_EPOCHS = PAPER_LR_DECAY_STEPS * _FOURTEENTH_ROUND_BATCH / _MNIST_TRAINING_IMAGES

PRESETS = {
    # The paper's MNIST network (310K parameters in the paper), 3 iterations, routing 'official-activation' with
    # the recipe searched for three iterations (docs/experiments.md, tenth round).
    # Adam's rate falls to a tenth every PAPER_LR_DECAY_EPOCHS (on MNIST at batch 32: every PAPER_LR_DECAY_STEPS,
    # the steps it keeps where the data is not known): a run of any length follows the 2-epoch run at batch 32 that
    # tested at 98.50% for its first 2 epochs (docs/experiments.md, fourteenth round). Decayed over the whole
    # 10-epoch run instead, it tested at 96.70% after 2 epochs (fifteenth round).
    "paper": HParams(
        routing="official-activation",
        **{
            **ROUTING_FORMS["official-activation"],
            **SEARCHED_THREE_ITERATIONS,
            "lr_decay_steps": PAPER_LR_DECAY_STEPS,
            "lr_decay_epochs": PAPER_LR_DECAY_EPOCHS,
        },
    ),
    # The paper's small network of section 5 (68K parameters): A=64, B=8, C=D=16, with the CPU recipe that
    # the tuning runs of docs/experiments.md chose: centred costs, lambda 0.1, a constant margin of 0.2, and Adam at
    # 0.01 decayed to a tenth over the run.
    "small": HParams(
        conv1_filters=64,
        primary_types=8,
        conv_caps1_types=16,
        conv_caps2_types=16,
        iterations=2,
        final_lambda=0.1,
        class_final_lambda=0.1,
        beta_v_init=CENTRED_BETA_V,
        class_beta_v_init=CENTRED_BETA_V,
        margin_schedule="constant",
        learning_rate=0.01,
        lr_decay_rate=0.1,
        lr_decay_steps=WHOLE_RUN,
    ),
}

# Images per training step when --batch_size is not given. The paper network trains at 32: after 2 epochs it
# tested at 98.50% / 98.56% (seeds 1 / 2) against 98.41% / 98.34% at 64 (docs/experiments.md, fourteenth round).
# The small nets keep 64, where they run about 15% more images/s than at 32 (docs/experiments.md).
DEFAULT_BATCH_SIZE = 64
PRESET_BATCH_SIZES = {"paper": 32}


def batch_size_for(preset):
    """The preset's default images per training step (DEFAULT_BATCH_SIZE unless PRESET_BATCH_SIZES names it)."""
    return PRESET_BATCH_SIZES.get(preset, DEFAULT_BATCH_SIZE)


# The best trial of a 24-trial Optuna study of the `small` net on MNIST (search.py, 600 steps a trial; its
# best.json, values as sampled): trained at the 20-minute budget (3,900 steps at batch 32, seed 1) it reached
# 98.39% test against the `small` recipe's 97.63% (docs/experiments.md, eighth round). Paper routing, 2 iterations,
# a margin rising linearly from 0.2 to 0.9 over the run.
PRESETS["small_search"] = dataclasses.replace(
    PRESETS["small"],
    learning_rate=0.019441756308695882,
    margin_schedule="linear",
    margin_ramp_steps=WHOLE_RUN,
    final_lambda=0.05318933347426271,
    class_final_lambda=0.010852580947546426,
    beta_a_init=-0.7086217529095002,
    beta_v_init=2.7754061452565413,
    class_beta_v_init=2.14169797100932,
    weight_stddev=0.10238723201637555,
    class_weight_stddev=0.8082506698975706,
)

MARGIN_SCHEDULES = ("sigmoid", "linear", "constant")
COORDINATE_FORMS = ("paper", "official")

# The domain of each HParams field that has one (HParams.validate).
MODELS = ("capsules", "cnn")
_CHOICES = {
    "model": MODELS,
    "padding": receptive_field.VALID_PADDINGS,
    "routing": tuple(ROUTING_FORMS),
    "activation_form": em_routing.ACTIVATION_FORMS,
    "normalise_over": em_routing.NORMALISE_OVER,
    "coordinate_addition": COORDINATE_FORMS,
    "margin_schedule": MARGIN_SCHEDULES,
    "routing_kernel": capsule_ops.KERNELS,
}
_POSITIVE = (
    "conv1_filters",
    "conv1_kernel",
    "conv1_stride",
    "primary_types",
    "primary_kernel",
    "conv_caps1_types",
    "conv_caps1_kernel",
    "conv_caps1_stride",
    "conv_caps2_types",
    "conv_caps2_kernel",
    "conv_caps2_stride",
    "num_classes",
    "image_size",
    "image_channels",
    "iterations",
    "final_lambda",
    "class_final_lambda",
    "weight_stddev",
    "class_weight_stddev",
    "learning_rate",
    "lr_decay_rate",
    "cnn_conv1_filters",
    "cnn_conv2_filters",
    "cnn_kernel",
    "cnn_hidden",
)
_NON_NEGATIVE = (
    "conv_mass_epsilon",
    "class_mass_epsilon",
    "cost_scale",
    "margin_ramp_steps",
    "lr_decay_steps",
    "lr_decay_epochs",
    "weight_decay",
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


# The layers' kinds that `layer_kwargs` knows, and the paper network's layer names for each.
LAYER_KINDS = {
    "relu_conv": "relu_conv",
    "relu_conv1": "relu_conv",
    "primary_caps": "primary_caps",
    "conv_caps": "conv_caps",
    "conv_caps1": "conv_caps",
    "conv_caps2": "conv_caps",
    "class_caps": "class_caps",
}


def routing_forms(hp):
    """The `RoutingForm` of the conv-capsule layers and of the class layer (they differ in the mass epsilon)."""
    conv = em_routing.RoutingForm(
        hp.activation_form,
        hp.mean_momentum,
        hp.conv_mass_epsilon,
        hp.normalise_over,
        hp.assignment_gradient,
        hp.cost_scale,
    )
    return conv, dataclasses.replace(conv, mass_epsilon=hp.class_mass_epsilon)


def layer_kwargs(hp, layer):
    """The keyword arguments with which `hp`'s network builds a layer of kind `layer`: its recipe, not its sizes.

    Every layer gets the weight decay as `kernel_regularizer` (`capsule_layers.l2_regularizer(hp.weight_decay)`);
    the routed layers also get iterations, final lambda, initialisers, beta_a scale, standardised costs, routing
    form and kernel. Sizes (types, kernel, stride, padding), the name, and a class layer's `coordinate_offsets`
    (for `coordinate_addition='official'`: `official_coordinate_offsets` of the network's own receptive fields)
    are the caller's. E.g. `capsule_layers.conv_caps(poses, activations, 16, 3, 2, 'SAME', **layer_kwargs(hp,
    'conv_caps'))`.

    Args:
      hp: `HParams` (e.g. `hparams_for('paper')`).
      layer: 'relu_conv', 'primary_caps', 'conv_caps' or 'class_caps' (or the paper's 'relu_conv1',
        'conv_caps1', 'conv_caps2').

    Returns:
      a dict of keyword arguments of that layer's class (and functional form).
    """
    if layer not in LAYER_KINDS:
        raise ValueError("layer_kwargs: layer must be one of %s, got %r" % (", ".join(LAYER_KINDS), layer))
    kind = LAYER_KINDS[layer]
    kwargs = dict(kernel_regularizer=capsule_layers.l2_regularizer(hp.weight_decay))
    if kind in ("relu_conv", "primary_caps"):
        return kwargs
    prefix = "class_" if kind == "class_caps" else ""  # the class layer's own lambda, initial values and form
    value = lambda name: getattr(hp, prefix + name)  # noqa: E731
    return dict(
        kwargs,
        iterations=hp.iterations,
        final_lambda=value("final_lambda"),
        weights_initializer=tf.random_normal_initializer(stddev=value("weight_stddev")),
        beta_v_initializer=tf.constant_initializer(value("beta_v_init")),
        beta_a_initializer=tf.constant_initializer(value("beta_a_init")),
        beta_a_scale=hp.beta_a_scale,
        standardise_costs=hp.standardise_costs,
        form=routing_forms(hp)[1 if prefix else 0],
        routing_kernel=hp.routing_kernel,
    )
