"""EM routing (paper section 2.1, Procedure 1) of *Matrix Capsules with EM Routing*.

Hinton, Sabour, Frosst, ICLR 2018 (https://openreview.net/forum?id=HJWLfGWRb). The M-step fits a
Gaussian to each parent's weighted votes and sets its activation; the E-step reassigns each child's vote
to the parents in proportion to a_j N(V_ij; mu_j, sigma_j^2). `RoutingForm` selects the paper's equations
or pieces of the authors' released code (google-research `capsule_em`). Imports only tensorflow, capsule_ops and
vote_contractions (the votes' contractions and their gradient).

Layout. Votes are parent-major, `[NP, O, children, 16]`: NP parent positions (N * P of a conv layer, or
N for the class layer), O parent types, children = K*K*I patch entries ordered (kh, kw, i) (the channel
order of `tf.image.extract_patches`), 16 = the flattened 4x4 pose. The M-step sums (sum_i r V, then
sum_i r (V - c)^2 about their mean c) are batched matmuls, so is the E-step's Mahalanobis term (V - mu)^2: both
centred, float32-safe for large votes and sigma^2 at its floor.
The routing's gradient with respect to the votes is assembled by hand (`VoteContractions`): one batched
matmul instead of one vote-sized gradient per use of the votes. With `kernel='fused'` the same
contractions run as the fused C++ kernels of `capsule_ops`, which recompute the votes from their factors.
"""

import collections
import dataclasses
import math

import tensorflow.compat.v1 as tf

import capsule_ops
from routing.vote_contractions import FusedVoteContractions, VoteContractions

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

# The authors' released code (google-research `capsule_em`), where it differs from the paper's equations.
OFFICIAL_BETA_A_SCALE = 5000.0  # their logit subtracts 5000 * b_a: Adam moves beta_a 5000x faster
OFFICIAL_MEAN_MOMENTUM = 0.1  # their centre: mu <- 0.9 * (sum r V / mass) + 0.1 * mu_previous, from mu = 0
OFFICIAL_CONV_MASS_EPSILON = 1e-7  # their conv layers add 1e-7 to every parent's mass
OFFICIAL_CLASS_MASS_EPSILON = 1e-5  # their class layer adds 1e-5
IBM_COST_SCALE = 100.0  # IBM (Gritzman, 2019): the cost's mass times 100 / (children per parent type)

ACTIVATION_FORMS = ("paper", "official")
NORMALISE_OVER = ("positions_and_types", "positions")
ROUTING_KERNELS = ("tf", "fused")  # em_routing's `kernel`: TensorFlow ops or capsule_ops' fused kernels


@dataclasses.dataclass(frozen=True)
class RoutingForm:
    """Which equations EM routing uses: the paper's (the defaults) or pieces of the authors' released code.

    Each piece can be switched on its own (ablations):
      activation: 'paper' -- a_j = sigmoid(lambda (beta_a - sum_h cost_h)), cost_h = (beta_v + ln sigma_h) mass_j
        (section 2.1); 'official' -- a_j = sigmoid(lambda (mass_j (-sum_h ln sigma_h^2 - 16 b_v (ln 2pi + 1))
        - 5000 b_a)). The same family (lambda_paper = 2 lambda, beta_a = -2500 b_a, beta_v = b_v (ln 2pi + 1) / 2),
        but the x5000 and x16 (ln 2pi + 1) act as per-parameter learning-rate multipliers under Adam.
      mean_momentum: m in mu <- (1 - m) (sum_i r_i V_i / mass) + m mu_previous, mu starting at 0; sigma^2 is then
        measured around the damped mu. 0: the paper; OFFICIAL_MEAN_MOMENTUM: the released code.
      mass_epsilon: added to every parent's mass sum_i r_i (the released code: 1e-7 conv, 1e-5 class).
      normalise_over: the E-step's normaliser in a convolutional layer. 'positions_and_types' (the paper): each
        child sums to 1 over every parent that sees it; 'positions' (the released code): separately for every
        parent type, over the positions whose receptive field holds the child -- types do not compete, and R
        starts at 1/O as in their code. The class layer always normalises over the classes.
      assignment_gradient: False treats every E-step's R as a constant in the backward pass (a stop-gradient),
        so gradients reach the votes only through the M-steps' sums; True (the paper, the released code)
        differentiates through every E-step.
      cost_scale: s > 0 multiplies the mass in the activation logit by s O / children (O parent types, children
        per parent position): IBM's (Gritzman, 2019) 'layer_norm_factor', s = IBM_COST_SCALE, which puts a
        conv layer and the class layer, whose parents see very different numbers of children, on one scale of
        lambda and beta. 0 (the paper, the released code): the mass as it is.
    """

    activation: str = "paper"
    mean_momentum: float = 0.0
    mass_epsilon: float = 0.0
    normalise_over: str = "positions_and_types"
    assignment_gradient: bool = True
    cost_scale: float = 0.0

    def __post_init__(self):
        if self.activation not in ACTIVATION_FORMS:
            raise ValueError("activation must be one of %s, got %r" % (ACTIVATION_FORMS, self.activation))
        if not 0.0 <= self.mean_momentum < 1.0:
            raise ValueError("mean_momentum must be in [0, 1), got %r" % self.mean_momentum)
        if self.mass_epsilon < 0.0:
            raise ValueError("mass_epsilon must be >= 0, got %r" % self.mass_epsilon)
        if self.normalise_over not in NORMALISE_OVER:
            raise ValueError("normalise_over must be one of %s, got %r" % (NORMALISE_OVER, self.normalise_over))
        if self.cost_scale < 0.0:
            raise ValueError("cost_scale must be >= 0, got %r" % self.cost_scale)


