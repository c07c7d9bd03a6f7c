"""Classification over HTTP: POST / with multipart field `data`.

One `data` part answers [[label, score], ...], best first; several parts answer
one such list per part, in order: [[[label, score], ...], ...]. `?model=NAME` and
`?version=V` ask for a model and version (404 with code model_not_found or
version_not_served when they are not the ones served); `?top_k=K` for K labels.
Every answer that ran the model carries a Server-Timing header (decode and
inference milliseconds), which browsers' developer tools and load tests read.
"""
import io

from flask import Blueprint, Request, abort, current_app, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected

bp = Blueprint("api", __name__)


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


@bp.after_app_request
def add_server_timing(response):
    if "server_timing" in g:
        response.headers["Server-Timing"] = ", ".join(
            f"{name};dur={seconds * 1000:.2f}" for name, seconds in g.server_timing.items())
    return response


def classify(images, model=None, version=None, names=None, label=None):
    """The core's Prediction, its timing kept for the Server-Timing header."""
    prediction = current_app.extensions["inference"].classify(images, model, version, names, label)
    g.server_timing = prediction.timing
    return prediction


@bp.post("/")
def classify_upload():
    images, names = uploaded_images()
    top_k = parse_top_k(current_app.config["TOP_K"])
    version = request.args.get("version")
    if version is not None and not version.isdigit():
        abort(400, f"version must be a version number, got {version[:40]!r}")
    answers = classify(images, request.args.get("model"), version and int(version), names).top_k(top_k)
    return jsonify(answers[0] if len(answers) == 1 else answers)
