"""The Optuna side of search.py: the storage and the study, and the trial a worker trains.

A trial samples the space (search_space.py), trains in `DIR/trials/<number>` through main.py's `train`
(study_runs.train_run, in a worker process) with a `training.Monitor` that reports every validation accuracy to
the pruner, and scores the validation accuracy at its last step. Every process that runs trials beats a
heartbeat into the storage; a trial whose heartbeat stops (its process was killed) is marked FAIL by the next
process that looks, and its parameters are queued once more. No flags are read here: search.py passes a `Job`.
"""

import collections
import functools
import json
import os
import signal
import socket
import time
import traceback
import warnings

import optuna

import hparams
from experiments import search_space
from experiments import study_runs
from run import training
from data import idx
from run.run_dir import UsageError

INTERRUPTED = "interrupted"  # the fail_reason of a trial stopped by Ctrl-C or SIGTERM: queued again, not counted
MISSED_BEATS = 3  # a trial silent for this many heartbeat intervals is taken as killed
SQLITE_TIMEOUT_S = 60  # how long an SQLite writer waits for another process's lock
MEDIAN_STARTUP_TRIALS = 5  # Optuna's default: the median pruner prunes nothing before 5 trials have finished
HYPERBAND_REDUCTION = 3  # Optuna's default and Li et al. 2018's eta: each rung keeps a third of the trials

# Everything a worker needs for a trial (plain values: it crosses to the worker process). `base`: main.py's flag
# values of every trial; `routing`: the trials' routing form when the space does not choose one; `every`: steps
# between validation reports; `wanted`: the finished trials the study should hold.
Job = collections.namedtuple(
    "Job",
    "storage study_name heartbeat_s pruner prune_below wanted space routing base study_dir steps every",
)


class TrialFailed(Exception):
    """The trial's training failed (its reason is in the trial's user attribute fail_reason); the study goes on."""


class TrialInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the trial's training: it is recorded as FAIL and queued again."""


# ---- storage and study -----------------------------------------------------------------------------------


def open_storage(url, heartbeat_s):
    """The RDB storage at `url`, with heartbeats; a stale trial is queued once more (UsageError when it fails)."""
    import sqlalchemy  # Optuna's RDB storage is built on it

    try:
        with warnings.catch_warnings():  # heartbeats and the retry are marked experimental (since Optuna 2.8)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {},
                heartbeat_interval=heartbeat_s,
                grace_period=MISSED_BEATS * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as error:
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError("--storage %s: %s" % (masked(url), message)) from None


def masked(url):
    """`url` with its password hidden, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (ValueError, sqlalchemy.exc.ArgumentError):
        return url


def load_study(job):
    """The study of `job`, with its pruner and a sampler that keeps parallel workers apart."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=open_storage(job.storage, job.heartbeat_s),
        study_name=job.study_name,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(constant_liar=True),
        pruner=_pruner(job),
    )


def _pruner(job):
    if job.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
    if job.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(job.every, job.steps, HYPERBAND_REDUCTION)
    return optuna.pruners.NopPruner()


def check_settings(study, settings, storage):
    """Saves the search's settings with a new study; UsageError when they differ from a resumed study's."""
    settings = json.loads(json.dumps(settings))  # as the storage returns them
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings)
        return
    for name, value in settings.items():
        here, there = (value, saved.get(name)) if name != "run" else _first_difference(value, saved.get(name, {}))
        if here != there:
            raise UsageError(
                "--%s: %s here, %s in study %r of %s; rerun with the study's, or use another --study_dir/--study_name"
                % (name, json.dumps(here), json.dumps(there), study.study_name, masked(storage))
            )


def _first_difference(values, saved):
    for name in sorted(set(values) | set(saved)):
        if values.get(name) != saved.get(name):
            return {name: values.get(name)}, {name: saved.get(name)}
    return None, None