PAPER_FORM = RoutingForm()  # the paper's equations


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


def _activation_logits(mass, variance, beta_v, beta_a, inverse_temperature, standardise_costs, form):
    """The M-step's activation logit of every parent: `[NP, O]`.

    Args:
      mass: sum_i r_ij (+ the form's epsilon), `[NP, O, 1]`, as the logit sees it (see `_logit_mass`).
      variance: sigma^2, `[NP, O, 16]`.
      beta_v, beta_a: `[O]`.
      inverse_temperature: lambda, a float.
      standardise_costs: paper form only: the costs of the O parent types at one position are first
        standardised to mean 0 and variance 1 -- lambda (beta_a + (mean - cost) / std) -- which keeps the
        logit's scale independent of how many children a parent has (not in the paper; the gyang274 and
        IBM (Gritzman, 2019) TensorFlow implementations do this).
      form: `RoutingForm`; see its `activation`.
    """
    if form.activation == "official":
        # lambda (mass (-sum_h ln sigma_h^2 - 16 b_v (ln 2pi + 1)) - 5000 b_a), the released code's logit
        fit = -tf.reduce_sum(tf.log(variance), axis=-1) - POSE_ENTRIES * (_LOG_2PI + 1.0) * beta_v  # [NP, O]
        return inverse_temperature * (mass[..., 0] * fit - OFFICIAL_BETA_A_SCALE * beta_a)
    # cost_h = (beta_v + log sigma_h) * sum_i r_ij  (paper eq. 2; log sigma = log(sigma^2) / 2)
    cost = tf.reduce_sum((beta_v[:, None] + 0.5 * tf.log(variance)) * mass, axis=-1)  # [NP, O]
    if not standardise_costs:
        return inverse_temperature * (beta_a - cost)
    mean = tf.reduce_mean(cost, axis=1, keepdims=True)  # [NP, 1]
    variance = tf.reduce_mean(tf.square(cost - mean), axis=1, keepdims=True)  # [NP, 1]
    return inverse_temperature * (beta_a + (mean - cost) * tf.rsqrt(variance + _COST_VARIANCE_EPSILON))


def _logit_mass(mass, children, parent_types, form):
    """The mass as the activation logit sees it: `[NP, O, 1]`; times cost_scale O / children when the form
    scales costs (`RoutingForm.cost_scale`), for `children` per parent position and O = `parent_types`."""
    if not form.cost_scale:
        return mass
    return mass * (form.cost_scale * parent_types / children)


# One M-step's result for every parent: mean and variance `[NP, O, 16]`, activations and their logs `[NP, O]`,
# mass sum_i r_ij `[NP, O, 1]`, and the assignments R it used (broadcastable to `[NP, O, children]`).
Parents = collections.namedtuple(
    "Parents", ["mean", "variance", "activations", "log_activations", "mass", "assignments"]
)


