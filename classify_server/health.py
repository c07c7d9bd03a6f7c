"""Liveness and readiness probes."""
from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    models = current_app.extensions["models"]
    if not models.ready:
        return jsonify(status="loading"), 503
    return jsonify(status="ready", version=models.current.version)
