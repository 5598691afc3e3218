"""EM routing (paper section 2.1, Procedure 1) of *Matrix Capsules with EM Routing*.

Hinton, Sabour, Frosst, ICLR 2018 (https://openreview.net/forum?id=HJWLfGWRb). The M-step fits a
Gaussian to each parent's weighted votes and sets its activation; the E-step reassigns each child's vote
to the parents in proportion to a_j N(V_ij; mu_j, sigma_j^2). `RoutingForm` selects the paper's equations
or pieces of the authors' released code (google-research `capsule_em`). Imports only tensorflow and capsule_ops.

Layout. Votes are parent-major, `[NP, O, children, 16]`: NP parent positions (N * P of a conv layer, or
N for the class layer), O parent types, children = K*K*I patch entries ordered (kh, kw, i) (the channel
order of `tf.image.extract_patches`), 16 = the flattened 4x4 pose. The M-step sums (sum_i r V and
sum_i r V^2) are batched matmuls over the votes and their squares, so is the E-step's Mahalanobis term.
The routing's gradient with respect to the votes is assembled by hand (`_VoteContractions`): one batched
matmul instead of one vote-sized gradient per use of the votes. With `kernel='fused'` the same three
contractions run as the fused C++ kernels of `capsule_ops` (one read of the votes each, V^2 never stored).
"""

import collections
import dataclasses
import math

import tensorflow.compat.v1 as tf

import capsule_ops

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


class _VoteContractions:
    """The routing's only uses of the votes, and their hand-written gradient.

    EM routing touches the votes V `[NP, O, children, 16]` in exactly two ways: the M-step sums
    sum_i r_i V_i and sum_i r_i V_i^2 (`weighted_sums`, which also returns the mass sum_i r_i), and the
    E-step's Mahalanobis term V a + V^2 b per child (`quadratic_forms`, a and b per parent, plus a per-parent
    constant: the whole log numerator). Autodiff would write one
    vote-sized gradient per use and iteration (an outer product each) and add them up. Every one of
    these gradients is an outer product u (x) w of a per-child vector u `[NP, O, children]` and a
    per-parent vector w `[NP, O, 16]` (times 2V for the V^2 uses), so their total is
        dL/dV = U W_lin + 2 V * (U W_sq),   U `[NP, O, children, k]`, W `[NP, O, k, 16]`,
    one batched matmul with k = (M-steps + E-steps) columns. The routing sees the votes through
    `tf.stop_gradient`, autodiff gives the per-use gradients (dL/d sum, dL/d form), and
    `votes_gradient` assembles dL/dV from them.
    """

    def __init__(self, votes):
        self.votes = tf.stop_gradient(votes)  # [NP, O, children, 16]
        self._squared_votes = None  # V^2 `[NP, O, children, 16]`, made on first use
        self._sums = []  # (r `[NP, O, children]`, sum r V `[NP, O, 16]`, sum r V^2 `[NP, O, 16]`)
        self._forms = []  # (a `[NP, O, 16]`, b `[NP, O, 16]`, V a + V^2 b `[NP, O, children]`)

    @property
    def squared_votes(self):
        if self._squared_votes is None:
            self._squared_votes = tf.square(self.votes)  # [NP, O, children, 16]
        return self._squared_votes

    def _contract_sums(self, weights):
        r = weights[:, :, None, :]  # [NP, O, 1, children]
        vote_sum = tf.matmul(r, self.votes)[:, :, 0, :]  # [NP, O, 16]
        squared_sum = tf.matmul(r, self.squared_votes)[:, :, 0, :]  # [NP, O, 16]
        return vote_sum, squared_sum, tf.reduce_sum(weights, axis=-1, keepdims=True)  # mass [NP, O or 1, 1]

    def _contract_forms(self, linear, quadratic, constant):
        linear_part = tf.matmul(self.votes, linear[..., None])[..., 0]  # [NP, O, children]
        quadratic_part = tf.matmul(self.squared_votes, quadratic[..., None])[..., 0]  # [NP, O, children]
        return linear_part + quadratic_part + constant[..., None]  # [NP, O, children]

    def _assemble(self, per_child, linear_rows, square_rows):
        """[dL/dV] with dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh), for lists of k: u_k broadcastable to
        `[NP, O, children]`, L_k and S_k `[NP, O, 16]`."""
        shape = tf.shape(self.votes)[:3]
        per_child = tf.stack([tf.broadcast_to(u, shape) for u in per_child], axis=2)  # [NP, O, k, children]
        linear_rows, square_rows = tf.stack(linear_rows, axis=2), tf.stack(square_rows, axis=2)  # [NP, O, k, 16]
        lin = tf.matmul(per_child, linear_rows, transpose_a=True)  # [NP, O, children, 16]
        sq = tf.matmul(per_child, square_rows, transpose_a=True)  # [NP, O, children, 16]
        return [lin + 2.0 * self.votes * sq]  # [dL/dV `[NP, O, children, 16]`]

    def weighted_sums(self, weights):
        """sum_i r_i V_i and sum_i r_i V_i^2 `[NP, O, 16]` each, and the mass sum_i r_i (broadcastable to
        `[NP, O, 1]`), for r `[NP, O, children]` (O may be 1)."""
        vote_sum, squared_sum, mass = self._contract_sums(weights)
        self._sums.append((weights, vote_sum, squared_sum))
        return vote_sum, squared_sum, mass

    def quadratic_forms(self, linear, quadratic, constant):
        """sum_h V_ih a_h + V_ih^2 b_h + c for every child: a, b `[NP, O, 16]`, c `[NP, O]` -> `[NP, O, children]`."""
        forms = self._contract_forms(linear, quadratic, constant)  # [NP, O, children]
        self._forms.append((linear, quadratic, forms))
        return forms

    def votes_gradient(self, outputs, output_gradients, inputs):
        """dL/dV and dL/d inputs, given dL/d outputs (None where an output is unused).

        Returns a list: the votes gradient `[NP, O, children, 16]`, then one gradient per tensor of
        `inputs` (None where it does not reach the outputs).
        """
        used = [(y, dy) for y, dy in zip(outputs, output_gradients) if dy is not None]
        num_sums = len(self._sums)
        contractions = (
            [vote_sum for _, vote_sum, _ in self._sums]
            + [squared for _, _, squared in self._sums]
            + [form for _, _, form in self._forms]
        )
        grads = tf.gradients([y for y, _ in used], contractions + list(inputs), [dy for _, dy in used])
        input_grads = grads[len(contractions) :]
        # A contraction that does not reach the used outputs contributes nothing to dL/dV.
        grads = [tf.zeros_like(x) if g is None else g for x, g in zip(contractions, grads[: len(contractions)])]
        vote_sum_grads, squared_sum_grads = grads[:num_sums], grads[num_sums : 2 * num_sums]  # [NP, O, 16] each
        form_grads = grads[2 * num_sums :]  # [NP, O, children] each
        # Column k of U is the per-child factor of use k; row k of W_lin / W_sq its per-parent factor.
        per_child = [r for r, _, _ in self._sums] + form_grads  # k x [NP, O or 1, children]
        lin_rows = vote_sum_grads + [a for a, _, _ in self._forms]  # k x [NP, O, 16]
        sq_rows = squared_sum_grads + [b for _, b, _ in self._forms]  # k x [NP, O, 16]
        return self._assemble(per_child, lin_rows, sq_rows) + input_grads  # dL/dV (or dL/dM, dL/dW), then inputs


