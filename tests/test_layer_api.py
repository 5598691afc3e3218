"""Tests of the capsule layers' `tf.layers` conventions (layer_base.py, capsule_layers.py, hparams.layer_kwargs):
names, trainable, regularizers, build, dtype, pairs, padding, argument errors, grid sizes, per-call end points."""

from absl.testing import parameterized

import numpy as np
import tensorflow.compat.v1 as tf

import capsule_layers as cl
import capsule_ops
from routing import diagnostics
import hparams
import model as capsnet

_GRID, _TYPES = 5, 2  # a small capsule grid [N, 5, 5, 2, 4, 4]


def _capsules(batch=2, grid=_GRID, types=_TYPES, dtype=tf.float32, seed=0):
    """Random (poses `[N, grid, grid, T, 4, 4]`, activations `[N, grid, grid, T]`) constants."""
    rng = np.random.RandomState(seed)
    poses = tf.constant(rng.normal(size=[batch, grid, grid, types, 4, 4]), dtype)
    activations = tf.constant(rng.uniform(0.1, 0.9, size=[batch, grid, grid, types]), dtype)
    return poses, activations


def _names():
    """The graph's variable names, sorted."""
    return sorted(v.op.name for v in tf.global_variables())


class NamesTest(tf.test.TestCase):
    def test_unnamed_layers_get_unique_names(self):
        """Two unnamed ConvCaps make conv_caps/ and conv_caps_1/ variables; the layers take those names."""
        with tf.Graph().as_default():
            first, second = cl.ConvCaps(2, routing_kernel="tf"), cl.ConvCaps(2, routing_kernel="tf")
            second(*first(*_capsules()))
            self.assertEqual((first.name, second.name), ("conv_caps", "conv_caps_1"))
            expected = sorted(
                s + "/" + v for s in ("conv_caps", "conv_caps_1") for v in ("weights", "beta_v", "beta_a")
            )
            self.assertEqual(_names(), expected)

    def test_unique_under_auto_reuse(self):
        """Under AUTO_REUSE two different unnamed layers still make two sets of variables."""
        with tf.Graph().as_default():
            with tf.variable_scope("net", reuse=tf.AUTO_REUSE):
                hidden = cl.conv_caps(*_capsules(), 2, padding="same")
                cl.conv_caps(*hidden, 2, padding="same")
            self.assertEqual(len(tf.trainable_variables()), 6)
            self.assertEqual({v.op.name.split("/")[1] for v in tf.global_variables()}, {"conv_caps", "conv_caps_1"})

    def test_network_rebuilt_with_reuse_shares_variables(self):
        """A network of unnamed layers built twice in a scope re-entered with reuse=True (and with AUTO_REUSE)
        shares its variables: the names repeat, nothing new is made."""
        with tf.Graph().as_default():

            def network(reuse):
                with tf.variable_scope("net", reuse=reuse):
                    hidden = cl.conv_caps(*_capsules(), 2, padding="SAME")
                    return cl.class_caps(*cl.conv_caps(*hidden, 2), 3)

            network(None)
            names = _names()
            network(True)
            network(tf.AUTO_REUSE)
            self.assertEqual(_names(), names)
            self.assertEqual(len(names), 9)

    def test_functional_reuse_true_takes_the_default_name(self):
        """`reuse=True` on an unnamed functional layer reuses the default name's variables, as tf.layers."""
        with tf.Graph().as_default():
            cl.conv_caps(*_capsules(), 2)
            cl.conv_caps(*_capsules(), 2, reuse=True)
            self.assertEqual(len(tf.global_variables()), 3)

    def test_default_names(self):
        """The default names are the layers' kinds, not the paper network's scopes."""
        layers = (cl.ReluConv(4), cl.PrimaryCaps(2), cl.ConvCaps(2), cl.ClassCaps(3))
        self.assertEqual([layer.name for layer in layers], ["relu_conv", "primary_caps", "conv_caps", "class_caps"])

    def test_functional_forms_return_the_layer(self):
        """`return_layer=True` gives the layer object with the outputs (its variables and end points)."""
        with tf.Graph().as_default():
            (poses, activations), layer = cl.conv_caps(*_capsules(), 2, return_layer=True)
            self.assertIsInstance(layer, cl.ConvCaps)
            self.assertEqual(poses.shape.as_list(), [2, 3, 3, 2, 4, 4])
            self.assertEqual(len(layer.variables), 3)
            self.assertIn("votes", layer.end_points)
            features, conv = cl.relu_conv(tf.zeros([1, 9, 9, 1]), 4, return_layer=True)
            self.assertEqual(conv.weights_to_decay, [conv.kernel])


