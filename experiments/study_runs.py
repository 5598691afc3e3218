"""Training runs of a study (ablate.py's cells, search.py's trials), each main.py's own `train` in a worker process.

Every run has its own run directory, which main.py can test or resume, and a log beside it (`DIR.log`) that
receives the worker's output. Workers are started with 'spawn' (a fresh TensorFlow each) and may train several
runs one after another: each run builds its graph in a `tf.Graph` of its own. No flags are read here: the tools
pass main.py's flag values as a dict.
"""

import concurrent.futures
import json
import multiprocessing
import os
import signal
import sys
import time

import main

# Flags a resumed run takes from the study's command instead of its flags.json: where it ends and how it runs.
RESUMED_RUN_FLAGS = ("max_steps", "threads", "quiet")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the signals main's training loop takes over while it runs


def worker_values(values, parallel):
    """main.py's flag values for runs trained `parallel` at a time: plain progress lines, and `--threads` or
    else an equal share of the cores."""
    return dict(values, quiet=True, threads=values["threads"] or max(1, (os.cpu_count() or 1) // parallel))


def worker_pool(parallel):
    """A pool of `parallel` worker processes, each started fresh ('spawn': no TensorFlow state is inherited)."""
    return concurrent.futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"))


def log_path(result_dir):
    """The log of the run in `result_dir`: `result_dir` + '.log', beside it."""
    return os.path.join(os.path.dirname(result_dir), os.path.basename(result_dir) + ".log")


def train_run(values, result_dir, monitor=None):
    """Worker: trains (or resumes) the run in `result_dir` with main.train, its output appended to its log.

    Args:
      values: main.py's flag values of the run; a resumed run keeps its saved ones except RESUMED_RUN_FLAGS.
      result_dir: the run directory.
      monitor: an optional `training.Monitor`, passed to main.train.

    Returns:
      (main's exit code, wall seconds).
    """
    started = time.time()
    os.makedirs(result_dir, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path(result_dir), "a") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    main.tf.get_logger().setLevel("ERROR")
    main.tf.disable_v2_behavior()
    resumable = main.run_dir.check_new_or_resumable(result_dir)
    if resumable:  # the run-length and speed flags come from the study's command
        saved = main.run_dir.read_flags(result_dir, main.flag_defaults(), main.validate_flags)
        values = main.run_dir.merge_resumed_flags(
            saved,
            dict(values, result_dir=result_dir),
            RESUMED_RUN_FLAGS,
            main.RUN_DEFINING_FLAGS,
            main.RUN_LENGTH_FLAGS,
        )
    handlers = {number: signal.getsignal(number) for number in _STOP_SIGNALS}
    try:
        with main.tf.Graph().as_default():  # a worker's earlier run left its variables in the default graph
            code = main.train(dict(values, result_dir=result_dir), result_dir, resumable, monitor)
    finally:  # the loop's handlers would swallow a Ctrl-C that arrives between runs
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return code, time.time() - started


def final_accuracy(result_dir, steps):
    """The validation accuracy the run in `result_dir` recorded at step `steps`, or None when it has not."""
    path = os.path.join(result_dir, main.run_dir.HISTORY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        history = json.load(f)
    done = [a for s, a in zip(history["val_step"], history["val_accuracy"]) if s == steps]
    return done[-1] if done else None
