"""Adversarial robustness (paper section 6): FGSM and BIM against a run's network, white-box or transferred.

Hinton, Sabour, Frosst, ICLR 2018, section 6 attacks the capsule network and the baseline CNN with the fast
gradient sign method (FGSM, Goodfellow et al. 2015) and its iterative form (BIM, Kurakin et al. 2017), both
untargeted and targeted, and reports the success rate against epsilon. Here, in test mode (`--attack`):

Loss. The gradient is that of the loss each network was trained on, with respect to its input images: for
the capsule network the spread loss (paper eq. 3) at the margin of the restored checkpoint's global step
(`model.margin_schedule`; for a finished run the run's final margin), for the CNN its softmax cross-entropy
on the logits (not on the probabilities, whose softmax saturates in float32). The training loss is what
section 6 and FGSM itself use ("the gradient of the loss"), and it makes the two networks' attacks the same
recipe. One property of the spread loss shows in the results: it is exactly 0, with a 0 gradient, for an
image whose true class beats every other class by at least the margin, so FGSM leaves such an image as it
is. The fraction of images with an all-zero gradient at the first step is reported (`zero_gradient`): a
low success rate with a high zero-gradient fraction means no gradient, not robustness. `--attack_margin M`
sets the capsules' attack margin instead: at 1 the loss is 0 only where the class activations are exactly 1 and
0 (saturated in float32), so nearly every image has a gradient, as every image has under cross-entropy.
Untargeted attacks ascend the loss of the true label; targeted ones descend the loss of the target label
(`random`: another class drawn with the run's seed; `least_likely`: the lowest-scoring class of the clean
image on the attacking network). Each image's loss is summed, not averaged, so batching changes nothing.

Clipping. Pixels stay in the range the network was fed: [0, 1] for the IDX datasets (MNIST, Fashion-MNIST),
and for smallNORB, whose crops are standardised floats with no fixed range, each clean crop's own min..max;
there epsilon is in the crop's standard deviations.

BIM: `steps` iterations x <- clip(x + step_size * sign(gradient)), each projected onto the L-infinity ball of
radius epsilon around the clean image; the default step size is 1.25 * epsilon / steps, so the steps
together could travel 1.25 epsilon (Kurakin et al. 2017 take min(eps + 4, 1.25 eps) steps of one grey
level). FGSM is BIM with one step of size epsilon.

Success rate: untargeted, the fraction of the images the attacked network classified correctly when clean
that it now misclassifies; targeted, the fraction of the images (those whose target is not their label)
now classified as the target. `--attack_transfer_from DIR2` (black-box) computes the adversarial images on
DIR2's network, in a tf.Graph and session of its own, then evaluates them on the run's.
"""

import collections
import math
import os

import numpy as np
import tensorflow.compat.v1 as tf

import data
import model as capsnet
from run import progress
from run import run_dir
from run import runtime
from data import pipeline as data_pipeline
from run.run_dir import UsageError

ATTACKS = ("none", "fgsm", "bim")
TARGETS = ("none", "random", "least_likely")  # none: untargeted
BIM_STEP_FACTOR = 1.25  # default BIM step = 1.25 * epsilon / steps (Kurakin et al. 2017: 1.25 eps in all)
UNIT_RANGE = (0.0, 1.0)  # IDX pixels as data.pipeline.scale_images feeds them
SAMPLE_PAIRS = 8  # clean / adversarial pairs in attack_samples.png
CURVES_FILE, SAMPLES_FILE = "attacks.png", "attack_samples.png"

# What an attack does: the attack, its epsilons, the target rule, BIM's steps and step size (None: the
# default), how many test images, the seed of random targets and the capsules' attack margin (None: the run's).
Options = collections.namedtuple(
    "Options", ["attack", "epsilons", "target", "bim_steps", "bim_step_size", "images", "seed", "margin"]
)
# The attack step in a graph: placeholders, then the next images, the scores, predictions and which images
# had an all-zero gradient.
Step = collections.namedtuple(
    "Step",
    ["images", "clean", "labels", "direction", "step_size", "epsilon", "low", "high"]
    + ["next_images", "scores", "predictions", "zero_gradient"],
)
# A network to attack or evaluate: its run directory, HParams and `evaluation.Settings`.
Source = collections.namedtuple("Source", ["result_dir", "hparams", "settings"])


