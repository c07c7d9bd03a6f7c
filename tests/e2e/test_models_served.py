"""Several models in real servers (MODEL_CONFIG_FILE): models added and removed under gunicorn while a
client sends, a two-model server (a retrained model and a third-party graph described by its own
model.json) answering each model correctly through every protocol with the clients users have, and the
one line gunicorn and the gRPC server stop with on a bad config."""
import json
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
from support import ROOT
from support.clients import Collector, b64, predict_request
from support.images import shape_image
from support.models import (
    IMAGENET_LABELS,
    config_text,
    read_labels,
    third_party_scores,
    write_colour_model,
    write_config,
    write_third_party_model,
)
from support.processes import Broker, GrpcServer, Server, Stream, running

IMAGES = [shape_image(label, 40 + i, size=(70, 50)) for i, label in enumerate(["red_circle", "green_square",
                                                                                "blue_triangle"])]
ENV = {"MODEL_POLL_SECONDS": "0", "MODEL_CONFIG_POLL_SECONDS": "0", "TOP_K": "10"}


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
    log = tmp_path_factory.mktemp("http") / "gunicorn.log"
    with running(Server(dict(ENV, MODEL_CONFIG_FILE=two_models[0]), log_path=log)) as s:
        yield s


@pytest.fixture(scope="module")
def two_model_grpc(two_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    with running(GrpcServer(dict(ENV, MODEL_CONFIG_FILE=two_models[0]), log)) as s:
        yield s


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
