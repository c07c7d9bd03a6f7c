"""Every setting of the service, read from the environment once per process: their one definition.

Each setting is an environment variable, and a field of one typed, frozen group: the model
(`ModelSettings`), the engine that runs it, the limits of one request, users' corrections, the
HTTP server, the gRPC server, the stream, and what every serving process shares. Each component
is handed only its group. `current()` reads and checks them once per process (gunicorn's
workers, the gRPC server, the Kafka consumer, label_image); `from_env(environ)` reads a given
mapping (gunicorn's master, tests). A bad value stops the process with one line naming the
variable and what it must be. SETTINGS lists them all, in the groups' order, for the docs and
the serving benchmark.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass

MiB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def setting(env: str, default: object, help: str, *, minimum: float | None = None, maximum: float | None = None,
            choices: tuple[str, ...] = (), empty_is_off: bool = False) -> typing.Any:
    """A group's field that is the environment variable `env`; its type is the field's annotation."""
    return dataclasses.field(default=default, metadata={
        "env": env, "help": help, "minimum": minimum, "maximum": maximum, "choices": choices,
        "empty_is_off": empty_is_off})  # set but empty means "none" (not the default)


@dataclass(frozen=True)
class ModelSettings:
    """The model: where it is, what clients call it, how new versions are found."""
    dir: str = setting("MODEL_DIR", "model", "model folder, or a base folder of numbered versions "
                                             "(docs/operations.md: Versions)")
    name: str = setting("MODEL_NAME", "model", "the name clients address the model by (TF Serving's model name)")
    poll_seconds: int = setting("MODEL_POLL_SECONDS", 10, "seconds between looks for a new numbered version "
                                                          "(0: never)", minimum=0)
    config_file: str = setting("MODEL_CONFIG_FILE", "", "several models: TF Serving's model_config_list file "
                                                        "(then MODEL_DIR, MODEL_NAME and INPUT_* are not used; "
                                                        "classify_server.core.model_config)")
    config_poll_seconds: int = setting("MODEL_CONFIG_POLL_SECONDS", 10, "seconds between reads of "
                                       "MODEL_CONFIG_FILE for models added, removed or changed (0: never)", minimum=0)
    # A third-party graph with no model.json sidecar (label_image's flags of the same names)
    input_layer: str = setting("INPUT_LAYER", "", "a third-party graph's input tensor, when it has no model.json "
                                                  "sidecar")
    output_layer: str = setting("OUTPUT_LAYER", "", "its output tensor")
    input_height: int | None = setting("INPUT_HEIGHT", None, "its input height in pixels", minimum=1)
    input_width: int | None = setting("INPUT_WIDTH", None, "its input width in pixels", minimum=1)
    input_mean: float | None = setting("INPUT_MEAN", None, "subtracted from its input pixels")
    input_std: float | None = setting("INPUT_STD", None, "its input pixels are divided by this")

    def graph_overrides(self) -> dict[str, object]:
        """The third-party graph settings that are set, as read_spec's overrides (label_image's flag names)."""
        return {name: getattr(self, name) for name in GRAPH_FIELDS if getattr(self, name) not in (None, "")}


GRAPH_FIELDS = ("input_layer", "output_layer", "input_height", "input_width", "input_mean", "input_std")


@dataclass(frozen=True)
class EngineSettings:
    """The engine that runs each model version (classify_server.engines)."""
    kind: str = setting("MODEL_ENGINE", "tf", "tf: a TensorFlow session over graph.pb; tflite: LiteRT over "
                                              "model.tflite", choices=("tf", "tflite"))
    intra_op_threads: int = setting("TF_INTRA_OP_THREADS", 0, "TensorFlow threads per op (0: TensorFlow decides; "
                                                              "gunicorn.conf.py sets cores / workers)", minimum=0)
    inter_op_threads: int = setting("TF_INTER_OP_THREADS", 0, "ops (and requests) run at once in the session "
                                                              "(0: TensorFlow decides)", minimum=0)
    bfloat16: int = setting("TF_BFLOAT16", 0, "1: the tf engine lets oneDNN compute in bfloat16 where safe (CPUs "
                                              "with AVX512_BF16 or AMX; docs/operations.md: Engines)",
                            minimum=0, maximum=1)
    batch_max_size: int = setting("BATCH_MAX_SIZE", 0, "dynamic batching of concurrent requests, most images per "
                                                       "run (0: off)", minimum=0)
    batch_timeout_ms: int = setting("BATCH_TIMEOUT_MS", 5, "how long a batch waits for more requests", minimum=0)


@dataclass(frozen=True)
class Limits:
    """The limits of one request, for every protocol (the inference core enforces them)."""
    max_upload_bytes: int = setting("MAX_UPLOAD_BYTES", 10 * MiB, "largest request body, gRPC message or Kafka "
                                                                  "message", minimum=1)
    max_image_pixels: int = setting("MAX_IMAGE_PIXELS", 40_000_000, "largest image, in pixels (decompression "
                                                                    "bombs)", minimum=1)
    max_parts: int = setting("MAX_PARTS", 32, "most images in one request", minimum=1)
    top_k: int = setting("TOP_K", 5, "labels in an answer, best first", minimum=1)


@dataclass(frozen=True)
class FeedbackSettings:
    """Corrections from users (POST /feedback)."""
    dir: str = setting("FEEDBACK_DIR", "", "store users' corrections here (empty: feedback off)")
    per_minute: int = setting("FEEDBACK_PER_MINUTE", 30, "corrections per client address per minute", minimum=1)
    # Bounds what all clients together may store, so that corrections cannot fill the disk the models live on.
    max_bytes: int = setting("FEEDBACK_MAX_BYTES", 1024 * MiB, "most bytes FEEDBACK_DIR may hold; past it "
                                                              "corrections are refused with 507", minimum=1)
    max_files: int = setting("FEEDBACK_MAX_FILES", 10_000, "most files FEEDBACK_DIR may hold; past it "
                                                           "corrections are refused with 507", minimum=1)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server: gunicorn (gunicorn.conf.py) and its worker (classify_server.http_server)."""
    bind: str = setting("BIND", "", "address to listen on, HOST:PORT (default: HOST and PORT)")
    host: str = setting("HOST", "0.0.0.0", "address to listen on")
    port: int = setting("PORT", 8000, "port to listen on", minimum=1, maximum=65535)
    workers: int = setting("WEB_CONCURRENCY", 1, "gunicorn worker processes, each with its own copy of the model",
                           minimum=1)
    worker_class: str = setting("WORKER_CLASS", "classify_server.http_server.worker.Worker",
                                "gunicorn worker class (the default reads each request on its event loop: "
                                "classify_server/http_server)")
    threads: int = setting("THREADS", 4, "requests each worker serves at once", minimum=1)
    timeout: int = setting("TIMEOUT", 60, "seconds before a silent worker is restarted", minimum=0)
    keepalive: int = setting("KEEPALIVE", 5, "seconds an idle kept-alive connection stays open", minimum=0)
    header_timeout: float = setting("HEADER_TIMEOUT", 10.0, "seconds for a request's headers to arrive, else 408 "
                                                            "and the connection is closed", minimum=0.1)
    body_timeout: float = setting("BODY_TIMEOUT", None, "seconds for a request body to arrive, else 408 (default "
                                                        "TIMEOUT; 0: no limit)", minimum=0)
    body_min_rate: int = setting("BODY_MIN_RATE", 4096, "bytes/s a request body must average once it has had 5 s, "
                                                        "else 408 (0: no limit)", minimum=0)
    access_log: str = setting("ACCESS_LOG", "-", "access log file ('-': standard output; empty: none)",
                              empty_is_off=True)
    trusted_proxies: int = setting("TRUSTED_PROXIES", 0, "proxies in front whose X-Forwarded-For names the client "
                                                         "(0: none)", minimum=0)


