"""Throughput benchmark of CapsNetEMModel on random MNIST-shaped input (no dataset needed).

  python bench.py --preset small --mode train --batch_size 64
  python bench.py --preset paper --mode infer --batch_size 64 --profile
  python bench.py --preset small --mode train --batch_size 64 --compare   # fused vs tf routing kernel
  python bench.py --preset small --mode both --batch_size 64             # inference vs training, interleaved
  python bench.py --preset paper --hparams assignment_gradient=false    # any HParams field, as main.py's

Prints one human-readable row and one JSON line: preset, batch_size, mode, images_per_sec (median),
step_ms (min/median/max), peak_rss_mb, flops_per_image (forward pass, see `forward_flops`), threads,
the machine's measured fp32 matmul rate and the achieved fraction of it; for the fused kernels their roofline
(`fused_kernel_work`: FLOPs and bytes per image, their rates over the step and, with --profile, within the
fused ops' own traced time against the measured matmul rate and `reduce_sum` bandwidth).
`--compare` builds the network twice, with the fused and the TF-ops routing kernel (capsule_ops), times their
steps interleaved (so load on the machine hits both alike), prints a row for each, the ratio of their median
steps, and a JSON line for each; peak RSS is then the process's, for both graphs together. `--mode both` does
the same for a training and an inference graph (with `--compare`, four graphs) and prints inference's rate
over training's.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as main.py; docs/performance.md

import collections  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow.compat.v1 as tf  # noqa: E402
from absl import flags  # noqa: E402

import capsule_layers as cl  # noqa: E402
import capsule_ops  # noqa: E402
import model as capsnet  # noqa: E402
from run import runtime  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "Network preset: paper or small.")
flags.DEFINE_integer("batch_size", 64, "Images per step.")
flags.DEFINE_string(
    "mode", "train", "train (forward + loss + backward + Adam update), infer (forward only), or both (interleaved)."
)
flags.DEFINE_integer("steps", 10, "Timed steps (>= 10 for the docs/performance.md figures).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (graph optimisation, allocator warm-up).")
flags.DEFINE_integer("threads", 0, "CPU threads (0: every core); as main.py's --threads.")
flags.DEFINE_integer("micro_batch_size", 0, "Images per micro-batch (0: no split); as main.py's --micro_batch_size.")
flags.DEFINE_integer("iterations", None, "Routing iterations (default: the preset's).")
flags.DEFINE_string("routing", None, "Routing form: paper or official (default: the preset's); as main.py's.")
flags.DEFINE_string("hparams", "", "name=value,... overrides of any HParams field, applied last; as main.py's.")
flags.DEFINE_string("routing_kernel", "auto", "Routing kernel: auto, fused or tf (capsule_ops); as main.py's.")
flags.DEFINE_bool(
    "compare", False, "Time the fused and the tf routing kernel in one run, interleaved; print the ratio."
)
flags.DEFINE_bool("xla", False, "Turn on XLA auto-clustering (global_jit_level ON_1).")
flags.DEFINE_bool("profile", False, "Trace one extra step and print the 12 most expensive op types.")

MATMUL_SIZE = 2048  # square fp32 matmul used to measure the machine's attainable rate
MATMUL_REPEATS = 10
BANDWIDTH_FLOATS = 64 * 2**20  # a 256 MiB float32 tensor for the memory-bandwidth measurement
FLOAT_BYTES = 4
KIB_PER_MIB = 1024.0
MS_PER_S = 1000.0
TOP_OPS = 12
FLOPS_PER_MAC = 2
# Routing cost per vote entry (one of 16 per child-parent pair), counted from the M- and E-step code:
# M-step r*V, sum, V-mu, square, r*(V-mu)^2, sum = 6; E-step (V-mu)^2 / var, sum = 2.
M_STEP_FLOPS_PER_ENTRY = 6
E_STEP_FLOPS_PER_ENTRY = 2
TRAIN_FLOP_FACTOR = 3  # backward ~ 2x forward
KERNEL_FLOPS_PER_ENTRY = 5  # a fused pass per vote entry: centre, multiply, two multiply-adds (kernels.cc)
TRANSPOSED_PRODUCTS = 2  # the routing backward's dL/dM = g W^T and dL/dW = M^T g per pair
# The op types that `fused_kernel_work` counts (each also in its FromFactors form); not the normaliser.
FUSED_VOTE_OPS = ("CapsCentredSums", "CapsWeightedSums", "CapsQuadraticForms", "CapsRoutingVotesBackward")
VOTE_MACS = cl.POSE_SIZE**3  # a 4x4 by 4x4 product: 64 multiply-adds
PRIMARY_OUTPUTS_PER_TYPE = cl.POSE_ENTRIES + 1  # a primary capsule: 16 pose entries and 1 activation


def _primary_grid(hp):
    """(height, width) of the primary capsules' grid, as `capsule_layers.conv_geometry` computes it."""
    height, width, _, _ = cl.conv_geometry(hp.image_size, hp.image_size, hp.conv1_kernel, hp.conv1_stride, hp.padding)
    height, width, _, _ = cl.conv_geometry(height, width, hp.primary_kernel, 1, hp.padding)
    return height, width


