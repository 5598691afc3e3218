"""Train and evaluate Matrix Capsules with EM Routing (Hinton, Sabour, Frosst, ICLR 2018) on MNIST.

  python main.py                                      # train the paper network, new dir under ./results
  python main.py --preset small --max_steps 200       # a short run of the 68K-parameter network
  python main.py --preset small --batch_size 32 --max_steps 3900   # the 20-minute CPU recipe (README)
  python main.py --result_dir DIR                     # resume the run in DIR from its latest checkpoint
  python main.py --test True --result_dir DIR         # evaluate DIR's latest checkpoint on 10,000 images

Exit codes: 0 done (also after Ctrl-C / SIGTERM during training, which save a checkpoint first); 2 bad
flags, data or result dir (one line on stderr); 3 a non-finite loss or gradient stopped training (no
checkpoint of it is written; the last good one stays the latest); 130 Ctrl-C before training started or
during an evaluation (nothing written).
"""

import contextlib
import os

from run.progress import quiet_native_stderr  # no TensorFlow there: it quiets TensorFlow's import below

# Set before TensorFlow is imported. oneDNN: decided by measurement (docs/performance.md); it is off by
# default on CPUs without AVX-512/AMX, so set it explicitly for the same behaviour everywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import dataclasses  # noqa: E402
import sys  # noqa: E402


with quiet_native_stderr():
    import tensorflow.compat.v1 as tf  # noqa: E402

    tf.config.list_physical_devices()  # device probing, which logs a CUDA line on machines without a GPU
from absl import flags  # noqa: E402

import capsule_ops  # noqa: E402
from run import attacks  # noqa: E402
from run import cluster  # noqa: E402
import data  # noqa: E402
import model as capsnet  # noqa: E402
from run import run_dir  # noqa: E402
from run import runtime  # noqa: E402
from run import test_mode  # noqa: E402
from run import training  # noqa: E402
from data import idx, pipeline as data_pipeline  # noqa: E402
from run.run_dir import UsageError  # noqa: E402

FLAGS = flags.FLAGS
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(capsnet.HParams)}
_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_hparam_flags(helps):
    """One flag per HParams field in `helps` ({field: help}), typed like the field, default None (the
    preset's value); returns their names. The flag group is declared once, here, and nowhere else."""
    for name, help_text in helps.items():
        _DEFINE[_FIELD_TYPES[name]](name, None, help_text + " (default: the preset's).")
    return tuple(helps)


