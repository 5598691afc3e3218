"""examples/custom_network.py, the README's "Build your own network", runs a few steps on its random data."""

import contextlib
import importlib.util
import io
import os
import re

import numpy as np
import tensorflow.compat.v1 as tf

from conftest import ROOT

EXAMPLE = os.path.join(ROOT, "examples", "custom_network.py")
STEPS, BATCH = 3, 4


def _load_example():
    """The example script as a module (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("custom_network", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CustomNetworkTest(tf.test.TestCase):
    def test_runs_a_few_steps(self):
        """Three training steps and the evaluation graph run; the loss, accuracy and routing statistics of both
        graphs are printed, with the preset's weight decay (6 regularization losses) and no new variables."""
        example = _load_example()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            accuracy = example.main(["--steps", str(STEPS), "--batch_size", str(BATCH), "--threads", "1"])
        self.assertBetween(accuracy, 0.0, 1.0)
        lines = printed.getvalue().splitlines()
        self.assertRegex(lines[0], r"^paper recipe, \d+ parameters, 6 regularization losses$")
        self.assertLen([line for line in lines if line.startswith("step ")], 2)  # steps 1 and 3
        self.assertIn("evaluation graph (reuse=True): accuracy", "\n".join(lines))
        statistics = [line for line in lines if line.startswith("routing ")]
        self.assertLen(statistics, len(example.SHOWN))
        values = [
            float(value)
            for line in statistics
            for value in re.findall(r"batch(?: \(evaluation graph\))? ([-0-9.e+]+|nan|inf)", line)
        ]
        self.assertLen(values, 2 * len(example.SHOWN))  # the training and the held-out batch's
        self.assertTrue(np.all(np.isfinite(values)))

    def test_network_shapes(self):
        """The network maps [N, 32, 32, 3] to [N, 5] class activations through 8x8 capsule grids."""
        example = _load_example()
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [None, 32, 32, 3])
            activations, (conv1, conv2, classes) = example.network(images, example.hparams.hparams_for("small"))
            self.assertEqual(activations.shape.as_list(), [None, example.CLASSES])
            self.assertEqual([conv1.name, conv2.name, classes.name], ["conv_caps", "conv_caps_1", "class_caps"])
            self.assertEqual((conv1.field.out_height, conv2.field.out_height), (8, 8))
