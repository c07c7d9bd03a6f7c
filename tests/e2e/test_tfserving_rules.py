"""TF Serving's REST rules on :predict and :classify (issue 28), JSON nesting refused on every JSON route,
and every protocol finding the model before it reads the inputs (404 / NOT_FOUND before 400).

The rules come from TF Serving's REST API document: exactly one of "instances" and "inputs"; a
signature_name that names the served signature; only the signature's inputs; "examples" for :classify,
with "context" features in no example; errors as {"error": ...}. The colour model (a tiny frozen graph,
no training) serves; the Flask test client checks each rule, real gunicorn and gRPC servers the rest.
"""
import base64
import json

import grpc
import numpy as np
import pytest
import requests
from support.clients import post_images, predict_request, rpc_error
from support.images import shape_image
from support.models import write_colour_model
from support.processes import GrpcServer, Server, running

IMAGE = shape_image("green_square", 1, size=(40, 30))
DEEP = b"[" * 100_000 + b"]" * 100_000
MODEL = "model"


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_colour_model(tmp_path_factory.mktemp("tfs-rules") / "model")


@pytest.fixture(scope="module")
def client(model):
    from support.clients import make_app
    return make_app(model, MODEL_POLL_SECONDS="0").test_client()


@pytest.fixture(scope="module")
def http(model, tmp_path_factory):
    with running(Server({"MODEL_DIR": model, "MODEL_POLL_SECONDS": "0"},
                    log_path=tmp_path_factory.mktemp("tfs-rules-http") / "gunicorn.log")) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_server(model, tmp_path_factory):
    with running(GrpcServer({"MODEL_DIR": model, "MODEL_POLL_SECONDS": "0"},
                        tmp_path_factory.mktemp("tfs-rules-grpc") / "server.log")) as server:
        yield server


def refused(response, words):
    """A 400 with TF Serving's error body, saying `words`."""
    body = response.get_json()
    assert response.status_code == 400, (response.status_code, body)
    assert isinstance(body.get("error"), str) and words in body["error"], body
    assert body.get("code") == "invalid_input", body


# --- TF Serving's REST rules -----------------------------------------------------------------------------

def test_predict_takes_instances_or_inputs_not_both(client):
    both = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(IMAGE)], "inputs": [b64(IMAGE)]})
    refused(both, "only one of 'inputs' or 'instances'")
    refused(client.post(f"/v1/models/{MODEL}:predict", json={"signature_name": ""}), "Missing 'inputs' or 'instances'")
    rows = client.post(f"/v1/models/{MODEL}:predict", json={"instances": [b64(IMAGE)]})
    columns = client.post(f"/v1/models/{MODEL}:predict", json={"inputs": {"images": [b64(IMAGE)]}})
    assert rows.status_code == columns.status_code == 200, (rows.get_json(), columns.get_json())
    assert rows.get_json()["predictions"] == columns.get_json()["outputs"]


@pytest.mark.parametrize("verb, body", [("predict", {"instances": [b64(IMAGE)]}),
                                        ("classify", {"examples": [{"images": b64(IMAGE)}]})])
def test_signature_name_must_be_the_served_one(client, verb, body):
    for name in ("", "serving_default", "predict_images"):  # the default, its name, inception_client.py's
        ok = client.post(f"/v1/models/{MODEL}:{verb}", json=dict(body, signature_name=name))
        assert ok.status_code == 200, (name, ok.get_json())
    refused(client.post(f"/v1/models/{MODEL}:{verb}", json=dict(body, signature_name="classify_objects")),
            'Serving signature name: "classify_objects" not found')
    refused(client.post(f"/v1/models/{MODEL}:{verb}", json=dict(body, signature_name=7)),
            "'signature_name' key must be a string")


def test_only_the_signatures_input(client):
    url = f"/v1/models/{MODEL}:predict"
    refused(client.post(url, json={"inputs": {"images": [b64(IMAGE)], "captions": ["x"]}}),
            "input tensor alias not found in signature: captions")
    refused(client.post(url, json={"inputs": {"pixels": [b64(IMAGE)]}}), "input tensor alias not found")
    refused(client.post(url, json={"instances": [{"images": b64(IMAGE), "captions": "x"}]}),
            "instance 0: input tensor alias not found in signature: captions")
    # {"b64": ...} is a binary value only alone: with another key it is a map of input names
    refused(client.post(url, json={"instances": [dict(b64(IMAGE), x=1)]}), "input tensor alias not found")
    single = client.post(url, json={"inputs": b64(IMAGE)})  # one input, one value: columnar, unnamed
    assert single.status_code == 200 and len(single.get_json()["outputs"]) == 1, single.get_json()


