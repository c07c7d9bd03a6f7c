"""The gRPC server (TensorFlow Serving's API): `python -m classify_server.grpc_server` as a real subprocess on a
loopback port, spoken to through tensorflow-serving-api's own client stubs."""
import base64
import io
import os
import re
import shutil
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from support.clients import MODEL_NAME, predict_request, rpc_error
from support.images import png_bytes, shape_image
from support.models import read_labels, write_colour_model
from support.processes import GrpcServer, running, starting
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

NAME = MODEL_NAME
IMAGES = [shape_image(label, seed) for seed, label in enumerate(["red_circle", "green_square", "blue_triangle"])]
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
MiB = 1024 * 1024


def sized_request(image, size):
    """A Predict request of exactly `size` bytes on the wire: `image` with zero bytes after its end
    (which decoders ignore, so it still answers as `image` does)."""
    padding = size - predict_request(image).ByteSize()
    request = predict_request(image + bytes(padding))
    while request.ByteSize() != size:  # the padding also lengthens the varint length prefixes
        padding += size - request.ByteSize()
        request = predict_request(image + bytes(padding))
    return request


def names_limit(details, limit):
    """Whether an error message has the number `limit` in it (not just as part of another number)."""
    return re.search(rf"(?<!\d){limit}(?!\d)", details) is not None


def scores_of(response):
    return tf.make_ndarray(response.outputs["scores"])


def local_scores(model_dir, images):
    """The HTTP server's engine and preprocessing, in this process, on the same bytes."""
    from classify_server.core.inference import preprocess
    from classify_server.engines.tf_session import TFSessionEngine
    classifier = TFSessionEngine(model_dir)
    try:
        return classifier.predict([preprocess(classifier.input_spec, data, None) for data in images])
    finally:
        classifier.close()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    with running(GrpcServer({"MODEL_DIR": trained_model}, tmp_path_factory.mktemp("grpc") / "server.log")) as s:
        yield s


@pytest.fixture
def start_grpc(tmp_path):
    """Factory: start_grpc(env) -> a ready GrpcServer; all are stopped at the end of the test
    (conftest's start_server, for this server)."""
    with starting(lambda n, env: GrpcServer(env, tmp_path / f"grpc-{n}.log")) as start:
        yield start


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """A tiny model (red, green, blue) that loads in a moment."""
    return write_colour_model(tmp_path_factory.mktemp("colour") / "model")


SLOW_PREDICT = '''\
"""Imported by the gRPC server under test at start-up (sitecustomize, through PYTHONPATH): makes
TFSessionEngine.predict slow, and observable, for requests (not the start-up warm-up, unless SLOW_WARM_UP). Each
takes SLOW_PREDICT_SECONDS more, then answers as before, and appends to SLOW_PREDICT_LOG
"enter N" when it starts and "exit N" when it ends, N the predicts running at that moment."""
import os
import threading
import time

from classify_server.engines import tf_session

_predict = tf_session.TFSessionEngine.predict
_lock = threading.Lock()
_running = 0


def _note(event):
    with open(os.environ["SLOW_PREDICT_LOG"], "a") as f:
        f.write(f"{event} {_running}\\n")


def predict(self, inputs):
    global _running
    start_up = threading.current_thread().name == "load-models"  # the gRPC server's first warm-up
    if threading.current_thread() is threading.main_thread() or start_up and not os.environ.get("SLOW_WARM_UP"):
        return _predict(self, inputs)
    with _lock:
        _running += 1
        _note("enter")
    try:
        time.sleep(float(os.environ["SLOW_PREDICT_SECONDS"]))
        return _predict(self, inputs)
    finally:
        with _lock:
            _running -= 1
            _note("exit")


tf_session.TFSessionEngine.predict = predict
'''