@dataclass(frozen=True)
class ServingSettings:
    """What every serving process shares (the HTTP workers, the gRPC server, the Kafka consumer)."""
    graceful_timeout: int = setting("GRACEFUL_TIMEOUT", 30, "seconds for requests in flight after SIGTERM (HTTP "
                                                            "and gRPC)", minimum=0)
    max_queue: int = setting("MAX_QUEUE", 64, "requests a worker lets wait for a thread; more are answered 503 "
                                              "with Retry-After", minimum=0)
    log_level: str = setting("LOG_LEVEL", "info", "debug, info, warning or error", choices=LOG_LEVELS)


@dataclass(frozen=True)
class GrpcSettings:
    """The gRPC server (python -m classify_server.grpc_server)."""
    host: str = setting("GRPC_HOST", "0.0.0.0", "address the gRPC server listens on")
    port: int = setting("GRPC_PORT", 8500, "its port (0: any free port)", minimum=0, maximum=65535)
    threads: int = setting("GRPC_THREADS", 4, "RPCs it serves at once; more wait", minimum=1)


@dataclass(frozen=True)
class StreamSettings:
    """The Kafka consumer (python -m classify_server.stream)."""
    bootstrap_servers: str = setting("KAFKA_BOOTSTRAP_SERVERS", "", "Kafka brokers, HOST:PORT[,HOST:PORT]")
    input_topic: str = setting("KAFKA_INPUT_TOPIC", "", "topic of encoded images")
    output_topic: str = setting("KAFKA_OUTPUT_TOPIC", "", "topic for the JSON predictions")
    dead_letter_topic: str = setting("KAFKA_DEAD_LETTER_TOPIC", "", "topic for messages that cannot be classified "
                                                                    "(default <input topic>.dead-letter)")
    group_id: str = setting("KAFKA_GROUP_ID", "classify-stream", "consumer group: consumers sharing it share the "
                                                                 "partitions")
    kafka_config: str = setting("KAFKA_CONFIG", "", "librdkafka properties, k=v,k=v (consumer./producer. prefixes "
                                                    "for one client)")
    remote_url: str = setting("STREAM_REMOTE_URL", "", "classify through this server's TF Serving REST API instead "
                                                       "of a local model")
    batch_size: int = setting("STREAM_BATCH_SIZE", 32, "most messages classified together", minimum=1)
    batch_wait_ms: int = setting("STREAM_BATCH_WAIT_MS", 0, "after the first message, wait this long for more",
                                 minimum=0)