def test_classify_takes_examples_and_a_context_apart_from_them(client):
    url = f"/v1/models/{MODEL}:classify"
    refused(client.post(url, json={"instances": [b64(IMAGE)]}), "Missing 'examples'")
    refused(client.post(url, json={"examples": ["not an example"]}), "example 0: expected a JSON object")
    refused(client.post(url, json={"examples": [{"images": b64(IMAGE)}], "context": ["x"]}), "'context'")
    refused(client.post(url, json={"examples": [{"images": b64(IMAGE)}], "context": {"images": b64(IMAGE)}}),
            "example 0: feature 'images' is also in 'context'")
    shared = client.post(url, json={"examples": [{}, {}], "context": {"images": b64(IMAGE)}})  # the context's image
    alone = client.post(url, json={"examples": [{"images": b64(IMAGE)}]})
    assert shared.status_code == alone.status_code == 200, (shared.get_json(), alone.get_json())
    assert shared.get_json()["result"] == alone.get_json()["result"] * 2
    # one image in the context, a million examples: over MAX_PARTS, refused, not a million images decoded
    many = client.post(url, json={"examples": [{}] * 1_000_000, "context": {"images": b64(IMAGE)}})
    assert many.status_code == 413 and many.get_json()["code"] == "too_many_images", many.get_json()


def test_body_of_any_content_type_and_errors_as_tf_serving_words_them(client):
    """TF Serving reads the body whatever its Content-Type (its own curl -d examples send a form's)."""
    body = json.dumps({"instances": [b64(IMAGE)]})
    form = client.post(f"/v1/models/{MODEL}:predict", data=body, content_type="application/x-www-form-urlencoded")
    assert form.status_code == 200, form.get_json()
    refused(client.post(f"/v1/models/{MODEL}:predict", data="{", content_type="application/json"), "not valid JSON")
    refused(client.post(f"/v1/models/{MODEL}:predict", json=[b64(IMAGE)]), "JSON object")
    refused(client.post(f"/v1/models/{MODEL}:predict", data="[1]".encode("utf-16"), content_type="application/json"),
            "not valid JSON")  # UTF-8 only: a UTF-16 body could hide its brackets from the depth check


# --- JSON nesting, on every route that parses JSON ---------------------------------------------------------

JSON_ROUTES = {
    "TF Serving :predict": ("/v1/models/model:predict", {}),
    "TF Serving :predict, a version": ("/v1/models/model/versions/1:predict", {}),
    "TF Serving :classify": ("/v1/models/model:classify", {}),
    "TF Serving :classify, a version": ("/v1/models/model/versions/1:classify", {}),
    "V2 infer": ("/v2/models/model/infer", {}),
    "V2 infer, a version": ("/v2/models/model/versions/1/infer", {}),
}


@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_deep_json_is_400_on_every_json_route_of_a_real_server(http, route):
    path, headers = JSON_ROUTES[route]
    for body in (DEEP, b'{"inputs": ' + b"[" * 33 + b"]" * 33 + b"}"):  # 100,000 deep; one past the limit
        response = requests.post(http.url + path, data=body, headers={"Content-Type": "application/json", **headers},
                                 timeout=30)
        assert response.status_code == 400, (response.status_code, response.text[:300])
        assert response.json()["code"] == "invalid_input" and "deeper than 32" in response.json()["error"]
    assert requests.get(http.url + "/readyz", timeout=10).status_code == 200  # and the worker lives


def test_deep_json_in_the_v2_binary_header_is_400(http):
    body = DEEP + b"\x00\x00\x00\x00"
    response = requests.post(http.url + "/v2/models/model/infer", data=body,
                             headers={"Inference-Header-Content-Length": str(len(DEEP))}, timeout=30)
    assert response.status_code == 400 and "deeper than 32" in response.json()["error"], response.text[:300]


def test_brackets_in_strings_and_nesting_at_the_limit_are_not_refused(client):
    from classify_server.codecs.json_body import MAX_DEPTH, nests_deeper
    assert not nests_deeper(b'["' + b"[" * 1000 + b'"]')
    assert not nests_deeper(b'["\\"' + b"{" * 1000 + b'"]')  # an escaped quote does not end the string
    assert nests_deeper(b'["\\\\"' + b"{" * 1000 + b'"]')  # an escaped backslash does
    assert not nests_deeper(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) and nests_deeper(b"[" * (MAX_DEPTH + 1))
    assert nests_deeper(b"[]" * 100 + b"[" * (MAX_DEPTH + 1))
    # a request nested a few levels past what it needs, with brackets in a string: answered as usual
    body = {"instances": [b64(IMAGE)], "signature_name": "", "note": "[[[[{{{{" * 100}
    assert client.post(f"/v1/models/{MODEL}:predict", json=body).status_code == 200


