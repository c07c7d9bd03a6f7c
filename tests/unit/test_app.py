"""The classification server's Flask app, in this process through its test client (`flask_app` over
`trained_model`): the answers' shape and count, several parts, upload limits, errors, readiness, MODEL_NAME.
The same server through real gunicorn is e2e/test_gunicorn.py's.
"""
import io

import numpy as np
import pytest
from PIL import Image
from support.clients import assert_answer, assert_json_error, assert_same_answer, make_app, post_images
from support.images import CLASSES, encode, png_bytes, shape_image
from support.models import read_labels


@pytest.fixture(scope="module")
def labels(trained_model):
    return read_labels(trained_model)


@pytest.fixture
def client(flask_app):
    return flask_app.test_client()


# --- answers (test client) -------------------------------------------------------------------------

def test_answer_is_label_score_pairs_best_first_summing_to_one(client, labels):
    response = post_images(client, [shape_image("red_circle", 1)], f"?top_k={len(labels)}")
    assert response.status_code == 200, response.text
    answer = response.get_json()
    assert_answer(answer, labels, count=len(labels))
    assert sorted(label for label, _ in answer) == sorted(labels)
    assert sum(score for _, score in answer) == pytest.approx(1.0, abs=1e-4)


def test_answers_say_their_decode_and_inference_time(client):
    response = post_images(client, [shape_image("red_circle", 1)])
    timing = dict(part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))
    assert set(timing) == {"decode", "inference"}
    assert all(0 < float(ms) < 60_000 for ms in timing.values()), timing
    bad = post_images(client, [b"junk"])
    assert bad.status_code == 400 and "Server-Timing" not in bad.headers  # the model never ran


def test_default_count_is_five_clamped_to_the_labels(client, labels):
    answer = post_images(client, [shape_image("green_square", 2)]).get_json()
    assert_answer(answer, labels, count=min(5, len(labels)))


def test_top_k_changes_the_count(client, labels):
    image = shape_image("blue_triangle", 3)
    full = post_images(client, [image], f"?top_k={len(labels)}").get_json()
    for k in range(1, len(labels) + 1):
        answer = post_images(client, [image], f"?top_k={k}").get_json()
        assert_answer(answer, labels, count=k)
        assert answer == full[:k]


@pytest.mark.parametrize("extra", [1, 100, 10**9])
def test_top_k_over_the_label_count_is_clamped(client, labels, extra):
    image = shape_image("red_circle", 4)
    answer = post_images(client, [image], f"?top_k={len(labels) + extra}").get_json()
    assert_answer(answer, labels, count=len(labels))
    assert answer == post_images(client, [image], f"?top_k={len(labels)}").get_json()


def test_several_parts_answer_one_list_per_part(client, labels):
    images = [shape_image(label, 10 + i) for i, label in enumerate(CLASSES)]
    answers = post_images(client, images, "?top_k=2").get_json()
    assert len(answers) == len(images)
    for answer in answers:
        assert_answer(answer, labels, count=2)


# --- errors ----------------------------------------------------------------------------------------

GOOD = shape_image("red_circle", 1)


def _pixel_bomb():
    """A PNG declaring 50000x50000 pixels (2.5e9, over MAX_IMAGE_PIXELS), in under 100 bytes."""
    return png_bytes(50000, 50000, raw=b"\x00" * 16)


def test_far_too_many_parts_blame_max_parts(client):
    body = assert_json_error(post_images(client, [GOOD] * 50), 413)  # about 150 KB, far under 10 MB
    assert "MAX_PARTS" in body["error"], body


def test_small_max_upload_bytes_gives_413_then_answers(trained_model, client):
    app = make_app(trained_model, MAX_UPLOAD_BYTES=20_000, MAX_PARTS=2)
    small = app.test_client()
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)), "PNG")
    assert len(big) > 40_000 and len(GOOD) < 10_000
    expected = post_images(client, [GOOD]).get_json()
    assert_json_error(post_images(small, [big]), 413)
    assert_same_answer(post_images(small, [GOOD]).get_json(), expected)
    assert_json_error(post_images(small, [GOOD] * 3), 413)  # MAX_PARTS
    assert post_images(small, [GOOD] * 2).status_code == 200
    assert_json_error(post_images(small, [_pixel_bomb()]), 413)
    assert_same_answer(post_images(small, [GOOD]).get_json(), expected)


class ExplodingClassifier:
    """Test double for the error handler only: a classifier that fails in an unexpected way."""
    labels = ["a", "b"]
    ready = True
    model_dir = "/nonexistent"
    secret = "secret-detail-7f3a /srv/internal/path.py"

    def explode(self, *args, **kwargs):
        raise RuntimeError(self.secret)

    preprocess = preprocess_all = predict = explode

    def metadata(self):
        return {"labels": self.labels}

    def close(self):
        pass


def test_unexpected_exception_gives_500_with_request_id_and_no_traceback(caplog):
    from classify_server.http_api import create_app
    app = create_app(test_config={"MODEL_DIR": "/nonexistent"}, classifier=ExplodingClassifier())
    client = app.test_client()
    with caplog.at_level("ERROR", logger="classify_server"):
        response = post_images(client, [GOOD])
    body = assert_json_error(response, 500)
    assert body["request_id"] and body["request_id"] == response.headers["X-Request-Id"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert ExplodingClassifier.secret not in response.get_data(as_text=True)
    assert "RuntimeError" not in response.get_data(as_text=True)
    # The details are in the server log, under the same request id.
    assert any(body["request_id"] in r.getMessage() and r.exc_info for r in caplog.records)
    # A request id sent by the client is used.
    response = client.post("/", data={"data": (io.BytesIO(GOOD), "x.jpg")}, headers={"X-Request-Id": "abc-123"})
    assert response.status_code == 500 and response.get_json()["request_id"] == "abc-123"
    # Other paths still work.
    assert client.get("/healthz").status_code == 200


def test_readyz_is_503_until_the_model_is_ready():
    from classify_server.http_api import create_app

    class Loading(ExplodingClassifier):
        ready = False

    response = create_app(test_config={"MODEL_DIR": "/nonexistent"}, classifier=Loading()).test_client().get("/readyz")
    assert response.status_code == 503


def test_model_name_env_changes_the_metadata_path(trained_model, monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "flowers")
    client = make_app(trained_model).test_client()
    assert client.get("/v1/models/flowers/metadata").status_code == 200
    assert client.get("/v1/models/flowers/metadata").get_json()["metadata"]["labels"] == read_labels(trained_model)
    assert_json_error(client.get("/v1/models/model/metadata"), 404)