# ---- model (each flag's full meaning: the README's flags table) ------------------------------------
flags.DEFINE_string(
    "preset", "paper", "'paper' (A=B=C=D=32, 3 iterations), 'small' (A=64, B=8, C=D=16) or 'small_search'."
)
flags.DEFINE_string(
    "routing", None, "Routing form: 'paper', 'official' or 'official-activation' (hparams.py); default: the preset's."
)
flags.DEFINE_string("hparams", "", "name=value,... overrides of any HParams field (hparams.py), applied last.")
MODEL_HPARAMS = define_hparam_flags(
    {"model": "Network: 'capsules' or 'cnn' (the paper's baseline CNN)", "padding": "Conv padding: VALID or SAME"}
)
# ---- routing ---------------------------------------------------------------------------------------
ROUTING_HPARAMS = define_hparam_flags(
    {
        "iterations": "EM routing iterations, >= 1",
        "final_lambda": "Final inverse temperature of the conv-capsule layers; lambda_i = final * (1 - 0.95^(i+1))",
        "class_final_lambda": "Final inverse temperature of the class layer",
    }
)
# ---- optimisation ----------------------------------------------------------------------------------
flags.DEFINE_integer("batch_size", None, "Images per training step, > 0 (default: the preset's; paper 32, others 64).")
OPTIMISATION_HPARAMS = define_hparam_flags(
    {
        "learning_rate": "Initial Adam learning rate, > 0",
        "lr_decay_rate": "Learning-rate decay factor per --lr_decay_steps",
        "lr_decay_steps": "Steps per learning-rate decay, >= 0 (0: the whole run)",
        "lr_decay_epochs": "Epochs per learning-rate decay, >= 0, in place of --lr_decay_steps (0: its steps)",
        "weight_decay": "L2 weight-decay coefficient",
        "margin_schedule": "Spread-loss margin schedule: 'sigmoid' (official code), 'linear' or 'constant' (0.2)",
        "margin_ramp_steps": "Steps of the margin ramp from 0.2 to 0.9, >= 0 (0: the whole run)",
    }
)
# ---- data ------------------------------------------------------------------------------------------
flags.DEFINE_string("dataset", "mnist", "Dataset: " + ", ".join(data.DATASETS) + ".")
flags.DEFINE_string("data_dir", None, "The dataset's files, downloaded and verified when missing (./data/<dataset>).")
flags.DEFINE_string("viewpoint_split", "none", "smallNORB novel viewpoints: 'azimuth', 'elevation' or 'none'.")
flags.DEFINE_integer("norb_channels", 1, "smallNORB: 1 (the first image of each stereo pair) or 2 (both).")
flags.DEFINE_integer(
    "validation_size", None, "Training images held out for per-epoch validation, >= 0 (default: the dataset's)."
)
flags.DEFINE_integer("max_shift", 0, "Augmentation: training images moved by up to N pixels per axis (0: none).")
flags.DEFINE_integer("crop", 0, "Augmentation: train on random N x N crops, test on the centre one (0: none).")
flags.DEFINE_float("max_rotation", 0.0, "Augmentation: training images turned by up to N degrees (0: none).")
flags.DEFINE_integer("seed", 1, "Random seed for initialisation, the validation split and shuffling.")
# ---- run -------------------------------------------------------------------------------------------
flags.DEFINE_string("result_dir", None, "Run folder; default when training: new under ./results; a run is resumed.")
flags.DEFINE_string("test", "False", "True: evaluate --result_dir's latest checkpoint on the test set; False: train.")
flags.DEFINE_integer("epochs", 10, "Training epochs (ignored when --max_steps is set).")
flags.DEFINE_integer("max_steps", None, "Stop after this many training steps in total (global step).")
flags.DEFINE_integer("save_every_steps", 500, "Checkpoint interval in steps, > 0.")
flags.DEFINE_integer("summary_every_steps", 50, "TensorBoard summary and curve interval in steps, > 0.")
flags.DEFINE_integer("threads", 0, "CPU threads, >= 0 (0: every core).")
flags.DEFINE_string(
    "routing_kernel",
    "auto",
    "Routing's vote passes: 'auto' (the fused C++ op when it builds and no GPU is visible, else TF ops), "
    "'fused' (CPU only: a usage error with a GPU visible) or 'tf'.",
)
flags.DEFINE_integer("micro_batch_size", 0, "Images per micro-batch, >= 0 (0: no split; docs/performance.md).")
flags.DEFINE_integer("eval_batch_size", 100, "Images per evaluation batch (validation and test mode), > 0.")
flags.DEFINE_integer("sweep_images", 1000, "Test mode: images of the -1/+1/+2 iteration sweep, >= 0 (0: none).")
flags.DEFINE_integer("multi_crop", 1, "Test mode: class activations averaged over N views (centre, shifts), 1..13.")
flags.DEFINE_string(
    "output_dir", None, "Test mode: folder of its report (default: the run's; ./results/<name> if shipped)."
)
flags.DEFINE_integer("test_images", 0, "Test mode: evaluate the first N test images, >= 0 (0: all).")
flags.DEFINE_bool("quiet", False, "Plain progress lines instead of bars (also when stderr is not a terminal).")
# ---- adversarial attacks (test mode, paper section 6; attacks.py) ----------------------------------------
flags.DEFINE_string("attack", "none", "Test mode: 'fgsm' or 'bim' from the network's own loss, or 'none'.")
flags.DEFINE_string("epsilons", "0.01,0.02,0.05,0.1,0.2,0.3", "Attack L-infinity radii >= 0, in input units.")
flags.DEFINE_string("attack_target", "none", "'none' (untargeted), 'random' or 'least_likely' target class.")
flags.DEFINE_integer("bim_steps", 10, "BIM iterations, >= 1.")
flags.DEFINE_float("bim_step_size", None, "BIM step per iteration, > 0 (default: 1.25 * epsilon / bim_steps).")
flags.DEFINE_integer("attack_images", 1000, "Attack the first N test images, >= 1.")
flags.DEFINE_string("attack_transfer_from", None, "Black-box: adversarial images from this run's network.")
flags.DEFINE_float("attack_margin", None, "Capsules: spread-loss margin of the attack, > 0 (default: the run's).")
# ---- devices and cluster (cluster.py; README "Beyond one device") ---------------------------------------------
flags.DEFINE_integer("num_devices", 1, "Towers: the batch split over N GPUs (or logical CPUs without GPUs), >= 1.")
flags.DEFINE_string("ps_hosts", "", "Cluster: parameter servers, host:port,... (empty: no cluster; or TF_CONFIG).")
flags.DEFINE_string("worker_hosts", "", "Cluster: workers, host:port,...; worker 0 is the chief.")
flags.DEFINE_string("job_name", "", "Cluster: this process's job, 'ps' or 'worker'.")
flags.DEFINE_integer("task_index", 0, "Cluster: this process's index in its job, >= 0.")
flags.DEFINE_bool("async", False, "Cluster: each worker updates on its own (default: synchronous, global batch W x N).")
flags.DEFINE_integer("startup_timeout_s", 120, "Cluster: seconds to wait for the ps and the chief at start, > 0.")

