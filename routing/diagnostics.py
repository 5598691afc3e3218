"""What routing does, per layer and iteration: the statistics behind TensorBoard's routing scalars and
test mode's routing.png.

For every routed layer (conv_caps1, conv_caps2, class_caps) and every EM iteration (M-step) t:
  variance_p10/p50/p90   percentiles of sigma^2 over every parent and pose entry
  mass_fraction_p50      median of a parent's mass sum_i R_ij a_i over the number of children it sees
                         (1: every child fully and actively its own)
  activation_p10/p50/p90 percentiles of the parents' activations
  assignment_entropy     mean entropy of R over the parent types at each receptive-field entry, as a
                         fraction of log O (1: a child splits evenly over the types, 0: it picks one)
The percentiles are of one batch; test mode averages them over its batches. Graph code only.
"""

import math

import tensorflow.compat.v1 as tf

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
)
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


def layer_statistics(layer):
    """{(statistic, iteration): scalar tensor} of one routed layer after its call."""
    votes = layer.end_points["votes"]  # [NP, O, children, 16]
    children = tf.cast(tf.shape(votes)[2], tf.float32)
    statistics = {}
    for t, parents in enumerate(layer.end_points["parents_per_iteration"]):
        for name, fraction in PERCENTILES.items():
            statistics[("variance_" + name, t)] = percentile(parents.variance, fraction)
            statistics[("activation_" + name, t)] = percentile(parents.activations, fraction)
        statistics[("mass_fraction_p50", t)] = percentile(parents.mass, 0.5) / children
        statistics[("assignment_entropy", t)] = _assignment_entropy(parents.assignments, tf.shape(votes))
    return statistics


def routing_statistics(layers):
    """{(layer name, statistic, iteration): scalar tensor} of every routed layer in `layers`: those whose
    end points hold the routing's parents per iteration (capsule_layers.RoutedCapsuleLayer's; found by what
    is read, so that this module imports nothing of the layers that use it)."""
    return {
        (layer.name,) + key: value
        for layer in layers
        if "parents_per_iteration" in getattr(layer, "end_points", {})
        for key, value in layer_statistics(layer).items()
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
