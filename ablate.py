"""A Table-1-style ablation: routing iterations x routing variants x seeds, each cell a short training run.

  python ablate.py --study_dir results/ablation --iteration_counts 1,2,3 --seeds 1,2 --cell_steps 1100 \
      --preset small --batch_size 32 --data_dir ../shared/data/mnist

Each cell trains through main.py's own `train` (its run directory, `DIR/cells/<variant>-it<k>-s<seed>`,
can be tested or resumed with main.py) and scores its validation accuracy at the last step. Cells run
`--parallel` at a time in worker processes (study_runs.py) with `--threads` (default: cores / parallel) each.
The study resumes: a finished cell is read back, not rerun, and an interrupted one continues from its checkpoint.
Ctrl-C stops the workers after their current step (they save) and exits 130. Outputs: `ablation.csv`,
`ablation.md` (mean and spread over seeds) and `ablation.png` (accuracy against iterations, one line per
variant, error bars over seeds). Every main.py flag (--preset, --batch_size, --data_dir, ...) applies to
every cell; --iterations and --hparams are set per cell.
"""

import concurrent.futures
import csv
import os
import sys

import main  # first: sets TensorFlow's log level before anything imports TensorFlow; defines the flags

# isort: split
from routing import em_routing
import hparams
from run import plots
from experiments import study_runs
from run.run_dir import UsageError

flags, FLAGS = main.flags, main.FLAGS

# Each variant: the routing form it starts from, then the HParams it changes. "official-X" is the released
# code's routing with its piece X set back to the paper's; "official+X" adds a change neither has.
VARIANTS = {
    "paper": ("paper", {}),
    "official": ("official", {}),
    "official-activation": ("official", hparams.PAPER_ACTIVATION),  # with the paper's form, its inits and lambda
    "official-mean_momentum": ("official", {"mean_momentum": 0.0}),
    "official-mass_epsilon": ("official", {"conv_mass_epsilon": 0.0, "class_mass_epsilon": 0.0}),
    "official-normalise_over": ("official", {"normalise_over": "positions_and_types"}),
    "official-coordinate_addition": ("official", {"coordinate_addition": "paper"}),
    "official+stop_assignment_gradient": ("official", {"assignment_gradient": False}),  # a further variant
    "official-activation+stop_assignment_gradient": (
        "official",
        dict(hparams.PAPER_ACTIVATION, assignment_gradient=False),
    ),
    "paper+cost_scale": ("paper", {"cost_scale": em_routing.IBM_COST_SCALE}),  # IBM's fix, on either form
    "official+cost_scale": ("official", {"cost_scale": em_routing.IBM_COST_SCALE}),
}
CSV_FIELDS = ("variant", "iterations", "seed", "steps", "validation_accuracy", "status", "wall_s", "run_dir")
EXIT_INTERRUPTED = 130

flags.DEFINE_string("study_dir", None, "Folder of the ablation: cells/, ablation.csv, ablation.md, ablation.png.")
flags.DEFINE_string("variants", "paper,official", "Comma-separated variants, of: " + ", ".join(VARIANTS) + ".")
flags.DEFINE_string("iteration_counts", "1,2,3", "Comma-separated routing iteration counts, each >= 1.")
flags.DEFINE_string("seeds", "1", "Comma-separated seeds.")
flags.DEFINE_integer("cell_steps", 1100, "Training steps of every cell, > 0.")
flags.DEFINE_integer("parallel", 2, "Cells trained at a time, > 0.")


def parse_list(flag, text, convert=str):
    """'a,b' -> [convert(a), convert(b)] (UsageError naming the flag for an empty or bad item)."""
    try:
        items = [convert(item.strip()) for item in text.split(",")]
    except ValueError:
        raise UsageError("--%s: %r is not a list of %s" % (flag, text, convert.__name__)) from None
    if not items or "" in items:
        raise UsageError("--%s must list at least one value, got %r" % (flag, text))
    return items


def cells_of(variants, iteration_counts, seeds):
    """Every (variant, iterations, seed), checked (UsageError for an unknown variant or a count below 1)."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise UsageError("--variants: unknown variant %r (choose from %s)" % (unknown[0], ", ".join(VARIANTS)))
    if min(iteration_counts) < 1:
        raise UsageError("--iteration_counts must be >= 1, got %r" % min(iteration_counts))
    return [(v, k, s) for v in variants for k in iteration_counts for s in seeds]


def cell_values(base, cell, steps):
    """main.py's flag values for one cell: the study's flags with the cell's routing, iterations and seed."""
    variant, iterations, seed = cell
    routing, overrides = VARIANTS[variant]
    hparams = ",".join("%s=%s" % item for item in sorted(overrides.items()))
    return dict(
        base,
        routing=routing,
        iterations=iterations,
        seed=seed,
        hparams=hparams,
        max_steps=steps,
        result_dir=None,
        test="False",
    )


def cell_dir(study_dir, cell):
    variant, iterations, seed = cell
    return os.path.join(study_dir, "cells", "%s-it%d-s%d" % (variant, iterations, seed))


