"""The cluster mode of main.py (cluster.py): parameter servers and workers on TensorFlow's own runtime.

The cluster tests run 1 parameter server and 2 workers as three `python main.py` subprocesses on 127.0.0.1 with
free ports, on tiny generated data and a tiny network; every wait is bounded, and every process still running when
its test ends is killed. The flag and TF_CONFIG checks run in-process.
"""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import tensorflow.compat.v1 as tf

from run import cluster
import main
from test_main import MAIN, main_env, run_main, write_tiny_mnist

# A tiny network of the small preset's form, batch 4 per worker: 40 training images per worker (96 - 16 held out).
_TINY = [
    "--preset",
    "small",
    "--batch_size",
    "4",
    "--validation_size",
    "16",
    "--hparams",
    "conv1_filters=8,primary_types=4,conv_caps1_types=4,conv_caps2_types=4",
    "--quiet",
]
_WORKERS = 2
_MAX_STEPS = 4  # global steps of the clean run
_ENDLESS_STEPS = 100000  # the run whose worker is killed: ended by SIGTERM once the restarted worker trains
_STEPPED = r"training: .*loss="  # a progress line: the process has run a training step
_STARTUP_TIMEOUT_S = 120  # main.py's wait for the ps and the chief (the three processes start on two busy cores)
_LOG_TAIL = 2500  # characters of each process's output that a failure shows
_PROCESS_TIMEOUT_S = 300  # the longest a cluster process may run before the test fails
_UNREACHABLE_TIMEOUT_S = 2  # the worker's wait for a ps that is not there
_POLL_S = 0.2


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_flags(ps, workers):
    """The cluster flags for one ps at `ps` and `workers` (host:port strings)."""
    return ["--ps_hosts", ps, "--worker_hosts", ",".join(workers), "--startup_timeout_s", str(_STARTUP_TIMEOUT_S)]


