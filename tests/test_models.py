"""Several models in one server (MODEL_CONFIG_FILE, TensorFlow Serving's model config): the config
format, version policies and labels, models added, removed and broken at run time, and a two-model
server (a retrained model and a third-party graph described by its own model.json) answering each
model correctly through every protocol, with the clients users have."""
import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import (
    IMAGENET_LABELS,
    ROOT,
    Broker,
    Collector,
    GrpcServer,
    Server,
    Stream,
    predict_request,
    read_labels,
    shape_image,
    third_party_scores,
    write_colour_model,
    write_third_party_model,
)

from classify_server.core import model_config
from classify_server.http_api import create_app

IMAGES = [shape_image(label, 40 + i, size=(70, 50)) for i, label in enumerate(["red_circle", "green_square",
                                                                                "blue_triangle"])]
ENV = {"MODEL_POLL_SECONDS": "0", "MODEL_CONFIG_POLL_SECONDS": "0", "TOP_K": "10"}


def config_text(*models):
    """A model_config_list of (name, base_path[, extra text]) tuples."""
    body = "".join(f'  config {{ name: "{m[0]}" base_path: "{m[1]}" model_platform: "tensorflow" '
                   f'{m[2] if len(m) > 2 else ""} }}\n' for m in models)
    return "model_config_list {\n" + body + "}\n"


