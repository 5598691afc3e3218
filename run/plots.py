"""PNG pictures of a run: training curves, the test confusion matrix and a grid of samples.

Hinton, Sabour & Frosst, "Matrix capsules with EM routing", ICLR 2018, Section 5
reports test error; these pictures show where a run's errors come from. Drawn with
matplotlib's Agg backend, without pyplot, so they work headless and in any thread.

Axis names used in the docstrings: N examples, H/W image height/width, C classes.
"""

import math
import os

import numpy as np

_PIXEL_MAX = 255.0  # Largest uint8 intensity: the white level of uint8 images.

# Plot layout (inches and points); sized so 10 columns of titled digits stay legible.
_DIGIT_CELL_WIDTH_IN = 1.2
_DIGIT_CELL_HEIGHT_IN = 1.4
_TITLE_FONT_PT = 8
_CONFUSION_CELL_IN = 0.6
_CONFUSION_MIN_SIZE_IN = 4.0
_CURVES_FIGSIZE_IN = (11.0, 4.0)
_PLOT_DPI = 100
_ABLATION_FIGSIZE_IN = (6.0, 4.0)
_ROUTING_COLUMNS = 4  # routing.png: panels per row
_ROUTING_PANEL_IN = 3.0  # routing.png: width and height of one panel
_ATTACK_FIGSIZE_IN = (7.0, 5.0)  # attacks.png
_MANY_LINES_COLOURMAP = "tab20"  # 20 distinct colours (matplotlib's default cycle repeats after 10)
_PAIR_ROWS = 2  # attack_samples.png: clean images above, adversarial below
_SUPTITLE_IN = 0.4  # attack_samples.png: room for the figure's title
_CONFUSION_TEXT_SWITCH = 0.5  # Cells above this fraction of the max get white text.


def confusion_matrix(labels, predictions, num_classes):
    """Counts (true class, predicted class) pairs.

    Args:
        labels: integer [N], values in 0..C-1.
        predictions: integer [N], values in 0..C-1.
        num_classes: C.

    Returns:
        int64 [C, C]; entry [i, j] counts examples of true class i predicted as j.

    Raises:
        ValueError: length mismatch or values outside 0..C-1.
    """
    labels = np.asarray(labels, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _new_figure(figsize):
    """Returns a matplotlib Figure drawn by the Agg backend, without touching pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=_PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path):
    """Writes `figure` to `path` as PNG, creating the parent directory if needed.

    The PNG goes to a temporary file first and is renamed into place, so an interrupted run never leaves
    half a picture.
    """
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    temporary = path + ".tmp"
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)


def _as_grayscale_2d(images):
    """[N, H, W] or [N, H, W, K] -> ([N, H, W], vmax) with vmax 255 for uint8, 1 for floats.

    Of several channels (smallNORB's stereo pair) the first is shown; float images outside [0, 1]
    (standardised smallNORB crops) are scaled to [0, 1] image by image.
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]  # [N, H, W], the first channel
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, K], got {images.shape}")
    if images.dtype == np.uint8:
        return images, _PIXEL_MAX
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        low = images.min(axis=(1, 2), keepdims=True)  # [N, 1, 1]
        span = np.maximum(images.max(axis=(1, 2), keepdims=True) - low, np.finfo(np.float32).tiny)
        images = (images - low) / span  # [N, H, W] in [0, 1]
    return images, 1.0


