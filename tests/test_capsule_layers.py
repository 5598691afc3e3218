"""Tests of capsule_layers.py against the float64 loop reference in numpy_reference.py."""

import itertools

from absl.testing import parameterized

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_layers as cl
from routing import em_routing
import numpy_reference as ref

CONFIGS = list(itertools.product(("VALID", "SAME"), (1, 2)))  # (padding, stride)
GEOMETRIES = [("%s_stride%d" % config, *config) for config in CONFIGS]  # named test cases
RELATIVE_TOLERANCE = 1e-5  # issue acceptance: float64 TF vs reference
GRADIENT_TOLERANCE = 1e-4
FINITE_DIFFERENCE_DELTA = 1e-6  # float64 central differences: truncation ~1e-12, rounding ~1e-10


def _random_capsules(rng, batch, height, width, types, pose_scale=1.0):
    poses = rng.normal(scale=pose_scale, size=[batch, height, width, types, 4, 4])
    activations = rng.uniform(0.1, 0.9, size=[batch, height, width, types])
    return poses, activations


def _relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12)


def _assert_gradients_match_finite_differences(test, inputs, outputs, label=(), skip=()):
    """Every d output / d input of `outputs` x `inputs` within GRADIENT_TOLERANCE of float64 central differences,
    in the current session (variables initialised); pairs (input, output) in `skip` are left out."""
    for x in inputs:
        for y in outputs:
            if any(x is skipped_x and y is skipped_y for skipped_x, skipped_y in skip):
                continue
            error = tf.test.compute_gradient_error(
                x, x.shape.as_list(), y, y.shape.as_list(), delta=FINITE_DIFFERENCE_DELTA
            )
            test.assertLess(error, GRADIENT_TOLERANCE, tuple(label) + (x.name, y.name))


def _routing_variables(rng, weight_shape, parents):
    return (rng.normal(scale=0.5, size=weight_shape), rng.uniform(0.0, 1.0, parents), rng.uniform(0.0, 1.0, parents))


def _initializers(weights, beta_v, beta_a):
    return dict(
        weights_initializer=tf.constant_initializer(weights),
        beta_v_initializer=tf.constant_initializer(beta_v),
        beta_a_initializer=tf.constant_initializer(beta_a),
    )


class ReceptiveFieldTest(parameterized.TestCase, tf.test.TestCase):
    def test_fold_one_dimensional_example(self):
        """Size-2, stride-1 patches of [1, 2, 3, 4] fold back to [1, 4, 6, 4], not [6, 9]."""
        field = cl.ReceptiveField(1, 4, (1, 2), 1, "VALID")
        patches = np.array([[1, 2], [2, 3], [3, 4]], np.float64).reshape(1, 1, 3, 1, 2, 1)
        with self.session() as sess:
            folded = sess.run(field.fold(tf.constant(patches)))
        self.assertAllClose(folded.ravel(), [1.0, 4.0, 6.0, 4.0])

    @parameterized.named_parameters(*GEOMETRIES)
    def test_fold_matches_brute_force(self, padding, stride):
        """The dense fold equals a loop over parents and offsets, for VALID/SAME and strides 1/2."""
        rng = np.random.RandomState(0)
        field = cl.ReceptiveField(6, 5, 3, stride, padding)
        patches = rng.normal(size=[2, field.out_height, field.out_width, 3, 3, 4])
        with self.session() as sess:
            folded = sess.run(field.fold(tf.constant(patches)))
        self.assertAllClose(folded, ref.fold_reference(patches, 6, 5, 3, stride, padding), atol=1e-12)

    @parameterized.named_parameters(*GEOMETRIES)
    def test_fold_max_matches_brute_force(self, padding, stride):
        """The fold-max (the E-step's per-child shift) is the maximum over every patch holding the child."""
        rng = np.random.RandomState(1)
        field = cl.ReceptiveField(5, 5, 3, stride, padding)
        patches = rng.normal(size=[1, field.out_height, field.out_width, 3, 3, 2])
        expected = np.full([1, 5, 5, 2], -np.inf)
        _, _, pad_top, pad_left = ref.conv_geometry(5, 5, 3, stride, padding)
        offsets = itertools.product(range(field.out_height), range(field.out_width), range(3), range(3))
        for oh, ow, kh, kw in offsets:
            h, w = oh * stride + kh - pad_top, ow * stride + kw - pad_left
            if 0 <= h < 5 and 0 <= w < 5:
                expected[0, h, w] = np.maximum(expected[0, h, w], patches[0, oh, ow, kh, kw])
        with self.session() as sess:
            folded = sess.run(field.fold(tf.constant(patches), "max"))
        seen = np.isfinite(expected)
        self.assertAllClose(folded[seen], expected[seen])

    def test_parent_counts(self):
        """Corner, edge and centre children are seen by the right number of parent positions."""
        field = cl.ReceptiveField(5, 5, 3, 1, "VALID")
        self.assertAllEqual(field.parent_positions[0], [1, 2, 3, 2, 1])
        self.assertEqual(field.parent_positions[2, 2], 9)
        uncovered = cl.ReceptiveField(6, 6, 3, 2, "VALID")  # rows/cols 0..4 covered, 5 not
        self.assertEqual(uncovered.parent_positions[5].sum(), 0)


