"""Hostile input in this process: a bounded fuzz of the decode path and the inference core, and the app's
security checks (debug off, uploads kept in memory, limits on by default, labels never HTML).

The fuzz (hypothesis, bounded: FUZZ_EXAMPLES cases per test, 200 by default) feeds mutated valid images
and random bytes to `decode_image` and the inference core's `classify`, which may only raise InvalidImage
or ImageTooLarge (the core: an InferenceError), the API's 400 and 413. The corpus of hostile uploads
through real gunicorn is e2e/test_hostile_uploads.py's.
"""
import io
import json
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from support import ROOT
from support.images import encode, random_bytes, shape_image

GOOD = shape_image("red_circle", 1)
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the defaults the server runs with (README's Settings table)
MAX_PARTS = 32


# --- the app, in this process ----------------------------------------------------------------------

def rgb(label="red_circle", seed=3, size=(96, 72)):
    return Image.open(io.BytesIO(shape_image(label, seed, size, fmt="PNG"))).convert("RGB")


@pytest.fixture(scope="module")
def classifier(trained_model):
    from classify_server import engines, settings
    loaded = engines.load(trained_model, settings.from_env().engine)
    yield loaded
    loaded.close()


def test_flask_debug_in_the_environment_does_not_turn_debug_on(classifier, monkeypatch):
    """What gunicorn does in a worker: build the app with the environment it has."""
    from classify_server.http_api import create_app
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = create_app(classifier=classifier)
    assert app.debug is False and not app.config["DEBUG"]
    assert app.test_client().get("/healthz").data == b'{"status":"ok"}\n'


def _big_upload_environ(body_size=2 * 1024 * 1024):
    """A WSGI environ POSTing one 2 MB `data` part (over werkzeug's 500 KB spill-to-disk threshold)."""
    from werkzeug.test import EnvironBuilder
    data = random_bytes(body_size, seed=6)
    return EnvironBuilder(method="POST", path="/", data={"data": (io.BytesIO(data), "big.jpg")}).get_environ(), data


class FileWrites:
    """Records every file this thread opens for writing (the 'open' audit event: open(), os.open, and
    so tempfile's TemporaryFile, SpooledTemporaryFile rolling over, mkstemp) while active."""
    _installed = False
    _active = {}

    def __init__(self):
        if not FileWrites._installed:
            sys.addaudithook(FileWrites._hook)  # cannot be removed: inactive unless a `with` is running
            FileWrites._installed = True
        self.opened = []

    @staticmethod
    def _hook(event, args):
        recorder = FileWrites._active.get(threading.get_ident())
        if recorder is None or event != "open":
            return
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            recorder.opened.append(path)

    def __enter__(self):
        FileWrites._active[threading.get_ident()] = self
        return self

    def __exit__(self, *exc):
        FileWrites._active.pop(threading.get_ident(), None)


def test_uploads_are_never_written_to_disk(classifier):
    from flask import Request

    from classify_server.http_api import create_app
    from classify_server.http_api.core_calls import InMemoryRequest
    environ, data = _big_upload_environ()
    # Control: werkzeug's own request class spills this upload to a temporary file...
    with FileWrites() as writes:
        assert Request(dict(environ)).files["data"].read() == data
    assert writes.opened, "the check must see werkzeug's temporary file, or it proves nothing"
    # ...the server's keeps it in memory,
    environ, data = _big_upload_environ()
    with FileWrites() as writes:
        assert InMemoryRequest(environ).files["data"].read() == data
    assert writes.opened == []
    # ...and so does a whole request through the app (a 2 MB image: the answer needs the whole upload).
    # The request is built before recording: werkzeug's test client itself spools big bodies to disk.
    from werkzeug.test import EnvironBuilder, run_wsgi_app
    app = create_app(classifier=classifier)
    assert app.request_class is InMemoryRequest
    big = encode(Image.fromarray(np.random.default_rng(7).integers(0, 256, (900, 900, 3), np.uint8)), "PNG")
    assert len(big) > 2 * 1024 * 1024
    builder = EnvironBuilder(method="POST", path="/", data={"data": (io.BytesIO(big), "big.png")})
    environ = builder.get_environ()
    environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read())
    with FileWrites() as writes:
        body, status, headers = run_wsgi_app(app, environ, buffered=True)
        body = b"".join(body)
    assert status.startswith("200"), body
    assert json.loads(body)[0][0] in classifier.labels
    assert writes.opened == []