def fail_stale_trials(study):
    """Marks FAIL the running trials whose heartbeat stopped (their process was killed) and queues each once more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def tally(study):
    """(finished trials, running trials) of the study. A trial that was killed and queued again, or interrupted,
    is no result and does not count."""
    trials = study.get_trials(deepcopy=False)
    retried = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    finished = [
        t
        for t in trials
        if t.state.is_finished() and t.number not in retried and t.user_attrs.get("fail_reason") != INTERRUPTED
    ]
    return finished, [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


# ---- one trial (in a worker) ---------------------------------------------------------------------------------


def trial_dir(study_dir, number):
    return os.path.join(study_dir, "trials", str(number))


def run_overrides(values, params):
    """(routing form or None, --hparams text) of a trial: the command's --hparams, then the trial's fields.

    A searched margin schedule ramps over the run (margin_ramp_steps 0) unless the command sets the ramp: the
    presets' 400,000-step ramp would leave every schedule at 0.2 in a short trial.
    """
    routing, fields = search_space.fields_of(params)
    if "margin_schedule" in fields and not _sets(values, "margin_ramp_steps"):
        fields["margin_ramp_steps"] = hparams.WHOLE_RUN
    given = [item.strip() for item in values["hparams"].split(",") if item.strip()]
    kept = [item for item in given if item.partition("=")[0].strip() not in fields]
    return routing, ",".join(kept + ([search_space.hparams_text(fields)] if fields else []))


def _sets(values, field):
    given = {item.partition("=")[0].strip() for item in values["hparams"].split(",")}
    return values.get(field) is not None or field in given


def objective(trial, job, numbers):
    """Trains one trial in its run directory, reporting to the pruner; returns the last validation accuracy."""
    numbers.append(trial.number)
    params = search_space.suggest(trial, job.space, job.routing)
    result_dir = trial_dir(job.study_dir, trial.number)
    trial.set_user_attr("run_dir", result_dir)
    trial.set_user_attr("host", socket.gethostname())
    routing, text = run_overrides(job.base, params)
    values = dict(job.base, routing=routing or job.base["routing"], hparams=text, max_steps=job.steps)
    started = time.time()
    try:
        reason = _train(values, result_dir, training.Monitor(job.every, functools.partial(_report, trial, job)))
    finally:
        trial.set_user_attr("wall_s", round(time.time() - started, 1))
    if reason:
        trial.set_user_attr("fail_reason", reason)
        raise TrialFailed(reason)
    accuracy = study_runs.final_accuracy(result_dir, job.steps)
    if accuracy is None:  # the run stopped early, saved: Ctrl-C or SIGTERM
        trial.set_user_attr("fail_reason", INTERRUPTED)
        raise TrialInterrupted()
    return accuracy


def _train(values, result_dir, monitor):
    """Trains a trial's run; returns why it failed, or None (finished, or stopped by Ctrl-C or SIGTERM)."""
    try:
        code, _ = study_runs.train_run(dict(values, result_dir=None, test="False"), result_dir, monitor)
    except optuna.TrialPruned:
        raise
    except (UsageError, idx.DataError) as error:
        return str(error)
    except KeyboardInterrupt:
        return None
    except Exception as error:  # e.g. out of memory: the trial fails, the study goes on; its log has the traceback
        traceback.print_exc()
        return "%s: %s" % (type(error).__name__, (str(error).strip().splitlines() or [""])[0])
    return None if code == 0 else _error_line(result_dir, code)


def _report(trial, job, step, accuracy):
    """The Monitor's report: the accuracy to the pruner; TrialPruned ends the run (saved at this step)."""
    trial.report(accuracy, step)
    if step < job.steps and (accuracy < job.prune_below or trial.should_prune()):
        raise optuna.TrialPruned("validation accuracy %.4f at step %d" % (accuracy, step))


def _error_line(result_dir, code):
    """The last 'error:' line main.py wrote to the trial's log, or the exit code."""
    with open(study_runs.log_path(result_dir)) as f:
        errors = [line.strip()[len("error: ") :] for line in f if line.startswith("error: ")]
    return errors[-1] if errors else "main.train exited with code %d" % code


def run_trial(job):
    """Worker: one trial of the study (none when other processes have filled it); returns its `describe` dict.

    Ctrl-C or SIGTERM (which search.py passes on) stops the trial: during training after the current step, the run
    saved; before, at once. Either way the trial is recorded as interrupted and its parameters queued again.
    """
    for number in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (a background job)
        signal.signal(number, signal.default_int_handler)
    study = load_study(job)
    finished, running = tally(study)
    if len(finished) + len(running) >= job.wanted:
        return None
    numbers = []
    try:
        study.optimize(functools.partial(objective, job=job, numbers=numbers), n_trials=1, catch=(TrialFailed,))
    except (TrialInterrupted, KeyboardInterrupt):
        if not numbers:
            return None
        trial = study.get_trials()[numbers[0]]  # recorded as FAIL by Optuna: its parameters are queued again
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        return describe(trial, "interrupted, queued again")
    return describe(study.get_trials()[numbers[0]]) if numbers else None


# ---- the study -------------------------------------------------------------------------------------------


def describe(trial, state=None):
    """A finished trial as plain values: for its line, the summary and best.json."""
    steps = sorted(trial.intermediate_values)
    return {
        "number": trial.number,
        "state": state or trial.state.name.lower(),
        "value": trial.value,
        "params": trial.params,
        "last_report": [steps[-1], trial.intermediate_values[steps[-1]]] if steps else None,
        "wall_s": trial.user_attrs.get("wall_s"),
        "fail_reason": trial.user_attrs.get("fail_reason"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "host": trial.user_attrs.get("host"),
    }
