"""Reliability of the main.py command line: bad input, resuming, and being killed or interrupted.

Bad flags, data or result directories must end with exit code 2, exactly one line on stderr, no
traceback, and no file created, changed or removed. A killed run leaves a loadable checkpoint and
resumes from it; Ctrl-C (SIGINT) saves the step reached and exits 0.

Every test runs `python main.py ...` in a subprocess on tiny generated IDX data (see test_main.py).
The download-checksum-mismatch case needs a server, so it is covered in-process by
test_data.test_download_mnist_bad_bytes with a fake urlopen; here the only download is one that
fails, as the subprocesses' proxy points at a closed local port.
"""

import dataclasses
import gzip
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import main
import model as capsnet
from data import download, idx
from test_main import SMALL_RUN, TINY_TEST_IMAGES, TINY_TRAIN_IMAGES, read_json, run_main, start_main, write_tiny_mnist

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
EXIT_USAGE = 2  # main.py: bad flags, data or result dir
_POLL_S = 0.2
_WAIT_LIMIT_S = 300  # for a training subprocess to reach a step; it takes ~10 s on two cores


def snapshot(root):
    """Relative path -> SHA-256 of every file under `root`, and 'folder' for every folder."""
    entries = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            entries[os.path.relpath(os.path.join(folder, name), root)] = "folder"
        for name in files:
            path = os.path.join(folder, name)
            entries[os.path.relpath(path, root)] = download.sha256_of(path)
    return entries


def assert_clean_failure(args, workspace):
    """Runs main.py ARGS in `workspace`; asserts exit code 2, one non-empty stderr line, no traceback
    and an unchanged workspace. Returns the stderr line."""
    before = snapshot(workspace)
    result = run_main(args, cwd=workspace)
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert snapshot(workspace) == before
    return lines[0]


def checkpoint_step(path):
    """The global step in a checkpoint prefix '.../model.ckpt-N'."""
    return int(path.rsplit("-", 1)[1])


def wait_for(condition, process, what):
    """Polls `condition()` until true; fails if `process` exits first or the wait limit passes."""
    deadline = time.time() + _WAIT_LIMIT_S
    while not condition():
        assert process.poll() is None, "training exited (code %s) before %s" % (process.returncode, what)
        assert time.time() < deadline, "no %s after %d s" % (what, _WAIT_LIMIT_S)
        time.sleep(_POLL_S)


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    """A folder holding tiny data in data/ and a small run in run/ trained for 2 steps: the session's run
    (conftest.py), which the `workspace` fixture copies for each test."""
    return tiny_trained_run.workspace


@pytest.fixture
def workspace(trained, tmp_path):
    """A private copy of the trained folder (data/, run/) plus an older run in results/, for one test."""
    copy = tmp_path / "workspace"
    shutil.copytree(str(trained), str(copy))
    shutil.copytree(str(trained / "run"), str(copy / "results" / "older"))
    return copy


# ---- bad data ---------------------------------------------------------------------------------------------


def _empty(data_dir):
    """No MNIST file at all: main.py tries to download them."""
    for name in os.listdir(data_dir):
        os.remove(os.path.join(data_dir, name))


def _truncate_gzip(data_dir):
    """The training images .gz cut in half."""
    path = os.path.join(data_dir, TRAIN_IMAGES)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _not_gzip(data_dir):
    """An HTML error page where the training labels should be."""
    with open(os.path.join(data_dir, TRAIN_LABELS), "wb") as f:
        f.write(b"<html>404 Not Found</html>")


def _wrong_magic(data_dir):
    """Training labels whose IDX magic is 2050 instead of 2049."""
    header = (2050).to_bytes(4, "big") + TINY_TRAIN_IMAGES.to_bytes(4, "big")
    with open(os.path.join(data_dir, TRAIN_LABELS), "wb") as f:
        f.write(gzip.compress(header + bytes(TINY_TRAIN_IMAGES)))


def _small_images(data_dir):
    """20x20 training images."""
    images = np.zeros([TINY_TRAIN_IMAGES, 20, 20], np.uint8)
    idx.write_idx(os.path.join(data_dir, TRAIN_IMAGES), images)


def _count_mismatch(data_dir):
    """One training label fewer than training images."""
    idx.write_idx(os.path.join(data_dir, TRAIN_LABELS), np.zeros([TINY_TRAIN_IMAGES - 1], np.uint8))


