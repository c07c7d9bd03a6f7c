"""Model versions and TF Serving's REST API, in this process: the newest complete version, a broken one,
REST predict, errors and metadata."""
import base64
import json
import os
import shutil

import numpy as np
import pytest
from support.images import shape_image
from support.models import publish_copy

from classify_server.http_api import create_app

IMAGES = [shape_image(label, seed) for seed, label in enumerate(["red_circle", "green_square", "blue_triangle"])]


@pytest.fixture
def client(trained_model):
    return create_app({"MODEL_DIR": trained_model}).test_client()


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


def test_broken_version_is_reported_and_old_keeps_serving(trained_model, tmp_path):
    base = tmp_path / "models"
    base.mkdir()
    publish_copy(trained_model, base, 1, "")
    app = create_app({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": 0})
    broken = base / ".tmp"
    shutil.copytree(trained_model, broken)
    (broken / "graph.pb").write_bytes(b"not a graph")
    broken.rename(base / "2")
    app.extensions["models"].poll_versions()
    c = app.test_client()
    status = {s["version"]: s for s in c.get("/v1/models/model").get_json()["model_version_status"]}
    assert status["1"]["state"] == "AVAILABLE"
    assert status["2"]["state"] == "END" and "graph.pb" in status["2"]["status"]["error_message"]
    assert c.post("/", data={"data": (__import__("io").BytesIO(IMAGES[0]), "x.jpg")}).status_code == 200
    assert c.get("/readyz").get_json()["version"] == 1


def test_start_up_picks_the_newest_complete_version(trained_model, tmp_path):
    base = tmp_path / "models"
    base.mkdir()
    publish_copy(trained_model, base, 1, "_v1")
    publish_copy(trained_model, base, 7, "_v7")
    (base / "9").mkdir()  # incomplete: no graph.pb
    (base / ".tmp-8").mkdir()
    c = create_app({"MODEL_DIR": str(base)}).test_client()
    assert c.get("/readyz").get_json()["version"] == 7
    assert c.get("/v1/models/model/versions/7").get_json()["model_version_status"][0]["state"] == "AVAILABLE"
    assert c.get("/v1/models/model/versions/9").status_code == 404


def test_rest_predict_matches_the_multipart_answer(client, trained_model):
    labels = open(os.path.join(trained_model, "labels.txt")).read().split()
    r = client.post("/v1/models/model:predict", json={"instances": [b64(IMAGES[0]), {"images": b64(IMAGES[1])}]})
    assert r.status_code == 200
    predictions = r.get_json()["predictions"]
    assert np.array(predictions).shape == (2, len(labels))
    for image, scores in zip(IMAGES, predictions):
        answer = client.post("/?top_k=10", data={"data": (__import__("io").BytesIO(image), "x.jpg")}).get_json()
        assert dict(answer) == pytest.approx(dict(zip(labels, scores)), abs=1e-6)
    columnar = client.post("/v1/models/model/versions/1:predict", json={"inputs": {"images": [b64(IMAGES[0])]}})
    assert columnar.get_json()["outputs"][0] == pytest.approx(predictions[0], abs=1e-6)
    classify = client.post("/v1/models/model:classify", json={"examples": [{"images": b64(IMAGES[0])}]})
    assert [label for label, _ in classify.get_json()["result"][0]] == labels
    assert [s for _, s in classify.get_json()["result"][0]] == pytest.approx(predictions[0], abs=1e-6)


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/models/model:predict", "not json", 400, "invalid_input"),
    ("/v1/models/model:predict", {"nothing": []}, 400, "invalid_input"),
    ("/v1/models/model:predict", {"instances": []}, 400, "invalid_input"),
    ("/v1/models/model:predict", {"instances": [{"b64": "%%%"}]}, 400, "invalid_input"),
    ("/v1/models/model:predict", {"instances": [{"b64": base64.b64encode(b"text").decode()}]}, 400, "invalid_image"),
    ("/v1/models/model:predict", {"instances": [[1, 2, 3]]}, 400, "invalid_input"),
    ("/v1/models/other:predict", {"instances": [b64(IMAGES[0])]}, 404, "model_not_found"),
    ("/v1/models/model/versions/5:predict", {"instances": [b64(IMAGES[0])]}, 404, "version_not_served"),
    ("/v1/models/model:classify", {"instances": [b64(IMAGES[0])]}, 400, "invalid_input"),
])
def test_rest_errors_are_tf_serving_shaped(client, path, body, status, code):
    """TF Serving's {"error": message}, and the core's machine-readable code beside it."""
    r = client.post(path, data=body if isinstance(body, str) else json.dumps(body),
                    content_type="application/json")
    assert r.status_code == status
    assert set(r.get_json()) == {"error", "code"} and r.get_json()["error"]
    assert r.get_json()["code"] == code


def test_metadata_reports_the_signature_and_the_model(client, trained_model):
    meta = client.get("/v1/models/model/metadata").get_json()
    assert meta["model_spec"] == {"name": "model", "signature_name": "", "version": "1"}
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_STRING"
    assert meta["metadata"]["labels"] == open(os.path.join(trained_model, "labels.txt")).read().split()
    assert client.get("/v1/models/nope/metadata").status_code == 404
