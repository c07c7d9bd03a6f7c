"""The classification server through real gunicorn: answers, image modes, errors, headers, health,
concurrency, broken models, other graphs (third-party and classic retrain ones).

Most go through `server` (e2e/conftest.py: 2 workers over `trained_model`); the app's logic alone is
unit/test_app.py's. The checks that need answers to differ from image to image need `trained_model`
trained on the real weights in ../shared (TEST_WEIGHTS).
"""
import concurrent.futures
import io
import json
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image, ImageOps
from support.clients import assert_answer, assert_json_error, assert_same_answer, classify, make_app, post
from support.images import CLASSES, encode, png_bytes, shape_image
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


@pytest.fixture(scope="module")
def labels(trained_model):
    return read_labels(trained_model)


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