def _m_step(
    assignments,
    child_activations,
    contractions,
    previous_mean,
    beta_v,
    beta_a,
    inverse_temperature,
    standardise_costs,
    form,
):
    """M-step: every parent's Gaussian from its weighted votes, then its activation.

    sigma^2 = sum_i r_i (V_i - mu)^2 / mass, from the centred squares about the weighted mean c:
    sum_i r_i (V_i - mu)^2 = sum_i r_i (V_i - c)^2 + sum_i r_i (c - mu)^2 (the cross term vanishes), never
    the one-pass E[V^2] - mu^2, which float32 loses to cancellation when |V| >> sigma.

    Args:
      assignments: R, broadcastable to `[NP, O, children]`.
      child_activations: a_i, `[NP, 1, children]`.
      contractions: the `VoteContractions` of the votes.
      previous_mean: mu of the previous iteration `[NP, O, 16]` (zeros before the first), or None when the
        form has no momentum.
      beta_v, beta_a: `[O]`.
      inverse_temperature: lambda, a float.
      standardise_costs: see `_activation_logits`.
      form: `RoutingForm`.

    Returns:
      `Parents`.
    """
    with tf.name_scope("m_step"):
        weighted_assignments = assignments * child_activations  # [NP, O or 1, children], r_ij = R_ij a_i
        # c = sum r V / (sum r + eps) and sum r (V - c)^2 `[NP, O, 16]` each, sum_i r_ij `[NP, O or 1, 1]`
        centre, centred_squares, raw_mass = contractions.centred_sums(weighted_assignments, _SAFE_DIVIDE_EPSILON)
        if form.mass_epsilon:  # mass >= epsilon > 0: a plain divide, as the released code does
            mass = raw_mass + form.mass_epsilon  # [NP, O, 1]
            vote_mean, divisor = centre * ((raw_mass + _SAFE_DIVIDE_EPSILON) / mass), mass  # sum r V / mass
        else:
            mass = raw_mass
            vote_mean, divisor = centre, raw_mass + _SAFE_DIVIDE_EPSILON
        momentum = form.mean_momentum
        mean = (1.0 - momentum) * vote_mean + momentum * previous_mean if momentum else vote_mean  # [NP, O, 16]
        if momentum or form.mass_epsilon:  # mu is not c: add sum_i r_i (c - mu)^2
            centred_squares += raw_mass * tf.square(centre - mean)  # [NP, O, 16]
        variance = centred_squares / divisor + _VARIANCE_FLOOR  # [NP, O, 16]
        logit_mass = _logit_mass(mass, int(child_activations.shape[-1]), int(beta_v.shape[0]), form)  # [NP, O, 1]
        logits = _activation_logits(
            logit_mass, variance, beta_v, beta_a, inverse_temperature, standardise_costs, form
        )  # [NP, O]
        return Parents(mean, variance, tf.sigmoid(logits), tf.log_sigmoid(logits), mass, assignments)


def _e_step(contractions, parents, normalise, form):
    """E-step: R_ij = a_j p_ij / (the child's sum of it over its parents), from log(a_j p_ij).

    log(a_j p_ij) = -sum_h (V_h - mu_h)^2 / (2 sigma_h^2) + log a_j - sum_h log(2 pi sigma_h^2) / 2: one
    quadratic form per child centred on mu (not expanded into V^2 / (2 sigma^2) - V mu / sigma^2 + ..., whose
    terms cancel to float32's loss when |V| >> sigma).

    Args:
      contractions: the `VoteContractions` of the votes `[NP, O, children, 16]`.
      parents: the M-step's `Parents` (mean, variance `[NP, O, 16]`, log_activations `[NP, O]`).
      normalise: maps the log numerators `[NP, O, children]` to R `[NP, O, children]`.
      form: `RoutingForm`; without its assignment_gradient no gradient flows through R.

    Returns:
      R, `[NP, O, children]`.
    """
    with tf.name_scope("e_step"):
        mean, variance = parents.mean, parents.variance
        parent_part = tf.reduce_sum(0.5 * (tf.log(variance) + _LOG_2PI), -1)  # [NP, O]
        # -sum_h (V - mu)^2 / (2 sigma^2) + (log a_j - parent part), `[NP, O, children]`
        log_numerators = contractions.quadratic_forms(
            None, -0.5 / variance, parents.log_activations - parent_part, mean
        )
        assignments = normalise(log_numerators)
        return assignments if form.assignment_gradient else tf.stop_gradient(assignments)


def _iterate(contractions, routed_inputs, inverse_temps, normalise, standardise_costs, form):
    """Procedure 1's loop: an M-step in every iteration, an E-step between two M-steps.

    Args: as `em_routing`'s; routed_inputs: (child_activations, initial_assignments, beta_v, beta_a).

    Returns:
      the R the last M-step used (broadcastable to `[NP, O, children]`) and one `Parents` per iteration.
    """
    child_activations, initial_assignments, beta_v, beta_a = routed_inputs
    assignments = initial_assignments
    previous_mean = contractions.parent_zeros() if form.mean_momentum else None  # [NP, O, 16]
    per_iteration = []
    for iteration, inverse_temperature in enumerate(inverse_temps):
        with tf.name_scope("iteration_%d" % iteration):
            m_step_inputs = (assignments, child_activations, contractions, previous_mean, beta_v, beta_a)
            parents = _m_step(*m_step_inputs, inverse_temperature, standardise_costs, form)
            per_iteration.append(parents)
            previous_mean = parents.mean if form.mean_momentum else None
            if iteration < len(inverse_temps) - 1:
                assignments = _e_step(contractions, parents, normalise, form)
    return assignments, per_iteration


