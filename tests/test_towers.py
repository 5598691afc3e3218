"""Towers (`--num_devices N`): the batch split over N devices, shared variables, averaged gradients, one update.

On this machine the towers run on logical CPU devices (`runtime.session_config`'s device count); the same graph
runs on GPUs where there are some. The towers compute the same function of the batch as one graph, in a
different float summation order, so they are compared to it within float32 rounding.
"""

import os

import numpy as np
import tensorflow.compat.v1 as tf

import model as capsnet
from run import runtime
from test_main import run_main, write_tiny_mnist

_BATCH = 4  # images per step: 2 per tower
_TOWERS = 2
_STEPS = 3  # training steps compared
_SEED = 3
# A tiny network of the small preset's form (2 routing iterations), fast on two cores.
_TINY = dict(conv1_filters=8, primary_types=4, conv_caps1_types=4, conv_caps2_types=4, lr_decay_steps=100)
# float32 results of two summation orders: the losses agree to ~1e-7 relative, gradients to ~1e-6 of their scale,
# and three Adam steps (whose first steps move every weight by about the learning rate) keep the weights within
# 1e-5 absolute.
_LOSS_RTOL = 1e-5
_GRADIENT_ATOL = 1e-5
_WEIGHT_ATOL = 1e-5


def _batches():
    """`_STEPS` random batches: (images `[_BATCH, 28, 28, 1]` in [0, 1], labels `[_BATCH]`)."""
    random = np.random.RandomState(_SEED)
    return [
        (random.uniform(size=[_BATCH, 28, 28, 1]).astype(np.float32), random.randint(0, 10, size=[_BATCH]))
        for _ in range(_STEPS)
    ]


def _train(towers, initial=None):
    """Builds the tiny network on `towers` towers, loads `initial` ({name: value}; None: its own seeded init),
    and runs `_STEPS` steps on `_batches()`.

    Returns:
      (initial values {name: value}, loss and gradients {name: value} of the first batch before any update,
      the loss of every step, final values {name: value}, the training graph's device of every op).
    """
    hparams = capsnet.hparams_for("small", **_TINY)
    with tf.Graph().as_default():
        tf.set_random_seed(_SEED)
        images = tf.placeholder(tf.float32, [_BATCH, 28, 28, 1])
        labels = tf.placeholder(tf.int64, [_BATCH])
        distribution = capsnet.Distribution(runtime.tower_devices(towers), None)
        graph = capsnet.CapsNetEMModel(hparams).train(images, labels, distribution)
        variables = tf.trainable_variables()
        gradients = {v.op.name: g for g, v in graph.grads_and_vars}  # the checked (averaged) gradients
        devices = {op.name: op.device for op in tf.get_default_graph().get_operations()}
        with runtime.new_session(0, 1, towers) as sess:
            sess.run(tf.global_variables_initializer())
            for variable in variables if initial else ():
                variable.load(initial[variable.op.name], sess)
            start = {v.op.name: value for v, value in zip(variables, sess.run(variables))}
            first = {images: _batches()[0][0], labels: _batches()[0][1]}
            before = sess.run(dict(gradients, loss=graph.loss), first)
            losses = [sess.run([graph.train_op, graph.loss], {images: x, labels: y})[1] for x, y in _batches()]
            final = {v.op.name: value for v, value in zip(variables, sess.run(variables))}
    return start, before, losses, final, devices


class TowersTest(tf.test.TestCase):
    def test_two_towers_match_one_graph(self):
        """On 2 logical CPU devices, from the same initial weights and batches: the loss and the averaged gradients
        of the first batch equal the single graph's (loss to 1e-5 relative, gradients to 1e-5 absolute), the losses
        of 3 training steps agree to 1e-5 relative and the weights after them to 1e-5 absolute."""
        start, single, single_losses, single_final, _ = _train(1)
        _, towers, tower_losses, tower_final, devices = _train(_TOWERS, start)
        self.assertEqual(set(single), set(towers))
        self.assertGreater(len(single), 1)  # the loss and at least one gradient
        np.testing.assert_allclose(towers.pop("loss"), single.pop("loss"), rtol=_LOSS_RTOL)
        for name, gradient in single.items():
            np.testing.assert_allclose(towers[name], gradient, atol=_GRADIENT_ATOL, err_msg=name)
        np.testing.assert_allclose(tower_losses, single_losses, rtol=_LOSS_RTOL)
        for name, value in single_final.items():
            np.testing.assert_allclose(tower_final[name], value, atol=_WEIGHT_ATOL, err_msg=name)
            self.assertFalse(np.allclose(value, start[name], atol=0, rtol=0) and "weights" in name, name)
        tower_ops = [name for name in devices if name.startswith("tower_1/")]
        self.assertTrue(tower_ops)
        self.assertEqual({devices[name] for name in tower_ops}, {"/device:CPU:1"})
        self.assertEqual(devices["conv_caps1/weights"], runtime.VARIABLE_DEVICE)

    def test_non_finite_tower_stops_the_step(self):
        """A NaN pixel in tower 1's half of the batch fails the step with NonFiniteError (the averaged loss is NaN)
        and leaves every variable as it was."""
        hparams = capsnet.hparams_for("small", **_TINY)
        images, labels = _batches()[0]
        images[-1, 0, 0, 0] = np.nan  # the last image: tower 1's
        with tf.Graph().as_default():
            distribution = capsnet.Distribution(runtime.tower_devices(_TOWERS), None)
            graph = capsnet.CapsNetEMModel(hparams).train(tf.constant(images), tf.constant(labels), distribution)
            with runtime.new_session(0, 1, _TOWERS) as sess:
                sess.run(tf.global_variables_initializer())
                before = sess.run(tf.trainable_variables())
                with self.assertRaisesRegex(capsnet.NonFiniteError, "is NaN or Inf"):
                    capsnet.run_step(sess, graph, graph.train_op)
                after = sess.run(tf.trainable_variables())
        for old, new in zip(before, after):
            np.testing.assert_array_equal(old, new)

    def test_main_trains_on_two_devices_and_tests_on_one(self):
        """`main.py --num_devices 2` trains 2 steps (batch 4, 2 images per tower) and writes a checkpoint that
        `--test True` restores into the single-device graph."""
        workspace = self.get_temp_dir()
        write_tiny_mnist(os.path.join(workspace, "data"))
        args = ["--preset", "small", "--hparams", ",".join("%s=%s" % item for item in _TINY.items())]
        args += ["--batch_size", str(_BATCH), "--validation_size", "16", "--data_dir", "data", "--result_dir", "run"]
        train = run_main(args + ["--max_steps", "2", "--num_devices", str(_TOWERS)], cwd=workspace)
        self.assertEqual(train.returncode, 0, train.stderr)
        self.assertIn("finished at step 2", train.stdout)
        test = run_main(["--test", "True", "--result_dir", "run"], cwd=workspace)
        self.assertEqual(test.returncode, 0, test.stderr)
        self.assertIn("(step 2)", test.stdout)

    def test_one_device_builds_no_towers(self):
        """`--num_devices 1` (the default) places nothing: the graph is the single-device one."""
        self.assertEqual(runtime.tower_devices(1), ())
        self.assertEqual(runtime.session_config(0, 1).device_count["CPU"], 1)
        self.assertEqual(runtime.session_config(0, 1, 2).device_count["CPU"], 2)
