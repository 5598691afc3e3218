"""The run directory: what a training run saves about itself, and how a later command reads it back.

A run directory holds `flags.json` (the run's flags and its resolved hyperparameters; the hyperparameters
alone define the network that test mode and resume rebuild), checkpoints `model.ckpt-STEP`, TensorBoard
events, `history.json`, `training_curves.png`, and after test mode `test_results.json` and its pictures.
Every JSON file is written to a temporary file and renamed, so a crash never leaves half a file. No flags
are read here: main.py passes plain values.
"""

import dataclasses
import json
import os
import re
import shutil
import sys
import time

import tensorflow.compat.v1 as tf

import model as capsnet

FLAGS_FILE = "flags.json"
HISTORY_FILE = "history.json"
RESULTS_FILE = "test_results.json"
CHECKPOINT_PREFIX = "model.ckpt"
RESULTS_ROOT = os.path.join(".", "results")
# Marks a network shipped in the repository (pretrained/<name>/): its files stay as committed, so test mode
# writes its report under RESULTS_ROOT instead; it also records where the network came from.
SHIPPED_FILE = "pretrained.json"
_CHECKPOINT_STEP = re.compile(r"-(\d+)$")  # model.ckpt-STEP
CURVES_FILE = "training_curves.png"
CONFUSION_FILE, SAMPLES_FILE, ROUTING_FILE = "confusion_matrix.png", "test_samples.png", "routing.png"
TEST_PICTURES = (CONFUSION_FILE, SAMPLES_FILE, ROUTING_FILE)  # test mode's, beside RESULTS_FILE


class UsageError(Exception):
    """Bad flags or result dir: printed as one line, exit code 2."""


def write_json_atomically(path, payload):
    """Writes JSON through a temporary file and a rename, so a crash never leaves half a file."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def write_run(result_dir, flags, hparams):
    """Creates `result_dir` if needed and saves the run's flags and hyperparameters in flags.json."""
    os.makedirs(result_dir, exist_ok=True)
    write_json_atomically(
        os.path.join(result_dir, FLAGS_FILE), {"flags": flags, "hparams": dataclasses.asdict(hparams)}
    )


def _read_section(result_dir, section):
    """One section ('flags' or 'hparams') of DIR/flags.json (UsageError when absent or unreadable)."""
    path = os.path.join(result_dir, FLAGS_FILE)
    try:
        with open(path) as f:
            values = json.load(f)[section]
        if not isinstance(values, dict):
            raise TypeError("'%s' is not a name -> value mapping" % section)
        return values
    except FileNotFoundError:
        raise UsageError("%s holds no %s: not a run directory of this program" % (result_dir, FLAGS_FILE)) from None
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError("%s is unreadable: %s" % (path, error)) from None


def read_flags(result_dir, defaults, validate):
    """The flag values saved in DIR/flags.json (UsageError when absent, unreadable or invalid).

    Args:
      result_dir: the run directory.
      defaults: {flag: default}; a run saved before a flag existed lacks it, and every flag's default is
        what runs before it did.
      validate: called with the values; raises UsageError (or ValueError) for a hand-edited bad value.
    """
    saved = _read_section(result_dir, "flags")
    path = os.path.join(result_dir, FLAGS_FILE)
    try:
        for name, default in defaults.items():
            saved.setdefault(name, default)
        validate(saved)
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError("%s is unreadable: %s" % (path, error)) from None
    except UsageError as error:
        raise UsageError("%s: %s" % (path, error)) from None
    return saved


