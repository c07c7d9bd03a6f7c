"""The classification server: answers, image modes, errors, health, concurrency, other graphs, test.sh.

Logic goes through the Flask test client (`flask_app`, in this process); the whole through real
gunicorn, `server` (2 workers over `trained_model`). The checks that need answers to differ from image
to image need `trained_model` trained on the real weights in ../shared (TEST_WEIGHTS).
"""
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps
from support import ROOT
from support.clients import assert_same_answer, classify, make_app, post, post_images
from support.images import CLASSES, encode, make_image_dir, png_bytes, shape_image
from support.models import TEST_WEIGHTS, read_labels
from support.processes import Server

TIMEOUT = 60  # seconds, for every HTTP request
# With random backbone weights, the model answers (almost) the same for every image.
SENSITIVE = TEST_WEIGHTS != "none"
needs_real_weights = pytest.mark.skipif(not SENSITIVE, reason="needs trained_model on the real MobileNetV2 weights "
                                        "(../shared/models, absent): with random ones every image answers the same")


def rgb_image(label="red_circle", seed=3, size=(96, 72)):
    """A generated image of class `label` as an RGB PIL image (lossless source)."""
    return Image.open(io.BytesIO(shape_image(label, seed, size, fmt="PNG"))).convert("RGB")


def assert_answer(answer, labels, count=None):
    """[[label, score], ...]: known labels, each once, scores in [0, 1], best first."""
    assert isinstance(answer, list) and answer
    for pair in answer:
        assert isinstance(pair, list) and len(pair) == 2, pair
        assert isinstance(pair[0], str) and isinstance(pair[1], float), pair
        assert pair[0] in labels and 0.0 <= pair[1] <= 1.0, pair
    assert len({label for label, _ in answer}) == len(answer)
    scores = [score for _, score in answer]
    assert scores == sorted(scores, reverse=True), "not best first"
    if count is not None:
        assert len(answer) == count


def assert_json_error(response, status):
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    return body


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


# --- answers (real gunicorn) ----------------------------

def test_several_parts_in_order_equal_separate_requests(server, labels):
    s = server
    classes = ["green_square", "red_circle", "blue_triangle", "red_circle"]
    images = [shape_image(label, 20 + i) for i, label in enumerate(classes)]
    separate = [classify(s.url, image, "?top_k=3") for image in images]
    together = post(s.url, images, "?top_k=3").json()
    assert len(together) == len(images)
    for got, expected in zip(together, separate):
        assert_answer(got, labels, count=3)
        assert_same_answer(got, expected)
    two = post(s.url, images[:2], "?top_k=1").json()
    assert [len(a) for a in two] == [1, 1]
    if SENSITIVE:  # the answers differ from image to image, so the order is really checked
        assert [a[0][0] for a in together] == classes
        assert [a[0][0] for a in two] == classes[:2]


def test_concurrent_requests_answer_as_sequential_ones(server):
    s = server
    images = [shape_image(list(CLASSES)[i % 3], 100 + i, size=(64 + 8 * i, 48 + 4 * i)) for i in range(16)]
    sequential = [classify(s.url, image, "?top_k=3") for image in images]
    if SENSITIVE:
        assert len({json.dumps(a) for a in sequential}) > 3, "answers should differ between images"
    barrier = threading.Barrier(len(images), timeout=30)

    def one(image):
        with requests.Session() as session:
            barrier.wait()  # all 16 go at once
            return classify(s.url, image, "?top_k=3", session)

    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        concurrent_answers = list(pool.map(one, images, timeout=120))
    for got, expected in zip(concurrent_answers, sequential):
        assert_same_answer(got, expected, tol=1e-5)


# --- image modes -----------------------------------------------------------------------------------

def _animated_gif():
    first, second = rgb_image("red_circle", 5), rgb_image("green_square", 6)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _rgba():
    image = rgb_image("red_circle", 7).convert("RGBA")
    alpha = np.full((image.height, image.width), 255, np.uint8)
    alpha[:6], alpha[-6:], alpha[:, :6], alpha[:, -6:] = 0, 0, 0, 0  # a transparent frame
    image.putalpha(Image.fromarray(alpha))
    return encode(image, "PNG")