class PrimaryCapsTest(tf.test.TestCase):
    def test_shapes_variables_and_reference(self):
        """Output shapes, the 4 variables, and float64 agreement with the loop reference."""
        rng = np.random.RandomState(2)
        features = rng.normal(size=[2, 6, 6, 3])
        layer = cl.PrimaryCaps(types=4, kernel_size=3, stride=2, padding="SAME", dtype=tf.float64)
        poses, activations = layer(tf.constant(features))
        self.assertEqual(poses.shape.as_list(), [2, 3, 3, 4, 4, 4])
        self.assertEqual(activations.shape.as_list(), [2, 3, 3, 4])
        self.assertEqual(
            sorted(v.op.name for v in layer.variables),
            [
                "primary_caps/activation_bias",
                "primary_caps/activation_kernel",
                "primary_caps/pose_bias",
                "primary_caps/pose_kernel",
            ],
        )
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            sess.run([layer.pose_bias.assign(rng.normal(size=64)), layer.activation_bias.assign(rng.normal(size=4))])
            values = sess.run(
                [poses, activations, layer.pose_kernel, layer.pose_bias, layer.activation_kernel, layer.activation_bias]
            )
        expected = ref.primary_caps_reference(features, *values[2:], stride=2, padding="SAME")
        self.assertLess(_relative_error(values[0], expected[0]), RELATIVE_TOLERANCE)
        self.assertLess(_relative_error(values[1], expected[1]), RELATIVE_TOLERANCE)


