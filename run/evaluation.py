"""Test-mode evaluation: a checkpoint over arrays of images with progress, the test-time iteration sweep,
and the report (JSON and pictures). No flags are read here: main.py passes `Settings`.
"""

import collections
import dataclasses
import os

import numpy as np
import tensorflow.compat.v1 as tf

from routing import diagnostics
from run import plots
from run import progress
from run import run_dir
from run import runtime
from data import pipeline as data_pipeline

SAMPLE_IMAGES = 100  # images in the test-sample picture
CHECK_IMAGES = 500  # test_results.json's `first_images`: the accuracy a quick check of a shipped network compares
SWEEP_OFFSETS = (-1, 1, 2)  # test-time iteration sweep: the run's count plus these (0 is the main evaluation)

# How an evaluation runs: the dataset, images per batch, the pipeline's seed, CPU threads, micro-batches,
# plain progress.
Settings = collections.namedtuple("Settings", ["dataset", "batch_size", "seed", "threads", "micro_batches", "quiet"])


def predict(sess, pipeline, predictions, images, labels, desc, quiet, statistics=None, scores=None):
    """Predictions for every image of `images` `[n, H, W]` (no remainder dropped), with a progress bar.

    Args:
      sess: a session holding the restored variables.
      pipeline: `data.pipeline.Pipeline` whose evaluation iterator feeds `predictions`.
      predictions: the int prediction tensor `[batch]`.
      images, labels: the arrays to evaluate.
      desc: the progress bar's label.
      quiet: plain progress lines instead of a bar.
      statistics: optional {key: scalar tensor} fetched with every batch and averaged over the images.
      scores: optional class activations `[batch, L]` fetched with every batch.

    Returns:
      (predictions `[n]`, labels `[n]`, {key: mean value} or None, scores `[n, L]` or None).
    """
    sess.run(pipeline.eval_iterator.initializer, {pipeline.images_in: images, pipeline.labels_in: labels})
    fetches = [predictions, pipeline.eval_labels, scores if scores is not None else predictions]
    fetches += [statistics] if statistics else []
    all_predictions, all_labels, all_scores, sums, correct = [], [], [], {}, 0
    with progress.progress(len(labels), desc, "img", quiet) as bar:
        while True:
            try:
                batch = sess.run(fetches)
            except tf.errors.OutOfRangeError:  # every image has been seen
                break
            all_predictions.append(batch[0])
            all_labels.append(batch[1])
            all_scores.append(batch[2])
            correct += int(np.sum(batch[0] == batch[1]))
            for key, value in batch[3].items() if statistics else ():
                sums[key] = sums.get(key, 0.0) + float(value) * len(batch[0])
            seen = sum(len(part) for part in all_labels)
            bar.set_postfix(acc="%.2f%%" % (100.0 * correct / seen))
            bar.update(len(batch[0]))
    seen = max(sum(len(part) for part in all_labels), 1)
    means = {key: total / seen for key, total in sums.items()} if statistics else None
    score_array = np.concatenate(all_scores) if scores is not None else None
    return np.concatenate(all_predictions), np.concatenate(all_labels), means, score_array


def evaluate_checkpoint(result_dir, hparams, settings, views, labels, desc, statistics=False):
    """DIR's latest checkpoint, built with `hparams` in a graph of its own, on every view of the images.

    Args:
      views: list of image arrays (the same images seen differently, e.g. crops), the main one first.

    Returns:
      (predictions, labels and routing statistics (or None) of the first view, checkpoint path, global
      step, predictions from the class activations averaged over the views (None for a single view)).
    """
    with tf.Graph().as_default():
        pipeline = data_pipeline.build_for(
            settings.dataset, hparams, settings.batch_size, settings.batch_size, settings.seed
        )
        global_step = tf.train.get_or_create_global_step()
        model = runtime.new_model(hparams, settings.micro_batches)
        inference = model.inference(pipeline.eval_images)
        routing = diagnostics.routing_statistics(model.layers) if statistics else None
        with runtime.new_session(settings.threads, settings.micro_batches) as sess:
            checkpoint = run_dir.restore_latest(sess, tf.train.Saver(), result_dir)
            scores, first = [], None
            for index, images in enumerate(views):
                name = desc if len(views) == 1 else "%s, view %d of %d" % (desc, index + 1, len(views))
                outputs = predict(
                    sess,
                    pipeline,
                    inference.predictions,
                    images,
                    labels,
                    name,
                    settings.quiet,
                    routing if index == 0 else None,
                    inference.activations,
                )
                first = first or outputs
                scores.append(outputs[3])
            averaged = np.argmax(np.mean(scores, axis=0), axis=1) if len(views) > 1 else None
            return first[:3] + (checkpoint, int(sess.run(global_step)), averaged)