def read_hparams(result_dir, fallback):
    """The HParams saved in DIR/flags.json when the run started (schedule lengths included), so that later
    changes to a preset never change a saved run. A field the file lacks (the run predates it) takes its
    value from `fallback`, the HParams its saved flags resolve to today; a run saved without a routing form
    predates the forms and routed with the paper's pieces (whatever its preset's form is today), and one saved
    without `lr_decay_epochs` decayed every saved `lr_decay_steps`."""
    saved = _read_section(result_dir, "hparams")
    fields = {field.name for field in dataclasses.fields(capsnet.HParams)}
    if "routing" not in saved:
        fallback = dataclasses.replace(fallback, routing="paper", **capsnet.ROUTING_FORMS["paper"])
    if "lr_decay_epochs" not in saved:  # it predates decay intervals in epochs: its saved lr_decay_steps held
        fallback = dataclasses.replace(fallback, lr_decay_epochs=0.0)
    try:
        return dataclasses.replace(fallback, **{name: saved[name] for name in fields & set(saved)}).validate()
    except (ValueError, TypeError) as error:
        raise UsageError("%s is unreadable: %s" % (os.path.join(result_dir, FLAGS_FILE), error)) from None


def new_result_dir():
    """A fresh timestamped folder name under ./results."""
    base = os.path.join(RESULTS_ROOT, time.strftime("%Y%m%d-%H%M%S"))
    path, suffix = base, 1
    while os.path.exists(path):
        suffix += 1
        path = "%s-%d" % (base, suffix)
    return path


def check_new_or_resumable(result_dir):
    """True when `result_dir` holds a run to resume, False when a new run may start there (UsageError for a
    file, or a non-empty folder that is no run directory: nothing is ever written over)."""
    if os.path.exists(result_dir) and not os.path.isdir(result_dir):
        raise UsageError("--result_dir %s exists and is not a folder" % result_dir)
    if os.path.exists(os.path.join(result_dir, FLAGS_FILE)):
        return True
    if os.path.isdir(result_dir) and os.listdir(result_dir):
        raise UsageError("%s is not empty and holds no %s: refusing to write a run into it" % (result_dir, FLAGS_FILE))
    return False


def merge_resumed_flags(saved, values, given, run_defining, run_length):
    """The flags to resume with: the saved run's, with the run flags given on this command line.

    Args:
      saved: the run's saved flags.
      values: this command's flag values.
      given: names of the flags given on this command line.
      run_defining: flags that define the run; a given one must equal the saved value (else UsageError).
      run_length: flags that set where the run ends; given one, all of them come from this command.

    Returns:
      The merged flag values. Run flags not given keep the run's values, so `--result_dir DIR` alone
      continues to the run's own end.
    """
    for name in run_defining:
        if name in given and values[name] != saved.get(name):
            raise UsageError(
                "--%s=%s conflicts with the run saved in %s (%s=%s); drop the flag to resume"
                % (name, values[name], values["result_dir"], name, saved.get(name))
            )
    overrides = set(given) - set(run_defining)
    if overrides & set(run_length):
        overrides |= set(run_length)
    merged = dict(saved)
    merged.update({name: values[name] for name in overrides})
    return merged


def check_test_flags(result_dir, given, allowed):
    """UsageError unless `given` (the flags on the command line) suit `--test True` on `result_dir`.

    Test mode evaluates the latest checkpoint with the settings of the run's flags.json, so any flag
    outside `allowed` (run-defining like --iterations, or training-only like --max_steps) would be
    ignored without a word: it is refused instead.
    """
    if not result_dir:
        raise UsageError("--test True needs --result_dir DIR of a trained run")
    ignored = sorted(set(given) - set(allowed))
    if ignored:
        raise UsageError(
            "--%s has no effect with --test True: the network and its settings come from %s; "
            "drop the flag" % (ignored[0], os.path.join(result_dir, FLAGS_FILE))
        )
    if not os.path.isdir(result_dir):
        raise UsageError("--result_dir %s does not exist" % result_dir)


def test_output_dir(result_dir, output_dir):
    """Where test mode writes test_results.json and its pictures: `output_dir` (--output_dir) when given, else
    the run directory, except for a shipped network (SHIPPED_FILE in it): ./results/<its folder's name>."""
    if output_dir:
        return output_dir
    if os.path.exists(os.path.join(result_dir, SHIPPED_FILE)):
        return os.path.join(RESULTS_ROOT, os.path.basename(os.path.normpath(result_dir)))
    return result_dir