def write_config(path, *models):
    """Write the config atomically, as a user's deploy tool should (the poller never reads half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(config_text(*models))
    os.replace(tmp, path)
    return str(path)


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


# --- the config format ----------------------------------------------------------------------------

def test_config_reads_every_field_of_tf_servings_format(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('''
        model_config_list {
          config { name: "flowers" base_path: "/models/flowers" model_platform: "tensorflow"
                   model_version_policy { latest { num_versions: 2 } } }
          config { name: "pinned" base_path: "pinned"
                   model_version_policy { specific { versions: 3 versions: 5 } }
                   version_labels { key: "stable" value: 3 } version_labels { key: "canary" value: 5 } }
          config { name: "every" base_path: "../every" model_version_policy { all {} } }
        }''')
    flowers, pinned, every = model_config.read(path)
    assert (flowers.name, flowers.base_path, flowers.policy, flowers.num_versions) == \
        ("flowers", "/models/flowers", "latest", 2)
    assert pinned.base_path == str(tmp_path / "pinned")  # relative: to the config file's folder
    assert (pinned.policy, pinned.versions, pinned.labels) == ("specific", {3, 5}, {"stable": 3, "canary": 5})
    assert every.policy == "all" and every.base_path == os.path.join(str(tmp_path), "../every")
    assert flowers.wanted([1, 2, 3, 4]) == [3, 4] and pinned.wanted([1, 2, 3, 4, 5]) == [3, 5]
    assert every.wanted([1, 2]) == [1, 2]
    default = model_config.parse('model_config_list { config { name: "m" base_path: "/m" } }', "/")[0]
    assert (default.policy, default.num_versions, default.wanted([1, 2, 3])) == ("latest", 1, [3])  # TF Serving's


@pytest.mark.parametrize("text, expected", [
    ("model_config_list { config { name: 'm' base_path: '/m' }", "line"),  # unclosed: where it broke
    ("model_config_list { config { name: 'm' base_pth: '/m' } }", "base_pth"),
    ("model_config_list { }", "no model"),
    ("", "no model"),
    ("model_config_list { config { base_path: '/m' } }", "has no name"),
    ("model_config_list { config { name: 'm' } }", "'m' has no base_path"),
    ("model_config_list { config { name: 'm' base_path: '/a' } config { name: 'm' base_path: '/b' } }",
     "'m' is configured twice"),
    ("model_config_list { config { name: 'm' base_path: '/m' model_platform: 'pytorch' } }", "only \"tensorflow\""),
    ("model_config_list { config { name: 'm' base_path: '/m' model_version_policy { specific { } } } }",
     "names no versions"),
])
def test_config_errors_say_what_is_wrong(text, expected):
    with pytest.raises(model_config.ConfigError) as info:
        model_config.parse(text, "/", "models.config")
    assert expected in str(info.value) and str(info.value).startswith("models.config: "), info.value


# --- version policies and labels, in one process ---------------------------------------------------

@pytest.fixture(scope="module")
def colour_versions(tmp_path_factory):
    """A base folder with versions 1, 2, 3 of the colour model, each with its own label suffix."""
    base = tmp_path_factory.mktemp("versions") / "colours"
    for version in (1, 2, 3):
        write_colour_model(base / str(version), [f"{c}_v{version}" for c in ("red", "green", "blue")])
    return base


def app_with(tmp_path, *models, **config):
    path = write_config(tmp_path / "models.config", *models)
    return create_app(dict(MODEL_CONFIG_FILE=path, MODEL_POLL_SECONDS=0, MODEL_CONFIG_POLL_SECONDS=0, **config))


def version_of(answer):
    """The version whose labels answered ("red_v3" -> 3)."""
    versions = {label.rsplit("_v", 1)[1] for label, _ in answer}
    assert len(versions) == 1, answer
    return int(versions.pop())


def served(client, name):
    statuses = client.get(f"/v1/models/{name}").get_json()["model_version_status"]
    return sorted(int(s["version"]) for s in statuses if s["state"] == "AVAILABLE")


@pytest.mark.parametrize("policy, versions", [
    ("", [3]),
    ("model_version_policy { latest { num_versions: 2 } }", [2, 3]),
    ("model_version_policy { all {} }", [1, 2, 3]),
    ("model_version_policy { specific { versions: 1 versions: 3 } }", [1, 3]),
])
def test_version_policies_load_the_versions_they_name(colour_versions, tmp_path, policy, versions):
    c = app_with(tmp_path, ("colours", colour_versions, policy)).test_client()
    assert served(c, "colours") == versions
    assert c.get("/v2/models/colours").get_json()["versions"] == [str(v) for v in versions]  # what may be asked for
    assert c.get(f"/v2/models/colours/versions/{versions[0]}").get_json()["versions"] == [str(versions[0])]
    image = {"data": (io.BytesIO(IMAGES[0]), "x.jpg")}
    assert version_of(c.post("/?model=colours", data=image).get_json()) == max(versions)  # the newest by default
    for version in (1, 2, 3):
        r = c.post(f"/v1/models/colours/versions/{version}:predict", json={"instances": [b64(IMAGES[0])]})
        ready = c.get(f"/v2/models/colours/versions/{version}/ready")
        if version in versions:
            assert r.status_code == 200 and ready.status_code == 200
            meta = c.get(f"/v1/models/colours/versions/{version}/metadata").get_json()
            assert meta["metadata"]["labels"][0] == f"red_v{version}"
        else:
            assert r.status_code == 404 and r.get_json()["code"] == "version_not_served", r.get_json()
            assert ready.status_code == 404


def test_version_labels_name_versions_on_every_rest_api(colour_versions, tmp_path):
    policy = ("model_version_policy { specific { versions: 1 versions: 3 } } "
              "version_labels { key: 'stable' value: 1 } version_labels { key: 'canary' value: 3 }")
    c = app_with(tmp_path, ("colours", colour_versions, policy)).test_client()
    for label, version in (("stable", 1), ("canary", 3)):
        r = c.post(f"/v1/models/colours/labels/{label}:predict", json={"instances": [b64(IMAGES[1])]})
        assert r.status_code == 200
        meta = c.get(f"/v1/models/colours/labels/{label}/metadata").get_json()
        assert meta["model_spec"]["version"] == str(version) and meta["metadata"]["labels"][1] == f"green_v{version}"
        classified = c.post(f"/v1/models/colours/labels/{label}:classify", json={"examples": [b64(IMAGES[1])]})
        assert {name for name, _ in classified.get_json()["result"][0]} == {f"{x}_v{version}"
                                                                            for x in ("red", "green", "blue")}
        status = c.get(f"/v1/models/colours/labels/{label}").get_json()["model_version_status"]
        assert [s["version"] for s in status] == [str(version)]
    r = c.post("/v1/models/colours/labels/beta:predict", json={"instances": [b64(IMAGES[1])]})
    assert r.status_code == 404 and "Unrecognized servable version label: beta" in r.get_json()["error"]


# --- models added, removed, changed and broken at run time ---------------------------------------

def test_config_reload_adds_removes_changes_and_survives_bad_configs(colour_versions, tmp_path, caplog):
    one = write_colour_model(tmp_path / "one", ["a", "b", "c"])
    app = app_with(tmp_path, ("colours", colour_versions), ("one", one))
    models, c = app.extensions["models"], app.test_client()
    path = tmp_path / "models.config"

    def post(query):
        return c.post("/" + query, data={"data": (io.BytesIO(IMAGES[2]), "x.jpg")})

    assert c.get("/v1/models").get_json() == {"models": ["colours", "one"]}
    assert version_of(post("").get_json()) == 3  # the first model is the default
    # Added and removed, and a changed policy (loaded anew, then swapped in).
    two = write_colour_model(tmp_path / "two", ["x", "y", "z"])
    write_config(path, ("two", two), ("colours", colour_versions, "model_version_policy { specific { versions: 1 } }"))
    models.reload_config()
    assert c.get("/v1/models").get_json() == {"models": ["two", "colours"]}
    assert {label for label, _ in post("").get_json()} == {"x", "y", "z"}  # the new first model
    assert version_of(post("?model=colours").get_json()) == 1
    r = post("?model=one")
    assert r.status_code == 404 and r.get_json()["code"] == "model_not_found" and "'two'" in r.get_json()["error"]
    # A model that does not load is reported in its status; the others serve, and the server stays ready.
    broken = tmp_path / "broken"
    shutil.copytree(one, broken)
    (broken / "graph.pb").write_bytes(b"not a graph")
    write_config(path, ("two", two), ("colours", colour_versions, "model_version_policy { specific { versions: 1 } }"),
                 ("broken", broken))
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        models.reload_config()
    assert "model 'broken' failed to load" in caplog.text and "graph.pb" in caplog.text
    status = c.get("/v1/models/broken").get_json()["model_version_status"]
    assert status[0]["state"] == "END" and "graph.pb" in status[0]["status"]["error_message"]
    r = post("?model=broken")
    assert r.status_code == 404 and "graph.pb" in r.get_json()["error"]
    assert c.get("/v2/models/broken/ready").status_code == 404
    assert c.get("/readyz").status_code == 200 and c.get("/v2/health/ready").status_code == 200
    assert post("?model=two").status_code == 200 and post("?model=colours").status_code == 200
    # A config that does not parse keeps the models served, and the log says why.
    path.write_text("model_config_list { config { name: 'half")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        models.reload_config()
    assert "not a model_config_list" in caplog.text and "still serving two, colours, broken" in caplog.text
    assert post("?model=colours").status_code == 200
    # Labels change in place: the loaded versions stay.
    before = models.get("colours")
    write_config(path, ("colours", colour_versions,
                        "model_version_policy { specific { versions: 1 } } version_labels { key: 'now' value: 1 }"))
    models.reload_config()
    assert models.get("colours") is before and models.names == ["colours"]
    r = c.post("/v1/models/colours/labels/now:predict", json={"instances": [b64(IMAGES[0])]})
    assert r.status_code == 200


def test_a_changed_model_that_does_not_load_leaves_the_old_one_serving(tmp_path, caplog):
    good = write_colour_model(tmp_path / "good", ["a", "b", "c"])
    app = app_with(tmp_path, ("m", good))
    broken = write_colour_model(tmp_path / "broken", ["x", "y", "z"])
    (tmp_path / "broken" / "graph.pb").write_bytes(b"not a graph")  # (a folder with no version would wait for one)
    write_config(tmp_path / "models.config", ("m", broken))
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        app.extensions["models"].reload_config()
    assert "its new config does not load, the old one keeps serving" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="classify_server"):
        app.extensions["models"].reload_config()  # the same config again: not tried again on every poll
    assert caplog.text == ""
    r = app.test_client().post("/?model=m", data={"data": (io.BytesIO(IMAGES[0]), "x.jpg")})
    assert r.status_code == 200 and {label for label, _ in r.get_json()} == {"a", "b", "c"}


def test_models_added_and_removed_while_a_client_sends_without_pause(tmp_path, start_server):
    """Real gunicorn, 2 workers, polling the config every second: a model added and one removed while
    a client sends requests to the one that stays, and to the others, without pause: none fails."""
    stay = write_colour_model(tmp_path / "stay", ["a", "b", "c"])
    leave = write_colour_model(tmp_path / "leave", ["l1", "l2", "l3"])
    come = write_colour_model(tmp_path / "come", ["n1", "n2", "n3"])
    path = write_config(tmp_path / "models.config", ("stay", stay), ("leave", leave))
    server = start_server({"MODEL_CONFIG_FILE": path, "MODEL_CONFIG_POLL_SECONDS": "1"}, workers=2)
    results, stop = {"stay": [], "leave": [], "come": []}, threading.Event()

    def client_loop():  # bounded in count and time
        session, deadline = requests.Session(), time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(results["stay"]) < 5000:
            for name in results:
                try:
                    r = session.post(f"{server.url}/?model={name}", files={"data": ("x.jpg", IMAGES[0])}, timeout=30)
                    results[name].append((r.status_code, r.json()))
                except requests.RequestException as exc:
                    results[name].append((None, str(exc)))

    def both_workers(name, status, timeout=60):
        """Until 10 answers in a row about `name` (on fresh connections: either worker) are `status`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [requests.post(f"{server.url}/?model={name}", files={"data": ("x.jpg", IMAGES[0])},
                                   timeout=30).status_code for _ in range(10)]
            if codes == [status] * 10:
                return
            time.sleep(0.3)
        raise AssertionError(f"{name}: not {status} on both workers after {timeout}s:\n{server.output()}")

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        time.sleep(2)
        write_config(path, ("stay", stay), ("leave", leave), ("come", come))
        both_workers("come", 200)
        write_config(path, ("stay", stay), ("come", come))
        both_workers("leave", 404)
        deadline = time.monotonic() + 30  # and the client's own kept-alive connection, whichever worker it has
        while results["leave"][-1][0] != 404 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=60)
    stay_codes = [code for code, _ in results["stay"]]
    assert len(stay_codes) > 20 and set(stay_codes) == {200}, [a for a in results["stay"] if a[0] != 200][:3]
    assert all({label for label, _ in answer} == {"a", "b", "c"} for _, answer in results["stay"])
    for name, labels in (("leave", {"l1", "l2", "l3"}), ("come", {"n1", "n2", "n3"})):
        for code, answer in results[name]:  # each answer is either the model's, or model_not_found
            assert (code == 200 and {label for label, _ in answer} == labels) or \
                (code == 404 and answer["code"] == "model_not_found"), (name, code, answer)
    codes = {name: [code for code, _ in answers] for name, answers in results.items()}
    assert 200 in codes["come"] and codes["come"][-1] == 200 and codes["leave"][-1] == 404
    log = server.output()
    assert "model 'come' added" in log and "model 'leave' removed" in log


