"""Training on TensorFlow's own cluster runtime, the TF1 way: parameter servers and workers.

Every process runs `tf.train.Server` for its task of one `ClusterSpec` (from --ps_hosts, --worker_hosts, --job_name,
--task_index, or the TF_CONFIG variable that cluster managers set). Variables live on the parameter servers
(`replica_device_setter`, round robin); each worker builds the whole training graph on its own device, reads its
own shard of the training images and runs the training loop against its server. Training is synchronous by
default: `SyncReplicasOptimizer` aggregates one gradient per worker (replicas_to_aggregate = workers) into each
update, so the global batch is workers x batch and the global step advances once per aggregated update;
asynchronous training lets each worker apply its own gradients. Worker 0, the chief, initialises or restores the
variables, runs the aggregation queue and alone writes checkpoints, summaries, history and flags.json; a worker
that is restarted waits for the model to be ready and rejoins. A parameter server serves until every worker has
told it that it finished. No flags are read here: main.py passes plain values.
"""

import collections
import json
import os
import signal
import socket
import sys
import threading
import time

import tensorflow.compat.v1 as tf

from run import progress
from run import run_dir
from run import runtime
from run import training
from model import NonFiniteError, run_step

TF_CONFIG = "TF_CONFIG"  # the environment variable of cluster managers (e.g. a Kubernetes TFJob)
NO_GRPC_PROXY = "no_grpc_proxy"  # hosts that gRPC reaches directly, whatever $http_proxy says
JOBS = ("ps", "worker")
_POLL_S = 0.5  # between connection attempts to a parameter server, and between a parameter server's checks
_LINGER_S = 5.0  # a parameter server's wait after the last worker finished, for the workers to close their sessions
# At a worker's end, the waits for the chief's aggregation queue runner threads: for them to return once their queue
# is closed, and, for one still waiting for gradients, once the session's close cancelled its step. A thread still
# inside the session when Python exits aborts the process ("FATAL: exception not rethrown", exit -6).
_STOP_S = 2.0
_JOIN_S = 30.0

# This process's place in the cluster: `hosts` {job: [host:port, ...]}, its job ('ps' or 'worker'), its index, and
# its running `tf.train.Server` (None until `join` starts it).
Role = collections.namedtuple("Role", ["hosts", "job_name", "task_index", "server"])


class Unreachable(run_dir.UsageError):
    """A parameter server or the chief did not answer within the start-up timeout (one line, exit code 2)."""


# ---- the cluster's description ------------------------------------------------------------------------------


def _host_list(text, flag):
    """'host:port,...' as a list (UsageError naming `flag` for an entry without a numeric port)."""
    hosts = [entry.strip() for entry in text.split(",") if entry.strip()]
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise run_dir.UsageError("%s must be host:port,..., got %r" % (flag, host))
    return hosts


def _from_tf_config(text):
    """(ps hosts, worker hosts, job, index) of a TF_CONFIG JSON text; a 'chief' job becomes worker 0."""
    try:
        config = json.loads(text)
        hosts, task = config["cluster"], config["task"]
        chief = list(hosts.get("chief", []))
        job, index = task["type"], int(task["index"])
        workers = chief + list(hosts.get("worker", []))
        if job == "chief":
            job = "worker"
        elif job == "worker":
            index += len(chief)
        return ",".join(hosts.get("ps", [])), ",".join(workers), job, index
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise run_dir.UsageError("%s is not a cluster description: %s" % (TF_CONFIG, error)) from None


def role_from(values, tf_config=None):
    """This process's `Role`, or None when it trains alone; the flags win over `tf_config` (TF_CONFIG's text).

    Args:
      values: the flag values (ps_hosts, worker_hosts, job_name, task_index).
      tf_config: the TF_CONFIG environment variable's text, or None.

    Raises:
      UsageError: a job without hosts, hosts without a job, an unknown job, an index out of range, bad TF_CONFIG.
    """
    ps_hosts, worker_hosts, job, index = (
        values[name] for name in ("ps_hosts", "worker_hosts", "job_name", "task_index")
    )
    if not (ps_hosts or worker_hosts or job) and tf_config:
        ps_hosts, worker_hosts, job, index = _from_tf_config(tf_config)
    if not (ps_hosts or worker_hosts or job):
        return None
    hosts = {"ps": _host_list(ps_hosts, "--ps_hosts"), "worker": _host_list(worker_hosts, "--worker_hosts")}
    if job not in JOBS:
        raise run_dir.UsageError("--job_name must be ps or worker with --ps_hosts/--worker_hosts, got %r" % job)
    if not hosts["ps"] or not hosts["worker"]:
        raise run_dir.UsageError("--job_name %s needs --ps_hosts and --worker_hosts (or %s)" % (job, TF_CONFIG))
    if not 0 <= index < len(hosts[job]):
        raise run_dir.UsageError("--task_index must be in 0..%d for job %s, got %d" % (len(hosts[job]) - 1, job, index))
    return Role(hosts, job, index, None)


