"""Every setting of the service, read from the environment once: their one definition.

Each setting is an environment variable. SETTINGS lists them all, for the HTTP server
(create_app), gunicorn (gunicorn.conf.py), the gRPC server, the Kafka consumer and
label_image, with type, default and meaning; `from_env()` reads and checks them, and the
serving benchmark takes the list of names from here. A bad value stops the process with
one line naming the variable and what it must be.
"""
import logging
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    help: str
    kind: type = str
    minimum: float | None = None  # for numbers
    maximum: float | None = None
    empty_is_off: bool = False  # set but empty means "none" (not the default)


MiB = 1024 * 1024
SETTINGS = (
    # The model
    Setting("MODEL_DIR", "model", "model folder, or a base folder of numbered versions (docs/operations.md: Versions)"),
    Setting("MODEL_NAME", "model", "the name clients address the model by (TF Serving's model name)"),
    Setting("MODEL_POLL_SECONDS", 10, "seconds between looks for a new numbered version (0: never)", int, 0),
    Setting("MODEL_CONFIG_FILE", "", "several models: TF Serving's model_config_list file (then MODEL_DIR, "
                                     "MODEL_NAME and INPUT_* are not used; classify_server.core.model_config)"),
    Setting("MODEL_CONFIG_POLL_SECONDS", 10, "seconds between reads of MODEL_CONFIG_FILE for models added, "
                                             "removed or changed (0: never)", int, 0),
    Setting("MODEL_ENGINE", "tf", "tf: a TensorFlow session over graph.pb; tflite: LiteRT over model.tflite"),
    Setting("INPUT_LAYER", "", "a third-party graph's input tensor, when it has no model.json sidecar"),
    Setting("OUTPUT_LAYER", "", "its output tensor"),
    Setting("INPUT_HEIGHT", None, "its input height in pixels", int, 1),
    Setting("INPUT_WIDTH", None, "its input width in pixels", int, 1),
    Setting("INPUT_MEAN", None, "subtracted from its input pixels", float),
    Setting("INPUT_STD", None, "its input pixels are divided by this", float),
    # Limits of one request, for every protocol (the inference core enforces them)
    Setting("MAX_UPLOAD_BYTES", 10 * MiB, "largest request body, gRPC message or Kafka message", int, 1),
    Setting("MAX_IMAGE_PIXELS", 40_000_000, "largest image, in pixels (decompression bombs)", int, 1),
    Setting("MAX_PARTS", 32, "most images in one request", int, 1),
    Setting("TOP_K", 5, "labels in an answer, best first", int, 1),
    # The session
    Setting("TF_INTRA_OP_THREADS", 0, "TensorFlow threads per op (0: TensorFlow decides; gunicorn.conf.py "
                                      "sets cores / workers)", int, 0),
    Setting("TF_INTER_OP_THREADS", 0, "ops (and requests) run at once in the session (0: TensorFlow decides)",
            int, 0),
    Setting("TF_BFLOAT16", 0, "1: the tf engine lets oneDNN compute in bfloat16 where safe (CPUs with AVX512_BF16 "
                              "or AMX; docs/operations.md: Engines)", int, 0, 1),
    Setting("BATCH_MAX_SIZE", 0, "dynamic batching of concurrent requests, most images per run (0: off)", int, 0),
    Setting("BATCH_TIMEOUT_MS", 5, "how long a batch waits for more requests", int, 0),
    # Corrections from users (POST /feedback)
    Setting("FEEDBACK_DIR", "", "store users' corrections here (empty: feedback off)"),
    Setting("FEEDBACK_PER_MINUTE", 30, "corrections per client address per minute", int, 1),
    Setting("TRUSTED_PROXIES", 0, "proxies in front whose X-Forwarded-For names the client (0: none)", int, 0),
    # gunicorn (gunicorn.conf.py)
    Setting("BIND", "", "address to listen on, HOST:PORT (default: HOST and PORT)"),
    Setting("HOST", "0.0.0.0", "address to listen on"),
    Setting("PORT", 8000, "port to listen on", int, 1, 65535),
    Setting("WEB_CONCURRENCY", 1, "gunicorn worker processes, each with its own copy of the model", int, 1),
    Setting("WORKER_CLASS", "classify_server.http_server.worker.Worker",
            "gunicorn worker class (the default reads each request on its event loop: classify_server/http_server)"),
    Setting("THREADS", 4, "requests each worker serves at once", int, 1),
    Setting("TIMEOUT", 60, "seconds before a silent worker is restarted", int, 0),
    Setting("GRACEFUL_TIMEOUT", 30, "seconds for requests in flight after SIGTERM (HTTP and gRPC)", int, 0),
    Setting("KEEPALIVE", 5, "seconds an idle kept-alive connection stays open", int, 0),
    Setting("HEADER_TIMEOUT", 10, "seconds for a request's headers to arrive, else 408 and the connection is closed",
            float, 0.1),
    Setting("BODY_TIMEOUT", None, "seconds for a request body to arrive, else 408 (default TIMEOUT; 0: no limit)",
            float, 0),
    Setting("BODY_MIN_RATE", 4096, "bytes/s a request body must average once it has had 5 s, else 408 (0: no limit)",
            int, 0),
    Setting("MAX_QUEUE", 64, "requests a worker lets wait for a thread; more are answered 503 with Retry-After",
            int, 0),
    Setting("ACCESS_LOG", "-", "access log file ('-': standard output; empty: none)", empty_is_off=True),
    Setting("LOG_LEVEL", "info", "debug, info, warning or error"),
    # The gRPC server (python -m classify_server.grpc_server)
    Setting("GRPC_HOST", "0.0.0.0", "address the gRPC server listens on"),
    Setting("GRPC_PORT", 8500, "its port (0: any free port)", int, 0, 65535),
    Setting("GRPC_THREADS", 4, "RPCs it serves at once; more wait", int, 1),
    # The Kafka consumer (python -m classify_server.stream)
    Setting("KAFKA_BOOTSTRAP_SERVERS", "", "Kafka brokers, HOST:PORT[,HOST:PORT]"),
    Setting("KAFKA_INPUT_TOPIC", "", "topic of encoded images"),
    Setting("KAFKA_OUTPUT_TOPIC", "", "topic for the JSON predictions"),
    Setting("KAFKA_DEAD_LETTER_TOPIC", "", "topic for messages that cannot be classified "
                                           "(default <input topic>.dead-letter)"),
    Setting("KAFKA_GROUP_ID", "classify-stream", "consumer group: consumers sharing it share the partitions"),
    Setting("KAFKA_CONFIG", "", "librdkafka properties, k=v,k=v (consumer./producer. prefixes for one client)"),
    Setting("STREAM_REMOTE_URL", "", "classify through this server's TF Serving REST API instead of a local model"),
    Setting("STREAM_BATCH_SIZE", 32, "most messages classified together", int, 1),
    Setting("STREAM_BATCH_WAIT_MS", 0, "after the first message, wait this long for more", int, 0),
)
NAMES = frozenset(s.name for s in SETTINGS)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def from_env(environ=None):
    """{name: typed value} of every setting, from `environ` (default os.environ).

    Raises SystemExit with one line naming the variable when a value is not what it must be.
    """
    environ = os.environ if environ is None else environ
    config = {}
    for setting in SETTINGS:
        raw = environ.get(setting.name, "").strip()
        if raw:
            config[setting.name] = _parse(setting, raw)
        else:
            config[setting.name] = "" if setting.empty_is_off and setting.name in environ else setting.default
    if config["MODEL_CONFIG_FILE"]:
        for name in GRAPH_SETTINGS:
            if config[name] not in (None, ""):
                raise SystemExit(f"error: environment variable {name} describes MODEL_DIR's graph; with "
                                 "MODEL_CONFIG_FILE each model's model.json describes its own "
                                 "(docs/operations.md: Several models)")
    if config["BODY_TIMEOUT"] is None:  # its default is another setting's value: resolved here, once
        config["BODY_TIMEOUT"] = config["TIMEOUT"]
    if config["MODEL_ENGINE"] not in ("tf", "tflite"):
        _bad("MODEL_ENGINE", config["MODEL_ENGINE"], "tf or tflite")
    if config["LOG_LEVEL"].lower() not in LOG_LEVELS:
        _bad("LOG_LEVEL", config["LOG_LEVEL"], f"one of {', '.join(LOG_LEVELS)}")
    return config


