"""Tests of capsule_ops (the fused votes and routing kernels): the ops against NumPy, the layers on the fused
path against the TF-ops path and the float64 loop reference, finite-difference gradients, stress inputs, the
build cache and the fallback when no compiler is there."""

import dataclasses
import os
import tempfile
import unittest.mock

from absl.testing import parameterized

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_layers as cl
import capsule_ops
from routing import em_routing
import hparams
import model
import numpy_reference as ref
from capsule_ops import build as ops_build
from test_capsule_layers import GEOMETRIES, _assert_gradients_match_finite_differences, _initializers
from test_capsule_layers import _random_capsules, _relative_error
from test_capsule_layers import _routing_variables

RELATIVE_TOLERANCE = 1e-5  # issue acceptance: float64 forward against the reference
FLOAT32_TOLERANCE = 1e-4  # float32 forward against the float64 reference
PATH_TOLERANCE = 1e-9  # float64: fused and TF paths differ only in summation order
GRADIENT_TOLERANCE = 1e-4
FINITE_DIFFERENCE_DELTA = 1e-6
OFFICIAL_BETA_A_RANGE = 2e-3  # as test_capsule_layers: keeps the official x5000 logit unsaturated

# Every routing option of `RoutingForm` (and standardised costs), each beside the paper's equations.
OPTIONS = {
    "paper": dict(),
    "official_activation": dict(form=dict(activation="official")),
    "mean_momentum": dict(form=dict(mean_momentum=em_routing.OFFICIAL_MEAN_MOMENTUM)),
    "mass_epsilon": dict(form=dict(mass_epsilon=em_routing.OFFICIAL_CONV_MASS_EPSILON)),
    "normalise_over_positions": dict(form=dict(normalise_over="positions")),
    "no_assignment_gradient": dict(form=dict(assignment_gradient=False)),
    "cost_scale": dict(form=dict(cost_scale=em_routing.IBM_COST_SCALE)),
    "standardise_costs": dict(standardise_costs=True),
    "official": dict(
        form=dict(
            activation="official",
            mean_momentum=em_routing.OFFICIAL_MEAN_MOMENTUM,
            mass_epsilon=em_routing.OFFICIAL_CONV_MASS_EPSILON,
            normalise_over="positions",
        )
    ),
}


def _layer_options(option, rng, weight_shape, parents):
    """Layer keyword arguments (initialisers, form, standardise_costs) for an OPTIONS entry."""
    settings = OPTIONS[option]
    weights, beta_v, beta_a = _routing_variables(rng, weight_shape, parents)
    form = cl.RoutingForm(**settings.get("form", {}))
    if form.activation == "official":
        beta_a = beta_a * OFFICIAL_BETA_A_RANGE
    options = dict(_initializers(weights, beta_v, beta_a), form=form)
    options["standardise_costs"] = settings.get("standardise_costs", False)
    return options, (weights, beta_v, beta_a)


def _outputs_and_gradients(make_layer, poses, activations, kernel):
    """The layer's outputs and the gradients of a fixed random projection of them w.r.t. inputs and variables."""
    with tf.Graph().as_default():
        poses_t, activations_t = tf.constant(poses), tf.constant(activations)
        layer = make_layer(kernel)
        out_poses, out_activations = layer(poses_t, activations_t)
        rng = np.random.RandomState(99)
        loss = tf.reduce_sum(out_poses * rng.normal(size=out_poses.shape.as_list()))
        loss += tf.reduce_sum(out_activations * rng.normal(size=out_activations.shape.as_list()))
        grads = tf.gradients(loss, [poses_t, activations_t] + layer.variables)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run([out_poses, out_activations]), sess.run(grads)


