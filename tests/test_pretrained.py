"""Shipped networks (pretrained/<name>/): `run_dir.ship`, test mode on a shipped folder, resuming a copy.

The tiny-run tests train 2 steps on generated IDX data in a subprocess (test_main's helpers). The shipped
networks of the repository are tested on the first test images of the real MNIST files in $MNIST_DIR
(default <repo>/../shared/data/mnist), skipped only when that directory does not exist.
"""

import glob
import json
import os
import shutil

import pytest

from run import run_dir
from test_main import MNIST_DIR, REPO_ROOT, SMALL_RUN, TINY_TEST_IMAGES, read_json, run_main, write_tiny_mnist

PRETRAINED = sorted(glob.glob(os.path.join(REPO_ROOT, "pretrained", "*", run_dir.SHIPPED_FILE)))
# A shipped network's accuracy on its first images may differ by one image on another CPU or kernel path
# (float rounding can flip a near tie between two classes); more than that is a real change.
SHIPPED_TOLERANCE_IMAGES = 1


def snapshot(folder):
    """{file name: (size, modification time)} of every file in `folder`."""
    return {
        name: (os.path.getsize(os.path.join(folder, name)), os.path.getmtime(os.path.join(folder, name)))
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A 2-step tiny run, tested, then shipped: (workspace, run dir, shipped folder)."""
    workspace = tmp_path_factory.mktemp("ship")
    write_tiny_mnist(str(workspace / "data"))
    args = ["--data_dir", "data", "--result_dir", "run", "--max_steps", "2", "--summary_every_steps", "1"]
    trained = run_main(args + SMALL_RUN, workspace)
    assert trained.returncode == 0, trained.stderr
    tested = run_main(["--test", "True", "--result_dir", "run"], workspace)
    assert tested.returncode == 0, tested.stderr
    destination = str(workspace / "pretrained" / "tiny")
    assert run_dir.ship(str(workspace / "run"), destination) == 2
    return workspace, str(workspace / "run"), destination


def test_ship_copies_the_latest_checkpoint(shipped):
    """The shipped folder holds the step-2 variables (no meta graph), a relative checkpoint state file, the run's
    flags, history and curves, the test report of that step, and pretrained.json with its figures."""
    _, source, destination = shipped
    names = set(os.listdir(destination))
    assert {"model.ckpt-2.index", "model.ckpt-2.data-00000-of-00001", "checkpoint"} <= names
    assert {"flags.json", "history.json", "training_curves.png", "test_results.json", "confusion_matrix.png"} <= names
    assert not [name for name in names if name.endswith(".meta")]
    with open(os.path.join(destination, "checkpoint")) as f:
        assert f.read().splitlines()[0] == 'model_checkpoint_path: "model.ckpt-2"'
    info = read_json(os.path.join(destination, run_dir.SHIPPED_FILE))
    results = read_json(os.path.join(source, "test_results.json"))
    assert info["global_step"] == 2 and info["n"] == TINY_TEST_IMAGES
    assert info["accuracy"] == results["accuracy"]
    assert info["first_images"] == {"images": TINY_TEST_IMAGES, "accuracy": results["accuracy"]}
    assert not os.path.exists(destination + ".tmp")


def test_shipping_again_replaces_the_folder(shipped, tmp_path):
    """A second ship replaces the folder whole: a file that was there before is gone."""
    _, source, _ = shipped
    destination = str(tmp_path / "again")
    run_dir.ship(source, destination)
    open(os.path.join(destination, "stale.txt"), "w").close()
    run_dir.ship(source, destination)
    assert "stale.txt" not in os.listdir(destination)


def test_ship_without_a_checkpoint_is_a_usage_error(tmp_path):
    """A folder without a checkpoint is refused with a message naming it; nothing is made."""
    with pytest.raises(run_dir.UsageError, match="holds no checkpoint"):
        run_dir.ship(str(tmp_path), str(tmp_path / "out"))
    assert not os.path.exists(str(tmp_path / "out"))


def test_test_mode_leaves_a_shipped_folder_as_it_is(shipped):
    """`--test True --result_dir pretrained/tiny` writes its report under ./results/tiny, not beside the
    checkpoint: the shipped folder's files keep their sizes and times."""
    workspace, _, destination = shipped
    before = snapshot(destination)
    result = run_main(["--test", "True", "--result_dir", destination], workspace)
    assert result.returncode == 0, result.stderr
    assert snapshot(destination) == before
    report = read_json(str(workspace / "results" / "tiny" / "test_results.json"))
    assert report["n"] == TINY_TEST_IMAGES and report["global_step"] == 2


def test_output_dir_and_test_images(shipped, tmp_path):
    """--output_dir takes the report; --test_images 10 evaluates the first 10 test images."""
    workspace, source, _ = shipped
    before = snapshot(source)
    out = str(tmp_path / "report")
    result = run_main(["--test", "True", "--result_dir", "run", "--output_dir", out, "--test_images", 10], workspace)
    assert result.returncode == 0, result.stderr
    assert "on 10 images" in result.stdout
    assert read_json(os.path.join(out, "test_results.json"))["first_images"]["images"] == 10
    assert snapshot(source) == before


@pytest.mark.parametrize("case", ["given", "saved_exists", "saved_missing"])
def test_data_dir_for(tmp_path, monkeypatch, case):
    """The data folder of a resumed or tested run: --data_dir when given, else the saved one when it exists, else
    ./data/<the run's dataset> (smallNORB's, whatever this command's --dataset default is)."""
    monkeypatch.chdir(tmp_path)
    saved = {"dataset": "smallnorb", "data_dir": str(tmp_path / ("norb" if case == "saved_exists" else "gone"))}
    os.makedirs(str(tmp_path / "norb"))
    given = str(tmp_path / "mine") if case == "given" else None
    expected = {
        "given": given,
        "saved_exists": saved["data_dir"],
        "saved_missing": str(tmp_path / "data" / "smallnorb"),
    }
    assert run_dir.data_dir_for(saved, given) == expected[case]


def test_a_copy_on_another_machine_finds_its_data_and_resumes(shipped, tmp_path):
    """A shipped folder copied where its saved data folder does not exist reads ./data/<dataset> instead, in
    test mode and when resumed, and resumes from its step with its schedules."""
    workspace, _, destination = shipped
    write_tiny_mnist(str(tmp_path / "data" / "mnist"))
    copy = str(tmp_path / "resumed")
    shutil.copytree(destination, copy)
    saved = read_json(os.path.join(copy, "flags.json"))
    saved["flags"]["data_dir"] = str(tmp_path / "gone" / "mnist")  # as on a machine without that folder
    run_dir.write_json_atomically(os.path.join(copy, "flags.json"), saved)
    tested = run_main(["--test", "True", "--result_dir", copy, "--output_dir", "report"], tmp_path)
    assert tested.returncode == 0, tested.stderr
    resumed = run_main(["--result_dir", copy, "--max_steps", 3], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming %s at step 2 of 3" % copy in resumed.stdout
    assert "finished at step 3" in resumed.stdout
    assert read_json(os.path.join(copy, "flags.json"))["flags"]["data_dir"] == str(tmp_path / "data" / "mnist")


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="no real MNIST in $MNIST_DIR")
@pytest.mark.parametrize("info_path", PRETRAINED, ids=[os.path.basename(os.path.dirname(p)) for p in PRETRAINED])
def test_shipped_network_accuracy(info_path, tmp_path):
    """Each network under pretrained/ tests on the first real test images as pretrained.json says it did (within
    SHIPPED_TOLERANCE_IMAGES images), without writing into its folder."""
    folder = os.path.dirname(info_path)
    with open(info_path) as f:
        expected = json.load(f)["first_images"]
    before = snapshot(folder)
    args = ["--test", "True", "--result_dir", folder, "--data_dir", MNIST_DIR, "--output_dir", str(tmp_path)]
    result = run_main(args + ["--test_images", expected["images"], "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr
    measured = read_json(str(tmp_path / "test_results.json"))
    assert measured["n"] == expected["images"]
    assert abs(measured["accuracy"] - expected["accuracy"]) * expected["images"] <= SHIPPED_TOLERANCE_IMAGES + 1e-9
    assert snapshot(folder) == before