def _label_out_of_range(data_dir):
    """Training label 12 at index 5."""
    labels = (np.arange(TINY_TRAIN_IMAGES) % 10).astype(np.uint8)
    labels[5] = 12
    idx.write_idx(os.path.join(data_dir, TRAIN_LABELS), labels)


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (_empty, "cannot download " + TRAIN_IMAGES),
        (_truncate_gzip, TRAIN_IMAGES + ": truncated or corrupt gzip"),
        (_not_gzip, TRAIN_LABELS + ": bad IDX magic number"),
        (_wrong_magic, TRAIN_LABELS + ": bad IDX magic number 2050"),
        (_small_images, "images are 20x20, expected 28x28"),
        (_count_mismatch, "96 images but"),
        (_label_out_of_range, "label 12 at index 5"),
    ],
    ids=[
        "missing_no_network",
        "truncated_gzip",
        "not_gzip",
        "wrong_magic",
        "20x20_images",
        "count_mismatch",
        "label_12",
    ],
)
def test_bad_data(workspace, spoil, expected):
    """Missing files that cannot be downloaded, a truncated .gz, non-gzip garbage, a wrong IDX magic,
    20x20 images, 96 images with 95 labels and a label 12 each stop training before anything is
    written: exit 2, one line naming the file and the fault, no partial download, workspace unchanged."""
    spoil(str(workspace / "data"))
    message = assert_clean_failure(
        ["--data_dir", "data", "--result_dir", "new_run", "--max_steps", "1"] + SMALL_RUN, workspace
    )
    assert message.startswith("error: ") and expected in message


# ---- bad flags --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--batch_size", "0"], "--batch_size"),
        (["--preset", "big"], "--preset"),
        (["--padding", "FULL"], "--padding"),
        (["--iterations", "0"], "--iterations"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--test", "maybe"], "--test"),
        (["--no_such_flag=1"], "no_such_flag"),
        (["stray"], "stray"),
        (["--validation_size", str(TINY_TRAIN_IMAGES)], "--validation_size"),
        (["--hparams", "no_such_field=1"], "--hparams"),
        (["--max_shift", "-1"], "--max_shift"),
        (["--max_shift", "28"], "--max_shift"),
        (["--lr_decay_steps", "-1"], "--lr_decay_steps"),
        (["--margin_ramp_steps", "-5"], "--margin_ramp_steps"),
    ],
    ids=[
        "batch_size_0",
        "preset_big",
        "padding_FULL",
        "iterations_0",
        "learning_rate_0",
        "test_maybe",
        "unknown_flag",
        "positional_argument",
        "validation_takes_all",
        "hparams_unknown_field",
        "max_shift_negative",
        "max_shift_whole_image",
        "lr_decay_steps_negative",
        "margin_ramp_steps_negative",
    ],
)
def test_bad_flags(workspace, flags, expected):
    """Each bad flag value, an unknown flag, a stray positional argument, and a validation split that
    leaves no training image are rejected with exit 2 and one line naming the flag or argument; no
    result folder appears under ./results."""
    base = {
        "--data_dir": "data",
        "--max_steps": "1",
        "--preset": "small",
        "--batch_size": "8",
        "--validation_size": "16",
    }
    args = [part for name, value in base.items() if name not in flags for part in (name, value)]
    message = assert_clean_failure(args + flags, workspace)
    assert expected in message


# ---- bad result directories (test mode) ---------------------------------------------------------------


def test_test_without_result_dir(workspace):
    """`--test True` on a result dir that does not exist."""
    message = assert_clean_failure(["--test", "True", "--result_dir", "missing"], workspace)
    assert "missing" in message and "does not exist" in message


def test_test_without_checkpoint(workspace):
    """`--test True` on a folder with flags.json but no checkpoint."""
    os.mkdir(str(workspace / "untrained"))
    shutil.copy(str(workspace / "run" / "flags.json"), str(workspace / "untrained"))
    message = assert_clean_failure(["--test", "True", "--result_dir", "untrained"], workspace)
    assert "no checkpoint" in message


def test_test_other_architecture(workspace):
    """`--test True` on a small-preset checkpoint whose flags.json was edited to hold another network
    (conv1 with 32 filters, the paper's A, instead of 64; test mode builds the saved hparams): the restore
    fails cleanly, naming the checkpoint; no test_results.json is written."""
    path = str(workspace / "run" / "flags.json")
    saved = read_json(path)
    assert saved["hparams"]["conv1_filters"] == 64
    saved["hparams"]["conv1_filters"] = 32
    with open(path, "w") as f:
        json.dump(saved, f)
    message = assert_clean_failure(["--test", "True", "--result_dir", "run"], workspace)
    assert "model.ckpt-2" in message and "does not match" in message


