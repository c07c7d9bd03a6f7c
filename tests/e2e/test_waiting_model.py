"""A MODEL_CONFIG_FILE model listed before it has a version (issue 28): it waits, as TF Serving's does,
reported in its status (state START) and answered model_not_found meanwhile, while the others serve;
its first version is loaded by the version poller. MODEL_DIR's single model is still refused at start."""
import base64
import io
import os
import subprocess
import sys
import time

import numpy as np
import requests
from PIL import Image
from support import ROOT
from support.clients import TIMEOUT, rpc_error
from support.models import write_colour_model
from support.processes import GrpcServer

COLOURS = {"red": (200, 20, 20), "green": (20, 180, 30), "blue": (10, 30, 220)}


def png(colour):
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, "PNG")
    return out.getvalue()


B64_RED = base64.b64encode(png(COLOURS["red"])).decode()


def colour_scores(colour):
    """What write_colour_model's graph answers for a plain image: the softmax of its colour over 32."""
    e = np.exp(np.array(colour, dtype=np.float64) / 32.0)
    return e / e.sum()


def write_config(path, models):
    body = "".join(f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
                   for name, base in models)
    path.write_text("model_config_list {\n" + body + "}\n")
    return str(path)


def publish(base, version, labels, staging):
    """A version put in place as retrain puts one: written aside, then renamed in (never half a model)."""
    folder = write_colour_model(staging / f"{base.name}-{version}", labels)
    os.makedirs(base, exist_ok=True)
    os.rename(folder, base / str(version))


def classify(url, model, colour):
    return requests.post(f"{url}/?model={model}&top_k=3", files={"data": ("x.png", png(COLOURS[colour]))},
                         timeout=TIMEOUT)


def assert_answers(url, model, prefix):
    """Every colour is answered by `model` with the scores its graph must give, labels `prefix`_colour."""
    for colour, value in COLOURS.items():
        r = classify(url, model, colour)
        assert r.status_code == 200, r.text
        answer = dict((label, score) for label, score in r.json())
        expected = colour_scores(value)
        assert max(answer, key=answer.get) == f"{prefix}_{colour}"
        for i, name in enumerate(COLOURS):
            assert abs(answer[f"{prefix}_{name}"] - expected[i]) < 1e-4, (answer, expected)


def wait_for(check, seconds, what):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {seconds} s"
        time.sleep(0.2)


def test_a_model_without_a_version_waits_and_is_served_when_its_first_version_appears(tmp_path, start_server):
    serving, later, absent = tmp_path / "serving", tmp_path / "later", tmp_path / "not" / "yet"
    publish(serving, 1, [f"s_{c}" for c in COLOURS], tmp_path)
    later.mkdir()  # exists, empty
    config = write_config(tmp_path / "models.config", [("serving", serving), ("later", later), ("absent", absent)])
    server = start_server({"MODEL_CONFIG_FILE": config, "MODEL_POLL_SECONDS": "1", "MODEL_CONFIG_POLL_SECONDS": "0"},
                          workers=2)
    url = server.url
    assert requests.get(url + "/readyz", timeout=TIMEOUT).status_code == 200  # the waiting ones hold nothing up
    assert_answers(url, "serving", "s")
    assert requests.get(url + "/v1/models", timeout=TIMEOUT).json() == {"models": ["serving", "later", "absent"]}
    for name, where in (("later", f"no version in {later} yet"), ("absent", f"{absent} does not exist yet")):
        status = requests.get(f"{url}/v1/models/{name}", timeout=TIMEOUT).json()["model_version_status"]
        assert [(s["version"], s["state"], s["status"]["error_code"]) for s in status] == [("0", "START", "OK")]
        assert "waiting for its first version" in status[0]["status"]["error_message"], status
        assert where in status[0]["status"]["error_message"], status
        r = classify(url, name, "red")
        assert r.status_code == 404 and r.json()["code"] == "model_not_found", r.text
        assert f"model {name!r} is not available yet: waiting for its first version" in r.json()["error"]
        r = requests.post(f"{url}/v1/models/{name}:predict", json={"instances": [{"b64": B64_RED}]}, timeout=TIMEOUT)
        assert r.status_code == 404 and "not available yet" in r.json()["error"], r.text
    assert "waiting for its first version" in server.output()  # and the log says so

    publish(later, 1, [f"l_{c}" for c in COLOURS], tmp_path)
    publish(absent, 3, [f"a_{c}" for c in COLOURS], tmp_path)
    for name, version in (("later", "1"), ("absent", "3")):  # each worker polls every second and loads it
        wait_for(lambda name=name: all(classify(url, name, "red").status_code == 200 for _ in range(6)), 20,
                 f"{name} served")
        status = requests.get(f"{url}/v1/models/{name}", timeout=TIMEOUT).json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in status] == [(version, "AVAILABLE")]
    assert_answers(url, "later", "l")
    assert_answers(url, "absent", "a")
    assert_answers(url, "serving", "s")


