"""A capsule network of your own, built from capsule_layers.py (README, "Build your own network").

Not the paper's network: 32x32 RGB images, 5 classes, 'SAME' padding, conv capsules of strides 2 and 1,
trained with the spread loss (paper section 4) and Adam, with a preset's layer recipe
(`hparams.layer_kwargs`), its weight decay taken from `tf.GraphKeys.REGULARIZATION_LOSSES`, an evaluation
graph that reuses the training graph's variables (`reuse=True`), and routing statistics of both graphs.
The images are synthetic (each class a fixed random picture under uniform noise), so the script runs
anywhere; feed your own arrays instead.

  images        [N, 32, 32, 3]
  relu_conv     [N, 16, 16, 32]          5x5, stride 2, SAME
  primary_caps  [N, 16, 16, 8, 4, 4]     1x1
  conv_caps     [N, 8, 8, 8, 4, 4]       3x3, stride 2, SAME
  conv_caps_1   [N, 8, 8, 8, 4, 4]       3x3, stride 1, SAME
  class_caps    [N, 5, 4, 4] + activations [N, 5]

Run from the repository root: python examples/custom_network.py
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402

import capsule_layers as cl  # noqa: E402
from routing import diagnostics  # noqa: E402
import hparams  # noqa: E402
import model  # noqa: E402

IMAGE_SIZE, CHANNELS, CLASSES = 32, 3, 5
FILTERS, PRIMARY_TYPES, CAPSULE_TYPES = 32, 8, 8
# (kernel, stride, padding) from the image up: relu_conv, primary_caps, conv_caps, conv_caps_1.
CONVOLUTIONS = [(5, 2, "SAME"), (1, 1, "SAME"), (3, 2, "SAME"), (3, 1, "SAME")]
NOISE = 0.5  # weight of the uniform noise over each class's picture
SHOWN = [("conv_caps", "assignment_entropy"), ("conv_caps_1", "assignment_entropy"), ("class_caps", "activation_p50")]


def network(images, hp, reuse=None):
    """Class activations `[N, 5]` of `images` `[N, 32, 32, 3]`, and the routed layers (for their statistics)."""

    def recipe(kind):
        return hparams.layer_kwargs(hp, kind)

    offsets = None  # the class layer's coordinate addition: the paper's, or the released code's on this network
    if hp.coordinate_addition == "official":
        offsets = cl.official_coordinate_offsets(cl.receptive_field_centres(IMAGE_SIZE, CONVOLUTIONS))
    (k1, s1, _), (kp, sp, _), (k2, s2, _), (k3, s3, _) = CONVOLUTIONS
    with tf.variable_scope("custom_capsnet", reuse=reuse):
        features = cl.relu_conv(images, FILTERS, k1, s1, "SAME", **recipe("relu_conv"))  # [N, 16, 16, 32]
        capsules = cl.primary_caps(features, PRIMARY_TYPES, kp, sp, "same", **recipe("primary_caps"))
        capsules, conv1 = cl.conv_caps(
            *capsules, CAPSULE_TYPES, k2, s2, "SAME", return_layer=True, **recipe("conv_caps")
        )
        capsules, conv2 = cl.conv_caps(
            *capsules, CAPSULE_TYPES, k3, s3, "SAME", return_layer=True, **recipe("conv_caps")
        )
        (_, activations), classes = cl.class_caps(
            *capsules, CLASSES, coordinate_offsets=offsets, return_layer=True, **recipe("class_caps")
        )
    return activations, [conv1, conv2, classes]  # [N, 5]


def synthetic_batch(pictures, batch_size, rng):
    """(images `[N, 32, 32, 3]` in [0, 1], labels `[N]`): each a random class's picture under uniform noise."""
    labels = rng.randint(CLASSES, size=batch_size)
    noise = rng.uniform(size=[batch_size, IMAGE_SIZE, IMAGE_SIZE, CHANNELS])
    return (1.0 - NOISE) * pictures[labels] + NOISE * noise, labels


