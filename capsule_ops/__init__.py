"""Fused CPU kernels for capsule votes and EM routing's vote contractions, built on first use, with gradients.

Votes are parent-major, `[NP, O, C, 16]` (em_routing.py), V_noi = M_ni W_oi. Each contraction below takes the
votes either stored or as their factors (`VoteFactors`: poses M `[NP, C, 16]`, weights W `[O, C, 16]`), and
then recomputes every vote where it uses it (64 multiply-adds instead of a 64-byte read), so that the routing
never stores a vote tensor. Every form is centred, float32-safe for large votes and a small sigma^2 (kernels.cc):
  centred_sums(votes, r, eps)                  -> c = sum_i r_i V_i / (sum_i r_i + eps), sum_i r_i (V_i - c)^2
                                                  `[NP, O, 16]` each, and the mass sum_i r_i `[NP, O, 1]`
  weighted_sums(votes, r, z)                   -> sum_i r_i (V_i - z), sum_i r_i (V_i - z)^2, the mass
  quadratic_forms(votes, a, b, c, z)           -> sum_h d_ih a_h + d_ih^2 b_h + c, d_i = V_i - z   `[NP, O, C]`
  votes_gradient(votes, us, lin_rows, sq_rows) -> sum_k u_ki (lin_kh + 2 V_ih sq_kh) `[NP, O, C, 16]` (stored)
  routing_votes_backward(M, W, us, ...)        -> the same dL/dV taken on to dL/dM, dL/dW, V recomputed
`votes(poses, weights)` (votes_kernels.cc) writes the votes themselves (diagnostics, coordinate addition), and
the conv E-step's normaliser has its own kernel and gradient kernel (fold_kernels.cc):
  normalise_over_parents(x, child_ids, ...)    -> R: exp(x) normalised over each child's parents `[NP, O, KKI]`
The gradient of each sums op with respect to its small inputs is a quadratic form of its gradients, that of the
quadratic forms is a weighted sum about the same centre, and with respect to the votes (or their factors) a
rank-1 `votes_gradient` (or `routing_votes_backward`).

`resolve(kernel)` turns a routing-kernel choice ('auto', 'fused', 'tf') into the path to use: 'fused' builds
(or fails loudly), 'auto' falls back to 'tf' -- TensorFlow ops, the same numerics -- with one line on stderr
when the build fails (e.g. no compiler). The kernels are CPU kernels only: with a GPU visible a graph would
copy the routing's tensors across the bus, and towers pinned to `/device:GPU:i` could not place them at all
(no session sets soft placement), so there 'auto' is 'tf' and 'fused' is a `KernelChoiceError`.
Imports only tensorflow.
"""

import collections
import sys

import tensorflow.compat.v1 as tf

KERNELS = ("auto", "fused", "tf")


class BuildError(RuntimeError):
    """The kernels could not be built (no compiler, a compile error) or loaded."""


class KernelChoiceError(ValueError):
    """'fused' asked for where the kernels cannot run: a GPU is visible (CPU kernels only)."""


def gpu_count():
    """How many GPUs TensorFlow sees."""
    return len(tf.config.list_physical_devices("GPU"))


def check_choice(kernel):
    """KernelChoiceError (one line) for 'fused' while a GPU is visible; ValueError for a kernel not in KERNELS."""
    if kernel not in KERNELS:
        raise ValueError("routing kernel must be one of %s, got %r" % (KERNELS, kernel))
    gpus = gpu_count() if kernel == "fused" else 0
    if gpus:
        raise KernelChoiceError(
            "routing kernel 'fused' has CPU kernels only and %d GPU(s) are visible: use 'auto' or 'tf'" % gpus
        )


_state = {"library": None, "failure": None, "reported": False}


def load():
    """The loaded op library (built on first use). BuildError when it cannot be built or loaded."""
    if _state["library"] is None:
        if _state["failure"] is not None:
            raise BuildError(_state["failure"])
        try:
            from capsule_ops import build  # here, not above: `python -m capsule_ops.build` imports this package first

            _state["library"] = tf.load_op_library(build.build())
        except (BuildError, tf.errors.NotFoundError) as error:
            _state["failure"] = str(error)
            raise BuildError(_state["failure"]) from None
    return _state["library"]


def resolve(kernel):
    """'fused' or 'tf' for a routing-kernel choice in KERNELS: 'auto' is 'tf' while a GPU is visible. BuildError
    for 'fused' when the op does not build, KernelChoiceError for it while a GPU is visible."""
    check_choice(kernel)
    if kernel == "tf" or (kernel == "auto" and gpu_count()):
        return "tf"
    if kernel == "fused":
        load()
        return "fused"
    try:
        load()
        return "fused"
    except BuildError as error:
        if not _state["reported"]:
            _state["reported"] = True
            sys.stderr.write("routing kernel: the fused op did not build (%s); using TensorFlow ops\n" % error)
        return "tf"