def test_the_grpc_server_waits_too(tmp_path):
    from tensorflow_serving.apis import get_model_status_pb2
    serving, later = tmp_path / "serving", tmp_path / "later"
    publish(serving, 1, [f"s_{c}" for c in COLOURS], tmp_path)
    later.mkdir()
    config = write_config(tmp_path / "models.config", [("serving", serving), ("later", later)])
    server = GrpcServer({"MODEL_CONFIG_FILE": config, "MODEL_POLL_SECONDS": "1", "MODEL_CONFIG_POLL_SECONDS": "0"},
                        tmp_path / "grpc.log")
    try:
        server.wait_ready()
        assert server.predict(png(COLOURS["red"]), "serving").model_spec.version.value == 1
        status = server.status("later").model_version_status
        assert [(s.version, s.state) for s in status] == [(0, get_model_status_pb2.ModelVersionStatus.START)]
        error = rpc_error(server.predict, png(COLOURS["red"]), "later")
        assert error.code().name == "NOT_FOUND" and "not available yet" in error.details(), error
        publish(later, 2, [f"l_{c}" for c in COLOURS], tmp_path)

        def served():
            try:
                return server.predict(png(COLOURS["green"]), "later").model_spec.version.value == 2
            except Exception:
                return False
        wait_for(served, 20, "later served over gRPC")
        scores = np.frombuffer(server.predict(png(COLOURS["green"]), "later").outputs["scores"].tensor_content,
                               dtype=np.float32)
        assert np.allclose(scores, colour_scores(COLOURS["green"]), atol=1e-4), scores
    finally:
        server.stop()


def test_an_empty_model_dir_is_still_refused_at_start(tmp_path):
    """Only a configured model waits: MODEL_DIR naming an empty folder is a mistake, said at once."""
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", "127.0.0.1:0"], cwd=ROOT,
                            env=dict(os.environ, MODEL_DIR=str(tmp_path / "empty")), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "model not found" in result.stderr and "set MODEL_DIR" in result.stderr, \
        result.stderr
    assert "Booting worker" not in result.stderr


def test_config_reloads_add_a_waiting_model_and_a_change_to_an_empty_folder_keeps_the_old_serving(tmp_path, caplog):
    """In process (the poller's two jobs called by hand): a model added with no version waits, and a
    model changed to a base_path with no version keeps its old config serving until one appears there."""
    import logging

    from classify_server.http_api import create_app
    old, added, moved = tmp_path / "old", tmp_path / "added", tmp_path / "moved"
    publish(old, 1, [f"o_{c}" for c in COLOURS], tmp_path)
    path = tmp_path / "models.config"
    write_config(path, [("m", old)])
    app = create_app({"MODEL_CONFIG_FILE": str(path), "MODEL_POLL_SECONDS": 0, "MODEL_CONFIG_POLL_SECONDS": 0})
    models, client = app.extensions["models"], app.test_client()

    def labels(name):
        r = client.post(f"/?model={name}", data={"data": (io.BytesIO(png(COLOURS["red"])), "x.png")})
        return r.status_code, sorted(label for label, _ in r.get_json()) if r.status_code == 200 else r.get_json()

    moved.mkdir()
    write_config(path, [("m", moved), ("added", added)])
    with caplog.at_level(logging.INFO, logger="classify_server"):
        models.reload_config()
    assert "model 'm' is not available yet" in caplog.text and "the old config keeps serving" in caplog.text
    assert "model 'added' is not available yet" in caplog.text
    assert labels("m") == (200, [f"o_{c}" for c in sorted(COLOURS)])
    assert labels("added")[0] == 404 and client.get("/readyz").status_code == 200
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="classify_server"):
        models.reload_config()  # the same config again: looked at, not logged again
    assert "model 'm'" not in caplog.text

    publish(moved, 1, [f"n_{c}" for c in COLOURS], tmp_path)
    publish(added, 1, [f"d_{c}" for c in COLOURS], tmp_path)
    models.reload_config()  # the changed model's new folder has its version: swapped in
    models.poll_versions()  # the added model's first version
    assert labels("m") == (200, [f"n_{c}" for c in sorted(COLOURS)])
    assert labels("added") == (200, [f"d_{c}" for c in sorted(COLOURS)])


def test_the_kafka_consumers_model_waits_without_dead_letters(tmp_path):
    """The stream's embedded backend (what classify_server.stream runs in process): a batch for a model with no
    version raises Unavailable, which the consumer retries uncommitted, instead of dead-lettering every message."""
    from classify_server import settings
    from classify_server.stream.backends import Embedded, Unavailable
    serving, later = tmp_path / "serving", tmp_path / "later"
    publish(serving, 1, [f"s_{c}" for c in COLOURS], tmp_path)
    later.mkdir()
    config = write_config(tmp_path / "models.config", [("serving", serving), ("later", later)])
    service = settings.from_env({"MODEL_CONFIG_FILE": config, "MODEL_POLL_SECONDS": "0",
                                 "MODEL_CONFIG_POLL_SECONDS": "0"})
    backend = Embedded(service, "later")
    assert "'later' (waiting for its first version)" in backend.describe()
    try:
        backend.classify([png(COLOURS["red"])])
        raise AssertionError("a model with no version answered")
    except Unavailable as exc:
        assert "not available yet" in str(exc)
    publish(later, 1, [f"l_{c}" for c in COLOURS], tmp_path)
    backend.core.models.poll_versions()
    version, answers = backend.classify([png(COLOURS["blue"])])
    assert version == 1 and answers[0][0][0] == "l_blue", answers