# This program's flags (absl and TensorFlow define more of their own, which are not saved with a run).
PROGRAM_FLAGS = tuple(flag.name for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]))
# Flags that override a field of the preset's HParams when given.
HPARAM_FLAGS = MODEL_HPARAMS + ROUTING_HPARAMS + OPTIMISATION_HPARAMS
# Flags that define the architecture, the optimisation or the data of a run: a resumed run must keep them.
RUN_DEFINING_FLAGS = (
    ("preset", "routing", "hparams")
    + HPARAM_FLAGS
    + ("batch_size", "dataset", "norb_channels", "viewpoint_split", "validation_size", "max_shift", "seed")
    + ("crop", "max_rotation")
)  # not --data_dir: where the files lie (checked against their SHA-256) may differ from machine to machine
ATTACK_FLAGS = ("attack", "epsilons", "attack_target", "bim_steps", "bim_step_size", "attack_images")
ATTACK_FLAGS += ("attack_transfer_from", "attack_margin")  # every test-mode flag of the attacks group
# Flags that test mode takes from its command line (with --test and --result_dir); the rest come from flags.json.
TEST_FLAGS = ("test", "result_dir", "data_dir", "threads", "routing_kernel", "micro_batch_size", "eval_batch_size")
TEST_FLAGS += ("sweep_images", "multi_crop", "quiet", "output_dir", "test_images") + ATTACK_FLAGS
# Flags that set where a run ends (--max_steps, when given, wins over --epochs).
RUN_LENGTH_FLAGS = ("epochs", "max_steps")
POSITIVE_FLAGS = ("batch_size", "save_every_steps", "summary_every_steps", "epochs", "max_steps", "eval_batch_size")
POSITIVE_FLAGS += ("num_devices", "startup_timeout_s")
NON_NEGATIVE_FLAGS = ("validation_size", "threads", "micro_batch_size", "sweep_images", "test_images")
HELP_ARGUMENTS = ("-h", "--help", "--helpshort", "--helpfull")
EXIT_USAGE = 2
EXIT_NON_FINITE = training.EXIT_NON_FINITE
EXIT_INTERRUPTED = 130  # the shell's code for a SIGINT-ended command
NORB_CHANNELS = (1, 2)  # --norb_channels: one image of each stereo pair, or both
VIEWPOINT_SPLITS = ("none", "azimuth", "elevation")
MAX_CROPS = 13  # the authors' multi-crop test: the centre view and 12 diagonal shifts


# ---- flags -------------------------------------------------------------------------------------------


def parse_test_flag(value):
    """--test's value as a bool; anything but True/False (any case) is a usage error."""
    try:
        return capsnet.parse_bool(value)
    except ValueError:
        raise UsageError("--test must be True or False, got %r" % value) from None


