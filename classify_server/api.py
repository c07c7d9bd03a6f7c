"""Classification over HTTP: POST / with multipart field `data`.

One `data` part answers [[label, score], ...], best first; several parts answer
one such list per part, in order: [[[label, score], ...], ...].
Every answer that ran the model carries a Server-Timing header (decode and
inference milliseconds), which browsers' developer tools and load tests read.
"""
import time

from flask import Blueprint, abort, current_app, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from classify_server import metrics
from retrain.preprocessing import ImageTooLarge, InvalidImage

bp = Blueprint("api", __name__)


def parse_top_k(default, maximum):
    raw = request.args.get("top_k")
    if raw is None:
        return min(default, maximum)
    try:
        k = int(raw)
    except ValueError:
        abort(400, f"top_k must be a positive integer, got {raw[:40]!r}")
    if k < 1:
        abort(400, f"top_k must be a positive integer, got {k}")
    return min(k, maximum)


def uploaded_images(max_parts):
    """The bytes of every `data` part, or a 4xx saying what to send."""
    if not request.mimetype == "multipart/form-data":
        abort(415, "send the image as multipart/form-data in field 'data' (curl -F data=@image.jpg URL)")
    try:
        files = request.files.getlist("data")
    except ClientDisconnected:
        abort(408, "the request body did not arrive in time (BODY_TIMEOUT seconds)")
    if not files:
        abort(400, "no 'data' file field in the form: send the image as curl -F data=@image.jpg URL "
                   "(part headers, such as the file name, must be UTF-8)")
    if len(files) > max_parts:
        abort(413, f"too many 'data' parts: {len(files)}, the limit is {max_parts} (MAX_PARTS)")
    images = [f.read() for f in files]
    for i, data in enumerate(images):
        if not data:
            abort(400, f"'data' part {i + 1} ({files[i].filename or 'unnamed'}) is empty")
    return images


def run(classifier, images):
    """Probabilities for encoded images: shared preprocessing, then one session.run."""
    start = time.perf_counter()
    inputs = preprocess_all(classifier, images)
    decoded = time.perf_counter()
    with metrics.INFERENCE.time():
        probabilities = classifier.predict(inputs)
    g.server_timing = {"decode": decoded - start, "inference": time.perf_counter() - decoded}
    return probabilities


@bp.after_app_request
def add_server_timing(response):
    if "server_timing" in g:
        response.headers["Server-Timing"] = ", ".join(
            f"{name};dur={seconds * 1000:.2f}" for name, seconds in g.server_timing.items())
    return response


def preprocess_all(classifier, images):
    """Decode each image with the shared preprocessing; bad input is a 400 or 413."""
    try:
        return classifier.preprocess_all(images)
    except ImageTooLarge as exc:
        abort(413, str(exc))
    except InvalidImage as exc:
        abort(400, str(exc))


@bp.post("/")
def classify_upload():
    images = uploaded_images(current_app.config["MAX_PARTS"])
    with current_app.extensions["models"].acquire() as servable:
        classifier = servable.classifier
        top_k = parse_top_k(current_app.config["TOP_K"], len(classifier.labels))
        probabilities = run(classifier, images)
        answers = [classifier.top_k(p, top_k) for p in probabilities]
    return jsonify(answers[0] if len(answers) == 1 else answers)