class FusedOpsTest(parameterized.TestCase, tf.test.TestCase):
    """The kernels against NumPy, in float64 and float32, and their registered gradients."""

    def _inputs(self, dtype, weight_types=4):
        rng = np.random.RandomState(0)
        votes = rng.normal(size=[3, 4, 7, 16]).astype(dtype)  # [NP, O, C, 16]
        weights = rng.uniform(size=[3, weight_types, 7]).astype(dtype)  # [NP, O or 1, C]
        linear, quadratic = rng.normal(size=[2, 3, 4, 16]).astype(dtype)  # [NP, O, 16] each
        constant = rng.normal(size=[3, 4]).astype(dtype)  # [NP, O]
        per_child = [rng.normal(size=[3, o, 7]).astype(dtype) for o in (4, 1, 4)]  # k = 3 x [NP, O or 1, C]
        rows = rng.normal(size=[2, 3, 3, 4, 16]).astype(dtype)  # L and S: k x [NP, O, 16] each
        return votes, weights, linear, quadratic, constant, per_child, rows

    def _vote_inputs(self, dtype, factored):
        """Votes `[3, 4, 7, 16]` as a tensor, or as `VoteFactors` (poses `[3, 7, 16]`, weights `[4, 7, 16]`)."""
        if not factored:
            return self._inputs(dtype)[0], self._inputs(dtype)[0]
        rng = np.random.RandomState(5)
        poses, weights = rng.normal(size=[3, 7, 16]).astype(dtype), rng.normal(size=[4, 7, 16]).astype(dtype)
        votes = np.einsum("nirk,oikc->noirc", poses.reshape(3, 7, 4, 4), weights.reshape(4, 7, 4, 4))
        return capsule_ops.VoteFactors(poses, weights), votes.reshape(3, 4, 7, 16)

    @parameterized.parameters(
        (np.float64, 1e-12, 4, False),
        (np.float32, 1e-5, 4, False),
        (np.float64, 1e-12, 1, False),
        (np.float64, 1e-12, 4, True),
        (np.float32, 1e-5, 4, True),
        (np.float64, 1e-12, 1, True),
    )
    def test_ops_match_numpy(self, dtype, tolerance, weight_types, factored):
        """Centred sums, weighted sums about a centre and masses (r per type or shared), centred quadratic forms
        and the votes gradient equal their einsums, on stored votes and on votes recomputed from factors."""
        _, weights, linear, quadratic, constant, per_child, rows = self._inputs(dtype, weight_types)
        source, votes = self._vote_inputs(dtype, factored)
        centre = np.random.RandomState(6).normal(size=[3, 4, 16]).astype(dtype)  # [NP, O, 16]
        r = np.broadcast_to(weights, votes.shape[:3])
        mass = np.sum(r, axis=-1, keepdims=True)  # [NP, O, 1]
        mean = np.einsum("noc,noch->noh", r, votes) / (mass + em_routing._SAFE_DIVIDE_EPSILON)
        about = votes - centre[:, :, None]  # [NP, O, C, 16]
        forms = np.einsum("noch,noh->noc", about, linear) + np.einsum("noch,noh->noc", about**2, quadratic)
        expected = [
            mean,
            np.einsum("noc,noch->noh", r, (votes - mean[:, :, None]) ** 2),
            mass,
            np.einsum("noc,noch->noh", r, about),
            np.einsum("noc,noch->noh", r, about**2),
            mass,
            forms + constant[..., None],
        ]
        with self.session() as sess:
            actual = sess.run(
                list(capsule_ops.centred_sums(source, weights, em_routing._SAFE_DIVIDE_EPSILON))
                + list(capsule_ops.weighted_sums(source, weights, centre))
                + [capsule_ops.quadratic_forms(source, linear, quadratic, constant, centre)]
            )
            gradient = sess.run(capsule_ops.votes_gradient(votes, per_child, list(rows[0]), list(rows[1])))
        expected_gradient = sum(
            np.broadcast_to(u, votes.shape[:3])[..., None] * (lin[:, :, None] + 2 * votes * sq[:, :, None])
            for u, lin, sq in zip(per_child, *rows)
        )
        for value, target in zip(actual + [gradient], expected + [expected_gradient]):
            self.assertEqual(value.dtype, dtype)
            self.assertLess(_relative_error(value, target), tolerance)

    @parameterized.parameters((1, False), (4, False), (1, True), (4, True))
    def test_op_gradients_match_finite_differences(self, weight_types, factored):
        """The registered gradients of centred_sums, weighted_sums and quadratic_forms w.r.t. every input: the
        votes or their factors, r, a, b, c and the centre (float64)."""
        _, weights, linear, quadratic, constant, _, _ = self._inputs(np.float64, weight_types)
        source, _ = self._vote_inputs(np.float64, factored)
        vote_inputs = [tf.constant(x) for x in (source if factored else [source])]
        votes = capsule_ops.VoteFactors(*vote_inputs) if factored else vote_inputs[0]
        centre = np.random.RandomState(6).normal(size=[3, 4, 16])
        inputs = [tf.constant(x) for x in (weights, linear, quadratic, constant, centre)]
        mean, squares, mass = capsule_ops.centred_sums(votes, inputs[0], em_routing._SAFE_DIVIDE_EPSILON)
        sums, about_squares, _ = capsule_ops.weighted_sums(votes, inputs[0], inputs[4])
        forms = capsule_ops.quadratic_forms(votes, *inputs[1:])
        loss = tf.reduce_sum(tf.sin(mean)) + tf.reduce_sum(tf.cos(squares)) + tf.reduce_sum(tf.sin(forms))
        loss += tf.reduce_sum(tf.sin(2.0 * mass)) + tf.reduce_sum(tf.sin(sums)) + tf.reduce_sum(tf.cos(about_squares))
        with self.session():
            for x in vote_inputs + inputs:
                error = tf.test.compute_gradient_error(x, x.shape.as_list(), loss, [], delta=FINITE_DIFFERENCE_DELTA)
                self.assertLess(error, GRADIENT_TOLERANCE, x.name)

    @parameterized.parameters((np.float64, 1e-12), (np.float32, 1e-5))
    def test_votes_op_matches_numpy(self, dtype, tolerance):
        """votes: M_ni W_oi per pair in the parent-major layout; its gradient op against einsums."""
        rng = np.random.RandomState(1)
        poses, weights = rng.normal(size=[5, 7, 16]).astype(dtype), rng.normal(size=[3, 7, 16]).astype(dtype)
        grad = rng.normal(size=[5, 3, 7, 16]).astype(dtype)
        m, w, g = poses.reshape(5, 7, 4, 4), weights.reshape(3, 7, 4, 4), grad.reshape(5, 3, 7, 4, 4)
        expected = [
            np.einsum("nirk,oikc->noirc", m, w).reshape(5, 3, 7, 16),
            np.einsum("noirc,oikc->nirk", g, w).reshape(5, 7, 16),
            np.einsum("nirk,noirc->oikc", m, g).reshape(3, 7, 16),
        ]
        poses_t, weights_t = tf.constant(poses), tf.constant(weights)
        votes = capsule_ops.votes(poses_t, weights_t)
        with self.session() as sess:
            actual = sess.run([votes] + tf.gradients(votes, [poses_t, weights_t], grad))
        for value, target in zip(actual, expected):
            self.assertLess(_relative_error(value, target), tolerance)

    def test_routing_votes_backward(self):
        """routing_votes_backward (votes recomputed inside) equals the votes' gradient op applied to
        votes_gradient's dL/dV."""
        rng = np.random.RandomState(4)
        poses, weights = tf.constant(rng.normal(size=[5, 7, 16])), tf.constant(rng.normal(size=[3, 7, 16]))
        per_child = [rng.normal(size=[5, types, 7]) for types in (1, 3)]  # k = 2 x [NP, O or 1, C]
        rows = [[rng.normal(size=[5, 3, 16]) for _ in range(2)] for _ in range(2)]  # L and S: k x [NP, O, 16]
        votes = capsule_ops.votes(poses, weights)
        votes_grad = capsule_ops.votes_gradient(votes, per_child, *rows)
        with self.session() as sess:
            actual = sess.run(capsule_ops.routing_votes_backward(poses, weights, per_child, *rows))
            expected = sess.run(tf.gradients(capsule_ops.votes(poses, weights), [poses, weights], votes_grad))
        for value, target in zip(actual, expected):
            self.assertLess(_relative_error(value, target), 1e-12)

    def test_votes_gradient_matches_finite_differences(self):
        """The registered gradient of votes w.r.t. poses and weights (float64)."""
        rng = np.random.RandomState(2)
        inputs = [tf.constant(rng.normal(size=shape)) for shape in ([4, 6, 16], [3, 6, 16])]
        loss = tf.reduce_sum(tf.sin(capsule_ops.votes(*inputs)))
        with self.session():
            for x in inputs:
                error = tf.test.compute_gradient_error(x, x.shape.as_list(), loss, [], delta=FINITE_DIFFERENCE_DELTA)
                self.assertLess(error, GRADIENT_TOLERANCE)

    def test_bad_shapes(self):
        """Votes without 16 pose entries, or weights of another child count, are errors naming the shape."""
        with self.session() as sess:
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "votes must be"):
                sess.run(capsule_ops.centred_sums(np.zeros([2, 3, 4, 9]), np.zeros([2, 3, 4]), 0.0))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "weights must be"):
                sess.run(capsule_ops.centred_sums(np.zeros([2, 3, 4, 16]), np.zeros([2, 3, 5]), 0.0))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "centre must be"):
                sess.run(capsule_ops.weighted_sums(np.zeros([2, 3, 4, 16]), np.zeros([2, 3, 4]), np.zeros([2, 3, 9])))
            factors = capsule_ops.VoteFactors(np.zeros([2, 4, 16]), np.zeros([3, 5, 16]))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "poses must be"):
                sess.run(capsule_ops.centred_sums(factors, np.zeros([2, 3, 4]), 0.0))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "poses must be"):
                sess.run(capsule_ops.votes(np.zeros([2, 4, 16]), np.zeros([3, 5, 16])))


