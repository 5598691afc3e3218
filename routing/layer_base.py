"""The `tf.layers` conventions of the capsule layers (capsule_layers.py): their base class and argument checks.

What a `tf.layers` user relies on without reading the code: a default name made unique in its variable scope
(`conv_caps`, `conv_caps_1`, also under `tf.AUTO_REUSE`), `trainable`, a `kernel_regularizer` whose losses land
in `tf.GraphKeys.REGULARIZATION_LOSSES`, `build(input_shape)` making variables under the layer's scope, the
dtype taken from the input, kernel sizes and strides as ints or pairs, padding in either case, and every bad
argument a one-line `ValueError` naming the layer and the argument. `RoutedCapsuleLayer` holds what the convolutional
and class capsule layers share. Imports only tensorflow, capsule_ops, em_routing and receptive_field.
"""

import numbers

import tensorflow.compat.v1 as tf

import capsule_ops
from routing.em_routing import PAPER_FORM, POSE_SIZE, RoutingForm, em_routing, inverse_temperatures
from routing.receptive_field import VALID_PADDINGS, conv_geometry

# Default initialisers. Each vote entry is a sum of 4 products, so N(0, 0.5^2) weights keep the
# vote scale equal to the pose scale.
_DEFAULT_WEIGHT_STDDEV = 0.5
_REGULARIZER_SCOPE = "Regularizer"  # as tf.get_variable names a variable's regularization loss