class VariablesTest(tf.test.TestCase):
    def test_not_trainable(self):
        """trainable=False keeps every variable out of tf.trainable_variables() (but in the global ones)."""
        with tf.Graph().as_default():
            features = cl.relu_conv(tf.zeros([1, 9, 9, 1]), 4, trainable=False)
            layer = cl.PrimaryCaps(2, trainable=False)
            layer(features)
            self.assertEqual(tf.trainable_variables(), [])
            self.assertEqual(len(tf.global_variables()), 6)
            self.assertEqual(layer.trainable_variables, [])

    def test_build_makes_variables_under_the_scope(self):
        """build(input_shape) called directly makes the variables under the layer's scope; a call reuses them."""
        with tf.Graph().as_default():
            layer = cl.ConvCaps(2, name="caps")
            layer.build([[None, 5, 5, 2, 4, 4], [None, 5, 5, 2]])
            conv = cl.ReluConv(4)
            conv.build([None, 9, 9, 1])
            self.assertEqual(
                _names(), ["caps/beta_a", "caps/beta_v", "caps/weights", "relu_conv/bias", "relu_conv/kernel"]
            )
            layer(*_capsules())
            self.assertEqual(len(tf.global_variables()), 5)

    def test_regularization_losses_equal_the_models_weight_decay(self):
        """The paper network built from the layers with `hparams.layer_kwargs` makes the model's variables, and its
        regularization losses (one per kernel and matrix) sum to the model's weight decay on them."""
        hp = hparams.hparams_for("paper", weight_decay=1e-3)
        with tf.Graph().as_default():
            images = tf.random.uniform([2, 28, 28, 1], seed=1)
            kwargs = {name: hparams.layer_kwargs(hp, name) for name in hparams.LAYER_KINDS}
            features = cl.relu_conv(images, hp.conv1_filters, name="relu_conv1", **kwargs["relu_conv1"])
            capsules = cl.primary_caps(features, hp.primary_types, name="primary_caps", **kwargs["primary_caps"])
            for name in ("conv_caps1", "conv_caps2"):
                stride = getattr(hp, name + "_stride")
                capsules = cl.conv_caps(*capsules, getattr(hp, name + "_types"), 3, stride, name=name, **kwargs[name])
            cl.class_caps(*capsules, 10, name="class_caps", **kwargs["class_caps"])
            names = _names()
            with tf.variable_scope(tf.get_variable_scope(), reuse=True):
                net = capsnet.CapsNetEMModel(hp)
                inference = net.inference(images)
                loss = net.loss(inference.activations, tf.zeros([2], tf.int64), tf.constant(0))
            self.assertEqual(_names(), names)  # the model made nothing new
            collection = tf.losses.get_regularization_losses()
            self.assertLen(collection, 6)  # relu_conv1 1, primary_caps 2, the three routed layers 1 each
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                total, expected = sess.run([tf.add_n(collection), loss.weight_decay])
        self.assertAllClose(total, expected, rtol=1e-6)

    def test_regularizer_once_per_variable(self):
        """A layer called twice, or rebuilt under reuse, adds each variable's loss once."""
        with tf.Graph().as_default():
            regularizer = cl.l2_regularizer(0.5)
            layer = cl.ConvCaps(2, kernel_regularizer=regularizer, name="caps")
            layer(*_capsules())
            layer(*_capsules(seed=1))
            with tf.variable_scope(tf.get_variable_scope(), reuse=True):
                cl.conv_caps(*_capsules(), 2, name="caps", kernel_regularizer=regularizer)
            self.assertLen(tf.losses.get_regularization_losses(), 1)
            self.assertEqual(layer.losses, tf.losses.get_regularization_losses())

    def test_float64_input(self):
        """With the default dtype a float64 input makes float64 variables and outputs, through every layer."""
        with tf.Graph().as_default():
            images = tf.constant(np.random.RandomState(0).uniform(size=[2, 16, 16, 1]))  # float64
            capsules = cl.primary_caps(cl.relu_conv(images, 4, 5, 2), 2)
            poses, activations = cl.class_caps(*cl.conv_caps(*capsules, 2, 3, 2), 3)
            self.assertEqual({v.dtype.base_dtype for v in tf.global_variables()}, {tf.float64})
            self.assertEqual((poses.dtype, activations.dtype), (tf.float64, tf.float64))
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                self.assertTrue(np.all(np.isfinite(sess.run(activations))))


class GeometryTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.named_parameters(
        ("relu_conv", lambda k, s: cl.ReluConv(3, k, s, "SAME"), [2, 9, 8, 2], [2, 5, 8, 3]),
        ("primary_caps", lambda k, s: cl.PrimaryCaps(3, k, s, "SAME"), [2, 9, 8, 2], [2, 5, 8, 3, 4, 4]),
        ("conv_caps", lambda k, s: cl.ConvCaps(3, k, s, "SAME"), [2, 9, 8, 2, 4, 4], [2, 5, 8, 3, 4, 4]),
    )
    def test_pairs(self, make, input_shape, output_shape):
        """A (3, 2) kernel with (2, 1) strides: the output grid of tf.nn.conv2d's rules and a [3, 2, ...] kernel."""
        with tf.Graph().as_default():
            layer = make((3, 2), (2, 1))
            inputs = [tf.zeros(input_shape)]
            if len(input_shape) == 6:
                inputs.append(tf.zeros(input_shape[:4]))
            outputs = layer(*inputs)
            poses = outputs if len(output_shape) == 4 else outputs[0]
            self.assertEqual(poses.shape.as_list()[1:], output_shape[1:])
            self.assertEqual(layer.weights_to_decay[0].shape.as_list()[:2], [3, 2])

    def test_padding_in_either_case(self):
        """padding='same' builds the same layer as 'SAME'."""
        self.assertEqual([cl.ConvCaps(2, padding=p).padding for p in ("same", "Valid")], ["SAME", "VALID"])
        self.assertEqual(cl.ReluConv(2, padding="same").padding, "SAME")

    def test_second_grid_size(self):
        """One ConvCaps and one ClassCaps called on an 8x8 and then a 6x6 grid give the outputs of fresh layers
        with the same weights on each."""
        rng = np.random.RandomState(3)
        weights, class_weights = rng.normal(size=[3, 3, 2, 2, 4, 4]), rng.normal(size=[2, 3, 4, 4])

        def layers(name):
            conv = cl.ConvCaps(2, 3, 2, "SAME", weights_initializer=tf.constant_initializer(weights), name=name)
            init = tf.constant_initializer(class_weights)
            return conv, cl.ClassCaps(3, weights_initializer=init, name=name + "_class")

        with tf.Graph().as_default():
            conv, classes = layers("shared")
            outputs = []
            for grid in (8, 6):
                capsules = _capsules(grid=grid, seed=grid, dtype=tf.float64)
                hidden = conv(*capsules)
                fresh_conv, fresh_classes = layers("fresh%d" % grid)
                outputs.append((hidden[0], classes(*hidden)[1], fresh_conv(*capsules)[0]))
                outputs[-1] += (fresh_classes(*fresh_conv(*capsules))[1],)
            self.assertEqual(outputs[1][0].shape.as_list(), [2, 3, 3, 2, 4, 4])
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                for shared_poses, shared_classes, fresh_poses, fresh_classes in sess.run(outputs):
                    self.assertAllClose(shared_poses, fresh_poses)
                    self.assertAllClose(shared_classes, fresh_classes)


def _twice(layer, first, second):
    """`layer` called on `first`, then on `second` (lists of inputs)."""
    layer(*first)
    return layer(*second)


