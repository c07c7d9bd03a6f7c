"""The HTTP adapters, one blueprint each, and `create_app`, their application factory (as in Flask's
tutorial): configuration from the environment (classify_server.settings), the models loaded once
(classify_server.core.registry, each version an engine: classify_server.engines), the inference core
over them (classify_server.core.inference), and the blueprints: classification of multipart uploads
(multipart), TensorFlow Serving's REST API (tfserving_rest), the Open Inference Protocol's (v2_rest),
health, the browser page (page), users' corrections (feedback), metrics; HTTP's error statuses in one
table (errors); what they share (core_calls). README's "Architecture" draws the whole.
"""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from classify_server import settings
from classify_server.core.inference import REQUEST_TOO_LARGE, TOO_MANY_IMAGES, Inference, InferenceError
from classify_server.engines import Engine
from classify_server.http_api import core_calls, errors, multipart

log = logging.getLogger("classify_server")


def create_app(test_config: Mapping[str, object] | None = None, classifier: Engine | None = None) -> Flask:
    """The app over this process's settings (classify_server.settings.current()), or over the environment
    with `test_config`'s values in place of its variables; `classifier` serves one engine already loaded."""
    if test_config is None:
        service = settings.current()
    else:
        overrides = {name: "" if value is None else str(value) for name, value in test_config.items()}
        service = settings.from_env({**os.environ, **overrides})
    limits = service.limits
    _log_through_gunicorn()
    app = Flask(__name__)
    app.request_class = core_calls.InMemoryRequest
    app.config["DEBUG"] = False  # never from FLASK_DEBUG: a debugger on an open port runs code
    # Werkzeug refuses a body on the read after MAX_CONTENT_LENGTH bytes (the read that finds the end of
    # a streamed body, under gunicorn): one byte more, so that MAX_UPLOAD_BYTES itself is allowed.
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes + 1
    if service.http.trusted_proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=service.http.trusted_proxies)  # type: ignore[method-assign]
    app.config["MAX_FORM_PARTS"] = limits.max_parts + 8  # the parts limit proper is the core's

    from classify_server.core.registry import Models, load_models
    models = load_models(service.model, service.engine) if classifier is None else \
        Models.static(classifier, service.model.name)
    app.extensions["models"] = models

    from classify_server import metrics
    from classify_server.http_api import feedback, health, page, tfserving_rest, v2_rest
    core = app.extensions["inference"] = Inference(models, limits, on_inference=metrics.INFERENCE.observe)
    metrics.init_app(app, models)
    errors.init_app(app)
    limiter = app.extensions["feedback_limiter"] = feedback.RateLimiter(service.feedback.per_minute)
    # Every adapter is handed the core, as the gRPC services are (app.extensions keeps them for tests).
    quota = feedback.Quota(service.feedback.max_bytes, service.feedback.max_files)
    app.register_blueprint(feedback.blueprint(core, limiter, service.feedback.dir, quota))
    app.register_blueprint(multipart.blueprint(core))
    app.after_request(core_calls.add_server_timing)
    app.register_blueprint(health.blueprint(core))
    app.register_blueprint(page.blueprint(core))
    app.register_blueprint(tfserving_rest.blueprint(core))
    app.register_blueprint(v2_rest.blueprint(core))

    @app.before_request
    def assign_request_id():
        g.request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex

    @app.after_request
    def security_headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if exc.code == 413 and exc.description == type(exc).description:
            # Werkzeug's own limits (body size, form parts) answer as the core's limits do.
            if (request.content_length or 0) > limits.max_upload_bytes or _stream_at_limit(app):
                return errors.response(InferenceError(REQUEST_TOO_LARGE, (
                    f"request body too large: the limit is {limits.max_upload_bytes} bytes (MAX_UPLOAD_BYTES)")))
            return errors.response(InferenceError(TOO_MANY_IMAGES, (
                f"too many parts in the form: send at most {limits.max_parts} 'data' parts (MAX_PARTS)")))
        v2_path = request.path == "/v2" or request.path.startswith("/v2/")  # V2's clients read V2's message
        not_found = v2_rest.NOT_FOUND if v2_path else "no such path: POST an image to / (curl -F data=@image.jpg URL)"
        messages = {404: not_found,
                    405: f"method {request.method} is not allowed here"}
        message = messages.get(exc.code) if exc.description == type(exc).description else exc.description
        response = jsonify(error=message or exc.description)
        response.status_code = exc.code
        if exc.code == 405:
            response.headers["Allow"] = ", ".join(exc.valid_methods or [])
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("request %s failed", g.get("request_id"))
        return jsonify(error="internal error; the server log has the details",
                       request_id=g.get("request_id")), 500

    return app


def _log_through_gunicorn():
    """Under gunicorn, our log lines (models loaded, swapped, failed) go where gunicorn's own go, at its level."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    if gunicorn_log.handlers and not log.handlers:
        log.handlers, log.propagate = gunicorn_log.handlers, False
        log.setLevel(gunicorn_log.level)


def _stream_at_limit(app):
    """Whether werkzeug stopped a streamed body (gunicorn's, without Content-Length) at MAX_CONTENT_LENGTH."""
    stream = request.stream
    return getattr(stream, "limit", None) == app.config["MAX_CONTENT_LENGTH"] and stream.is_exhausted
