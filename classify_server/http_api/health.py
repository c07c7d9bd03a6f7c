"""Liveness and readiness probes."""
from flask import Blueprint, jsonify

from classify_server.core.inference import Inference


def blueprint(core: Inference) -> Blueprint:
    """This protocol's routes, handed the inference core."""
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @bp.get("/readyz")
    def readyz():
        models = core.models
        if not models.ready:
            return jsonify(status="loading"), 503
        versions = {name: manager.latest and manager.latest.version for name, manager in models.managers.items()}
        # `version`: the default model's, as before there were several
        return jsonify(status="ready", version=next(iter(versions.values())), models=versions)

    return bp