# ---- flags --------------------------------------------------------------------------------------------------


def parse_epsilons(text):
    """The epsilons of a comma-separated list, as floats >= 0 (UsageError otherwise)."""
    try:
        epsilons = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError("--epsilons must be a comma-separated list of numbers, got %r" % text) from None
    if not all(math.isfinite(value) and value >= 0 for value in epsilons):
        raise UsageError("--epsilons must all be finite and >= 0, got %r" % text)
    return epsilons


def check_flags(values):
    """UsageError naming the flag for a bad attack flag value (the run's other flags are main.py's to check)."""
    for name, choices in (("attack", ATTACKS), ("attack_target", TARGETS)):
        if values[name] not in choices:
            raise UsageError("--%s must be one of %s, got %r" % (name, "/".join(choices), values[name]))
    parse_epsilons(values["epsilons"])
    for name in ("bim_steps", "attack_images"):
        if values[name] < 1:
            raise UsageError("--%s must be >= 1, got %r" % (name, values[name]))
    if values["bim_step_size"] is not None and not values["bim_step_size"] > 0:
        raise UsageError("--bim_step_size must be > 0, got %r" % values["bim_step_size"])
    margin = values["attack_margin"]
    if margin is not None and not (math.isfinite(margin) and margin > 0):
        raise UsageError("--attack_margin must be > 0, got %r" % margin)
    if values["attack_transfer_from"] and values["attack"] == "none":
        raise UsageError("--attack_transfer_from needs --attack fgsm or bim")


def options_from(values):
    """`Options` from the flag values."""
    return Options(
        values["attack"],
        parse_epsilons(values["epsilons"]),
        values["attack_target"],
        values["bim_steps"],
        values["bim_step_size"],
        values["attack_images"],
        values["seed"],
        values["attack_margin"],
    )


def check_transfer(path, dataset, hparams, source_dataset, source_hparams):
    """UsageError unless the run in `path` saw the same dataset, image size and channels as this run."""
    if source_dataset != dataset:
        raise UsageError("--attack_transfer_from %s is a %s run, this one %s" % (path, source_dataset, dataset))
    source_shape = (source_hparams.image_size, source_hparams.image_channels)
    if source_shape != (hparams.image_size, hparams.image_channels):
        raise UsageError(
            "--attack_transfer_from %s sees %dx%dx%d images, this run %dx%dx%d"
            % ((path, source_shape[0]) + source_shape + (hparams.image_size,) * 2 + (hparams.image_channels,))
        )


# ---- the attack in the graph ----------------------------------------------------------------------------------


def objective_for(model, hparams, global_step, margin=None):
    """(objective, margin): objective(images, labels) -> (summed loss, class scores `[N, L]`) of `model`.

    Capsules: the spread loss on the class activations at `margin`, or when None at the margin of
    `global_step` (the restored checkpoint's); CNN: softmax cross-entropy on the logits, and margin None.
    """
    if hparams.model == "cnn":
        margin = None
    elif margin is None:
        margin = capsnet.margin_schedule(global_step, hparams)
    else:
        margin = tf.constant(margin, tf.float32)

    def objective(images, labels):
        if hparams.model == "cnn":
            logits = model.logits(images)  # [N, L]
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)  # [N]
            return tf.reduce_sum(losses), logits
        activations = model.inference(images).activations  # [N, L]
        batch = tf.cast(tf.shape(labels)[0], tf.float32)
        return batch * capsnet.spread_loss(activations, labels, margin), activations  # the mean times N

    return objective, margin


