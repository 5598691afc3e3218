"""The training loop: steps, periodic checkpoints, the history and curve, validation at every epoch end.

main.py builds the graph and the session and hands them to `TrainingRun`; Ctrl-C and SIGTERM finish the
current step and raise `Interrupted`, after which main.py saves. A tool that watches a run (search.py's
pruning) passes a `Monitor`: the run then also validates every `Monitor.every_steps` steps and hands each
validation accuracy to `Monitor.report`. No flags are read here.
"""

import collections
import os
import signal
import time

import numpy as np
import tensorflow.compat.v1 as tf

import data
import model as capsnet
from data import pipeline as data_pipeline
from run import evaluation
from run import plots
from run import progress
from run import run_dir

MAX_CHECKPOINTS = 3  # checkpoints kept in a run directory
EXIT_NON_FINITE = 3  # main.py's exit code when a non-finite loss or gradient stopped training

# What the loop needs to know of the run: the training and validation arrays, the batch size, the steps per
# epoch and the last step, and the intervals and output settings (plain values, read from flags by main.py).
Schedule = collections.namedtuple(
    "Schedule", ["batch_size", "steps_per_epoch", "max_steps", "save_every_steps", "summary_every_steps", "quiet"]
)

# What a watching tool asks of the loop: also validate every `every_steps` steps (besides every epoch end and the
# last step), and after each validation and its checkpoint call `report(step, accuracy)`. `report` may raise to
# end the run at that step; the exception leaves the training loop, the run saved as it stands.
Monitor = collections.namedtuple("Monitor", ["every_steps", "report"])


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived during training: the step finished; save and exit 0."""


class TrainingRun:
    """The state of one training process: session, graph, saver, history and the loop over steps."""

    def __init__(self, result_dir, sess, graph, eval_predictions, pipeline, data, schedule, monitor=None):
        self.result_dir, self.sess, self.graph, self.pipeline = result_dir, sess, graph, pipeline
        self.eval_predictions, self.schedule, self.monitor = eval_predictions, schedule, monitor
        self.train_x, self.train_y, self.val_x, self.val_y = data
        self.saver = tf.train.Saver(max_to_keep=MAX_CHECKPOINTS)
        self.writer = tf.summary.FileWriter(result_dir)
        self.history = run_dir.read_history(result_dir)
        self.stop_signals = []
        self._checkpoint_step = None  # step of the last checkpoint this process wrote
        self._interval = []  # (loss, accuracy) of each step since the last summary: the history records their mean

    def save(self, step):
        """A checkpoint (TF writes it to temporary files and renames, then updates 'checkpoint' atomically),
        the history and the training-curve picture. A step already checkpointed (a periodic save that
        falls on an epoch end or the last step) is not written twice."""
        if step != self._checkpoint_step:
            self.saver.save(
                self.sess,
                os.path.join(self.result_dir, run_dir.CHECKPOINT_PREFIX),
                global_step=step,
                write_meta_graph=False,
            )
            self._checkpoint_step = step
        run_dir.write_json_atomically(os.path.join(self.result_dir, run_dir.HISTORY_FILE), self.history)
        if self.history["step"]:
            plots.plot_training_curves(self.history, os.path.join(self.result_dir, run_dir.CURVES_FILE))

    def _on_signal(self, signum, frame):
        self.stop_signals.append(signum)

    def run(self, step):
        """Trains from `step` to the last step, validating at every epoch end (and the monitor's steps); returns
        the last step."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.sess.run(
            self.pipeline.train_iterator.initializer,
            {self.pipeline.images_in: self.train_x, self.pipeline.labels_in: self.train_y},
        )
        schedule = self.schedule
        while step < schedule.max_steps:
            step = self._train_epoch(step)
            accuracy = self.validate(step) if self._validates_at(step) else None
            self.save(step)
            if self.monitor is not None and accuracy is not None:
                self.monitor.report(step, accuracy)
        return step

    def _validates_at(self, step):
        """Whether `step` ends an epoch, the run or one of the monitor's intervals."""
        schedule = self.schedule
        monitored = self.monitor is not None and step % self.monitor.every_steps == 0
        return step % schedule.steps_per_epoch == 0 or step >= schedule.max_steps or monitored

    def _train_epoch(self, step):
        """Trains to the end of the current epoch (or the last step, or the monitor's next validation), saving
        every save_every_steps."""
        schedule, graph = self.schedule, self.graph
        epoch, per_epoch = step // schedule.steps_per_epoch, schedule.steps_per_epoch
        epoch_end = min(schedule.max_steps, (epoch + 1) * per_epoch)
        end = epoch_end
        if self.monitor is not None:
            end = min(end, (step // self.monitor.every_steps + 1) * self.monitor.every_steps)
        fetches = [graph.train_op, graph.loss, graph.accuracy, graph.global_step]
        with progress.progress(
            epoch_end - epoch * per_epoch,
            "epoch %d" % (epoch + 1),
            "step",
            schedule.quiet,
            initial=step - epoch * per_epoch,
        ) as bar:
            while step < end:
                if self.stop_signals:
                    raise Interrupted()
                summarise = (step + 1) % schedule.summary_every_steps == 0
                started = time.time()
                results = capsnet.run_step(self.sess, graph, fetches + ([graph.summary_op] if summarise else []))
                elapsed = time.time() - started
                _, loss, accuracy, step = results[:4]
                self._interval.append((loss, accuracy))
                if summarise:
                    self.record(results[4], step, *np.mean(self._interval, axis=0))
                    self._interval = []
                if step % schedule.save_every_steps == 0:
                    self.save(step)
                bar.set_postfix(
                    loss="%.4f" % loss, acc="%.3f" % accuracy, img_s="%.0f" % (schedule.batch_size / elapsed)
                )
                bar.update(1)
        return step

    def record(self, summary, step, loss, accuracy):
        """The summary of `step` in TensorBoard, and in the history the loss and training accuracy of the interval
        that `step` ends (their means over its steps: one batch's accuracy of 32 or 64 images is a jagged line)."""
        self.writer.add_summary(summary, step)
        self.history["step"].append(int(step))
        self.history["loss"].append(float(loss))
        self.history["train_accuracy"].append(float(accuracy))

    def validate(self, step):
        """Validation accuracy at `step`, recorded in the history and TensorBoard (None without a validation set)."""
        if len(self.val_x) == 0:
            return None
        predictions, labels, _, _ = evaluation.predict(
            self.sess, self.pipeline, self.eval_predictions, self.val_x, self.val_y, "validation", self.schedule.quiet
        )
        accuracy = float(np.mean(predictions == labels))
        self.history["val_step"].append(int(step))
        self.history["val_accuracy"].append(accuracy)
        summary = tf.Summary(value=[tf.Summary.Value(tag="accuracy/validation", simple_value=accuracy)])
        self.writer.add_summary(summary, step)
        progress.write("step %d: validation accuracy %.2f%% on %d images" % (step, 100 * accuracy, len(labels)))
        return accuracy


# ---- the run's data and length (main.py passes its flag values) ----------------------------------------


def run_length(values, train_size):
    """(steps per epoch, the run's last step) for `train_size` training images."""
    steps_per_epoch = -(-train_size // values["batch_size"])
    return steps_per_epoch, values["max_steps"] or values["epochs"] * steps_per_epoch


def load_split(values, split):
    """The dataset's images and labels of `split` from --data_dir (downloaded when missing), as fed."""
    return data.load_arrays(values["dataset"], values["data_dir"], split, values["norb_channels"])


def training_data(values):
    """(train images, train labels, validation images, validation labels) of the run."""
    images, labels = load_split(values, "train")
    masks = data.viewpoint_masks(values["dataset"], values["data_dir"], "train", values["viewpoint_split"])
    if masks is not None:  # train on the familiar viewpoints only
        images, labels = images[masks[0]], labels[masks[0]]
    if values["validation_size"] >= len(images):
        raise run_dir.UsageError(
            "--validation_size must be smaller than the %d training images in %s, got %d"
            % (len(images), values["data_dir"], values["validation_size"])
        )
    train_x, train_y, val_x, val_y = data_pipeline.split_train_validation(
        images, labels, values["validation_size"], values["seed"]
    )
    return train_x, train_y, data.for_evaluation(values["dataset"], val_x, values["crop"]), val_y