def join(values, tf_config=None):
    """This process's `Role` with its server started (a worker's once every parameter server answers), or None when
    it trains alone.

    Args:
      values: the flag values: ps_hosts, worker_hosts, job_name, task_index (see `role_from`), num_devices (a
        worker's towers) and startup_timeout_s (seconds to wait for the parameter servers).
      tf_config: the TF_CONFIG environment variable's text, or None.

    Raises:
      UsageError: bad cluster flags, a port that cannot be opened; `Unreachable`: a parameter server did not answer.
    """
    role = role_from(values, tf_config)
    if role is None:
        return None
    # gRPC sends a channel through $http_proxy unless its host is in $no_grpc_proxy: the cluster's own are not proxied.
    hosts = {address.rpartition(":")[0] for addresses in role.hosts.values() for address in addresses}
    os.environ[NO_GRPC_PROXY] = ",".join(
        sorted(hosts | set(filter(None, os.environ.get(NO_GRPC_PROXY, "").split(","))))
    )
    devices = runtime.cpu_devices_for(values["num_devices"]) if role.job_name == "worker" else 1
    role = role._replace(server=start_server(role, devices))
    if role.job_name == "worker":
        wait_for_ps(role, values["startup_timeout_s"])
    return role


def is_chief(role):
    """Whether `role` is worker 0, the chief."""
    return role.job_name == "worker" and role.task_index == 0


def workers(role):
    """How many workers the cluster has."""
    return len(role.hosts["worker"])


def share(arrays, role, asynchronous):
    """The worker's part of (train images, train labels, validation images, validation labels), and the images of
    an epoch as the global step counts them.

    Each worker trains on every workers-th training image from its index on (all of them without a cluster, `role`
    None) and keeps the whole validation set. A synchronous update takes a batch from every worker, so an epoch is
    one pass over a worker's part; asynchronous updates take one batch each, so it is one pass over all of them.
    """
    train_x, train_y, val_x, val_y = arrays
    if role is None:
        return arrays, len(train_x)
    step = workers(role)
    part = train_x[role.task_index :: step], train_y[role.task_index :: step], val_x, val_y
    return part, len(part[0]) * (step if asynchronous else 1)


# ---- graph --------------------------------------------------------------------------------------------------


def _worker_device(role):
    return "/job:worker/task:%d" % role.task_index


def placement(role):
    """The device scope of a worker's graph: variables on the parameter servers, the rest on this worker."""
    spec = tf.train.ClusterSpec(role.hosts)
    return tf.device(tf.train.replica_device_setter(cluster=spec, worker_device=_worker_device(role)))


class Synchronizer:
    """Wraps the model's optimiser in `SyncReplicasOptimizer`: one gradient per worker in each update.

    Passed as `model.Distribution.wrap_optimizer`; it keeps the wrapper for the session's set-up (`Setup`).
    """

    def __init__(self, replicas):
        self.replicas = replicas
        self.optimizer = None

    def __call__(self, optimizer):
        self.optimizer = tf.train.SyncReplicasOptimizer(
            optimizer, replicas_to_aggregate=self.replicas, total_num_replicas=self.replicas
        )
        return self.optimizer


def synchronizer(role, asynchronous):
    """A `Synchronizer` for synchronous training, None for asynchronous (each worker applies its own gradients)."""
    return None if asynchronous else Synchronizer(workers(role))


# ---- servers and sessions ----------------------------------------------------------------------------------


def start_server(role, cpu_devices=1):
    """This task's `tf.train.Server` (UsageError when its port cannot be opened)."""
    config = tf.ConfigProto(device_count={"CPU": cpu_devices})
    try:
        return tf.train.Server(
            tf.train.ClusterSpec(role.hosts), job_name=role.job_name, task_index=role.task_index, config=config
        )
    except tf.errors.OpError as error:
        address = role.hosts[role.job_name][role.task_index]
        raise run_dir.UsageError(
            "cannot start the %s server on %s: %s" % (role.job_name, address, error.message)
        ) from None


def wait_for_ps(role, timeout_s):
    """Returns once every parameter server accepts connections; `Unreachable` after `timeout_s` seconds."""
    deadline = time.time() + timeout_s
    for address in role.hosts["ps"]:
        host, _, port = address.rpartition(":")
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=_POLL_S).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise Unreachable("parameter server %s did not answer within %d s" % (address, timeout_s)) from None
                time.sleep(_POLL_S)