def _over_parents_numpy(values, child_ids, num_children, input_types, per_type):
    """Each patch entry's sum over the entries that hold the same child (loops; 0 at padded offsets)."""
    kk = values.shape[2] // input_types
    positions = len(child_ids) // kk
    ids = child_ids.reshape(positions, kk)
    by_offset = values.reshape(-1, positions, values.shape[1], kk, input_types).transpose(0, 1, 3, 2, 4)
    out = np.zeros(by_offset.shape[:3] + ((by_offset.shape[3] if per_type else 1), input_types))  # [N, P, KK, O, I]
    for p, k in zip(*np.nonzero(ids < num_children)):
        same = by_offset[:, ids == ids[p, k]]  # [N, parents that see the child, O, I]
        out[:, p, k] = np.sum(same, axis=1) if per_type else np.sum(same, axis=(1, 2))[:, None]
    return out.transpose(0, 1, 3, 2, 4).reshape(values.shape[0], -1, values.shape[2])


class NormaliseOverParentsTest(parameterized.TestCase, tf.test.TestCase):
    """normalise_over_parents (the conv E-step's normaliser) against NumPy loops, its gradient, its errors."""

    def _case(self, padding, stride, types=3, dtype=np.float64):
        field = cl.ReceptiveField(5, 4, 3, stride, padding)
        values = np.random.RandomState(5).normal(size=[2 * field.out_height * field.out_width, types, 9 * 2])
        return field, values.astype(dtype)

    @parameterized.named_parameters(
        ("%s_stride%d_%s" % (padding, stride, "per_type" if per_type else "all_types"), padding, stride, per_type)
        for padding, stride in (("VALID", 1), ("SAME", 1), ("SAME", 2), ("VALID", 2))
        for per_type in (True, False)
    )
    def test_normalise_matches_numpy_and_finite_differences(self, padding, stride, per_type):
        """R = exp(x) / (the child's sum of exp(x) over its parents), 0 in padding; its gradient (float64)."""
        field, values = self._case(padding, stride)
        numerators = np.exp(values)
        denominators = _over_parents_numpy(numerators, field.child_ids, field.num_children, 2, per_type)
        expected = np.where(denominators > 0, numerators / np.maximum(denominators, 1e-300), 0.0)
        values_t = tf.constant(values)
        ids = field.child_ids
        assignments = capsule_ops.normalise_over_parents(values_t, ids, per_type, field.num_children, 2)
        loss = tf.reduce_sum(tf.sin(3.0 * assignments))
        with self.session() as sess:
            self.assertLess(_relative_error(sess.run(assignments), expected), 1e-12)
            error = tf.test.compute_gradient_error(values_t, values.shape, loss, [], delta=FINITE_DIFFERENCE_DELTA)
            self.assertLess(error, GRADIENT_TOLERANCE)

    def test_bad_ids_and_shapes_are_errors(self):
        """Child ids out of range, values whose rows are not images x positions, or a gradient of another shape
        are errors naming them."""
        field, values = self._case("VALID", 1)
        ops, ids, children = capsule_ops.load(), field.child_ids, field.num_children
        with self.session() as sess:
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "child_ids must be in"):
                sess.run(capsule_ops.normalise_over_parents(values, ids + children + 1, True, children, 2))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "is not images x"):
                sess.run(capsule_ops.normalise_over_parents(values[1:], ids, True, children, 2))
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "every patch input must be"):
                gradient = ops.caps_normalise_over_parents_grad(
                    values, values[:, :1], ids, per_type=True, num_children=children, input_types=2
                )
                sess.run(gradient)