def build_step(objective, image_shape):
    """One FGSM / BIM step on `objective` (images, labels) -> (scalar loss, scores `[N, L]`).

    Args:
      objective: the loss whose gradient with respect to the images the step follows.
      image_shape: (H, W, K) of one image.

    Returns:
      `Step`: feed images `[N, H, W, K]` (the current ones), clean `[N, H, W, K]`, labels `[N]` (the class
      whose loss moves), direction (+1 ascends the loss, -1 descends it), step_size, epsilon, and low and
      high `[N]` (each image's pixel range); next_images `[N, H, W, K]` is images moved by step_size along the
      gradient's sign, projected onto the epsilon ball around clean and into low..high.
    """
    shape = [None] + list(image_shape)  # [N, H, W, K]
    images = tf.placeholder(tf.float32, shape, name="attack_images")
    clean = tf.placeholder(tf.float32, shape, name="clean_images")
    labels = tf.placeholder(tf.int64, [None], name="attack_labels")
    direction, step_size, epsilon = (tf.placeholder(tf.float32, [], name=n) for n in ("direction", "step", "eps"))
    low, high = (tf.placeholder(tf.float32, [None], name=name) for name in ("low", "high"))
    loss, scores = objective(images, labels)
    gradient = tf.debugging.check_numerics(tf.gradients(loss, images)[0], "attack gradient")  # [N, H, W, K]
    moved = images + direction * step_size * tf.sign(gradient)  # [N, H, W, K]
    projected = tf.minimum(tf.maximum(moved, clean - epsilon), clean + epsilon)  # [N, H, W, K]
    low_4d, high_4d = tf.reshape(low, [-1, 1, 1, 1]), tf.reshape(high, [-1, 1, 1, 1])  # [N, 1, 1, 1]
    next_images = tf.minimum(tf.maximum(projected, low_4d), high_4d)  # [N, H, W, K]
    zero_gradient = tf.reduce_all(tf.equal(gradient, 0.0), axis=[1, 2, 3])  # [N]
    predictions = tf.argmax(scores, axis=1)  # [N]
    return Step(
        images, clean, labels, direction, step_size, epsilon, low, high, next_images, scores, predictions, zero_gradient
    )


def perturb(sess, step, clean, labels, direction, bounds, epsilon, step_size, steps):
    """`steps` attack steps from `clean` `[n, H, W, K]`: (adversarial images, zero gradient at the first `[n]`).

    FGSM is steps=1, step_size=epsilon. `labels` `[n]` are the classes whose loss moves, `direction` +1
    (untargeted) or -1 (targeted), `bounds` (low `[n]`, high `[n]`) each image's pixel range.
    """
    feed = {step.clean: clean, step.labels: labels, step.direction: direction, step.epsilon: epsilon}
    feed.update({step.step_size: step_size, step.low: bounds[0], step.high: bounds[1]})
    images, zero_gradient = clean, None
    for _ in range(steps):
        feed[step.images] = images
        images, zero = sess.run([step.next_images, step.zero_gradient], feed)
        zero_gradient = zero if zero_gradient is None else zero_gradient
    return images, zero_gradient


class Network:
    """A run's latest checkpoint in a tf.Graph and session of its own, with the attack step on its loss."""

    def __init__(self, source, image_shape, margin=None):
        self.source = source
        self.graph = tf.Graph()
        with self.graph.as_default():
            global_step = tf.train.get_or_create_global_step()
            model = runtime.new_model(source.hparams, source.settings.micro_batches)
            objective, margin = objective_for(model, source.hparams, global_step, margin)
            self.step = build_step(objective, image_shape)
            self.sess = runtime.new_session(source.settings.threads, source.settings.micro_batches)
            self.checkpoint = run_dir.restore_latest(self.sess, tf.train.Saver(), source.result_dir)
            self.margin = None if margin is None else float(self.sess.run(margin))

    def describe_loss(self):
        """The attack's loss in words, for the results."""
        if self.margin is None:
            return "softmax cross-entropy"
        return "spread loss, margin %.4g" % self.margin

    def _batches(self, count, desc):
        """(slices of at most one evaluation batch, a progress bar over `count` images)."""
        size = self.source.settings.batch_size
        slices = [slice(start, start + size) for start in range(0, count, size)]
        return slices, progress.progress(count, desc, "img", self.source.settings.quiet)

    def predict(self, images, desc):
        """(predictions `[n]`, class scores `[n, L]`) of `images` `[n, H, W, K]`."""
        predictions, scores = [], []
        slices, bar = self._batches(len(images), desc)
        with bar:
            for part in slices:
                batch = self.sess.run([self.step.predictions, self.step.scores], {self.step.images: images[part]})
                predictions.append(batch[0])
                scores.append(batch[1])
                bar.update(len(batch[0]))
        return np.concatenate(predictions), np.concatenate(scores)

    def attack(self, clean, labels, direction, bounds, epsilon, step_size, steps, desc):
        """`perturb` over every batch of `clean` `[n, H, W, K]`: (adversarial images, zero gradient `[n]`)."""
        adversarial, zero_gradient = [], []
        slices, bar = self._batches(len(clean), desc)
        with bar:
            for part in slices:
                part_bounds = (bounds[0][part], bounds[1][part])
                images, zero = perturb(
                    self.sess, self.step, clean[part], labels[part], direction, part_bounds, epsilon, step_size, steps
                )
                adversarial.append(images)
                zero_gradient.append(zero)
                bar.update(len(images))
        return np.concatenate(adversarial), np.concatenate(zero_gradient)

    def close(self):
        self.sess.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