def test_saved_flags_invalid(workspace):
    """A run whose flags.json holds an invalid value (preset 'big') is rejected in test mode, naming the
    file."""
    path = str(workspace / "run" / "flags.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"preset": "small"', '"preset": "big"'))
    message = assert_clean_failure(["--test", "True", "--result_dir", "run"], workspace)
    assert "flags.json" in message and "--preset" in message


def test_test_mode_takes_data_dir_threads_and_micro_batches(workspace, monkeypatch, capsys):
    """`--test True` evaluates on the --data_dir and with the --threads and --micro_batch_size given on its
    command line, not the run's saved ones: a second copy of MNIST with 20 test images gives a 20-image
    result, and the session of an in-process run gets the thread count and micro-batches given."""
    write_tiny_mnist(str(workspace / "other"), test=20)
    result = run_main(
        ["--test", "True", "--result_dir", "run", "--data_dir", "other", "--threads", "1", "--micro_batch_size", "4"],
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr
    assert read_json(str(workspace / "run" / main.run_dir.RESULTS_FILE))["n"] == 20
    saved = read_json(str(workspace / "run" / "flags.json"))["flags"]
    assert saved["micro_batch_size"] == 0  # the run trained without micro-batches
    sessions = []
    new_session = main.runtime.new_session
    monkeypatch.setattr(
        main.runtime,
        "new_session",
        lambda threads, micro_batches: sessions.append((threads, micro_batches)) or new_session(threads, micro_batches),
    )
    monkeypatch.chdir(workspace)
    argv = [
        "main.py",
        "--test",
        "True",
        "--result_dir",
        "run",
        "--threads",
        str(saved["threads"] + 1),
        "--micro_batch_size",
        str(saved["batch_size"] // 2),
        "--sweep_images",
        "0",
    ]
    main.FLAGS.unparse_flags()  # values an earlier in-process parse left behind would count as given
    try:
        with tf.Graph().as_default():
            assert main.main(argv) == 0
    finally:
        main.FLAGS.unparse_flags()  # later tests parse their own command lines
    assert sessions == [(saved["threads"] + 1, 2)]
    assert "on %d images" % TINY_TEST_IMAGES in capsys.readouterr().out  # the saved data_dir's test set


@pytest.mark.parametrize(
    "flags",
    [
        ["--iterations", "3"],
        ["--hparams", "beta_v_init=2.0"],
        ["--preset", "paper"],
        ["--max_steps", "9"],
        ["--save_every_steps", "7"],
    ],
)
def test_test_mode_refuses_flags_it_would_ignore(workspace, flags):
    """Test mode builds the network from DIR/flags.json and evaluates its latest checkpoint, so a run-defining
    or training-only flag given with `--test True` would change nothing: it is refused with one line naming
    the flag, and nothing is written."""
    message = assert_clean_failure(["--test", "True", "--result_dir", "run"] + flags, workspace)
    assert flags[0] in message and "no effect" in message and "flags.json" in message


# ---- resuming -------------------------------------------------------------------------------------------


def test_resume_continues(workspace):
    """`--result_dir DIR --max_steps 4` on a run saved at step 2 resumes there and saves step 4."""
    result = run_main(["--result_dir", "run", "--max_steps", "4"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "resuming run at step 2 of 4" in result.stdout and "finished at step 4" in result.stdout
    run_dir = str(workspace / "run")
    assert tf.train.latest_checkpoint(run_dir) == os.path.join(run_dir, "model.ckpt-4")
    assert read_json(os.path.join(run_dir, "history.json"))["val_step"] == [2, 4]


def test_resume_keeps_the_runs_own_end(workspace):
    """`--result_dir DIR` alone continues to the run's saved --max_steps (not to the --epochs default) and keeps
    its other run flags; a new --epochs then replaces the saved --max_steps as the end."""
    run_dir = str(workspace / "run")
    flags_path = os.path.join(run_dir, "flags.json")
    saved = read_json(flags_path)
    saved["flags"].update(max_steps=4, save_every_steps=3)
    with open(flags_path, "w") as f:
        json.dump(saved, f)
    result = run_main(["--result_dir", "run"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "resuming run at step 2 of 4" in result.stdout and "finished at step 4" in result.stdout
    assert read_json(flags_path)["flags"]["save_every_steps"] == 3
    steps_per_epoch = (TINY_TRAIN_IMAGES - 16) // 8  # SMALL_RUN: 16 held out, batch 8
    result = run_main(["--result_dir", "run", "--epochs", "1"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "resuming run at step 4 of %d" % steps_per_epoch in result.stdout
    assert read_json(flags_path)["flags"]["max_steps"] is None


def test_saved_hparams_rule_test_mode(workspace, monkeypatch, capsys):
    """A saved run keeps the hyperparameters it started with when a preset changes later: test mode (run
    in-process here, with the small preset's conv1 narrowed to 32 filters) restores the checkpoint into the
    network of flags.json's hparams; rebuilt from the changed preset, the restore would fail."""
    run_dir = str(workspace / "run")
    saved = read_json(os.path.join(run_dir, "flags.json"))
    monkeypatch.setitem(capsnet.PRESETS, "small", dataclasses.replace(capsnet.PRESETS["small"], conv1_filters=32))
    assert main.resolve_hparams(saved["flags"]).conv1_filters == 32
    assert main.run_hparams(run_dir, saved["flags"]) == capsnet.HParams(**saved["hparams"])
    with tf.Graph().as_default():
        main.test(run_dir, {"data_dir": str(workspace / "data"), "sweep_images": 0})
    assert "test accuracy" in capsys.readouterr().out
    del saved["hparams"]["standardise_costs"]  # a run saved before that field existed: its flags fill it in
    with open(os.path.join(run_dir, "flags.json"), "w") as f:
        json.dump(saved, f)
    assert main.run_hparams(run_dir, saved["flags"]).standardise_costs is False


def test_resume_conflicting_flag(workspace):
    """Resuming with an architecture flag that differs from the saved run (--preset paper) is refused
    with one line naming the flag; the run is untouched."""
    message = assert_clean_failure(["--result_dir", "run", "--preset", "paper", "--max_steps", "4"], workspace)
    assert "--preset" in message and "paper" in message


# ---- SIGKILL and SIGINT -------------------------------------------------------------------------------------


def _latest_step(run_dir):
    """The step of the latest checkpoint in `run_dir`, -1 when there is none."""
    checkpoint = tf.train.latest_checkpoint(run_dir)
    return checkpoint_step(checkpoint) if checkpoint else -1


def test_sigkill_leaves_loadable_checkpoint(workspace, tmp_path):
    """A run killed with SIGKILL after saving step >= 2 (saves every 2 steps) leaves a latest checkpoint
    that loads and holds its step; the same command with --max_steps saved+2 resumes from it."""
    run_dir = str(workspace / "killed")
    args = ["--data_dir", "data", "--result_dir", "killed"] + SMALL_RUN
    with open(str(tmp_path / "stdout"), "w") as out, open(str(tmp_path / "stderr"), "w") as err:
        process = start_main(args + ["--max_steps", "1000", "--save_every_steps", "2"], workspace, out, err)
        try:
            wait_for(lambda: _latest_step(run_dir) >= 2, process, "checkpoint of step >= 2")
        finally:
            process.send_signal(signal.SIGKILL)  # mid-run; on a failed wait, it ends the run all the same
            process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoint = tf.train.latest_checkpoint(run_dir)
    saved = checkpoint_step(checkpoint)
    assert saved >= 2
    assert "global_step" in dict(tf.train.list_variables(checkpoint))
    assert tf.train.load_checkpoint(checkpoint).get_tensor("global_step") == saved
    result = run_main(args + ["--max_steps", str(saved + 2)], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "resuming killed at step %d" % saved in result.stdout
    assert "finished at step %d" % (saved + 2) in result.stdout
    assert _latest_step(run_dir) == saved + 2


def test_sigint_saves_and_exits_zero(workspace, tmp_path):
    """SIGINT after the first training step: exit 0, 'interrupted: saved step N' on stdout, and the
    latest checkpoint is model.ckpt-N (no periodic save happened before: they come every 500 steps)."""
    run_dir = str(workspace / "interrupted")
    stdout_path, stderr_path = str(tmp_path / "stdout"), str(tmp_path / "stderr")

    def stepped():  # tqdm shows the loss after a step, once the signal handlers are in place
        with open(stderr_path) as f:
            return "loss=" in f.read()

    args = ["--data_dir", "data", "--result_dir", "interrupted", "--max_steps", "1000"] + SMALL_RUN
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = start_main(args, workspace, out, err)
        try:
            wait_for(stepped, process, "training step")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=_WAIT_LIMIT_S)
        finally:
            process.kill()  # a no-op once it has exited; never leaves a training process behind
            process.wait()
    with open(stdout_path) as f:
        stdout = f.read()
    assert process.returncode == 0, stdout
    marker = "interrupted: saved step "
    assert marker in stdout, stdout
    step = int(stdout.split(marker, 1)[1].split()[0])
    assert step >= 1
    assert tf.train.latest_checkpoint(run_dir) == os.path.join(run_dir, "model.ckpt-%d" % step)