def resolve_hparams(values):
    """The preset, then --routing, the dataset's image and class sizes, every given hyperparameter flag, then
    --hparams: validated HParams."""
    for name, choices in (("preset", capsnet.PRESETS), ("routing", capsnet.ROUTING_FORMS)):
        if values.get(name) is not None and values[name] not in choices:
            raise UsageError("--%s must be one of %s, got %r" % (name, "/".join(choices), values[name]))
    spec = data.get(values["dataset"])  # the dataset sets what the network sees and tells apart
    channels = values["norb_channels"] if values["dataset"] in data.PREPROCESSED else spec.channels
    size = values.get("crop") or spec.image_size  # --crop: the network sees the crops
    overrides = dict(image_size=size, image_channels=channels, num_classes=spec.num_classes)
    overrides.update({name: values[name] for name in HPARAM_FLAGS if values.get(name) is not None})
    if "lr_decay_steps" in overrides and "lr_decay_epochs" not in overrides:
        overrides["lr_decay_epochs"] = 0.0  # a decay interval given in steps replaces the preset's in epochs
    overrides["routing_kernel"] = values.get("routing_kernel") or capsnet.HParams.routing_kernel
    try:
        capsule_ops.check_choice(overrides["routing_kernel"])
    except capsule_ops.KernelChoiceError as error:
        raise UsageError("--routing_kernel: %s" % error) from None
    try:
        hparams = capsnet.hparams_for(values["preset"], values.get("routing"), **overrides)
    except ValueError as error:  # a flag's value: HParams names the field, which is the flag's name
        raise UsageError("--%s" % error) from None
    text = values.get("hparams") or ""
    named = {item.partition("=")[0].strip() for item in text.split(",")}
    if "lr_decay_steps" in named and "lr_decay_epochs" not in named:
        text += ",lr_decay_epochs=0"  # as for the flag: steps given replace the preset's epochs
    try:
        return hparams.parse(text).validate()
    except ValueError as error:
        raise UsageError("--hparams: %s" % error) from None


def validate_flags(values):
    """Checks the run's flag values (UsageError naming the flag); the hyperparameters are HParams' to check."""
    for name in POSITIVE_FLAGS:
        if values.get(name) is not None and values[name] <= 0:
            raise UsageError("--%s must be > 0, got %r" % (name, values[name]))
    for name in NON_NEGATIVE_FLAGS:
        if (values.get(name) or 0) < 0:
            raise UsageError("--%s must be >= 0, got %r" % (name, values[name]))
    if values["dataset"] not in data.DATASETS:
        raise UsageError("--dataset must be one of %s, got %r" % ("/".join(data.DATASETS), values["dataset"]))
    if values["viewpoint_split"] not in VIEWPOINT_SPLITS or (
        values["viewpoint_split"] != "none" and values["dataset"] not in data.PREPROCESSED
    ):
        raise UsageError("--viewpoint_split must be none, or azimuth/elevation with --dataset smallnorb")
    if not 1 <= values["multi_crop"] <= MAX_CROPS:
        raise UsageError("--multi_crop must be in 1..%d, got %r" % (MAX_CROPS, values["multi_crop"]))
    if values["norb_channels"] not in NORB_CHANNELS:
        raise UsageError("--norb_channels must be 1 or 2, got %r" % values["norb_channels"])
    try:
        data.check_augmentation(values["dataset"], values["max_shift"], values["crop"], values["max_rotation"])
    except ValueError as error:
        raise UsageError(str(error)) from None
    attacks.check_flags(values)
    runtime.check_towers(values["batch_size"], values["num_devices"], resolve_hparams(values).model)


def flag_defaults():
    """{flag: default} of this program's flags: what a run saved before a flag existed gets for it."""
    return {name: FLAGS[name].default for name in PROGRAM_FLAGS}


def run_hparams(result_dir, values):
    """The network of the run in `result_dir`: its saved HParams (fields it predates from its flags), with this
    process's --routing_kernel (how the routing is computed, not what: same numerics, so any run takes any)."""
    fresh = resolve_hparams(values)
    return dataclasses.replace(run_dir.read_hparams(result_dir, fresh), routing_kernel=fresh.routing_kernel)


# ---- graph and session ------------------------------------------------------------------------------


def describe(hparams, values):
    """The network in a few words, for header lines."""
    if hparams.model == "cnn":
        return "the baseline CNN (paper section 5)"
    network = (values["preset"], hparams.routing, hparams.iterations, capsule_ops.resolve(hparams.routing_kernel))
    return "preset %s, routing %s, %d iterations, %s routing kernel" % network


# ---- training -------------------------------------------------------------------------------------------


