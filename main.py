"""Train and evaluate Matrix Capsules with EM Routing (Hinton, Sabour, Frosst, ICLR 2018) on MNIST.

  python main.py                                      # train the paper network, new dir under ./results
  python main.py --preset small --max_steps 200       # a short run of the 68K-parameter network
  python main.py --preset small --batch_size 32 --max_steps 3900   # the 20-minute CPU recipe (README)
  python main.py --result_dir DIR                     # resume the run in DIR from its latest checkpoint
  python main.py --test True --result_dir DIR         # evaluate DIR's latest checkpoint on 10,000 images

Exit codes: 0 done (also after Ctrl-C / SIGTERM, which save a checkpoint first); 2 bad flags, data or
result dir (one line on stderr); 3 a non-finite loss or gradient stopped training (no checkpoint of it
is written; the last good one stays the latest).
"""

import contextlib
import os


@contextlib.contextmanager
def quiet_native_stderr():
    """Sends file descriptor 2 to /dev/null for a while.

    TensorFlow's C++ start-up lines (CUDA probing, oneDNN notice) are written before its logging is
    initialised and ignore TF_CPP_MIN_LOG_LEVEL; without this, every one-line error would come with
    four lines of noise.
    """
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Set before TensorFlow is imported. oneDNN: decided by measurement (README, performance); it is off by
# default on CPUs without AVX-512/AMX, so set it explicitly for the same behaviour everywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
with quiet_native_stderr():
    import tensorflow.compat.v1 as tf  # noqa: E402

    tf.config.list_physical_devices()  # device probing, which logs a CUDA line on machines without a GPU
from absl import flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model as capsnet  # noqa: E402
import plots  # noqa: E402
import runtime  # noqa: E402
from data import idx, mnist, pipeline as data_pipeline  # noqa: E402

FLAGS = flags.FLAGS

# ---- model -----------------------------------------------------------------------------------------
flags.DEFINE_string("preset", "paper", "Network size: 'paper' (A=B=C=D=32, 3 iterations) or 'small' "
                    "(A=64, B=8, C=D=16, 2 iterations).")
flags.DEFINE_string("padding", None, "Padding of the conv and conv-capsule layers: VALID or SAME "
                    "(default: the preset's, VALID).")
flags.DEFINE_string("hparams", "", "Comma-separated name=value overrides of any HParams field of model.py, "
                    "e.g. 'weight_stddev=0.3,beta_a_init=-0.5'; applied after the preset and the flags below.")
# ---- routing ---------------------------------------------------------------------------------------
flags.DEFINE_string("routing", None, "Routing form: 'paper' (the paper's equations) or 'official' (the authors' "
                    "released code: activation form, damped means, per-type normaliser, their inits and lambda); "
                    "applied after the preset, before the flags below (default: the preset's).")
flags.DEFINE_integer("iterations", None, "EM routing iterations, >= 1 (default: the preset's).")
flags.DEFINE_float("final_lambda", None, "Final inverse temperature of the conv-capsule layers; "
                   "lambda_i = final * (1 - 0.95^(i+1)) (default: the preset's).")
flags.DEFINE_float("class_final_lambda", None, "Final inverse temperature of the class layer (default: the "
                   "preset's).")
# ---- optimisation ----------------------------------------------------------------------------------
flags.DEFINE_integer("batch_size", 64, "Images per training step, > 0.")
flags.DEFINE_float("learning_rate", None, "Initial Adam learning rate, > 0 (default: the preset's).")
flags.DEFINE_float("lr_decay_rate", None, "Learning-rate decay factor per --lr_decay_steps (default: the "
                   "preset's).")
flags.DEFINE_integer("lr_decay_steps", None, "Steps per learning-rate decay, >= 0 (0: the whole run; default: "
                     "the preset's).")
flags.DEFINE_float("weight_decay", None, "L2 weight-decay coefficient (default: the preset's).")
flags.DEFINE_string("margin_schedule", None, "Spread-loss margin schedule: 'sigmoid' (official code), "
                    "'linear' or 'constant' (0.2 throughout) (default: the preset's).")
flags.DEFINE_integer("margin_ramp_steps", None, "Steps of the margin ramp from 0.2 to 0.9, >= 0 (0: the whole "
                     "run; default: the preset's).")
