"""The released code's MNIST input as options: random crops (--crop) and rotations (--max_rotation).

`data.pipeline.rotate` against a NumPy float64 bilinear reference and np.rot90, the random rotation's angles
(within the range, a new one per image), the crops, the evaluation windows, the pipeline's shapes with a crop,
and main.py's flags end to end on tiny generated IDX data.
"""

import os

import numpy as np
import pytest
import tensorflow.compat.v1 as tf

import data
from data import pipeline
from test_attacks import run_main_in_process
from test_main import SMALL_RUN, TINY_TEST_IMAGES, read_json, run_main, write_tiny_mnist

_SIZE = 28
_CROP = 24  # the released code's MNIST crop
_LINE_DRAWS = 40  # random rotations of one image whose angles are measured
_ANGLE_TOLERANCE_DEG = 2.0  # a 27-pixel line's measured orientation after bilinear resampling


def _run(tensor):
    """The value of `tensor`, built in the current graph."""
    with tf.Session() as sess:
        return sess.run(tensor)


def _bilinear_rotation_reference(image, angle):
    """NumPy float64: each output pixel (x, y) reads `image` at R(angle) ((x, y) - c) + c, bilinear, zero outside."""
    height, width = image.shape
    centre_x, centre_y = (width - 1) / 2.0, (height - 1) / 2.0
    out = np.zeros((height, width))
    pixel = lambda y, x: image[y, x] if 0 <= y < height and 0 <= x < width else 0.0  # noqa: E731
    for y in range(height):
        for x in range(width):
            source_x = np.cos(angle) * (x - centre_x) - np.sin(angle) * (y - centre_y) + centre_x
            source_y = np.sin(angle) * (x - centre_x) + np.cos(angle) * (y - centre_y) + centre_y
            x0, y0 = int(np.floor(source_x)), int(np.floor(source_y))
            fx, fy = source_x - x0, source_y - y0
            out[y, x] = (1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1)) + fy * (
                (1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)
            )
    return out


@pytest.mark.parametrize("degrees", [0.0, 15.0, -15.0, 45.0, 130.0], ids=lambda d: "%+g_degrees" % d)
def test_rotate_matches_numpy_bilinear_reference(degrees):
    """rotate() equals the float64 bilinear reference (zeros outside the image) on a random 9x7 image."""
    image = np.random.RandomState(0).uniform(0, 255, size=(9, 7))
    with tf.Graph().as_default():
        rotated = _run(pipeline.rotate(tf.constant(image, tf.float32), tf.constant(np.deg2rad(degrees), tf.float32)))
    np.testing.assert_allclose(rotated, _bilinear_rotation_reference(image, np.deg2rad(degrees)), atol=2e-3)


@pytest.mark.parametrize("degrees,turns", [(90.0, 1), (-90.0, -1), (180.0, 2)], ids=["+90", "-90", "180"])
def test_rotate_quarter_turns_are_rot90(degrees, turns):
    """Quarter turns of a square image move whole pixels: np.rot90 (a positive angle turns it as rot90 does)."""
    image = np.random.RandomState(1).randint(0, 256, size=(6, 6)).astype(np.uint8)
    with tf.Graph().as_default():
        rotated = _run(pipeline.rotate(tf.constant(image), tf.constant(np.deg2rad(degrees), tf.float32)))
    np.testing.assert_allclose(rotated, np.rot90(image, turns), atol=1e-3)


def _orientation_degrees(image):
    """The orientation of the bright pixels' principal axis, degrees in (-90, 90] (image moments)."""
    ys, xs = np.nonzero(image > 0)
    weights = image[ys, xs]
    x, y = xs - np.average(xs, weights=weights), ys - np.average(ys, weights=weights)
    mu20, mu02 = np.average(x * x, weights=weights), np.average(y * y, weights=weights)
    mu11 = np.average(x * y, weights=weights)
    return np.rad2deg(0.5 * np.arctan2(2 * mu11, mu20 - mu02))