# --- a two-model server through every protocol -----------------------------------------------------

@pytest.fixture(scope="module")
def two_models(trained_model, tmp_path_factory):
    """(config file, {name: scores(image)}): our retrained model, as version 1 of a base folder, and a
    third-party graph with its own model.json, relative to the config file."""
    root = tmp_path_factory.mktemp("two_models")
    shutil.copytree(trained_model, root / "shapes" / "1")
    write_third_party_model(root / "imagenet")
    path = write_config(root / "models.config", ("shapes", "shapes"), ("imagenet", "imagenet"))
    from classify_server.core.inference import preprocess
    from classify_server.engines.tf_session import TFSessionEngine
    classifier = TFSessionEngine(trained_model)

    def shapes_scores(data):
        return classifier.predict([preprocess(classifier.input_spec, data, None)])[0]

    yield path, {"shapes": (read_labels(trained_model), shapes_scores),
                 "imagenet": (IMAGENET_LABELS, third_party_scores)}
    classifier.close()


@pytest.fixture(scope="module")
def two_model_http(two_models, tmp_path_factory):
    s = Server(dict(ENV, MODEL_CONFIG_FILE=two_models[0]), log_path=tmp_path_factory.mktemp("http") / "gunicorn.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def two_model_grpc(two_models, tmp_path_factory):
    s = GrpcServer(dict(ENV, MODEL_CONFIG_FILE=two_models[0]), tmp_path_factory.mktemp("grpc") / "server.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def answers_by_protocol(name, labels, http, grpc_server):
    """{protocol: [scores of each image, in the order of `labels`]} for model `name`."""
    import tritonclient.grpc as tritongrpc
    import tritonclient.http as tritonhttp
    got = {}
    rows = []
    for image in IMAGES:
        r = requests.post(f"{http.url}/?model={name}&top_k=10", files={"data": ("x.jpg", image)}, timeout=30)
        assert r.status_code == 200, r.text
        rows.append([dict(r.json())[label] for label in labels])
    got["multipart"] = rows
    r = requests.post(f"{http.url}/v1/models/{name}:predict", json={"instances": [b64(i) for i in IMAGES]},
                      timeout=30)
    got["TF Serving REST"] = r.json()["predictions"]
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{http.port}")
    try:
        tensor = tritonhttp.InferInput("images", [len(IMAGES)], "BYTES")
        tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_), binary_data=True)
        result = client.infer(name, [tensor])
        assert [x.decode() for x in result.as_numpy("labels")] == labels
        got["V2 REST (tritonclient.http)"] = result.as_numpy("scores")
        assert client.get_model_metadata(name)["outputs"][0]["shape"] == [-1, len(labels)]
    finally:
        client.close()
    response = grpc_server.prediction.Predict(predict_request(IMAGES, name=name), timeout=30)
    assert [c.decode() for c in tf.make_ndarray(response.outputs["classes"])[0]] == labels
    got["TF Serving gRPC"] = tf.make_ndarray(response.outputs["scores"])
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{grpc_server.port}")
    try:
        tensor = tritongrpc.InferInput("images", [len(IMAGES)], "BYTES")
        tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
        got["V2 gRPC (tritonclient.grpc)"] = client.infer(name, [tensor]).as_numpy("scores")
        assert client.is_model_ready(name)
    finally:
        client.close()
    return got


