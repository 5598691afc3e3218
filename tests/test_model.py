"""Tests for model.py: network shapes, parameter counts, spread loss, margin schedule, training step.

Hinton, Sabour, Frosst, *Matrix Capsules with EM Routing*, ICLR 2018: section 3 (architecture),
section 4 (spread loss, eq. 3, and the margin rising from 0.2 to 0.9).
"""

import dataclasses
import math

import numpy as np
import tensorflow.compat.v1 as tf
from absl.testing import parameterized

import model as capsnet
from run import runtime

_BATCH = 2  # images per forward pass; small enough for the paper network on two cores
_IMAGE_SHAPE = [28, 28, 1]
_RUN_STEPS = 100  # a run length for the schedules that span the run
# The small preset's form at a quarter of its widths (A=8, B=C=D=4): where a test checks how the graph is run (micro-
# batches, a training step), not how wide it is, its forward and backward passes cost a fraction.
_NARROW = dict(conv1_filters=8, primary_types=4, conv_caps1_types=4, conv_caps2_types=4)
_POSE = 4 * 4  # entries of a 4x4 pose matrix
# Trainable parameters stated in model.py's PRESETS comments and main.py's start-up line.
_DOCUMENTED_PARAMETERS = {"paper": 318964, "small": 68444}
_SCOPES = ("relu_conv1", "primary_caps", "conv_caps1", "conv_caps2", "class_caps")


def _sigmoid(x):
    """The logistic function 1 / (1 + e^-x)."""
    return 1.0 / (1.0 + math.exp(-x))


def _expected_parameters(hp):
    """Trainable scalars of the network, counted by hand from the architecture (paper section 3)."""
    a, b, c, d = hp.conv1_filters, hp.primary_types, hp.conv_caps1_types, hp.conv_caps2_types
    k1, kp, kc1, kc2 = hp.conv1_kernel, hp.primary_kernel, hp.conv_caps1_kernel, hp.conv_caps2_kernel
    conv1 = k1 * k1 * hp.image_channels * a + a  # kernel + bias
    primary = kp * kp * a * b * _POSE + b * _POSE + kp * kp * a * b + b  # pose kernel/bias, activation kernel/bias
    conv_caps1 = kc1 * kc1 * b * c * _POSE + 2 * c  # W [K, K, I, O, 4, 4] + beta_v, beta_a [O]
    conv_caps2 = kc2 * kc2 * c * d * _POSE + 2 * d
    class_caps = d * hp.num_classes * _POSE + 2 * hp.num_classes  # W [I, C, 4, 4] + beta_v, beta_a [C]
    return conv1 + primary + conv_caps1 + conv_caps2 + class_caps


class ArchitectureTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("paper", "small")
    def test_output_shapes(self, preset):
        """Both presets build on a placeholder batch: activations [N, 10], poses [N, 10, 4, 4], predictions [N]."""
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
            inference = capsnet.CapsNetEMModel(capsnet.hparams_for(preset)).inference(images)
            self.assertEqual(inference.activations.shape.as_list(), [None, 10])
            self.assertEqual(inference.poses.shape.as_list(), [None, 10, 4, 4])
            self.assertEqual(inference.predictions.shape.as_list(), [None])
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                batch = np.random.RandomState(0).uniform(size=[_BATCH] + _IMAGE_SHAPE)
                activations, poses = sess.run([inference.activations, inference.poses], {images: batch})
        self.assertEqual(activations.shape, (_BATCH, 10))
        self.assertEqual(poses.shape, (_BATCH, 10, 4, 4))
        self.assertTrue(np.all(np.isfinite(activations)) and np.all(np.isfinite(poses)))

    @parameterized.parameters("paper", "small")
    def test_parameter_count(self, preset):
        """Trainable parameters equal the hand count from the architecture and the documented total,
        and live under the paper's layer scopes."""
        hparams = capsnet.hparams_for(preset)
        self.assertEqual(_expected_parameters(hparams), _DOCUMENTED_PARAMETERS[preset])
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
            capsnet.CapsNetEMModel(hparams).inference(images)
            variables = tf.trainable_variables()
            self.assertEqual(capsnet.count_parameters(variables), _DOCUMENTED_PARAMETERS[preset])
            self.assertEqual({v.op.name.split("/")[0] for v in variables}, set(_SCOPES))


