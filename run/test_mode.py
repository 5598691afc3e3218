"""Test mode of main.py: one run directory's checkpoint on the test set, with everything it reports.

The header line, the evaluation (and the multi-crop views), the familiar / novel viewpoint accuracies, the
test-time iteration sweep, the adversarial attacks and the report (evaluation.report). main.py reads the
flags and the run's saved values and passes them here as plain values; no flags are read here.
"""

import os

import numpy as np

from run import attacks
import data
from run import evaluation
from run import plots
from run import run_dir
from run import runtime


def settings(values):
    """How test mode and the sweep evaluate: `evaluation.Settings` from the run's values."""
    micro_batches = runtime.micro_batches_for(values["batch_size"], values["micro_batch_size"])
    return evaluation.Settings(
        values["dataset"], values["eval_batch_size"], values["seed"], values["threads"], micro_batches, values["quiet"]
    )


def attack_source(path, source_values, source_hparams, values, hparams):
    """`attacks.Source` of --attack_transfer_from's run, checked against the attacked run's data and input size."""
    attacks.check_transfer(path, values["dataset"], hparams, source_values["dataset"], source_hparams)
    return attacks.Source(path, source_hparams, settings(source_values))


def _header(result_dir, values, labels, network):
    """Prints what is evaluated before any graph is built."""
    checkpoint, step = latest_checkpoint(result_dir)
    print(
        "evaluating %s: checkpoint %s (step %d), %s test split, %d images, batch %d; %s"
        % (
            result_dir,
            os.path.basename(checkpoint),
            step,
            values["dataset"],
            len(labels),
            values["eval_batch_size"],
            network,
        ),
        flush=True,
    )


def latest_checkpoint(result_dir):
    """(checkpoint path, step) of DIR's latest checkpoint (UsageError when there is none)."""
    checkpoint, step = run_dir.latest_checkpoint(result_dir)
    if checkpoint is None:
        raise run_dir.UsageError("%s holds no checkpoint" % result_dir)
    return checkpoint, step


def _extras(result_dir, values, hparams, run_settings, views, labels, outcome):
    """The sections beside the accuracy: routing statistics, multi-crop, viewpoints, iteration sweep."""
    predictions, truth, routing, averaged = outcome
    extra = {"routing": evaluation.routing_table(routing or {})}  # none for the CNN
    if averaged is not None:
        extra["multi_crop"] = {"views": len(views), "accuracy": float(np.mean(averaged == truth))}
    masks = data.viewpoint_masks(values["dataset"], values["data_dir"], "test", values["viewpoint_split"])
    if masks is not None:
        masks = [mask[: len(labels)] for mask in masks]  # --test_images: the first images only
        extra["viewpoints"] = {
            name: {"images": int(mask.sum()), "accuracy": float(np.mean(predictions[mask] == truth[mask]))}
            for name, mask in zip(("familiar", "novel"), masks)
        }
    count = min(values["sweep_images"], len(labels)) if hparams.model == "capsules" else 0  # no routing: no sweep
    if count:
        as_trained = float(np.mean(predictions[:count] == truth[:count]))
        extra["iteration_sweep"] = evaluation.iteration_sweep(
            result_dir, hparams, run_settings, views[0][:count], labels[:count], as_trained
        )
    return extra


def evaluate(result_dir, values, hparams, loaded, labels, network, source=None):
    """Test mode on the test split `loaded`, `labels`; returns the exit code (0).

    The report (test_results.json and its pictures) goes to `run_dir.test_output_dir`: --output_dir, else the
    run directory, or ./results/<name> for a shipped network, whose folder stays as committed.

    Args:
      result_dir: the run directory.
      values: the run's flag values with test mode's own.
      hparams: the run's saved network.
      loaded, labels: the test split as `data.load_arrays` gives it.
      network: the network in a few words, for the header line.
      source: `attacks.Source` of a transfer attack's run, or None.
    """
    views = data.evaluation_views(values["dataset"], loaded, values["multi_crop"], values["crop"])
    _header(result_dir, values, labels, network)
    run_settings = settings(values)
    predictions, truth, routing, checkpoint, step, averaged = evaluation.evaluate_checkpoint(
        result_dir, hparams, run_settings, views, labels, "test", statistics=True
    )
    extra = _extras(result_dir, values, hparams, run_settings, views, labels, (predictions, truth, routing, averaged))
    output_dir = run_dir.test_output_dir(result_dir, values["output_dir"])
    if values["attack"] != "none":
        victim = attacks.Source(result_dir, hparams, run_settings)
        key, entry, samples = attacks.run(
            victim, source, values["dataset"], views[0], labels, attacks.options_from(values)
        )
        extra["attacks"] = _attacks_section(output_dir, key, entry)
        _draw_attacks(output_dir, extra["attacks"], key, samples)
    class_names = data.get(values["dataset"]).class_names
    return evaluation.report(output_dir, checkpoint, step, predictions, truth, views[0], class_names, extra)


def _attacks_section(result_dir, key, entry):
    """The `attacks` section: the entries of DIR's test_results.json for the same checkpoint, and `entry`."""
    previous = run_dir.read_results(result_dir).get("attacks")
    previous = previous if isinstance(previous, dict) else {}  # unreadable: start a new section
    section = {
        name: old
        for name, old in previous.items()
        if isinstance(old, dict) and old.get("checkpoint") == entry["checkpoint"]
    }
    section[key] = entry
    return section


def _draw_attacks(result_dir, section, key, samples):
    """attacks.png (success rate against epsilon, a line per entry) and attack_samples.png (`samples`)."""
    os.makedirs(result_dir, exist_ok=True)  # --output_dir: made once there is something to write
    plots.plot_attack_curves(plots.attack_curves(section), os.path.join(result_dir, attacks.CURVES_FILE))
    largest = max(row["epsilon"] for row in section[key]["per_epsilon"])
    title = "%s, eps %g: clean (top), adversarial (bottom)" % (key, largest)
    plots.plot_attack_pairs(*samples, os.path.join(result_dir, attacks.SAMPLES_FILE), title=title)
