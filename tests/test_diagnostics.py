"""Tests of diagnostics.py: routing statistics per layer and iteration."""

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_layers as cl
from routing import em_routing
from routing import diagnostics


class PercentileTest(tf.test.TestCase):
    def test_matches_numpy_nearest_rank(self):
        """percentile equals NumPy's nearest-rank quantile ('nearest') of the flattened values."""
        values = np.random.RandomState(0).normal(size=[7, 3, 5]).astype(np.float32)
        with self.session() as sess:
            got = sess.run([diagnostics.percentile(tf.constant(values), q) for q in (0.0, 0.1, 0.5, 0.9, 1.0)])
        expected = [np.quantile(values, q, method="nearest") for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
        self.assertAllClose(got, expected)


class RoutingStatisticsTest(tf.test.TestCase):
    def _statistics(self, form=cl.PAPER_FORM):
        rng = np.random.RandomState(1)
        poses = tf.constant(rng.normal(size=[2, 5, 5, 2, 4, 4]), tf.float32)
        activations = tf.constant(rng.uniform(0.1, 0.9, size=[2, 5, 5, 2]), tf.float32)
        conv = cl.ConvCaps(3, 3, 2, "VALID", iterations=3, final_lambda=0.1, form=form, name="conv_caps1")
        classes = cl.ClassCaps(4, iterations=3, final_lambda=0.1, form=form, name="class_caps")
        classes(*conv(poses, activations))
        statistics = diagnostics.routing_statistics([conv, classes])
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            return sess.run(statistics)

    def test_every_layer_statistic_and_iteration(self):
        """One finite value per (layer, statistic, iteration); fractions and entropies lie in [0, 1]; the
        initial R is uniform over the types, so the first iteration's entropy is 1; percentiles are ordered."""
        values = self._statistics()
        expected_keys = {
            (layer, name, t)
            for layer in ("conv_caps1", "class_caps")
            for name in diagnostics.STATISTICS
            for t in range(3)
        }
        self.assertEqual(set(values), expected_keys)
        self.assertTrue(all(np.isfinite(v) for v in values.values()))
        for layer in ("conv_caps1", "class_caps"):
            self.assertAllClose(values[(layer, "assignment_entropy", 0)], 1.0, atol=1e-5)
            for t in range(3):
                self.assertBetween(values[(layer, "assignment_entropy", t)], 0.0, 1.0 + 1e-5)
                self.assertBetween(values[(layer, "mass_fraction_p50", t)], 0.0, 1.0)
                self.assertLessEqual(values[(layer, "variance_p10", t)], values[(layer, "variance_p50", t)])
                self.assertLessEqual(values[(layer, "variance_p50", t)], values[(layer, "variance_p90", t)])
                self.assertGreaterEqual(values[(layer, "variance_p10", t)], 5e-4)  # the variance floor
                self.assertLessEqual(values[(layer, "vote_magnitude_p50", t)], values[(layer, "vote_magnitude_p99", t)])

    def test_vote_magnitudes_match_numpy(self):
        """vote_magnitude_p50/p99 are NumPy's nearest-rank quantiles of |V| (the layer's votes, all of them at this
        size), on the fused path too, where the votes are made only for the statistics."""
        rng = np.random.RandomState(2)
        poses = rng.normal(size=[2, 5, 5, 2, 4, 4]).astype(np.float32)
        activations = rng.uniform(0.1, 0.9, size=[2, 5, 5, 2]).astype(np.float32)
        for kernel in ("tf", "fused"):
            with self.subTest(kernel=kernel), tf.Graph().as_default():
                conv = cl.ConvCaps(3, 3, 2, "VALID", iterations=2, final_lambda=0.1, routing_kernel=kernel)
                conv(tf.constant(poses), tf.constant(activations))
                statistics = diagnostics.layer_statistics(conv)
                with self.session() as sess:
                    sess.run(tf.global_variables_initializer())
                    values, votes = sess.run([statistics, conv.end_points["votes"]])
                for name, fraction in (("vote_magnitude_p50", 0.5), ("vote_magnitude_p99", 0.99)):
                    expected = np.quantile(np.abs(votes), fraction, method="nearest")
                    self.assertAllClose([values[(name, t)] for t in range(2)], [expected] * 2)

    def test_official_form(self):
        """The official form's statistics are finite too (its R starts at 1/O, uniform over types)."""
        form = cl.RoutingForm(
            "official", em_routing.OFFICIAL_MEAN_MOMENTUM, em_routing.OFFICIAL_CONV_MASS_EPSILON, "positions"
        )
        values = self._statistics(form)
        self.assertTrue(all(np.isfinite(v) for v in values.values()))
        self.assertAllClose(values[("conv_caps1", "assignment_entropy", 0)], 1.0, atol=1e-5)
