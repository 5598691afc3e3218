"""How a run executes, apart from the graph: the model to build, CPU threads, micro-batches, towers, schedule lengths.

Shared by main.py and bench.py; no flags are read here.
"""

import dataclasses
import os

import tensorflow.compat.v1 as tf

from run import cnn
import model as capsnet
from run import run_dir


def micro_batches_for(batch_size, micro_batch_size):
    """How many micro-batches of at most `micro_batch_size` images a batch needs (1 when it is 0)."""
    return -(-batch_size // micro_batch_size) if micro_batch_size else 1


def session_config(threads, micro_batches, cpu_devices=1):
    """Session settings for `threads` CPU threads (0: every core) and `cpu_devices` logical CPU devices.

    With micro-batches, each thread runs one micro-batch's ops at a time (inter-op `threads`,
    intra-op 1); without, TensorFlow spreads every op over all of them. Logical CPU devices (the towers'
    stand-ins on a machine without GPUs) share the same threads.
    """
    devices = {"CPU": cpu_devices}  # a v1 session's devices (tf.config's logical devices reach only TF2's runtime)
    if micro_batches > 1:
        threads = threads or os.cpu_count()
        return tf.ConfigProto(
            intra_op_parallelism_threads=1, inter_op_parallelism_threads=threads, device_count=devices
        )
    return tf.ConfigProto(
        intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads, device_count=devices
    )


def new_model(hparams, micro_batches=1):
    """The network `hparams.model` names: CapsNetEMModel ('capsules') or the baseline CNN ('cnn', never split
    into micro-batches)."""
    if hparams.model == "cnn":
        return cnn.CNNBaseline(hparams)
    return capsnet.CapsNetEMModel(hparams, micro_batches)


def new_session(threads, micro_batches, num_devices=1):
    """A session on `threads` CPU threads (0: every core), set up for a model of `micro_batches` parts and towers on
    `num_devices` devices (logical CPU devices when the machine has no GPU)."""
    return tf.Session(config=session_config(threads, micro_batches, cpu_devices_for(num_devices)))


# Op types that hold a variable: a tower places them on VARIABLE_DEVICE, every other op on its own device.
_VARIABLE_OPS = ("Variable", "VariableV2", "VarHandleOp")
VARIABLE_DEVICE = "/device:CPU:0"  # the towers' shared variables (on a parameter server in a cluster)


def gpu_count():
    """How many GPUs TensorFlow sees on this machine."""
    return len(tf.config.list_physical_devices("GPU"))


def cpu_devices_for(num_devices):
    """How many CPU devices a session needs for `num_devices` towers: 1 with GPUs, else one logical CPU per tower."""
    return 1 if gpu_count() else num_devices


def check_towers(batch_size, num_devices, model):
    """UsageError unless `num_devices` towers can split a batch of `batch_size` of the network `model` ('capsules')."""
    if batch_size % num_devices:
        raise run_dir.UsageError("--num_devices must divide --batch_size %d, got %d" % (batch_size, num_devices))
    if num_devices > 1 and model == "cnn":
        raise run_dir.UsageError("--num_devices > 1 needs --model capsules (the CNN's dropout runs on one device)")


def tower_devices(num_devices):
    """The device function of each of `num_devices` towers (none for one: a single graph, placed as before).

    Tower i runs on /device:GPU:i when the machine has GPUs, else on the logical /device:CPU:i; the variables of
    every tower are the same ones, on VARIABLE_DEVICE. Job and task are left open, so a cluster's
    `replica_device_setter` around the towers fills them in (variables on a parameter server).

    Raises:
      ValueError: more towers than GPUs.
    """
    if num_devices == 1:
        return ()
    gpus = gpu_count()
    if gpus and num_devices > gpus:
        raise ValueError("%d towers but %d GPUs" % (num_devices, gpus))
    kind = "GPU" if gpus else "CPU"
    return tuple(_tower_device("/device:%s:%d" % (kind, index)) for index in range(num_devices))


def _tower_device(device):
    """A device function: variables on VARIABLE_DEVICE, every other op on `device`."""

    def place(op):
        return VARIABLE_DEVICE if op.type in _VARIABLE_OPS else device

    return place


def with_run_length(hparams, steps, epoch_steps=None):
    """`hparams` with its schedule lengths in steps for a run of `steps` steps.

    A length that stands for the whole run (model.WHOLE_RUN) becomes `steps`; with `epoch_steps` (training images
    / batch size: steps per epoch, unrounded), a learning-rate decay given in epochs (`lr_decay_epochs` > 0)
    becomes round(lr_decay_epochs * epoch_steps) steps. Without it, `lr_decay_steps` stays as it is.
    """
    if hparams.lr_decay_epochs > 0 and epoch_steps is not None:
        hparams = dataclasses.replace(hparams, lr_decay_steps=max(1, round(hparams.lr_decay_epochs * epoch_steps)))
    lengths = {
        name: steps for name in ("lr_decay_steps", "margin_ramp_steps") if getattr(hparams, name) == capsnet.WHOLE_RUN
    }
    return dataclasses.replace(hparams, **lengths)