# ---- images, targets and scores ---------------------------------------------------------------------------------


def as_network_input(dataset, images):
    """Test images as the network is fed them: float32 `[n, H, W, K]` (IDX bytes scaled to [0, 1])."""
    if dataset in data.PREPROCESSED:
        return np.asarray(images, np.float32)  # smallNORB crops, already [n, 32, 32, K]
    return data_pipeline.scale_images(images)  # [n, 28, 28, 1]


def pixel_bounds(dataset, images):
    """(low `[n]`, high `[n]`): [0, 1] for the IDX datasets, each smallNORB crop's own min..max."""
    if dataset in data.PREPROCESSED:
        return images.min(axis=(1, 2, 3)), images.max(axis=(1, 2, 3))
    count = len(images)
    return np.full(count, UNIT_RANGE[0], np.float32), np.full(count, UNIT_RANGE[1], np.float32)


def attack_labels(target, labels, clean_scores, seed):
    """(classes whose loss moves `[n]`, direction): the true labels and +1 untargeted; the targets and -1.

    'random': another class than the label, uniform, drawn with `seed`; 'least_likely': the lowest class
    score `clean_scores` `[n, L]` gives the clean image.
    """
    if target == "none":
        return labels, 1.0
    num_classes = clean_scores.shape[1]
    if target == "random":
        offsets = np.random.RandomState(seed).randint(1, num_classes, size=len(labels))  # never 0: never the label
        return (labels + offsets) % num_classes, -1.0
    return np.argmin(clean_scores, axis=1).astype(np.int64), -1.0


def success_rate(truth, clean_predictions, adversarial_predictions, targets=None):
    """(success rate, images it is over): untargeted (`targets` None), the fraction of the clean-correct
    images now misclassified; targeted, the fraction of the images whose target is not their label now
    classified as the target (a misclassification into another class is no success)."""
    if targets is None:
        eligible, hits = clean_predictions == truth, adversarial_predictions != truth
    else:
        eligible, hits = targets != truth, adversarial_predictions == targets
    count = int(np.sum(eligible))
    return (float(np.mean(hits[eligible])) if count else 0.0), count


# ---- the attack of a run ------------------------------------------------------------------------------------

# The images attack_samples.png shows: clean and adversarial `[k, H, W, K]`, labels, both predictions `[k]`.
Samples = collections.namedtuple("Samples", ["clean", "adversarial", "labels", "clean_predictions", "predictions"])


def step_schedule(options, epsilon):
    """(step size, steps) at `epsilon`: FGSM one step of epsilon; BIM `bim_steps` of `bim_step_size`, by default
    BIM_STEP_FACTOR * epsilon / steps."""
    if options.attack == "fgsm":
        return epsilon, 1
    if options.bim_step_size is not None:
        return options.bim_step_size, options.bim_steps
    return BIM_STEP_FACTOR * epsilon / options.bim_steps, options.bim_steps


def craft(network, clean, truth, dataset, options):
    """Adversarial images of `clean` `[n, H, W, K]` (labels `truth` `[n]`) at every epsilon on `network`.

    Returns:
      (adversarial images per epsilon, zero-gradient fraction per epsilon, targets `[n]` (None untargeted),
      the network's clean predictions `[n]`).
    """
    clean_predictions, scores = network.predict(clean, "attack: clean images")
    bounds = pixel_bounds(dataset, clean)
    labels, direction = attack_labels(options.target, truth, scores, options.seed)
    adversarial, zero = [], []
    for epsilon in options.epsilons:
        size, steps = step_schedule(options, epsilon)
        desc = "%s eps %g" % (options.attack, epsilon)
        images, zero_gradient = network.attack(clean, labels, direction, bounds, epsilon, size, steps, desc)
        adversarial.append(images)
        zero.append(float(np.mean(zero_gradient)))
    return adversarial, zero, None if options.target == "none" else labels, clean_predictions


