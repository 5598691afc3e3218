"""Hyperparameter search with Optuna: every trial a short training run through main.py's own `train`.

  python search.py --study_dir results/search --trials 40 --steps_per_trial 1100 --parallel 2 \\
      --preset small --batch_size 32 --data_dir ../shared/data/mnist --max_steps 3900

Trials sample the space of search_space.py (`--space FILE`, a JSON object of the same form, replaces it) and train
`--steps_per_trial` steps each in `DIR/trials/<number>`, a run directory that main.py can test or resume, its log
beside it. Every main.py flag (--preset, --batch_size, --data_dir, ...) applies to every trial; a trial's sampled
fields come last, through --routing and --hparams. A trial validates `--reports_per_trial` times, evenly spaced,
besides every epoch end (a training.Monitor: main.py's own runs validate at epoch ends only), reports each
validation accuracy to the pruner (`--pruner median|hyperband|none`; `--prune_below ACC` also stops a trial
below ACC) and scores the accuracy at its last step. A trial whose training meets a non-finite value (main's
EXIT_NON_FINITE) is recorded as FAIL with the reason in its user attribute `fail_reason`, and the study goes on.

The study is kept in `DIR/study.db` (SQLite) and the same command resumes it: `--trials N` is the total wanted,
so a rerun trains only the missing trials. Trials run `--parallel` at a time in worker processes with
`--threads` (default: cores / parallel) each, and beat a heartbeat into the storage every `--heartbeat_s`
seconds: a trial whose process was killed is marked FAIL once it misses three beats, and its parameters are
queued once more. Ctrl-C or SIGTERM stops the workers after their current step and exits 130; their trials are
queued again.
Several processes or machines can work on one study through a shared database (any Optuna RDB URL):

  pip install psycopg2-binary        # on every machine, then on each:
  python search.py --study_dir results/search --trials 200 --preset small --data_dir ../shared/data/mnist \\
      --storage postgresql://USER:PASSWORD@HOST:5432/DATABASE --study_name small-search

Outputs: a line per finished trial; `DIR/best.json` (the best trial's parameters, value, number and run
directory, and the `python main.py ... --hparams ...` command that trains it at full length: the main.py flags
given here, --epochs or --max_steps included); `optimization_history.png`, `param_importances.png` (from two
complete trials) and `slice.png`; a short summary. `optuna-dashboard sqlite:///DIR/study.db` shows it live.
"""

import collections
import concurrent.futures
import functools
import multiprocessing
import os
import shlex
import signal
import sys
import time
import warnings

import optuna

import main  # before TensorFlow comes in any other way: it silences TF's start-up lines; it defines the flags
from experiments import search_space
from experiments import search_study
from experiments import study_runs
from data import idx
from run.run_dir import UsageError

flags, FLAGS = main.flags, main.FLAGS

STUDY_FILE = "study.db"
BEST_FILE = "best.json"

flags.DEFINE_string("study_dir", None, "Folder of the search: study.db, trials/, best.json and the pictures.")
flags.DEFINE_integer("trials", None, "Finished trials wanted in the study in all, > 0 (a rerun trains the missing).")
flags.DEFINE_integer("steps_per_trial", 1100, "Training steps of every trial, > 0.")
flags.DEFINE_integer("reports_per_trial", 4, "Validations per trial reported to the pruner, the last at its end, > 0.")
flags.DEFINE_integer("parallel", 2, "Trials trained at a time, each in a worker process, > 0.")
flags.DEFINE_enum("pruner", "median", ["median", "hyperband", "none"], "Pruner of the validation reports.")
flags.DEFINE_float("prune_below", 0.0, "Also prune a trial whose reported validation accuracy is below this (0: off).")
flags.DEFINE_string("storage", None, "Optuna RDB storage URL (default: sqlite:///DIR/study.db).")
flags.DEFINE_string("study_name", None, "The study's name in the storage (default: the name of --study_dir's folder).")
flags.DEFINE_string("space", None, "JSON file of the search space (default: search_space.DEFAULT_SPACE).")
flags.DEFINE_integer("heartbeat_s", 30, "Seconds between a running trial's heartbeats, > 0.")


def trial_line(info):
    """'trial N <outcome> | params | wall time' of a `describe` dict."""
    if info["state"] == "complete":
        outcome = "complete: validation %.2f%%" % (100 * info["value"])
    elif info["state"] == "pruned" and info["last_report"]:
        outcome = "pruned at step %d: validation %.2f%%" % (info["last_report"][0], 100 * info["last_report"][1])
    elif info["state"] == "fail":
        outcome = "failed: %s" % (info["fail_reason"] or "its process was killed (no heartbeat)")
    else:
        outcome = info["state"]
    params = ", ".join("%s=%s" % (name, _short(value)) for name, value in sorted(info["params"].items()))
    wall = "—" if info["wall_s"] is None else "%.0f s" % info["wall_s"]
    return "trial %d %s | %s | %s" % (info["number"], outcome, params, wall)