def reset():
    """Forgets the loaded library and any failure (tests that change the build environment)."""
    _state.update(library=None, failure=None, reported=False)


# A layer's votes as their two factors: poses `[NP, C, 16]` (each child's pose at each parent position) and
# weights `[O, C, 16]`; the votes are V_noi = M_ni W_oi. Every vote contraction below takes either the stored
# votes `[NP, O, C, 16]` or their factors, and then recomputes each vote where it is used (no vote tensor).
VoteFactors = collections.namedtuple("VoteFactors", ["poses", "weights"])


def votes(poses, weights):
    """Votes `[NP, O, C, 16]`: V_noi = M_ni W_oi (4x4 products) for poses `[NP, C, 16]`, weights `[O, C, 16]`."""
    return load().caps_votes(poses, weights)


def _vote_op(votes, stored, from_factors):
    """(the op for `votes`, its vote inputs): the stored-votes op, or the one that recomputes them from factors."""
    if isinstance(votes, VoteFactors):
        return from_factors, list(votes)
    return stored, [votes]


def centred_sums(votes, weights, epsilon):
    """The M-step's sums, centred: (c = sum_i r_i V_i / (sum_i r_i + epsilon), sum_i r_i (V_i - c)^2) `[NP, O, 16]`
    each and the mass sum_i r_i `[NP, O, 1]`, for votes `[NP, O, C, 16]` (or `VoteFactors`), r `[NP, O or 1, C]`."""
    library = load()
    op, inputs = _vote_op(votes, library.caps_centred_sums, library.caps_centred_sums_from_factors)
    return op(*inputs, weights, epsilon=epsilon)


def weighted_sums(votes, weights, centre):
    """(sum_i r_i (V_i - z), sum_i r_i (V_i - z)^2) `[NP, O, 16]` each and the mass sum_i r_i `[NP, O, 1]` about a
    centre z `[NP, O, 16]`, for votes `[NP, O, C, 16]` (or `VoteFactors`), r `[NP, O or 1, C]`."""
    library = load()
    op, inputs = _vote_op(votes, library.caps_weighted_sums, library.caps_weighted_sums_from_factors)
    return op(*inputs, weights, centre)


def quadratic_forms(votes, linear, quadratic, constant, centre):
    """sum_h d_ih a_h + d_ih^2 b_h + c per child, d_i = V_i - z, `[NP, O, C]`, for a, b, z `[NP, O, 16]`, c `[NP, O]`
    and votes `[NP, O, C, 16]` (or `VoteFactors`)."""
    library = load()
    op, inputs = _vote_op(votes, library.caps_quadratic_forms, library.caps_quadratic_forms_from_factors)
    return op(*inputs, linear, quadratic, constant, centre)


def votes_gradient(votes, per_child, linear_rows, square_rows):
    """sum_k u_ki (L_kh + 2 V_ih S_kh) `[NP, O, C, 16]`; lists of k: u_k `[NP, O or 1, C]`, L_k, S_k `[NP, O, 16]`."""
    return load().caps_votes_gradient(votes, per_child, linear_rows, square_rows)


def normalise_over_parents(log_numerators, child_ids, per_type, num_children, input_types):
    """The conv E-step's R `[NP, O, KK*I]`: exp(x) over each child's sum of exp(x) over the parents that see it
    (`per_type`: the positions of its own parent type; else positions and types), 0 at offsets in padding.

    child_ids `[P*KK]`: the child position (of `num_children` = H*W) that each (parent position, kernel offset)
    sees, `num_children` at an offset in padding: `receptive_field.ReceptiveField.child_ids`; I = `input_types`.
    """
    return load().caps_normalise_over_parents(
        log_numerators, child_ids, per_type=per_type, num_children=num_children, input_types=input_types
    )


def _or_zeros(gradient, like):
    return tf.zeros_like(like) if gradient is None else gradient


def routing_votes_backward(poses, weights, per_child, linear_rows, square_rows):
    """(dL/dM `[NP, C, 16]`, dL/dW `[O, C, 16]`) for V = M W and dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh) (as
    `votes_gradient`), V recomputed inside: neither the votes nor dL/dV is stored."""
    return list(load().caps_routing_votes_backward(poses, weights, per_child, linear_rows, square_rows))


def _vote_gradients(op, per_child, linear_row, square_row):
    """The gradient of a contraction op's vote inputs for dL/dV = u (L + 2 V S): [dL/dV], or [dL/dM, dL/dW]."""
    if op.type.endswith("FromFactors"):
        return routing_votes_backward(op.inputs[0], op.inputs[1], [per_child], [linear_row], [square_row])
    return [votes_gradient(op.inputs[0], [per_child], [linear_row], [square_row])]


def _vote_input(op):
    """What a contraction op reads the votes from: the votes tensor, or their `VoteFactors`."""
    return VoteFactors(op.inputs[0], op.inputs[1]) if op.type.endswith("FromFactors") else op.inputs[0]