class _FusedVoteContractions(_VoteContractions):
    """The same contractions and gradient through the fused kernels of `capsule_ops`: one read of the votes
    per use, V^2 computed on the fly, never stored. Given the votes' factors (poses M `[NP, children, 16]`,
    weights W `[O, children, 16]`), it makes V = M W and returns dL/dM, dL/dW without storing dL/dV."""

    def __init__(self, votes, weights=None):
        self.factors = None if weights is None else (tf.stop_gradient(votes), tf.stop_gradient(weights))
        super().__init__(votes if weights is None else capsule_ops.votes(*self.factors))

    def _contract_sums(self, weights):
        return capsule_ops.weighted_sums(self.votes, weights)  # [NP, O, 16] x 2, [NP, O, 1]

    def _contract_forms(self, linear, quadratic, constant):
        return capsule_ops.quadratic_forms(self.votes, linear, quadratic, constant)  # [NP, O, children]

    def _assemble(self, per_child, linear_rows, square_rows):
        if self.factors is None:
            return [capsule_ops.votes_gradient(self.votes, per_child, linear_rows, square_rows)]  # [dL/dV]
        poses, weights = self.factors
        return capsule_ops.routing_votes_backward(poses, weights, self.votes, per_child, linear_rows, square_rows)


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

    sigma^2 = sum_i r_i (V_i - mu)^2 / mass = E[V^2] - 2 mu E[V] + mu^2 sum_i r_i / mass, clamped at 0
    against float rounding; with mu = E[V] (no momentum, no mass epsilon) that is E[V^2] - mu^2.

    Args:
      assignments: R, broadcastable to `[NP, O, children]`.
      child_activations: a_i, `[NP, 1, children]`.
      contractions: the `_VoteContractions` of the votes.
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
        # [NP, O, 16] each, and sum_i r_ij `[NP, O or 1, 1]`
        vote_sum, squared_sum, raw_mass = contractions.weighted_sums(weighted_assignments)
        if form.mass_epsilon:  # mass >= epsilon > 0: a plain divide, as the released code does
            mass = raw_mass + form.mass_epsilon  # [NP, O, 1]
            vote_mean, mean_square, mass_fraction = vote_sum / mass, squared_sum / mass, raw_mass / mass
        else:
            mass, mass_fraction = raw_mass, 1.0
            vote_mean, mean_square = _safe_divide(vote_sum, mass), _safe_divide(squared_sum, mass)  # E[V], E[V^2]
        if previous_mean is None and not form.mass_epsilon:
            mean = vote_mean
            spread = mean_square - tf.square(mean)  # [NP, O, 16]
        else:
            momentum = form.mean_momentum
            mean = (1.0 - momentum) * vote_mean + momentum * previous_mean if momentum else vote_mean
            spread = mean_square - 2.0 * mean * vote_mean + tf.square(mean) * mass_fraction  # [NP, O, 16]
        variance = tf.nn.relu(spread) + _VARIANCE_FLOOR  # [NP, O, 16]
        logit_mass = _logit_mass(mass, int(child_activations.shape[-1]), int(beta_v.shape[0]), form)  # [NP, O, 1]
        logits = _activation_logits(
            logit_mass, variance, beta_v, beta_a, inverse_temperature, standardise_costs, form
        )  # [NP, O]
        return Parents(mean, variance, tf.sigmoid(logits), tf.log_sigmoid(logits), mass, assignments)