def build_training(values, hparams, role):
    """(pipeline, model, training graph, evaluation predictions, cluster.Synchronizer or None), placed on `role`."""
    sync = cluster.synchronizer(role, values["async"]) if role else None
    with cluster.placement(role) if role else contextlib.nullcontext():
        sizes = [values[name] for name in ("batch_size", "eval_batch_size", "seed", "max_shift")]
        crop_from = data.get(values["dataset"]).image_size if values["crop"] else 0  # the fed training images
        pipeline = data_pipeline.build_for(values["dataset"], hparams, *sizes, crop_from, values["max_rotation"])
        model = runtime.new_model(hparams, runtime.micro_batches_for(values["batch_size"], values["micro_batch_size"]))
        distribution = capsnet.Distribution(runtime.tower_devices(values["num_devices"]), sync)
        graph = model.train(pipeline.train_images, pipeline.train_labels, distribution)
        eval_predictions = model.inference(pipeline.eval_images).predictions  # the same variables
    return pipeline, model, graph, eval_predictions, sync


def train(values, result_dir, resumed, monitor=None, role=None):
    """Trains (or resumes) the run in `result_dir`; returns the exit code.

    `monitor` (a `training.Monitor`, for tools such as search.py) adds validations between epoch ends and receives
    each accuracy; main.py's own command passes none. `role` (a `cluster.Role`) trains as a worker of a cluster.
    """
    hparams = run_hparams(result_dir, values) if resumed else resolve_hparams(values)
    arrays, epoch_size = cluster.share(training.training_data(values), role, values["async"])
    steps_per_epoch, max_steps = training.run_length(values, epoch_size)
    hparams = runtime.with_run_length(hparams, max_steps, epoch_size / values["batch_size"])  # schedules in steps
    start = run_dir.latest_checkpoint(result_dir)[1] if resumed else 0
    sizes = (len(arrays[0]), len(arrays[2]))
    header = (result_dir, start, max_steps, steps_per_epoch, values["batch_size"], values["dataset"]) + sizes
    print(
        "%s %s at step %d of %d (%d steps per epoch, batch %d; %s: %d training, %d validation images; %s)"
        % (("resuming" if start else "training into",) + header + (describe(hparams, values),)),
        flush=True,
    )
    tf.set_random_seed(values["seed"])
    pipeline, model, graph, eval_predictions, sync = build_training(values, hparams, role)
    intervals = (values["save_every_steps"], values["summary_every_steps"], values["quiet"])
    schedule = training.Schedule(values["batch_size"], steps_per_epoch, max_steps, *intervals)
    if role:
        parts = (graph, pipeline, eval_predictions, arrays, schedule, sync)
        return cluster.train(role, parts, values, lambda: run_dir.write_run(result_dir, values, hparams))
    with runtime.new_session(values["threads"], model.micro_batches, values["num_devices"]) as sess:
        sess.run(tf.global_variables_initializer())
        run_dir.write_run(result_dir, values, hparams)  # the first file of a new run: after start-up
        run = training.TrainingRun(result_dir, sess, graph, eval_predictions, pipeline, arrays, schedule, monitor)
        if start:
            run_dir.restore_latest(sess, run.saver, result_dir)
        else:
            run.writer.add_graph(sess.graph)
        parameters = capsnet.count_parameters(tf.trainable_variables())
        print("%d parameters; training from step %d" % (parameters, start), flush=True)
        return run_training(run, sess, graph, result_dir, start)


def run_training(run, sess, graph, result_dir, step):
    """The loop of `run` from `step`, with Ctrl-C and non-finite values turned into their exits."""
    try:
        step = run.run(step)
    except training.Interrupted:
        step = int(sess.run(graph.global_step))
        run.save(step)
        print(
            "interrupted: saved step %d in %s; run main.py --result_dir %s to resume" % (step, result_dir, result_dir)
        )
        return 0
    except capsnet.NonFiniteError as error:
        step = int(sess.run(graph.global_step))
        run_dir.write_json_atomically(os.path.join(result_dir, run_dir.HISTORY_FILE), run.history)
        print(
            "error: non-finite value at step %d: %s; training stopped, no variable was updated and the last good "
            "checkpoint is kept" % (step + 1, error),
            file=sys.stderr,
        )
        return EXIT_NON_FINITE
    print("finished at step %d; checkpoints in %s" % (step, result_dir))
    return 0


def training_run_flags(values, given):
    """(result_dir, flag values to train with, resumed?): new flags, or the saved ones of the run to resume."""
    result_dir = values["result_dir"] or run_dir.new_result_dir()
    if not run_dir.check_new_or_resumable(result_dir):
        return result_dir, dict(values, result_dir=result_dir), False
    saved = run_dir.read_flags(result_dir, flag_defaults(), validate_flags)
    merged = run_dir.merge_resumed_flags(
        saved, dict(values, result_dir=result_dir), given, RUN_DEFINING_FLAGS, RUN_LENGTH_FLAGS
    )
    data_dir = run_dir.data_dir_for(saved, values["data_dir"] if "data_dir" in given else None)
    return result_dir, dict(merged, result_dir=result_dir, data_dir=data_dir), True