def test_two_models_are_each_answered_correctly_on_every_protocol(two_models, two_model_http, two_model_grpc,
                                                                   tmp_path):
    _, expected = two_models
    for name, (labels, scores) in expected.items():
        want = np.array([scores(image) for image in IMAGES])
        assert np.ptp(want, axis=0).max() > 0.01, want  # the images get different answers
        for protocol, got in answers_by_protocol(name, labels, two_model_http, two_model_grpc).items():
            np.testing.assert_allclose(np.array(got), want, atol=1e-5, err_msg=f"{name} through {protocol}")
    # Without a model name: the first of the config.
    r = requests.post(two_model_http.url + "/", files={"data": ("x.jpg", IMAGES[0])}, timeout=30)
    assert {label for label, _ in r.json()} <= set(expected["shapes"][0])
    assert requests.get(two_model_http.url + "/readyz", timeout=30).json()["models"] == {"shapes": 1, "imagenet": 1}
    # And the Kafka consumer, --model imagenet.
    broker = Broker(tmp_path / "broker")
    try:
        broker.create_topics("m-in", "m-out", "m-in.dead-letter")
        broker.produce("m-in", [(f"k{i}".encode(), image) for i, image in enumerate(IMAGES)])
        out = Collector(broker, "m-out")
        stream = Stream(broker, tmp_path / "stream.log", "m-in", "m-out", "models",
                        env=dict(ENV, MODEL_CONFIG_FILE=two_models[0]), args=["--model", "imagenet"])
        try:
            messages = {m.key(): json.loads(m.value()) for m in out.wait(len(IMAGES), 90, stream)}
        finally:
            stream.stop()
            out.close()
    finally:
        broker.stop()
    for i, image in enumerate(IMAGES):
        answer = messages[f"k{i}".encode()]
        assert answer["model"] == "imagenet" and answer["model_version"] == 1
        want = dict(zip(IMAGENET_LABELS, third_party_scores(image)))
        assert dict(answer["labels"]) == pytest.approx({label: want[label] for label, _ in answer["labels"]},
                                                       abs=1e-5)