def default_data_dir(dataset):
    """./data/<dataset>, absolute: --data_dir's default (saved runs work from any folder)."""
    return os.path.abspath(os.path.join(".", "data", dataset))


def data_dir_for(saved, given_dir):
    """The data folder of a resumed or tested run whose saved flags are `saved`: `given_dir` (this command's
    --data_dir) when given, else the run's saved folder when it exists here, else ./data/<its dataset>, so that a
    run copied to another machine (a shipped network, a resumed checkpoint) finds its data there."""
    if given_dir:
        return given_dir
    return saved["data_dir"] if os.path.isdir(saved["data_dir"]) else default_data_dir(saved["dataset"])


def latest_checkpoint(result_dir):
    """(path, step) of DIR's latest checkpoint, or (None, 0) when it has none."""
    path = tf.train.latest_checkpoint(result_dir)
    if path is None:
        return None, 0
    match = _CHECKPOINT_STEP.search(path)
    return path, int(match.group(1)) if match else 0


def restore_latest(sess, saver, result_dir):
    """Restores DIR's latest checkpoint; returns its path (UsageError when there is none or it mismatches)."""
    checkpoint, _ = latest_checkpoint(result_dir)
    if checkpoint is None:
        raise UsageError("%s holds no checkpoint" % result_dir)
    try:
        saver.restore(sess, checkpoint)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
        first_line = str(error.message).strip().splitlines()[0]
        raise UsageError(
            "checkpoint %s does not match the architecture in %s: %s" % (checkpoint, FLAGS_FILE, first_line[:200])
        ) from None
    return checkpoint


def read_history(result_dir):
    """The training history saved in DIR (empty lists for a new run)."""
    path = os.path.join(result_dir, HISTORY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"step": [], "loss": [], "train_accuracy": [], "val_step": [], "val_accuracy": []}


def ship(result_dir, destination):
    """Copies DIR's latest checkpoint (its variables, no meta graph) with flags.json, history.json and the curves
    into `destination` (e.g. pretrained/<name>/), replacing what was there, and writes SHIPPED_FILE: the source
    folder, the step and DIR's test figures (test_results.json and its pictures, copied too) when they are of
    that step. Returns the step. Resume a copy elsewhere: `cp -r destination DIR2; python main.py --result_dir DIR2`.
    """
    checkpoint, step = latest_checkpoint(result_dir)
    if checkpoint is None:
        raise UsageError("%s holds no checkpoint" % result_dir)
    results = read_results(result_dir)
    tested = results.get("global_step") == step  # a report of an earlier checkpoint is not shipped
    staging = destination.rstrip(os.sep) + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    prefix = os.path.basename(checkpoint)
    described = (FLAGS_FILE, HISTORY_FILE, CURVES_FILE) + ((RESULTS_FILE,) + TEST_PICTURES if tested else ())
    for name in os.listdir(result_dir):
        if name.startswith(prefix + ".") or name in described:
            shutil.copy2(os.path.join(result_dir, name), staging)
    with open(os.path.join(staging, "checkpoint"), "w") as f:  # the state file, relative: the folder may move
        f.write('model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' % (prefix, prefix))
    shipped = {"source": os.path.abspath(result_dir), "global_step": step}
    shipped.update({key: results.get(key) for key in ("accuracy", "n", "first_images")} if tested else {})
    write_json_atomically(os.path.join(staging, SHIPPED_FILE), shipped)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)
    return step


def read_results(result_dir):
    """DIR's test_results.json as a dict, or {} when it is absent or unreadable (a later report replaces it)."""
    try:
        with open(os.path.join(result_dir, RESULTS_FILE)) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


if __name__ == "__main__":  # python -m run.run_dir RUN_DIR pretrained/NAME
    if len(sys.argv) != 3:
        sys.exit("usage: python -m run.run_dir RUN_DIR DESTINATION (copies RUN_DIR's latest checkpoint there)")
    try:
        print("shipped step %d of %s into %s" % (ship(sys.argv[1], sys.argv[2]), sys.argv[1], sys.argv[2]))
    except UsageError as error:
        sys.exit("error: %s" % error)
