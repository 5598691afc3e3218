"""End to end: `main.py --dataset fashion_mnist|smallnorb` trains and tests on generated files in the official
layout (no network), and the dataset is saved with the run."""

import os

import pytest

from test_datasets import _norb_arrays, _write_fashion_split, _write_norb_split
from test_main import SMALL_RUN, read_json, run_main

NORB_PAIRS = 48  # a few dozen 96x96 stereo pairs per split


@pytest.mark.parametrize(
    "dataset, channels",
    [("fashion_mnist", 1), ("smallnorb", 1), ("smallnorb", 2)],
    ids=["fashion_mnist", "smallnorb_one_image", "smallnorb_stereo"],
)
def test_train_and_test(tmp_path, dataset, channels):
    """Two training steps and test mode on the dataset's files; the network sees its image size and channels
    (smallNORB: 32x32 crops of 1 or 2 channels, 5 classes), and test mode reports every test image."""
    data_dir = str(tmp_path / "files")
    os.makedirs(data_dir)
    if dataset == "fashion_mnist":
        _write_fashion_split(data_dir, "train", 96)
        _write_fashion_split(data_dir, "test", 40, compressed=False)
        test_images, size, classes = 40, 28, 10
    else:
        _write_norb_split(data_dir, "train", _norb_arrays(NORB_PAIRS, seed=1))
        _write_norb_split(data_dir, "test", _norb_arrays(NORB_PAIRS, seed=2), compressed=False)
        test_images, size, classes = NORB_PAIRS, 32, 5
    args = ["--dataset", dataset, "--data_dir", data_dir, "--norb_channels", str(channels), "--max_steps", "2"]
    train = run_main(args + ["--result_dir", "run"] + SMALL_RUN, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    training_images = 96 - 16 if dataset == "fashion_mnist" else NORB_PAIRS - 16  # SMALL_RUN holds 16 out
    assert "%s: %d training, 16 validation images" % (dataset, training_images) in train.stdout
    saved = read_json(str(tmp_path / "run" / "flags.json"))
    assert saved["flags"]["dataset"] == dataset
    assert (saved["hparams"]["image_size"], saved["hparams"]["image_channels"]) == (size, channels)
    assert saved["hparams"]["num_classes"] == classes
    test = run_main(["--test", "True", "--result_dir", "run"], cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    assert "%s test split, %d images" % (dataset, test_images) in test.stdout
    results = read_json(str(tmp_path / "run" / "test_results.json"))
    assert results["n"] == test_images and len(results["per_class"]) == classes