# ---- data ------------------------------------------------------------------------------------------
flags.DEFINE_string("data_dir", os.path.join(".", "data", "mnist"), "Folder of the four MNIST IDX files "
                    "(.gz or raw); they are downloaded and SHA-256-verified when missing.")
flags.DEFINE_integer("validation_size", 5000, "Training images held out for per-epoch validation, >= 0.")
flags.DEFINE_integer("max_shift", 0, "Augmentation: every training image is moved by up to this many pixels along "
                     "each axis, zeros filling in (0: none; validation and test images never are).")
flags.DEFINE_integer("seed", 1, "Random seed for initialisation, the validation split and shuffling.")
# ---- run -------------------------------------------------------------------------------------------
flags.DEFINE_string("result_dir", None, "Run folder (flags, checkpoints, summaries, plots). Default when "
                    "training: a new timestamped folder under ./results; an existing run is resumed.")
flags.DEFINE_string("test", "False", "True: evaluate --result_dir's latest checkpoint on the test set; "
                    "False: train.")
flags.DEFINE_integer("epochs", 10, "Training epochs (ignored when --max_steps is set).")
flags.DEFINE_integer("max_steps", None, "Stop after this many training steps in total (global step).")
flags.DEFINE_integer("save_every_steps", 500, "Checkpoint interval in steps, > 0.")
flags.DEFINE_integer("summary_every_steps", 50, "TensorBoard summary and curve interval in steps, > 0.")
flags.DEFINE_integer("threads", 0, "CPU threads, >= 0 (0: every core). With micro-batches each thread runs one "
                     "micro-batch at a time; without, every op uses them all.")
flags.DEFINE_integer("micro_batch_size", 0, "Images per micro-batch, >= 0 (0: no split): the batch is computed in "
                     "parts of this size side by side on the CPU threads; same results. See the README's "
                     "performance section before using it.")

# This program's flags (absl and TensorFlow define more of their own, which are not saved with a run).
PROGRAM_FLAGS = tuple(flag.name for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]))

# Flags that define the architecture, the optimisation or the data of a run: a resumed run must keep them.
RUN_DEFINING_FLAGS = ("preset", "routing", "hparams", "padding", "iterations", "final_lambda", "class_final_lambda",
                      "batch_size", "learning_rate", "lr_decay_rate", "lr_decay_steps", "weight_decay",
                      "margin_schedule", "margin_ramp_steps", "data_dir", "validation_size", "max_shift", "seed")
# Flags that test mode takes from the command line; the others come from the run's flags.json.
TEST_FLAGS = ("data_dir", "threads", "micro_batch_size")
# Flags that say which run test mode evaluates.
TEST_MODE_FLAGS = ("test", "result_dir")
# Flags that set where a run ends (--max_steps, when given, wins over --epochs).
RUN_LENGTH_FLAGS = ("epochs", "max_steps")
# Flags that override a field of the preset's HParams when given.
HPARAM_FLAGS = ("padding", "iterations", "final_lambda", "class_final_lambda", "learning_rate", "lr_decay_rate",
                "lr_decay_steps", "weight_decay", "margin_schedule", "margin_ramp_steps")

FLAGS_FILE = "flags.json"
HISTORY_FILE = "history.json"
RESULTS_FILE = "test_results.json"
CHECKPOINT_PREFIX = "model.ckpt"
EXIT_USAGE = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED_AT_START = 130  # the shell's code for a SIGINT-ended command
MAX_CHECKPOINTS = 3
EVAL_BATCH_SIZE = 100
SAMPLE_IMAGES = 100  # digits in the test-sample picture
BOOLEAN_WORDS = {"true": True, "false": False}


class UsageError(Exception):
    """Bad flags or result dir: printed as one line, exit code 2."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: save and exit 0."""


# ---- flags and the run directory ----------------------------------------------------------------------


def parse_bool(value):
    """'True'/'False' (any case) -> bool; anything else is a ValueError (Python's bool('False') is True)."""
    if value.lower() not in BOOLEAN_WORDS:
        raise ValueError(value)
    return BOOLEAN_WORDS[value.lower()]


