"""Tests of cnn.py, the paper's baseline CNN, and of `--model cnn` through main.py."""

import os
import shutil

import numpy as np
import tensorflow.compat.v1 as tf

from run import cnn
import model as capsnet
from run import runtime
from test_main import read_json, run_main

# Hand count for 32x32x1 smallNORB crops and 5 classes: conv 5*5*1*32 + 32, conv 5*5*32*64 + 64,
# dense 8*8*64*1024 + 1024, dense 1024*5 + 5 -- the paper's "4.2M parameters".
SMALLNORB_PARAMETERS = (5 * 5 * 1 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (8 * 8 * 64 * 1024 + 1024) + (1024 * 5 + 5)


TRAIN_STEPS = 10
LEARNING_RATE = 1e-3  # the baseline's own rate (docs/experiments.md), not the capsule preset's


def _smallnorb_hparams():
    """The CNN on 32x32 single-channel crops of 5 classes, schedules over TRAIN_STEPS."""
    hparams = capsnet.hparams_for("paper", model="cnn", image_size=32, num_classes=5, learning_rate=LEARNING_RATE)
    return runtime.with_run_length(hparams, TRAIN_STEPS)


class CNNBaselineTest(tf.test.TestCase):
    def test_shapes_and_parameter_count(self):
        """Probabilities [N, 5] summing to 1, predictions [N]; 4,252,549 parameters on 32x32 crops (4.2M)."""
        images = tf.placeholder(tf.float32, [None, 32, 32, 1])
        net = cnn.CNNBaseline(_smallnorb_hparams())
        inference = net.inference(images)
        self.assertEqual(inference.activations.shape.as_list(), [None, 5])
        self.assertEqual(capsnet.count_parameters(tf.trainable_variables()), SMALLNORB_PARAMETERS)
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            probabilities = sess.run(inference.activations, {images: np.random.RandomState(0).rand(3, 32, 32, 1)})
        self.assertAllClose(probabilities.sum(axis=1), np.ones(3), atol=1e-5)

    def test_training_steps_lower_the_loss(self):
        """Ten Adam steps on one fixed batch lower the cross-entropy, every variable changes, and the weight decay
        covers the three kernels and the dense kernels (not the biases)."""
        rng = np.random.RandomState(1)
        images = tf.constant(rng.rand(8, 32, 32, 1).astype(np.float32))
        labels = tf.constant(np.arange(8) % 5, tf.int64)
        net = cnn.CNNBaseline(_smallnorb_hparams())
        graph = net.train(images, labels)
        self.assertEqual(
            sorted(w.op.name for layer in net.layers for w in layer.weights_to_decay),
            ["cnn_conv1/kernel", "cnn_conv2/kernel", "cnn_hidden/kernel", "cnn_logits/kernel"],
        )
        with self.session() as sess:
            sess.run(tf.global_variables_initializer())
            before = sess.run(tf.trainable_variables())
            losses = [sess.run([graph.train_op, graph.loss])[1] for _ in range(TRAIN_STEPS)]
            after = sess.run(tf.trainable_variables())
        self.assertLess(losses[-1], losses[0])
        self.assertTrue(all(not np.array_equal(b, a) for b, a in zip(before, after)))


def test_main_trains_and_tests_the_cnn(tmp_path, tiny_trained_cnn):
    """`--model cnn` trains (the session's 2-step CNN run, conftest.py) and tests through main.py like the capsule
    network; the header names it and test mode has no routing statistics or iteration sweep."""
    shutil.copytree(os.path.join(str(tiny_trained_cnn.workspace), "run"), str(tmp_path / "run"))
    train = tiny_trained_cnn.result
    assert train.returncode == 0, train.stderr
    assert "the baseline CNN" in train.stdout
    assert read_json(str(tmp_path / "run" / "flags.json"))["hparams"]["model"] == "cnn"
    test = run_main(["--test", "True", "--result_dir", "run", "--sweep_images", "10"], cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    results = read_json(str(tmp_path / "run" / "test_results.json"))
    assert "iteration_sweep" not in results and results["routing"] == {}
    assert not os.path.exists(str(tmp_path / "run" / "routing.png"))
