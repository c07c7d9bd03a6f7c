"""gunicorn settings for `gunicorn classify_server:app`; each is an environment variable. Read through
./gunicorn.conf.py in the checkout, or from any folder with
`gunicorn -c python:classify_server.http_server.gunicorn_config classify_server:app`.

One worker by default (WEB_CONCURRENCY overrides, as gunicorn itself reads it),
whose TensorFlow session uses every core: each op over all of them, and as many
requests' runs at once as there are cores. With N workers each session gets
cores / N threads, so that all workers together use every core once and no more.
Why one: a kept-alive connection stays with the worker that accepted it, and
Linux often hands every connection of a few clients to the same worker while the
others idle (half the throughput, in docs/benchmark-history.md); one worker cannot be left
idle, answers a lone request on every core, and holds one copy of the model.
"""
import atexit
import os
import shutil
import sys
import tempfile

from classify_contract import model_folder
from classify_server import settings

service = settings.from_env()  # every setting, checked: a bad one stops gunicorn here with one line
http = service.http
cores = os.cpu_count() or 1
bind = http.bind or f"{http.host}:{http.port}"
workers = http.workers
worker_class = http.worker_class
threads = http.threads
timeout = http.timeout
graceful_timeout = service.serving.graceful_timeout
keepalive = http.keepalive
accesslog = http.access_log or None
loglevel = service.serving.log_level
# The model must be loaded in each worker after the fork: a TensorFlow session
# does not survive fork(), so never preload.
preload_app = False

# Prometheus counts per worker in files here, summed at /metrics (multiprocess mode). A folder made
# here is removed when the master exits, whether it stopped cleanly or failed to start; the workers,
# forked from the master, inherit the exit hook but must leave the folder to the others.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir = tempfile.mkdtemp(prefix="classify-metrics-")
    _master = os.getpid()
    atexit.register(lambda: os.getpid() == _master and shutil.rmtree(_metrics_dir, ignore_errors=True))


# gunicorn's control socket is shared by every instance of a user by default; not used here.
control_socket_disable = True


def on_starting(server):
    # Fail at once, before the workers spend seconds importing TensorFlow, when the model is not there at all.
    # Only MODEL_DIR's: a MODEL_CONFIG_FILE model whose base_path holds no version yet (or does not exist
    # yet) waits for its first, as TF Serving's do, and the workers log which (docs/operations.md: Several models).
    from classify_server.core import model_config
    try:
        specs = model_config.from_settings(service.model)
    except model_config.ConfigError as exc:
        sys.exit(f"classify_server: {exc}")
    for spec in specs if not service.model.config_file else ():
        path = spec.base_path
        if not (model_folder.is_model(path) or model_folder.versions(path)):
            inside = model_folder.models_inside(path)
            fix = f"did you mean MODEL_DIR={inside[0]}?" if inside else "set MODEL_DIR"
            sys.exit(f"classify_server: model not found: {' and '.join(model_folder.missing(path))} missing, "
                     f"and no numbered version folders ({fix}, or run: python -m retrain --output_dir {path})")
    for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"]):  # stale counts of an earlier run
        os.unlink(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], name))


# Set once any worker has loaded the model: after that a worker that cannot load it
# (its files broke meanwhile) exits alone instead of halting gunicorn (classify_server.wsgi.load_app).
os.environ["CLASSIFY_MODEL_LOADED_FLAG"] = os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "model-loaded.flag")


def post_worker_init(worker):
    open(os.environ["CLASSIFY_MODEL_LOADED_FLAG"], "a").close()
    import signal
    import socket
    stop = worker.handle_exit

    def handle_exit(sig, frame):
        # On SIGTERM stop listening at once, so new connections are refused rather than
        # left in the backlog to be reset; requests in flight still finish.
        if hasattr(worker, "set_accept_enabled"):
            worker.set_accept_enabled(False)
        for listener in worker.sockets:
            if listener.sock is None:  # closed by an earlier SIGTERM (e.g. to the whole process group)
                continue
            try:
                listener.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)


def child_exit(server, worker):
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


# Each worker reads its settings once, after the fork (settings.current()), these two with the rest.
os.environ.setdefault("TF_INTRA_OP_THREADS", str(max(1, cores // workers)))
os.environ.setdefault("TF_INTER_OP_THREADS", os.environ["TF_INTRA_OP_THREADS"])