def build(hp, learning_rate):
    """The training and evaluation graphs on placeholders: a dict of the tensors and ops `train` runs."""
    images = tf.placeholder(tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, CHANNELS])
    labels = tf.placeholder(tf.int64, [None])
    step = tf.train.get_or_create_global_step()
    activations, train_layers = network(images, hp)
    spread = model.spread_loss(activations, labels, model.margin_schedule(step, hp))
    decay = tf.losses.get_regularization_loss()  # the sum of REGULARIZATION_LOSSES: hp.weight_decay * ||W||^2 / 2
    train_op = tf.train.AdamOptimizer(learning_rate).minimize(spread + decay, global_step=step)
    variables = len(tf.global_variables())
    eval_activations, eval_layers = network(images, hp, reuse=True)  # shares every variable
    if len(tf.global_variables()) != variables:
        raise RuntimeError("the evaluation graph made new variables")

    def accuracy(class_activations):
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(class_activations, axis=1), labels), tf.float32))

    return dict(
        images=images,
        labels=labels,
        train_op=train_op,
        loss=spread + decay,
        decay=decay,
        accuracy=accuracy(activations),
        eval_accuracy=accuracy(eval_activations),
        train_statistics=diagnostics.routing_statistics(train_layers),
        eval_statistics=diagnostics.routing_statistics(eval_layers),
        iterations=hp.iterations,
    )


def train(graph, steps, batch_size, seed, threads):
    """Trains `steps` steps on synthetic data, printing the loss; returns the held-out accuracy."""
    rng = np.random.RandomState(seed)
    pictures = rng.uniform(size=[CLASSES, IMAGE_SIZE, IMAGE_SIZE, CHANNELS])  # one fixed picture per class
    config = tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    with tf.Session(config=config) as sess:
        sess.run(tf.global_variables_initializer())
        for step in range(1, steps + 1):
            images, labels = synthetic_batch(pictures, batch_size, rng)
            feed = {graph["images"]: images, graph["labels"]: labels}
            _, loss, decay, accuracy = sess.run(
                [graph["train_op"], graph["loss"], graph["decay"], graph["accuracy"]], feed
            )
            if step == 1 or step % 10 == 0 or step == steps:
                print("step %d: loss %.4f (weight decay %.2e), batch accuracy %.2f" % (step, loss, decay, accuracy))
        train_images, train_labels = synthetic_batch(pictures, batch_size, rng)
        train_statistics = sess.run(graph["train_statistics"], {graph["images"]: train_images})
        images, labels = synthetic_batch(pictures, batch_size, rng)  # held out: never trained on
        feed = {graph["images"]: images, graph["labels"]: labels}
        accuracy, eval_statistics = sess.run([graph["eval_accuracy"], graph["eval_statistics"]], feed)
    print("evaluation graph (reuse=True): accuracy %.2f on %d held-out images" % (accuracy, batch_size))
    last = graph["iterations"] - 1
    for layer, statistic in SHOWN:
        key = (layer, statistic, last)
        print(
            "routing %s %s, iteration %d: training batch %.4f, held-out batch (evaluation graph) %.4f"
            % (*key, train_statistics[key], eval_statistics[key])
        )
    return accuracy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(hparams.PRESETS), help="layer recipe (hparams.py)")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--batch_size", type=int, default=16, help="images per step")
    parser.add_argument(
        "--learning_rate", type=float, default=None, help="Adam's learning rate (default: the preset's)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the data and the initial weights")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: TensorFlow's choice)")
    args = parser.parse_args(argv)
    tf.disable_v2_behavior()
    hp = hparams.hparams_for(args.preset)
    with tf.Graph().as_default():
        tf.set_random_seed(args.seed)
        graph = build(hp, args.learning_rate or hp.learning_rate)
        print(
            "%s recipe, %d parameters, %d regularization losses"
            % (
                args.preset,
                model.count_parameters(tf.trainable_variables()),
                len(tf.losses.get_regularization_losses()),
            )
        )
        return train(graph, args.steps, args.batch_size, args.seed, args.threads)


if __name__ == "__main__":
    main()