class SlowPredict:
    """The environment that makes a server's predicts slow (SLOW_PREDICT above), and what they did."""

    def __init__(self, folder):
        os.makedirs(folder / "site")
        (folder / "site" / "sitecustomize.py").write_text(SLOW_PREDICT)
        self.site, self.log = str(folder / "site"), folder / "predicts.log"

    def env(self, seconds, warm_up=False):
        """Slow predicts; with `warm_up`, the gRPC server's first warm-up too."""
        path = [self.site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return {"PYTHONPATH": os.pathsep.join(path), "SLOW_PREDICT_SECONDS": str(seconds),
                "SLOW_PREDICT_LOG": str(self.log), **({"SLOW_WARM_UP": "1"} if warm_up else {})}

    def events(self):
        """[("enter" or "exit", predicts running), ...] in order."""
        if not self.log.exists():
            return []
        return [(event, int(n)) for event, n in (line.split() for line in self.log.read_text().splitlines())]

    def wait_for(self, count, event="enter", timeout=30):
        deadline = time.monotonic() + timeout
        while sum(e == event for e, _ in self.events()) < count:
            assert time.monotonic() < deadline, f"not {count} predicts {event}ed in {timeout}s: {self.events()}"
            time.sleep(0.02)


@pytest.fixture
def slow_predict(tmp_path):
    return SlowPredict(tmp_path / "slow_predict")


def colour_jpeg(rgb):
    out = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(out, "JPEG", quality=95)
    return out.getvalue()


COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def test_predict_matches_the_http_server(server, flask_app, trained_model):
    data = IMAGES[0]
    response = server.predict(data, shape=[1])
    scores = tf.make_ndarray(response.outputs["scores"])
    classes = tf.make_ndarray(response.outputs["classes"])
    labels = read_labels(trained_model)
    assert scores.dtype == np.float32 and scores.shape == (1, len(labels))
    assert [c.decode() for c in classes[0]] == labels
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == (NAME, 1, "serving_default")

    http = flask_app.test_client().post(f"/v1/models/{NAME}:predict",
                                        json={"instances": [{"b64": base64.b64encode(data).decode()}]})
    assert http.status_code == 200, http.get_json()
    np.testing.assert_allclose(scores, http.get_json()["predictions"], atol=1e-5, rtol=0)

    # A scalar string, and inception_client.py's signature name, answer the same.
    scalar = server.predict(data, shape=[], signature_name="predict_images")
    np.testing.assert_allclose(tf.make_ndarray(scalar.outputs["scores"]), scores, atol=1e-5, rtol=0)
    assert scalar.model_spec.signature_name == "predict_images"


def test_predict_a_batch_of_three(server, trained_model):
    response = server.predict(IMAGES)
    scores = tf.make_ndarray(response.outputs["scores"])
    classes = tf.make_ndarray(response.outputs["classes"])
    labels = read_labels(trained_model)
    assert scores.shape == classes.shape == (3, len(labels))
    np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-4)
    assert [[c.decode() for c in row] for row in classes] == [labels] * 3
    for data, row in zip(IMAGES, scores):
        np.testing.assert_allclose(tf.make_ndarray(server.predict(data).outputs["scores"])[0], row, atol=1e-5)
    request = predict_request(IMAGES[:2])
    request.output_filter.append("scores")
    assert list(server.prediction.Predict(request, timeout=30).outputs) == ["scores"]


