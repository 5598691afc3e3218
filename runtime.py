"""How a run executes, apart from the graph: the model to build, CPU threads, micro-batches, schedule lengths.

Shared by main.py and bench.py; no flags are read here.
"""

import dataclasses
import os

import tensorflow.compat.v1 as tf

import cnn
import model as capsnet


def micro_batches_for(batch_size, micro_batch_size):
    """How many micro-batches of at most `micro_batch_size` images a batch needs (1 when it is 0)."""
    return -(-batch_size // micro_batch_size) if micro_batch_size else 1


def session_config(threads, micro_batches):
    """Session settings for `threads` CPU threads (0: every core).

    With micro-batches, each thread runs one micro-batch's ops at a time (inter-op `threads`,
    intra-op 1); without, TensorFlow spreads every op over all of them.
    """
    if micro_batches > 1:
        return tf.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=threads or os.cpu_count())
    return tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)


def new_model(hparams, micro_batches=1):
    """The network `hparams.model` names: CapsNetEMModel ('capsules') or the baseline CNN ('cnn', never split
    into micro-batches)."""
    if hparams.model == "cnn":
        return cnn.CNNBaseline(hparams)
    return capsnet.CapsNetEMModel(hparams, micro_batches)


def new_session(threads, micro_batches):
    """A session on `threads` CPU threads (0: every core), set up for a model of `micro_batches` parts."""
    return tf.Session(config=session_config(threads, micro_batches))


def with_run_length(hparams, steps):
    """`hparams` with every schedule length that stands for the whole run (model.WHOLE_RUN) set to `steps`."""
    lengths = {
        name: steps for name in ("lr_decay_steps", "margin_ramp_steps") if getattr(hparams, name) == capsnet.WHOLE_RUN
    }
    return dataclasses.replace(hparams, **lengths)