# The paper network's variables as every saved run holds them (checkpoints and tests/fixtures load by these
# names): (name, shape) in creation order, A=B=C=D=32, 10 classes.
_PAPER_VARIABLES = [
    ("relu_conv1/kernel", [5, 5, 1, 32]),
    ("relu_conv1/bias", [32]),
    ("primary_caps/pose_kernel", [1, 1, 32, 512]),
    ("primary_caps/pose_bias", [512]),
    ("primary_caps/activation_kernel", [1, 1, 32, 32]),
    ("primary_caps/activation_bias", [32]),
    ("conv_caps1/weights", [3, 3, 32, 32, 4, 4]),
    ("conv_caps1/beta_v", [32]),
    ("conv_caps1/beta_a", [32]),
    ("conv_caps2/weights", [3, 3, 32, 32, 4, 4]),
    ("conv_caps2/beta_v", [32]),
    ("conv_caps2/beta_a", [32]),
    ("class_caps/weights", [32, 10, 4, 4]),
    ("class_caps/beta_v", [10]),
    ("class_caps/beta_a", [10]),
]
_OPTIMISER_VARIABLES = ["global_step", "beta1_power", "beta2_power"]  # besides each weight's Adam and Adam_1 slots


class SavedVariablesTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(("one_graph", 1), ("micro_batches", 2))
    def test_paper_network_variables_are_pinned(self, micro_batches):
        """The paper network's training graph makes exactly the variables (names, shapes, order) that saved
        runs hold: the 15 weights, their Adam slots, the global step and Adam's power accumulators."""
        hparams = capsnet.hparams_for("paper")
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
            capsnet.CapsNetEMModel(hparams, micro_batches).train(images, tf.placeholder(tf.int64, [None]))
            weights = [(v.op.name, v.shape.as_list()) for v in tf.trainable_variables()]
            names = sorted(v.op.name for v in tf.global_variables())
        self.assertEqual(weights, _PAPER_VARIABLES)
        slots = [name + suffix for name, _ in _PAPER_VARIABLES for suffix in ("", "/Adam", "/Adam_1")]
        self.assertEqual(names, sorted(slots + _OPTIMISER_VARIABLES))


class SpreadLossTest(tf.test.TestCase):
    def test_hand_computed(self):
        """Paper eq. 3 on two examples, margin 0.5.

        Example 0, target 0 (a_t = 0.9): class 1 max(0, 0.5 - 0.7)^2 = 0, class 2 max(0, 0.5 - 0.4)^2 = 0.01.
        Example 1, target 1 (a_t = 0.8): class 0 max(0, 0.5 - 0.7)^2 = 0, class 2 max(0, 0.5 - 0.05)^2 = 0.2025.
        Batch mean: (0.01 + 0.2025) / 2 = 0.10625.
        """
        activations = tf.constant([[0.9, 0.2, 0.5], [0.1, 0.8, 0.75]], tf.float64)
        loss = capsnet.spread_loss(activations, tf.constant([0, 1]), 0.5)
        self.assertAllClose(self.evaluate(loss), 0.10625)

    def test_wrong_prediction(self):
        """Target below another class: (0.2 - (0.2 - 0.9))^2 = 0.81."""
        loss = capsnet.spread_loss(tf.constant([[0.2, 0.9]], tf.float64), tf.constant([0]), 0.2)
        self.assertAllClose(self.evaluate(loss), 0.81)

    def test_zero_when_gaps_exceed_margin(self):
        """Every a_t - a_i (0.7 and 0.4; 0.7 and 0.05 + 0.65) larger than m = 0.3 gives loss 0."""
        activations = tf.constant([[0.9, 0.2, 0.5], [0.1, 0.8, 0.1]], tf.float64)
        loss = capsnet.spread_loss(activations, tf.constant([0, 1]), 0.3)
        self.assertAllEqual(self.evaluate(loss), 0.0)


