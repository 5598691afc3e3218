"""The paper's baseline CNN (section 5), with the interface of CapsNetEMModel, for `--model cnn`.

Hinton, Sabour, Frosst, ICLR 2018, section 5: two convolutional layers of 32 and 64 channels with 5x5
kernels and stride 1, each followed by 2x2 max pooling, a fully connected layer of 1024 ReLU units with
dropout, and a softmax over the classes; 4.2M parameters on 32x32 smallNORB crops. Choices the text
leaves open, made here: 'SAME' padding (it gives the 8x8x64 = 4,096 inputs to the 1024 units and so the
4.2M parameters), a dropout rate of 0.5, softmax cross-entropy, and the run's Adam settings and weight
decay. Graph code only; hyperparameters come in as `HParams`.

Shapes for smallNORB (MNIST: 28 -> 14 -> 7):
  images [N, 32, 32, K] -> cnn_conv1 [N, 16, 16, 32] (after pooling) -> cnn_conv2 [N, 8, 8, 64]
  -> cnn_hidden [N, 1024] -> cnn_logits [N, L]
"""

import tensorflow.compat.v1 as tf

import capsule_layers as cl
import model as capsnet

POOL = 2  # 2x2 max pooling, stride 2, after each convolution


class _Dense:
    """A fully connected layer with the `variables` / `weights_to_decay` of the capsule layers."""

    def __init__(self, units, name):
        self.units, self.name = units, name
        self.variables, self.weights_to_decay, self.kernel = [], [], None

    def __call__(self, inputs):
        if self.kernel is None:
            with tf.variable_scope(self.name):
                self.kernel = tf.get_variable(
                    "kernel", [int(inputs.shape[-1]), self.units], initializer=tf.glorot_uniform_initializer()
                )
                self.bias = tf.get_variable("bias", [self.units], initializer=tf.zeros_initializer())
            self.variables, self.weights_to_decay = [self.kernel, self.bias], [self.kernel]
        return tf.matmul(inputs, self.kernel) + self.bias  # [N, units]


class CNNBaseline:
    """The baseline CNN: `inference`, `loss`, `train` and `layers` as CapsNetEMModel has them.

    `micro_batches` is accepted for the same call signature and must be 1 (the CNN is not split).
    """

    def __init__(self, hparams, micro_batches=1):
        if micro_batches != 1:
            raise ValueError("the CNN baseline runs unsplit (micro_batches 1), got %r" % micro_batches)
        self.hparams = hparams.validate()
        self.micro_batches = micro_batches
        hp = self.hparams
        self.layers = [
            cl.ReluConv(hp.cnn_conv1_filters, hp.cnn_kernel, 1, "SAME", name="cnn_conv1"),
            cl.ReluConv(hp.cnn_conv2_filters, hp.cnn_kernel, 1, "SAME", name="cnn_conv2"),
            _Dense(hp.cnn_hidden, "cnn_hidden"),
            _Dense(hp.num_classes, "cnn_logits"),
        ]

    def logits(self, images, dropout=0.0):
        """Class logits `[N, L]` of `images` `[N, H, W, K]`; `dropout` before the last layer (training only)."""
        conv1, conv2, hidden, output = self.layers
        features = images
        for conv in (conv1, conv2):
            features = tf.nn.max_pool2d(conv(features), POOL, POOL, "SAME")  # [N, H/2, W/2, F]
        flat = tf.reshape(features, [-1, features.shape[1:].num_elements()])  # [N, H/4 * W/4 * 64]
        hidden_units = tf.nn.relu(hidden(flat))  # [N, 1024]
        if dropout:
            hidden_units = tf.nn.dropout(hidden_units, rate=dropout)
        return output(hidden_units)  # [N, L]

    def inference(self, images):
        """`model.Inference`: class probabilities `[N, L]` as activations, no poses, predictions `[N]`."""
        probabilities = tf.nn.softmax(self.logits(images))  # [N, L]
        predictions = tf.argmax(probabilities, axis=1)  # [N]
        return capsnet.Inference(probabilities, None, predictions, {"layers": list(self.layers)})

    def train(self, images, labels, distribution=capsnet.SINGLE_DEVICE):
        """Softmax cross-entropy with weight decay, `model.checked_adam`, summaries: `model.TrainGraph`.

        `distribution` may wrap the optimiser; towers are refused (dropout draws differ per tower; ValueError).
        """
        if distribution.towers:
            raise ValueError("the CNN baseline trains on one device (no towers)")
        hp = self.hparams
        global_step = tf.train.get_or_create_global_step()
        logits = self.logits(images, hp.cnn_dropout)  # [N, L]
        cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        weights = [w for layer in self.layers for w in layer.weights_to_decay]
        total = cross_entropy + hp.weight_decay * tf.add_n([tf.nn.l2_loss(w) for w in weights])
        step = capsnet.checked_adam([total], hp, global_step, distribution.wrap_optimizer)
        predictions = tf.argmax(logits, axis=1)  # [N]
        accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, labels), tf.float32))
        summary_op = tf.summary.merge(
            [
                tf.summary.scalar("loss/total", total),
                tf.summary.scalar("loss/cross_entropy", cross_entropy),
                tf.summary.scalar("accuracy/train_batch", accuracy),
                tf.summary.scalar("learning_rate", step.learning_rate),
            ]
        )
        inference = capsnet.Inference(tf.nn.softmax(logits), None, predictions, {"layers": list(self.layers)})
        no_margin = tf.constant(0.0)  # the spread loss's margin has no meaning here
        return capsnet.TrainGraph(
            step.train_op,
            total,
            accuracy,
            predictions,
            no_margin,
            step.learning_rate,
            global_step,
            summary_op,
            inference,
            step.finite_checks,
            step.grads_and_vars,
        )