def test_limits_are_on_by_default(monkeypatch):
    from classify_server import settings
    for name in ("MAX_UPLOAD_BYTES", "MAX_IMAGE_PIXELS", "MAX_PARTS"):
        monkeypatch.delenv(name, raising=False)
    limits = settings.from_env().limits
    assert 0 < limits.max_upload_bytes <= 100 * 2**20
    assert 0 < limits.max_image_pixels <= 100_000_000
    assert 0 < limits.max_parts <= 100


def test_labels_are_data_never_html(classifier):
    """The API answers labels as JSON (never sniffed as HTML: nosniff), and the page inserts them as
    text. (tests/e2e/test_page.py shows a hostile label in real Chromium.)"""
    import copy

    from classify_server.http_api import create_app
    hostile = copy.copy(classifier)
    hostile.labels = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "&amp;"]
    response = create_app(classifier=hostile).test_client().post(
        "/", data={"data": (io.BytesIO(GOOD), "x.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 200
    assert response.mimetype == "application/json" and response.headers["X-Content-Type-Options"] == "nosniff"
    assert {label for label, _ in response.get_json()} == set(hostile.labels)
    page = open(os.path.join(ROOT, "classify_server", "http_api", "static", "index.html"), encoding="utf-8").read()
    script = page[page.index("<script>"):]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "textContent = label" in script


# --- the fuzz --------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings as fuzz_settings, strategies as st  # noqa: E402

from classify_contract.preprocessing import ImageTooLarge, InvalidImage, decode_image  # noqa: E402

FUZZ = fuzz_settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=10_000, database=None,
                     derandomize=not os.environ.get("FUZZ_RANDOM"),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                            HealthCheck.data_too_large])
SERVER_MAX_PIXELS = 40_000_000  # MAX_IMAGE_PIXELS's default


def _seeds():
    base = rgb(size=(40, 30))
    return [encode(base, "JPEG", quality=90), encode(base, "JPEG", progressive=True),
            encode(base, "PNG"), encode(base.quantize(16), "PNG", transparency=0), encode(base.convert("LA"), "PNG"),
            gray16_png_small(), encode(base, "GIF"), encode(base, "GIF", save_all=True,
                                                            append_images=[rgb("blue_triangle", 2, (40, 30))]),
            encode(base, "BMP"), encode(base, "WEBP"), encode(base, "WEBP", lossless=True), encode(base, "TIFF"),
            encode(base, "TIFF", compression="tiff_lzw"), encode(base, "PPM"), encode(base, "ICO"),
            encode(base.convert("CMYK"), "JPEG"), exif_bad_orientation_small(), encode(base, "TGA")]


def gray16_png_small():
    return encode(Image.fromarray(np.asarray(rgb(size=(40, 30)).convert("L"), np.uint16) * 257), "PNG")


def exif_bad_orientation_small():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "fuzz"
    return encode(rgb(size=(40, 30)), "JPEG", exif=exif.tobytes())


SEEDS = _seeds()
MAGIC = [b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"II*\x00",
         b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"P6\n", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP"]


@st.composite
def mutated_images(draw):
    """A valid image of some format, with bytes overwritten, inserted, deleted, and perhaps cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            data[at:at] = data[at:at + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
        if not data:
            data = bytearray(b"\x00")
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def _decode_or_reject(data, size=(224, 224)):
    try:
        pixels = decode_image(data, size, SERVER_MAX_PIXELS)
    except (InvalidImage, ImageTooLarge):
        return None
    assert pixels.shape == size + (3,) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255
    return pixels


@FUZZ
@given(data=st.binary(max_size=4096))
def test_fuzz_decode_random_bytes(data):
    _decode_or_reject(data)


@FUZZ
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=2048))
def test_fuzz_decode_random_bytes_after_a_format_signature(magic, tail):
    _decode_or_reject(magic + tail)


@FUZZ
@given(data=mutated_images())
def test_fuzz_decode_mutated_images(data):
    _decode_or_reject(data)


@FUZZ
@given(images=st.lists(st.one_of(mutated_images(), st.binary(max_size=512), st.sampled_from(SEEDS)),
                       min_size=1, max_size=4))
def test_fuzz_inference_classify(classifier, images):
    """The core every protocol calls; good images also run through the model."""
    from classify_server import settings
    from classify_server.core.inference import Inference, InferenceError
    from classify_server.core.registry import Models
    core = Inference(Models.static(classifier), settings.from_env().limits)
    try:
        prediction = core.classify(images)
    except InferenceError as exc:
        assert exc.message.startswith("image "), exc  # says which image
        return
    assert prediction.scores.shape == (len(images), len(classifier.labels))
    assert np.isfinite(prediction.scores).all()


def test_fuzz_is_bounded():
    assert FUZZ.max_examples <= 10_000 and FUZZ.deadline is not None