def routed_pairs(hp):
    """Child-parent pairs per image of each routed layer (conv_caps1, conv_caps2, class_caps): votes / 16."""
    height, width = _primary_grid(hp)
    types, pairs = hp.primary_types, []
    for out_types, kernel, stride in [
        (hp.conv_caps1_types, hp.conv_caps1_kernel, hp.conv_caps1_stride),
        (hp.conv_caps2_types, hp.conv_caps2_kernel, hp.conv_caps2_stride),
    ]:
        height, width, _, _ = cl.conv_geometry(height, width, kernel, stride, hp.padding)
        pairs.append(height * width * kernel**2 * types * out_types)
        types = out_types
    return pairs + [height * width * types * hp.num_classes]


def forward_flops(hp):
    """Approximate forward FLOPs per image: convolutions, votes (4x4 @ 4x4 = 64 MACs) and routing.

    Grid sizes follow `capsule_layers.conv_geometry`, so 'SAME' padding is counted too.
    """
    conv1_height, conv1_width, _, _ = cl.conv_geometry(
        hp.image_size, hp.image_size, hp.conv1_kernel, hp.conv1_stride, hp.padding
    )
    flops = FLOPS_PER_MAC * conv1_height * conv1_width * hp.conv1_kernel**2 * hp.image_channels * hp.conv1_filters
    height, width = _primary_grid(hp)
    primary_macs = height * width * hp.primary_kernel**2 * hp.conv1_filters * hp.primary_types
    flops += FLOPS_PER_MAC * primary_macs * PRIMARY_OUTPUTS_PER_TYPE
    routing_per_entry = hp.iterations * M_STEP_FLOPS_PER_ENTRY + (hp.iterations - 1) * E_STEP_FLOPS_PER_ENTRY
    per_pair = FLOPS_PER_MAC * VOTE_MACS + cl.POSE_ENTRIES * routing_per_entry  # votes, then routing
    return flops + sum(routed_pairs(hp)) * per_pair


