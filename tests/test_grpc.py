"""TensorFlow Serving's gRPC API: `python -m classify_server.grpc` as a real subprocess on a loopback
port, spoken to through tensorflow-serving-api's own client stubs."""
import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from conftest import ROOT, free_port, png_bytes, read_labels, shape_image, stop_process, write_colour_model

NAME = "model"  # MODEL_NAME's default
IMAGES = [shape_image(label, seed) for seed, label in enumerate(["red_circle", "green_square", "blue_triangle"])]
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


class GrpcServer:
    """`python -m classify_server.grpc --host 127.0.0.1 --port P` and stubs to it."""

    def __init__(self, env, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w+b")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "classify_server.grpc", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=dict(os.environ, **env), stdout=self.log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_service = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gRPC server exited with {self.process.returncode}:\n{self.output()}")
            try:
                self.status()
                return self
            except grpc.RpcError:  # not listening yet (the model loads first)
                time.sleep(0.3)
        raise AssertionError(f"gRPC server not ready after {timeout}s:\n{self.output()}")

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def status(self, name=NAME, version=None):
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return self.model_service.GetModelStatus(request, timeout=5)

    def predict(self, images, name=NAME, version=None, shape=None, timeout=30, **spec):
        return self.prediction.Predict(predict_request(images, name, version, shape, **spec), timeout=timeout)

    def stop(self):
        self.channel.close()
        stop_process(self.process)
        self.log.close()


def predict_request(images, name=NAME, version=None, shape=None, signature_name=""):
    """As inception_client.py builds it: encoded bytes in a string tensor under `images`."""
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
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    s = GrpcServer({"MODEL_DIR": trained_model}, tmp_path_factory.mktemp("grpc") / "server.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_import_grpc_is_grpcio():
    from classify_server import grpc as module
    assert module.grpc is grpc and hasattr(module.grpc, "server")


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
    err = rpc_error(server.predict, b"\xff\xd8" + bytes(11 * 1024 * 1024))  # over MAX_UPLOAD_BYTES: gRPC's own
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

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


def colour_jpeg(rgb):
    out = io.BytesIO()
    Image.new("RGB", (40, 30), rgb).save(out, "JPEG", quality=95)
    return out.getvalue()


def test_new_version_is_picked_up(trained_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(trained_model, base / "1")
    s = GrpcServer({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": "1"}, tmp_path / "server.log")
    try:
        s.wait_ready()
        assert [(v.version, v.state) for v in s.status().model_version_status] == [(1, AVAILABLE)]
        assert s.predict(IMAGES[0]).model_spec.version.value == 1

        write_colour_model(base / ".tmp-2")  # published whole, as retrain --model_base_path does
        os.rename(base / ".tmp-2", base / "2")
        deadline = time.monotonic() + 60
        while [(v.version, v.state) for v in s.status().model_version_status] != [(2, AVAILABLE), (1, END)]:
            assert time.monotonic() < deadline, f"version 2 not picked up in 60 s:\n{s.output()}"
            time.sleep(0.3)

        images = [colour_jpeg(rgb) for rgb in [(230, 20, 20), (20, 230, 20), (20, 20, 230)]]
        response = s.predict(images)
        assert (response.model_spec.name, response.model_spec.version.value) == (NAME, 2)
        scores = tf.make_ndarray(response.outputs["scores"])
        assert [[c.decode() for c in row] for row in tf.make_ndarray(response.outputs["classes"])] == \
            [["red", "green", "blue"]] * 3
        assert list(scores.argmax(axis=1)) == [0, 1, 2]  # each image answered by its own row
        from classify_server.model import Classifier
        classifier = Classifier(str(base / "2"))
        try:  # the HTTP server's classifier on the same bytes
            np.testing.assert_allclose(scores, classifier.predict([classifier.preprocess(d) for d in images]),
                                       atol=1e-5, rtol=0)
        finally:
            classifier.close()

        assert rpc_error(s.predict, images[0], version=1).code() == grpc.StatusCode.NOT_FOUND
        assert s.predict(images[0], version=2).model_spec.version.value == 2
        assert [v.version for v in s.status(version=2).model_version_status] == [2]
    finally:
        s.stop()


def test_sigterm_finishes_requests_in_flight(server):
    """Last in this file: it stops the module's server."""
    in_flight = server.prediction.Predict.future(predict_request(IMAGES * 10), timeout=60)
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    response = in_flight.result(timeout=60)
    assert tf.make_ndarray(response.outputs["scores"]).shape[0] == 30
    assert server.process.wait(timeout=40) == 0
    log = server.output()
    assert "SIGTERM: finishing requests in flight" in log and "stopped" in log, log
    assert f"listening on 127.0.0.1:{server.port}, model 'model' version 1" in log, log