class ConvCapsTest(parameterized.TestCase, tf.test.TestCase):
    def _build(
        self,
        rng,
        padding,
        stride,
        height=5,
        in_types=2,
        out_types=3,
        iterations=3,
        final_lambda=0.01,
        standardise_costs=False,
    ):
        poses, activations = _random_capsules(rng, 2, height, height, in_types)
        variables = _routing_variables(rng, [3, 3, in_types, out_types, 4, 4], out_types)
        layer = cl.ConvCaps(
            out_types,
            3,
            stride,
            padding,
            iterations,
            final_lambda,
            dtype=tf.float64,
            standardise_costs=standardise_costs,
            **_initializers(*variables),
        )
        outputs = layer(tf.constant(poses), tf.constant(activations))
        return layer, outputs, poses, activations, variables

    @parameterized.named_parameters(*GEOMETRIES)
    def test_output_shapes(self, padding, stride):
        """Output grids follow tf.nn.conv2d for VALID/SAME x stride 1/2, with an unknown batch size."""
        expected = {("VALID", 1): 5, ("VALID", 2): 3, ("SAME", 1): 7, ("SAME", 2): 4}
        with tf.Graph().as_default():
            poses = tf.placeholder(tf.float32, [None, 7, 7, 4, 4, 4])
            activations = tf.placeholder(tf.float32, [None, 7, 7, 4])
            out_poses, out_activations = cl.conv_caps(poses, activations, 5, 3, stride, padding)
            size = expected[(padding, stride)]
            self.assertEqual(out_poses.shape.as_list(), [None, size, size, 5, 4, 4])
            self.assertEqual(out_activations.shape.as_list(), [None, size, size, 5])

    def test_variables(self):
        """Three variables per layer: weights [K, K, I, O, 4, 4], beta_v [O], beta_a [O]; reused on a second call."""
        poses = tf.zeros([1, 5, 5, 2, 4, 4])
        activations = tf.zeros([1, 5, 5, 2])
        layer = cl.ConvCaps(3, 3, 1, name="conv_caps1")
        layer(poses, activations)
        layer(poses, activations)
        shapes = {v.op.name: v.shape.as_list() for v in tf.global_variables()}
        self.assertEqual(
            shapes, {"conv_caps1/weights": [3, 3, 2, 3, 4, 4], "conv_caps1/beta_v": [3], "conv_caps1/beta_a": [3]}
        )

    @parameterized.named_parameters(*GEOMETRIES)
    def test_matches_numpy_reference(self, padding, stride):
        """A whole forward pass with 3 routing iterations equals the float64 loop reference (rel. error < 1e-5)."""
        with tf.Graph().as_default(), self.session() as sess:
            rng = np.random.RandomState(3)
            layer, outputs, poses, activations, variables = self._build(rng, padding, stride)
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
        expected_poses, expected_activations, _ = ref.conv_caps_reference(
            poses, activations, *variables, 3, stride, padding, 3, 0.01
        )
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE, (padding, stride))
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    @parameterized.named_parameters(*GEOMETRIES)
    def test_standardised_costs_match_numpy_reference(self, padding, stride):
        """With standardised costs the forward pass equals the float64 reference (rel. error < 1e-5).

        Two iterations: dividing by the spread of 3 costs amplifies the last-bit differences between
        E[V^2] - mu^2 and the reference's two-pass variance, and a third EM iteration amplifies them
        past 1e-5 on these random votes (measured: 1e-4 at iteration 3, 1e-7 at iteration 2).
        """
        with tf.Graph().as_default(), self.session() as sess:
            rng = np.random.RandomState(5)
            layer, outputs, poses, activations, variables = self._build(
                rng, padding, stride, iterations=2, final_lambda=1.0, standardise_costs=True
            )
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
        expected_poses, expected_activations, _ = ref.conv_caps_reference(
            poses, activations, *variables, 3, stride, padding, 2, 1.0, standardise_costs=True
        )
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE, (padding, stride))
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    @parameterized.named_parameters(*GEOMETRIES)
    def test_assignments_match_reference(self, padding, stride):
        """The final assignments R, mapped to (child, parent) pairs, equal the reference's."""
        with tf.Graph().as_default(), self.session() as sess:
            rng = np.random.RandomState(4)
            layer, _, poses, activations, variables = self._build(rng, padding, stride)
            sess.run(tf.global_variables_initializer())
            assignments = sess.run(layer.end_points["assignments"])  # [N*P, O, KKI]
        _, _, expected = ref.conv_caps_reference(poses, activations, *variables, 3, stride, padding, 3, 0.01)
        field = layer.field
        _, _, pad_top, pad_left = ref.conv_geometry(5, 5, 3, stride, padding)
        r = assignments.reshape(2, field.out_height, field.out_width, 3, 3, 3, 2)  # [N, OH, OW, O, K, K, I]
        r = np.transpose(r, [4, 5, 6, 0, 1, 2, 3])  # [K, K, I, N, OH, OW, O]
        mapped = np.zeros_like(expected)
        for kh, kw, i, n, oh, ow in itertools.product(
            range(3), range(3), range(2), range(2), range(field.out_height), range(field.out_width)
        ):
            h, w = oh * stride + kh - pad_top, ow * stride + kw - pad_left
            if 0 <= h < 5 and 0 <= w < 5:
                parent = (oh * field.out_width + ow) * 3
                mapped[n, (h * 5 + w) * 2 + i, parent : parent + 3] = r[kh, kw, i, n, oh, ow]
            else:
                self.assertAllEqual(r[kh, kw, i, n, oh, ow], np.zeros(3))  # padded offsets hold no child
        self.assertAllClose(mapped, expected, atol=1e-9)

    def _child_sums(self, layer, assignments):
        """Sums R [N*P, O, KKI] over every parent of each child: [N, H, W, I]."""
        field = layer.field
        kk, in_types = int(np.prod(layer.kernel_size)), layer.input_types
        per_offset = tf.reduce_sum(assignments, axis=1)  # [NP, KKI]
        per_offset = tf.reshape(per_offset, [-1, field.out_height, field.out_width, kk, in_types])
        return field.fold(per_offset)

    @parameterized.named_parameters(
        *[
            ("%s_stride%d_iterations%d" % (padding, stride, iterations), padding, stride, iterations)
            for (padding, stride), iterations in itertools.product(CONFIGS + [("VALID", 3)], (1, 3))
        ]
    )
    def test_assignments_sum_to_one_per_child(self, padding, stride, iterations):
        """Every child's final and initial R sum to 1 over all parents that see it (corners and edges too)."""
        with tf.Graph().as_default(), self.session() as sess:
            rng = np.random.RandomState(5)
            layer, _, _, _, _ = self._build(rng, padding, stride, height=6, iterations=iterations)
            sums = self._child_sums(layer, layer.end_points["assignments"])
            sess.run(tf.global_variables_initializer())
            sums = sess.run(sums)
        covered = np.broadcast_to(layer.field.parent_positions[None, :, :, None] > 0, sums.shape)
        self.assertAllClose(sums[covered], np.ones(covered.sum()), atol=1e-12)
        self.assertAllEqual(sums[~covered], np.zeros((~covered).sum()))

    @parameterized.named_parameters(("VALID_stride1", "VALID", 1), ("SAME_stride2", "SAME", 2))
    def test_gradients(self, padding, stride):
        """Analytic gradients of poses and activations w.r.t. every input and variable match finite differences."""
        with tf.Graph().as_default(), self.session():
            rng = np.random.RandomState(6)
            poses, activations = _random_capsules(rng, 1, 4, 4, 2)
            poses_t, activations_t = tf.constant(poses), tf.constant(activations)
            layer = cl.ConvCaps(
                2,
                3,
                stride,
                padding,
                iterations=2,
                final_lambda=0.5,
                dtype=tf.float64,
                **_initializers(*_routing_variables(rng, [3, 3, 2, 2, 4, 4], 2)),
            )
            out_poses, out_activations = layer(poses_t, activations_t)
            tf.global_variables_initializer().run()
            inputs = [poses_t, activations_t] + layer.variables
            _assert_gradients_match_finite_differences(self, inputs, (out_poses, out_activations), (padding, stride))


