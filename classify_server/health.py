"""Liveness, readiness and model metadata (TensorFlow Serving's metadata path)."""
from flask import Blueprint, abort, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    if not current_app.extensions["classifier"].ready:
        return jsonify(status="loading"), 503
    return jsonify(status="ready")


@bp.get("/v1/models/<name>/metadata")
def metadata(name):
    if name != current_app.config["MODEL_NAME"]:
        abort(404, f"no model named {name!r}; this server serves {current_app.config['MODEL_NAME']!r} (MODEL_NAME)")
    return jsonify(model_spec={"name": name}, metadata=current_app.extensions["classifier"].metadata())
