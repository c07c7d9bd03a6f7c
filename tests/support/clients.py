"""Ways to ask the service what it answers: HTTP to a real server (`post`, `classify`), the Flask app in this
process and its test client, gRPC requests, a reader of a Kafka topic; and comparing two answers."""
import base64
import io
import time

import grpc
import pytest
import requests

try:  # the stream tests skip without it (test_stream.py's importorskip); nothing else needs it
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
except ImportError:
    pass

TIMEOUT = 30  # seconds, for an HTTP request of a test


def post(url, images, query="", session=requests):
    """POST / with one `data` part per encoded image; the response."""
    return session.post(url + "/" + query, files=[("data", (f"image{i}", data)) for i, data in enumerate(images)],
                        timeout=TIMEOUT)


def classify(url, data, query="", session=requests):
    """The answer of POST / for one image, which must be 200."""
    response = post(url, [data], query, session)
    assert response.status_code == 200, response.text
    return response.json()


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



def assert_answer(answer, labels, count=None):
    """[[label, score], ...]: known labels, each once, scores in [0, 1], best first."""
    assert isinstance(answer, list) and answer
    for pair in answer:
        assert isinstance(pair, list) and len(pair) == 2, pair
        assert isinstance(pair[0], str) and isinstance(pair[1], float), pair
        assert pair[0] in labels and 0.0 <= pair[1] <= 1.0, pair
    assert len({label for label, _ in answer}) == len(answer)
    scores = [score for _, score in answer]
    assert scores == sorted(scores, reverse=True), "not best first"
    if count is not None:
        assert len(answer) == count


def assert_json_error(response, status):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    return body


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


# --- gRPC -------------------------------------------------------------------------------------------------

MODEL_NAME = "model"  # MODEL_NAME's default


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


# --- Kafka ------------------------------------------------------------------------------------------------

PARTITIONS = 3



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