class ClassCapsTest(tf.test.TestCase):
    def test_shapes_and_variables(self):
        """Output [N, C, 4, 4] and [N, C]; weights [I, C, 4, 4] shared over positions, beta_v/beta_a [C]."""
        poses = tf.placeholder(tf.float32, [None, 3, 3, 4, 4, 4])
        out_poses, out_activations = cl.class_caps(poses, tf.placeholder(tf.float32, [None, 3, 3, 4]), 10)
        self.assertEqual(out_poses.shape.as_list(), [None, 10, 4, 4])
        self.assertEqual(out_activations.shape.as_list(), [None, 10])
        shapes = {v.op.name: v.shape.as_list() for v in tf.global_variables()}
        self.assertEqual(
            shapes, {"class_caps/weights": [4, 10, 4, 4], "class_caps/beta_v": [10], "class_caps/beta_a": [10]}
        )

    def test_matches_numpy_reference(self):
        """Votes with coordinate addition and 3 routing iterations equal the float64 loop reference."""
        rng = np.random.RandomState(7)
        poses, activations = _random_capsules(rng, 2, 3, 4, 2)
        variables = _routing_variables(rng, [2, 5, 4, 4], 5)
        layer = cl.ClassCaps(5, iterations=3, final_lambda=0.01, dtype=tf.float64, **_initializers(*variables))
        outputs = layer(tf.constant(poses), tf.constant(activations))
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
        expected_poses, expected_activations = ref.class_caps_reference(poses, activations, *variables, 3, 0.01)
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE)
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    def test_standardised_costs_match_numpy_reference(self):
        """With standardised costs the class activations equal the reference's, and their gradients are exact."""
        rng = np.random.RandomState(9)
        poses, activations = _random_capsules(rng, 2, 3, 4, 2)
        variables = _routing_variables(rng, [2, 5, 4, 4], 5)
        poses_t, activations_t = tf.constant(poses), tf.constant(activations)
        layer = cl.ClassCaps(
            5, iterations=3, final_lambda=1.0, standardise_costs=True, dtype=tf.float64, **_initializers(*variables)
        )
        outputs = layer(poses_t, activations_t)
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
            for x in [poses_t, activations_t] + layer.variables:
                error = tf.test.compute_gradient_error(
                    x, x.shape.as_list(), outputs[1], [2, 5], delta=FINITE_DIFFERENCE_DELTA
                )
                self.assertLess(error, GRADIENT_TOLERANCE, x.name)
        expected_poses, expected_activations = ref.class_caps_reference(
            poses, activations, *variables, 3, 1.0, standardise_costs=True
        )
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE)
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    def test_coordinate_addition_entries(self):
        """With zero weights every vote is the scaled cell centre in entries [0, 3] (row) and [1, 3] (column)."""
        layer = cl.ClassCaps(2, iterations=1, dtype=tf.float64, weights_initializer=tf.zeros_initializer())
        layer(tf.ones([1, 2, 4, 1, 4, 4], tf.float64), tf.ones([1, 2, 4, 1], tf.float64))
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            votes = sess.run(layer.end_points["votes"])  # [N, C, H*W*I, 16]
        votes = np.transpose(votes.reshape(2, 2, 4, 4, 4), [1, 2, 3, 0, 4])  # [H, W, 4, C, 4]
        self.assertAllClose(votes[:, :, 0, :, 3], np.broadcast_to([[0.25], [0.75]], [2, 4])[..., None] * np.ones(2))
        self.assertAllClose(
            votes[:, :, 1, :, 3], np.broadcast_to([0.125, 0.375, 0.625, 0.875], [2, 4])[..., None] * np.ones(2)
        )
        votes[:, :, 0:2, :, 3] = 0.0
        self.assertAllEqual(votes, np.zeros_like(votes))

    def test_gradients(self):
        """Class-capsule gradients w.r.t. inputs and variables match finite differences."""
        rng = np.random.RandomState(8)
        poses, activations = _random_capsules(rng, 2, 2, 2, 2)
        poses_t, activations_t = tf.constant(poses), tf.constant(activations)
        layer = cl.ClassCaps(
            3,
            iterations=3,
            final_lambda=0.5,
            dtype=tf.float64,
            **_initializers(*_routing_variables(rng, [2, 3, 4, 4], 3)),
        )
        outputs = layer(poses_t, activations_t)
        with self.session():
            tf.global_variables_initializer().run()
            _assert_gradients_match_finite_differences(self, [poses_t, activations_t] + layer.variables, outputs)


