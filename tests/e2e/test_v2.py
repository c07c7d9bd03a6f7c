"""The Open Inference Protocol (V2) over REST: Triton's own client (`tritonclient.http`) against a real
gunicorn server, and hostile V2 requests, each a 4xx with the worker alive and the next request answered.

The model is the colour model (its scores depend on the image), so comparing V2's answers with the
multipart API's means something.
"""
import base64
import json
import struct

import numpy as np
import pytest
import requests
from support.clients import classify
from support.images import CLASSES, shape_image
from support.models import write_colour_model
from support.processes import Server, running

tritonhttp = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]: pip install -e '.[test]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

LABELS = list(CLASSES)
IMAGES = [shape_image(label, 20 + i) for i, label in enumerate(LABELS)]
ENV = {"MAX_PARTS": "8", "TOP_K": "3", "MODEL_POLL_SECONDS": "0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    model = write_colour_model(root / "model", LABELS, sharpness=16.0)
    with running(Server(dict(ENV, MODEL_DIR=model), log_path=root / "gunicorn.log")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        yield c
    finally:
        c.close()


def expected_scores(server, image):
    """The multipart API's scores for `image`, in label order."""
    return [dict(classify(server.url, image, "?top_k=3"))[label] for label in LABELS]


def images_input(images, binary_data=True):
    tensor = tritonhttp.InferInput("images", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary_data)
    return tensor


def test_health_and_metadata_through_tritonclient(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("model") and client.is_model_ready("model", "1")
    assert not client.is_model_ready("other") and not client.is_model_ready("model", "7")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    meta = client.get_model_metadata("model")
    assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1, 1]}]  # Triton's form; [N] too
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                               {"name": "labels", "datatype": "BYTES", "shape": [3]}]
    assert meta["versions"] == ["1"]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("other")
    assert info.value.status() == "404" and "other" in info.value.message()


def test_binary_infer_matches_the_multipart_answer(client, server):
    result = client.infer("model", [images_input(IMAGES)])  # no outputs named: all, in binary
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and scores.shape == (3, 3)
    assert [label.decode() for label in result.as_numpy("labels")] == LABELS
    for image, row in zip(IMAGES, scores):
        np.testing.assert_allclose(row, expected_scores(server, image), atol=1e-6)
    assert np.ptp(scores[:, 0]) > 0.05  # the images do get different answers
    assert result.get_response()["model_version"] == "1"


def test_requested_outputs_json_and_version(client, server):
    outputs = [tritonhttp.InferRequestedOutput("scores", binary_data=False)]
    result = client.infer("model", [images_input(IMAGES[:1])], model_version="1", outputs=outputs,
                          request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and [o["name"] for o in response["outputs"]] == ["scores"]
    assert "parameters" not in response["outputs"][0]  # JSON data, not binary
    np.testing.assert_allclose(result.as_numpy("scores")[0], expected_scores(server, IMAGES[0]), atol=1e-6)


def test_classification_extension(client, server):
    outputs = [tritonhttp.InferRequestedOutput("scores", class_count=2)]
    result = client.infer("model", [images_input(IMAGES[:2])], outputs=outputs)
    top = result.as_numpy("scores")
    assert top.shape == (2, 2)
    for image, row in zip(IMAGES, top):
        expected = sorted(zip(expected_scores(server, image), range(3), LABELS), reverse=True)[:2]
        got = [entry.decode().split(":") for entry in row]
        assert [(int(i), label) for _, i, label in got] == [(i, label) for _, i, label in expected]
        assert [float(s) for s, _, _ in got] == pytest.approx([s for s, _, _ in expected], abs=1e-6)


@pytest.mark.parametrize("shape", [[1], [1, 1]])  # [N], or Triton's [N, 1] (the config's dims [1])
def test_json_base64_body(server, shape):
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": shape,
                        "data": [base64.b64encode(IMAGES[1]).decode()]}]}
    r = requests.post(server.url + "/v2/models/model/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    scores = next(o for o in r.json()["outputs"] if o["name"] == "scores")
    assert scores["shape"] == [1, 3]
    np.testing.assert_allclose(scores["data"], expected_scores(server, IMAGES[1]), atol=1e-6)


def test_errors_through_tritonclient(client):
    for call, status, words in [
            (lambda: client.infer("other", [images_input(IMAGES[:1])]), "404", "other"),
            (lambda: client.infer("model", [images_input(IMAGES[:1])], model_version="7"), "404", "served"),
            (lambda: client.infer("model", [images_input([b"not an image"])]), "400", "not a readable image"),
            (lambda: client.infer("model", [images_input([IMAGES[0]] * 9)]), "413", "MAX_PARTS")]:  # MAX_PARTS: 8
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == status and words in info.value.message(), info.value


def binary_body(header, data):
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head))}


ONE = struct.pack("<I", len(IMAGES[0])) + IMAGES[0]
HOSTILE = {  # name -> (body, headers, status, code)
    "wrong datatype": (json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
                       {}, 400, "invalid_input"),
    "two strings a row": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 2],
                                                  "data": [base64.b64encode(IMAGES[0]).decode()] * 2}]}),
                          {}, 400, "invalid_input"),
    "shape not matching the data": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2],
                                                            "data": [base64.b64encode(IMAGES[0]).decode()]}]}),
                                    {}, 400, "invalid_input"),
    "binary_data_size over the body": (*binary_body({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                                 "parameters": {"binary_data_size": 10**6}}]}, ONE),
                                       400, "invalid_input"),
    "element length past the end": (*binary_body({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                              "parameters": {"binary_data_size": 8}}]},
                                                 struct.pack("<I", 10**9) + b"abcd"), 400, "invalid_input"),
    "negative header length": (b"{}", {"Inference-Header-Content-Length": "-5"}, 400, "invalid_input"),
    "huge header length": (b"{}", {"Inference-Header-Content-Length": "99999999999999999999"}, 400, "invalid_input"),
    "10,000 empty elements": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [10000],
                                                      "data": [""] * 10000}]}), {}, 413, "too_many_images"),
    "an empty element": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                 "data": [""]}]}), {}, 400, "empty_image"),
    "JSON nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, {}, 400, "invalid_input"),
    "not base64": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}),
                   {}, 400, "invalid_input"),
    "unknown output": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                               "data": [base64.b64encode(IMAGES[0]).decode()]}],
                                   "outputs": [{"name": "logits"}]}), {}, 400, "invalid_input"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_v2_requests_get_4xx_and_the_worker_lives(server, case):
    body, headers, status, code = HOSTILE[case]
    pid_before = worker_pid(server)
    r = requests.post(server.url + "/v2/models/model/infer", data=body, headers=headers, timeout=30)
    assert (r.status_code, r.json().get("code")) == (status, code), r.text[:300]
    assert r.json()["error"]
    for path in ("/v2/models/other/infer", "/v2/models/model/versions/7/infer"):
        missing = requests.post(server.url + path, data=json.dumps({"inputs": []}), timeout=30)
        assert missing.status_code == 404, missing.text
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
    assert classify(server.url, IMAGES[0])  # the next request is answered
    assert worker_pid(server) == pid_before  # by the same worker: nothing crashed


def worker_pid(server):
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        return f.read().split()