# (case, what raises, the message's pattern): every bad argument, named.
_BAD_ARGUMENTS = [
    (
        "relu_conv_kernel_larger_than_input",
        lambda: cl.relu_conv(tf.zeros([1, 5, 5, 1]), 4, 7),
        r"^relu_conv: kernel_size \(7, 7\): a 7x7 kernel with VALID padding does not fit a 5x5 input$",
    ),
    (
        "primary_caps_kernel_larger_than_input",
        lambda: cl.primary_caps(tf.zeros([1, 5, 5, 3]), 2, 7),
        r"^primary_caps: kernel_size .*does not fit a 5x5 input$",
    ),
    (
        "conv_caps_kernel_does_not_fit",
        lambda: cl.conv_caps(*_capsules(grid=2), 2, 3, name="conv_caps1"),
        r"^conv_caps1: kernel_size \(3, 3\): a 3x3 kernel with VALID padding does not fit a 2x2 input$",
    ),
    ("stride_zero", lambda: cl.ConvCaps(2, stride=0), r"^conv_caps: stride must be an int >= 1, got 0$"),
    ("stride_pair_with_zero", lambda: cl.ReluConv(2, stride=(1, 0)), r"^relu_conv: stride must be an int >= 1, got 0$"),
    (
        "kernel_size_triple",
        lambda: cl.PrimaryCaps(2, kernel_size=(1, 1, 1)),
        r"^primary_caps: kernel_size must be an int or a pair",
    ),
    ("kernel_size_float", lambda: cl.ReluConv(2, kernel_size=2.5), r"^relu_conv: kernel_size must be an int or a pair"),
    ("primary_types_zero", lambda: cl.PrimaryCaps(0), r"^primary_caps: types must be an int >= 1, got 0$"),
    ("conv_types_zero", lambda: cl.ConvCaps(0), r"^conv_caps: types must be an int >= 1, got 0$"),
    ("filters_zero", lambda: cl.ReluConv(0), r"^relu_conv: filters must be an int >= 1, got 0$"),
    ("classes_zero", lambda: cl.ClassCaps(0), r"^class_caps: classes must be an int >= 1, got 0$"),
    (
        "iterations_zero",
        lambda: cl.ConvCaps(2, iterations=0, name="c1"),
        r"^c1: iterations must be an int >= 1, got 0$",
    ),
    ("final_lambda_zero", lambda: cl.ClassCaps(2, final_lambda=0.0), r"^class_caps: final_lambda must be a number > 0"),
    (
        "padding_unknown",
        lambda: cl.ConvCaps(2, padding="FULL"),
        r"^conv_caps: padding must be 'VALID' or 'SAME' \(either case\), got 'FULL'$",
    ),
    (
        "routing_kernel_unknown",
        lambda: cl.ConvCaps(2, routing_kernel="gpu"),
        r"^conv_caps: routing_kernel must be one of",
    ),
    ("form_not_a_routing_form", lambda: cl.ClassCaps(2, form="paper"), r"^class_caps: form must be a RoutingForm"),
    ("trainable_not_bool", lambda: cl.ReluConv(2, trainable="no"), r"^relu_conv: trainable must be True or False"),
    (
        "regularizer_not_callable",
        lambda: cl.ConvCaps(2, kernel_regularizer=1e-3),
        r"^conv_caps: kernel_regularizer must be callable or None",
    ),
    (
        "initializer_not_callable",
        lambda: cl.ConvCaps(2, weights_initializer=0.5),
        r"^conv_caps: weights_initializer must be an initializer",
    ),
    (
        "dtype_not_float",
        lambda: cl.ConvCaps(2, dtype=tf.int32),
        r"^conv_caps: dtype must be a floating dtype, got int32$",
    ),
    ("name_empty", lambda: cl.ConvCaps(2, name=""), r"^conv_caps: name must be a non-empty string or None"),
    (
        "coordinate_offsets_rank",
        lambda: cl.ClassCaps(2, coordinate_offsets=np.zeros([3, 16])),
        r"^class_caps: coordinate_offsets must be \[H, W, 16\]",
    ),
    (
        "coordinate_offsets_other_grid",
        lambda: cl.class_caps(*_capsules(), 2, coordinate_offsets=np.zeros([3, 3, 16])),
        r"^class_caps: coordinate_offsets must be \[5, 5, 16\] for a 5x5 grid, got \(3, 3, 16\)$",
    ),
    (
        "dtype_differs_from_input",
        lambda: cl.conv_caps(*_capsules(dtype=tf.float64), 2, dtype=tf.float32),
        r"^conv_caps: poses are float64, the layer's dtype is float32",
    ),
    (
        "other_input_types",
        lambda: _twice(cl.ConvCaps(2), _capsules(), _capsules(types=3)),
        r"^conv_caps: built for 2 input capsule types, got poses",
    ),
    (
        "other_channels",
        lambda: _twice(cl.ReluConv(2), [tf.zeros([1, 9, 9, 1])], [tf.zeros([1, 9, 9, 3])]),
        r"^relu_conv: built for 1 channels, got \(1, 9, 9, 3\)$",
    ),
    (
        "poses_wrong_rank",
        lambda: cl.conv_caps(tf.zeros([1, 5, 5, 2, 16]), tf.zeros([1, 5, 5, 2]), 2),
        r"^conv_caps: poses must be \[N, H, W, T, 4, 4\]",
    ),
    (
        "statistics_of_a_never_called_layer",
        lambda: diagnostics.routing_statistics([cl.ConvCaps(2, name="conv_caps2")]),
        r"^conv_caps2: routing statistics need a layer that has been called",
    ),
    (
        "layer_kwargs_unknown_layer",
        lambda: hparams.layer_kwargs(hparams.hparams_for("small"), "dense"),
        r"^layer_kwargs: layer must be one of",
    ),
]


