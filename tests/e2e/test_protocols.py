"""One image, and the same bad inputs, through every protocol: the same scores and the same error codes.

Every protocol is a thin adapter over the inference core (classify_server.core.inference), so an image
must get the same scores (within 1e-6) through multipart POST /, TF Serving REST :predict and
:classify, the V2 protocol's infer, TF Serving gRPC Predict, the Kafka stream consumer and the
label_image CLI; and each bad input must get the same code everywhere, as each protocol's own status
(HTTP status and JSON "code", gRPC status, the dead-letter headers, the CLI's exit status and JSON
"code"). Real processes, each on a loopback port, with the colour model (fast, and its scores depend
on the image).
"""
import base64
import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from support import ROOT
from support.clients import Collector, rpc_error
from support.images import CLASSES, png_bytes, shape_image
from support.models import write_colour_model
from support.processes import Broker, GrpcServer, Server, Stream, running

LABELS = list(CLASSES)
ENV = {"MAX_PARTS": "2", "MAX_IMAGE_PIXELS": "1000000", "TOP_K": "3", "MODEL_POLL_SECONDS": "0"}
GOOD = shape_image("green_square", 3, size=(80, 60))
TRUNCATED = shape_image("red_circle", 4, size=(320, 240))[:400]
BOMB = png_bytes(2000, 2000)  # 4e6 pixels declared, over MAX_IMAGE_PIXELS above, in a few bytes
# code -> (HTTP status, gRPC status, dead-letter error.type, label_image exit status)
EXPECTED = {
    "invalid_image": (400, grpc.StatusCode.INVALID_ARGUMENT, "InvalidImage", 1),
    "image_too_large": (413, grpc.StatusCode.RESOURCE_EXHAUSTED, "ImageTooLarge", 1),
    "too_many_images": (413, grpc.StatusCode.RESOURCE_EXHAUSTED, None, None),
    "model_not_found": (404, grpc.StatusCode.NOT_FOUND, None, None),
    "version_not_served": (404, grpc.StatusCode.NOT_FOUND, None, None),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_colour_model(tmp_path_factory.mktemp("protocols") / "model", LABELS, sharpness=16.0)


@pytest.fixture(scope="module")
def http(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "gunicorn.log"
    with running(Server(dict(ENV, MODEL_DIR=model), log_path=log)) as server:
        yield server


@pytest.fixture(scope="module")
def grpc_server(model, tmp_path_factory):
    with running(GrpcServer(dict(ENV, MODEL_DIR=model), tmp_path_factory.mktemp("grpc") / "server.log")) as server:
        yield server


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def multipart(http, images, query=""):
    return requests.post(http.url + "/" + query, files=[("data", (f"{i}.jpg", d)) for i, d in enumerate(images)],
                         timeout=30)


def rest(http, images, path="model"):
    return requests.post(f"{http.url}/v1/models/{path}:predict", json={"instances": [b64(d) for d in images]},
                         timeout=30)


def v2(http, images, path="model"):
    """The Open Inference Protocol's infer, JSON with base64 images."""
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(d).decode() for d in images]}]}
    return requests.post(f"{http.url}/v2/models/{path}/infer", json=body, timeout=30)


def label_image(model, paths):
    """label_image's stdin mode: one JSON line per path, full-precision scores."""
    result = subprocess.run([sys.executable, "-m", "classify_server.label_image", "--graph",
                             os.path.join(model, "graph.pb"), "--top_k", "3"], cwd=ROOT, input="\n".join(paths),
                            env=dict(os.environ, **ENV), capture_output=True, text=True, timeout=120)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def stream_run(model, broker, tmp_path, values, timeout=90):
    """Each value as one message through the embedded stream consumer: (predictions, dead letters) by key."""
    broker.create_topics("p-in", "p-out", "p-in.dead-letter")
    broker.produce("p-in", [(f"k{i}".encode(), v) for i, v in enumerate(values)])
    out, dead = Collector(broker, "p-out"), Collector(broker, "p-in.dead-letter")
    stream = Stream(broker, tmp_path / "stream.log", "p-in", "p-out", "protocols", env=dict(ENV, MODEL_DIR=model))
    try:
        deadline = time.monotonic() + timeout
        while len(out.messages) + len(dead.messages) < len(values):
            assert stream.process.poll() is None, stream.output()
            assert time.monotonic() < deadline, f"{len(out.messages)} + {len(dead.messages)} of {len(values)} " \
                                                f"answered after {timeout}s:\n{stream.output()}"
            out.read(0.2)
            dead.read(0.2)
        return ({m.key(): json.loads(m.value()) for m in out.messages},
                {m.key(): {k: v.decode() for k, v in m.headers()} for m in dead.messages})
    finally:
        stream.stop()
        out.close()
        dead.close()


