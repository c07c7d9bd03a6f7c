"""Prometheus metrics at GET /metrics, summed over all gunicorn workers.

With several workers each process counts for itself; prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by gunicorn.conf.py) adds
them up at scrape time, whichever worker answers the scrape.
"""
import os
import time

from flask import Blueprint, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("classify_requests_total", "HTTP requests by route and status", ["route", "status"])
LATENCY = Histogram("classify_request_latency_seconds", "HTTP request latency by route", ["route"],
                    buckets=(.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5, 10))
INFERENCE = Histogram("classify_inference_seconds", "session.run time per batch",
                      buckets=(.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 2.5, 5))
MODEL_VERSION = Gauge("classify_model_version", "newest version of each model served by each worker", ["model"],
                      multiprocess_mode="liveall")
# Kept by the gunicorn worker's event loop (classify_server.http_server.worker), outside Flask.
QUEUE_DEPTH = Gauge("classify_queue_depth", "complete requests waiting for a worker thread (at most MAX_QUEUE)",
                    multiprocess_mode="livesum")
SHED = Counter("classify_shed_total", "requests answered 503 at once because MAX_QUEUE requests were waiting")
CUT_OFF = Counter("classify_slow_clients_cut_total", "connections closed because a request arrived too slowly "
                  "(headers: HEADER_TIMEOUT; body: BODY_TIMEOUT or BODY_MIN_RATE)", ["part"])
for _part in ("headers", "body"):
    CUT_OFF.labels(_part)  # shown as 0 before the first
FEEDBACK_REFUSED = Counter("classify_feedback_refused_total", "corrections refused with 507: FEEDBACK_DIR at its "
                           "quota (limit: bytes, FEEDBACK_MAX_BYTES; files, FEEDBACK_MAX_FILES) or its disk full "
                           "(disk)", ["limit"])
for _limit in ("bytes", "files", "disk"):
    FEEDBACK_REFUSED.labels(_limit)


def init_app(app, models):
    app.register_blueprint(bp)
    set_versions(models)

    @app.before_request
    def start_timer():
        g.start_time = time.perf_counter()

    @app.after_request
    def record(response):
        set_versions(models)  # follows hot reloads
        route = request.url_rule.rule if request.url_rule else "unmatched"
        if route != "/metrics":
            REQUESTS.labels(route, str(response.status_code)).inc()
            LATENCY.labels(route).observe(time.perf_counter() - g.get("start_time", time.perf_counter()))
        return response


def set_versions(models):
    for name, manager in models.managers.items():
        latest = manager.latest
        if latest is not None:
            MODEL_VERSION.labels(name).set(latest.version)


@bp.get("/metrics")
def metrics():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
