"""Tests for plots.py: the confusion matrix and the training-curve, confusion and sample-grid PNGs."""

import os
import sys

import numpy as np
import pytest

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from run import plots  # noqa: E402  (needs the repo root on sys.path)
from data import mnist, pipeline  # noqa: E402

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # PNG spec, section 5.2: file signature.
_SIZE = mnist.IMAGE_SIZE


def _random_images(n, size=_SIZE, seed=0):
    """uint8 [n, size, size] with random pixels."""
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size)).astype(np.uint8)


def _digit_labels(n):
    """uint8 [n] cycling through 0..9."""
    return (np.arange(n) % mnist.NUM_CLASSES).astype(np.uint8)


def test_confusion_matrix_hand_example():
    """Rows are true classes, columns predictions, counted by hand."""
    labels = [0, 0, 1, 2, 2, 2]
    predictions = [0, 1, 1, 2, 0, 2]
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    matrix = plots.confusion_matrix(labels, predictions, num_classes=3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    with pytest.raises(ValueError):
        plots.confusion_matrix([0, 3], [0, 0], num_classes=3)


def _assert_png(path):
    """The file exists, is non-empty and starts with the PNG signature."""
    data = open(path, "rb").read()
    assert len(data) > len(_PNG_MAGIC) and data.startswith(_PNG_MAGIC)


@pytest.mark.parametrize("as_float", [False, True])
def test_plot_sample_grid_writes_png(tmp_path, as_float):
    """A digit grid (uint8 [N,28,28] or float [N,28,28,1], with predictions) is a PNG."""
    images = _random_images(12)
    if as_float:
        images = pipeline.scale_images(images)
    labels = _digit_labels(12)
    predictions = labels.copy()
    predictions[0] = 3
    path = str(tmp_path / "sub" / "digits.png")
    plots.plot_sample_grid(images, labels, path, predictions=predictions, columns=5)
    _assert_png(path)


def test_plot_confusion_matrix_writes_png(tmp_path):
    """A 10-class confusion matrix with class names is written as a PNG."""
    matrix = plots.confusion_matrix(_digit_labels(30), _digit_labels(30)[::-1], 10)
    path = str(tmp_path / "confusion.png")
    plots.plot_confusion_matrix(matrix, path, class_names=[str(i) for i in range(10)])
    _assert_png(path)


@pytest.mark.parametrize("with_validation", [False, True])
def test_plot_training_curves_writes_png(tmp_path, with_validation):
    """Loss/accuracy curves, with or without validation points, are written as a PNG."""
    history = {"step": [0, 10, 20], "loss": [2.3, 1.1, 0.5], "train_accuracy": [0.1, 0.6, 0.9]}
    if with_validation:
        history.update(val_step=[10, 20], val_accuracy=[0.55, 0.85])
    path = str(tmp_path / "curves.png")
    plots.plot_training_curves(history, path)
    _assert_png(path)
