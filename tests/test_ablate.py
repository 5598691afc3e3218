"""Tests of ablate.py: a 2-cell study on tiny generated data, its outputs, resuming, and bad input."""

import csv
import os
import subprocess
import sys

import pytest

from test_main import REPO_ROOT, SMALL_RUN, assert_png, main_env, write_tiny_mnist

ABLATE = os.path.join(REPO_ROOT, "ablate.py")
STUDY = [
    "--study_dir",
    "study",
    "--variants",
    "paper,official",
    "--iteration_counts",
    "2",
    "--seeds",
    "1",
    "--cell_steps",
    "2",
    "--parallel",
    "1",  # one worker after the other: a second cell must not meet the first one's variables
    "--data_dir",
    "data",
] + SMALL_RUN


def run_ablate(args, cwd):
    return subprocess.run(
        [sys.executable, ABLATE] + args, cwd=str(cwd), env=main_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ablate")
    write_tiny_mnist(str(workspace / "data"))
    return workspace, run_ablate(STUDY, workspace)


def test_study_writes_table_and_picture(study):
    """Two cells train through main.py's train (each a run directory), one line per finished cell, and the
    CSV (one row per cell with its validation accuracy), markdown table and picture are written."""
    workspace, result = study
    assert result.returncode == 0, result.stderr
    assert "2 cells of 2 steps, 0 finished before, 2 to train, 1 at a time" in result.stdout
    assert result.stdout.count("seed 1: finished, validation ") == 2
    with open(str(workspace / "study" / "ablation.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["variant"] for row in rows) == ["official", "paper"]
    for row in rows:
        assert 0.0 <= float(row["validation_accuracy"]) <= 1.0 and row["steps"] == "2"
        assert os.path.exists(str(workspace / "study" / row["run_dir"] / "model.ckpt-2.index"))
    table = (workspace / "study" / "ablation.md").read_text()
    assert "| variant | 2 iterations |" in table and "| official |" in table and "| paper |" in table
    assert_png(str(workspace / "study" / "ablation.png"))


def test_rerun_trains_nothing(study):
    """The same command again reads the finished cells back and trains none."""
    workspace, _ = study
    result = run_ablate(STUDY, workspace)
    assert result.returncode == 0, result.stderr
    assert "2 finished before, 0 to train" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "paper,nonsense"], "unknown variant 'nonsense'"),
        (["--iteration_counts", "0,2"], "--iteration_counts must be >= 1"),
        (["--seeds", "one"], "--seeds"),
    ],
    ids=["unknown_variant", "zero_iterations", "bad_seed"],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    """A bad study flag is one line on stderr and exit code 2; nothing is trained."""
    result = run_ablate(["--study_dir", "study"] + args, tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "study").exists()