class ArgumentErrorTest(parameterized.TestCase, tf.test.TestCase):
    @parameterized.named_parameters(*_BAD_ARGUMENTS)
    def test_bad_argument(self, call, pattern):
        """A one-line ValueError naming the layer and the argument, never a raw TensorFlow or numpy error."""
        with tf.Graph().as_default():
            with self.assertRaisesRegex(ValueError, pattern) as raised:
                call()
        self.assertNotIn("\n", str(raised.exception))


class EndPointsTest(tf.test.TestCase):
    def test_every_call_keeps_its_end_points(self):
        """A layer called on a training and an evaluation batch keeps both calls' end points; routing statistics
        of either call can be read, and they differ as their inputs do."""
        with tf.Graph().as_default():
            layer = cl.ConvCaps(2, 3, 1, "SAME", name="conv_caps1")
            layer(*_capsules(seed=0))
            layer(*_capsules(seed=1))
            self.assertLen(layer.calls, 2)
            self.assertIs(layer.end_points, layer.calls[1])
            training, evaluation = (diagnostics.routing_statistics([layer], call) for call in (0, 1))
            key = ("conv_caps1", "variance_p50", 2)
            with self.session() as sess:
                sess.run(tf.global_variables_initializer())
                first, second, last = sess.run(
                    [training[key], evaluation[key], diagnostics.routing_statistics([layer])[key]]
                )
        self.assertNotAllClose(first, second)
        self.assertEqual(second, last)


class DefaultsTest(tf.test.TestCase):
    def test_routing_kernel_defaults_to_auto(self):
        """The layers, HParams and layer_kwargs all default to 'auto' (fused when it builds)."""
        self.assertEqual(cl.ConvCaps(2).routing_kernel, capsule_ops.resolve("auto"))
        self.assertEqual(cl.ClassCaps(2).routing_kernel, capsule_ops.resolve("auto"))
        self.assertEqual(hparams.HParams().routing_kernel, "auto")
        self.assertEqual(hparams.layer_kwargs(hparams.HParams(), "conv_caps")["routing_kernel"], "auto")

    def test_layer_kwargs_give_the_preset_recipe(self):
        """layer_kwargs carry the preset's lambda, iterations and routing form; the conv layers' differ from the
        class layer's where the preset's do."""
        hp = hparams.hparams_for("paper")
        conv, classes = hparams.layer_kwargs(hp, "conv_caps1"), hparams.layer_kwargs(hp, "class_caps")
        self.assertEqual((conv["final_lambda"], classes["final_lambda"]), (hp.final_lambda, hp.class_final_lambda))
        self.assertEqual(conv["iterations"], hp.iterations)
        self.assertEqual(conv["form"], hparams.routing_forms(hp)[0])
        self.assertEqual(set(hparams.layer_kwargs(hp, "relu_conv")), {"kernel_regularizer"})


if __name__ == "__main__":
    tf.test.main()