# What EM routing returns: the last M-step's means (the parent poses) `[NP, O, 16]` and activations `[NP, O]`,
# the assignments R it used (broadcastable to `[NP, O, children]`), one `Parents` per iteration, the votes
# `[NP, O, children, 16]` (for diagnostics, without gradient; given as factors, they are made only when fetched:
# the routing itself never stores them) and their shape `[4]` (known without making them).
Routing = collections.namedtuple(
    "Routing", ["poses", "activations", "assignments", "per_iteration", "votes", "votes_shape"]
)


def _votes_and_shape(votes):
    """(votes `[NP, O, children, 16]` without gradient, their shape `[4]`) of votes or their `VoteFactors`."""
    if not isinstance(votes, capsule_ops.VoteFactors):
        return tf.stop_gradient(votes), tf.shape(votes)
    poses, weights = (tf.stop_gradient(x) for x in votes)
    shape = tf.stack([tf.shape(poses)[0], tf.shape(weights)[0], tf.shape(poses)[1], POSE_ENTRIES])
    return capsule_ops.votes(poses, weights), shape  # an op of its own: run only when a fetch needs it


def em_routing(
    votes,
    child_activations,
    initial_assignments,
    beta_v,
    beta_a,
    inverse_temps,
    normalise,
    standardise_costs=False,
    form=PAPER_FORM,
    kernel="tf",
):
    """EM routing (paper Procedure 1) in the parent-major layout.

    The votes gradient is assembled by `VoteContractions` (one batched matmul), the gradients of
    all other inputs by autodiff.

    Args:
      votes: `[NP, O, children, 16]`, NP parent positions (N * P of a conv layer, or N for the class layer); with
        kernel='fused' also `capsule_ops.VoteFactors` (poses `[NP, children, 16]`, weights `[O, children, 16]`):
        every kernel then recomputes the votes M W where it uses them (no vote tensor, forward or backward), and
        their gradient goes on to M and W in one kernel.
      child_activations: `[NP, 1, children]`, zero for padded children.
      initial_assignments: R before the first M-step, broadcastable to `[NP, O, children]`.
      beta_v, beta_a: `[O]`.
      inverse_temps: list of per-iteration lambdas; its length is the number of iterations.
      normalise: maps E-step log numerators `[NP, O, children]` to assignments R `[NP, O, children]`.
      standardise_costs: see `_activation_logits`.
      form: `RoutingForm`.
      kernel: how the votes are contracted: 'tf' (TensorFlow ops) or 'fused' (`capsule_ops`' kernels; resolve
        'auto' with `capsule_ops.resolve` first).

    Returns:
      `Routing`; its per_iteration `Parents` carry the M-steps' statistics for diagnostics.
    """
    fields = len(Parents._fields)
    if kernel not in ROUTING_KERNELS:
        raise ValueError("kernel must be one of %s, got %r" % (ROUTING_KERNELS, kernel))
    factored = isinstance(votes, capsule_ops.VoteFactors)
    if factored and kernel != "fused":
        raise ValueError("votes given as capsule_ops.VoteFactors need kernel='fused'")
    vote_inputs = list(votes) if factored else [votes]
    contract = FusedVoteContractions if kernel == "fused" else VoteContractions

    @tf.custom_gradient
    def route(*inputs):
        contractions = contract(*inputs[: len(vote_inputs)])
        routed_inputs = inputs[len(vote_inputs) :]  # child_activations, initial_assignments, beta_v, beta_a
        assignments, per_iteration = _iterate(
            contractions, routed_inputs, inverse_temps, normalise, standardise_costs, form
        )
        parents = per_iteration[-1]
        outputs = [parents.mean, parents.activations, assignments] + [x for p in per_iteration for x in p]

        def gradient(*output_gradients):
            return contractions.votes_gradient(outputs, output_gradients, list(routed_inputs))

        return outputs, gradient

    # Not an output of `route`: its outputs pass through one IdentityN, which would make the votes every step.
    routed, votes_shape = _votes_and_shape(votes)
    mean, activations, assignments, *flat = route(*vote_inputs, child_activations, initial_assignments, beta_v, beta_a)
    per_iteration = [Parents(*flat[i : i + fields]) for i in range(0, len(flat), fields)]
    return Routing(mean, activations, assignments, per_iteration, routed, votes_shape)


# ----------------------------------------------------------------------------------------------
