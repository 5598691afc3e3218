"""End-to-end tests of the main.py command line: train, write the run directory, test.

Every test runs `python main.py ...` in a subprocess on tiny generated IDX data (96 training and 40
test images), except the smoke run on the real MNIST files in $MNIST_DIR (default
<repo>/../shared/data/mnist), which is skipped only when that directory does not exist. No test
reaches the network: the subprocesses get a proxy on a closed local port, so a download attempt
fails at once.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

from data import idx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO_ROOT, "main.py")
MNIST_DIR = os.environ.get("MNIST_DIR", os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))
TINY_TRAIN_IMAGES = 96
TINY_TEST_IMAGES = 40  # fewer than the evaluation batch of 100: the remainder must not be dropped
# The fast configuration of every training run here: 80 training images -> 10 steps per epoch.
SMALL_RUN = ["--preset", "small", "--batch_size", "8", "--validation_size", "16"]
# The small preset's form at a quarter of its widths (A=8, B=C=D=4), where a test checks the run around the network
# (files read and written, images counted), not the network: its steps and evaluations cost a fraction.
TINY_NET = ["--hparams", "conv1_filters=8,primary_types=4,conv_caps1_types=4,conv_caps2_types=4"]
_CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # port 9 (discard) is closed: any download fails offline
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SUBPROCESS_TIMEOUT_S = 600


def main_env():
    """The environment of a main.py subprocess: unbuffered output, every download sent to a closed port."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[name] = _CLOSED_PORT_PROXY
    for name in ("no_proxy", "NO_PROXY"):
        env.pop(name, None)
    return env


def without_sweep(args):
    """`args`, with --sweep_images 0 added to a test-mode command that does not set it: the iteration sweep
    builds three more graphs, and has a test of its own."""
    args = [str(a) for a in args]
    return args + ["--sweep_images", "0"] if "--test" in args and "--sweep_images" not in args else args


def run_main(args, cwd):
    """Runs `python main.py ARGS` in `cwd` to the end; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, MAIN] + without_sweep(args),
        cwd=str(cwd),
        env=main_env(),
        capture_output=True,
        text=True,
        timeout=_SUBPROCESS_TIMEOUT_S,
    )


def start_main(args, cwd, stdout, stderr):
    """Starts `python main.py ARGS` in `cwd` with output going to the open files `stdout`, `stderr`."""
    return subprocess.Popen(
        [sys.executable, MAIN] + without_sweep(args),
        cwd=str(cwd),
        env=main_env(),
        stdout=stdout,
        stderr=stderr,
        text=True,
    )


def write_tiny_mnist(data_dir, train=TINY_TRAIN_IMAGES, test=TINY_TEST_IMAGES, seed=0):
    """Writes the four MNIST .gz files with random 28x28 images and labels cycling through 0..9."""
    os.makedirs(data_dir, exist_ok=True)
    random = np.random.RandomState(seed)
    for split, count in (("train", train), ("test", test)):
        prefix = "train" if split == "train" else "t10k"
        images = random.randint(0, 256, size=(count, 28, 28)).astype(np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        idx.write_idx(os.path.join(data_dir, prefix + "-images-idx3-ubyte.gz"), images)
        idx.write_idx(os.path.join(data_dir, prefix + "-labels-idx1-ubyte.gz"), labels)


def read_json(path):
    """The parsed JSON file at `path`."""
    with open(path) as f:
        return json.load(f)


def assert_png(path):
    """The file at `path` starts with the PNG signature."""
    with open(path, "rb") as f:
        assert f.read(len(_PNG_MAGIC)) == _PNG_MAGIC, path


@pytest.fixture(scope="module")
def tiny_run(tiny_trained_run, tmp_path_factory):
    """A copy of the session's run (conftest.py), trained 2 steps with `--test False` on tiny data: (workspace, run
    dir, the training's CompletedProcess)."""
    workspace = tmp_path_factory.mktemp("tiny") / "workspace"
    shutil.copytree(str(tiny_trained_run.workspace), str(workspace))
    return workspace, str(workspace / "run"), tiny_trained_run.result


def test_train_writes_run_directory(tiny_run, tiny_trained_run):
    """`--test False` trains: 2 steps write flags.json (resolved flags and hparams, the absolute --data_dir
    given), a checkpoint of step 2 with its 'checkpoint' index, history.json with the step-2 validation; stdout
    names the steps."""
    workspace, run_dir, result = tiny_run
    assert result.returncode == 0, result.stderr
    assert "training into run at step 0 of 2" in result.stdout
    assert "finished at step 2" in result.stdout
    saved = read_json(os.path.join(run_dir, "flags.json"))
    flags = saved["flags"]
    expected = {
        "preset": "small",
        "batch_size": 8,
        "validation_size": 16,
        "max_steps": 2,
        "result_dir": "run",
        "data_dir": tiny_trained_run.data_dir,
        "test": "False",
        "seed": 1,
        "padding": None,
        "max_shift": 0,
    }
    assert {name: flags.get(name) for name in expected} == expected
    assert saved["hparams"]["conv1_filters"] == 64 and saved["hparams"]["iterations"] == 2
    assert saved["hparams"]["padding"] == "VALID"
    assert saved["hparams"]["lr_decay_steps"] == 2  # the small preset decays over the run: its 2 steps
    assert os.path.isfile(os.path.join(run_dir, "checkpoint"))
    assert os.path.isfile(os.path.join(run_dir, "model.ckpt-2.index"))
    assert tf.train.latest_checkpoint(run_dir) == os.path.join(run_dir, "model.ckpt-2")
    history = read_json(os.path.join(run_dir, "history.json"))
    assert history["val_step"] == [2] and len(history["val_accuracy"]) == 1