def _palette_with_transparency():
    image = rgb_image("red_circle", 8).quantize(64)
    return encode(image, "PNG", transparency=0)


def _gray16():
    values = np.asarray(rgb_image("red_circle", 9).convert("L"), np.uint16) * 257
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    return encode(image, "PNG")


def _rgb48():
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one: written by hand)."""
    values = np.asarray(rgb_image("red_circle", 10), np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return png_bytes(values.shape[1], values.shape[0], bit_depth=16, colour_type=2, raw=rows)


def _exif_rotated_jpeg():
    """Stored on its side with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    stored = rgb_image("red_circle", 11).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


# name -> (encoded image of a red circle, whether its colours survive: then the best label is known)
IMAGE_MODES = {
    "jpeg": (lambda: encode(rgb_image(), "JPEG", quality=90), True),
    "progressive_jpeg": (lambda: encode(rgb_image(), "JPEG", quality=90, progressive=True), True),
    "png": (lambda: encode(rgb_image(), "PNG"), True),
    "gif": (lambda: encode(rgb_image(), "GIF"), True),
    "animated_gif": (_animated_gif, True),
    "bmp": (lambda: encode(rgb_image(), "BMP"), True),
    "webp": (lambda: encode(rgb_image(), "WEBP", quality=90), True),
    "webp_lossless": (lambda: encode(rgb_image(), "WEBP", lossless=True), True),
    "tiff": (lambda: encode(rgb_image(), "TIFF"), True),
    "grayscale_jpeg": (lambda: encode(rgb_image().convert("L"), "JPEG"), False),
    "grayscale_png": (lambda: encode(rgb_image().convert("L"), "PNG"), False),
    "grayscale_alpha_png": (lambda: encode(rgb_image().convert("LA"), "PNG"), False),
    "bilevel_png": (lambda: encode(rgb_image().convert("1"), "PNG"), False),
    "palette_png": (lambda: encode(rgb_image().quantize(64), "PNG"), True),
    "palette_transparent_png": (_palette_with_transparency, False),
    "rgba_png": (_rgba, True),
    "cmyk_jpeg": (lambda: encode(rgb_image().convert("CMYK"), "JPEG", quality=95), True),
    "gray16_png": (_gray16, False),
    "rgb48_png": (_rgb48, True),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, True),
}


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_every_image_mode_classifies(server, labels, mode):
    answer = classify(server.url, IMAGE_MODES[mode][0]())
    assert_answer(answer, labels, count=min(5, len(labels)))


@needs_real_weights
@pytest.mark.parametrize("mode", [m for m, (_, colour) in IMAGE_MODES.items() if colour])
def test_every_image_mode_gives_the_right_label(server, mode):
    answer = classify(server.url, IMAGE_MODES[mode][0]())
    assert answer[0][0] == "red_circle", answer


@needs_real_weights
def test_png_and_the_same_pixels_in_lossless_formats_answer_the_same(server):
    palette = rgb_image("blue_triangle", 12).quantize(64)  # <= 256 colours: GIF can hold them exactly
    pixels = palette.convert("RGB")
    encodings = {"bmp": encode(pixels, "BMP"), "webp_lossless": encode(pixels, "WEBP", lossless=True),
                 "tiff": encode(pixels, "TIFF"), "gif": encode(palette, "GIF"),
                 "palette_png": encode(palette, "PNG"), "opaque_rgba_png": encode(pixels.convert("RGBA"), "PNG"),
                 "ppm": encode(pixels, "PPM")}
    for name, data in encodings.items():  # the precondition: the very same pixels
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(pixels)), name
    png = classify(server.url, encode(pixels, "PNG"), "?top_k=3")
    assert png[0][0] == "blue_triangle"
    for data in encodings.values():
        assert_same_answer(classify(server.url, data, "?top_k=3"), png, tol=1e-6)


@needs_real_weights
def test_animated_gif_answers_its_first_frame(server):
    gif = Image.open(io.BytesIO(_animated_gif()))
    assert getattr(gif, "n_frames", 1) == 2
    frames = []
    for i in range(2):
        gif.seek(i)
        frames.append(encode(gif.convert("RGB"), "PNG"))
    answer = classify(server.url, _animated_gif(), "?top_k=3")
    assert_same_answer(answer, classify(server.url, frames[0], "?top_k=3"), tol=1e-6)
    assert classify(server.url, frames[1], "?top_k=3")[0][0] != answer[0][0]