@dataclass(frozen=True)
class Settings:
    """Every group; a component is handed the one it needs."""
    model: ModelSettings
    engine: EngineSettings
    limits: Limits
    feedback: FeedbackSettings
    http: HttpSettings
    serving: ServingSettings
    grpc: GrpcSettings
    stream: StreamSettings


@dataclass(frozen=True)
class Setting:
    """One environment variable: its group's field, type, default, bounds and meaning."""
    name: str
    group: str
    field: str
    kind: type
    default: object
    help: str
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...]
    empty_is_off: bool


def _table() -> tuple[Setting, ...]:
    rows = []
    for group in dataclasses.fields(Settings):
        cls = typing.get_type_hints(Settings)[group.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if isinstance(kind, types.UnionType):  # int | None: the value's type
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            m = f.metadata
            rows.append(Setting(m["env"], group.name, f.name, kind, f.default, m["help"], m["minimum"], m["maximum"],
                                m["choices"], m["empty_is_off"]))
    return tuple(rows)


SETTINGS = _table()
NAMES = frozenset(s.name for s in SETTINGS)


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Every setting, typed and grouped, from `environ` (default os.environ).

    Raises SystemExit with one line naming the variable when a value is not what it must be.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, object]] = {}
    for s in SETTINGS:
        raw = str(environ.get(s.name, "")).strip()
        if raw:
            value = _parse(s, raw)
        else:
            value = "" if s.empty_is_off and s.name in environ else s.default
        values.setdefault(s.group, {})[s.field] = value
    model, http = values["model"], values["http"]
    if model["config_file"]:
        for s in SETTINGS:
            if s.group == "model" and s.field in GRAPH_FIELDS and model[s.field] not in (None, ""):
                raise SystemExit(f"error: environment variable {s.name} describes MODEL_DIR's graph; with "
                                 "MODEL_CONFIG_FILE each model's model.json describes its own "
                                 "(docs/operations.md: Several models)")
    if http["body_timeout"] is None:  # its default is another setting's value: resolved here, once
        http["body_timeout"] = float(typing.cast(int, http["timeout"]))
    groups = typing.get_type_hints(Settings)
    return Settings(**{name: groups[name](**fields) for name, fields in values.items()})


@functools.cache
def current() -> Settings:
    """This process's settings: the environment, read once (the first call), then the same object."""
    return from_env()


def _parse(setting: Setting, raw: str) -> object:
    if setting.kind is str:
        if not setting.choices:
            return raw
        if raw.lower() not in setting.choices:
            what = " or ".join(setting.choices) if len(setting.choices) < 3 else f"one of {', '.join(setting.choices)}"
            _bad(setting.name, raw, what)
        return raw.lower()
    number = "an integer" if setting.kind is int else "a number"
    try:
        value = setting.kind(raw)
    except ValueError:
        _bad(setting.name, raw, number)
    too_small = setting.minimum is not None and value < setting.minimum
    if too_small or setting.maximum is not None and value > setting.maximum:
        bounds = f"at least {setting.minimum:g}" if setting.maximum is None else \
            f"between {setting.minimum:g} and {setting.maximum:g}"
        _bad(setting.name, raw, f"{number} {bounds}")
    return value


def _bad(name: str, raw: str, what: str) -> typing.NoReturn:
    raise SystemExit(f"error: environment variable {name}={raw!r} must be {what}")


def setup_logging(serving: ServingSettings) -> None:
    """The one logging set-up of the processes that are not gunicorn (gRPC server, Kafka consumer)."""
    logging.basicConfig(level=serving.log_level.upper(),
                        format="%(asctime)s [%(process)d] [%(levelname)s] %(message)s")