def fused_kernel_work(hp, mode):
    """(FLOPs, bytes) per image of the fused routing kernels (capsule_ops), which recompute every vote.

    Per child-parent pair and pass: the vote M W (VOTE_MACS multiply-adds), then the pass's arithmetic over its
    16 entries (KERNEL_FLOPS_PER_ENTRY), reading or writing one per-child value (r, a gradient, or a log
    numerator: FLOAT_BYTES); poses and weights stay in cache. Forward: `iterations` centred sums and
    `iterations - 1` quadratic forms. Training adds one pass more per forward pass (the sums' gradient is a
    quadratic form, the forms' a weighted sum) and the routing backward: the vote, the k = 2 iterations - 1
    rank-k gradient factors (2 multiply-adds of 16 lanes each, one per-child read each) and the two transposed
    4x4 products for dL/dM and dL/dW.
    """
    pairs = sum(routed_pairs(hp))
    forward_passes = hp.iterations + (hp.iterations - 1)
    per_pass = FLOPS_PER_MAC * VOTE_MACS + cl.POSE_ENTRIES * KERNEL_FLOPS_PER_ENTRY
    flops, passes = forward_passes * per_pass, forward_passes
    if mode == "train":
        uses = forward_passes  # k of the rank-k votes gradient
        backward = FLOPS_PER_MAC * VOTE_MACS * (1 + TRANSPOSED_PRODUCTS) + cl.POSE_ENTRIES * FLOPS_PER_MAC * 2 * uses
        flops, passes = 2 * flops + backward, 2 * passes + uses
    return pairs * flops, pairs * passes * FLOAT_BYTES


def measure_bandwidth(threads):
    """Bytes/s of a `reduce_sum` over a tensor far larger than the caches: the attainable memory read rate."""
    with tf.Graph().as_default():
        a = tf.Variable(tf.random.uniform([BANDWIDTH_FLOATS]))
        seconds = _median_seconds(a, tf.reduce_sum(a), threads)
    return BANDWIDTH_FLOATS * FLOAT_BYTES / seconds


def measure_matmul_rate(threads):
    """fp32 FLOP/s of a square matmul on `threads` cores (0: all): the attainable peak of docs/performance.md."""
    with tf.Graph().as_default():
        a = tf.Variable(tf.random.normal([MATMUL_SIZE, MATMUL_SIZE]))
        seconds = _median_seconds(a, tf.reduce_sum(tf.matmul(a, a)), threads)
    return FLOPS_PER_MAC * MATMUL_SIZE**3 / seconds


def _median_seconds(variable, fetch, threads):
    """Median seconds of `MATMUL_REPEATS` runs of `fetch` after initialising `variable` and one warm-up run."""
    with tf.Session(config=runtime.session_config(threads, micro_batches=1)) as sess:
        sess.run(variable.initializer)
        sess.run(fetch)
        times = []
        for _ in range(MATMUL_REPEATS):
            started = time.perf_counter()
            sess.run(fetch)
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def top_ops(run_metadata, count=TOP_OPS):
    """(op type, total ms) of the most expensive op types in one traced step."""
    totals = collections.Counter()
    for device in run_metadata.step_stats.dev_stats:
        for node in device.node_stats:
            op_type = node.timeline_label.split("(")[0].split(" = ")[-1].strip() or node.node_name
            totals[op_type] += node.all_end_rel_micros / MS_PER_S
    return totals.most_common(count)


def build(net, batch_size, mode):
    hp = net.hparams
    images = tf.Variable(
        tf.random.uniform([batch_size, hp.image_size, hp.image_size, hp.image_channels]),
        trainable=False,
        name="bench_images",
    )
    labels = tf.Variable(
        tf.random.uniform([batch_size], maxval=hp.num_classes, dtype=tf.int64), trainable=False, name="bench_labels"
    )
    if mode == "train":
        graph = net.train(images, labels)
        return [graph.train_op, graph.loss]
    return [net.inference(images).activations]


# One network to time: its routing kernel, model, session and the fetches of one step.
Runner = collections.namedtuple("Runner", ["key", "net", "session", "fetches"])  # key: (kernel, mode)


def make_runner(hp, kernel, mode, config):
    """The network with routing kernel `kernel`, built for `mode`, in its own graph and an initialised session."""
    graph = tf.Graph()
    with graph.as_default():
        hp = dataclasses.replace(hp, routing_kernel=kernel)
        net = capsnet.CapsNetEMModel(hp, runtime.micro_batches_for(FLAGS.batch_size, FLAGS.micro_batch_size))
        fetches = build(net, FLAGS.batch_size, mode)
        initializer = tf.global_variables_initializer()
    session = tf.Session(graph=graph, config=config)
    session.run(initializer)
    return Runner((net.layers[-1].routing_kernel, mode), net, session, fetches)