def test_the_same_image_gets_the_same_scores_through_every_protocol(model, http, grpc_server, tmp_path):
    scores = {}
    answer = multipart(http, [GOOD], "?top_k=3").json()
    scores["multipart"] = [dict(answer)[label] for label in LABELS]
    scores["rest :predict"] = rest(http, [GOOD]).json()["predictions"][0]
    classified = requests.post(http.url + "/v1/models/model:classify", json={"examples": [{"images": b64(GOOD)}]},
                               timeout=30).json()["result"][0]
    scores["rest :classify"] = [dict(classified)[label] for label in LABELS]
    scores["v2 infer"] = next(o for o in v2(http, [GOOD]).json()["outputs"] if o["name"] == "scores")["data"]
    scores["grpc Predict"] = tf.make_ndarray(grpc_server.predict([GOOD]).outputs["scores"])[0].tolist()
    (tmp_path / "good.jpg").write_bytes(GOOD)
    status, lines, stderr = label_image(model, [str(tmp_path / "good.jpg")])
    assert status == 0, stderr
    scores["label_image"] = [dict(lines[0]["labels"])[label] for label in LABELS]
    broker = Broker(tmp_path / "broker.log")
    try:
        predictions, dead = stream_run(model, broker, tmp_path, [GOOD])
    finally:
        broker.stop()
    assert not dead, dead
    scores["stream"] = [dict(predictions[b"k0"]["labels"])[label] for label in LABELS]

    reference = np.array(scores["multipart"])
    assert np.ptp(reference) > 0.05, reference  # the scores depend on the image: a real comparison
    for protocol, got in scores.items():
        np.testing.assert_allclose(got, reference, atol=1e-6, rtol=0, err_msg=protocol)


def test_the_same_bad_inputs_get_the_same_codes_through_every_protocol(model, http, grpc_server, tmp_path):
    cases = {  # code -> how each protocol sends it; None where the protocol cannot express it
        "invalid_image": dict(multipart=([TRUNCATED], ""), rest=([TRUNCATED], "model"), grpc=([TRUNCATED], {}),
                              stream=TRUNCATED, label_image=TRUNCATED),
        "image_too_large": dict(multipart=([BOMB], ""), rest=([BOMB], "model"), grpc=([BOMB], {}),
                                stream=BOMB, label_image=BOMB),
        "too_many_images": dict(multipart=([GOOD] * 3, ""), rest=([GOOD] * 3, "model"), grpc=([GOOD] * 3, {})),
        "model_not_found": dict(multipart=([GOOD], "?model=other"), rest=([GOOD], "other"),
                                grpc=([GOOD], {"name": "other"})),
        "version_not_served": dict(multipart=([GOOD], "?version=7"), rest=([GOOD], "model/versions/7"),
                                   grpc=([GOOD], {"version": 7})),
    }
    # The stream and label_image take one image per message or line: the per-image codes only.
    one_per = {code: case for code, case in cases.items() if "stream" in case}
    broker = Broker(tmp_path / "broker.log")
    try:
        _, dead = stream_run(model, broker, tmp_path, [case["stream"] for case in one_per.values()])
    finally:
        broker.stop()
    paths = []
    for code, case in one_per.items():
        (tmp_path / f"{code}.img").write_bytes(case["label_image"])
        paths.append(str(tmp_path / f"{code}.img"))
    cli_status, cli_lines, stderr = label_image(model, paths)

    for code, case in cases.items():
        http_status, grpc_status, dead_letter_type, exit_status = EXPECTED[code]
        r = multipart(http, *case["multipart"])
        assert (r.status_code, r.json()["code"]) == (http_status, code), ("multipart", code, r.text)
        r = rest(http, *case["rest"])
        assert (r.status_code, r.json()["code"]) == (http_status, code), ("rest", code, r.text)
        r = v2(http, *case["rest"])  # the same model paths: NAME[/versions/V]
        assert (r.status_code, r.json()["code"]) == (http_status, code), ("v2", code, r.text)
        images, spec = case["grpc"]
        assert rpc_error(grpc_server.predict, images, **spec).code() == grpc_status, ("grpc", code)
        if code in one_per:
            i = list(one_per).index(code)
            headers = dead[f"k{i}".encode()]
            assert (headers["error.code"], headers["error.type"]) == (code, dead_letter_type), headers
            assert cli_lines[i]["code"] == code and cli_lines[i]["error"], cli_lines[i]
    assert cli_status == max(EXPECTED[code][3] for code in one_per), stderr
    # Every worker and process is still there, and answers the next request correctly.
    assert multipart(http, [GOOD]).status_code == 200
    assert grpc_server.predict([GOOD]).outputs["scores"]