def run_cells(study_dir, todo, base, steps, parallel):
    """Trains the cells of `todo` `parallel` at a time; yields (cell, status, accuracy, wall seconds)."""
    with study_runs.worker_pool(parallel) as pool:
        futures = {
            pool.submit(study_runs.train_run, cell_values(base, cell, steps), cell_dir(study_dir, cell)): cell
            for cell in todo
        }
        for future in concurrent.futures.as_completed(futures):
            cell = futures[future]
            code, wall = future.result()
            status = {0: "finished", main.EXIT_NON_FINITE: "non-finite"}.get(code, "exit %d" % code)
            accuracy = study_runs.final_accuracy(cell_dir(study_dir, cell), steps)
            yield cell, status if accuracy is not None or code else "interrupted", accuracy, wall


def write_outputs(study_dir, rows):
    """ablation.csv (one row per cell), ablation.md and ablation.png (mean and spread over seeds)."""
    with open(os.path.join(study_dir, "ablation.csv.tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(os.path.join(study_dir, "ablation.csv.tmp"), os.path.join(study_dir, "ablation.csv"))
    table = {}
    for row in rows:
        if row["validation_accuracy"] != "":
            table.setdefault(row["variant"], {}).setdefault(int(row["iterations"]), []).append(
                float(row["validation_accuracy"])
            )
    counts = sorted({k for by_count in table.values() for k in by_count})
    lines = [
        "| variant | " + " | ".join("%d iteration%s" % (k, "s" * (k > 1)) for k in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for variant, by_count in table.items():
        cells = [_mean_spread(by_count.get(k)) for k in counts]
        lines.append("| %s | %s |" % (variant, " | ".join(cells)))
    with open(os.path.join(study_dir, "ablation.md"), "w") as f:
        f.write(
            "Validation accuracy (%%) at the last step, mean ± spread (half the range) over seeds.\n\n%s\n"
            % "\n".join(lines)
        )
    plots.plot_ablation(table, os.path.join(study_dir, "ablation.png"))


def _mean_spread(values):
    if not values:
        return "—"
    mean = 100.0 * sum(values) / len(values)
    spread = 50.0 * (max(values) - min(values))
    return "%.2f ± %.2f (%d)" % (mean, spread, len(values)) if len(values) > 1 else "%.2f" % mean


def study(argv):
    """Runs the study the command line describes; returns the exit code."""
    values, _, _ = main.parse_command_line(argv)
    if not FLAGS.study_dir:
        raise UsageError("--study_dir is required")
    if FLAGS.cell_steps <= 0 or FLAGS.parallel <= 0:
        raise UsageError("--cell_steps and --parallel must be > 0")
    cells = cells_of(
        parse_list("variants", FLAGS.variants),
        parse_list("iteration_counts", FLAGS.iteration_counts, int),
        parse_list("seeds", FLAGS.seeds, int),
    )
    base = study_runs.worker_values(values, FLAGS.parallel)
    rows, todo = [], []
    for cell in cells:
        accuracy = study_runs.final_accuracy(cell_dir(FLAGS.study_dir, cell), FLAGS.cell_steps)
        if accuracy is None:
            todo.append(cell)
        else:
            rows.append(_row(cell, FLAGS.cell_steps, accuracy, "finished before", ""))
    print(
        "ablation in %s: %d cells of %d steps, %d finished before, %d to train, %d at a time"
        % (FLAGS.study_dir, len(cells), FLAGS.cell_steps, len(cells) - len(todo), len(todo), FLAGS.parallel),
        flush=True,
    )
    os.makedirs(FLAGS.study_dir, exist_ok=True)
    for done, (cell, status, accuracy, wall) in enumerate(
        run_cells(FLAGS.study_dir, todo, base, FLAGS.cell_steps, FLAGS.parallel), 1
    ):
        rows.append(_row(cell, FLAGS.cell_steps, accuracy, status, "%.0f" % wall))
        print(
            "[%d/%d] %s, %d iterations, seed %d: %s, validation %s, %.0f s"
            % (done, len(todo), *cell, status, "—" if accuracy is None else "%.2f%%" % (100 * accuracy), wall),
            flush=True,
        )
        write_outputs(FLAGS.study_dir, rows)
    write_outputs(FLAGS.study_dir, rows)
    print(
        "wrote %s"
        % ", ".join(os.path.join(FLAGS.study_dir, name) for name in ("ablation.csv", "ablation.md", "ablation.png"))
    )
    return 0


def _row(cell, steps, accuracy, status, wall):
    variant, iterations, seed = cell
    return {
        "variant": variant,
        "iterations": iterations,
        "seed": seed,
        "steps": steps,
        "validation_accuracy": "" if accuracy is None else "%.4f" % accuracy,
        "status": status,
        "wall_s": wall,
        "run_dir": os.path.join("cells", os.path.basename(cell_dir("", cell))),
    }


def run(argv):
    """The command line: one line on stderr and exit 2 for bad input, 130 after Ctrl-C (cells saved)."""
    try:
        return study(argv)
    except UsageError as error:
        print("error: %s" % error, file=sys.stderr)
        return main.EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: every cell saved its last step; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(run(sys.argv))