def time_steps(runners):
    """Warm-up, then FLAGS.steps timed steps of each runner in turn: ({key: step times in s}, peak RSS in MB,
    {key: a traced step's metadata} when profiling)."""
    for _ in range(FLAGS.warmup):
        for runner in runners:
            runner.session.run(runner.fetches)
    times = {runner.key: [] for runner in runners}
    for _ in range(FLAGS.steps):
        for runner in runners:
            started = time.perf_counter()
            runner.session.run(runner.fetches)
            times[runner.key].append(time.perf_counter() - started)
    metadata = {}
    for runner in runners if FLAGS.profile else ():
        metadata[runner.key] = tf.RunMetadata()
        options = tf.RunOptions(trace_level=tf.RunOptions.FULL_TRACE)
        runner.session.run(runner.fetches, options=options, run_metadata=metadata[runner.key])
    return times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB, metadata


def report(hp, net, key, times, peak_rss_mb, rates, kernel_ms=None):
    """The benchmark's row and its JSON fields for `key` (kernel, mode); `rates`: the machine's (matmul FLOP/s,
    memory bytes/s); `kernel_ms`: the fused ops' time in a traced step (--profile), or None."""
    (kernel, mode), (matmul_rate, bandwidth) = key, rates
    median = float(np.median(times))
    images_per_sec = FLAGS.batch_size / median
    kernel_flops, kernel_bytes = fused_kernel_work(hp, mode)
    flops = forward_flops(hp)
    factor = TRAIN_FLOP_FACTOR if mode == "train" else 1
    result = {
        "preset": FLAGS.preset,
        "batch_size": FLAGS.batch_size,
        "mode": mode,
        "iterations": hp.iterations,
        "routing": hp.routing,
        "hparams": FLAGS.hparams,
        "routing_kernel": kernel,
        "images_per_sec": round(images_per_sec, 2),
        "step_ms": {
            k: round(MS_PER_S * v, 1) for k, v in (("min", min(times)), ("median", median), ("max", max(times)))
        },
        "peak_rss_mb": round(peak_rss_mb, 1),
        "flops_per_image": flops,
        "threads": FLAGS.threads or os.cpu_count(),
        "micro_batch_size": FLAGS.micro_batch_size,
        "micro_batches": net.micro_batches,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "xla": FLAGS.xla,
        "matmul_gflops": round(matmul_rate / 1e9, 1),
        "fraction_of_matmul_rate": round(flops * factor * images_per_sec / matmul_rate, 4),
        "memory_gbps": round(bandwidth / 1e9, 1),
    }
    if kernel == "fused":  # the roofline of the fused kernels: their FLOPs and bytes at the step's rate
        result["kernel_flops_per_image"] = kernel_flops
        result["kernel_bytes_per_image"] = kernel_bytes
        result["kernel_gflops"] = round(kernel_flops * images_per_sec / 1e9, 2)
        result["kernel_gbps"] = round(kernel_bytes * images_per_sec / 1e9, 2)
    if kernel_ms:  # the same within the fused ops' own traced time: is a kernel compute- or memory-bound?
        seconds = kernel_ms / MS_PER_S
        result["kernel_ms"] = round(kernel_ms, 1)
        result["kernel_fraction_of_matmul_rate"] = round(kernel_flops * FLAGS.batch_size / seconds / matmul_rate, 3)
        result["kernel_fraction_of_bandwidth"] = round(kernel_bytes * FLAGS.batch_size / seconds / bandwidth, 4)
    print(_row(result, flops))
    return result


