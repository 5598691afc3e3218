"""What routing does, per layer and iteration: the statistics behind TensorBoard's routing scalars and
test mode's routing.png.

For every routed layer (conv_caps1, conv_caps2, class_caps) and every EM iteration (M-step) t:
  variance_p10/p50/p90   percentiles of sigma^2 over every parent and pose entry
  mass_fraction_p50      median of a parent's mass sum_i R_ij a_i over the number of children it sees
                         (1: every child fully and actively its own)
  activation_p10/p50/p90 percentiles of the parents' activations
  assignment_entropy     mean entropy of R over the parent types at each receptive-field entry, as a
                         fraction of log O (1: a child splits evenly over the types, 0: it picks one)
  vote_magnitude_p50/p99 percentiles of |V| over the layer's vote entries (the same in every iteration: the
                         votes do not change; how far float32's centred routing sums are from cancelling)
The percentiles are of one batch (the vote magnitudes of an evenly strided sample of at most
VOTE_SAMPLE entries); test mode averages them over its batches. Graph code only.
"""

import math

import tensorflow.compat.v1 as tf

from routing.layer_base import RoutedCapsuleLayer

PERCENTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}
STATISTICS = (
    "variance_p10",
    "variance_p50",
    "variance_p90",
    "mass_fraction_p50",
    "activation_p10",
    "activation_p50",
    "activation_p90",
    "assignment_entropy",
    "vote_magnitude_p50",
    "vote_magnitude_p99",
)
VOTE_PERCENTILES = {"p50": 0.5, "p99": 0.99}
VOTE_SAMPLE = 2**20  # vote entries sorted for their percentiles: conv_caps1 holds 3.7M per image (paper)
_ENTROPY_FLOOR = 1e-30  # p log p at p = 0 is 0; the floor keeps log finite


def percentile(values, fraction):
    """The `fraction` quantile of every entry of `values` (nearest rank): a scalar."""
    flat = tf.sort(tf.reshape(values, [-1]))  # [n]
    rank = tf.cast(tf.round(fraction * tf.cast(tf.size(flat) - 1, tf.float32)), tf.int32)
    return flat[rank]


def _assignment_entropy(assignments, votes_shape):
    """Mean entropy of R over the O parent types at each entry, over log O: a scalar in [0, 1]."""
    r = tf.broadcast_to(assignments, votes_shape[:3])  # [NP, O, children]
    totals = tf.reduce_sum(r, axis=1, keepdims=True)  # [NP, 1, children]
    p = r / tf.maximum(totals, _ENTROPY_FLOOR)  # [NP, O, children]
    entropy = -tf.reduce_sum(p * tf.log(tf.maximum(p, _ENTROPY_FLOOR)), axis=1)  # [NP, children]
    seen = tf.cast(totals[:, 0, :] > 0, entropy.dtype)  # [NP, children], 0 at padded entries
    types = int(r.shape[1])
    return tf.reduce_sum(entropy * seen) / tf.maximum(tf.reduce_sum(seen), 1.0) / math.log(max(types, 2))


def _vote_magnitudes(votes):
    """|V| of an evenly strided sample of at most VOTE_SAMPLE of the votes' entries: `[n]`."""
    flat = tf.reshape(votes, [-1])  # [NP * O * children * 16]
    stride = tf.maximum(tf.size(flat) // VOTE_SAMPLE, 1)
    return tf.abs(flat[::stride])  # [n]


def _end_points(layer, call):
    """The end points of `layer`'s call number `call` (as a list index: -1 the last); ValueError naming the layer
    when it has none."""
    if not layer.calls:
        raise ValueError("%s: routing statistics need a layer that has been called; it has no end points" % layer.name)
    if not -len(layer.calls) <= call < len(layer.calls):
        raise ValueError("%s: call %d asked for, the layer was called %d times" % (layer.name, call, len(layer.calls)))
    return layer.calls[call]


def layer_statistics(layer, call=-1):
    """{(statistic, iteration): scalar tensor} of one routed layer's call number `call` (-1: its last)."""
    end_points = _end_points(layer, call)
    votes_shape = end_points["votes_shape"]  # [NP, O, children, 16]
    children = tf.cast(votes_shape[2], tf.float32)
    statistics = {}
    magnitudes = _vote_magnitudes(end_points["votes"])  # [n]
    vote_percentiles = {name: percentile(magnitudes, fraction) for name, fraction in VOTE_PERCENTILES.items()}
    for t, parents in enumerate(end_points["parents_per_iteration"]):
        for name, fraction in PERCENTILES.items():
            statistics[("variance_" + name, t)] = percentile(parents.variance, fraction)
            statistics[("activation_" + name, t)] = percentile(parents.activations, fraction)
        statistics[("mass_fraction_p50", t)] = percentile(parents.mass, 0.5) / children
        statistics[("assignment_entropy", t)] = _assignment_entropy(parents.assignments, votes_shape)
        for name, value in vote_percentiles.items():
            statistics[("vote_magnitude_" + name, t)] = value
    return statistics


def routing_statistics(layers, call=-1):
    """{(layer name, statistic, iteration): scalar tensor} of every routed layer in `layers`, of each one's call
    number `call` (-1: the last; e.g. 0 the training graph and 1 the evaluation graph of a network built twice)."""
    return {
        (layer.name,) + key: value
        for layer in layers
        if isinstance(layer, RoutedCapsuleLayer)
        for key, value in layer_statistics(layer, call).items()
    }


def routing_summaries(layers):
    """TensorBoard scalars 'routing/<layer>/<statistic>/iteration_<t>' for every routed layer."""
    return [
        tf.summary.scalar("routing/%s/%s/iteration_%d" % key, value)
        for key, value in sorted(routing_statistics(layers).items())
    ]


def gradient_norm_summaries(grads_and_vars, layers):
    """TensorBoard scalars 'gradient_norm/<variable>': the L2 norm of the gradient reaching each layer's
    kernels and transformation matrices (relu_conv1's kernel first)."""
    weights = {id(w) for layer in layers for w in layer.weights_to_decay}
    return [tf.summary.scalar("gradient_norm/" + v.op.name, tf.norm(g)) for g, v in grads_and_vars if id(v) in weights]