def evaluate(network, clean, adversarial, epsilons, clean_predictions=None):
    """(clean predictions `[n]` (these when given), predictions `[n]` of each adversarial array) on `network`."""
    if clean_predictions is None:
        clean_predictions = network.predict(clean, "transfer: clean images")[0]
    predictions = [network.predict(images, "evaluate eps %g" % eps)[0] for images, eps in zip(adversarial, epsilons)]
    return clean_predictions, predictions


def entry_for(options, truth, clean_predictions, predictions, targets, zero):
    """The results of one attack: clean accuracy, and per epsilon accuracy, success rate, zero gradients."""
    per_epsilon = []
    for epsilon, adversarial_predictions, zero_fraction in zip(options.epsilons, predictions, zero):
        rate, over = success_rate(truth, clean_predictions, adversarial_predictions, targets)
        per_epsilon.append(
            {
                "epsilon": epsilon,
                "step_size": step_schedule(options, epsilon)[0],
                "accuracy": float(np.mean(adversarial_predictions == truth)),
                "success_rate": rate,
                "zero_gradient": zero_fraction,
            }
        )
    entry = {"attack": options.attack, "target": options.target, "images": int(len(truth)), "success_over": over}
    entry.update(clean_accuracy=float(np.mean(clean_predictions == truth)), per_epsilon=per_epsilon)
    entry["bim_steps"] = options.bim_steps if options.attack == "bim" else None
    return entry


def run(victim, transfer_from, dataset, images, labels, options):
    """Attacks the first `options.images` of `images` (as loaded) and `labels`; prints a line per epsilon.

    Args:
      victim: `Source` of the run whose network is evaluated (and attacked, without `transfer_from`).
      transfer_from: `Source` of the run the adversarial images are computed on, or None (white-box).
      dataset: the dataset's name (how images are fed and clipped).

    Returns:
      (key "attack/target" (+ "/margin:M" with --attack_margin, + "/from:RUN" for a transfer), results entry,
      `Samples` at the largest epsilon).
    """
    count = min(options.images, len(labels))
    clean, truth = as_network_input(dataset, images[:count]), np.asarray(labels[:count])
    with Network(transfer_from or victim, clean.shape[1:], options.margin) as network:
        adversarial, zero, targets, source_predictions = craft(network, clean, truth, dataset, options)
        loss, source_checkpoint = network.describe_loss(), network.checkpoint
        if transfer_from is None:
            outcome = evaluate(network, clean, adversarial, options.epsilons, source_predictions)
    if transfer_from is not None:
        with Network(victim, clean.shape[1:]) as network:
            outcome = evaluate(network, clean, adversarial, options.epsilons)
    clean_predictions, predictions = outcome
    entry = entry_for(options, truth, clean_predictions, predictions, targets, zero)
    entry.update(loss=loss, checkpoint=network.checkpoint, source_checkpoint=source_checkpoint)
    entry["clip"] = "each clean crop's min..max" if dataset in data.PREPROCESSED else "[0, 1]"
    key = "%s/%s" % (options.attack, options.target)
    if options.margin is not None:
        key += "/margin:%g" % options.margin
    if transfer_from is not None:
        key += "/from:%s" % os.path.basename(os.path.normpath(transfer_from.result_dir))
    print_entry(key, entry)
    largest, shown = int(np.argmax(options.epsilons)), slice(0, SAMPLE_PAIRS)
    samples = (clean[shown], adversarial[largest][shown], truth[shown], clean_predictions[shown])
    return key, entry, Samples(*samples, predictions[largest][shown])


def print_entry(key, entry):
    """One line per epsilon: accuracy, success rate and the zero-gradient fraction."""
    print(
        "attack %s (%s; %d images, clean accuracy %.2f%%):"
        % (key, entry["loss"], entry["images"], 100 * entry["clean_accuracy"])
    )
    for row in entry["per_epsilon"]:
        rates = (100 * row["accuracy"], 100 * row["success_rate"], entry["success_over"], 100 * row["zero_gradient"])
        print(
            "  eps %g: accuracy %.2f%%, success rate %.2f%% over %d images, zero gradient %.1f%%"
            % ((row["epsilon"],) + rates)
        )