def test_random_rotation_angles_are_within_range_and_drawn_per_image():
    """A horizontal line turned by random_rotation(15) lies within 15 degrees of horizontal every time, and the
    angles differ from draw to draw (the released code draws one angle for the whole run; this draws one each)."""
    line = np.zeros((_SIZE, _SIZE), np.float32)
    line[_SIZE // 2, :] = 1.0
    with tf.Graph().as_default():
        turned = pipeline.random_rotation(tf.constant(line), 15.0, seed=3)
        with tf.Session() as sess:
            angles = [_orientation_degrees(sess.run(turned)) for _ in range(_LINE_DRAWS)]
    assert max(abs(a) for a in angles) <= 15.0 + _ANGLE_TOLERANCE_DEG
    assert np.std(angles) > 3.0  # uniform on +-15 degrees: std 8.7


def test_augment_crop_is_a_window_of_the_image():
    """augment(crop=24) returns [24, 24] windows of the image, at more than one place over many draws."""
    image = np.arange(_SIZE * _SIZE).reshape(_SIZE, _SIZE).astype(np.int32)
    with tf.Graph().as_default():
        cropped = pipeline.augment(tf.constant(image), crop=_CROP, seed=2)
        assert cropped.shape.as_list() == [_CROP, _CROP]
        with tf.Session() as sess:
            corners = set()
            for _ in range(20):
                window = sess.run(cropped)
                top, left = divmod(int(window[0, 0]), _SIZE)
                np.testing.assert_array_equal(window, image[top : top + _CROP, left : left + _CROP])
                corners.add((top, left))
    assert len(corners) > 1 and all(0 <= t <= _SIZE - _CROP and 0 <= x <= _SIZE - _CROP for t, x in corners)


def test_evaluation_windows():
    """for_evaluation(crop=24) is the centre window [2:26]; evaluation_views(crop=24) are the windows at the
    authors' offsets, zeros beyond the edge at +-3 pixels."""
    images = np.random.RandomState(4).randint(1, 256, size=(3, _SIZE, _SIZE)).astype(np.uint8)
    np.testing.assert_array_equal(data.for_evaluation("mnist", images, _CROP), images[:, 2:26, 2:26])
    views = data.evaluation_views("mnist", images, 13, _CROP)
    assert len(views) == 13 and all(view.shape == (3, _CROP, _CROP) for view in views)
    np.testing.assert_array_equal(views[0], images[:, 2:26, 2:26])
    np.testing.assert_array_equal(views[1], images[:, 3:27, 3:27])  # offset (1, 1)
    far = views[-1]  # offset (-3, -3): one row and column of zeros, then the image from its corner
    assert not far[:, 0, :].any() and not far[:, :, 0].any()
    np.testing.assert_array_equal(far[:, 1:, 1:], images[:, : _CROP - 1, : _CROP - 1])


def test_pipeline_with_crop_feeds_two_sizes():
    """build_pipeline(crop_from=28) on a 24-pixel network: 28x28 training feeds give [B, 24, 24, 1] batches
    (turned, float), 24x24 evaluation feeds give [<= B, 24, 24, 1] batches."""
    hparams = type("HP", (), {"image_size": _CROP})
    images = np.random.RandomState(5).randint(0, 256, size=(8, _SIZE, _SIZE)).astype(np.uint8)
    labels = np.arange(8, dtype=np.int64)
    with tf.Graph().as_default():
        built = pipeline.build_pipeline(hparams, 4, 3, seed=1, crop_from=_SIZE, max_rotation=15.0)
        assert built.train_images.shape.as_list() == [4, _CROP, _CROP, 1]
        with tf.Session() as sess:
            sess.run(built.train_iterator.initializer, {built.images_in: images, built.labels_in: labels})
            train = sess.run(built.train_images)
            evaluation = data.for_evaluation("mnist", images, _CROP)
            sess.run(built.eval_iterator.initializer, {built.images_in: evaluation, built.labels_in: labels})
            first = sess.run(built.eval_images)
    assert train.shape == (4, _CROP, _CROP, 1) and 0.0 <= train.min() and train.max() <= 1.0
    np.testing.assert_allclose(first[..., 0], evaluation[:3] / 255.0, rtol=1e-6)


def test_main_trains_and_tests_on_crops(tmp_path):
    """`--crop 24 --max_rotation 15` trains a 24-pixel network (flags.json: image_size 24) and test mode
    evaluates the centre crops of every test image."""
    write_tiny_mnist(str(tmp_path / "data"))
    args = ["--data_dir", "data", "--result_dir", "run", "--max_steps", "2", "--crop", _CROP, "--max_rotation", 15]
    trained = run_main(args + SMALL_RUN, tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert read_json(str(tmp_path / "run" / "flags.json"))["hparams"]["image_size"] == _CROP
    tested = run_main(["--test", "True", "--result_dir", "run", "--multi_crop", "13"], tmp_path)
    assert tested.returncode == 0, tested.stderr
    results = read_json(os.path.join(str(tmp_path / "run"), "test_results.json"))
    assert results["n"] == TINY_TEST_IMAGES and results["multi_crop"]["views"] == 13


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--crop", 28, "--crop must be 0 or in 17..27"),
        ("--crop", 16, "--crop must be 0 or in 17..27"),
        ("--max_rotation", -1, "--max_rotation must be in 0..180"),
        ("--max_rotation", 181, "--max_rotation must be in 0..180"),
    ],
    ids=["crop_whole_image", "crop_too_small", "rotation_negative", "rotation_beyond_half_turn"],
)
def test_bad_crop_and_rotation_are_usage_errors(tmp_path, monkeypatch, capsys, flag, value, message):
    """A bad --crop or --max_rotation is one line on stderr naming the flag, exit 2, no run directory."""
    monkeypatch.chdir(tmp_path)
    code, errors = run_main_in_process(["--data_dir", "data", "--result_dir", "run", flag, value], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not os.path.exists(str(tmp_path / "run"))
