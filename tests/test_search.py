"""Tests of search.py: Optuna studies of tiny trials (4 steps, validated at steps 2 and 4) on generated data.

One study of three trials on two workers (its outputs, the best trial's command, a rerun that adds one trial),
one study that meets a killed trial, a non-finite trial and pruned ones, and bad input, which is one line on
stderr with exit code 2 (run in this process: it is refused before any training).
"""

import json
import os
import shlex
import subprocess
import sys
import warnings

import optuna
import pytest

from test_main import MAIN, REPO_ROOT, SMALL_RUN, assert_png, main_env, read_json, write_tiny_mnist

SEARCH = os.path.join(REPO_ROOT, "search.py")
TINY_TRIALS = ["--steps_per_trial", "4", "--reports_per_trial", "2", "--data_dir", "data"] + SMALL_RUN
# Both routing forms and a per-form field, in ranges where 4 steps stay finite.
SPACE = {
    "routing": ["choice", "paper", "official"],
    "learning_rate": ["log", 1e-3, 1e-2],
    "iterations": ["int", 1, 2],
    "beta_v_init": {"paper": ["uniform", 0.0, 4.0], "official": ["uniform", 0.0, 1.0]},
}
WHOLE_RUN_FIELDS = ("lr_decay_steps", "margin_ramp_steps")  # resolved to each run's own length
DIVERGING_LEARNING_RATE = 1e30  # Adam's first step makes every weight ~1e30: the second step's loss is Inf


def run_search(args, cwd):
    return subprocess.run(
        [sys.executable, SEARCH] + args, cwd=str(cwd), env=main_env(), capture_output=True, text=True, timeout=600
    )