def test_predict_errors(server):
    err = rpc_error(server.predict, IMAGES[0], name="other")
    assert err.code() == grpc.StatusCode.NOT_FOUND and "other" in err.details()
    err = rpc_error(server.predict, IMAGES[0], version=7)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "7" in err.details()

    err = rpc_error(server.predict, [IMAGES[0], b"this is not an image"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 2 is not a readable image" in err.details(), err.details()
    err = rpc_error(server.predict, png_bytes(50_000, 50_000))  # a bomb: only its header is read
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_IMAGE_PIXELS" in err.details()
    err = rpc_error(server.predict, [IMAGES[0]] * 33)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MAX_PARTS" in err.details()
    # Over MAX_UPLOAD_BYTES: test_max_upload_bytes_*.

    request = predict_request(IMAGES[0])
    request.inputs["pictures"].CopyFrom(request.inputs["images"])
    del request.inputs["images"]
    err = rpc_error(server.prediction.Predict, request, timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pictures" in err.details()
    request = predict_request(IMAGES[0])
    del request.inputs["images"]
    err = rpc_error(server.prediction.Predict, request, timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "images" in err.details()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
    err = rpc_error(server.prediction.Predict, request, timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "DT_STRING" in err.details()
    err = rpc_error(server.predict, IMAGES[0], signature_name="classify")
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Still serving afterwards.
    assert tf.make_ndarray(server.predict(IMAGES[1]).outputs["scores"]).shape[0] == 1


def test_model_metadata(server, trained_model):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = NAME
    response = server.prediction.GetModelMetadata(request, timeout=5)
    assert (response.model_spec.name, response.model_spec.version.value) == (NAME, 1)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    assert list(signature.inputs) == ["images"]
    assert signature.inputs["images"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1]
    classes = len(read_labels(trained_model))
    assert sorted(signature.outputs) == ["classes", "scores"]
    assert signature.outputs["scores"].dtype == tf.float32.as_datatype_enum
    assert signature.outputs["classes"].dtype == tf.string.as_datatype_enum
    for name in ("scores", "classes"):
        assert [d.size for d in signature.outputs[name].tensor_shape.dim] == [-1, classes]

    request.ClearField("metadata_field")
    err = rpc_error(server.prediction.GetModelMetadata, request, timeout=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_status(server):
    response = server.status()
    assert [(s.version, s.state, s.status.error_code, s.status.error_message)
            for s in response.model_version_status] == [(1, AVAILABLE, 0, "")]
    assert [s.version for s in server.status(version=1).model_version_status] == [1]
    assert rpc_error(server.status, version=2).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(server.status, name="other").code() == grpc.StatusCode.NOT_FOUND
    log = server.output()
    assert f"serving on 127.0.0.1:{server.port}: model 'model' version 1" in log, log


def test_new_version_is_picked_up(trained_model, tmp_path, start_grpc):
    base = tmp_path / "base"
    shutil.copytree(trained_model, base / "1")
    s = start_grpc({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": "1"})
    assert [(v.version, v.state) for v in s.status().model_version_status] == [(1, AVAILABLE)]
    assert s.predict(IMAGES[0]).model_spec.version.value == 1

    write_colour_model(base / ".tmp-2")  # published whole, as retrain --model_base_path does
    os.rename(base / ".tmp-2", base / "2")
    deadline = time.monotonic() + 60
    while [(v.version, v.state) for v in s.status().model_version_status] != [(2, AVAILABLE), (1, END)]:
        assert time.monotonic() < deadline, f"version 2 not picked up in 60 s:\n{s.output()}"
        time.sleep(0.3)

    images = [colour_jpeg(COLOURS[name]) for name in ("red", "green", "blue")]
    response = s.predict(images)
    assert (response.model_spec.name, response.model_spec.version.value) == (NAME, 2)
    got = scores_of(response)
    assert [[c.decode() for c in row] for row in tf.make_ndarray(response.outputs["classes"])] == \
        [["red", "green", "blue"]] * 3
    assert list(got.argmax(axis=1)) == [0, 1, 2]  # each image answered by its own row
    np.testing.assert_allclose(got, local_scores(str(base / "2"), images), atol=1e-5, rtol=0)

    assert rpc_error(s.predict, images[0], version=1).code() == grpc.StatusCode.NOT_FOUND
    assert s.predict(images[0], version=2).model_spec.version.value == 2
    assert [v.version for v in s.status(version=2).model_version_status] == [2]


def test_max_upload_bytes_default_replaces_grpcs_own_4_mib(server):
    """MAX_UPLOAD_BYTES (10 MiB by default) is the limit, not gRPC's own 4 MiB: a 6 MiB message and one
    of exactly 10 MiB are answered, one byte more is RESOURCE_EXHAUSTED."""
    expected = scores_of(server.predict(IMAGES[0]))
    for size in (6 * MiB, 10 * MiB):
        response = server.prediction.Predict(sized_request(IMAGES[0], size), timeout=30)
        np.testing.assert_allclose(scores_of(response), expected, atol=1e-5, rtol=0)
    err = rpc_error(server.prediction.Predict, sized_request(IMAGES[0], 10 * MiB + 1), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert names_limit(err.details(), 10 * MiB), err.details()


def test_max_upload_bytes_is_honoured(start_grpc, colour_model):
    """A MAX_UPLOAD_BYTES under gRPC's own 4 MiB: a message of up to exactly MAX_UPLOAD_BYTES is answered;
    one byte more, or 2 MB, is RESOURCE_EXHAUSTED with the limit in the message (gRPC's own:
    "Received message larger than max (2000000 vs. 1000000)"), and the server goes on serving."""
    limit = 1_000_000
    s = start_grpc({"MODEL_DIR": colour_model, "MAX_UPLOAD_BYTES": str(limit)})
    image = colour_jpeg(COLOURS["red"])
    expected = local_scores(colour_model, [image])
    for size in (limit - 1, limit):
        response = s.prediction.Predict(sized_request(image, size), timeout=30)
        np.testing.assert_allclose(scores_of(response), expected, atol=1e-5, rtol=0)
    for size in (limit + 1, 2_000_000):
        err = rpc_error(s.prediction.Predict, sized_request(image, size), timeout=30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert names_limit(err.details(), limit), err.details()
    np.testing.assert_allclose(scores_of(s.predict(image)), expected, atol=1e-5, rtol=0)


def test_grpc_threads_bounds_the_requests_run_at_once(start_grpc, colour_model, slow_predict):
    """GRPC_THREADS=2 and 6 slow requests sent at once: exactly 2 run at a time, never more; the
    others wait for a thread (no error) and each is answered with its own image's scores."""
    s = start_grpc({"MODEL_DIR": colour_model, "GRPC_THREADS": "2", **slow_predict.env(seconds=1)})
    images = [colour_jpeg(COLOURS[name]) for name in ("red", "green", "blue") * 2]
    calls = [s.prediction.Predict.future(predict_request(image), timeout=60) for image in images]
    responses = [call.result() for call in calls]
    for response, row in zip(responses, local_scores(colour_model, images)):
        np.testing.assert_allclose(scores_of(response)[0], row, atol=1e-5, rtol=0)
    events = slow_predict.events()
    assert [event for event, _ in events].count("enter") == len(images), events
    assert max(running for _, running in events) == 2, events


def probe(s, channel=None, timeout=0.5):
    """A new RPC to `s` (on `channel`, or its own): "served", "refused", or "no answer" (in time)."""
    try:
        s.status(channel=channel, timeout=timeout)
        return "served"
    except grpc.RpcError as err:
        # CANCELLED: refused by a server shutting down; UNAVAILABLE: no server listening any more.
        # DEADLINE_EXCEEDED: a call that arrived as the server was shutting down, neither served nor
        # refused (a known race in gRPC, grpc/grpc#10418): no answer either way.
        assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                              grpc.StatusCode.DEADLINE_EXCEEDED), err
        return "no answer" if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "refused"


def wait_until_refusing(s, in_flight):
    """Until `s` refuses new RPCs, after a SIGTERM: the handler runs when the server's main thread next
    gets the GIL, not necessarily at once. Fails if the request `in_flight` ends first."""
    while probe(s) != "refused":
        assert not in_flight.done(), f"the request in flight ended ({in_flight.code()}) before new RPCs were " \
            f"refused:\n{s.output()}"
        time.sleep(0.05)


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(start_grpc, colour_model, slow_predict):
    """SIGTERM while the server is running a request (its predict has started, and takes 5 s): new RPCs
    are refused while that request runs on, it still gets its right answer, and the process exits 0
    within GRACEFUL_TIMEOUT."""
    grace = 20
    s = start_grpc({"MODEL_DIR": colour_model, "GRACEFUL_TIMEOUT": str(grace), **slow_predict.env(seconds=5)})
    images = [colour_jpeg(COLOURS[name]) for name in ("red", "green", "blue")]
    expected = local_scores(colour_model, images)
    in_flight = s.prediction.Predict.future(predict_request(images), timeout=60)
    slow_predict.wait_for(1)  # the server is running it
    assert not in_flight.done() and slow_predict.events() == [("enter", 1)]

    signalled = time.monotonic()
    s.process.send_signal(signal.SIGTERM)
    wait_until_refusing(s, in_flight)
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as fresh:  # and on a new connection
        answers = []
        while "refused" not in answers and len(answers) < 3:
            answers.append(probe(s, fresh, timeout=1))
        assert answers[-1] == "refused" and "served" not in answers, answers
    assert not in_flight.done(), f"the request in flight ended ({in_flight.code()}) as new RPCs were refused"
    assert s.process.poll() is None, f"exited ({s.process.returncode}) with a request in flight:\n{s.output()}"
    assert slow_predict.events() == [("enter", 1)]

    response = in_flight.result(timeout=30)
    np.testing.assert_allclose(scores_of(response), expected, atol=1e-5, rtol=0)
    assert slow_predict.events() == [("enter", 1), ("exit", 0)]
    try:
        assert s.process.wait(timeout=max(0.1, signalled + grace - time.monotonic())) == 0, s.output()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {grace} s (GRACEFUL_TIMEOUT) after SIGTERM:\n{s.output()}") from None


@pytest.mark.parametrize("grace, signals", [(1, 1), (30, 2)], ids=["graceful-timeout-over", "second-signal"])
def test_sigterm_stops_waiting_for_a_request_at_graceful_timeout(start_grpc, colour_model, slow_predict,
                                                                 grace, signals):
    """A request that outlasts GRACEFUL_TIMEOUT (1 s; its predict takes 8 s), or one in flight at a second
    SIGTERM ("stop now"), is cancelled, and the process exits 0 then, not when the request would be over."""
    s = start_grpc({"MODEL_DIR": colour_model, "GRACEFUL_TIMEOUT": str(grace), **slow_predict.env(seconds=8)})
    in_flight = s.prediction.Predict.future(predict_request(colour_jpeg(COLOURS["red"])), timeout=60)
    slow_predict.wait_for(1)
    signalled = time.monotonic()
    s.process.send_signal(signal.SIGTERM)
    if signals == 2:
        wait_until_refusing(s, in_flight)  # the first one handled
        s.process.send_signal(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as info:
        in_flight.result(timeout=30)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), info.value
    try:
        assert s.process.wait(timeout=6) == 0, s.output()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 6 s after SIGTERM, waiting for the cancelled request:\n"
                             f"{s.output()}") from None
    assert time.monotonic() - signalled < min(grace, 1) + 5
    assert slow_predict.events() == [("enter", 1)]  # exited without waiting for the predict to end


# --- the Open Inference Protocol (V2), health and reflection on the same port ------------------------

def test_v2_grpc_through_tritonclient(server, flask_app):
    """tritonclient.grpc against the same port: readiness, metadata, infer (binary), classification, errors."""
    tritongrpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]: pip install -e '.[test]'")
    from tritonclient.utils import InferenceServerException
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
        assert not client.is_model_ready("other") and not client.is_model_ready(NAME, "7")
        assert "classification" in client.get_server_metadata().extensions
        meta = client.get_model_metadata(NAME, as_json=True)
        assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": ["-1", "1"]}]
        images = tritongrpc.InferInput("images", [len(IMAGES)], "BYTES")
        images.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
        result = client.infer(NAME, [images])
        scores = result.as_numpy("scores")
        http = flask_app.test_client().post(f"/v1/models/{NAME}:predict",
                                            json={"instances": [{"b64": base64.b64encode(d).decode()} for d in IMAGES]})
        np.testing.assert_allclose(scores, http.get_json()["predictions"], atol=1e-5, rtol=0)
        labels = [label.decode() for label in result.as_numpy("labels")]
        top = client.infer(NAME, [images], outputs=[tritongrpc.InferRequestedOutput("scores", class_count=1)])
        assert [row[0].decode().split(":")[2] for row in top.as_numpy("scores")] == \
            [labels[i] for i in np.argmax(scores, axis=1)]
        for call, code in [(lambda: client.infer("other", [images]), grpc.StatusCode.NOT_FOUND),
                           (lambda: client.infer(NAME, [images], model_version="7"), grpc.StatusCode.NOT_FOUND)]:
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == str(code), info.value
        bad = tritongrpc.InferInput("images", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as info:
            client.infer(NAME, [bad])
        assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT) and "readable" in info.value.message()
    finally:
        client.close()


def test_health_not_serving_until_the_model_is_warm(trained_model, tmp_path, slow_predict):
    """The port opens first, so probes see NOT_SERVING (not a refused connection) while the model warms up."""
    server = GrpcServer({"MODEL_DIR": trained_model, **slow_predict.env(6, warm_up=True)}, tmp_path / "grpc.log")
    try:
        slow_predict.wait_for(1, timeout=120)  # the warm-up's run has begun: 6 s to go
        assert server.wait_until(lambda: server.health() is not None, 2, "an answer").health() == "NOT_SERVING"
        assert server.health("inference.GRPCInferenceService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            server.predict(IMAGES[0])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
        server.wait_ready(timeout=60)
        assert slow_predict.events()[:2] == [("enter", 1), ("exit", 0)]  # SERVING only after the warm-up's run
        assert server.health("tensorflow.serving.PredictionService") == "SERVING"
    finally:
        server.stop()


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "tensorflow.serving.PredictionService", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    listed = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= listed


def test_a_full_server_answers_resource_exhausted_at_once(start_grpc, colour_model, slow_predict):
    """GRPC_THREADS=1 and MAX_QUEUE=1: of 6 slow requests sent at once, 1 runs, 1 waits, and the other 4
    are answered RESOURCE_EXHAUSTED at once instead of queueing; a request whose deadline passes while it
    waits is never run."""
    s = start_grpc({"MODEL_DIR": colour_model, "GRPC_THREADS": "1", "MAX_QUEUE": "1", **slow_predict.env(seconds=1)})
    image = colour_jpeg(COLOURS["red"])
    start, answered = time.monotonic(), []
    calls = [s.prediction.Predict.future(predict_request(image), timeout=60) for _ in range(6)]
    for call in calls:
        call.add_done_callback(lambda call: answered.append((call.code().name, time.monotonic() - start)))
    for call in calls:
        call.exception()  # waits for it
    assert sorted(code for code, _ in answered) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4, answered
    # at once: before the first slow predict (1 s) has ended
    assert all(seconds < 0.9 for code, seconds in answered if code == "RESOURCE_EXHAUSTED"), answered
    assert [event for event, _ in slow_predict.events()].count("enter") == 2
    # A deadline shorter than the wait for the thread: DEADLINE_EXCEEDED, and the model never runs it.
    running = s.prediction.Predict.future(predict_request(image), timeout=60)
    slow_predict.wait_for(3)
    with pytest.raises(grpc.RpcError) as late:
        s.prediction.Predict(predict_request(image), timeout=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()
    time.sleep(0.5)
    assert [event for event, _ in slow_predict.events()].count("enter") == 3, slow_predict.events()
