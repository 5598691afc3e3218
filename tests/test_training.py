"""Regression test: a short, seeded training run on real MNIST learns (issue: train without NaN).

Reads MNIST from $MNIST_DIR (default: ../shared/data/mnist beside the project); skipped only when the
folder is absent. Runs in-process, one to two minutes on two cores.
"""

import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import model as capsnet
from run import runtime
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


def test_history_records_the_mean_of_each_summary_interval(tmp_path):
    """At every summary step the history holds the mean loss and training accuracy of the interval's steps,
    not the last batch's: with loss = step and accuracy = step / 10 at steps 1..6 and summaries every 3, the
    history reads (2, 0.2) at step 3 and (5, 0.5) at step 6."""
    import collections

    from run import training

    with tf.Graph().as_default():
        global_step = tf.train.get_or_create_global_step()
        train_op = tf.assign_add(global_step, 1)
        with tf.control_dependencies([train_op]):
            loss = tf.cast(global_step.read_value(), tf.float32)  # the step this run ends at
        images_in = tf.placeholder(tf.float32, [None, 1])
        labels_in = tf.placeholder(tf.int64, [None])
        iterator = tf.data.Dataset.from_tensor_slices((images_in, labels_in)).make_initializable_iterator()
        fields = ["train_op", "loss", "accuracy", "global_step", "summary_op", "finite_checks"]
        graph = collections.namedtuple("Graph", fields)(
            train_op, loss, loss / 10.0, global_step, tf.summary.scalar("loss", loss), {}
        )
        pipeline = collections.namedtuple("Pipeline", ["train_iterator", "images_in", "labels_in"])(
            iterator, images_in, labels_in
        )
        data = (np.zeros([6, 1], np.float32), np.zeros([6], np.int64), np.zeros([0, 1]), np.zeros([0]))
        schedule = training.Schedule(1, 6, 6, 100, 3, True)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            run = training.TrainingRun(str(tmp_path), sess, graph, None, pipeline, data, schedule)
            assert run.run(0) == 6
    assert run.history["step"] == [3, 6]
    np.testing.assert_allclose(run.history["loss"], [2.0, 5.0])
    np.testing.assert_allclose(run.history["train_accuracy"], [0.2, 0.5])
