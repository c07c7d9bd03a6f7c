"""Corrections from users, in this process: POST /feedback (its store, limits and refusals). The whole
loop to a new version, through retrain runs, is e2e/test_feedback_loop.py's."""
import io
import os

import pytest
from support.images import shape_image

from classify_server.http_api import create_app


@pytest.fixture
def client(trained_model, tmp_path):
    app = create_app({"MODEL_DIR": trained_model, "FEEDBACK_DIR": str(tmp_path / "feedback"),
                      "FEEDBACK_PER_MINUTE": 5})
    return app.test_client()


def send(client, data, label, name="x.jpg"):
    return client.post("/feedback", data={"data": (io.BytesIO(data), name), "label": label})


def test_feedback_is_off_without_feedback_dir(trained_model):
    client = create_app({"MODEL_DIR": trained_model, "FEEDBACK_DIR": ""}).test_client()
    assert send(client, shape_image("red_circle", 1), "red_circle").status_code == 404
    assert client.get("/feedback").status_code == 404


def test_feedback_stores_once_in_the_image_dir_layout(client, tmp_path):
    image = shape_image("green_square", 5)
    first = send(client, image, "red_circle")
    assert first.status_code == 201, first.get_json()
    stored = first.get_json()["stored"]
    assert stored.startswith("red_circle/") and stored.endswith(".jpg")
    assert (tmp_path / "feedback" / stored).read_bytes() == image
    again = send(client, image, "red_circle")
    assert again.status_code == 200 and again.get_json()["new"] is False
    assert len(os.listdir(tmp_path / "feedback" / "red_circle")) == 1
    assert not [n for n in os.listdir(tmp_path / "feedback" / "red_circle") if n.endswith(".tmp")]
    new_class = send(client, image, "yellow star-2")
    assert new_class.status_code == 201
    assert "yellow star-2" in client.get("/feedback").get_json()["labels"]


@pytest.mark.parametrize("label", ["../escape", "a/b", "", " ", "x" * 65, "..", "<b>", "tab\there", "naïve"])
def test_feedback_rejects_labels_that_are_not_names(client, tmp_path, label):
    r = send(client, shape_image("red_circle", 2), label)
    assert r.status_code == 400 and "label" in r.get_json()["error"]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "feedback").exists()


def test_feedback_rejects_non_images(client):
    assert send(client, b"%PDF-1.4 not an image", "red_circle").status_code == 400
    assert client.post("/feedback", data={"label": "red_circle"}).status_code == 415  # not multipart
    assert client.post("/feedback", data={"label": "red_circle"}, content_type="multipart/form-data").status_code == 400


class Clock:
    """A clock the test moves on: the limiter's minute passes without waiting for it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def sends(client, count, address, seed, headers=None):
    """Status codes of `count` corrections, each a new image, from client address `address`."""
    return [client.post("/feedback", data={"data": (io.BytesIO(shape_image("red_circle", seed + i)), "x.jpg"),
                                           "label": "red_circle"},
                        environ_base={"REMOTE_ADDR": address}, headers=headers or {}).status_code
            for i in range(count)]


def test_feedback_limit_is_per_client_per_minute(client):
    clock = Clock()
    client.application.extensions["feedback_limiter"].clock = clock
    assert sends(client, 6, "10.0.0.1", 100) == [201] * 5 + [429]  # FEEDBACK_PER_MINUTE is 5
    assert sends(client, 1, "10.0.0.2", 200) == [201]  # another client has a limit of its own
    clock.now += 30
    assert sends(client, 1, "10.0.0.1", 300) == [429]  # the five are still within the minute
    clock.now += 30.5
    assert sends(client, 6, "10.0.0.1", 400) == [201] * 5 + [429]  # a minute on: five more


@pytest.mark.parametrize("trusted, expected", [(0, [201, 429]), (1, [201, 201])])
def test_x_forwarded_for_names_the_client_only_behind_trusted_proxies(trained_model, tmp_path, trusted, expected):
    """Two clients behind one proxy: with TRUSTED_PROXIES=1 each has its own limit; with 0 the header is
    ignored (anyone could send it) and both count as the proxy's address."""
    app = create_app({"MODEL_DIR": trained_model, "FEEDBACK_DIR": str(tmp_path / "feedback"),
                      "FEEDBACK_PER_MINUTE": 1, "TRUSTED_PROXIES": trusted})
    client = app.test_client()
    codes = [sends(client, 1, "127.0.0.1", 10 * i, {"X-Forwarded-For": address})[0]
             for i, address in enumerate(("203.0.113.1", "203.0.113.2"))]
    assert codes == expected