def test_the_environments_graph_settings_are_refused_with_a_config_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", "127.0.0.1:0"], cwd=ROOT,
                            env=dict(os.environ, MODEL_CONFIG_FILE=str(tmp_path / "x.config"), INPUT_LAYER="input"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "INPUT_LAYER describes MODEL_DIR's graph; with MODEL_CONFIG_FILE each model's model.json" in result.stderr


@pytest.mark.parametrize("config, expected", [
    ("model_config_list { config { name: 'm' ", "not a model_config_list in TensorFlow Serving's text format"),
    (config_text(("m", "/a"), ("m", "/b")), "model 'm' is configured twice"),  # (a missing base_path waits)
])
def test_gunicorn_stops_with_one_line_on_a_bad_config(tmp_path, config, expected):
    path = tmp_path / "models.config"
    path.write_text(config)
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", "127.0.0.1:0"], cwd=ROOT,
                            env=dict(os.environ, MODEL_CONFIG_FILE=str(path), TMPDIR=str(temp)), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Booting worker" not in result.stderr  # before any worker
    assert os.listdir(temp) == []  # issue 20: its metrics folder is removed on a failed start too


def test_a_model_dir_one_level_too_high_gets_a_suggestion(tmp_path):
    """Issue 20: MODEL_DIR naming the folder above a model says which one was probably meant."""
    model = write_colour_model(tmp_path / "models" / "flowers")
    # From the checkout (./gunicorn.conf.py), and from any other folder with the settings named as a module.
    for cwd, config in ((ROOT, []), (tmp_path, ["-c", "python:classify_server.http_server.gunicorn_config"])):
        result = subprocess.run([sys.executable, "-m", "gunicorn", *config, "classify_server:app", "-b", "127.0.0.1:0"],
                                cwd=cwd, env=dict(os.environ, MODEL_DIR=str(tmp_path / "models")),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and f"did you mean MODEL_DIR={model}?" in result.stderr, (cwd, result.stderr)


def test_grpc_server_names_the_model_that_does_not_load(tmp_path, trained_model):
    write_colour_model(tmp_path / "bad")
    (tmp_path / "bad" / "graph.pb").write_bytes(b"not a graph")  # (a folder with no version would wait for one)
    path = write_config(tmp_path / "models.config", ("good", trained_model), ("bad", tmp_path / "bad"))
    result = subprocess.run([sys.executable, "-m", "classify_server.grpc_server", "--port", "0"], cwd=ROOT,
                            env=dict(os.environ, MODEL_CONFIG_FILE=path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "classify_server.grpc_server: model 'bad': " in result.stderr, result.stderr
    assert "graph.pb" in result.stderr