def plot_sample_grid(images, labels, path, predictions=None, columns=10):
    """Saves a PNG grid of sample images, each titled with its label (and prediction).

    Titles read "5", or "5 pred 3" when predictions are given; wrong predictions
    get a red title.

    Args:
        images: [N, H, W] or [N, H, W, 1]; uint8 in 0..255 or float in [0, 1].
        labels: integer [N].
        path: output PNG path.
        predictions: optional integer [N].
        columns: images per row, > 0.

    Raises:
        ValueError: empty input, bad shapes or mismatched lengths.
    """
    images, vmax = _as_grayscale_2d(images)
    n = len(images)
    if n == 0 or len(labels) != n or (predictions is not None and len(predictions) != n):
        raise ValueError("need N > 0 images with N labels (and N predictions if given)")
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    figure = _new_figure((columns * _DIGIT_CELL_WIDTH_IN, rows * _DIGIT_CELL_HEIGHT_IN))
    for i in range(n):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(images[i], cmap="gray", vmin=0.0, vmax=vmax)
        axes.set_axis_off()
        title, color = f"{labels[i]}", "black"
        if predictions is not None:
            title = f"{labels[i]} pred {predictions[i]}"
            color = "black" if predictions[i] == labels[i] else "red"
        axes.set_title(title, color=color, fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)