class FusedLayersTest(parameterized.TestCase, tf.test.TestCase):
    """ConvCaps and ClassCaps on the fused path: the reference, the TF path, finite differences."""

    def _conv_maker(self, padding, stride, option="paper", dtype=tf.float64, iterations=3):
        rng = np.random.RandomState(3)
        poses, activations = _random_capsules(rng, 2, 5, 5, 2)
        options, variables = _layer_options(option, rng, [3, 3, 2, 3, 4, 4], 3)

        def make(kernel):
            return cl.ConvCaps(3, 3, stride, padding, iterations, 0.1, dtype=dtype, routing_kernel=kernel, **options)

        return make, poses, activations, variables

    @parameterized.named_parameters(*GEOMETRIES)
    def test_conv_matches_reference_and_tf_path(self, padding, stride):
        """3 iterations, float64: the fused layer equals the loop reference (< 1e-5) and the TF path's outputs
        and gradients w.r.t. poses, activations and every variable (< 1e-9)."""
        make, poses, activations, variables = self._conv_maker(padding, stride)
        fused_outputs, fused_grads = _outputs_and_gradients(make, poses, activations, "fused")
        tf_outputs, tf_grads = _outputs_and_gradients(make, poses, activations, "tf")
        expected = ref.conv_caps_reference(poses, activations, *variables, 3, stride, padding, 3, 0.1)[:2]
        for value, target, other in zip(fused_outputs, expected, tf_outputs):
            self.assertLess(_relative_error(value, target), RELATIVE_TOLERANCE)
            self.assertLess(_relative_error(value, other), PATH_TOLERANCE)
        for value, other in zip(fused_grads, tf_grads):
            self.assertLess(_relative_error(value, other), PATH_TOLERANCE)

    @parameterized.named_parameters(*[(name, name) for name in OPTIONS if name != "paper"])
    def test_routing_options_match_tf_path(self, option):
        """Every routing option (SAME, stride 2, 3 iterations): fused outputs and gradients equal the TF path's."""
        make, poses, activations, _ = self._conv_maker("SAME", 2, option)
        fused_outputs, fused_grads = _outputs_and_gradients(make, poses, activations, "fused")
        tf_outputs, tf_grads = _outputs_and_gradients(make, poses, activations, "tf")
        for value, other in zip(fused_outputs + fused_grads, tf_outputs + tf_grads):
            self.assertLess(_relative_error(value, other), PATH_TOLERANCE)

    def test_float32_matches_reference(self):
        """float32 fused layer against the float64 reference: rel. error < 1e-4."""
        make, poses, activations, variables = self._conv_maker("VALID", 2, dtype=tf.float32)
        outputs, _ = _outputs_and_gradients(make, poses.astype(np.float32), activations.astype(np.float32), "fused")
        expected = ref.conv_caps_reference(poses, activations, *variables, 3, 2, "VALID", 3, 0.1)[:2]
        for value, target in zip(outputs, expected):
            self.assertLess(_relative_error(value, target), FLOAT32_TOLERANCE)

    def test_conv_gradients_match_finite_differences(self):
        """Fused ConvCaps (SAME, stride 2, 2 iterations): gradients w.r.t. inputs and variables."""
        rng = np.random.RandomState(6)
        poses, activations = _random_capsules(rng, 1, 4, 4, 2)
        poses_t, activations_t = tf.constant(poses), tf.constant(activations)
        variables = _routing_variables(rng, [3, 3, 2, 2, 4, 4], 2)
        layer = cl.ConvCaps(
            2, 3, 2, "SAME", 2, 0.5, dtype=tf.float64, routing_kernel="fused", **_initializers(*variables)
        )
        outputs = layer(poses_t, activations_t)
        with self.session():
            tf.global_variables_initializer().run()
            _assert_gradients_match_finite_differences(self, [poses_t, activations_t] + layer.variables, outputs)

    @parameterized.named_parameters(("paper", "paper"), ("official", "official"))
    def test_class_caps_with_coordinate_addition(self, option):
        """ClassCaps (coordinate addition, 3 iterations): fused equals the reference (paper form) and the TF
        path's outputs and gradients; finite differences of the fused gradients."""
        rng = np.random.RandomState(7)
        poses, activations = _random_capsules(rng, 2, 3, 4, 2)
        options, variables = _layer_options(option, rng, [2, 5, 4, 4], 5)
        options["form"] = dataclasses.replace(options["form"], normalise_over="positions_and_types")

        def make(kernel):
            return cl.ClassCaps(5, 3, 0.5, dtype=tf.float64, routing_kernel=kernel, **options)

        fused_outputs, fused_grads = _outputs_and_gradients(make, poses, activations, "fused")
        tf_outputs, tf_grads = _outputs_and_gradients(make, poses, activations, "tf")
        for value, other in zip(fused_outputs + fused_grads, tf_outputs + tf_grads):
            self.assertLess(_relative_error(value, other), PATH_TOLERANCE)
        if option == "paper":
            expected = ref.class_caps_reference(poses, activations, *variables, 3, 0.5)
            for value, target in zip(fused_outputs, expected):
                self.assertLess(_relative_error(value, target), RELATIVE_TOLERANCE)
        with self.session():
            poses_t, activations_t = tf.constant(poses[:1]), tf.constant(activations[:1])
            layer = make("fused")
            out_activations = layer(poses_t, activations_t)[1]
            tf.global_variables_initializer().run()
            for x in [poses_t, activations_t] + layer.variables:
                error = tf.test.compute_gradient_error(x, x.shape.as_list(), out_activations, [1, 5], delta=1e-6)
                self.assertLess(error, GRADIENT_TOLERANCE, x.name)

    def test_stress_inputs(self):
        """float32 conv + class layers on the fused path: all-zero input, saturated activations, huge and tiny
        poses, a parent with one child give finite outputs and gradients."""
        rng = np.random.RandomState(9)
        cases = [(0.0, 0.0, 3, 2), (1.0, 1.0, 3, 2), (1e4, 1.0, 3, 2), (1e-8, 0.5, 3, 2), (1.0, 0.5, 1, 1)]
        for pose_scale, activation, kernel_size, in_types in cases:
            with self.subTest((pose_scale, activation, kernel_size)), tf.Graph().as_default():
                poses_t = tf.constant(rng.normal(size=[2, 4, 4, in_types, 4, 4]) * pose_scale, tf.float32)
                activations_t = tf.constant(np.full([2, 4, 4, in_types], activation), tf.float32)
                conv = cl.ConvCaps(3, kernel_size, 1, "SAME", iterations=3, routing_kernel="fused")
                out_poses, out_activations = cl.class_caps(*conv(poses_t, activations_t), 4, routing_kernel="fused")
                loss = tf.reduce_sum(out_activations) + tf.reduce_sum(out_poses)
                grads = tf.gradients(loss, [poses_t, activations_t] + tf.trainable_variables())
                with tf.Session() as sess:
                    sess.run(tf.global_variables_initializer())
                    for value in sess.run([out_poses, out_activations] + grads):
                        self.assertTrue(np.all(np.isfinite(value)))


