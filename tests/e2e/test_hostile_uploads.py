"""Hostile and odd uploads, through a real gunicorn server.

CORPUS is a table: each case is a raw HTTP request (built here, byte for byte) and the status it must
get. Every case is sent to the module's 2-worker gunicorn (`server`, once per engine); then a valid
request must get the reference answer, and both workers must still be the same processes (no crash, no
restart). Nothing may answer 500. The fuzz and the in-process checks are unit/test_hostile.py's.

docs/reliability.md lists the corpus; `python -m pytest tests/e2e/test_hostile_uploads.py -v` repeats it.
"""
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import requests
from PIL import Image
from support.clients import assert_same_answer, classify
from support.images import encode, png_bytes, random_bytes, shape_image
from support.models import read_labels
from support.processes import Server

TIMEOUT = 60  # seconds, for every HTTP exchange
GOOD = shape_image("red_circle", 1)
BOUNDARY = b"hostile-boundary-7d3a"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the defaults the server runs with (docs/settings.md's table)
MAX_PARTS = 32


# --- building requests byte for byte ---------------------------------------------------------------

def part(data, name=b"data", filename=b"image.jpg", content_type=b"image/jpeg"):
    """One multipart part: (name, filename or None for a plain field, its Content-Type or None, bytes)."""
    return name, filename, content_type, data


def multipart(*parts, boundary=BOUNDARY, close=True):
    out = []
    for name, filename, content_type, data in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n")
        if content_type:
            out.append(b"Content-Type: " + content_type + b"\r\n")
        out.append(b"\r\n" + data + b"\r\n")
    if close:
        out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


class Raw:
    """One HTTP/1.1 request: method, target, headers and body exactly as given."""

    def __init__(self, body=b"", content_type=MULTIPART, target="/", chunked=False, method="POST"):
        self.body, self.content_type, self.target = body, content_type, target
        self.chunked, self.method = chunked, method

    def head(self):
        lines = [f"{self.method} {self.target} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type)
        lines.append(b"Transfer-Encoding: chunked" if self.chunked else b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def chunks(self):
        step = 64 * 1024
        for i in range(0, len(self.body), step):
            piece = self.body[i:i + step]
            yield (b"%x\r\n" % len(piece) + piece + b"\r\n") if self.chunked else piece
        if self.chunked:
            yield b"0\r\n\r\n"


def exchange(port, raw, timeout=TIMEOUT):
    """Send `raw` and read the answer: (status, headers, body). The body is sent from a thread, so an
    answer given before the whole body is read (413) is still read even if the server stops reading."""
    import http.client
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def feed():
        try:
            sock.sendall(raw.head())
            for piece in raw.chunks():
                sock.sendall(piece)
        except OSError:  # the server answered and closed before reading everything: allowed
            pass

    sender = threading.Thread(target=feed, daemon=True)
    sender.start()
    try:
        response = http.client.HTTPResponse(sock, method=raw.method)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked
        except OSError:
            pass
        sock.close()
        sender.join(timeout)


# --- the corpus ------------------------------------------------------------------------------------

def rgb(label="red_circle", seed=3, size=(96, 72)):
    return Image.open(io.BytesIO(shape_image(label, seed, size, fmt="PNG"))).convert("RGB")


def truncated(data, fraction=0.5):
    return data[: int(len(data) * fraction)]


def jpeg_with_exif_block(size=65000):
    """A valid JPEG whose EXIF (APP1) segment is as large as a segment can be (64 KB)."""
    exif = Image.Exif()
    exif[0x010E] = "x" * size  # ImageDescription
    data = encode(rgb(), "JPEG", exif=exif.tobytes())
    assert len(data) > size
    return data


def jpeg_with_many_app_segments(count=80, size=60000):
    """A valid JPEG with `count` extra APP15 segments of `size` bytes after SOI (~4.8 MB of metadata)."""
    data = encode(rgb(), "JPEG")
    segment = b"\xff\xef" + struct.pack(">H", size + 2) + b"\xa5" * size
    return data[:2] + segment * count + data[2:]


def jpeg_declaring(width, height):
    """A real small JPEG with its frame header (SOF0) patched to declare width x height."""
    data = bytearray(encode(rgb(), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    assert Image.open(io.BytesIO(data)).size == (width, height)
    return bytes(data)


def gif_declaring(width, height):
    data = bytearray(encode(rgb(), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen, which Pillow takes as the size
    assert Image.open(io.BytesIO(data)).size == (width, height)
    return bytes(data)


def bmp_declaring(width, height):
    data = bytearray(encode(rgb(), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    assert Image.open(io.BytesIO(data)).size == (width, height)
    return bytes(data)


def png_bad_crc():
    data = bytearray(encode(rgb(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # a data byte of the first IDAT: its CRC no longer matches
    return bytes(data)


def gray16_png():
    values = np.asarray(rgb().convert("L"), np.uint16) * 257
    return encode(Image.fromarray(values), "PNG")


def rgb48_png():
    values = np.asarray(rgb(), np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return png_bytes(values.shape[1], values.shape[0], bit_depth=16, colour_type=2, raw=rows)


def rgba_png():
    image = rgb().convert("RGBA")
    alpha = np.full((image.height, image.width), 255, np.uint8)
    alpha[:10] = 0
    image.putalpha(Image.fromarray(alpha))
    return encode(image, "PNG")


def animated_gif():
    return encode(rgb("red_circle", 5), "GIF", save_all=True, append_images=[rgb("green_square", 6)],
                  duration=100, loop=0)


def exif_bad_orientation():
    exif = Image.Exif()
    exif[0x0112] = 77  # not an orientation (1..8)
    return encode(rgb(), "JPEG", exif=exif.tobytes())


def zip_body():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("image.jpg", GOOD)
    return out.getvalue()


def one(data, **kwargs):
    """A well-formed request with one `data` part."""
    return lambda: Raw(multipart(part(data() if callable(data) else data, **kwargs)))


def query(target, data=GOOD):
    return lambda: Raw(multipart(part(data)), target=target)


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
       b'<script>alert(1)</script><circle cx="32" cy="32" r="20" fill="red"/></svg>')
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)><script>alert(1)</script></body></html>"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n" * 30 + b"%%EOF\n"
# name -> (status, request builder, answered by): "app" answers JSON {"error": ...} with nosniff;
# "gunicorn" marks gunicorn's own answer to a request it cannot parse (HTML, before the app runs).
CORPUS = {
    # not images, or broken ones, under an image's name: 400
    "empty_file": (400, one(b"")),
    "truncated_jpeg": (400, one(lambda: truncated(encode(rgb(size=(320, 240)), "JPEG", quality=95)))),
    "truncated_png": (400, one(lambda: truncated(encode(rgb(size=(320, 240)), "PNG")), filename=b"x.png")),
    "jpeg_header_only": (400, one(lambda: encode(rgb(), "JPEG")[:200])),
    "random_bytes": (400, one(lambda: random_bytes(4096, seed=1))),
    "random_bytes_after_jpeg_magic": (400, one(lambda: random_bytes(4096, seed=2, prefix=b"\xff\xd8\xff\xe0"))),
    "random_bytes_after_png_magic": (400, one(lambda: random_bytes(4096, seed=3, prefix=b"\x89PNG\r\n\x1a\n"),
                                              filename=b"x.png")),
    "png_with_bad_crc": (400, one(png_bad_crc, filename=b"x.png")),
    "text_as_jpg": (400, one(b"just some text, not a photo\n" * 10)),
    "html_as_png": (400, one(HTML, filename=b"x.png", content_type=b"image/png")),
    "svg_with_script": (400, one(SVG, filename=b"x.svg", content_type=b"image/svg+xml")),
    "pdf_as_jpg": (400, one(PDF)),
    "zip_as_png": (400, one(zip_body, filename=b"x.png", content_type=b"image/png")),
    # pixel bombs: a small file declaring a huge image: 413 before decoding
    "png_declaring_50000x50000": (413, one(lambda: png_bytes(50000, 50000, raw=b"\x00" * 16), filename=b"x.png")),
    "jpeg_declaring_65000x65000": (413, one(lambda: jpeg_declaring(65000, 65000))),
    "gif_declaring_65535x65535": (413, one(lambda: gif_declaring(65535, 65535), filename=b"x.gif")),
    "bmp_declaring_30000x30000": (413, one(lambda: bmp_declaring(30000, 30000), filename=b"x.bmp")),
    # odd but valid images: they classify
    "jpeg_with_64kb_exif": (200, one(jpeg_with_exif_block)),
    "jpeg_with_4.8mb_of_app_segments": (200, one(jpeg_with_many_app_segments)),
    "jpeg_with_invalid_exif_orientation": (200, one(exif_bad_orientation)),
    "gray16_png": (200, one(gray16_png, filename=b"x.png")),
    "rgb48_png": (200, one(rgb48_png, filename=b"x.png")),
    "cmyk_jpeg": (200, one(lambda: encode(rgb().convert("CMYK"), "JPEG"))),
    "palette_png": (200, one(lambda: encode(rgb().quantize(64), "PNG"), filename=b"x.png")),
    "palette_png_with_transparency": (200, one(lambda: encode(rgb().quantize(64), "PNG", transparency=0))),
    "rgba_png": (200, one(rgba_png, filename=b"x.png")),
    "animated_gif": (200, one(animated_gif, filename=b"x.gif")),
    "1x1_png": (200, one(lambda: encode(Image.new("RGB", (1, 1), (200, 20, 20)), "PNG"), filename=b"x.png")),
    "1x1_jpeg": (200, one(lambda: encode(Image.new("RGB", (1, 1), (200, 20, 20)), "JPEG"))),
    "10000x100_png": (200, one(lambda: encode(rgb(size=(10000, 100)), "PNG"), filename=b"x.png")),
    "100x10000_jpeg": (200, one(lambda: encode(rgb(size=(100, 10000)), "JPEG"))),
    "6000x6000_jpeg_36_megapixels": (200, one(lambda: encode(Image.new("RGB", (6000, 6000), (200, 30, 30)),
                                                             "JPEG"))),
    # names and part headers
    "path_traversal_file_name": (200, one(GOOD, filename=b"../../../../etc/passwd.jpg")),
    "10kb_file_name": (200, one(GOOD, filename=b"a" * 10000 + b".jpg")),
    "part_content_type_lies": (200, one(GOOD, filename=b"notes.txt", content_type=b"text/plain")),
    # werkzeug cannot decode a non-UTF-8 part header: the part is dropped, so "no 'data' file field"
    "non_utf8_file_name": (400, one(GOOD, filename=b"caf\xe9-\xff\xfe.jpg")),
    # the request's size and shape
    "body_over_max_upload_bytes": (413, lambda: Raw(multipart(part(b"\0" * (MAX_UPLOAD_BYTES + 1))))),
    "chunked_body_over_max_upload_bytes": (413, lambda: Raw(multipart(part(b"\0" * (MAX_UPLOAD_BYTES + 1))),
                                                            chunked=True)),
    "chunked_transfer_encoding": (200, lambda: Raw(multipart(part(GOOD)), chunked=True)),
    "33_data_parts": (413, lambda: Raw(multipart(*[part(GOOD)] * (MAX_PARTS + 1)))),
    "1000_data_parts": (413, lambda: Raw(multipart(*[part(b"x")] * 1000))),
    "500_other_fields_and_an_image": (413, lambda: Raw(multipart(*[part(b"x", name=b"f%d" % i, filename=None,
                                                                         content_type=None) for i in range(500)],
                                                                 part(GOOD)))),
    "wrong_field_name": (400, one(GOOD, name=b"image")),
    "data_as_a_text_field": (400, one(b"hello", filename=None, content_type=None)),
    "one_good_part_one_random": (400, lambda: Raw(multipart(part(GOOD), part(random_bytes(2048, seed=4))))),
    # malformed multipart
    "multipart_without_closing_boundary": (400, lambda: Raw(multipart(part(GOOD), close=False))),
    "multipart_cut_mid_part": (400, lambda: Raw(multipart(part(GOOD))[:300])),
    "multipart_boundary_mismatch": (400, lambda: Raw(multipart(part(GOOD)),
                                                     content_type=b"multipart/form-data; boundary=other")),
    "multipart_without_boundary_parameter": (400, lambda: Raw(multipart(part(GOOD)),
                                                              content_type=b"multipart/form-data")),
    "multipart_garbage_body": (400, lambda: Raw(random_bytes(8192, seed=5))),
    "multipart_header_without_colon": (400, lambda: Raw(b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\n" + GOOD
                                                        + b"\r\n--" + BOUNDARY + b"--\r\n")),
    # the wrong content type
    "text_plain_body": (415, lambda: Raw(b"hello", content_type=b"text/plain")),
    "no_content_type": (415, lambda: Raw(multipart(part(GOOD)), content_type=None)),
    "octet_stream_body": (415, lambda: Raw(GOOD, content_type=b"application/octet-stream")),
    "svg_body": (415, lambda: Raw(SVG, content_type=b"image/svg+xml")),
    # bad top_k in the query string
    "top_k_letters": (400, query("/?top_k=abc")),
    "top_k_zero": (400, query("/?top_k=0")),
    "top_k_negative": (400, query("/?top_k=-3")),
    "top_k_exponent": (400, query("/?top_k=1e3")),
    "top_k_nul_byte": (400, query("/?top_k=%00")),
    "top_k_invalid_utf8": (400, query("/?top_k=%ff%fe")),
    "top_k_4000_digits": (200, query("/?top_k=" + "9" * 4000)),  # clamped to the label count
    "top_k_twice_first_wins": (200, query("/?top_k=1&top_k=abc")),
    "top_k_fullwidth_digit": (200, query("/?top_k=%EF%BC%92")),  # int() reads Unicode digits: 2
    "malformed_percent_escape_elsewhere": (200, query("/?%zz=%&top_k=2")),
    "request_line_over_4094_bytes": (414, query("/?top_k=" + "9" * 5000), "gunicorn"),
}


def answered_by(case):
    return CORPUS[case][2] if len(CORPUS[case]) > 2 else "app"


# --- through gunicorn ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["tf", "tflite"])
def server(request, trained_model, tmp_path_factory):
    """conftest's server, once with each engine (MODEL_ENGINE): bad input is the core's to refuse, whichever runs."""
    s = Server({"MODEL_DIR": trained_model, "MODEL_ENGINE": request.param}, workers=2,
               log_path=tmp_path_factory.mktemp("server") / "gunicorn.log")
    try:
        # A tflite worker is ready before gunicorn has forked the second one: wait for both.
        yield s.wait_ready().wait_until(lambda: len(worker_pids(s)) == 2, 30, "both workers forked")
    finally:
        s.stop()


def worker_pids(server):
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        return sorted(int(pid) for pid in f.read().split())


@pytest.fixture(scope="module")
def reference(server):
    """The answer for GOOD, and the workers serving, before any hostile request."""
    assert len(worker_pids(server)) == 2
    return classify(server.url, GOOD), worker_pids(server)


@pytest.fixture(scope="module")
def labels(trained_model):
    return read_labels(trained_model)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    assert {case[0] for case in CORPUS.values()} >= {200, 400, 413, 414, 415}


@pytest.mark.parametrize("case", CORPUS)
def test_hostile_upload_gets_its_status_and_the_next_request_its_answer(server, reference, labels, case):
    expected_answer, workers = reference
    status, build = CORPUS[case][:2]
    got, headers, body = exchange(server.port, build())
    assert got == status, (got, body[:300])
    if answered_by(case) == "app":
        assert headers.get("X-Content-Type-Options") == "nosniff"
        assert headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        if status == 200:
            answers = answer if isinstance(answer[0][0], list) else [answer]
            for one_answer in answers:
                assert one_answer and all(label in labels and 0 <= score <= 1 for label, score in one_answer)
        else:
            assert isinstance(answer, dict) and answer["error"], answer
    # The server is unharmed: the same workers, and the right answer for the next valid request.
    assert_same_answer(classify(server.url, GOOD), expected_answer, tol=1e-5)
    assert worker_pids(server) == workers, "a worker died or was restarted"


def test_the_answers_of_odd_valid_images_are_sensible(server, reference):
    """A few checks beyond 'it classified': the top_k parsing the corpus relies on."""
    assert len(classify(server.url, GOOD, "?top_k=1&top_k=abc")) == 1
    assert len(classify(server.url, GOOD, "?top_k=%EF%BC%92")) == 2
    assert len(classify(server.url, GOOD, "?top_k=" + "9" * 4000)) == len(reference[0])


def test_no_traceback_in_the_server_log_after_the_corpus(server):
    output = server.output()
    assert "Traceback" not in output, output[-5000:]
    assert " 500 " not in output


# --- security properties ---------------------------------------------------------------------------

def test_debug_mode_is_off_under_gunicorn(server):
    """Flask pretty-prints JSON only in debug mode: the served app answers compact JSON."""
    response = requests.get(server.url + "/healthz", timeout=TIMEOUT)
    assert response.content == b'{"status":"ok"}\n'


# --- the fuzz --------------------------------------------------------------------------------------




@pytest.mark.parametrize("command, name, value, expected", [
    (["-m", "gunicorn", "classify_server:app"], "TOP_K", "abc", "must be an integer"),
    # (gunicorn reads WEB_CONCURRENCY itself before its config file: -1 is its own "Value must be positive")
    (["-m", "gunicorn", "classify_server:app"], "WEB_CONCURRENCY", "0", "must be an integer at least 1"),
    (["-m", "gunicorn", "classify_server:app"], "BODY_TIMEOUT", "soon", "must be a number"),
    (["-m", "gunicorn", "classify_server:app"], "LOG_LEVEL", "loud", "must be one of debug, info"),
    (["-m", "classify_server.grpc_server"], "GRPC_THREADS", "0", "must be an integer at least 1"),
    (["-m", "classify_server.grpc_server"], "GRPC_PORT", "70000", "must be an integer between 0 and 65535"),
    (["-m", "classify_server.stream", "--bootstrap-servers", "h:9092", "--input-topic", "i", "--output-topic", "o"],
     "STREAM_BATCH_SIZE", "many", "must be an integer"),
    (["-m", "classify_server.label_image", "--image", "x.jpg"], "MAX_IMAGE_PIXELS", "1e6", "must be an integer"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(trained_model, command, name, value, expected):
    """Each process reads the settings once, at start (classify_server.settings): a bad value stops it
    with one line that names the variable, before any model is loaded."""
    from support import ROOT
    env = dict(os.environ, MODEL_DIR=trained_model, **{name: value})
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: environment variable")]
    assert len(lines) == 1 and lines[0].startswith(f"error: environment variable {name}={value!r} "), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr, result.stderr