class LocalCluster:
    """Processes of main.py started in `workspace`, each with its log file; `stop()` kills what still runs."""

    def __init__(self, workspace, args):
        self.workspace, self.args = workspace, args
        self.processes, self.logs = {}, {}

    def start(self, name, job, index):
        """Starts `main.py ARGS --job_name job --task_index index`, its output in `name`.log."""
        self.logs[name] = os.path.join(self.workspace, name + ".log")
        with open(self.logs[name], "w") as log:
            command = [sys.executable, MAIN] + self.args + ["--job_name", job, "--task_index", str(index)]
            self.processes[name] = subprocess.Popen(
                command, cwd=self.workspace, env=main_env(), stdout=log, stderr=subprocess.STDOUT
            )

    def output(self, name):
        """What process `name` has written so far."""
        with open(self.logs[name]) as f:
            return f.read()

    def outputs(self):
        """The end of every process's output, each under its name."""
        return "\n".join("%s: %s" % (name, self.output(name)[-_LOG_TAIL:]) for name in self.logs)

    def wait_for(self, name, pattern):
        """Waits until `name`'s output matches `pattern` (AssertionError after the process timeout)."""
        deadline = time.time() + _PROCESS_TIMEOUT_S
        while not re.search(pattern, self.output(name)):
            assert time.time() < deadline, "no %r from %s:\n%s" % (pattern, name, self.output(name))
            time.sleep(_POLL_S)

    def wait_all(self):
        """Waits for every process to exit by itself; returns {name: exit code}."""
        deadline = time.time() + _PROCESS_TIMEOUT_S
        codes = {}
        for name, process in reversed(self.processes.items()):  # the workers first: the ps waits for them
            try:
                codes[name] = process.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise AssertionError("%s did not exit; the logs:\n%s" % (name, self.outputs())) from None
        return codes

    def stop(self):
        """Kills every process that still runs."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def own_steps(output, end="finished"):
    """The worker's '`end` at global step S after N steps of its own' line: (S, N)."""
    match = re.search(r"%s at global step (\d+) after (\d+) steps of its own" % end, output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


class ClusterFlagsTest(tf.test.TestCase):
    def _main_error(self, argv, tf_config=None):
        """Runs main.main(argv) in-process with TF_CONFIG set to `tf_config`; asserts exit 2 and returns stderr."""
        saved = os.environ.pop(cluster.TF_CONFIG, None)
        if tf_config is not None:
            os.environ[cluster.TF_CONFIG] = tf_config
        main.FLAGS.unparse_flags()
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                self.assertEqual(main.main(["main.py"] + argv), main.EXIT_USAGE)
        finally:
            main.FLAGS.unparse_flags()  # later tests parse their own command lines
            os.environ.pop(cluster.TF_CONFIG, None)
            if saved is not None:
                os.environ[cluster.TF_CONFIG] = saved
        return stderr.getvalue()

    def test_bad_combinations_are_usage_errors(self):
        """A job without hosts, hosts without a job, an unknown job, a task index out of range, a host without a port,
        malformed TF_CONFIG and --num_devices that does not divide --batch_size each end with exit 2 and one line
        naming the flag, before any server starts."""
        hosts = ["--ps_hosts", "127.0.0.1:1", "--worker_hosts", "127.0.0.1:2,127.0.0.1:3"]
        cases = [
            (["--job_name", "worker"], None, "needs --ps_hosts and --worker_hosts"),
            (hosts, None, "--job_name must be ps or worker"),
            (hosts + ["--job_name", "chief"], None, "--job_name must be ps or worker"),
            (hosts + ["--job_name", "worker", "--task_index", "2"], None, "--task_index must be in 0..1"),
            (hosts + ["--job_name", "ps", "--task_index", "1"], None, "--task_index must be in 0..0"),
            (["--ps_hosts", "nohost", "--worker_hosts", "a:1", "--job_name", "ps"], None, "--ps_hosts must be"),
            ([], "{not json", "TF_CONFIG is not a cluster description"),
            ([], json.dumps({"cluster": {"ps": ["a:1"]}}), "TF_CONFIG is not a cluster description"),
            (["--batch_size", "8", "--num_devices", "3"], None, "--num_devices must divide --batch_size 8, got 3"),
        ]
        for argv, tf_config, expected in cases:
            with self.subTest(argv=argv, tf_config=tf_config):
                stderr = self._main_error(argv, tf_config)
                self.assertEqual(len(stderr.splitlines()), 1, stderr)
                self.assertIn(expected, stderr)

    def test_tf_config(self):
        """TF_CONFIG gives the same role as the flags; a 'chief' task is worker 0 and shifts the workers by one;
        flags given on the command line win over TF_CONFIG."""
        no_flags = {"ps_hosts": "", "worker_hosts": "", "job_name": "", "task_index": 0}
        config = {"cluster": {"ps": ["p:1"], "worker": ["w:2", "w:3"]}, "task": {"type": "worker", "index": 1}}
        role = cluster.role_from(no_flags, json.dumps(config))
        self.assertEqual(role, cluster.Role({"ps": ["p:1"], "worker": ["w:2", "w:3"]}, "worker", 1, None))
        config["cluster"]["chief"] = ["c:4"]
        role = cluster.role_from(no_flags, json.dumps(config))
        self.assertEqual((role.hosts["worker"], role.task_index), (["c:4", "w:2", "w:3"], 2))
        config["task"] = {"type": "chief", "index": 0}
        self.assertTrue(cluster.is_chief(cluster.role_from(no_flags, json.dumps(config))))
        flags = dict(no_flags, ps_hosts="q:5", worker_hosts="v:6", job_name="ps")
        self.assertEqual(cluster.role_from(flags, json.dumps(config)).hosts, {"ps": ["q:5"], "worker": ["v:6"]})
        self.assertIsNone(cluster.role_from(no_flags, None))

    def test_share(self):
        """Worker i of 2 trains on images i, i+2, ...; both keep the whole validation set; an epoch is one pass over
        a worker's part in synchronous training and over all parts in asynchronous training."""
        arrays = (list(range(10)), list(range(10, 20)), [7], [8])
        role = cluster.Role({"ps": ["p:1"], "worker": ["w:2", "w:3"]}, "worker", 1, None)
        part, epoch = cluster.share(arrays, role, asynchronous=False)
        self.assertEqual(part, ([1, 3, 5, 7, 9], [11, 13, 15, 17, 19], [7], [8]))
        self.assertEqual(epoch, 5)
        self.assertEqual(cluster.share(arrays, role, asynchronous=True)[1], 10)
        self.assertEqual(cluster.share(arrays, None, asynchronous=False), (arrays, 10))


class UnreachablePsTest(tf.test.TestCase):
    def test_worker_without_ps_fails_in_bounded_time(self):
        """A worker whose parameter server never answers exits with code 2 and one line on stderr naming the ps,
        after --startup_timeout_s (2 s) and well within a minute, having written nothing."""
        workspace = self.get_temp_dir()
        write_tiny_mnist(os.path.join(workspace, "data"))
        ps, worker = "127.0.0.1:%d" % free_port(), "127.0.0.1:%d" % free_port()
        args = _TINY + ["--data_dir", "data", "--result_dir", "run", "--max_steps", "2"]
        args += ["--ps_hosts", ps, "--worker_hosts", worker, "--job_name", "worker"]
        started = time.time()
        result = run_main(args + ["--startup_timeout_s", str(_UNREACHABLE_TIMEOUT_S)], cwd=workspace)
        self.assertLess(time.time() - started, 60)
        self.assertEqual(result.returncode, main.EXIT_USAGE, result.stderr)
        self.assertEqual(result.stderr.splitlines(), ["error: parameter server %s did not answer within 2 s" % ps])
        self.assertFalse(os.path.exists(os.path.join(workspace, "run")))


class SynchronousClusterTest(tf.test.TestCase):
    """1 ps + 2 workers train 4 synchronous steps; the chief's checkpoint is then tested on one device."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workspace = tf.test.get_temp_dir()
        write_tiny_mnist(os.path.join(cls.workspace, "data"))
        ps, workers = "127.0.0.1:%d" % free_port(), ["127.0.0.1:%d" % free_port() for _ in range(_WORKERS)]
        args = _TINY + ["--data_dir", "data", "--result_dir", "run", "--max_steps", str(_MAX_STEPS)]
        cls.cluster = LocalCluster(cls.workspace, args + ["--save_every_steps", "2"] + cluster_flags(ps, workers))
        try:
            cls.cluster.start("ps", "ps", 0)
            for index in range(_WORKERS):
                cls.cluster.start("worker%d" % index, "worker", index)
            cls.codes = cls.cluster.wait_all()
        finally:
            cls.cluster.stop()

    def test_every_process_exits_by_itself(self):
        """The ps and both workers exit with code 0 on their own; the ps says every worker finished."""
        self.assertEqual(self.codes, {"ps": 0, "worker0": 0, "worker1": 0}, self.cluster.output("worker0"))
        self.assertIn("ps 0: all 2 workers finished", self.cluster.output("ps"))

    def test_global_step_counts_aggregated_updates(self):
        """Both workers end at global step 4, and together they ran at least 2 x 4 steps: each update of the global
        step took one gradient per worker (asynchronous updates would take one step each)."""
        chief, other = own_steps(self.cluster.output("worker0")), own_steps(self.cluster.output("worker1"))
        self.assertEqual((chief[0], other[0]), (_MAX_STEPS, _MAX_STEPS))
        self.assertGreaterEqual(chief[1] + other[1], _WORKERS * _MAX_STEPS)

    def test_chief_checkpoint_tests_on_one_device(self):
        """The chief alone wrote the run directory (flags.json, history, checkpoint of step 4); `--test True`
        evaluates that checkpoint in a single process."""
        run = os.path.join(self.workspace, "run")
        self.assertEqual(tf.train.latest_checkpoint(run), os.path.join(run, "model.ckpt-%d" % _MAX_STEPS))
        with open(os.path.join(run, "flags.json")) as f:
            self.assertEqual(json.load(f)["flags"]["task_index"], 0)
        result = run_main(["--test", "True", "--result_dir", "run"], cwd=self.workspace)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("(step %d)" % _MAX_STEPS, result.stdout)


class KilledWorkerTest(tf.test.TestCase):
    def test_killed_worker_rejoins(self):
        """Worker 1 killed with SIGKILL after a step and started again rejoins: it trains steps of its own while the
        chief goes on. SIGTERM then ends both workers ('interrupted', exit 0, the chief's checkpoint of the step
        reached), and the ps exits 0 by itself."""
        workspace = self.get_temp_dir()
        write_tiny_mnist(os.path.join(workspace, "data"))
        ps, workers = "127.0.0.1:%d" % free_port(), ["127.0.0.1:%d" % free_port() for _ in range(_WORKERS)]
        args = _TINY + ["--data_dir", "data", "--result_dir", "run", "--max_steps", str(_ENDLESS_STEPS)]
        local = LocalCluster(workspace, args + cluster_flags(ps, workers))
        self.addCleanup(local.stop)
        local.start("ps", "ps", 0)
        local.start("worker0", "worker", 0)
        local.start("worker1", "worker", 1)
        local.wait_for("worker1", _STEPPED)
        killed = local.processes.pop("worker1")
        killed.send_signal(signal.SIGKILL)
        self.assertEqual(killed.wait(timeout=_PROCESS_TIMEOUT_S), -signal.SIGKILL)
        local.start("restarted", "worker", 1)
        local.wait_for("restarted", _STEPPED)  # the restarted worker has trained a step
        for name in ("worker0", "restarted"):
            local.processes[name].send_signal(signal.SIGTERM)
        codes = local.wait_all()
        self.assertEqual(codes, {"ps": 0, "worker0": 0, "restarted": 0}, local.output("worker0"))
        chief_step, _ = own_steps(local.output("worker0"), "interrupted")
        self.assertGreaterEqual(own_steps(local.output("restarted"), "interrupted")[1], 1)
        run = os.path.join(workspace, "run")
        self.assertEqual(tf.train.latest_checkpoint(run), os.path.join(run, "model.ckpt-%d" % chief_step))