def test_test_mode_writes_results(tiny_run):
    """`--test True --result_dir DIR` evaluates every one of the 40 test images (no remainder dropped with
    evaluation batches of 100) and writes test_results.json and the confusion-matrix picture."""
    workspace, run_dir, _ = tiny_run
    result = run_main(["--test", "True", "--result_dir", "run"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "on %d images" % TINY_TEST_IMAGES in result.stdout
    results = read_json(os.path.join(run_dir, "test_results.json"))
    assert {"accuracy", "error", "n", "per_class", "checkpoint", "global_step"} <= set(results)
    assert results["n"] == TINY_TEST_IMAGES
    assert results["global_step"] == 2
    assert results["checkpoint"].endswith("model.ckpt-2")
    assert len(results["per_class"]) == 10
    matrix = np.array(results["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == TINY_TEST_IMAGES
    assert results["accuracy"] == pytest.approx(np.trace(matrix) / TINY_TEST_IMAGES)
    assert results["error"] == pytest.approx(1.0 - results["accuracy"])
    assert_png(os.path.join(run_dir, "confusion_matrix.png"))


def test_test_flag_any_case(tiny_run):
    """`--test TRUE` means test, as `--test True` does."""
    workspace, _, _ = tiny_run
    result = run_main(["--test", "TRUE", "--result_dir", "run"], cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "(step 2)" in result.stdout


def test_train_with_max_shift(tmp_path):
    """`--max_shift 2` trains (shifted training batches feed the static-shape training graph) and is saved
    with the run as a run-defining flag: resuming with another value is refused."""
    write_tiny_mnist(str(tmp_path / "data"))
    args = ["--data_dir", "data", "--result_dir", "run"] + SMALL_RUN
    train = run_main(args + ["--max_steps", "2", "--max_shift", "2"], cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "finished at step 2" in train.stdout
    assert read_json(str(tmp_path / "run" / "flags.json"))["flags"]["max_shift"] == 2
    conflict = run_main(args + ["--max_steps", "3", "--max_shift", "1"], cwd=tmp_path)
    assert conflict.returncode == 2 and "--max_shift=1 conflicts" in conflict.stderr


def test_run_saved_before_newer_flags(tiny_run):
    """A run directory whose flags.json predates --threads, --micro_batch_size and --routing_kernel (runs made
    before those flags existed) still tests and resumes, with those flags at their defaults; the routing kernel,
    which changes how and not what the routing computes, may differ from the saved one in both."""
    workspace, run_dir, _ = tiny_run
    old_dir = os.path.join(str(workspace), "old_run")
    shutil.copytree(run_dir, old_dir)
    flags_path = os.path.join(old_dir, "flags.json")
    saved = read_json(flags_path)
    del saved["flags"]["threads"], saved["flags"]["micro_batch_size"], saved["flags"]["routing_kernel"]
    saved["hparams"]["routing_kernel"] = "fused"  # as a run made where the op built saved it
    with open(flags_path, "w") as f:
        json.dump(saved, f)
    test = run_main(["--test", "True", "--result_dir", "old_run", "--routing_kernel", "tf"], cwd=workspace)
    assert test.returncode == 0, test.stderr
    assert "(step 2)" in test.stdout
    resume = run_main(["--result_dir", "old_run", "--max_steps", "3"], cwd=workspace)
    assert resume.returncode == 0, resume.stderr
    assert "resuming old_run at step 2 of 3" in resume.stdout and "finished at step 3" in resume.stdout


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="MNIST directory %s not found" % MNIST_DIR)
def test_real_mnist_smoke(tmp_path):
    """On the real MNIST files: 3 training steps validate on 100 held-out images, then `--test True`
    evaluates all 10,000 test images."""
    train = run_main(
        [
            "--preset",
            "small",
            "--max_steps",
            "3",
            "--batch_size",
            "8",
            "--validation_size",
            "100",
            "--data_dir",
            MNIST_DIR,
            "--result_dir",
            "run",
        ]
        + TINY_NET,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr
    assert "at step 0 of 3" in train.stdout and "finished at step 3" in train.stdout
    assert "validation accuracy" in train.stdout and "on 100 images" in train.stdout
    test = run_main(["--test", "True", "--result_dir", "run"], cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    assert "test accuracy" in test.stdout and "on 10000 images" in test.stdout
    results = read_json(os.path.join(str(tmp_path), "run", "test_results.json"))
    assert results["n"] == 10000 and results["global_step"] == 3
    assert np.array(results["confusion_matrix"]).sum() == 10000


def test_hparams_flag_parsing():
    """--hparams 'name=value,...' converts values to the HParams field types, after the preset and the hyperparameter
    flags; unknown names and bad values are usage errors naming them."""
    import main

    values = {"preset": "small", "dataset": "mnist", "norb_channels": 1, "iterations": 3}
    values["hparams"] = "weight_stddev=0.3, iterations=2,padding=SAME"
    hparams = main.resolve_hparams(values)
    assert (hparams.weight_stddev, hparams.iterations, hparams.padding) == (0.3, 2, "SAME")
    assert main.resolve_hparams(dict(values, hparams="standardise_costs=TRUE")).standardise_costs is True
    for text, message in (
        ("nonsense=1", "unknown hyperparameter 'nonsense'"),
        ("iterations=two", "not a valid int"),
        ("standardise_costs=yes", "not a valid bool"),
        ("iterations=0", "iterations must be > 0"),
    ):
        with pytest.raises(main.UsageError, match=message):
            main.resolve_hparams(dict(values, hparams=text))


@pytest.mark.parametrize(
    "argv, expected",
    [([], 32), (["--preset", "small"], 64), (["--preset", "small_search"], 64), (["--batch_size", "8"], 8)],
    ids=["paper-default", "small-default", "small_search-default", "given"],
)
def test_batch_size_default_per_preset(argv, expected):
    """Without --batch_size a run trains at its preset's batch (the paper network at 32, the small nets at 64);
    a given --batch_size wins. The resolved value is what flags.json saves, so a resumed run keeps it."""
    import main

    main.FLAGS.unparse_flags()  # values an earlier in-process parse left behind would count as given
    try:
        values, given, testing = main.parse_command_line(["main.py"] + argv)
    finally:
        main.FLAGS.unparse_flags()  # later tests parse their own command lines
    assert values["batch_size"] == expected and not testing
    assert ("batch_size" in given) == ("--batch_size" in argv)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], 5000),
        (["--dataset", "fashion_mnist"], 5000),
        (["--dataset", "smallnorb"], 0),
        (["--validation_size", "8"], 8),
    ],
    ids=["mnist-default", "fashion_mnist-default", "smallnorb-default", "given"],
)
def test_validation_size_default_per_dataset(argv, expected):
    """Without --validation_size a run holds out its dataset's default (MNIST's 5,000; smallNORB none: the paper
    trains on all 24,300 images); a given one wins. flags.json saves the resolved value."""
    import main

    main.FLAGS.unparse_flags()
    try:
        values, given, _ = main.parse_command_line(["main.py"] + argv)
    finally:
        main.FLAGS.unparse_flags()
    assert values["validation_size"] == expected
    assert ("validation_size" in given) == ("--validation_size" in argv)


def test_lr_decay_given_in_steps_replaces_the_presets_epochs():
    """The paper preset decays every PAPER_LR_DECAY_EPOCHS; --lr_decay_steps (or lr_decay_steps in --hparams)
    given without lr_decay_epochs means steps: the epochs are cleared, so the steps given hold."""
    import main

    values = {name: None for name in main.HPARAM_FLAGS}
    values.update(preset="paper", routing=None, hparams="", dataset="mnist", norb_channels=1, routing_kernel="tf")
    assert main.resolve_hparams(values).lr_decay_epochs == main.capsnet.PRESETS["paper"].lr_decay_epochs > 2
    assert main.resolve_hparams(dict(values, lr_decay_steps=500)).lr_decay_epochs == 0
    assert main.resolve_hparams(dict(values, hparams="lr_decay_steps=500")).lr_decay_epochs == 0
    both = main.resolve_hparams(dict(values, lr_decay_steps=500, lr_decay_epochs=3.0))
    assert (both.lr_decay_steps, both.lr_decay_epochs) == (500, 3.0)


def test_paper_run_saved_before_the_routing_forms(tmp_path):
    """A paper-preset run whose flags.json predates the routing forms routed with the paper's pieces: reading it
    back gives those, not the preset's form of today ('official-activation'); its saved fields stay."""
    import hparams
    from run import run_dir

    saved = {"iterations": 3, "weight_stddev": 0.5, "learning_rate": 3e-3}  # no 'routing', no form pieces
    with open(str(tmp_path / "flags.json"), "w") as f:
        json.dump({"flags": {"preset": "paper"}, "hparams": saved}, f)
    today = hparams.hparams_for("paper")
    assert today.routing == "official-activation" and today.normalise_over == "positions"
    old = run_dir.read_hparams(str(tmp_path), today)
    for name, value in dict(hparams.ROUTING_FORMS["paper"], routing="paper", **saved).items():
        assert getattr(old, name) == value, name
