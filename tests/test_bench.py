"""End-to-end test of bench.py: one tiny timed run, its JSON line and its FLOP count.

bench.py's figures themselves (docs/performance.md) come from runs on an idle machine, not from here.
"""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO_ROOT, "bench.py")
_SUBPROCESS_TIMEOUT_S = 300
# Keys issue 5 asks of the JSON line, plus the run's settings.
_REQUIRED_KEYS = {
    "preset",
    "batch_size",
    "mode",
    "images_per_sec",
    "step_ms",
    "peak_rss_mb",
    "flops_per_image",
    "threads",
    "micro_batch_size",
    "micro_batches",
    "matmul_gflops",
    "fraction_of_matmul_rate",
}


def _small_forward_flops(iterations=2):
    """Forward FLOPs of one `small` image counted by hand (bench.py's docstring formula).

    conv1 12x12 outputs * 25 taps * 64 filters; primary caps 12x12 * 64 inputs * 8 types * 17 outputs;
    each routed layer's child-parent pairs * (2 * 64 vote FLOPs + 16 entries * (M-steps * 6 + E-steps * 2)),
    with M-steps = iterations and E-steps = iterations - 1.
    """
    per_pair = 2 * 64 + 16 * (iterations * 6 + (iterations - 1) * 2)
    pairs = 5 * 5 * 3 * 3 * 8 * 16 + 3 * 3 * 3 * 3 * 16 * 16 + 3 * 3 * 16 * 10  # conv_caps1, conv_caps2, class
    return 2 * 12 * 12 * 25 * 64 + 2 * 12 * 12 * 64 * 8 * 17 + pairs * per_pair


def _bench(*arguments):
    """bench.py run with `arguments` on a 2-image batch, 1 timed step: the finished process."""
    command = [sys.executable, BENCH, "--preset", "small", "--batch_size", "2", "--steps", "1", "--warmup", "1"]
    return subprocess.run(
        command + list(arguments), capture_output=True, text=True, timeout=_SUBPROCESS_TIMEOUT_S, cwd=REPO_ROOT
    )


def test_hparams_reach_the_benchmarked_network():
    """--hparams overrides an HParams field of the timed network (3 routing iterations: 3 M-steps' FLOPs)."""
    result = _bench("--mode", "infer", "--hparams", "iterations=3,assignment_gradient=false")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["iterations"], report["hparams"]) == (3, "iterations=3,assignment_gradient=false")
    assert report["flops_per_image"] == _small_forward_flops(iterations=3)


def test_bad_hparams_is_one_line():
    """An unknown --hparams field ends bench.py with one line naming it, no traceback."""
    result = _bench("--hparams", "no_such_field=1")
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: unknown hyperparameter 'no_such_field' (see HParams in hparams.py)"
    )
    assert "Traceback" not in result.stderr


def test_tiny_run_prints_a_row_and_json():
    """A 2-image, 1-step training benchmark in 2 micro-batches prints its row and a complete JSON line."""
    result = _bench("--micro_batch_size", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    row, json_line = result.stdout.strip().splitlines()[-2:]
    assert row.startswith("small train batch 2 in 2 micro-batches: ")
    report = json.loads(json_line)
    assert _REQUIRED_KEYS <= set(report)
    assert (report["preset"], report["batch_size"], report["mode"], report["micro_batches"]) == ("small", 2, "train", 2)
    assert report["images_per_sec"] > 0 and report["peak_rss_mb"] > 0
    assert report["step_ms"]["min"] <= report["step_ms"]["median"] <= report["step_ms"]["max"]
    assert report["flops_per_image"] == _small_forward_flops()