def _done_queues(role):
    """One queue per parameter server on which each worker puts a token when it finishes (shared by name)."""
    queues = []
    for index in range(len(role.hosts["ps"])):
        with tf.device("/job:ps/task:%d" % index):
            queues.append(tf.FIFOQueue(-1, tf.int32, shapes=[], shared_name="done_queue_%d" % index))
    return queues


def run_ps(role):
    """Serves the variables of parameter server `role` until every worker has finished; returns the exit code.

    It polls the size of its 'finished' queue rather than waiting on a dequeue: a wait given up (to let Ctrl-C in)
    would leave a dequeue pending on the server, which would take a later worker's token.
    """
    server = role.server
    with tf.Graph().as_default():
        finished = _done_queues(role)[role.task_index].size()
        config = tf.ConfigProto(device_filters=["/job:ps/task:%d" % role.task_index])
        print("ps %d serving on %s" % (role.task_index, server.target), flush=True)
        with tf.Session(server.target, config=config) as sess:
            while sess.run(finished) < workers(role):
                time.sleep(_POLL_S)
        time.sleep(_LINGER_S)
    print("ps %d: all %d workers finished" % (role.task_index, workers(role)), flush=True)
    return 0


# ---- a worker's training ------------------------------------------------------------------------------------


def _crossed(before, after, every):
    """Whether the global step passed a multiple of `every` going from `before` to `after`."""
    return after // every > before // every


class WorkerRun:
    """One worker's training loop on the cluster; the chief's also checkpoints, validates and records.

    Args:
      role: this worker's `Role`.
      parts: (training graph, pipeline, this worker's data arrays, `training.Schedule`).
      chief_run: the chief's `training.TrainingRun` (its saver, writer and history), None on the other workers.
      sync: the `Synchronizer` of synchronous training, None for asynchronous.
    """

    def __init__(self, role, parts, chief_run, sync):
        self.role, self.chief_run = role, chief_run
        self.graph, self.pipeline, self.data, self.schedule = parts
        self.steps = 0  # training steps this worker ran (gradients it computed)
        self.stop_signals = []
        with placement(role):
            self.ready_op = tf.report_uninitialized_variables(tf.global_variables())
            self.init_op = tf.global_variables_initializer()
            self.ready_op.mark_used()  # an error before the session starts makes no 'never used' report at exit
            self.hook = sync.optimizer.make_session_run_hook(is_chief(role)) if sync else None
            if self.hook is not None:
                self.hook.begin()  # the chief's aggregation queue runner and its first tokens
                sync.optimizer.ready_for_local_init_op.mark_used()
            # At the end, a token for every worker: one that waits for a partner's gradient returns and sees the end.
            self.release = sync.optimizer.get_init_tokens_op(workers(role)) if sync else tf.no_op()
            self.finished = tf.group([queue.enqueue(role.task_index) for queue in _done_queues(role)])
        self.coordinator = tf.train.Coordinator()

    def session(self, server, result_dir, timeout_s):
        """A session on `server`: the chief restores DIR's latest checkpoint or initialises; the other workers wait
        up to `timeout_s` seconds for the model to be ready (`Unreachable` after)."""
        config = tf.ConfigProto(device_filters=["/job:ps", _worker_device(self.role)])
        manager = tf.train.SessionManager(ready_op=self.ready_op, recovery_wait_secs=_POLL_S)
        if self.chief_run is not None:
            sess = manager.prepare_session(
                server.target, self.init_op, self.chief_run.saver, checkpoint_dir=result_dir, config=config
            )
        else:
            try:
                sess = manager.wait_for_session(server.target, config=config, max_wait_secs=timeout_s)
            except tf.errors.DeadlineExceededError:
                sess = None
            if sess is None:
                raise Unreachable("the chief did not make the model ready within %d s" % timeout_s)
        if self.hook is not None:
            self.hook.after_create_session(sess, self.coordinator)
        return sess

    def run(self, sess):
        """Trains until the global step reaches the schedule's last step; returns that step."""
        signal.signal(signal.SIGINT, lambda signum, frame: self.stop_signals.append(signum))
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stop_signals.append(signum))
        pipeline, (train_x, train_y, _, _) = self.pipeline, self.data
        sess.run(pipeline.train_iterator.initializer, {pipeline.images_in: train_x, pipeline.labels_in: train_y})
        step = int(sess.run(self.graph.global_step))
        schedule = self.schedule
        with progress.progress(schedule.max_steps, "training", "step", schedule.quiet, initial=step) as bar:
            while step < schedule.max_steps:
                if self.stop_signals:
                    raise training.Interrupted()
                started = time.time()
                after, loss, accuracy = self._step(sess, step)
                bar.set_postfix(
                    loss="%.4f" % loss,
                    acc="%.3f" % accuracy,
                    img_s="%.0f" % (schedule.batch_size / (time.time() - started)),
                )
                bar.update(max(0, min(after, schedule.max_steps) - step))
                step = after
        return step

    def _step(self, sess, step):
        """One training step from global step `step`: (the global step after it, loss, accuracy)."""
        graph, schedule = self.graph, self.schedule
        summarise = self.chief_run is not None and _crossed(step, step + 1, schedule.summary_every_steps)
        fetches = [graph.train_op, graph.loss, graph.accuracy] + ([graph.summary_op] if summarise else [])
        results = run_step(sess, graph, fetches)
        self.steps += 1
        after = int(sess.run(graph.global_step))  # the update may land after this worker's step returns
        if self.chief_run is not None:
            if summarise:
                self.chief_run.record(results[3], after, results[1], results[2])
            validate = _crossed(step, after, schedule.steps_per_epoch) or after >= schedule.max_steps
            if validate:
                self.chief_run.validate(after)
            if validate or _crossed(step, after, schedule.save_every_steps):
                self.chief_run.save(after)
        return after, results[1], results[2]

    def finish(self, sess):
        """Lets any worker waiting for this one's gradient go, stops the chief's queue runner, tells the parameter
        servers this worker is done and closes the session, with no thread left inside it (see `_JOIN_S`)."""
        try:
            sess.run(self.release)
        except (tf.errors.CancelledError, tf.errors.OutOfRangeError):
            pass  # the chief closed the token queue: it has finished, and no worker waits for a token any more
        self.coordinator.request_stop()  # the queue runner closes its queue, so its blocked enqueues return
        self._join(_STOP_S)
        sess.run(self.finished)  # the parameter servers may leave from now on: close the session while they linger
        threading.excepthook = _quiet_when_cancelled
        sess.close()  # cancels a queue runner's step that still waits for gradients no worker will send
        self._join(_JOIN_S)

    def _join(self, seconds):
        """Waits up to `seconds` for the coordinator's threads to end; the errors they met end with them."""
        try:
            self.coordinator.join(stop_grace_period_secs=seconds, ignore_live_threads=True)
        except tf.errors.OpError:
            pass  # a queue runner cancelled or closed after training ended: nothing saved depends on it