def _per_child_gradient(gradient, weights):
    """d/dr `[NP, O, C]` summed over the O types where r `[NP, 1, C]` was shared by them."""
    if weights.shape[1] == 1 and gradient.shape[1] != 1:
        return tf.reduce_sum(gradient, axis=1, keepdims=True)  # [NP, 1, C]
    return gradient


@tf.RegisterGradient("CapsVotes")
def _votes_gradient(op, votes_grad):
    """dL/dM_ni = sum_o dL/dV_noi W_oi^T, dL/dW_oi = sum_n M_ni^T dL/dV_noi, in one read of dL/dV."""
    return load().caps_votes_backward(op.inputs[0], op.inputs[1], votes_grad)


@tf.RegisterGradient("CapsNormaliseOverParents")
def _normalise_over_parents_gradient(op, assignments_grad):
    """dL/dx_j = R_j (g_j - the sum of R g over the entries of j's child), a softmax's gradient, in one kernel."""
    attrs = {name: op.get_attr(name) for name in ("per_type", "num_children", "input_types")}
    return load().caps_normalise_over_parents_grad(op.outputs[0], assignments_grad, op.inputs[1], **attrs), None


@tf.RegisterGradient("CapsCentredSums")
@tf.RegisterGradient("CapsCentredSumsFromFactors")
def _centred_sums_gradient(op, mean_grad, square_grad, mass_grad):
    """With c = sum r V / (m + eps), S = sum r (V - c)^2, m = sum r: d/dr_i = g_c (V_i - c) / (m + eps) +
    g_S (V_i - c)^2 + g_m (a centred quadratic form); d/dV_i = r_i (g_c / (m + eps) + 2 (V_i - c) g_S). S is
    stationary in c (sum r (V - c) = 0 up to eps), so c's own dependence adds nothing to S's gradient."""
    weights = op.inputs[-1]
    mean, squares, mass = op.outputs
    mean_grad, square_grad = _or_zeros(mean_grad, mean), _or_zeros(square_grad, squares)
    mass_grad = _or_zeros(mass_grad, mass)[..., 0]  # [NP, O]
    scaled = mean_grad / (mass + op.get_attr("epsilon"))  # [NP, O, 16]
    weights_grad = quadratic_forms(_vote_input(op), scaled, square_grad, mass_grad, mean)  # [NP, O, C]
    votes_grads = _vote_gradients(op, weights, scaled - 2.0 * mean * square_grad, square_grad)
    return votes_grads + [_per_child_gradient(weights_grad, weights)]


@tf.RegisterGradient("CapsWeightedSums")
@tf.RegisterGradient("CapsWeightedSumsFromFactors")
def _weighted_sums_gradient(op, sum_grad, square_grad, mass_grad):
    """With d_i = V_i - z, p = sum r d, q = sum r d^2, m = sum r: d/dr_i = g_p d_i + g_q d_i^2 + g_m (a centred
    quadratic form); d/dV_i = r_i (g_p + 2 d_i g_q); d/dz = -(g_p m + 2 g_q p)."""
    weights, centre = op.inputs[-2], op.inputs[-1]
    sums, squares, mass = op.outputs
    sum_grad, square_grad = _or_zeros(sum_grad, sums), _or_zeros(square_grad, squares)
    mass_grad = _or_zeros(mass_grad, mass)  # [NP, O, 1]
    weights_grad = quadratic_forms(_vote_input(op), sum_grad, square_grad, mass_grad[..., 0], centre)  # [NP, O, C]
    votes_grads = _vote_gradients(op, weights, sum_grad - 2.0 * centre * square_grad, square_grad)
    centre_grad = -(sum_grad * mass + 2.0 * square_grad * sums)  # [NP, O, 16]
    return votes_grads + [_per_child_gradient(weights_grad, weights), centre_grad]


@tf.RegisterGradient("CapsQuadraticForms")
@tf.RegisterGradient("CapsQuadraticFormsFromFactors")
def _quadratic_forms_gradient(op, forms_grad):
    """With d_i = V_i - z: d/da = sum_i g_i d_i, d/db = sum_i g_i d_i^2, d/dc = sum_i g_i (weighted sums about z);
    d/dz = -(a sum g + 2 b sum g d); d/dV_i = g_i (a + 2 d_i b)."""
    linear, quadratic, _, centre = op.inputs[-4:]
    sums, squares, mass = weighted_sums(_vote_input(op), forms_grad, centre)  # [NP, O, 16] x 2, [NP, O, 1]
    votes_grads = _vote_gradients(op, forms_grad, linear - 2.0 * centre * quadratic, quadratic)
    centre_grad = -(linear * mass + 2.0 * quadratic * sums)  # [NP, O, 16]
    return votes_grads + [sums, squares, mass[..., 0], centre_grad]