def _parse(setting, raw):
    if setting.kind is str:
        return raw
    try:
        value = setting.kind(raw)
    except ValueError:
        _bad(setting.name, raw, "an integer" if setting.kind is int else "a number")
    too_small = setting.minimum is not None and value < setting.minimum
    if too_small or setting.maximum is not None and value > setting.maximum:
        bounds = f"at least {setting.minimum:g}" if setting.maximum is None else \
            f"between {setting.minimum:g} and {setting.maximum:g}"
        _bad(setting.name, raw, f"{'an integer' if setting.kind is int else 'a number'} {bounds}")
    return value


def _bad(name, raw, what):
    raise SystemExit(f"error: environment variable {name}={raw!r} must be {what}")


GRAPH_SETTINGS = ("INPUT_LAYER", "OUTPUT_LAYER", "INPUT_HEIGHT", "INPUT_WIDTH", "INPUT_MEAN", "INPUT_STD")


def graph_overrides(config):
    """The third-party graph settings that are set, as read_spec's overrides (label_image's flag names)."""
    return {name.lower(): config[name] for name in GRAPH_SETTINGS if config[name] not in (None, "")}


def setup_logging(config):
    """The one logging set-up of the processes that are not gunicorn (gRPC server, Kafka consumer)."""
    logging.basicConfig(level=config["LOG_LEVEL"].upper(),
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
