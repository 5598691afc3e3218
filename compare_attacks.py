"""Overlays the adversarial-attack curves of several runs in one picture (paper section 6: capsules against the
baseline CNN).

  python compare_attacks.py results/capsules results/cnn --out attacks_compared.png

Reads the `attacks` section of each run's test_results.json (written by `main.py --test True --result_dir DIR
--attack ...`) and draws attack success rate against epsilon, one line per run and attack, labelled
"RUN: attack/target". Exit codes: 0 done; 2 bad arguments or a run without attack results (one line on stderr).
"""

import json
import os
import sys

from absl import flags

from run import plots

RESULTS_FILE = "test_results.json"  # run_dir.RESULTS_FILE (run_dir imports TensorFlow, not needed here)
EXIT_USAGE = 2

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "attacks_compared.png", "The PNG to write.")


class UsageError(Exception):
    """Bad arguments or a run without attack results: one line on stderr, exit code 2."""


def attack_section(result_dir):
    """The `attacks` section of DIR's test_results.json (UsageError when it has none)."""
    path = os.path.join(result_dir, RESULTS_FILE)
    try:
        with open(path) as f:
            section = json.load(f).get("attacks")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError("cannot read %s: %s" % (path, error)) from None
    if not section:
        raise UsageError(
            "%s holds no attack results: run main.py --test True --result_dir %s --attack fgsm" % (path, result_dir)
        )
    return section


def compare(result_dirs, out):
    """Draws the attack curves of every run in `result_dirs` into `out`; returns the number of curves."""
    curves = {}
    for result_dir in result_dirs:
        name = os.path.normpath(result_dir)
        curves.update(plots.attack_curves(attack_section(result_dir), prefix=name + ": "))
    plots.plot_attack_curves(curves, out)
    return len(curves)


def main(argv):
    """Parses the run folders and --out, then draws; every bad input is one line on stderr and exit code 2."""
    try:
        try:
            result_dirs = FLAGS(argv)[1:]
        except flags.Error as error:
            raise UsageError(str(error).splitlines()[0]) from None
        if not result_dirs:
            raise UsageError("usage: compare_attacks.py RUN_DIR [RUN_DIR ...] [--out FILE]")
        count = compare(result_dirs, FLAGS.out)
    except UsageError as error:
        print("error: %s" % error, file=sys.stderr)
        return EXIT_USAGE
    print("%d attack curves of %d runs in %s" % (count, len(result_dirs), FLAGS.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