def load(workspace, name):
    """The study `name` kept in WORKSPACE/NAME/study.db."""
    return optuna.load_study(study_name=name, storage="sqlite:///%s" % (workspace / name / "study.db"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("search")
    write_tiny_mnist(str(workspace / "data"))
    (workspace / "space.json").write_text(json.dumps(SPACE))
    return workspace


@pytest.fixture(scope="module")
def study(workspace):
    """Three trials, two workers on one SQLite study; the full length of the best command is 2 steps."""
    args = ["--study_dir", "study", "--trials", "3", "--parallel", "2", "--space", "space.json", "--max_steps", "2"]
    return run_search(args + TINY_TRIALS, workspace)


def test_three_trials_on_two_workers(workspace, study):
    """Three trials complete in study.db, each a run directory validated at steps 2 and 4 with both reported to
    the pruner; two of them ran at the same time (two workers); stdout has one line per trial, stderr nothing
    (TensorFlow's start-up lines stay silenced in the workers too)."""
    assert study.returncode == 0 and study.stderr == "", study.stderr
    assert (
        "3 trials wanted, 0 finished before, 0 running, 2 at a time; 4 steps a trial, validated every 2" in study.stdout
    )
    trials = load(workspace, "study").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for trial in trials:
        assert "trial %d complete: validation " % trial.number in study.stdout
        assert sorted(trial.intermediate_values) == [2, 4] and trial.value == trial.intermediate_values[4]
        run = workspace / "study" / "trials" / str(trial.number)
        assert read_json(str(run / "history.json"))["val_step"] == [2, 4]
        assert (run / "model.ckpt-4.index").exists()
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_best_json_and_pictures(workspace, study):
    """best.json names the best trial (number, value, params, run directory) with its main.py command; the
    optimisation history, parameter importances and slice pictures are written."""
    best = read_json(str(workspace / "study" / "best.json"))
    expected = load(workspace, "study").best_trial
    assert (best["number"], best["value"], best["params"]) == (expected.number, expected.value, expected.params)
    assert best["run_dir"] == os.path.join("study", "trials", str(expected.number))
    assert best["command"] in study.stdout
    assert "--preset small --batch_size 8 --data_dir %s" % (workspace / "data") in best["command"]
    assert "--max_steps 2 --routing %s --hparams " % expected.params["routing"] in best["command"]
    for name in ("optimization_history.png", "param_importances.png", "slice.png"):
        assert_png(str(workspace / "study" / name))


def test_best_command_trains_the_best_trial(workspace, study):
    """The command in best.json runs and trains the best trial's network: the same hyperparameters as its run,
    apart from the schedule lengths that span each run."""
    best = read_json(str(workspace / "study" / "best.json"))
    arguments = shlex.split(best["command"])
    assert arguments[:2] == ["python", "main.py"]
    result = subprocess.run(
        [sys.executable, MAIN] + arguments[2:], cwd=str(workspace), env=main_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    trained = read_json(str(workspace / arguments[-1] / "flags.json"))["hparams"]
    searched = read_json(str(workspace / best["run_dir"] / "flags.json"))["hparams"]
    for name in WHOLE_RUN_FIELDS:
        del trained[name], searched[name]
    assert trained == searched


def test_rerun_adds_only_the_missing_trial(workspace, study):
    """The same command with --trials 4 keeps the three finished trials and trains exactly one more."""
    before = [(t.number, t.value, t.datetime_complete) for t in load(workspace, "study").trials]
    args = ["--study_dir", "study", "--trials", "4", "--parallel", "2", "--space", "space.json", "--max_steps", "2"]
    result = run_search(args + TINY_TRIALS, workspace)
    assert result.returncode == 0, result.stderr
    assert "4 trials wanted, 3 finished before" in result.stdout
    assert "[1] trial 3 complete" in result.stdout and "[2]" not in result.stdout
    trials = load(workspace, "study").trials
    assert [(t.number, t.value, t.datetime_complete) for t in trials[:3]] == before and len(trials) == 4


@pytest.fixture(scope="module")
def troubled(workspace):
    """A study holding a trial left RUNNING by a killed process (its one heartbeat long past) and two queued
    trials, one with a learning rate that overflows; run to 3 finished trials with every report pruned."""
    space = {"learning_rate": ["log", 1e-4, 1e31]}
    (workspace / "wide.json").write_text(json.dumps(space))
    os.makedirs(str(workspace / "troubled"))
    with warnings.catch_warnings():  # heartbeats are experimental, and meant for Study.optimize
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(
            "sqlite:///%s" % (workspace / "troubled" / "study.db"), heartbeat_interval=1, grace_period=1
        )
        study = optuna.create_study(storage=storage, study_name="troubled", direction="maximize")
        study.enqueue_trial({"learning_rate": 2e-3})
        killed = study.ask()
        killed.suggest_float("learning_rate", 1e-4, 1e31, log=True)
        storage.record_heartbeat(killed._trial_id)  # Optuna has no public id; its heartbeat thread does the same
    study.enqueue_trial({"learning_rate": DIVERGING_LEARNING_RATE})
    study.enqueue_trial({"learning_rate": 1e-3})
    args = ["--study_dir", "troubled", "--trials", "3", "--parallel", "1", "--space", "wide.json"]
    args += ["--prune_below", "1.0", "--heartbeat_s", "1"]
    return run_search(args + TINY_TRIALS, workspace)


def test_killed_trial_is_retried_once(workspace, troubled):
    """The killed trial is marked FAIL, does not count, and its parameters run again as a new trial."""
    assert troubled.returncode == 0, troubled.stderr
    trials = load(workspace, "troubled").trials
    assert len(trials) == 4 and trials[0].state == optuna.trial.TrialState.FAIL
    assert trials[3].params == trials[0].params and trials[3].system_attrs["failed_trial"] == 0
    assert trials[3].state == optuna.trial.TrialState.PRUNED
    assert "study 'troubled': 3 finished trials (0 complete, 2 pruned, 1 fail)" in troubled.stdout


def test_non_finite_trial_fails_and_the_study_goes_on(workspace, troubled):
    """The trial whose training overflows is FAIL with main's error line as its fail_reason, and the next
    trials still run; without a complete trial there is no best.json."""
    trial = load(workspace, "troubled").trials[1]
    assert trial.params["learning_rate"] == DIVERGING_LEARNING_RATE
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("non-finite value at step 2")
    assert "trial 1 failed: non-finite value at step 2" in troubled.stdout
    assert "no trial completed" in troubled.stdout and not (workspace / "troubled" / "best.json").exists()


def test_pruned_trial_stops_at_its_report(workspace, troubled):
    """A trial below --prune_below at its first report is PRUNED there: its run ends saved at step 2."""
    trial = load(workspace, "troubled").trials[2]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [2]
    run = workspace / "troubled" / "trials" / "2"
    assert (run / "model.ckpt-2.index").exists() and not (run / "model.ckpt-4.index").exists()
    assert "trial 2 pruned at step 2: validation " in troubled.stdout


def run_in_process(argv, capsys):
    """search.run(argv) in this process: (exit code, stderr). Quicker than a subprocess for input refused early."""
    import search

    search.FLAGS.unparse_flags()  # absl keeps the values of an earlier parse in this process
    code = search.run(["search.py"] + argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "url, message",
    [("nonsense://x", "Can't load plugin"), ("sqlite:////no/such/folder/study.db", "unable to open database file")],
    ids=["unknown_dialect", "missing_folder"],
)
def test_bad_storage_is_one_line(tmp_path, capsys, url, message):
    """An --storage URL Optuna cannot open is one line on stderr naming it, exit code 2; nothing is written."""
    write_tiny_mnist(str(tmp_path / "data"))
    argv = [
        "--study_dir",
        str(tmp_path / "study"),
        "--trials",
        "1",
        "--storage",
        url,
        "--data_dir",
        str(tmp_path / "data"),
    ]
    code, stderr = run_in_process(argv, capsys)
    assert code == 2 and stderr.startswith("error: --storage %s: " % url) and message in stderr, stderr
    assert len(stderr.splitlines()) == 1 and not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        ("{not json", "Expecting property name"),
        ({"nonsense": ["uniform", 0, 1]}, "unknown field 'nonsense'"),
        ({"learning_rate": ["log", 0, 1]}, "learning_rate: 'log' needs low > 0"),
        ({"iterations": ["uniform", 1, 3]}, "iterations: 'uniform' is not for int fields"),
        (
            {"iterations": ["int", 0, 2]},
            "iterations=0 with routing official-activation: --hparams: iterations must be > 0",
        ),
        ({"beta_v_init": {"capsule": ["uniform", 0, 1]}}, "beta_v_init: unknown routing form 'capsule'"),
        ({"routing": ["choice", "paper", "nonsense"]}, "routing: unknown form 'nonsense'"),
    ],
    ids=[
        "not_json",
        "unknown_field",
        "log_of_zero",
        "float_range_for_int",
        "invalid_hparams",
        "unknown_form",
        "routing",
    ],
)
def test_bad_space_is_one_line(tmp_path, capsys, space, message):
    """A bad --space file is one line on stderr naming the parameter, exit code 2; nothing is written."""
    path = tmp_path / "space.json"
    path.write_text(space if isinstance(space, str) else json.dumps(space))
    code, stderr = run_in_process(
        ["--study_dir", str(tmp_path / "study"), "--trials", "1", "--space", str(path)], capsys
    )
    assert code == 2 and stderr.startswith("error: --space %s: " % path) and message in stderr, stderr
    assert len(stderr.splitlines()) == 1 and not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--study_dir", "s"], "--trials N is required"),
        (["--study_dir", "s", "--trials", "2", "--validation_size", "0"], "--validation_size must be > 0"),
        (["--study_dir", "s", "--trials", "2", "--prune_below", "80"], "--prune_below is a validation accuracy"),
        (["--study_dir", "s", "--trials", "2", "--pruner", "nonsense"], "--pruner"),
    ],
    ids=["no_trials", "no_validation", "percent_threshold", "unknown_pruner"],
)
def test_bad_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    """A bad search flag, or a main.py flag trials cannot work with, is one line on stderr and exit code 2."""
    monkeypatch.chdir(tmp_path)
    code, stderr = run_in_process(argv, capsys)
    assert code == 2 and message in stderr and len(stderr.splitlines()) == 1, stderr
    assert not (tmp_path / "s").exists()