def positive_int(layer, argument, value):
    """`value` if it is an int >= 1 (not a bool); else a ValueError naming `layer` and `argument`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError("%s: %s must be an int >= 1, got %r" % (layer, argument, value))
    return int(value)


def positive_pair(layer, argument, value):
    """An int or (height, width) pair of ints >= 1 as a pair; else a ValueError naming `layer` and `argument`."""
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError("%s: %s must be an int or a pair of ints >= 1, got %r" % (layer, argument, value))
    return tuple(positive_int(layer, argument, part) for part in pair)


def padding_name(layer, value):
    """'VALID' or 'SAME' from either case; else a ValueError naming `layer`."""
    padding = value.upper() if isinstance(value, str) else value
    if padding not in VALID_PADDINGS:
        raise ValueError("%s: padding must be 'VALID' or 'SAME' (either case), got %r" % (layer, value))
    return padding


def check_fits(layer, shape, kernel_size, stride, padding):
    """ValueError naming `layer` when the kernel does not fit the grid of `shape` `[N, H, W, ...]` (unknown H or W:
    checked when the graph runs, by TensorFlow)."""
    height, width = shape[1], shape[2]
    if height is None or width is None:
        return
    try:
        conv_geometry(int(height), int(width), kernel_size, stride, padding)
    except ValueError as error:
        raise ValueError("%s: kernel_size %s: %s" % (layer, kernel_size, error)) from None


def _float_dtype(layer, dtype):
    """`dtype` as a floating `tf.DType`; else a ValueError naming `layer`."""
    try:
        dtype = tf.as_dtype(dtype)
    except TypeError:
        raise ValueError("%s: dtype must be a floating dtype, got %r" % (layer, dtype)) from None
    if not dtype.is_floating:
        raise ValueError("%s: dtype must be a floating dtype, got %s" % (layer, dtype.name))
    return dtype


class CapsuleLayer:
    """Base class in the `tf.layers` form: variables are made once, under the layer's variable scope.

    Subclasses implement `_check(*input_shapes)` (shape checks, on every call), `_build(*input_shapes)`
    (variables, through `self._variable`) and `call(*inputs)` (the math). Calling the layer again reuses its
    variables; a layer object may be called on inputs of another grid size.

    Args:
      name: the variable scope; None: `default_name`, made unique in the enclosing scope (`conv_caps`,
        `conv_caps_1`, ...) when the layer is built, as `tf.layers` does.
      trainable: False keeps the layer's variables out of `tf.trainable_variables()`.
      kernel_regularizer: None or a function of a kernel or transformation matrix returning a scalar loss (or
        None), e.g. `lambda w: decay * tf.nn.l2_loss(w)`; the losses go to `tf.GraphKeys.REGULARIZATION_LOSSES`
        (`tf.losses.get_regularization_losses()`) and `losses`, once per variable made.
      dtype: the variables' float dtype; None: the first input's (float32 for non-float inputs).

    Attributes (after the first call or `build`): `variables` (every variable), `trainable_variables`,
    `weights_to_decay` (kernels and transformation matrices, no biases, no betas), `losses` (regularization),
    `scope_name`, `calls` (one dict of intermediate tensors per call, in order) and `end_points` (the last call's).
    """

    def __init__(self, name, default_name, trainable=True, kernel_regularizer=None, dtype=None):
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("%s: name must be a non-empty string or None, got %r" % (default_name, name))
        self.name = name or default_name
        self._named = name is not None
        if not isinstance(trainable, bool):
            raise ValueError("%s: trainable must be True or False, got %r" % (self.name, trainable))
        if kernel_regularizer is not None and not callable(kernel_regularizer):
            raise ValueError(
                "%s: kernel_regularizer must be callable or None, got %r" % (self.name, kernel_regularizer)
            )
        self.trainable, self.kernel_regularizer = trainable, kernel_regularizer
        self.dtype = None if dtype is None else _float_dtype(self.name, dtype)
        self.built = False
        self.variables, self.weights_to_decay, self.losses, self.calls = [], [], [], []
        self._scope, self._call_points = None, {}

    @property
    def trainable_variables(self):
        """The layer's variables when it is trainable, else []."""
        return list(self.variables) if self.trainable else []

    @property
    def end_points(self):
        """The intermediate tensors of the last call ({} before the first); `calls` holds every call's."""
        return self.calls[-1] if self.calls else {}

    @property
    def scope_name(self):
        """The layer's full variable-scope name (None before it is built)."""
        return self._scope.name if self._scope is not None else None

    def _variable(self, name, shape, initializer, decay=False):
        """A variable of the layer's scope; `decay`: a kernel or matrix (weight decay, `kernel_regularizer`)."""
        existing = {v.name for v in tf.global_variables()}
        variable = tf.get_variable(name, shape, self.dtype, initializer, trainable=self.trainable)
        self.variables.append(variable)
        if decay:
            self.weights_to_decay.append(variable)
        if decay and self.kernel_regularizer is not None and variable.name not in existing:
            with tf.name_scope("%s/%s" % (name, _REGULARIZER_SCOPE)):
                loss = self.kernel_regularizer(variable)
            if loss is not None:
                tf.add_to_collection(tf.GraphKeys.REGULARIZATION_LOSSES, loss)
                self.losses.append(loss)
        return variable

    def _layer_scope(self, reuse=None):
        """The layer's variable scope: its captured one once built, else made (uniquified when unnamed).

        `reuse` (from the functional forms): None inherits the enclosing scope's, so a whole network rebuilt under
        `reuse=True` (or AUTO_REUSE) shares its variables; True with no name reuses the default name, as tf.layers.
        """
        if self._scope is not None:
            return tf.variable_scope(self._scope, reuse=True if self.built else reuse)
        if self._named or reuse is True:
            return tf.variable_scope(self.name, reuse=reuse)
        return tf.variable_scope(None, default_name=self.name, reuse=reuse)

    def _convert(self, inputs, input_names):
        """The inputs as tensors of the layer's dtype (set from the first one when None)."""
        tensors = []
        for value, input_name in zip(inputs, input_names):
            tensor = value if isinstance(value, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(value, self.dtype)
            if self.dtype is None:
                self.dtype = tensor.dtype.base_dtype if tensor.dtype.is_floating else tf.float32
            if tensor.dtype.base_dtype != self.dtype and tensor.dtype.is_floating:
                raise ValueError(
                    "%s: %s are %s, the layer's dtype is %s (leave dtype unset to take the inputs')"
                    % (self.name, input_name, tensor.dtype.base_dtype.name, self.dtype.name)
                )
            tensors.append(tf.cast(tensor, self.dtype))  # a no-op for float inputs
        return tensors

    def __call__(self, *inputs):
        """The layer on `inputs` (`INPUT_NAMES`); the first call builds it."""
        return self._apply(inputs, self.INPUT_NAMES)

    def build(self, *input_shapes):
        """Checks the input shapes and makes the variables under the layer's scope (once; `__call__` calls it).

        `input_shapes`: one shape per input, or (as `tf.layers`) one list of them: `build([poses, activations])`.
        """
        if len(input_shapes) == 1 and len(self.INPUT_NAMES) > 1:
            input_shapes = tuple(input_shapes[0])
        if len(input_shapes) != len(self.INPUT_NAMES):
            raise ValueError("%s: build needs the shapes of %s" % (self.name, ", ".join(self.INPUT_NAMES)))
        input_shapes = [tf.TensorShape(shape) for shape in input_shapes]
        self._check(*input_shapes)
        if self.built:
            return
        if self.dtype is None:
            self.dtype = tf.float32
        with self._layer_scope() as self._scope:
            self._unique_name()
            self._build(*input_shapes)
        self.built = True

    def _unique_name(self):
        """An unnamed layer takes its uniquified scope's last part as its name (`conv_caps_1`)."""
        if not self._named:
            self.name = self._scope.name.split("/")[-1]

    def _apply(self, inputs, input_names, reuse=None):
        """Converts, builds on the first call, then `call` in the layer's scope; records the call's end points."""
        inputs = self._convert(inputs, input_names)
        shapes = [x.shape for x in inputs]
        with self._layer_scope(reuse) as self._scope:
            self._unique_name()
            self._check(*shapes)
            if not self.built:
                self._build(*shapes)
                self.built = True
            with tf.name_scope("call"):
                self._call_points = {}
                outputs = self.call(*inputs)
        self.calls.append(self._call_points)
        return outputs

    def _record(self, **points):
        """Adds intermediate tensors to this call's end points."""
        self._call_points.update(points)


def functional(layer, inputs, reuse, return_layer):
    """`layer` applied to `inputs` in its own scope with `reuse` (None: inherit); with the layer when asked."""
    outputs = layer._apply(inputs, layer.INPUT_NAMES, reuse)
    return (outputs, layer) if return_layer else outputs


def check_capsules(layer, pose_shape, activation_shape):
    """Validates a capsule input: poses `[N, H, W, T, 4, 4]`, activations `[N, H, W, T]`."""
    if pose_shape.rank != 6 or tuple(pose_shape[-2:]) != (POSE_SIZE, POSE_SIZE):
        raise ValueError("%s: poses must be [N, H, W, T, 4, 4], got %s" % (layer.name, pose_shape))
    if activation_shape.rank != 4 or tuple(activation_shape[1:]) != tuple(pose_shape[1:4]):
        raise ValueError("%s: activations must be [N, H, W, T] matching poses, got %s" % (layer.name, activation_shape))
    if None in tuple(pose_shape[1:]):
        raise ValueError("%s: H, W and T must be known when the graph is built, got %s" % (layer.name, pose_shape))
    if layer.built and int(pose_shape[3]) != layer.input_types:
        raise ValueError(
            "%s: built for %d input capsule types, got poses %s" % (layer.name, layer.input_types, pose_shape)
        )


def _initializer(layer, argument, value, default):
    """`value` if callable, `default` if None; else a ValueError naming `layer` and `argument`."""
    if value is not None and not callable(value):
        raise ValueError("%s: %s must be an initializer (callable) or None, got %r" % (layer, argument, value))
    return default if value is None else value


def _is_number(value):
    """Whether `value` is a real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_routing(layer, routing_kernel, form, standardise_costs, beta_a_scale, final_lambda):
    """ValueError naming `layer` and the argument for a bad routing setting of a `RoutedCapsuleLayer`."""
    if routing_kernel not in capsule_ops.KERNELS:
        raise ValueError("%s: routing_kernel must be one of %s, got %r" % (layer, capsule_ops.KERNELS, routing_kernel))
    if not isinstance(form, RoutingForm):
        raise ValueError("%s: form must be a RoutingForm, got %r" % (layer, form))
    if not isinstance(standardise_costs, bool):
        raise ValueError("%s: standardise_costs must be True or False, got %r" % (layer, standardise_costs))
    if standardise_costs and form.activation != "paper":
        raise ValueError("%s: standardise_costs applies to the paper's activation form only" % layer)
    if not _is_number(beta_a_scale):
        raise ValueError("%s: beta_a_scale must be a number, got %r" % (layer, beta_a_scale))
    if not _is_number(final_lambda) or not final_lambda > 0:
        raise ValueError("%s: final_lambda must be a number > 0, got %r" % (layer, final_lambda))


class RoutedCapsuleLayer(CapsuleLayer):
    """Shared variables and routing settings of the convolutional and class capsule layers.

    Routing options (keyword arguments of ConvCaps, ClassCaps and their functional forms): weights_initializer
    (default N(0, 0.5^2)), beta_v_initializer and beta_a_initializer (default 0), beta_a_scale (beta_a = scale *
    variable; 1.0), standardise_costs (paper form only; False), form (`RoutingForm`; the paper's), routing_kernel
    ('auto', 'fused' or 'tf': see `capsule_ops.resolve`; 'auto', as main.py), and `CapsuleLayer`'s trainable and
    kernel_regularizer (applied to the weights). `hparams.layer_kwargs(hp, layer)` gives a preset's.
    """

    INPUT_NAMES = ("poses", "activations")

    def __init__(
        self,
        name,
        default_name,
        dtype,
        iterations,
        final_lambda,
        weights_initializer=None,
        beta_v_initializer=None,
        beta_a_initializer=None,
        beta_a_scale=1.0,
        standardise_costs=False,
        form=PAPER_FORM,
        routing_kernel="auto",
        trainable=True,
        kernel_regularizer=None,
    ):
        super().__init__(name, default_name, trainable, kernel_regularizer, dtype)
        name = self.name
        _check_routing(name, routing_kernel, form, standardise_costs, beta_a_scale, final_lambda)
        self.routing_kernel = capsule_ops.resolve(routing_kernel)  # 'auto' -> 'fused' when it builds, else 'tf'
        self.standardise_costs, self.form = standardise_costs, form
        # beta_a = beta_a_scale * (the variable): the official code's activation bias enters the logit
        # scaled by 5000, so Adam moves it that much faster than the other weights; 1.0 is the plain form.
        self.beta_a_scale = beta_a_scale
        self.iterations = positive_int(name, "iterations", iterations)
        self.inverse_temps = inverse_temperatures(final_lambda, iterations)
        default_weights = tf.random_normal_initializer(stddev=_DEFAULT_WEIGHT_STDDEV)
        self.weights_initializer = _initializer(name, "weights_initializer", weights_initializer, default_weights)
        self.beta_v_initializer = _initializer(name, "beta_v_initializer", beta_v_initializer, tf.zeros_initializer())
        self.beta_a_initializer = _initializer(name, "beta_a_initializer", beta_a_initializer, tf.zeros_initializer())

    def _build_routing_variables(self, weight_shape, num_parents):
        self.weights = self._variable("weights", weight_shape, self.weights_initializer, decay=True)
        self.beta_v = self._variable("beta_v", [num_parents], self.beta_v_initializer)  # one per parent type
        self.beta_a = self._variable("beta_a", [num_parents], self.beta_a_initializer)

    def _route(self, votes, child_activations, initial_assignments, normalise):
        with tf.name_scope("em_routing"):
            routing = em_routing(
                votes,
                child_activations,
                initial_assignments,
                self.beta_v,
                self.beta_a_scale * self.beta_a,
                self.inverse_temps,
                normalise,
                self.standardise_costs,
                self.form,
                self.routing_kernel,
            )
        self._record(
            votes=routing.votes,
            votes_shape=routing.votes_shape,
            assignments=tf.broadcast_to(routing.assignments, routing.votes_shape[:3]),
            activations_per_iteration=[parents.activations for parents in routing.per_iteration],
            parents_per_iteration=routing.per_iteration,
        )
        return routing.poses, routing.activations
