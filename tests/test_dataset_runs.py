"""End to end: `main.py --dataset fashion_mnist|smallnorb` trains and tests on generated files in the official
layout (no network), and the dataset is saved with the run."""

import os

import numpy as np
import pytest

import data
from data import smallnorb
from data import smallnorb_preprocess as prep
from test_datasets import _norb_arrays, _write_fashion_split, _write_norb_split
from test_main import SMALL_RUN, TINY_NET, read_json, run_main

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
    train = run_main(args + ["--result_dir", "run"] + SMALL_RUN + TINY_NET, cwd=tmp_path)
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


def test_viewpoints_and_multi_crop(tmp_path):
    """smallNORB with --viewpoint_split azimuth trains on the familiar azimuths only, and test mode with
    --multi_crop 13 reports the 13-view accuracy and familiar / novel accuracies (image counts from the
    generated info table) beside the single centre crop."""
    data_dir = str(tmp_path / "files")
    os.makedirs(data_dir)
    train_arrays, test_arrays = _norb_arrays(NORB_PAIRS, seed=1), _norb_arrays(NORB_PAIRS, seed=2)
    _write_norb_split(data_dir, "train", train_arrays)
    _write_norb_split(data_dir, "test", test_arrays)
    familiar_train = int(np.sum(smallnorb.viewpoint_split(train_arrays[2], "azimuth")[0]))
    familiar, novel = (int(mask.sum()) for mask in smallnorb.viewpoint_split(test_arrays[2], "azimuth"))
    args = ["--dataset", "smallnorb", "--data_dir", data_dir, "--viewpoint_split", "azimuth", "--max_steps", "2"]
    train = run_main(
        args + ["--result_dir", "run", "--preset", "small", "--batch_size", "4", "--validation_size", "4"] + TINY_NET,
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr
    assert "smallnorb: %d training, 4 validation images" % (familiar_train - 4) in train.stdout
    test = run_main(["--test", "True", "--result_dir", "run", "--multi_crop", "13"], cwd=tmp_path)
    assert test.returncode == 0, test.stderr
    results = read_json(str(tmp_path / "run" / "test_results.json"))
    assert results["multi_crop"]["views"] == 13 and 0.0 <= results["multi_crop"]["accuracy"] <= 1.0
    assert (results["viewpoints"]["familiar"]["images"], results["viewpoints"]["novel"]["images"]) == (familiar, novel)
    assert "multi-crop accuracy (13 views)" in test.stdout and "novel viewpoints" in test.stdout


def test_evaluation_views():
    """The views: the centre first (smallNORB: the centre crop), then the diagonal offsets; an IDX image is
    moved by the opposite offset with zeros filling in, as a NumPy loop places each pixel."""
    images = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    views = data.evaluation_views("mnist", images, 3)
    assert len(views) == 3 and np.array_equal(views[0], images)
    offset = prep.multi_crop_offsets()[1]  # (1, 1): the crop one pixel down and right
    expected = np.zeros_like(images)
    for row in range(6):
        for col in range(6):
            if 0 <= row + offset[0] < 6 and 0 <= col + offset[1] < 6:
                expected[:, row, col] = images[:, row + offset[0], col + offset[1]]
    assert np.array_equal(views[1], expected)
    norb = np.random.RandomState(0).normal(size=[2, 48, 48, 1]).astype(np.float32)
    norb_views = data.evaluation_views("smallnorb", norb, 13)
    assert len(norb_views) == 13 and np.array_equal(norb_views[0], prep.centre_crop(norb))
    with pytest.raises(ValueError, match="1..13"):
        data.evaluation_views("mnist", images, 14)