def parse_test_flag(value):
    """--test's value as a bool; anything but True/False (any case) is a usage error."""
    try:
        return parse_bool(value)
    except ValueError:
        raise UsageError("--test must be True or False, got %r" % value) from None


def validate_flags(values):
    """Checks flag values that TensorFlow would only reject with a traceback."""
    positive = ("batch_size", "save_every_steps", "summary_every_steps", "learning_rate", "epochs", "max_steps")
    for name in positive:
        if values.get(name) is not None and values[name] <= 0:
            raise UsageError("--%s must be > 0, got %r" % (name, values[name]))
    if values["preset"] not in capsnet.PRESETS:
        raise UsageError("--preset must be one of %s, got %r" % ("/".join(sorted(capsnet.PRESETS)), values["preset"]))
    if values.get("routing") not in (None,) + tuple(capsnet.ROUTING_FORMS):
        raise UsageError("--routing must be one of %s, got %r" % ("/".join(capsnet.ROUTING_FORMS), values["routing"]))
    if values.get("padding") is not None and values["padding"] not in ("VALID", "SAME"):
        raise UsageError("--padding must be VALID or SAME, got %r" % values["padding"])
    if values.get("iterations") is not None and values["iterations"] < 1:
        raise UsageError("--iterations must be >= 1, got %r" % values["iterations"])
    if values.get("margin_schedule") not in (None, "sigmoid", "linear", "constant"):
        raise UsageError("--margin_schedule must be sigmoid, linear or constant, got %r" % values["margin_schedule"])
    parse_hparams(values.get("hparams") or "")
    if values["validation_size"] < 0:
        raise UsageError("--validation_size must be >= 0, got %r" % values["validation_size"])
    if not 0 <= values["max_shift"] < mnist.IMAGE_SIZE:
        raise UsageError("--max_shift must be in 0..%d, got %r" % (mnist.IMAGE_SIZE - 1, values["max_shift"]))
    for name in ("threads", "micro_batch_size", "lr_decay_steps", "margin_ramp_steps"):
        if values.get(name) is not None and values[name] < 0:
            raise UsageError("--%s must be >= 0, got %r" % (name, values[name]))


def parse_hparams(text):
    """'name=value,name=value' -> {name: value}, each value converted to the HParams field's type."""
    types = {field.name: field.type for field in dataclasses.fields(capsnet.HParams)}
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in types:
            raise UsageError("--hparams: unknown hyperparameter %r (see HParams in model.py)" % name)
        try:
            converter = parse_bool if types[name] is bool else types[name]
            overrides[name] = converter(value.strip())
        except ValueError:
            raise UsageError("--hparams: %s=%r is not a valid %s" % (name, value, types[name].__name__)) from None
    return overrides


def resolve_hparams(values):
    """The preset's HParams with every given hyperparameter flag, then --hparams, applied."""
    overrides = {name: values[name] for name in HPARAM_FLAGS if values.get(name) is not None}
    overrides.update(parse_hparams(values.get("hparams") or ""))
    return capsnet.hparams_for(values["preset"], values.get("routing"), **overrides)


def read_run_hparams(result_dir, values):
    """The HParams saved in DIR/flags.json when the run started (its schedules' lengths included), so that
    later changes to a preset never change a saved run. A field the file lacks (the run predates it) takes
    its value from the run's flags `values`."""
    saved = _read_run_file(result_dir, "hparams")
    fields = {field.name for field in dataclasses.fields(capsnet.HParams)}
    return dataclasses.replace(resolve_hparams(values), **{name: saved[name] for name in fields & set(saved)})