class NumericalStressTest(tf.test.TestCase):
    """Adversarial inputs must give finite outputs and finite gradients (float32, as in training)."""

    CASES = {
        "all_zero": (0.0, 0.0),
        "activations_all_one": (1.0, 1.0),
        "huge_poses": (1e4, 1.0),
        "tiny_poses": (1e-8, 0.5),
    }

    def _check_finite(self, poses, activations, kernel_size=3, final_lambda=0.01, in_types=2):
        poses_t = tf.constant(poses, tf.float32)
        activations_t = tf.constant(activations, tf.float32)
        conv = cl.ConvCaps(3, kernel_size, 1, "SAME", iterations=3, final_lambda=final_lambda)
        hidden = conv(poses_t, activations_t)
        out_poses, out_activations = cl.class_caps(*hidden, 4, iterations=3, final_lambda=final_lambda)
        loss = tf.reduce_sum(out_activations) + tf.reduce_sum(out_poses)
        grads = tf.gradients(loss, [poses_t, activations_t] + tf.trainable_variables())
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            for value in sess.run([out_poses, out_activations] + grads):
                self.assertTrue(np.all(np.isfinite(value)))

    def test_stress_inputs(self):
        """All-zero input, saturated activations (exactly 0 and 1), huge and tiny poses."""
        rng = np.random.RandomState(9)
        for name, (pose_scale, activation) in self.CASES.items():
            with self.subTest(name), tf.Graph().as_default():
                poses = rng.normal(size=[2, 4, 4, 2, 4, 4]) * pose_scale
                self._check_finite(poses, np.full([2, 4, 4, 2], activation))
        with tf.Graph().as_default():
            saturated = (rng.uniform(size=[2, 4, 4, 2]) > 0.5).astype(np.float32)  # mixture of exact 0 and 1
            self._check_finite(rng.normal(size=[2, 4, 4, 2, 4, 4]), saturated)

    def test_parent_with_single_child(self):
        """A 1x1 kernel over one input type: every parent sees exactly one child."""
        rng = np.random.RandomState(10)
        self._check_finite(
            rng.normal(size=[2, 3, 3, 1, 4, 4]), rng.uniform(size=[2, 3, 3, 1]), kernel_size=1, in_types=1
        )

    def test_inverse_temperature_range(self):
        """lambda from 1e-4 to 1 (sigmoids saturate at 1) stays finite."""
        rng = np.random.RandomState(11)
        for final_lambda in (1e-4, 1e-2, 1.0):
            with tf.Graph().as_default():
                self._check_finite(
                    rng.normal(size=[2, 4, 4, 2, 4, 4]) * 10, rng.uniform(size=[2, 4, 4, 2]), final_lambda=final_lambda
                )


