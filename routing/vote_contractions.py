"""The votes' contractions of EM routing (em_routing.py) and their hand-written gradient, on TensorFlow ops or
on the fused kernels of `capsule_ops`.

EM routing (paper section 2.1, Procedure 1) uses the votes V `[NP, O, children, 16]` only through two
contractions: the M-step's weighted mean and centred squares, and the E-step's centred quadratic form. Each
class here makes them and assembles dL/dV from autodiff's per-use gradients. Imports only tensorflow and
capsule_ops.
"""

import tensorflow.compat.v1 as tf

import capsule_ops

POSE_ENTRIES = 16  # a flattened 4x4 pose


class VoteContractions:
    """The routing's only uses of the votes, and their hand-written gradient.

    EM routing touches the votes V `[NP, O, children, 16]` in exactly two ways, both centred so that float32
    loses nothing to cancellation when the votes are large and sigma^2 small: the M-step's weighted mean
    c = sum_i r_i V_i / mass and centred squares sum_i r_i (V_i - c)^2 (`centred_sums`, which also returns the
    mass sum_i r_i), and the E-step's Mahalanobis term (V - z) a + (V - z)^2 b per child about a centre z
    (`quadratic_forms`, a, b and z per parent, plus a per-parent constant: the whole log numerator).
    Autodiff would write one vote-sized gradient per use and iteration (an outer product each) and add them up.
    Every one of these gradients is an outer product u (x) w of a per-child vector u `[NP, O, children]` and a
    per-parent vector w `[NP, O, 16]` (plus 2V times another), so their total is
        dL/dV = U W_lin + 2 V * (U W_sq),   U `[NP, O, children, k]`, W `[NP, O, k, 16]`,
    one batched matmul with k = (M-steps + E-steps) columns. The routing sees the votes through
    `tf.stop_gradient`, autodiff gives the per-use gradients (dL/dc, dL/d squares, dL/d form), and
    `votes_gradient` assembles dL/dV from them.
    """

    def __init__(self, votes):
        self.votes = tf.stop_gradient(votes)  # [NP, O, children, 16]
        self._sums = []  # (r `[NP, O, children]`, c `[NP, O, 16]`, squares `[NP, O, 16]`, mass, epsilon)
        self._forms = []  # (a `[NP, O, 16]`, b `[NP, O, 16]`, z `[NP, O, 16]`, forms `[NP, O, children]`)

    def parent_zeros(self):
        """Zeros `[NP, O, 16]` (the mean before the first M-step)."""
        return tf.zeros_like(self.votes[:, :, 0, :])

    def _contract_sums(self, weights, epsilon):
        r = weights[:, :, None, :]  # [NP, O, 1, children]
        mass = tf.reduce_sum(weights, axis=-1, keepdims=True)  # [NP, O or 1, 1]
        mean = tf.matmul(r, self.votes)[:, :, 0, :] / (mass + epsilon)  # [NP, O, 16]
        # S is stationary in c (sum r (V - c) = 0): its gradient treats c as a constant
        centred = self.votes - tf.stop_gradient(mean)[:, :, None, :]  # [NP, O, children, 16]
        return mean, tf.matmul(r, tf.square(centred))[:, :, 0, :], mass  # [NP, O, 16] x 2, [NP, O or 1, 1]

    def _contract_forms(self, linear, quadratic, constant, centre):
        centred = self.votes - centre[:, :, None, :]  # [NP, O, children, 16]
        forms = tf.matmul(tf.square(centred), quadratic[..., None])[..., 0]  # [NP, O, children]
        if linear is not None:
            forms += tf.matmul(centred, linear[..., None])[..., 0]  # [NP, O, children]
        return forms + constant[..., None]  # [NP, O, children]

    def _assemble(self, per_child, linear_rows, square_rows):
        """[dL/dV] with dL/dV = sum_k u_ki (L_kh + 2 V_ih S_kh), for lists of k: u_k broadcastable to
        `[NP, O, children]`, L_k and S_k `[NP, O, 16]`."""
        shape = tf.shape(self.votes)[:3]
        per_child = tf.stack([tf.broadcast_to(u, shape) for u in per_child], axis=2)  # [NP, O, k, children]
        linear_rows, square_rows = tf.stack(linear_rows, axis=2), tf.stack(square_rows, axis=2)  # [NP, O, k, 16]
        lin = tf.matmul(per_child, linear_rows, transpose_a=True)  # [NP, O, children, 16]
        sq = tf.matmul(per_child, square_rows, transpose_a=True)  # [NP, O, children, 16]
        return [lin + 2.0 * self.votes * sq]  # [dL/dV `[NP, O, children, 16]`]

    def centred_sums(self, weights, epsilon):
        """c = sum_i r_i V_i / (mass + epsilon) and sum_i r_i (V_i - c)^2 `[NP, O, 16]` each, and the mass
        sum_i r_i (broadcastable to `[NP, O, 1]`), for r `[NP, O, children]` (O may be 1)."""
        mean, squares, mass = self._contract_sums(weights, epsilon)
        self._sums.append((weights, mean, squares, mass, epsilon))
        return mean, squares, mass

    def quadratic_forms(self, linear, quadratic, constant, centre):
        """sum_h d_ih a_h + d_ih^2 b_h + c for every child, d_i = V_i - z: a (None: 0), b, z `[NP, O, 16]`,
        c `[NP, O]` -> `[NP, O, children]`."""
        forms = self._contract_forms(linear, quadratic, constant, centre)  # [NP, O, children]
        self._forms.append((linear, quadratic, centre, forms))
        return forms

    def _use_rows(self, mean_grads, square_grads, form_grads):
        """The rank-k factors (u_k, L_k, S_k) of dL/dV: dc_h/dV_ih = r_i / (mass + eps), d squares_h / dV_ih =
        2 r_i (V_ih - c_h), d form_i / dV_ih = a_h + 2 (V_ih - z_h) b_h."""
        per_child, linear_rows, square_rows = [], [], []
        for (r, mean, _, mass, epsilon), mean_grad, square_grad in zip(self._sums, mean_grads, square_grads):
            per_child.append(r)
            linear_rows.append(mean_grad / (mass + epsilon) - 2.0 * mean * square_grad)  # [NP, O, 16]
            square_rows.append(square_grad)
        for (linear, quadratic, centre, _), form_grad in zip(self._forms, form_grads):
            per_child.append(form_grad)
            shift = -2.0 * centre * quadratic  # [NP, O, 16]
            linear_rows.append(shift if linear is None else linear + shift)
            square_rows.append(quadratic)
        return per_child, linear_rows, square_rows

    def votes_gradient(self, outputs, output_gradients, inputs):
        """dL/dV and dL/d inputs, given dL/d outputs (None where an output is unused).

        Returns a list: the votes gradient `[NP, O, children, 16]` (or dL/dM, dL/dW), then one gradient per
        tensor of `inputs` (None where it does not reach the outputs).
        """
        used = [(y, dy) for y, dy in zip(outputs, output_gradients) if dy is not None]
        num_sums = len(self._sums)
        contractions = (
            [mean for _, mean, _, _, _ in self._sums]
            + [squares for _, _, squares, _, _ in self._sums]
            + [form for _, _, _, form in self._forms]
        )
        grads = tf.gradients([y for y, _ in used], contractions + list(inputs), [dy for _, dy in used])
        input_grads = grads[len(contractions) :]
        # A contraction that does not reach the used outputs contributes nothing to dL/dV.
        grads = [tf.zeros_like(x) if g is None else g for x, g in zip(contractions, grads[: len(contractions)])]
        mean_grads, square_grads = grads[:num_sums], grads[num_sums : 2 * num_sums]  # [NP, O, 16] each
        rows = self._use_rows(mean_grads, square_grads, grads[2 * num_sums :])  # form grads [NP, O, children]
        return self._assemble(*rows) + input_grads  # dL/dV (or dL/dM, dL/dW), then inputs