# ---- test -----------------------------------------------------------------------------------------------


def tested_run_flags(result_dir, overrides):
    """The flag values test mode evaluates `result_dir` with: the run's, `overrides`, the data found here."""
    saved = run_dir.read_flags(result_dir, flag_defaults(), validate_flags)
    found = run_dir.data_dir_for(saved, overrides.get("data_dir"))
    return dict(saved, **dict(overrides, data_dir=found))  # --data_dir given or not: the folder found


def test(result_dir, overrides):
    """Evaluates DIR's latest checkpoint on the test set (test_mode.py); writes JSON and pictures.

    `overrides` maps TEST_FLAGS given on the command line to their values; every other flag is the run's, and
    the data folder `run_dir.data_dir_for`'s (the run's own where it is on this machine).
    """
    values = tested_run_flags(result_dir, overrides)
    test_mode.latest_checkpoint(result_dir)  # a run without a checkpoint is refused before the data is read
    hparams = run_hparams(result_dir, values)
    source = None
    if values["attack_transfer_from"]:  # a bad transfer run is refused before any evaluation
        source_dir = values["attack_transfer_from"]
        if not os.path.isdir(source_dir):
            raise UsageError("--attack_transfer_from %s does not exist" % source_dir)
        source_values = tested_run_flags(source_dir, overrides)
        source = test_mode.attack_source(
            source_dir, source_values, run_hparams(source_dir, source_values), values, hparams
        )
    images, labels = training.load_split(values, "test")
    if values["test_images"]:
        images, labels = images[: values["test_images"]], labels[: values["test_images"]]
    return test_mode.evaluate(result_dir, values, hparams, images, labels, describe(hparams, values), source)


# ---- entry point -----------------------------------------------------------------------------------------


def parse_command_line(argv):
    """(flag values, names of the flags given, testing?) from `argv` (UsageError for bad ones)."""
    try:
        remaining = FLAGS(argv)
    except flags.Error as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if len(remaining) > 1:
        raise UsageError("unexpected arguments: %s (flags take the form --name=value)" % " ".join(remaining[1:]))
    values = {name: FLAGS[name].value for name in PROGRAM_FLAGS}
    given_dir = values["data_dir"]
    values["data_dir"] = os.path.abspath(given_dir) if given_dir else run_dir.default_data_dir(values["dataset"])
    if values["batch_size"] is None:
        values["batch_size"] = capsnet.batch_size_for(values["preset"])
    if values["validation_size"] is None and values["dataset"] in data.DATASETS:  # a bad dataset: validate_flags
        values["validation_size"] = data.get(values["dataset"]).validation_size  # MNIST 5,000, smallNORB 0
    testing = parse_test_flag(values["test"])
    validate_flags(values)
    return values, {name for name in PROGRAM_FLAGS if FLAGS[name].present}, testing


def main(argv):
    """Parses flags, then trains or tests; every bad input becomes one line on stderr and exit code 2."""
    if any(argument in HELP_ARGUMENTS for argument in argv[1:]):
        print(FLAGS.module_help(sys.modules[__name__]))
        return 0
    testing = False
    try:
        values, given, testing = parse_command_line(argv)
        tf.get_logger().setLevel("ERROR")
        tf.disable_v2_behavior()
        if testing:
            run_dir.check_test_flags(values["result_dir"], given, TEST_FLAGS)
            overrides = {name: values[name] for name in TEST_FLAGS if name in given}
            return test(values["result_dir"], overrides)
        role = cluster.join(values, os.environ.get(cluster.TF_CONFIG))  # with its server started
        if role and role.job_name == "ps":
            return cluster.run_ps(role)
        if role and not cluster.is_chief(role):  # the other workers train with this command's flags, write nothing
            return train(values, values["result_dir"], False, role=role)
        result_dir, run_values, resumed = training_run_flags(values, given)
        return train(run_values, result_dir, resumed, role=role)
    except (UsageError, idx.DataError) as error:
        print("error: %s" % error, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C during start-up or an evaluation: nothing was written
        stage = "during the evaluation" if testing else "before training started"
        print("interrupted %s; nothing was written" % stage, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
