"""Classification over HTTP: POST / with multipart field `data`.

One `data` part answers [[label, score], ...], best first; several parts answer
one such list per part, in order: [[[label, score], ...], ...]. `?model=NAME` and
`?version=V` ask for a model and version (404 with code model_not_found or
version_not_served when they are not the ones served); `?top_k=K` for K labels.
Every answer that ran the model carries a Server-Timing header (decode and
inference milliseconds), which browsers' developer tools and load tests read.
"""
from flask import Blueprint, abort, jsonify, request

from classify_server.core.inference import Inference
from classify_server.http_api.core_calls import classify, parse_top_k, uploaded_images


def blueprint(core: Inference) -> Blueprint:
    """This protocol's routes, handed the inference core."""
    bp = Blueprint("api", __name__)

    @bp.post("/")
    def classify_upload():
        version = request.args.get("version")
        if version is not None and not version.isdigit():
            abort(400, f"version must be a version number, got {version[:40]!r}")
        model, version = request.args.get("model"), version and int(version)
        core.resolve(model, version)  # the model first: 404 before the form is read
        images, names = uploaded_images()
        top_k = parse_top_k(core.limits.top_k)
        answers = classify(core, images, model, version, names).top_k(top_k)
        return jsonify(answers[0] if len(answers) == 1 else answers)

    return bp