class MarginScheduleTest(tf.test.TestCase):
    def _margins(self, steps, **overrides):
        """The margin at each of `steps` for the paper preset with `overrides`."""
        with tf.Graph().as_default():
            step = tf.placeholder(tf.int64, [None])
            margin = capsnet.margin_schedule(step, capsnet.hparams_for("paper", **overrides))
            with self.session() as sess:
                return sess.run(margin, {step: steps})

    def test_sigmoid_end_points(self):
        """Sigmoid: 0.2 + 0.79 sigmoid(-4) at step 0, 0.2 + 0.79 sigmoid(4) at the ramp's end, and
        0.2 + 0.79 sigmoid(10) (the cap) far beyond it."""
        ramp = 1000
        margins = self._margins([0, ramp, 10**9], margin_schedule="sigmoid", margin_ramp_steps=ramp)
        expected = [0.2 + 0.79 * _sigmoid(-4), 0.2 + 0.79 * _sigmoid(4), 0.2 + 0.79 * _sigmoid(10)]
        self.assertAllClose(margins, expected, rtol=0, atol=1e-6)

    def test_sigmoid_matches_official_formula(self):
        """With ramp 400000 the margin is the official 0.2 + 0.79 sigmoid(min(10, step / 50000 - 4))."""
        steps = [0, 25000, 50000, 123456, 200000, 400000, 700000, 2000000]
        margins = self._margins(steps, margin_schedule="sigmoid", margin_ramp_steps=400000)
        expected = [0.2 + 0.79 * _sigmoid(min(10.0, s / 50000.0 - 4.0)) for s in steps]
        self.assertAllClose(margins, expected, rtol=0, atol=1e-6)

    def test_linear(self):
        """Linear: 0.2 at step 0, 0.55 halfway, 0.9 at the ramp's end and after it."""
        ramp = 1000
        margins = self._margins([0, ramp // 2, ramp, 5 * ramp], margin_schedule="linear", margin_ramp_steps=ramp)
        self.assertAllClose(margins, [0.2, 0.55, 0.9, 0.9], rtol=0, atol=1e-6)

    def test_constant(self):
        """Constant: 0.2 at every step, whatever the ramp length."""
        margins = self._margins([0, 500, 10**9], margin_schedule="constant", margin_ramp_steps=1000)
        self.assertAllClose(margins, [0.2, 0.2, 0.2], rtol=0, atol=1e-7)

    def test_unknown_schedule(self):
        """A schedule other than sigmoid/linear/constant is a ValueError."""
        with self.assertRaises(ValueError):
            capsnet.margin_schedule(tf.constant(0), capsnet.hparams_for("small", margin_schedule="cosine"))


class HParamsTest(tf.test.TestCase):
    def test_unknown_preset(self):
        """An unknown preset name is a ValueError."""
        with self.assertRaises(ValueError):
            capsnet.hparams_for("big")

    def test_parse(self):
        """parse converts each value to its field's type (bools from true/false) and names a bad field."""
        hparams = capsnet.PRESETS["small"].parse("iterations=3, final_lambda=0.5,standardise_costs=TRUE,padding=SAME")
        self.assertEqual(
            (hparams.iterations, hparams.final_lambda, hparams.standardise_costs, hparams.padding),
            (3, 0.5, True, "SAME"),
        )
        self.assertEqual(capsnet.PRESETS["small"].parse(""), capsnet.PRESETS["small"])
        for text, field in (
            ("iteration=3", "iteration"),
            ("iterations=three", "iterations"),
            ("standardise_costs=yes", "standardise_costs"),
        ):
            with self.assertRaisesRegex(ValueError, field):
                capsnet.PRESETS["small"].parse(text)

    def test_validate_names_the_field(self):
        """validate (called by hparams_for and the model) refuses a value outside its field's domain, by name."""
        for field, value in (
            ("padding", "FULL"),
            ("iterations", 0),
            ("margin_schedule", "cosine"),
            ("routing", "both"),
            ("normalise_over", "types"),
            ("learning_rate", 0.0),
            ("lr_decay_steps", -1),
            ("mean_momentum", 1.0),
            ("conv_mass_epsilon", -1e-7),
        ):
            with self.subTest(field), self.assertRaisesRegex(ValueError, "^" + field):
                dataclasses.replace(capsnet.PRESETS["paper"], **{field: value}).validate()
        with self.assertRaisesRegex(ValueError, "iterations"):
            capsnet.hparams_for("paper", iterations=0)
        with self.assertRaisesRegex(ValueError, "routing"):
            capsnet.hparams_for("paper", "both")

    def test_official_routing_form(self):
        """routing='official' applies the released code's values after the preset, and overrides win over it."""
        official = capsnet.hparams_for("small", "official", beta_v_init=1.5)
        self.assertEqual(
            (official.routing, official.activation_form, official.normalise_over), ("official",) * 2 + ("positions",)
        )
        self.assertEqual(
            (official.final_lambda, official.class_final_lambda, official.beta_v_init), (0.01, 0.0025, 1.5)
        )
        self.assertEqual(official.conv1_filters, capsnet.PRESETS["small"].conv1_filters)
        self.assertEqual(capsnet.hparams_for("small", "paper"), capsnet.PRESETS["small"])

    def test_overrides(self):
        """Overrides replace exactly the named fields; the preset itself stays as it was."""
        hparams = capsnet.hparams_for("small", iterations=3, padding="SAME", learning_rate=1e-4)
        self.assertEqual((hparams.iterations, hparams.padding, hparams.learning_rate), (3, "SAME", 1e-4))
        self.assertEqual(hparams.conv1_filters, capsnet.PRESETS["small"].conv1_filters)
        self.assertEqual(capsnet.hparams_for("small"), capsnet.PRESETS["small"])
        self.assertEqual(capsnet.PRESETS["small"].iterations, 2)

    def test_small_search_preset(self):
        """`small_search` (the search's best trial) is the `small` network with only fields of the search space
        changed, and valid; its margin ramps over the whole run."""
        from experiments import search_space

        small, searched = capsnet.PRESETS["small"], capsnet.hparams_for("small_search")
        changed = {f.name for f in dataclasses.fields(small) if getattr(small, f.name) != getattr(searched, f.name)}
        self.assertLessEqual(changed - {"margin_ramp_steps"}, set(search_space.DEFAULT_SPACE))
        self.assertIn("learning_rate", changed)
        self.assertEqual((searched.conv1_filters, searched.iterations), (small.conv1_filters, small.iterations))
        self.assertEqual((searched.margin_schedule, searched.margin_ramp_steps), ("linear", capsnet.WHOLE_RUN))
        searched.validate()

    def test_run_length(self):
        """with_run_length fills in exactly the WHOLE_RUN (0) schedule lengths; the small preset's learning
        rate then falls from 0.01 to a tenth of it at the run's last step."""
        small = capsnet.hparams_for("small")
        self.assertEqual(small.lr_decay_steps, capsnet.WHOLE_RUN)
        resolved = runtime.with_run_length(small, _RUN_STEPS)
        self.assertEqual((resolved.lr_decay_steps, resolved.margin_ramp_steps), (_RUN_STEPS, small.margin_ramp_steps))
        paper = capsnet.hparams_for("paper")  # its rate falls a tenth every 2 epochs at batch 32, whatever the run
        self.assertEqual(runtime.with_run_length(paper, 5 * _RUN_STEPS).lr_decay_steps, capsnet.PAPER_LR_DECAY_STEPS)
        # ... given in epochs: with the run's steps per epoch the same 2.0015 epochs on every dataset and batch,
        # exactly 3,440 steps on MNIST's 55,000 training images at batch 32
        for images, batch, steps in ((55000, 32, 3440), (55000, 64, 1720), (24300, 32, 1520)):
            resolved = runtime.with_run_length(paper, 5 * _RUN_STEPS, images / batch)
            self.assertEqual(resolved.lr_decay_steps, steps)
        official = capsnet.HParams(margin_ramp_steps=capsnet.WHOLE_RUN)  # the official schedules: lr decay fixed
        resolved = runtime.with_run_length(official, _RUN_STEPS)
        self.assertEqual((resolved.lr_decay_steps, resolved.margin_ramp_steps), (official.lr_decay_steps, _RUN_STEPS))
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
            labels = tf.placeholder(tf.int64, [None])
            with self.assertRaisesRegex(ValueError, "lr_decay_steps"):
                capsnet.CapsNetEMModel(small).train(images, labels)
            with self.assertRaisesRegex(ValueError, "margin_ramp_steps"):
                capsnet.margin_schedule(tf.constant(0), official)
            graph = capsnet.CapsNetEMModel(runtime.with_run_length(small, _RUN_STEPS)).train(images, labels)
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                rates = []
                for step in (0, _RUN_STEPS):
                    sess.run(graph.global_step.assign(step))
                    rates.append(sess.run(graph.learning_rate))
        np.testing.assert_allclose(rates, [0.01, 0.001], rtol=1e-6)


class MicroBatchTest(tf.test.TestCase, parameterized.TestCase):
    def test_split_batch_sizes(self):
        """Parts are equal and in order; zeros fill the last part up, so none is empty even for N < parts."""
        with tf.Graph().as_default():
            rows = tf.placeholder(tf.float32, [None, 2])
            parts = capsnet.split_batch(rows, 3)
            with self.session() as sess:
                seven = np.arange(14.0).reshape(7, 2)
                got = np.concatenate(sess.run(parts, {rows: seven}))
                np.testing.assert_array_equal(got, np.concatenate([seven, np.zeros([2, 2])]))  # 3 parts of 3
                got = np.concatenate(sess.run(parts, {rows: seven[:2]}))
                np.testing.assert_array_equal(got, np.concatenate([seven[:2], np.zeros([1, 2])]))  # 3 parts of 1
        self.assertEqual([runtime.micro_batches_for(64, m) for m in (0, 4, 5, 64, 100)], [1, 16, 13, 1, 1])

    @parameterized.parameters((5, 3), (2, 3))
    def test_same_function_of_the_batch(self, batch, micro_batches):
        """Micro-batched and whole-batch networks with the same variables agree in activations, poses and
        every loss gradient (including a batch smaller than the number of parts)."""
        random = np.random.RandomState(2)
        feed_images = random.uniform(size=[batch] + _IMAGE_SHAPE)
        feed_labels = random.randint(10, size=batch)
        hparams = capsnet.hparams_for("small", **_NARROW)
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
            labels = tf.placeholder(tf.int64, [None])
            step = tf.constant(0)
            fetches = []
            for parts in (1, micro_batches):
                with tf.variable_scope(tf.get_variable_scope(), reuse=parts > 1):
                    net = capsnet.CapsNetEMModel(hparams, micro_batches=parts)
                    inference = net.inference(images)
                    loss = net.loss(inference.activations, labels, step).total
                variables = tf.trainable_variables()
                fetches.append([inference.activations, inference.poses] + tf.gradients(loss, variables))
            self.assertEqual(len(tf.trainable_variables()), len(variables))  # shared, not copied
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                whole, split = sess.run(fetches, {images: feed_images, labels: feed_labels})
        for name, expected, got in zip(["activations", "poses"] + [v.op.name for v in variables], whole, split):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=name)

    def test_rejects_zero_parts(self):
        with self.assertRaises(ValueError):
            capsnet.CapsNetEMModel(capsnet.hparams_for("small"), micro_batches=0)


class TrainStepTest(tf.test.TestCase):
    def _build(self):
        """Training graph of the small preset's form, narrowed, on placeholders: (images, labels, TrainGraph)."""
        tf.set_random_seed(1)
        images = tf.placeholder(tf.float32, [None] + _IMAGE_SHAPE)
        labels = tf.placeholder(tf.int64, [None])
        hparams = runtime.with_run_length(capsnet.hparams_for("small", **_NARROW), _RUN_STEPS)
        graph = capsnet.CapsNetEMModel(hparams).train(images, labels)
        return images, labels, graph

    def test_step_updates_every_variable(self):
        """One step on random data gives a finite loss, increments the global step and changes every
        trainable variable."""
        random = np.random.RandomState(0)
        feed_images = random.uniform(size=[4] + _IMAGE_SHAPE)
        feed_labels = np.array([0, 3, 7, 9])
        with tf.Graph().as_default():
            images, labels, graph = self._build()
            variables = tf.trainable_variables()
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                before = sess.run(variables)
                _, loss = sess.run([graph.train_op, graph.loss], {images: feed_images, labels: feed_labels})
                after = sess.run(variables)
                self.assertEqual(sess.run(graph.global_step), 1)
        self.assertTrue(np.isfinite(loss))
        unchanged = [v.op.name for v, b, a in zip(variables, before, after) if np.array_equal(b, a)]
        self.assertEqual(unchanged, [])

    def test_non_finite_loss_updates_nothing(self):
        """NaN images make run_step raise NonFiniteError naming the loss or a gradient, and no variable
        (weights, Adam slots, global step) changes."""
        feed_images = np.full([2] + _IMAGE_SHAPE, np.nan, np.float32)
        with tf.Graph().as_default():
            images, labels, graph = self._build()
            variables = tf.global_variables()
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                before = sess.run(variables)
                with self.assertRaisesRegex(capsnet.NonFiniteError, "^(loss|gradient of .*) is NaN or Inf$"):
                    capsnet.run_step(sess, graph, graph.train_op, {images: feed_images, labels: [1, 2]})
                after = sess.run(variables)
        for variable, old, new in zip(variables, before, after):
            np.testing.assert_array_equal(old, new, err_msg=variable.op.name)


if __name__ == "__main__":
    tf.test.main()