def run_length(values, train_size):
    """(steps per epoch, the run's last step) for `train_size` training images."""
    steps_per_epoch = -(-train_size // values["batch_size"])
    return steps_per_epoch, values["max_steps"] or values["epochs"] * steps_per_epoch


def write_json_atomically(path, payload):
    """Writes JSON through a temporary file and a rename, so a crash never leaves half a file."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(temporary, path)


def _read_run_file(result_dir, section):
    """One section ('flags' or 'hparams') of DIR/flags.json (UsageError when absent or unreadable)."""
    path = os.path.join(result_dir, FLAGS_FILE)
    try:
        with open(path) as f:
            values = json.load(f)[section]
        if not isinstance(values, dict):
            raise TypeError("'%s' is not a name -> value mapping" % section)
        return values
    except FileNotFoundError:
        raise UsageError("%s holds no %s: not a run directory of this program" % (result_dir, FLAGS_FILE)) from None
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError("%s is unreadable: %s" % (path, error)) from None


def read_run_flags(result_dir):
    """The flag values saved in DIR/flags.json (UsageError when absent, unreadable or invalid)."""
    saved = _read_run_file(result_dir, "flags")
    path = os.path.join(result_dir, FLAGS_FILE)
    try:
        # A run saved before a flag existed lacks it; every flag's default is what runs before it did.
        for name in PROGRAM_FLAGS:
            saved.setdefault(name, FLAGS[name].default)
        validate_flags(saved)  # the file may have been edited by hand
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError("%s is unreadable: %s" % (path, error)) from None
    except UsageError as error:
        raise UsageError("%s: %s" % (path, error)) from None
    return saved


def new_result_dir():
    """A fresh timestamped folder under ./results."""
    base = os.path.join(".", "results", time.strftime("%Y%m%d-%H%M%S"))
    path, suffix = base, 1
    while os.path.exists(path):
        suffix += 1
        path = "%s-%d" % (base, suffix)
    return path


def training_run_flags(values, given):
    """Flags of the run to train: new ones, or the saved ones of the run being resumed.

    Args:
      values: this command's flag values (a dict).
      given: names of the flags given on this command line.

    Returns:
      (result_dir, flag values to train with, resumed?).
    """
    result_dir = values["result_dir"] or new_result_dir()
    if os.path.exists(result_dir) and not os.path.isdir(result_dir):
        raise UsageError("--result_dir %s exists and is not a folder" % result_dir)
    if not os.path.exists(os.path.join(result_dir, FLAGS_FILE)):
        if os.path.isdir(result_dir) and os.listdir(result_dir):
            raise UsageError("%s is not empty and holds no %s: refusing to write a run into it"
                             % (result_dir, FLAGS_FILE))
        return result_dir, values, False
    saved = read_run_flags(result_dir)
    for name in RUN_DEFINING_FLAGS:
        if name in given and values[name] != saved.get(name):
            raise UsageError("--%s=%s conflicts with the run saved in %s (%s=%s); drop the flag to resume"
                             % (name, values[name], result_dir, name, saved.get(name)))
    # Run flags given on this command replace the saved ones; the others keep the run's values, so that
    # `--result_dir DIR` alone continues to the run's own end. --epochs and --max_steps set the end together.
    overrides = given - set(RUN_DEFINING_FLAGS)
    if overrides & set(RUN_LENGTH_FLAGS):
        overrides |= set(RUN_LENGTH_FLAGS)
    merged = dict(saved)
    merged.update({name: values[name] for name in overrides})
    merged["result_dir"] = result_dir
    return result_dir, merged, True


# ---- graph and session --------------------------------------------------------------------------------

def new_model(hparams, values):
    """The model, split into the micro-batches --micro_batch_size asks for at --batch_size."""
    micro_batches = runtime.micro_batches_for(values["batch_size"], values["micro_batch_size"])
    return capsnet.CapsNetEMModel(hparams, micro_batches)


def new_session(threads, model):
    """A session on `threads` CPU threads (0: every core), set up for `model`'s micro-batches."""
    return tf.Session(config=runtime.session_config(threads, model.micro_batches))


def restore_latest(sess, saver, result_dir):
    """Restores DIR's latest checkpoint; returns its path (UsageError when there is none or it mismatches)."""
    checkpoint = tf.train.latest_checkpoint(result_dir)
    if checkpoint is None:
        raise UsageError("%s holds no checkpoint" % result_dir)
    try:
        saver.restore(sess, checkpoint)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as error:
        first_line = str(error.message).strip().splitlines()[0]
        raise UsageError("checkpoint %s does not match the architecture in %s: %s"
                         % (checkpoint, FLAGS_FILE, first_line[:200])) from None
    return checkpoint


def predict_all(sess, pipeline, predictions, images, labels):
    """Predictions `[n]` for every image of `images` `[n, 28, 28]` (no remainder dropped), and the labels."""
    sess.run(pipeline.eval_iterator.initializer, {pipeline.images_in: images, pipeline.labels_in: labels})
    all_predictions, all_labels = [], []
    while True:
        try:
            batch_predictions, batch_labels = sess.run([predictions, pipeline.eval_labels])
        except tf.errors.OutOfRangeError:
            break
        all_predictions.append(batch_predictions)
        all_labels.append(batch_labels)
    return np.concatenate(all_predictions), np.concatenate(all_labels)


# ---- training -------------------------------------------------------------------------------------------


class _TrainingRun:
    """The state of one training process: session, graph, saver, history and the loop over steps."""

    def __init__(self, values, result_dir, sess, graph, eval_predictions, pipeline, data):
        self.values, self.result_dir, self.sess, self.graph, self.pipeline = values, result_dir, sess, graph, pipeline
        self.eval_predictions = eval_predictions
        self.train_x, self.train_y, self.val_x, self.val_y = data
        self.batch_size = values["batch_size"]
        self.steps_per_epoch, self.max_steps = run_length(values, len(self.train_x))
        self.saver = tf.train.Saver(max_to_keep=MAX_CHECKPOINTS)
        self.writer = tf.summary.FileWriter(result_dir)
        self.history = self._load_history()
        self.stop_signals = []
        self._checkpoint_step = None  # step of the last checkpoint this process wrote

    def _load_history(self):
        path = os.path.join(self.result_dir, HISTORY_FILE)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {"step": [], "loss": [], "train_accuracy": [], "val_step": [], "val_accuracy": []}

    def save(self, step):
        """A checkpoint (TF writes it to temporary files and renames, then updates 'checkpoint' atomically),
        the history and the training-curve picture. A step already checkpointed (a periodic save that
        falls on an epoch end or the last step) is not written twice."""
        if step != self._checkpoint_step:
            self.saver.save(self.sess, os.path.join(self.result_dir, CHECKPOINT_PREFIX), global_step=step,
                            write_meta_graph=False)
            self._checkpoint_step = step
        write_json_atomically(os.path.join(self.result_dir, HISTORY_FILE), self.history)
        if self.history["step"]:
            plots.plot_training_curves(self.history, os.path.join(self.result_dir, "training_curves.png"))

    def _on_signal(self, signum, frame):
        self.stop_signals.append(signum)

    def run(self, step):
        """Trains from `step` to max_steps, validating at every epoch end; returns the last step."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self.sess.run(self.pipeline.train_iterator.initializer,
                      {self.pipeline.images_in: self.train_x, self.pipeline.labels_in: self.train_y})
        while step < self.max_steps:
            step = self._train_epoch(step)
            if step % self.steps_per_epoch == 0 or step >= self.max_steps:
                self._validate(step)
            self.save(step)
        return step

    def _train_epoch(self, step):
        """Trains to the end of the current epoch (or max_steps), saving every --save_every_steps."""
        epoch, per_epoch = step // self.steps_per_epoch, self.steps_per_epoch
        end = min(self.max_steps, (epoch + 1) * per_epoch)
        graph = self.graph
        fetches = [graph.train_op, graph.loss, graph.accuracy, graph.global_step]
        with tqdm(total=end - epoch * per_epoch, initial=step - epoch * per_epoch, desc="epoch %d" % (epoch + 1),
                  unit="step", dynamic_ncols=True) as bar:
            while step < end:
                if self.stop_signals:
                    raise Interrupted()
                summarise = (step + 1) % self.values["summary_every_steps"] == 0
                started = time.time()
                results = self.sess.run(fetches + ([graph.summary_op] if summarise else []))
                elapsed = time.time() - started
                _, loss, accuracy, step = results[:4]
                if summarise:
                    self._record(results[4], step, loss, accuracy)
                if step % self.values["save_every_steps"] == 0:
                    self.save(step)
                bar.set_postfix(loss="%.4f" % loss, acc="%.3f" % accuracy, img_s="%.0f" % (self.batch_size / elapsed))
                bar.update(1)
        return step

    def _record(self, summary, step, loss, accuracy):
        self.writer.add_summary(summary, step)
        self.history["step"].append(int(step))
        self.history["loss"].append(float(loss))
        self.history["train_accuracy"].append(float(accuracy))

    def _validate(self, step):
        if len(self.val_x) == 0:
            return
        predictions, labels = predict_all(self.sess, self.pipeline, self.eval_predictions, self.val_x, self.val_y)
        accuracy = float(np.mean(predictions == labels))
        self.history["val_step"].append(int(step))
        self.history["val_accuracy"].append(accuracy)
        summary = tf.Summary(value=[tf.Summary.Value(tag="accuracy/validation", simple_value=accuracy)])
        self.writer.add_summary(summary, step)
        tqdm.write("step %d: validation accuracy %.2f%% on %d images" % (step, 100 * accuracy, len(labels)))


def train(values, result_dir, resumed):
    """Trains (or resumes) the run in `result_dir`; returns the exit code."""
    hparams = read_run_hparams(result_dir, values) if resumed else resolve_hparams(values)
    mnist.ensure(values["data_dir"])
    images, labels = mnist.load(values["data_dir"], "train")
    if values["validation_size"] >= len(images):
        raise UsageError("--validation_size must be smaller than the %d training images in %s, got %d"
                         % (len(images), values["data_dir"], values["validation_size"]))
    data = data_pipeline.split_train_validation(images, labels, values["validation_size"], values["seed"])
    hparams = runtime.with_run_length(hparams, run_length(values, len(data[0]))[1])  # a new run's schedules
    os.makedirs(result_dir, exist_ok=True)
    write_json_atomically(os.path.join(result_dir, FLAGS_FILE),
                          {"flags": values, "hparams": dataclasses.asdict(hparams)})
    tf.set_random_seed(values["seed"])
    pipeline = data_pipeline.build_pipeline(hparams, values["batch_size"], EVAL_BATCH_SIZE, values["seed"],
                                            values["max_shift"])
    model = new_model(hparams, values)
    graph = model.train(pipeline.train_images, pipeline.train_labels)
    with tf.variable_scope(tf.get_variable_scope(), reuse=True):  # the same variables, on evaluation batches
        eval_predictions = model.inference(pipeline.eval_images).predictions
    with new_session(values["threads"], model) as sess:
        sess.run(tf.global_variables_initializer())
        run = _TrainingRun(values, result_dir, sess, graph, eval_predictions, pipeline, data)
        if resumed and tf.train.latest_checkpoint(result_dir):
            restore_latest(sess, run.saver, result_dir)
        else:
            run.writer.add_graph(sess.graph)
        step = int(sess.run(graph.global_step))
        print("%s %s at step %d of %d (%d steps per epoch, batch %d, %d parameters)"
              % ("resuming" if step else "training into", result_dir, step, run.max_steps, run.steps_per_epoch,
                 run.batch_size, capsnet.count_parameters(tf.trainable_variables())))
        try:
            step = run.run(step)
        except Interrupted:
            step = int(sess.run(graph.global_step))
            run.save(step)
            print("interrupted: saved step %d in %s; run main.py --result_dir %s to resume"
                  % (step, result_dir, result_dir))
            return 0
        except tf.errors.InvalidArgumentError as error:
            message = str(error.message)
            if "check_numerics" not in message and "NaN" not in message and "Inf" not in message:
                raise
            step = int(sess.run(graph.global_step))
            write_json_atomically(os.path.join(result_dir, HISTORY_FILE), run.history)
            print("error: non-finite value at step %d: %s; training stopped, no variable was updated and the "
                  "last good checkpoint is kept" % (step + 1, message.strip().splitlines()[0][:200]), file=sys.stderr)
            return EXIT_NON_FINITE
    print("finished at step %d; checkpoints in %s" % (step, result_dir))
    return 0


# ---- test -----------------------------------------------------------------------------------------------


def check_test_flags(result_dir, given):
    """UsageError unless `given` (the flags on the command line) suit `--test True` on `result_dir`.

    Test mode evaluates the latest checkpoint with the settings of the run's flags.json, so any other
    flag (run-defining like --iterations, or training-only like --max_steps) would be ignored without a
    word: it is refused instead.
    """
    if not result_dir:
        raise UsageError("--test True needs --result_dir DIR of a trained run")
    ignored = sorted(given - set(TEST_FLAGS) - set(TEST_MODE_FLAGS))
    if ignored:
        raise UsageError("--%s has no effect with --test True: the network and its settings come from %s; "
                         "drop the flag" % (ignored[0], os.path.join(result_dir, FLAGS_FILE)))


def test(result_dir, overrides):
    """Evaluates DIR's latest checkpoint on all 10,000 test images; writes JSON and pictures.

    `overrides` maps TEST_FLAGS given on the command line to their values; every other flag is the run's.
    """
    if not os.path.isdir(result_dir):
        raise UsageError("--result_dir %s does not exist" % result_dir)
    values = dict(read_run_flags(result_dir), **overrides)
    if tf.train.latest_checkpoint(result_dir) is None:
        raise UsageError("%s holds no checkpoint" % result_dir)
    hparams = read_run_hparams(result_dir, values)
    data_dir = values["data_dir"]
    mnist.ensure(data_dir)
    images, labels = mnist.load(data_dir, "test")
    pipeline = data_pipeline.build_pipeline(hparams, EVAL_BATCH_SIZE, EVAL_BATCH_SIZE, values["seed"])
    tf.train.get_or_create_global_step()
    model = new_model(hparams, values)
    inference = model.inference(pipeline.eval_images)
    saver = tf.train.Saver()
    with new_session(values["threads"], model) as sess:
        checkpoint = restore_latest(sess, saver, result_dir)
        global_step = int(sess.run(tf.train.get_global_step()))
        predictions, true_labels = predict_all(sess, pipeline, inference.predictions, images, labels)
    return report_test(result_dir, checkpoint, global_step, predictions, true_labels, images, hparams.num_classes)


def report_test(result_dir, checkpoint, global_step, predictions, labels, images, num_classes):
    """Prints and writes test accuracy, error, per-class accuracy and the confusion matrix."""
    matrix = plots.confusion_matrix(labels, predictions, num_classes)
    per_class = (np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)).tolist()
    accuracy = float(np.mean(predictions == labels))
    results = {"accuracy": accuracy, "error": 1.0 - accuracy, "n": int(len(labels)), "per_class": per_class,
               "checkpoint": checkpoint, "global_step": global_step, "confusion_matrix": matrix.tolist()}
    write_json_atomically(os.path.join(result_dir, RESULTS_FILE), results)
    plots.plot_confusion_matrix(matrix, os.path.join(result_dir, "confusion_matrix.png"))
    plots.plot_sample_grid(images[:SAMPLE_IMAGES], labels[:SAMPLE_IMAGES],
                           os.path.join(result_dir, "test_samples.png"), predictions[:SAMPLE_IMAGES])
    print("test accuracy %.2f%% (error %.2f%%) on %d images, checkpoint %s (step %d)"
          % (100 * accuracy, 100 * (1 - accuracy), len(labels), checkpoint, global_step))
    print("per-class accuracy: " + " ".join("%d:%.2f%%" % (c, 100 * a) for c, a in enumerate(per_class)))
    return 0


# ---- entry point -----------------------------------------------------------------------------------------


def main(argv):
    """Parses flags, then trains or tests; every bad input becomes one line on stderr and exit code 2."""
    try:
        try:
            remaining = FLAGS(argv)
        except flags.Error as error:
            raise UsageError(str(error).splitlines()[0]) from None
        if len(remaining) > 1:
            raise UsageError("unexpected arguments: %s (flags take the form --name=value)" % " ".join(remaining[1:]))
        values = {name: FLAGS[name].value for name in PROGRAM_FLAGS}
        values["data_dir"] = os.path.abspath(values["data_dir"])  # saved runs work from any folder
        testing = parse_test_flag(values["test"])
        validate_flags(values)
        tf.get_logger().setLevel("ERROR")
        tf.disable_v2_behavior()
        given = {name for name in PROGRAM_FLAGS if FLAGS[name].present}
        if testing:
            check_test_flags(values["result_dir"], given)
            return test(values["result_dir"], {name: values[name] for name in TEST_FLAGS if name in given})
        result_dir, run_values, resumed = training_run_flags(values, given)
        return train(run_values, result_dir, resumed)
    except (UsageError, idx.DataError) as error:
        print("error: %s" % error, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C before training started (during start-up): nothing to save
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED_AT_START


if __name__ == "__main__":
    sys.exit(main(sys.argv))