def _e_step(contractions, parents, normalise, form):
    """E-step: R_ij = a_j p_ij / (the child's sum of it over its parents), from log(a_j p_ij).

    sum_h (V_h - mu_h)^2 / (2 sigma_h^2) = sum_h [V_h^2 / (2 sigma_h^2) - V_h mu_h / sigma_h^2]
    + sum_h mu_h^2 / (2 sigma_h^2): the votes part is one quadratic form per child.

    Args:
      contractions: the `_VoteContractions` of the votes `[NP, O, children, 16]`.
      parents: the M-step's `Parents` (mean, variance `[NP, O, 16]`, log_activations `[NP, O]`).
      normalise: maps the log numerators `[NP, O, children]` to R `[NP, O, children]`.
      form: `RoutingForm`; without its assignment_gradient no gradient flows through R.

    Returns:
      R, `[NP, O, children]`.
    """
    with tf.name_scope("e_step"):
        mean, variance = parents.mean, parents.variance
        parent_part = tf.reduce_sum(0.5 * tf.square(mean) / variance + 0.5 * (tf.log(variance) + _LOG_2PI), -1)
        # votes part + (log a_j - parent part), `[NP, O, children]`
        log_numerators = contractions.quadratic_forms(
            mean / variance, -0.5 / variance, parents.log_activations - parent_part
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
    previous_mean = tf.zeros_like(contractions.votes[:, :, 0, :]) if form.mean_momentum else None  # [NP, O, 16]
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
# the assignments R it used (broadcastable to `[NP, O, children]`), one `Parents` per iteration, and the votes
# `[NP, O, children, 16]` (made inside when given as factors).
Routing = collections.namedtuple("Routing", ["poses", "activations", "assignments", "per_iteration", "votes"])


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

    The votes gradient is assembled by `_VoteContractions` (one batched matmul), the gradients of
    all other inputs by autodiff.

    Args:
      votes: `[NP, O, children, 16]`, NP parent positions (N * P of a conv layer, or N for the class layer); with
        kernel='fused' also `capsule_ops.VoteFactors` (poses `[NP, children, 16]`, weights `[O, children, 16]`):
        the votes M W are then made inside, and their gradient taken on to M and W by one kernel that never
        stores a vote-sized gradient.
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
    contract = _FusedVoteContractions if kernel == "fused" else _VoteContractions

    @tf.custom_gradient
    def route(*inputs):
        contractions = contract(*inputs[: len(vote_inputs)])
        routed_inputs = inputs[len(vote_inputs) :]  # child_activations, initial_assignments, beta_v, beta_a
        assignments, per_iteration = _iterate(
            contractions, routed_inputs, inverse_temps, normalise, standardise_costs, form
        )
        parents = per_iteration[-1]
        outputs = [parents.mean, parents.activations, assignments] + [x for p in per_iteration for x in p]

        def gradient(*output_gradients):  # the votes output (last) is for diagnostics: no gradient flows back
            return contractions.votes_gradient(outputs, output_gradients[: len(outputs)], list(routed_inputs))

        return outputs + [contractions.votes], gradient

    mean, activations, assignments, *flat, routed = route(
        *vote_inputs, child_activations, initial_assignments, beta_v, beta_a
    )
    per_iteration = [Parents(*flat[i : i + fields]) for i in range(0, len(flat), fields)]
    return Routing(mean, activations, assignments, per_iteration, routed)


# ----------------------------------------------------------------------------------------------