def plot_confusion_matrix(matrix, path, class_names=None):
    """Saves a confusion matrix as an annotated PNG heat map.

    Args:
        matrix: integer [C, C], rows = true class, columns = predicted class (as
            returned by `confusion_matrix`).
        path: output PNG path.
        class_names: optional C tick labels; defaults to "0".."C-1".

    Raises:
        ValueError: `matrix` is not square or `class_names` has the wrong length.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be [C, C], got {matrix.shape}")
    num_classes = matrix.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    side = max(_CONFUSION_MIN_SIZE_IN, num_classes * _CONFUSION_CELL_IN)
    figure = _new_figure((side, side))
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(matrix, cmap="Blues")
    threshold = _CONFUSION_TEXT_SWITCH * matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            fontsize=_TITLE_FONT_PT,
            color="white" if count > threshold else "black",
        )
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks)
    axes.set_xticklabels(names)
    axes.set_yticks(ticks)
    axes.set_yticklabels(names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    figure.tight_layout()
    _save_png(figure, path)


def plot_training_curves(history, path):
    """Saves loss and accuracy curves as a two-panel PNG.

    Args:
        history: dict of equal-length lists 'step', 'loss', 'train_accuracy' (training.py records at each
            summary step the mean of its interval's steps), and
            optionally 'val_step' with 'val_accuracy' (equal length to each other).
        path: output PNG path.

    Raises:
        KeyError: a required key is missing.
        ValueError: paired lists differ in length.
    """
    steps, loss, train_acc = history["step"], history["loss"], history["train_accuracy"]
    val_steps, val_acc = history.get("val_step", []), history.get("val_accuracy", [])
    if not len(steps) == len(loss) == len(train_acc) or len(val_steps) != len(val_acc):
        raise ValueError("history lists must pair up: step/loss/train_accuracy, val_step/val_accuracy")
    figure = _new_figure(_CURVES_FIGSIZE_IN)
    loss_axes = figure.add_subplot(1, 2, 1)
    loss_axes.plot(steps, loss, label="train loss (mean over each summary interval)")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    acc_axes = figure.add_subplot(1, 2, 2)
    acc_axes.plot(steps, train_acc, label="train accuracy (mean over each summary interval)")
    if val_steps:
        acc_axes.plot(val_steps, val_acc, marker="o", label="validation accuracy")
    acc_axes.set_xlabel("step")
    acc_axes.set_ylabel("accuracy")
    acc_axes.legend()
    figure.tight_layout()
    _save_png(figure, path)


def plot_routing(statistics, path):
    """Small multiples of routing statistics: one panel per statistic, one line per layer, x = iteration.

    Args:
        statistics: {layer: {statistic: [value per iteration]}} (diagnostics.STATISTICS).
        path: output PNG path.
    """
    layers = sorted(statistics)
    names = sorted({name for layer in layers for name in statistics[layer]})
    columns = min(len(names), _ROUTING_COLUMNS)
    rows = -(-len(names) // columns)
    figure = _new_figure((_ROUTING_PANEL_IN * columns, _ROUTING_PANEL_IN * rows))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        for layer in layers:
            values = statistics[layer].get(name)
            if values:
                axes.plot(range(1, len(values) + 1), values, marker="o", label=layer)
        if name.startswith("variance"):
            axes.set_yscale("log")
        axes.set_title(name, fontsize=_TITLE_FONT_PT)
        axes.set_xlabel("iteration (M-step)")
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.axes[0].legend(fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)


def plot_ablation(table, path):
    """Validation accuracy against routing iterations, one line per variant, error bars over seeds.

    Args:
        table: {variant: {iterations: [accuracy per seed]}} (fractions).
        path: output PNG path.
    """
    figure = _new_figure(_ABLATION_FIGSIZE_IN)
    axes = figure.add_subplot(1, 1, 1)
    for variant, by_count in sorted(table.items()):
        counts = sorted(by_count)
        means = [100.0 * sum(by_count[k]) / len(by_count[k]) for k in counts]
        spreads = [50.0 * (max(by_count[k]) - min(by_count[k])) for k in counts]
        axes.errorbar(counts, means, yerr=spreads, marker="o", capsize=3, label=variant)
    axes.set_xlabel("routing iterations")
    axes.set_ylabel("validation accuracy (%)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)


def attack_curves(section, prefix=""):
    """{prefix + key: (epsilons, success rates)} of a test_results.json `attacks` section (attacks.py)."""
    curves = {}
    for key, entry in sorted(section.items()):
        rows = entry["per_epsilon"]
        curves[prefix + key] = ([row["epsilon"] for row in rows], [row["success_rate"] for row in rows])
    return curves


def plot_attack_curves(curves, path):
    """Attack success rate against epsilon, one line per attack.

    Args:
        curves: {label: (epsilons, success rates as fractions)}.
        path: output PNG path.
    """
    figure = _new_figure(_ATTACK_FIGSIZE_IN)
    axes = figure.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    colours = colormaps[_MANY_LINES_COLOURMAP].colors  # 20: the lines of two runs' attacks stay apart
    for index, (label, (epsilons, rates)) in enumerate(curves.items()):
        order = np.argsort(epsilons)
        colour = colours[index % len(colours)]
        axes.plot(np.asarray(epsilons)[order], 100.0 * np.asarray(rates)[order], marker="o", label=label, c=colour)
    axes.set_xlabel("epsilon (L-infinity)")
    axes.set_ylabel("attack success rate (%)")
    axes.set_ylim(0.0, 100.0)
    axes.legend(fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)


def plot_attack_pairs(clean, adversarial, labels, clean_predictions, predictions, path, title=""):
    """Clean images (top row) above their adversarial versions (bottom row), titled with label and prediction.

    Args:
        clean, adversarial: [N, H, W] or [N, H, W, K], float (see `_as_grayscale_2d`).
        labels, clean_predictions, predictions: integer [N]; a wrong prediction gets a red title.
        path: output PNG path.
        title: the figure's title.
    """
    count = len(labels)
    figure = _new_figure((count * _DIGIT_CELL_WIDTH_IN, _PAIR_ROWS * _DIGIT_CELL_HEIGHT_IN + _SUPTITLE_IN))
    for row, (images, guesses) in enumerate(((clean, clean_predictions), (adversarial, predictions))):
        grey, vmax = _as_grayscale_2d(images)
        for i in range(count):
            axes = figure.add_subplot(_PAIR_ROWS, count, row * count + i + 1)
            axes.imshow(grey[i], cmap="gray", vmin=0.0, vmax=vmax)
            axes.set_axis_off()
            color = "black" if guesses[i] == labels[i] else "red"
            axes.set_title(f"{labels[i]} pred {guesses[i]}", color=color, fontsize=_TITLE_FONT_PT)
    figure.suptitle(title, fontsize=_TITLE_FONT_PT)
    figure.tight_layout()
    _save_png(figure, path)
