"""gunicorn settings for `gunicorn classify_server:app`; each is an environment variable.

Workers default to the CPU count (WEB_CONCURRENCY overrides, as gunicorn itself
reads it), and each worker's TensorFlow session gets cores / workers threads,
so that all workers together use every core once and no more.
"""
import os
import tempfile

cores = os.cpu_count() or 1
bind = os.environ.get("BIND", f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}")
workers = int(os.environ.get("WEB_CONCURRENCY", cores))
worker_class = os.environ.get("WORKER_CLASS", "gthread")
threads = int(os.environ.get("THREADS", 4))
timeout = int(os.environ.get("TIMEOUT", 60))
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", 30))
keepalive = int(os.environ.get("KEEPALIVE", 5))
accesslog = os.environ.get("ACCESS_LOG", "-") or None
loglevel = os.environ.get("LOG_LEVEL", "info")
# The model must be loaded in each worker after the fork: a TensorFlow session
# does not survive fork(), so never preload.
preload_app = False

# Prometheus counts per worker in files here, summed at /metrics (multiprocess mode).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="classify-metrics-")


def on_starting(server):
    for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):  # stale counts of an earlier run
        os.unlink(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], name))


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


os.environ.setdefault("TF_INTRA_OP_THREADS", str(max(1, cores // workers)))
os.environ.setdefault("TF_INTER_OP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