def test_default_space_samples_each_form_its_own_ranges():
    """With the default space, a trial of one routing form samples that form's '<form>.<field>' parameters only,
    each inside the form's range, and they map back to plain HParams fields."""
    from experiments import search_space

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        params = search_space.suggest(trial, search_space.DEFAULT_SPACE, "paper")
        form = params["routing"]
        assert {name.partition(".")[0] for name in params if "." in name} == {form}
        low, high = search_space.DEFAULT_SPACE["class_weight_stddev"][form][1:]
        assert low <= params[form + ".class_weight_stddev"] <= high
        routing, fields = search_space.fields_of(params)
        assert routing == form and "beta_v_init" in fields and "routing" not in fields


def test_trial_overrides_come_after_the_command():
    """A trial's fields follow the command's --hparams (replacing the same names); a searched margin schedule
    ramps over the run unless the command sets the ramp."""
    from experiments import search_study

    values = {"hparams": "weight_decay=0, learning_rate=0.1", "margin_ramp_steps": None}
    params = {"routing": "official", "official.beta_v_init": 0.5, "learning_rate": 0.01, "margin_schedule": "linear"}
    routing, text = search_study.run_overrides(values, params)
    assert routing == "official"
    assert text == "weight_decay=0,beta_v_init=0.5,learning_rate=0.01,margin_ramp_steps=0,margin_schedule=linear"
    assert "margin_ramp_steps" not in search_study.run_overrides(dict(values, margin_ramp_steps=500), params)[1]