class FusedVoteContractions(VoteContractions):
    """The same contractions and gradient through the fused kernels of `capsule_ops`: one pass over the votes
    per use, never a vote-sized temporary. Given the votes' factors (poses M `[NP, children, 16]`, weights W
    `[O, children, 16]`), every pass recomputes V = M W where it uses it (no vote tensor is stored, forward or
    backward) and the gradient goes to M and W directly."""

    def __init__(self, votes, weights=None):
        if weights is None:
            super().__init__(votes)
            self.source = self.votes  # [NP, O, children, 16]
        else:
            self.votes = None
            self._sums, self._forms = [], []
            self.source = capsule_ops.VoteFactors(tf.stop_gradient(votes), tf.stop_gradient(weights))

    def parent_zeros(self):
        if self.votes is not None:
            return super().parent_zeros()
        poses, weights = self.source
        shape = tf.stack([tf.shape(poses)[0], tf.shape(weights)[0], POSE_ENTRIES])  # [NP, O, 16]
        return tf.zeros(shape, poses.dtype)

    def _contract_sums(self, weights, epsilon):
        return capsule_ops.centred_sums(self.source, weights, epsilon)  # [NP, O, 16] x 2, [NP, O, 1]

    def _contract_forms(self, linear, quadratic, constant, centre):
        linear = tf.zeros_like(quadratic) if linear is None else linear  # [NP, O, 16]
        return capsule_ops.quadratic_forms(self.source, linear, quadratic, constant, centre)  # [NP, O, children]

    def _assemble(self, per_child, linear_rows, square_rows):
        if self.votes is not None:
            return [capsule_ops.votes_gradient(self.votes, per_child, linear_rows, square_rows)]  # [dL/dV]
        poses, weights = self.source
        return capsule_ops.routing_votes_backward(poses, weights, per_child, linear_rows, square_rows)
