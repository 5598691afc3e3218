"""Regression test: a short, seeded training run on real MNIST learns (issue: train without NaN).

Reads MNIST from $MNIST_DIR (default: ../shared/data/mnist beside the project); skipped only when the
folder is absent. Runs in-process, one to two minutes on two cores.
"""

import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import model as capsnet
import runtime
from data import mnist, pipeline

MNIST_DIR = os.environ.get("MNIST_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist"))
TRAIN_STEPS = 100
BATCH_SIZE = 32
TEST_IMAGES = 1000
SEED = 1
EVAL_BATCH = 100
# Calibrated from runs of this exact test on the 2-core dev machine (deterministic there): with the small
# preset's recipe defaults 0.563 after 60 steps and 0.757 after 100, hence 100 steps;
# with the earlier official-code defaults it was 0.650-0.657 after 60. Chance is 0.10; 0.6 is six times chance
# and leaves 15 points for float-rounding differences on other CPUs (oneDNN on or off, other instruction
# sets) changing the trajectory.
MIN_ACCURACY = 0.6


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="real MNIST not found at %s" % MNIST_DIR)
def test_short_run_learns_without_non_finite_steps():
    """100 steps of the small net (batch 32, fixed seed) reach >= 60% on 1,000 test images, every loss finite."""
    train_x, train_y = mnist.load(MNIST_DIR, "train")
    test_x, test_y = mnist.load(MNIST_DIR, "test")
    with tf.Graph().as_default():
        tf.set_random_seed(SEED)
        images = tf.placeholder(tf.float32, [None, 28, 28, 1])
        labels = tf.placeholder(tf.int64, [None])
        hparams = runtime.with_run_length(capsnet.hparams_for("small"), TRAIN_STEPS)
        graph = capsnet.CapsNetEMModel(hparams).train(images, labels)
        order = np.random.RandomState(SEED).permutation(len(train_x))[: TRAIN_STEPS * BATCH_SIZE]
        batches = pipeline.scale_images(train_x[order]), train_y[order]
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            losses = []
            for start in range(0, TRAIN_STEPS * BATCH_SIZE, BATCH_SIZE):
                feed = {images: batches[0][start : start + BATCH_SIZE], labels: batches[1][start : start + BATCH_SIZE]}
                losses.append(sess.run([graph.train_op, graph.loss], feed)[1])
            scaled = pipeline.scale_images(test_x[:TEST_IMAGES])
            predicted = np.concatenate(
                [
                    sess.run(graph.predictions, {images: scaled[i : i + EVAL_BATCH]})
                    for i in range(0, TEST_IMAGES, EVAL_BATCH)
                ]
            )
    accuracy = float(np.mean(predicted == test_y[:TEST_IMAGES]))
    print("accuracy after %d steps: %.3f" % (TRAIN_STEPS, accuracy))
    assert np.all(np.isfinite(losses))
    assert accuracy >= MIN_ACCURACY