# --- the model before the inputs, on every protocol ----------------------------------------------------------

def test_core_resolves_the_model_before_it_checks_the_images(client):
    from classify_server.core.inference import InferenceError
    core = client.application.extensions["inference"]
    for model, version, code in [("nope", None, "model_not_found"), (None, 99, "version_not_served")]:
        with pytest.raises(InferenceError) as info:
            core.classify([b""] * 1000, model, version)  # empty, and over MAX_PARTS: the model is found first
        assert info.value.code == code


@pytest.mark.parametrize("query, code", [("?model=nope", "model_not_found"), ("?version=99", "version_not_served")])
def test_multipart_answers_404_before_the_images(http, query, code):
    response = requests.post(http.url + "/" + query, files=[("data", ("empty.jpg", b""))], timeout=30)
    assert response.status_code == 404 and response.json()["code"] == code, response.text
    no_form = requests.post(http.url + "/" + query, data=b"not a form", timeout=30)
    assert no_form.status_code == 404 and no_form.json()["code"] == code, no_form.text


TFS_BAD_BODIES = {
    "an empty image": json.dumps({"instances": [{"b64": ""}]}).encode(),
    "not JSON": b"{",
    "nested 100,000 deep": DEEP,
    "both instances and inputs": json.dumps({"instances": [b64(IMAGE)], "inputs": [b64(IMAGE)]}).encode(),
    "an unknown signature": json.dumps({"instances": [b64(IMAGE)], "signature_name": "nope"}).encode(),
}


@pytest.mark.parametrize("path, code", [("nope", "model_not_found"), ("model/versions/99", "version_not_served")])
@pytest.mark.parametrize("bad", list(TFS_BAD_BODIES))
def test_tf_serving_rest_answers_404_before_the_body(http, path, code, bad):
    for verb in ("predict", "classify"):
        response = requests.post(f"{http.url}/v1/models/{path}:{verb}", data=TFS_BAD_BODIES[bad], timeout=30)
        assert response.status_code == 404, (verb, response.status_code, response.text[:300])
        assert response.json()["code"] == code and "Servable not found" in response.json()["error"]


@pytest.mark.parametrize("path, code", [("nope", "model_not_found"), ("model/versions/99", "version_not_served")])
def test_v2_rest_answers_404_before_the_tensors(http, path, code):
    empty = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [""]}]}
    for body in (json.dumps(empty).encode(), b"{", DEEP):
        response = requests.post(f"{http.url}/v2/models/{path}/infer", data=body, timeout=30)
        assert response.status_code == 404 and response.json()["code"] == code, response.text[:300]


def test_tf_serving_grpc_answers_not_found_before_the_inputs(grpc_server):
    for name, version in [("nope", None), (MODEL, 99)]:
        for request in (predict_request([b""], name, version),  # an empty image
                        predict_request([IMAGE], name, version, signature_name="nope"),  # an unknown signature
                        predict_request([b""] * 1000, name, version)):  # over MAX_PARTS
            error = rpc_error(grpc_server.prediction.Predict, request, timeout=30)
            assert error.code() == grpc.StatusCode.NOT_FOUND, (name, version, error.details())
            assert "Servable not found" in error.details()


def test_v2_grpc_answers_not_found_before_the_tensors(grpc_server):
    tritongrpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]: pip install -e '.[test]'")
    from tritonclient.utils import InferenceServerException
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{grpc_server.port}")
    try:
        empty = tritongrpc.InferInput("images", [1], "BYTES")
        empty.set_data_from_numpy(np.array([b""], dtype=np.object_))
        wrong = tritongrpc.InferInput("pixels", [1], "FP32")
        wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        for name, version in [("nope", ""), (MODEL, "99")]:
            for inputs in ([empty], [wrong]):
                with pytest.raises(InferenceServerException) as info:
                    client.infer(name, inputs, model_version=version)
                assert info.value.status() == str(grpc.StatusCode.NOT_FOUND), info.value
        with pytest.raises(InferenceServerException) as info:  # the model served: now the empty image counts
            client.infer(MODEL, [empty])
        assert info.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT), info.value
    finally:
        client.close()


def test_the_flask_app_finds_the_model_before_the_upload(client):
    """In process too: the model first on POST /, and an empty image 400 once the model is served."""
    assert post_images(client, [b""], "?model=nope").status_code == 404
    assert post_images(client, [b""]).get_json()["code"] == "empty_image"