def iteration_sweep(result_dir, hparams, settings, images, labels, accuracy_as_trained):
    """Accuracy on `images` with the run's iteration count and SWEEP_OFFSETS more (counts below 1 skipped)."""
    accuracy = {"0": accuracy_as_trained}
    for offset in SWEEP_OFFSETS:
        iterations = hparams.iterations + offset
        if iterations >= 1:
            swept = dataclasses.replace(hparams, iterations=iterations)
            predictions, truth, *_ = evaluate_checkpoint(
                result_dir, swept, settings, [images], labels, "%d iterations" % iterations
            )
            accuracy["%+d" % offset] = float(np.mean(predictions == truth))
    return {"images": int(len(labels)), "trained_iterations": hparams.iterations, "accuracy": accuracy}


def routing_table(statistics):
    """{(layer, statistic, iteration): value} as {layer: {statistic: [value per iteration]}}."""
    table = {}
    for (layer, name, iteration), value in sorted(statistics.items()):
        table.setdefault(layer, {}).setdefault(name, []).append((iteration, value))
    return {
        layer: {name: [v for _, v in sorted(pairs)] for name, pairs in names.items()} for layer, names in table.items()
    }


def report(result_dir, checkpoint, global_step, predictions, labels, images, class_names, extra):
    """Prints and writes test accuracy, error, per-class accuracy, the confusion matrix and `extra`.

    `extra` ({name: JSON-able}) joins test_results.json (e.g. the iteration sweep and routing statistics);
    a 'routing' entry is also drawn as routing.png. `first_images` is the accuracy on the first CHECK_IMAGES
    images (all of them when fewer). Every file is written whole or not at all; `result_dir` is made if needed.
    """
    matrix = plots.confusion_matrix(labels, predictions, len(class_names))
    per_class = (np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)).tolist()
    accuracy = float(np.mean(predictions == labels))
    results = dict(
        extra,
        accuracy=accuracy,
        error=1.0 - accuracy,
        n=int(len(labels)),
        per_class=per_class,
        checkpoint=checkpoint,
        global_step=global_step,
        confusion_matrix=matrix.tolist(),
        first_images=_first_images_accuracy(predictions, labels),
    )
    os.makedirs(result_dir, exist_ok=True)
    _draw(result_dir, matrix, class_names, images, labels, predictions, extra)
    run_dir.write_json_atomically(os.path.join(result_dir, run_dir.RESULTS_FILE), results)
    print(
        "test accuracy %.2f%% (error %.2f%%) on %d images, checkpoint %s (step %d)"
        % (100 * accuracy, 100 * (1 - accuracy), len(labels), checkpoint, global_step)
    )
    print("per-class accuracy: " + " ".join("%s:%.2f%%" % (name, 100 * a) for name, a in zip(class_names, per_class)))
    _print_extra(extra)
    return 0


def _first_images_accuracy(predictions, labels):
    """{"images": n, "accuracy": a} on the first n = min(CHECK_IMAGES, all) images."""
    count = min(CHECK_IMAGES, len(labels))
    return {"images": int(count), "accuracy": float(np.mean(predictions[:count] == labels[:count]))}


def _draw(result_dir, matrix, class_names, images, labels, predictions, extra):
    """confusion_matrix.png, test_samples.png and, with routing statistics in `extra`, routing.png."""
    plots.plot_confusion_matrix(matrix, os.path.join(result_dir, run_dir.CONFUSION_FILE), class_names)
    shown = slice(0, SAMPLE_IMAGES)
    samples_path = os.path.join(result_dir, run_dir.SAMPLES_FILE)
    plots.plot_sample_grid(images[shown], labels[shown], samples_path, predictions[shown])
    if extra.get("routing"):
        plots.plot_routing(extra["routing"], os.path.join(result_dir, run_dir.ROUTING_FILE))


def _print_extra(extra):
    """A line each for the viewpoint splits, the multi-crop accuracy and the iteration sweep in `extra`."""
    for name, value in sorted(extra.get("viewpoints", {}).items()):
        print("%s viewpoints: %.2f%% on %d images" % (name, 100 * value["accuracy"], value["images"]))
    if "multi_crop" in extra:
        views, accuracy = extra["multi_crop"]["views"], extra["multi_crop"]["accuracy"]
        print("multi-crop accuracy (%d views): %.2f%%" % (views, 100 * accuracy))
    sweep = extra.get("iteration_sweep")
    if sweep:
        print(
            "iteration sweep (first %d images): " % sweep["images"]
            + " ".join("%s:%.2f%%" % (k, 100 * a) for k, a in sorted(sweep["accuracy"].items(), key=_as_int))
        )


def _as_int(item):
    return int(item[0])