def _row(result, flops):
    """The human-readable line of one `report` result."""
    traffic = ""
    if "kernel_gflops" in result:
        traffic = ", fused kernels %.1f GFLOP/s and %.2f GB/s over the step (reduce_sum %.1f GB/s)" % (
            result["kernel_gflops"],
            result["kernel_gbps"],
            result["memory_gbps"],
        )
    if "kernel_ms" in result:
        traffic += "; in their own %.0f ms: %.1f%% of the matmul rate, %.2f%% of the bandwidth" % (
            result["kernel_ms"],
            100 * result["kernel_fraction_of_matmul_rate"],
            100 * result["kernel_fraction_of_bandwidth"],
        )
    step = result["step_ms"]
    return (
        "%s %s batch %d in %d micro-batches: %.1f img/s, step %.0f ms (min %.0f, max %.0f), "
        "peak RSS %.0f MB, %.1f MFLOP/img, %.1f%% of %.0f GFLOP/s, %s routing kernel%s"
        % (
            result["preset"],
            result["mode"],
            result["batch_size"],
            result["micro_batches"],
            result["images_per_sec"],
            step["median"],
            step["min"],
            step["max"],
            result["peak_rss_mb"],
            flops / 1e6,
            100 * result["fraction_of_matmul_rate"],
            result["matmul_gflops"],
            result["routing_kernel"],
            traffic,
        )
    )


def benchmark_hparams():
    """The preset, --routing, --iterations and --hparams as one validated HParams; SystemExit with one line."""
    overrides = {"iterations": FLAGS.iterations} if FLAGS.iterations else {}
    try:
        return capsnet.hparams_for(FLAGS.preset, FLAGS.routing, **overrides).parse(FLAGS.hparams).validate()
    except ValueError as error:
        raise SystemExit("error: %s" % error) from None


def main(argv):
    if len(argv) > 1:
        raise SystemExit("error: unexpected arguments %s" % argv[1:])
    if FLAGS.mode not in ("train", "infer", "both"):
        raise SystemExit("error: --mode must be train, infer or both")
    tf.disable_v2_behavior()
    hp = runtime.with_run_length(benchmark_hparams(), FLAGS.warmup + FLAGS.steps)
    rates = measure_matmul_rate(FLAGS.threads), measure_bandwidth(FLAGS.threads)  # first, on an idle process
    config = runtime.session_config(FLAGS.threads, runtime.micro_batches_for(FLAGS.batch_size, FLAGS.micro_batch_size))
    if FLAGS.xla:
        config.graph_options.optimizer_options.global_jit_level = tf.OptimizerOptions.ON_1
    kernels = ["fused", "tf"] if FLAGS.compare else [capsule_ops.resolve(FLAGS.routing_kernel)]
    modes = ["train", "infer"] if FLAGS.mode == "both" else [FLAGS.mode]
    runners = [make_runner(hp, kernel, mode, config) for kernel in kernels for mode in modes]
    times, peak_rss_mb, metadata = time_steps(runners)
    results = []
    for runner in runners:
        ops = top_ops(metadata[runner.key], count=None) if metadata else []
        kernel_ms = sum(ms for op_type, ms in ops if op_type.startswith(FUSED_VOTE_OPS)) or None
        results.append(report(hp, runner.net, runner.key, times[runner.key], peak_rss_mb, rates, kernel_ms))
        for op_type, ms in ops[:TOP_OPS]:
            print("  %-28s %8.1f ms" % (op_type, ms))
    median = {key: float(np.median(value)) for key, value in times.items()}
    for mode, result in zip(modes, results) if FLAGS.compare else ():  # the fused runners come first
        result["speedup_over_tf"] = round(median[("tf", mode)] / median[("fused", mode)], 3)
        print(
            "fused / tf, %s: %.2fx the images per second (median steps, interleaved)"
            % (mode, median[("tf", mode)] / median[("fused", mode)])
        )
    for kernel in kernels if FLAGS.mode == "both" else ():
        print(
            "%s kernel: inference %.2fx the images per second of training (median steps, interleaved)"
            % (kernel, median[(kernel, "train")] / median[(kernel, "infer")])
        )
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main(FLAGS(sys.argv))
