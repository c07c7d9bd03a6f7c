"""What every HTTP adapter shares: the inference core reached through the app (its timing kept for the
Server-Timing header, which browsers' developer tools and load tests read), and uploads read from
multipart bodies, kept in memory."""
import io

from flask import Request, abort, g, request
from werkzeug.exceptions import ClientDisconnected


class InMemoryRequest(Request):
    """Uploads stay in memory (bounded by MAX_UPLOAD_BYTES): never written to disk."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def parse_top_k(default):
    raw = request.args.get("top_k")
    if raw is None:
        return default
    try:
        k = int(raw)
    except ValueError:
        abort(400, f"top_k must be a positive integer, got {raw[:40]!r}")
    if k < 1:
        abort(400, f"top_k must be a positive integer, got {k}")
    return k


def uploaded_images():
    """(the bytes of every `data` part, their file names), or a 4xx saying what to send."""
    if not request.mimetype == "multipart/form-data":
        abort(415, "send the image as multipart/form-data in field 'data' (curl -F data=@image.jpg URL)")
    try:
        files = request.files.getlist("data")
        images = [f.read() for f in files]
    except ClientDisconnected:
        abort(408, "the request body did not arrive in time (BODY_TIMEOUT seconds)")
    if not files:
        abort(400, "no 'data' file field in the form: send the image as curl -F data=@image.jpg URL "
                   "(part headers, such as the file name, must be UTF-8)")
    return images, [f.filename or "unnamed" for f in files]


def add_server_timing(response):
    if "server_timing" in g:
        response.headers["Server-Timing"] = ", ".join(
            f"{name};dur={seconds * 1000:.2f}" for name, seconds in g.server_timing.items())
    return response


def classify(core, images, model=None, version=None, names=None, label=None, count=None):
    """The core's Prediction (Inference.classify), its timing kept for the Server-Timing header."""
    prediction = core.classify(images, model, version, names, label, count)
    g.server_timing = prediction.timing
    return prediction