class ScheduleTest(tf.test.TestCase):
    def test_inverse_temperatures(self):
        """lambda_i = final * (1 - 0.95^(i+1)), i = 0..iters-1."""
        self.assertAllClose(cl.inverse_temperatures(0.01, 3), [0.01 * 0.05, 0.01 * 0.0975, 0.01 * 0.142625])

    def test_bad_arguments(self):
        """Unknown padding and fewer than one routing iteration are rejected when the layer is made."""
        with self.assertRaises(ValueError):
            cl.ConvCaps(4, padding="FULL")
        with self.assertRaises(ValueError):
            cl.ConvCaps(4, iterations=0)


# The released code's routing pieces, alone and together (keyword arguments of the reference).
OFFICIAL_FORM = dict(
    activation_form="official",
    mean_momentum=em_routing.OFFICIAL_MEAN_MOMENTUM,
    mass_epsilon=em_routing.OFFICIAL_CONV_MASS_EPSILON,
    normalise_over="positions",
)
FORMS = {
    "official": OFFICIAL_FORM,
    "official_activation": dict(activation_form="official"),
    "mean_momentum": dict(mean_momentum=em_routing.OFFICIAL_MEAN_MOMENTUM),
    "mass_epsilon": dict(mass_epsilon=em_routing.OFFICIAL_CLASS_MASS_EPSILON),
    "normalise_over_positions": dict(normalise_over="positions"),
    "cost_scale": dict(cost_scale=em_routing.IBM_COST_SCALE),
    "official_cost_scale": dict(OFFICIAL_FORM, cost_scale=em_routing.IBM_COST_SCALE),
}
# The whole official form in every geometry; each piece alone in the one with padding and stride.
FORM_CASES = [
    ("official_%s_stride%d" % (padding, stride), "official", padding, stride) for padding, stride in CONFIGS
] + [("%s_SAME_stride2" % name, name, "SAME", 2) for name in FORMS if name != "official"]
OFFICIAL_BETA_A_RANGE = 2e-3  # b_a ~ U(0, 2e-3): 5000 b_a is then of the order of mass * fit


def _routing_form(form):
    """The reference's keyword arguments as a `cl.RoutingForm`."""
    return cl.RoutingForm(
        form.get("activation_form", "paper"),
        form.get("mean_momentum", 0.0),
        form.get("mass_epsilon", 0.0),
        form.get("normalise_over", "positions_and_types"),
        cost_scale=form.get("cost_scale", 0.0),
    )


def _form_variables(rng, weight_shape, parents, form):
    """Weights, beta_v, beta_a; beta_a small enough for the official x5000 to leave the sigmoid unsaturated."""
    weights, beta_v, beta_a = _routing_variables(rng, weight_shape, parents)
    if form.get("activation_form") == "official":
        beta_a = beta_a * OFFICIAL_BETA_A_RANGE
    return weights, beta_v, beta_a