@needs_real_weights
def test_exif_orientation_is_applied(server):
    data = _exif_rotated_jpeg()
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif().get(0x0112) == 6 and stored.size == (72, 96)
    upright = encode(ImageOps.exif_transpose(stored).convert("RGB"), "PNG")
    sideways = encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    answer = classify(server.url, data, "?top_k=3")
    assert_same_answer(answer, classify(server.url, upright, "?top_k=3"), tol=1e-6)
    # ...and the rotation matters to this model, so the check above means something.
    other = classify(server.url, sideways, "?top_k=3")
    assert max(abs(dict(answer)[label] - score) for label, score in other) > 1e-4


# --- errors ----------------------------------------------------------------------------------------

GOOD = shape_image("red_circle", 1)


def _truncated_jpeg():
    data = encode(rgb_image(size=(160, 120)), "JPEG", quality=95)
    return data[: len(data) // 2]


def _pixel_bomb():
    """A PNG declaring 50000x50000 pixels (2.5e9, over MAX_IMAGE_PIXELS), in under 100 bytes."""
    return png_bytes(50000, 50000, raw=b"\x00" * 16)


ERROR_CASES = {
    "no_data_field": (400, lambda s, url: s.post(url + "/", files={"image": ("x.jpg", GOOD)}, timeout=TIMEOUT)),
    "only_a_text_field": (400, lambda s, url: s.post(url + "/", files={"note": (None, "hi")}, timeout=TIMEOUT)),
    "empty_file": (400, lambda s, url: post(url, [b""], session=s)),
    "not_an_image": (400, lambda s, url: post(url, [b"%PDF-1.4\nthis is not an image\n" * 20], session=s)),
    "truncated_jpeg": (400, lambda s, url: post(url, [_truncated_jpeg()], session=s)),
    "one_bad_part_of_two": (400, lambda s, url: post(url, [GOOD, b"not an image"], session=s)),
    "pixel_bomb": (413, lambda s, url: post(url, [_pixel_bomb()], session=s)),
    "body_over_max_upload_bytes": (413, lambda s, url: post(url, [b"\0" * (10 * 2**20 + 1)], session=s)),
    "too_many_parts": (413, lambda s, url: post(url, [GOOD] * 33, session=s)),
    "raw_jpeg_body": (415, lambda s, url: s.post(url + "/", data=GOOD, headers={"Content-Type": "image/jpeg"},
                                                  timeout=TIMEOUT)),
    "json_body": (415, lambda s, url: s.post(url + "/", json={"data": "x"}, timeout=TIMEOUT)),
    "urlencoded_body": (415, lambda s, url: s.post(url + "/", data={"data": "x"}, timeout=TIMEOUT)),
    "put": (405, lambda s, url: s.put(url + "/", files={"data": ("x.jpg", GOOD)}, timeout=TIMEOUT)),
    "delete": (405, lambda s, url: s.delete(url + "/", timeout=TIMEOUT)),
    "post_healthz": (405, lambda s, url: s.post(url + "/healthz", timeout=TIMEOUT)),
    "unknown_path_get": (404, lambda s, url: s.get(url + "/no/such/path", timeout=TIMEOUT)),
    "unknown_path_post": (404, lambda s, url: s.post(url + "/classify", files={"data": ("x.jpg", GOOD)},
                                                      timeout=TIMEOUT)),
    "top_k_abc": (400, lambda s, url: post(url, [GOOD], "?top_k=abc", session=s)),
    "top_k_0": (400, lambda s, url: post(url, [GOOD], "?top_k=0", session=s)),
    "top_k_-1": (400, lambda s, url: post(url, [GOOD], "?top_k=-1", session=s)),
    "top_k_empty": (400, lambda s, url: post(url, [GOOD], "?top_k=", session=s)),
    "top_k_float": (400, lambda s, url: post(url, [GOOD], "?top_k=2.5", session=s)),
}


@pytest.fixture(scope="module")
def good_answer(server):
    return classify(server.url, GOOD)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_json_and_the_next_request_is_answered(server, good_answer, case):
    status, send = ERROR_CASES[case]
    with requests.Session() as session:  # the next request reuses the connection when it was kept
        assert_json_error(send(session, server.url), status)
        assert_same_answer(classify(server.url, GOOD, session=session), good_answer)
    assert_same_answer(classify(server.url, GOOD), good_answer)


def test_error_messages_say_what_to_do(server):
    assert "data" in ERROR_CASES["no_data_field"][1](requests, server.url).json()["error"]
    assert "MAX_IMAGE_PIXELS" in post(server.url, [_pixel_bomb()]).json()["error"]
    assert "MAX_UPLOAD_BYTES" in ERROR_CASES["body_over_max_upload_bytes"][1](requests, server.url).json()["error"]
    assert "top_k" in post(server.url, [GOOD], "?top_k=abc").json()["error"]
    response = requests.put(server.url + "/", timeout=TIMEOUT)
    assert "POST" in response.headers.get("Allow", "")


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


# --- headers ---------------------------------------------------------------------------------------

def test_nosniff_on_every_response(server):
    responses = [requests.get(server.url + "/", timeout=TIMEOUT), post(server.url, [GOOD]),
                 requests.get(server.url + "/healthz", timeout=TIMEOUT),
                 requests.get(server.url + "/readyz", timeout=TIMEOUT),
                 requests.get(server.url + "/v1/models/model/metadata", timeout=TIMEOUT),
                 requests.get(server.url + "/v1/models/nope/metadata", timeout=TIMEOUT)]
    with requests.Session() as session:
        responses += [send(session, server.url) for _, send in ERROR_CASES.values()]
    assert {r.status_code for r in responses} >= {200, 400, 404, 405, 413, 415}
    for r in responses:
        assert r.headers.get("X-Content-Type-Options") == "nosniff", (r.status_code, r.url)


# --- health and metadata ---------------------------------------------------------------------------

def test_healthz_and_readyz(server):
    response = requests.get(server.url + "/healthz", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    response = requests.get(server.url + "/readyz", timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["status"] == "ready"


def test_metadata_describes_the_model(server, trained_model, labels):
    response = requests.get(server.url + "/v1/models/model/metadata", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert metadata["labels"] == labels
    assert metadata["input_height"] == metadata["input_width"] == 224  # mobilenet_v2
    assert metadata["input_tensor"] == "input:0" and metadata["output_tensor"] == "final_result:0"
    assert os.path.realpath(metadata["model_dir"]) == os.path.realpath(trained_model)
    assert_json_error(requests.get(server.url + "/v1/models/inception/metadata", timeout=TIMEOUT), 404)


def test_model_name_env_changes_the_metadata_path(trained_model, monkeypatch):
    monkeypatch.setenv("MODEL_NAME", "flowers")
    client = make_app(trained_model).test_client()
    assert client.get("/v1/models/flowers/metadata").status_code == 200
    assert client.get("/v1/models/flowers/metadata").get_json()["metadata"]["labels"] == read_labels(trained_model)
    assert_json_error(client.get("/v1/models/model/metadata"), 404)


# --- a missing or corrupt model stops gunicorn -----------------------------------------------------

@pytest.fixture(scope="module")
def broken_servers(tmp_path_factory):
    """gunicorn over a model folder without graph.pb (2 workers, the default on this 2-core machine),
    and over one whose graph.pb is garbage (1 worker): both started at once, to save time."""
    root = tmp_path_factory.mktemp("broken")
    missing, corrupt = root / "missing", root / "corrupt"
    missing.mkdir()
    corrupt.mkdir()
    (corrupt / "labels.txt").write_text("a\nb\nc\n")
    (corrupt / "graph.pb").write_bytes(b"\x00\xffthis is not a GraphDef\x00\x01\x02" * 64)
    started = time.monotonic()
    servers = {kind: Server({"MODEL_DIR": str(folder)}, workers=workers, log_path=root / f"{kind}.log")
               for kind, folder, workers in (("missing", missing, 2), ("corrupt", corrupt, 1))}
    try:
        yield {kind: (s, root / kind / "graph.pb", started) for kind, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_a_broken_model_stops_gunicorn_with_one_clear_line(broken_servers, kind):
    s, graph, started = broken_servers[kind]
    try:
        code = s.process.wait(timeout=max(1.0, 60 - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"gunicorn still running 60 s after its start (boot loop?):\n{s.output()[-3000:]}")
    output = s.output()
    assert code != 0, output
    naming = [line for line in output.splitlines() if str(graph) in line]
    assert naming, f"no line names {graph}:\n{output}"
    word = "missing" if kind == "missing" else "corrupt"
    assert any(word in line.lower() for line in naming), naming
    # One line per worker at most: the workers were not restarted over and over.
    workers = 2 if kind == "missing" else 1
    assert len(naming) <= workers and output.count("Booting worker") <= workers, output


# --- graphs from elsewhere -------------------------------------------------------------------------

THIRD_PARTY_OUTPUT = "MobilenetV1/Predictions/Reshape_1"
THIRD_PARTY_LABELS = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
                      "stingray", "cock"]


def third_party_graph(seed=7):
    """A tiny slim-style classifier: float `input` [None, 32, 32, 3] in [-1, 1], softmax at another name."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        kernel = tf.constant(rng.normal(0, 0.6, (3, 3, 3, 16)).astype(np.float32))
        bias = tf.constant(rng.normal(0, 0.2, 16).astype(np.float32))
        features = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(images, kernel, 2, "SAME"), bias))
        pooled = tf.reduce_mean(features, axis=[1, 2])
        logits = tf.matmul(pooled, tf.constant(rng.normal(0, 0.3, (16, len(THIRD_PARTY_LABELS))).astype(np.float32)))
        with tf.name_scope("MobilenetV1/Predictions"):
            probabilities = tf.nn.softmax(logits, name="Softmax")
            tf.reshape(probabilities, [-1, len(THIRD_PARTY_LABELS)], name="Reshape_1")
    assert graph.get_tensor_by_name(THIRD_PARTY_OUTPUT + ":0") is not None
    return graph


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Two gunicorn servers, started at once: the third-party graph frozen to graph.pb + labels.txt with
    no model.json, served through environment variables; and the classic retrain.py graph, no settings."""
    root = tmp_path_factory.mktemp("foreign")
    graphs = {"third_party": (third_party_graph(), THIRD_PARTY_LABELS), "classic": (classic_graph(), CLASSIC_LABELS)}
    for name, (graph, labels) in graphs.items():
        (root / name).mkdir()
        (root / name / "graph.pb").write_bytes(graph.as_graph_def().SerializeToString())
        (root / name / "labels.txt").write_text("".join(label + "\n" for label in labels))
    unset = {name: "" for name in ("INPUT_LAYER", "OUTPUT_LAYER", "INPUT_HEIGHT", "INPUT_WIDTH",
                                   "INPUT_MEAN", "INPUT_STD")}
    envs = {"third_party": {"MODEL_DIR": str(root / "third_party"), "INPUT_LAYER": "input",
                            "OUTPUT_LAYER": THIRD_PARTY_OUTPUT, "INPUT_HEIGHT": "32", "INPUT_WIDTH": "32",
                            "INPUT_MEAN": "127.5", "INPUT_STD": "127.5", "MODEL_NAME": "mobilenet_v1"},
            "classic": dict(unset, MODEL_DIR=str(root / "classic"))}
    servers = {name: Server(env, workers=1, log_path=root / f"{name}.log") for name, env in envs.items()}
    try:
        for s in servers.values():
            s.wait_ready()
        yield {name: (servers[name], graphs[name][0], root / name) for name in servers}
    finally:
        for s in servers.values():  # both shut down at once
            s.process.terminate()
        for s in servers.values():
            s.stop()


@pytest.fixture(scope="module")
def third_party(foreign):
    return foreign["third_party"]


def test_third_party_graph_answers_as_running_it_directly(third_party):
    import tensorflow as tf

    from classify_contract.preprocessing import decode_image
    s, graph, _ = third_party
    exact = [rgb_image(label, 30 + i, size=(32, 32)) for i, label in enumerate(CLASSES)]
    uploads = [encode(image, "PNG") for image in exact] + [encode(rgb_image("green_square", 40), "JPEG")]
    # The same pixels the server feeds: 32x32 PNGs as they are, the JPEG through the shared preprocessing.
    raw = np.stack([np.asarray(image, np.float32) for image in exact] + [decode_image(uploads[-1], (32, 32))])
    with tf.compat.v1.Session(graph=graph) as session:
        run = lambda x: session.run(THIRD_PARTY_OUTPUT + ":0", {"input:0": x})  # noqa: E731
        expected, unscaled = run((raw - 127.5) / 127.5), run(raw)
    assert np.abs(expected - unscaled).max() > 1e-3, "the scaling must matter for the check to mean something"
    assert np.abs(expected[0] - expected[1]).max() > 1e-3
    for data, probabilities in zip(uploads, expected):
        answer = classify(s.url, data, f"?top_k={len(THIRD_PARTY_LABELS)}")
        assert_answer(answer, THIRD_PARTY_LABELS, count=len(THIRD_PARTY_LABELS))
        for label, score in answer:
            assert score == pytest.approx(float(probabilities[THIRD_PARTY_LABELS.index(label)]), abs=1e-5)
        assert len(classify(s.url, data)) == 5  # top 5 by default
    together = post(s.url, uploads, f"?top_k={len(THIRD_PARTY_LABELS)}").json()
    for answer, probabilities in zip(together, expected):
        assert [label for label, _ in answer] == [THIRD_PARTY_LABELS[i] for i in np.argsort(-probabilities)]


def test_third_party_metadata_and_model_name(third_party):
    s, _, folder = third_party
    response = requests.get(s.url + "/v1/models/mobilenet_v1/metadata", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert metadata["labels"] == THIRD_PARTY_LABELS
    assert (metadata["input_height"], metadata["input_width"]) == (32, 32)
    assert (metadata["input_mean"], metadata["input_std"]) == (127.5, 127.5)
    assert metadata["input_tensor"] == "input:0" and metadata["output_tensor"] == THIRD_PARTY_OUTPUT + ":0"
    assert os.path.realpath(metadata["model_dir"]) == os.path.realpath(folder)
    assert_json_error(requests.get(s.url + "/v1/models/model/metadata", timeout=TIMEOUT), 404)


def test_third_party_graph_without_settings_fails_to_load_clearly(third_party):
    from classify_server.engines import ModelLoadError
    _, _, folder = third_party
    with pytest.raises(ModelLoadError, match="OUTPUT_LAYER"):
        make_app(str(folder))


CLASSIC_LABELS = ["daisy", "roses", "tulips"]


def classic_graph(seed=11):
    """retrain.py's classic layout: JPEG bytes at DecodeJpeg/contents:0, decoded in the graph, final_result:0."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    graph = tf.Graph()
    with graph.as_default():
        contents = tf.constant(b"", tf.string, name="DecodeJpeg/contents")  # fed, as in the classic graph
        decoded = tf.io.decode_jpeg(contents, channels=3)
        pixels = tf.image.resize(tf.expand_dims(tf.cast(decoded, tf.float32), 0), [299, 299])
        scaled = (pixels - 128.0) / 128.0
        kernel = tf.constant(rng.normal(0, 0.6, (5, 5, 3, 8)).astype(np.float32))
        pooled = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(scaled, kernel, 4, "SAME")), axis=[1, 2])
        logits = tf.matmul(pooled, tf.constant(rng.normal(0, 0.3, (8, len(CLASSIC_LABELS))).astype(np.float32)))
        tf.nn.softmax(logits, name="final_result")
    assert graph.get_tensor_by_name("DecodeJpeg/contents:0").dtype == tf.string
    return graph


def test_classic_retrain_graph_served_without_settings(foreign):
    import tensorflow as tf
    s, graph, folder = foreign["classic"]
    assert not os.path.exists(folder / "model.json")
    jpeg = encode(rgb_image("red_circle", 50, size=(120, 90)), "JPEG", quality=90)
    png_image = rgb_image("blue_triangle", 51, size=(120, 90))
    png = encode(png_image, "PNG")
    with tf.compat.v1.Session(graph=graph) as session:
        run = lambda data: session.run("final_result:0", {"DecodeJpeg/contents:0": data}).reshape(-1)  # noqa: E731
        expected_jpeg = run(jpeg)
        expected_png = run(encode(png_image, "JPEG", quality=95))  # the server hands the graph JPEG
    answer = classify(s.url, jpeg, "?top_k=3")
    assert_answer(answer, CLASSIC_LABELS, count=3)
    for label, score in answer:
        assert score == pytest.approx(float(expected_jpeg[CLASSIC_LABELS.index(label)]), abs=1e-5)
    answer = classify(s.url, png, "?top_k=3")
    assert_answer(answer, CLASSIC_LABELS, count=3)
    assert sum(score for _, score in answer) == pytest.approx(1.0, abs=1e-4)
    for label, score in answer:
        assert score == pytest.approx(float(expected_png[CLASSIC_LABELS.index(label)]), abs=0.02)
    assert_answer(classify(s.url, IMAGE_MODES["animated_gif"][0]()), CLASSIC_LABELS)
    both = post(s.url, [jpeg, png], "?top_k=3").json()
    assert len(both) == 2 and both[0] == classify(s.url, jpeg, "?top_k=3")
    metadata = requests.get(s.url + "/v1/models/model/metadata", timeout=TIMEOUT).json()["metadata"]
    assert metadata["input_tensor"] == "DecodeJpeg/contents:0" and metadata["output_tensor"] == "final_result:0"


# --- test.sh ---------------------------------------------------------------------------------------

def _test_sh(flowers_dir, work, timeout=420, **env):
    venv_bin = os.path.join(ROOT, ".venv", "bin")
    if not os.path.isdir(venv_bin):
        pytest.skip(f"test.sh runs with {venv_bin} first on PATH: no such folder")
    settings = dict(os.environ, FLOWERS_DIR=str(flowers_dir), ARCHITECTURE="mobilenet_v2", WEIGHTS="none",
                    STEPS="100", NO_VENV="1", PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if work:
        settings.update(WORK=str(work), MODEL_OUT=str(work / "model"))
    settings.update(env)
    settings.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", os.path.join(ROOT, "test.sh")], cwd=ROOT, env=settings, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_test_sh_end_to_end(tmp_path):
    """Issue 20: it ends by saying where the model is and the exact command that serves it; the model goes
    to MODEL_OUT; its own temp folder (WORK when not given) and the server's are gone afterwards."""
    if not shutil.which("curl"):
        pytest.skip("test.sh needs curl")
    temp = tmp_path / "tmp"
    temp.mkdir()
    model = tmp_path / "model"
    env = {"TMPDIR": str(temp), "MODEL_OUT": str(model)}
    result = _test_sh(make_image_dir(tmp_path / "flowers", per_class=8), None, **env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert re.search(r"^OK\b", result.stdout, re.M), result.stdout
    assert os.path.isfile(model / "graph.pb") and os.path.isfile(model / "report.html")
    assert f"== the model is in {model} " in result.stdout
    assert f"MODEL_DIR={model} {os.path.join(ROOT, '.venv', 'bin', 'gunicorn')} classify_server:app" in result.stdout
    assert [p for p in os.listdir(temp) if os.path.isdir(temp / p)] == []  # WORK and the metrics folder removed
    # The server's log is shown, with its ready line, and neither it nor retrain's output has TensorFlow's
    # start-up noise (classify_contract.tf_noise).
    assert re.search(r"serving model 'model' version 1 from .*: tf engine, \d+ labels, loaded and warmed up in",
                     result.stdout), result.stdout
    for noise in ("cuInit", "cuda drivers", "oneDNN", "absl::InitializeLog", "I0000"):
        assert noise not in result.stdout + result.stderr, noise


@pytest.mark.slow
def test_test_sh_fails_with_one_class(tmp_path):
    result = _test_sh(make_image_dir(tmp_path / "flowers", classes=("red_circle",), per_class=4),
                      tmp_path / "work", timeout=120)
    assert result.returncode != 0, result.stdout
    assert not re.search(r"^OK\b", result.stdout, re.M)
    assert "found 1 class(es) with images" in result.stderr and "need at least 2" in result.stderr, result.stderr
