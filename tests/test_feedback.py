"""Feedback on long steps, the test-time iteration sweep, routing.png, and a run directory made before the
restructure (tests/fixtures): header lines before the work, progress during it, Ctrl-C during an evaluation.

Subprocess outputs are files or pipes, not terminals, so progress comes as plain lines (progress.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from run import progress
from test_main import MAIN, TINY_TEST_IMAGES, assert_png, main_env, read_json, run_main, write_tiny_mnist
from test_reliability import wait_for

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run_before_restructure")
FIXTURE_TRAIN_IMAGES, FIXTURE_TEST_IMAGES = 40, 20  # the tiny data the fixture was trained on (seed 0)
SLOW_TEST_IMAGES = 4000  # an evaluation long enough to be interrupted in the middle


@pytest.fixture(scope="module")
def trained(tiny_trained_run, tmp_path_factory):
    """A 2-step small run on tiny data (a copy of the session's run, conftest.py): (workspace, run dir name)."""
    workspace = tmp_path_factory.mktemp("feedback") / "workspace"
    shutil.copytree(str(tiny_trained_run.workspace), str(workspace))
    return workspace, "run"


def test_plain_progress_lines(capsys):
    """Without a terminal a pass prints a line after its first unit and one per tenth, with its postfix."""
    with progress.PlainProgress(100, "test", "img") as bar:
        for _ in range(20):
            bar.set_postfix(acc="50.00%")
            bar.update(5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 11, lines  # after 5 images, then at 10, 20, ..., 100
    assert lines[0].startswith("test:   5% (5/100 img") and lines[-1].startswith("test: 100% (100/100 img")
    assert all("acc=50.00%" in line for line in lines)


def test_header_then_progress_then_result(trained):
    """Test mode prints its header (run, checkpoint, step, split, images, batch) before any evaluation output,
    then plain progress lines (stderr is no terminal), then the accuracy."""
    workspace, run = trained
    result = subprocess.run(
        [sys.executable, MAIN, "--test", "True", "--result_dir", run, "--sweep_images", "0"],
        cwd=str(workspace),
        env=main_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    header = "evaluating run: checkpoint model.ckpt-2 (step 2), mnist test split, %d images, batch 100" % (
        TINY_TEST_IMAGES
    )
    assert lines[0].startswith(header), lines[:3]
    progress_lines = [i for i, line in enumerate(lines) if line.startswith("test: ")]
    accuracy_line = [i for i, line in enumerate(lines) if line.startswith("test accuracy")]
    assert progress_lines and accuracy_line and progress_lines[-1] < accuracy_line[0], lines
    assert "100%% (%d/%d img" % (TINY_TEST_IMAGES, TINY_TEST_IMAGES) in lines[progress_lines[-1]]


def test_iteration_sweep_and_routing_picture(trained):
    """With --sweep_images N the results hold the accuracy with the trained count (0) and -1, +1, +2 more
    iterations on the first N images, and the per-layer routing statistics drawn in routing.png."""
    workspace, run = trained
    result = run_main(["--test", "True", "--result_dir", run, "--sweep_images", "10"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    results = read_json(os.path.join(str(workspace), run, "test_results.json"))
    sweep = results["iteration_sweep"]
    assert (sweep["images"], sweep["trained_iterations"]) == (10, 2)
    assert sorted(sweep["accuracy"]) == ["+1", "+2", "-1", "0"]
    assert all(0.0 <= value <= 1.0 for value in sweep["accuracy"].values())
    assert "iteration sweep (first 10 images): -1:" in result.stdout
    routing = results["routing"]
    assert sorted(routing) == ["class_caps", "conv_caps1", "conv_caps2"]
    assert all(len(values) == 2 for values in routing["class_caps"].values())  # one per trained iteration
    assert_png(os.path.join(str(workspace), run, "routing.png"))


def _ctrl_c_as_in_a_terminal():
    """In the child: SIGINT's default action, as a terminal's Ctrl-C finds it. A suite started in the background
    of a non-interactive shell (`pytest ... &`) inherits SIGINT ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_evaluation(tmp_path, trained):
    """Ctrl-C in the middle of an evaluation: exit 130, one line on stderr after the progress, and no
    test_results.json or picture written."""
    workspace, run = trained
    copy = tmp_path / "run"
    shutil.copytree(os.path.join(str(workspace), run), str(copy))
    for name in ("test_results.json", "confusion_matrix.png", "test_samples.png", "routing.png"):
        if (copy / name).exists():
            (copy / name).unlink()
    write_tiny_mnist(str(tmp_path / "many"), test=SLOW_TEST_IMAGES)
    before = sorted(os.listdir(str(copy)))
    stderr_path = str(tmp_path / "stderr")
    args = [
        "--test",
        "True",
        "--result_dir",
        "run",
        "--data_dir",
        "many",
        "--eval_batch_size",
        "10",
        "--sweep_images",
        "0",
    ]
    with open(stderr_path, "w") as err:
        process = subprocess.Popen(
            [sys.executable, MAIN] + args,
            cwd=str(tmp_path),
            env=main_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            preexec_fn=_ctrl_c_as_in_a_terminal,
        )
        try:
            wait_for(lambda: "test: " in open(stderr_path).read(), process, "evaluation progress")
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        finally:
            process.kill()
            process.wait()
    lines = open(stderr_path).read().splitlines()
    assert process.returncode == 130, lines
    assert lines[-1] == "interrupted during the evaluation; nothing was written", lines[-3:]
    assert sorted(os.listdir(str(copy))) == before  # no results, no pictures, no temporary files


def test_run_made_before_the_restructure(tmp_path):
    """The fixture, trained 2 steps by the code before the restructure (flags.json without the routing form),
    still tests and resumes: its data_dir is pointed at the same tiny data written here."""
    write_tiny_mnist(str(tmp_path / "data"), train=FIXTURE_TRAIN_IMAGES, test=FIXTURE_TEST_IMAGES)
    shutil.copytree(FIXTURE, str(tmp_path / "old_run"))
    flags_path = str(tmp_path / "old_run" / "flags.json")
    saved = read_json(flags_path)
    assert "routing" not in saved["hparams"]  # it predates the routing forms
    saved["flags"]["data_dir"] = str(tmp_path / "data")
    with open(flags_path, "w") as f:
        json.dump(saved, f)
    test = run_main(["--test", "True", "--result_dir", "old_run"], cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    assert "on %d images" % FIXTURE_TEST_IMAGES in test.stdout and "(step 2)" in test.stdout
    resume = run_main(["--result_dir", "old_run", "--max_steps", "3"], cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert "resuming old_run at step 2 of 3" in resume.stdout and "finished at step 3" in resume.stdout
    assert read_json(flags_path)["hparams"]["routing"] == "paper"