def _quiet_when_cancelled(args, default=threading.excepthook):
    """threading.excepthook that stays silent for a queue runner's step cancelled by its session's close."""
    if not issubclass(args.exc_type, tf.errors.CancelledError):
        default(args)


def train(role, parts, values, write_flags):
    """Trains as worker `role` of its cluster; returns the exit code (0, also when interrupted).

    Args:
      role: a worker's `Role`.
      parts: (training graph, pipeline, evaluation predictions, data arrays, `training.Schedule`, `Synchronizer`
        or None), built under `placement(role)`.
      values: the run's flag values: result_dir (the chief's run directory, restored from when it holds a
        checkpoint) and startup_timeout_s (seconds another worker waits for the chief to make the model ready).
      write_flags: called by the chief once its session is ready (flags.json).
    """
    graph, pipeline, eval_predictions, arrays, schedule, sync = parts
    result_dir, timeout_s = values["result_dir"], values["startup_timeout_s"]
    chief_run = None
    if is_chief(role):
        with placement(role):  # the saver's ops on the chief: checkpoints are written where it runs
            chief_run = training.TrainingRun(result_dir, None, graph, eval_predictions, pipeline, arrays, schedule)
    worker = WorkerRun(role, (graph, pipeline, arrays, schedule), chief_run, sync)
    sess = worker.session(role.server, result_dir, timeout_s)
    if chief_run is not None:
        chief_run.sess = sess
        write_flags()
    try:
        step, end = worker.run(sess), "finished"
    except training.Interrupted:
        step, end = int(sess.run(graph.global_step)), "interrupted"
        if chief_run is not None:
            chief_run.save(step)
    except NonFiniteError as error:
        print("error: non-finite value: %s; training stopped, no variable was updated" % error, file=sys.stderr)
        return training.EXIT_NON_FINITE
    finally:
        worker.finish(sess)  # also after an error: no other worker waits for this one's gradient
    print("worker %d %s at global step %d after %d steps of its own" % (role.task_index, end, step, worker.steps))
    return 0