class RoutingFormTest(parameterized.TestCase, tf.test.TestCase):
    """The released code's routing pieces (`RoutingForm`) against the float64 reference."""

    def _conv(self, rng, form, padding, stride, iterations=3, height=5, out_types=3, dtype=tf.float64):
        poses, activations = _random_capsules(rng, 2, height, height, 2)
        variables = _form_variables(rng, [3, 3, 2, out_types, 4, 4], out_types, form)
        layer = cl.ConvCaps(
            out_types,
            3,
            stride,
            padding,
            iterations,
            0.1,
            form=_routing_form(form),
            dtype=dtype,
            **_initializers(*variables),
        )
        return layer, poses, activations, variables

    @parameterized.named_parameters(*FORM_CASES)
    def test_conv_caps_matches_reference(self, name, padding, stride):
        """ConvCaps with 3 iterations in each form equals the float64 loop reference (rel. error < 1e-5)."""
        form = FORMS[name]
        layer, poses, activations, variables = self._conv(np.random.RandomState(12), form, padding, stride)
        outputs = layer(tf.constant(poses), tf.constant(activations))
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
        expected_poses, expected_activations, _ = ref.conv_caps_reference(
            poses, activations, *variables, 3, stride, padding, 3, 0.1, **form
        )
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE)
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    @parameterized.named_parameters(
        ("official", "official"),
        ("official_activation", "official_activation"),
        ("mean_momentum", "mean_momentum"),
        ("cost_scale", "cost_scale"),
    )
    def test_class_caps_matches_reference(self, name):
        """ClassCaps in each form, with the released code's coordinate offsets, equals the reference."""
        form = dict(FORMS[name], normalise_over="positions_and_types")
        rng = np.random.RandomState(13)
        poses, activations = _random_capsules(rng, 2, 3, 4, 2)
        variables = _form_variables(rng, [2, 5, 4, 4], 5, form)
        offsets = cl.official_coordinate_offsets(rng.normal(size=[3, 4, 2]) * 10)  # [3, 4, 16]
        layer = cl.ClassCaps(
            5,
            iterations=3,
            final_lambda=0.1,
            form=_routing_form(form),
            coordinate_offsets=offsets,
            dtype=tf.float64,
            **_initializers(*variables),
        )
        outputs = layer(tf.constant(poses), tf.constant(activations))
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            out_poses, out_activations = sess.run(outputs)
        expected_poses, expected_activations = ref.class_caps_reference(
            poses, activations, *variables, 3, 0.1, coordinate_offsets=offsets, **form
        )
        self.assertLess(_relative_error(out_poses, expected_poses), RELATIVE_TOLERANCE)
        self.assertLess(_relative_error(out_activations, expected_activations), RELATIVE_TOLERANCE)

    @parameterized.named_parameters(*[(padding + str(stride), padding, stride) for padding, stride in CONFIGS])
    def test_positions_normaliser_sums_to_one_per_type(self, padding, stride):
        """With normalise_over='positions' every covered child's final R sums to 1 over the positions of each type."""
        layer, poses, activations, _ = self._conv(
            np.random.RandomState(14), FORMS["official"], padding, stride, height=6
        )
        layer(tf.constant(poses), tf.constant(activations))
        field, kk = layer.field, int(np.prod(layer.kernel_size))
        r = tf.reshape(layer.end_points["assignments"], [-1, layer.types, kk, layer.input_types])  # [NP, O, KK, I]
        r = tf.reshape(tf.transpose(r, [0, 2, 1, 3]), [2, field.out_height, field.out_width, kk, -1])
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            sums = sess.run(field.fold(r))  # [N, H, W, O*I]
        covered = np.broadcast_to(field.parent_positions[None, :, :, None] > 0, sums.shape)
        self.assertAllClose(sums[covered], np.ones(covered.sum()), atol=1e-12)
        self.assertAllEqual(sums[~covered], np.zeros((~covered).sum()))

    @parameterized.named_parameters(
        ("official_valid_stride1", "official", "VALID", 1),
        ("official_same_stride2", "official", "SAME", 2),
        ("cost_scale_same_stride2", "cost_scale", "SAME", 2),
    )
    def test_form_gradients(self, name, padding, stride):
        """ConvCaps and ClassCaps gradients in the official form (and with IBM's cost scale) w.r.t. inputs and
        variables match finite differences."""
        rng = np.random.RandomState(15)
        form = FORMS[name]
        layer, poses, activations, _ = self._conv(rng, form, padding, stride, iterations=2, height=4, out_types=2)
        poses_t, activations_t = tf.constant(poses[:1]), tf.constant(activations[:1])
        hidden = layer(poses_t, activations_t)
        class_layer = cl.ClassCaps(
            3,
            iterations=2,
            final_lambda=0.1,
            form=_routing_form(form),
            dtype=tf.float64,
            **_initializers(*_form_variables(rng, [2, 3, 4, 4], 3, form)),
        )
        outputs = list(hidden) + list(class_layer(*hidden))
        with self.session():
            tf.global_variables_initializer().run()
            # the class layer's variables do not reach the conv layer's outputs
            unreached = [(x, y) for x in class_layer.variables for y in hidden]
            inputs = [poses_t, activations_t] + layer.variables + class_layer.variables
            _assert_gradients_match_finite_differences(self, inputs, outputs, skip=unreached)

    def test_official_coordinates_of_the_paper_network(self):
        """The paper network's 3x3 class-layer grid looks at pixels -6, -2, 2 from the image centre (hand count:
        conv1 cell o sees 2o-12, conv_caps1 4o-10, conv_caps2 4o-6), and entries 0, 1 get column/100, row/100."""
        convolutions = [(5, 2, "VALID"), (1, 1, "VALID"), (3, 2, "VALID"), (3, 1, "VALID")]
        centres = cl.receptive_field_centres(28, convolutions)  # [3, 3, 2]
        self.assertAllClose(centres[:, 0, 0], [-6.0, -2.0, 2.0])  # rows
        self.assertAllClose(centres[0, :, 1], [-6.0, -2.0, 2.0])  # columns
        offsets = cl.official_coordinate_offsets(centres)  # [3, 3, 16]
        self.assertAllClose(offsets[2, 0, :2], [-0.06, 0.02])  # (column -6, row 2) / 100
        self.assertAllEqual(offsets[..., 2:], np.zeros([3, 3, 14]))

    def test_official_stress_inputs(self):
        """All-zero, saturated, huge and tiny inputs stay finite in the official form (float32, forward and
        gradients)."""
        rng = np.random.RandomState(16)
        form = _routing_form(FORMS["official"])
        for name, (pose_scale, activation) in NumericalStressTest.CASES.items():
            with self.subTest(name), tf.Graph().as_default():
                poses_t = tf.constant(rng.normal(size=[2, 4, 4, 2, 4, 4]) * pose_scale, tf.float32)
                activations_t = tf.constant(np.full([2, 4, 4, 2], activation), tf.float32)
                hidden = cl.ConvCaps(3, 3, 1, "SAME", iterations=3, final_lambda=0.01, form=form)(
                    poses_t, activations_t
                )
                out_poses, out_activations = cl.class_caps(*hidden, 4, iterations=3, final_lambda=0.01, form=form)
                loss = tf.reduce_sum(out_activations) + tf.reduce_sum(out_poses)
                grads = tf.gradients(loss, [poses_t, activations_t] + tf.trainable_variables())
                with self.session() as sess:
                    sess.run(tf.global_variables_initializer())
                    for value, tensor in zip(
                        sess.run([out_poses, out_activations] + grads), [out_poses, out_activations] + grads
                    ):
                        self.assertTrue(np.all(np.isfinite(value)), tensor.name)

    def test_bad_forms(self):
        """Unknown activation forms or normalisers, momentum outside [0, 1) and a negative epsilon are refused."""
        for bad in (
            dict(activation="both"),
            dict(normalise_over="types"),
            dict(mean_momentum=1.0),
            dict(mass_epsilon=-1.0),
            dict(cost_scale=-1.0),
        ):
            with self.assertRaises(ValueError):
                cl.RoutingForm(**bad)
        with self.assertRaises(ValueError):
            cl.ConvCaps(4, standardise_costs=True, form=cl.RoutingForm(activation="official"))


