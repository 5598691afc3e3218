"""Fused CPU kernels for capsule votes and EM routing's vote contractions, built on first use, with gradients.

Votes are parent-major, `[NP, O, C, 16]` (em_routing.py). `votes(poses, weights)` (votes_kernels.cc) writes
them in that layout, V_noi = M_ni W_oi, in one pass (TensorFlow ops need a transpose on either side of a
batched matmul); its gradient reads dL/dV once for both dL/dM and dL/dW. Three ops, each one read of the
votes (kernels.cc):
  weighted_sums(votes, r)                      -> sum_i r_i V_i, sum_i r_i V_i^2    `[NP, O, 16]` each,
                                                  and the mass sum_i r_i             `[NP, O, 1]`
  quadratic_forms(votes, a, b, c)              -> sum_h V_ih a_h + V_ih^2 b_h + c    `[NP, O, C]`
  votes_gradient(votes, us, lin_rows, sq_rows) -> sum_k u_ki (lin_kh + 2 V_ih sq_kh) `[NP, O, C, 16]`
and the conv E-step's normaliser, with its gradient kernel (fold_kernels.cc):
  normalise_over_parents(x, child_ids, ...)    -> R: exp(x) normalised over each child's parents `[NP, O, KKI]`
The gradient of each of the first two with respect to its small inputs is the other one (d/dr of the sums is
a quadratic form of their gradients; d/da, d/db of the forms are weighted sums), and with respect to the
votes a `votes_gradient` of rank 1.

`resolve(kernel)` turns a routing-kernel choice ('auto', 'fused', 'tf') into the path to use: 'fused' builds
(or fails loudly), 'auto' falls back to 'tf' -- TensorFlow ops, the same numerics -- with one line on stderr
when the build fails (e.g. no compiler). Imports only tensorflow.
"""

import collections
import sys

import tensorflow.compat.v1 as tf

KERNELS = ("auto", "fused", "tf")


class BuildError(RuntimeError):
    """The kernels could not be built (no compiler, a compile error) or loaded."""


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
    """'fused' or 'tf' for a routing-kernel choice in KERNELS. BuildError for 'fused' when the op does not build."""
    if kernel not in KERNELS:
        raise ValueError("routing kernel must be one of %s, got %r" % (KERNELS, kernel))
    if kernel == "tf":
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
# weights `[O, C, 16]`; the votes are V_noi = M_ni W_oi (em_routing makes them inside the routing).
VoteFactors = collections.namedtuple("VoteFactors", ["poses", "weights"])


def votes(poses, weights):
    """Votes `[NP, O, C, 16]`: V_noi = M_ni W_oi (4x4 products) for poses `[NP, C, 16]`, weights `[O, C, 16]`."""
    return load().caps_votes(poses, weights)


def weighted_sums(votes, weights):
    """(sum_i r_i V_i, sum_i r_i V_i^2) `[NP, O, 16]` each and the mass sum_i r_i `[NP, O, 1]`, for votes
    `[NP, O, C, 16]`, r `[NP, O or 1, C]`."""
    return load().caps_weighted_sums(votes, weights)


def quadratic_forms(votes, linear, quadratic, constant):
    """sum_h V_ih a_h + V_ih^2 b_h + c per child, `[NP, O, C]`, for a, b `[NP, O, 16]`, c `[NP, O]`."""
    return load().caps_quadratic_forms(votes, linear, quadratic, constant)


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


def routing_votes_backward(poses, weights, votes, per_child, linear_rows, square_rows):
    """(dL/dM `[NP, C, 16]`, dL/dW `[O, C, 16]`) for V = M W and dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh) (as
    `votes_gradient`), without storing dL/dV."""
    return list(load().caps_routing_votes_backward(poses, weights, votes, per_child, linear_rows, square_rows))


@tf.RegisterGradient("CapsVotes")
def _votes_gradient(op, votes_grad):
    """dL/dM_ni = sum_o dL/dV_noi W_oi^T, dL/dW_oi = sum_n M_ni^T dL/dV_noi, in one read of dL/dV."""
    return load().caps_votes_backward(op.inputs[0], op.inputs[1], votes_grad)


@tf.RegisterGradient("CapsNormaliseOverParents")
def _normalise_over_parents_gradient(op, assignments_grad):
    """dL/dx_j = R_j (g_j - the sum of R g over the entries of j's child), a softmax's gradient, in one kernel."""
    attrs = {name: op.get_attr(name) for name in ("per_type", "num_children", "input_types")}
    return load().caps_normalise_over_parents_grad(op.outputs[0], assignments_grad, op.inputs[1], **attrs), None


@tf.RegisterGradient("CapsWeightedSums")
def _weighted_sums_gradient(op, sum_grad, square_grad, mass_grad):
    """d/dr_i = sum_h g_h V_ih + s_h V_ih^2 + m (a quadratic form); d/dV_ih = r_i (g_h + 2 V_ih s_h)."""
    votes, weights = op.inputs
    sum_grad, square_grad = _or_zeros(sum_grad, op.outputs[0]), _or_zeros(square_grad, op.outputs[1])
    mass_grad = _or_zeros(mass_grad, op.outputs[2])[..., 0]  # [NP, O]
    weights_grad = quadratic_forms(votes, sum_grad, square_grad, mass_grad)  # [NP, O, C]
    if weights.shape[1] == 1 and votes.shape[1] != 1:  # r was shared by the O parent types
        weights_grad = tf.reduce_sum(weights_grad, axis=1, keepdims=True)  # [NP, 1, C]
    votes_grad = votes_gradient(votes, [weights], [sum_grad], [square_grad])
    return votes_grad, weights_grad


@tf.RegisterGradient("CapsQuadraticForms")
def _quadratic_forms_gradient(op, forms_grad):
    """d/da_h = sum_i g_i V_ih, d/db_h = sum_i g_i V_ih^2, d/dc = sum_i g_i (weighted sums); d/dV_ih = g_i (a_h +
    2 V_ih b_h)."""
    votes, linear, quadratic, _ = op.inputs
    linear_grad, quadratic_grad, constant_grad = weighted_sums(votes, forms_grad)  # [NP, O, 16] x 2, [NP, O, 1]
    votes_grad = votes_gradient(votes, [forms_grad], [linear], [quadratic])
    return votes_grad, linear_grad, quadratic_grad, constant_grad[..., 0]
