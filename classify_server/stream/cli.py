"""The command line: `python -m classify_server.stream` (flags, or the settings' environment variables)."""
import argparse
import logging
import signal
import sys

from classify_server.stream.backends import Embedded, Remote, RemoteUnavailable
from classify_server.stream.consumer import DeliveryFailed, FatalKafkaError, StreamClassifier

log = logging.getLogger("classify_server.stream")

DLQ_SUFFIX = ".dead-letter"


def parse_args(argv=None, stream=None):
    """The flags; their defaults are the stream settings (classify_server.settings.StreamSettings)."""
    from classify_server import settings
    stream = stream or settings.current().stream
    parser = argparse.ArgumentParser(
        prog="python -m classify_server.stream",
        description="Classify the images of a Kafka topic into another topic (see classify_server.stream's docstring).")
    parser.add_argument("--bootstrap-servers", default=stream.bootstrap_servers or None,
                        help="Kafka brokers, HOST:PORT[,HOST:PORT] (KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--input-topic", default=stream.input_topic or None,
                        help="topic of encoded images (KAFKA_INPUT_TOPIC)")
    parser.add_argument("--output-topic", default=stream.output_topic or None,
                        help="topic for the JSON predictions (KAFKA_OUTPUT_TOPIC)")
    parser.add_argument("--dead-letter-topic", default=stream.dead_letter_topic or None,
                        help=f"topic for messages that cannot be classified (KAFKA_DEAD_LETTER_TOPIC; "
                             f"default <input-topic>{DLQ_SUFFIX})")
    parser.add_argument("--group-id", default=stream.group_id,
                        help="consumer group: consumers sharing it share the partitions (KAFKA_GROUP_ID, "
                             "default classify-stream)")
    parser.add_argument("--remote", default=stream.remote_url or None, metavar="URL",
                        help="call this server's TF Serving REST :predict instead of loading the model "
                             "(STREAM_REMOTE_URL, e.g. http://classifier:8000)")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="the model to classify with (default: MODEL_NAME's, or the first of MODEL_CONFIG_FILE; "
                             "with --remote, the one in its URL, else MODEL_NAME)")
    parser.add_argument("--batch-size", type=int, default=stream.batch_size,
                        help="most messages classified together (STREAM_BATCH_SIZE, default 32)")
    parser.add_argument("--batch-wait-ms", type=int, default=stream.batch_wait_ms,
                        help="after the first message, wait this long for more to fill a batch "
                             "(STREAM_BATCH_WAIT_MS, default 0)")
    parser.add_argument("-X", dest="kafka_config", action="append", metavar="KEY=VALUE",
                        default=[item for item in stream.kafka_config.split(",") if item.strip()],
                        help="a librdkafka property for both clients, or one with a consumer./producer. prefix "
                             "(repeatable; KAFKA_CONFIG=k=v,k=v)")
    args = parser.parse_args(argv)
    for name in ("bootstrap_servers", "input_topic", "output_topic"):
        if not getattr(args, name):
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} is required (or the environment variable KAFKA_{name.upper()})")
    args.dead_letter_topic = args.dead_letter_topic or args.input_topic + DLQ_SUFFIX
    if len({args.input_topic, args.output_topic, args.dead_letter_topic}) < 3:
        parser.error("the input, output and dead-letter topics must be three different topics")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms must be 0 or more, got {args.batch_wait_ms}")
    return args


def main(argv=None):
    from classify_server import settings
    service = settings.current()
    args = parse_args(argv, service.stream)
    settings.setup_logging(service.serving)
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise SystemExit("classify_server.stream needs confluent-kafka: "
                         "pip install 'classify-service[stream]'") from None

    if args.remote:
        engine = Remote(args.remote, service.model.name, service.limits.top_k, args.batch_size, args.model)
        try:
            engine.refresh()
        except RemoteUnavailable as exc:  # not fatal: the batches wait for it
            log.warning("%s; will retry", exc)
    else:
        if service.engine.kind == "tf":
            from classify_contract import tf_noise
            tf_noise.import_tensorflow_quietly()  # before the TensorFlow engine is imported
        from classify_server.core.inference import InferenceError
        from classify_server.engines import ModelLoadError
        try:
            engine = Embedded(service, args.model)
        except (ModelLoadError, InferenceError) as exc:
            raise SystemExit(f"classify_server.stream: {exc}") from None

    stream = StreamClassifier(engine, args, service.limits)

    def on_signal(signum, frame):
        if stream.stopping.is_set():
            return
        log.info("%s: finishing the batch in hand, committing, leaving the group", signal.Signals(signum).name)
        stream.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return stream.run()
    except (DeliveryFailed, FatalKafkaError) as exc:
        log.error("%s; exiting so that a restart reads the uncommitted batch again", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