def _short(value):
    return "%.4g" % value if isinstance(value, float) else str(value)


def run_trials(job, count, parallel):
    """Trains `count` trials, `parallel` at a time in worker processes; yields each one's `describe` dict.

    A trial is handed to a worker only when one is free, so that after Ctrl-C no queued trial starts.
    """
    with study_runs.worker_pool(min(parallel, count)) as pool:
        running, submitted = set(), 0
        try:
            while submitted < count or running:
                while submitted < count and len(running) < parallel:
                    running.add(pool.submit(search_study.run_trial, job))
                    submitted += 1
                done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                yield from (future.result() for future in done if future.result() is not None)
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C or SIGTERM here or in the caller: stop the workers too
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGTERM)
            raise


def run_study(study, job, parallel):
    """Trains until the study holds `job.wanted` finished trials; yields each trial's `describe` dict."""
    said = False
    while True:
        search_study.fail_stale_trials(study)  # killed trials: FAIL, and their parameters queued once more
        finished, running = search_study.tally(study)
        if len(finished) >= job.wanted:
            return
        missing = job.wanted - len(finished) - len(running)
        if missing > 0:
            yield from run_trials(job, missing, parallel)
        else:
            if not said:
                print(
                    "waiting for %d running trial(s) of other processes (or killed less than %d s ago)"
                    % (len(running), search_study.MISSED_BEATS * job.heartbeat_s),
                    flush=True,
                )
                said = True
            time.sleep(job.heartbeat_s)


# ---- outputs -----------------------------------------------------------------------------------------------

# (file, optuna.visualization.matplotlib function, complete trials it needs)
PICTURES = (
    ("optimization_history.png", "plot_optimization_history", 1),
    ("param_importances.png", "plot_param_importances", 2),
    ("slice.png", "plot_slice", 1),
)


def best_command(values, given, params, result_dir):
    """The `python main.py ...` command that trains a trial's parameters at full length in `result_dir`: the
    main.py flags given to search.py (--epochs/--max_steps included), then --routing and --hparams."""
    routing, text = search_study.run_overrides(values, params)
    _, fields = search_space.fields_of(params)
    replaced = {"result_dir", "test", "hparams"} | set(fields) | ({"routing"} if routing else set())
    arguments = ["python", "main.py"]
    for name in main.PROGRAM_FLAGS:
        if name in given and name not in replaced:
            value = values[name]
            arguments += ["--%s%s" % ("" if value else "no", name)] if isinstance(value, bool) else ["--" + name, value]
    arguments += (["--routing", routing] if routing else []) + (["--hparams", text] if text else [])
    return " ".join(shlex.quote(str(argument)) for argument in arguments + ["--result_dir", result_dir])


