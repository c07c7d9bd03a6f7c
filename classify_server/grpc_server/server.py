"""The gRPC server: `python -m classify_server.grpc_server` (or `classify_grpc`), on one port (GRPC_PORT, 8500):

    tensorflow.serving.PredictionService, ModelService    TF Serving's API (grpc_server.tfserving)
    inference.GRPCInferenceService                         the Open Inference Protocol, V2 (grpc_server.v2)
    grpc.health.v1.Health                                  NOT_SERVING until the models are loaded and warm,
                                                           SERVING then, NOT_SERVING again from the stop
                                                           signal on; per service name and for ""
    grpc.reflection.v1alpha.ServerReflection               so grpcurl lists and calls every service

It listens before it loads, so health checks see NOT_SERVING (not a refused port) while the models
warm up. The models are loaded, versioned and hot-reloaded exactly as for the HTTP server
(classify_server.core.registry.load_models: MODEL_CONFIG_FILE, or MODEL_DIR and MODEL_NAME...), and every
request goes through the inference core; the core's errors become gRPC statuses in one table
(grpc_server.errors). Settings, as environment variables or flags: GRPC_HOST / --host (0.0.0.0),
GRPC_PORT / --port (8500), GRPC_THREADS (4, requests served at once), MAX_QUEUE (64 more may wait; beyond,
RESOURCE_EXHAUSTED at once), MAX_UPLOAD_BYTES (the largest request message), GRACEFUL_TIMEOUT (30 s for
requests in flight after SIGTERM/SIGINT). A request whose deadline passed while it waited is not run.
"""
import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health as health_lib, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from classify_server import settings
from classify_server.core.inference import Inference
from classify_server.core.registry import load_models
from classify_server.engines import ModelLoadError
from classify_server.grpc_server import tfserving, v2

log = logging.getLogger("classify_server")


def make_server(core, max_message_bytes, threads=4, max_queue=64):
    """A grpc.Server with every service, not yet bound or started; health NOT_SERVING. `threads` RPCs run at
    once and `max_queue` more wait; beyond those gRPC itself answers RESOURCE_EXHAUSTED at once (health
    checks count too: a probe may see it while the server is full)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         maximum_concurrent_rpcs=threads + max_queue, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
    ])
    services = tfserving.add_to_server(core, server) + [v2.add_to_server(core, server)]
    health = health_lib.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                    reflection.SERVICE_NAME], server)
    server.health, server.services = health, services
    set_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server


def set_health(server, status):
    """Every service's health, and the server's (the empty name), to `status` (a ServingStatus)."""
    for name in ["", *server.services]:
        server.health.set(name, status)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m classify_server.grpc_server", description=(
        "Serve the models over TensorFlow Serving's gRPC API and the Open Inference Protocol's (V2)."))
    service = settings.current()
    parser.add_argument("--host", default=service.grpc.host, help="address to listen on (GRPC_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=service.grpc.port,
                        help="port to listen on (GRPC_PORT, default 8500; 0: any free port)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    settings.setup_logging(service.serving)
    threads, grace = service.grpc.threads, service.serving.graceful_timeout

    try:
        models = load_models(service.model, service.engine, start=False)  # a config that does not parse stops here
    except ModelLoadError as exc:
        raise SystemExit(f"classify_server.grpc_server: {exc}") from None
    server = make_server(Inference(models, service.limits), service.limits.max_upload_bytes, threads,
                         service.serving.max_queue)
    address = f"[{args.host}]:{args.port}" if ":" in args.host and not args.host.startswith("[") else \
        f"{args.host}:{args.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port, error = 0, exc
    else:
        error = "address in use or not available"
    if not port:
        raise SystemExit(f"classify_server.grpc_server: cannot listen on {address}: {error}")

    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():  # a second signal: stop now
            log.warning("%s again: stopping without waiting", signal.Signals(signum).name)
            server.stop(0)
            return
        log.info("%s: finishing requests in flight (up to %ss), then stopping", signal.Signals(signum).name, grace)
        set_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info("gRPC listening on %s:%s (%s threads), health NOT_SERVING while the models load", args.host, port,
             threads)
    failed = []

    def load():
        try:
            models.start()
        except ModelLoadError as exc:
            failed.append(exc)
            stopping.set()
            return
        if not stopping.is_set():
            set_health(server, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC serving on %s:%s: %s", args.host, port, ", ".join(
            f"model {name!r} " + (f"version {latest.version}" if (latest := manager.latest) else "waiting for its "
                                  "first version") + f" from {manager.spec.base_path}"
            for name, manager in models.managers.items()))

    threading.Thread(target=load, name="load-models", daemon=True).start()
    while not stopping.wait(1):
        pass
    if failed:
        server.stop(0)
        raise SystemExit(f"classify_server.grpc_server: {failed[0]}")
    server.stop(grace).wait()
    log.info("stopped")
    # gRPC has cancelled the requests still in flight after the grace period (or a second signal), but
    # their handlers' threads run on, and the interpreter's exit would wait for them (it joins the
    # pool's threads): exit now, as gunicorn kills a worker after GRACEFUL_TIMEOUT.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