class AssignmentGradientTest(tf.test.TestCase):
    """RoutingForm(assignment_gradient=False): the same forward pass, no gradient through the E-steps' R."""

    def _outputs_and_gradients(self, assignment_gradient, iterations):
        rng = np.random.RandomState(17)
        poses, activations = _random_capsules(rng, 1, 4, 4, 2)
        with tf.Graph().as_default():
            poses_t = tf.constant(poses)
            form = cl.RoutingForm(assignment_gradient=assignment_gradient)
            layer = cl.ConvCaps(
                2,
                3,
                1,
                "VALID",
                iterations,
                0.5,
                form=form,
                dtype=tf.float64,
                **_initializers(*_routing_variables(rng, [3, 3, 2, 2, 4, 4], 2)),
            )
            outputs = layer(poses_t, tf.constant(activations))
            gradient = tf.gradients(tf.reduce_sum(outputs[0]) + tf.reduce_sum(outputs[1]), poses_t)[0]
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                return sess.run([outputs, gradient])

    def test_same_forward_other_gradient(self):
        """With 3 iterations the outputs are equal and the pose gradients differ (finite); with 1 iteration (no
        E-step) the gradients are equal too."""
        (full_out, full_grad), (cut_out, cut_grad) = (self._outputs_and_gradients(flag, 3) for flag in (True, False))
        self.assertAllClose(full_out, cut_out, rtol=1e-12, atol=1e-12)
        self.assertTrue(np.all(np.isfinite(cut_grad)))
        self.assertGreater(np.max(np.abs(full_grad - cut_grad)), 1e-6)
        (_, one_full), (_, one_cut) = (self._outputs_and_gradients(flag, 1) for flag in (True, False))
        self.assertAllClose(one_full, one_cut, rtol=1e-12, atol=1e-12)