def write_pictures(study, study_dir, complete):
    """The study's pictures that `complete` complete trials allow (matplotlib's Agg backend); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    for name, function, needed in PICTURES:
        if complete < needed:
            continue
        with warnings.catch_warnings():  # experimental plots; with few trials PED-ANOVA and the axes warn too
            warnings.simplefilter("ignore")
            axes = getattr(optuna_plots, function)(study)
        figure = getattr(axes, "flat", [axes])[0].figure  # plot_slice gives an array of axes for several parameters
        path = os.path.join(study_dir, name)
        figure.savefig(path + ".tmp", format="png", bbox_inches="tight")
        os.replace(path + ".tmp", path)  # never half a picture
        pyplot.close(figure)
        written.append(path)
    return written


def write_outputs(study, job, values, given):
    """best.json, the pictures and the closing summary."""
    finished, _ = search_study.tally(study)
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    counts = collections.Counter(t.state.name.lower() for t in finished)
    print(
        "study %r: %d finished trials (%s)"
        % (study.study_name, len(finished), ", ".join("%d %s" % (counts[s], s) for s in ("complete", "pruned", "fail")))
    )
    written = []
    if complete:
        best = search_study.describe(study.best_trial)
        full_dir = os.path.join(job.study_dir, "trial-%d-full" % best["number"])
        best.update(steps_per_trial=job.steps, command=best_command(values, given, best["params"], full_dir))
        main.run_dir.write_json_atomically(os.path.join(job.study_dir, BEST_FILE), best)
        written.append(os.path.join(job.study_dir, BEST_FILE))
        print("best: %s" % trial_line(best))
        print("train it at full length:\n  %s" % best["command"])
    else:
        print("no trial completed: no best.json")
    written += write_pictures(study, job.study_dir, len(complete))
    if written:
        print("wrote %s" % ", ".join(written))
    print("browse the study: optuna-dashboard %s" % search_study.masked(job.storage))


# ---- command line ----------------------------------------------------------------------------------------


def check_search_flags(values):
    """UsageError naming the first bad search flag, or a main.py flag that trials cannot work with."""
    if not FLAGS.study_dir:
        raise UsageError("--study_dir is required")
    if FLAGS.trials is None:
        raise UsageError("--trials N is required (the finished trials wanted in the study)")
    for name in ("trials", "steps_per_trial", "reports_per_trial", "parallel", "heartbeat_s"):
        if FLAGS[name].value <= 0:
            raise UsageError("--%s must be > 0, got %r" % (name, FLAGS[name].value))
    if not 0.0 <= FLAGS.prune_below <= 1.0:
        raise UsageError("--prune_below is a validation accuracy in [0, 1], got %r" % FLAGS.prune_below)
    if values["validation_size"] == 0:
        raise UsageError("--validation_size must be > 0: trials are scored on the validation images")


def prepare(argv):
    """(the study, its Job, main.py's flag values, the main.py flags given) from the command line."""
    values, given, _ = main.parse_command_line(argv)
    check_search_flags(values)
    routing = values["routing"] or main.capsnet.PRESETS[values["preset"]].routing
    space = search_space.load(FLAGS.space) if FLAGS.space else search_space.DEFAULT_SPACE
    try:
        search_space.check(space, routing, functools.partial(_resolve, values))
    except UsageError as error:
        raise UsageError("--space %s: %s" % (FLAGS.space or "(the default)", error)) from None
    main.data.get(values["dataset"]).ensure(values["data_dir"])  # once here, not in every worker
    storage = FLAGS.storage or "sqlite:///" + os.path.abspath(os.path.join(FLAGS.study_dir, STUDY_FILE))
    if FLAGS.storage:
        search_study.open_storage(storage, FLAGS.heartbeat_s)  # a bad URL is refused before anything is written
    os.makedirs(FLAGS.study_dir, exist_ok=True)
    job = search_study.Job(
        storage=storage,
        study_name=FLAGS.study_name or os.path.basename(os.path.abspath(FLAGS.study_dir)),
        heartbeat_s=FLAGS.heartbeat_s,
        pruner=FLAGS.pruner,
        prune_below=FLAGS.prune_below,
        wanted=FLAGS.trials,
        space=space,
        routing=routing,
        base=study_runs.worker_values(values, FLAGS.parallel),
        study_dir=FLAGS.study_dir,
        steps=FLAGS.steps_per_trial,
        every=max(1, FLAGS.steps_per_trial // FLAGS.reports_per_trial),
    )
    study = search_study.load_study(job)
    run = {name: values[name] for name in main.RUN_DEFINING_FLAGS if name != "data_dir"}  # the data may move
    settings = {"steps_per_trial": job.steps, "reports_per_trial": FLAGS.reports_per_trial, "space": space, "run": run}
    search_study.check_settings(study, settings, storage)
    _check_trial_dirs(study, job.study_dir)
    return study, job, values, given


def _resolve(values, form, fields):
    """main.resolve_hparams for a trial of routing `form` with `fields` (UsageError when they are invalid)."""
    return main.resolve_hparams(dict(values, routing=form, hparams=search_study.run_overrides(values, fields)[1]))


def _check_trial_dirs(study, study_dir):
    """UsageError when DIR/trials holds a run of a trial number the study has not given (another study's)."""
    folder = os.path.join(study_dir, "trials")
    numbers = {trial.number for trial in study.get_trials(deepcopy=False)}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.isdigit() and int(name) not in numbers:
            raise UsageError(
                "%s holds a run of no trial of study %r (was %s deleted, or --storage changed?): move it away or "
                "use another --study_dir" % (os.path.join(folder, name), study.study_name, STUDY_FILE)
            )


def search(argv):
    """Runs the search the command line describes; returns the exit code."""
    study, job, values, given = prepare(argv)
    search_study.fail_stale_trials(study)
    finished, running = search_study.tally(study)
    counts = (job.wanted, len(finished), len(running), FLAGS.parallel, job.steps, job.every)
    print(
        "search %r in %s: " % (study.study_name, job.study_dir)
        + "%d trials wanted, %d finished before, %d running, %d at a time; %d steps a trial, validated every %d; "
        % counts
        + "pruner %s%s" % (job.pruner, ", below %g" % job.prune_below if job.prune_below else ""),
        flush=True,
    )
    for count, info in enumerate(run_study(study, job, FLAGS.parallel), 1):
        print("[%d] %s" % (count, trial_line(info)), flush=True)
    write_outputs(study, job, values, given)
    return 0


def run(argv):
    """The command line: one line on stderr and exit 2 for bad input, 130 after Ctrl-C or SIGTERM (the running
    trials queued again)."""
    if any(argument in main.HELP_ARGUMENTS for argument in argv[1:]):
        print(FLAGS.module_help(sys.modules[__name__]) + "\n\nand every main.py flag (python main.py --help)")
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the search as Ctrl-C does
    try:
        return search(argv)
    except (UsageError, idx.DataError) as error:
        print("error: %s" % error, file=sys.stderr)
        return main.EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "interrupted: the running trials saved their last step and were queued again; rerun the same command "
            "to continue",
            file=sys.stderr,
        )
        return main.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(run(sys.argv))