class BuildTest(tf.test.TestCase):
    """The build cache, the routing-kernel choice and the fallback."""

    def tearDown(self):
        capsule_ops.reset()  # later tests load the real library again
        super().tearDown()

    def test_missing_compiler_falls_back(self):
        """No compiler: 'auto' resolves to 'tf' with one line on stderr, 'fused' raises BuildError."""
        with unittest.mock.patch.dict(os.environ, {"CXX": "/nonexistent/g++"}):
            capsule_ops.reset()
            with unittest.mock.patch("sys.stderr") as stderr:
                self.assertEqual(capsule_ops.resolve("auto"), "tf")
                self.assertEqual(capsule_ops.resolve("auto"), "tf")
            self.assertEqual(stderr.write.call_count, 1)
            self.assertIn("using TensorFlow ops", stderr.write.call_args[0][0])
            with self.assertRaisesRegex(capsule_ops.BuildError, "no C\\+\\+ compiler"):
                capsule_ops.resolve("fused")
            layer = cl.ConvCaps(3, routing_kernel="auto")
            self.assertEqual(layer.routing_kernel, "tf")
        self.assertEqual(capsule_ops.resolve("tf"), "tf")
        with self.assertRaises(ValueError):
            capsule_ops.resolve("gpu")

    def test_cache_is_keyed_and_reused(self):
        """The library's folder depends on the -march choice; building twice returns the cached file."""
        native = ops_build.library_path()
        with unittest.mock.patch.dict(os.environ, {ops_build.MARCH_ENV: "x86-64-v3"}):
            self.assertNotEqual(ops_build.library_path(), native)
        path = ops_build.build()
        built = os.path.getmtime(path)
        self.assertEqual(ops_build.build(), path)
        self.assertEqual(os.path.getmtime(path), built)
        self.assertEqual(capsule_ops.resolve("auto"), "fused")

    def test_header_is_part_of_the_cache_key(self):
        """A change to the shared header (not a compiled source itself) gives another library folder."""
        with tempfile.TemporaryDirectory() as folder:
            header = os.path.join(folder, "op_common.h")
            paths = []
            for text in ("// one\n", "// two\n"):
                with open(header, "w") as stream:
                    stream.write(text)
                with unittest.mock.patch.object(ops_build, "HEADERS", (header,)):
                    paths.append(ops_build.library_path())
        self.assertNotEqual(paths[0], paths[1])

    def test_compile_error_is_one_short_line(self):
        """A failing compiler gives a BuildError of one line: the sources, the error count, the first error."""
        with tempfile.TemporaryDirectory() as folder:
            compiler = os.path.join(folder, "g++")
            with open(compiler, "w") as script:
                script.write('#!/bin/sh\necho "/a/long/path/Header.h:7:3: error: boom" >&2\n')
                script.write('echo "/a/long/path/Header.h:9:1: error: bang" >&2\nexit 1\n')
            os.chmod(compiler, 0o755)
            environment = {"CXX": compiler, ops_build.CACHE_ENV: folder}
            with unittest.mock.patch.dict(os.environ, environment), self.assertRaises(capsule_ops.BuildError) as error:
                ops_build.build()
        self.assertEqual(
            str(error.exception),
            "compiling kernels.cc, votes_kernels.cc, fold_kernels.cc failed (2 errors), "
            "first: Header.h:7:3: error: boom",
        )

    def test_fp16_targets_are_built_without_it(self):
        """A target with AVX512-FP16 is compiled with -mno-avx512fp16 (TF's Eigen FP16 packets break g++ 12)."""
        for march, expected in (("sapphirerapids", True), ("x86-64-v3", False)):
            with self.subTest(march=march), unittest.mock.patch.dict(os.environ, {ops_build.MARCH_ENV: march}):
                command = ops_build.compile_command("out.so")
                self.assertIn("-march=" + march, command)
                self.assertEqual(ops_build.NO_FP16_FLAG in command, expected)

    def test_model_routes_on_the_fused_kernels_by_default(self):
        """With a compiler and no GPU, the default HParams (routing_kernel 'auto') build the network on the fused
        ops that recompute the votes."""
        net = model.CapsNetEMModel(hparams.hparams_for("small"))
        net.inference(tf.zeros([2, 28, 28, 1]))
        routed = [layer for layer in net.layers if isinstance(layer, cl.RoutedCapsuleLayer)]
        self.assertEqual([layer.routing_kernel for layer in routed], ["fused"] * 3)
        op_types = {op.type for op in tf.get_default_graph().get_operations()}
        recomputing = {"CapsCentredSumsFromFactors", "CapsQuadraticFormsFromFactors"}
        self.assertTrue(recomputing <= op_types)

    def test_gpu_visible_picks_tf_ops(self):
        """With a GPU visible (its count mocked): 'auto' resolves to 'tf' and builds nothing, the layers and the
        model route on TF ops, 'fused' is a KernelChoiceError and, through main.py, a one-line usage error."""
        import main  # here: main.py parses flags at import time only when run

        with unittest.mock.patch.object(capsule_ops, "gpu_count", return_value=1):
            with unittest.mock.patch.object(capsule_ops, "load", side_effect=AssertionError("built")):
                self.assertEqual(capsule_ops.resolve("auto"), "tf")
                self.assertEqual(cl.ConvCaps(3, routing_kernel="auto").routing_kernel, "tf")
                net = model.CapsNetEMModel(hparams.hparams_for("small"))
                net.inference(tf.zeros([2, 28, 28, 1]))
            op_types = {op.type for op in tf.get_default_graph().get_operations()}
            self.assertFalse({name for name in op_types if name.startswith("Caps")})
            with self.assertRaisesRegex(capsule_ops.KernelChoiceError, "CPU kernels only and 1 GPU"):
                capsule_ops.resolve("fused")
            values = dict(preset="small", dataset="mnist", norb_channels=1, routing_kernel="fused")
            with self.assertRaises(main.UsageError) as raised:
                main.resolve_hparams(values)
            self.assertEqual(len(str(raised.exception).splitlines()), 1)
            self.assertTrue(str(raised.exception).startswith("--routing_kernel: "))
            self.assertEqual(main.resolve_hparams(dict(values, routing_kernel="auto")).routing_kernel, "auto")
        with unittest.mock.patch.object(capsule_ops, "gpu_count", return_value=0):
            self.assertEqual(capsule_ops.resolve("fused"), "fused")

    def test_hparams_choice(self):
        """routing_kernel is an HParams field: 'auto' by default, one of auto/fused/tf."""
        self.assertEqual(hparams.HParams().routing_kernel, "auto")
        self.assertEqual(hparams.HParams().parse("routing_kernel=tf").validate().routing_kernel, "tf")
        with self.assertRaisesRegex(ValueError, "routing_kernel"):
            hparams.HParams(routing_kernel="gpu").validate()
