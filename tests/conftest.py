"""Test set-up: graph mode (tensorflow.compat.v1), the project root on the import path, and the one tiny trained
run that the command-line tests share."""

import collections
import os
import sys

import pytest
import tensorflow.compat.v1 as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
tf.disable_v2_behavior()

# The shared run: its workspace (tiny MNIST in data/, the run in run/), the --data_dir it was trained with
# (absolute: flags.json saves it so, and copies of the run read their test images from there) and its process.
TinyRun = collections.namedtuple("TinyRun", ["workspace", "data_dir", "result"])


def _train_tiny(tmp_path_factory, name, extra):
    """Trains `python main.py --test False` 2 steps of test_main.SMALL_RUN (+ `extra`) on tiny data: a TinyRun."""
    from test_main import SMALL_RUN, run_main, write_tiny_mnist

    workspace = tmp_path_factory.mktemp(name)
    data_dir = str(workspace / "data")
    write_tiny_mnist(data_dir)
    result = run_main(
        ["--test", "False", "--data_dir", data_dir, "--result_dir", "run", "--max_steps", "2"] + SMALL_RUN + extra,
        cwd=workspace,
    )
    assert result.returncode == 0, result.stderr
    return TinyRun(workspace, data_dir, result)


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """The capsule network of test_main.SMALL_RUN trained 2 steps on tiny data, once per test session: the
    test-mode, attack, feedback and reliability tests start from it instead of training their own. No test
    changes it: each takes a copy of its workspace (`shutil.copytree`; checkpoint paths are relative)."""
    return _train_tiny(tmp_path_factory, "tiny_trained_run", [])


@pytest.fixture(scope="session")
def tiny_trained_cnn(tmp_path_factory):
    """The same with `--model cnn` (the baseline CNN), for the CNN's test-mode and attack-transfer tests."""
    return _train_tiny(tmp_path_factory, "tiny_trained_cnn", ["--model", "cnn"])
