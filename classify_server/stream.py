"""Classify images flowing through Kafka: `python -m classify_server.stream`.

    python -m classify_server.stream --bootstrap-servers HOST:PORT --input-topic images --output-topic predictions

A member of a Kafka consumer group (confluent-kafka, librdkafka). Each message's value is one
encoded image (JPEG, PNG, GIF, BMP, WebP...); its key is carried through. For each image a JSON
value is produced to the output topic, with the same key:

    {"labels": [["daisy", 0.93], ["tulips", 0.04], ...],     best first, TOP_K of them
     "model": "model", "model_version": 1,                   the version that answered
     "topic": "images", "partition": 0, "offset": 42,        where the image was read
     "timestamp": 1700000000000}                             the input's timestamp (ms), or null

A message that cannot be classified (no value, not an image, over MAX_UPLOAD_BYTES bytes or
MAX_IMAGE_PIXELS pixels) goes to the dead-letter topic instead, as Kafka Connect does it: same
key, the original value (omitted, with a header saying so, when the producer cannot send it),
and headers `error` (the message), `error.type` (EmptyMessage, MessageTooLarge, InvalidImage,
ImageTooLarge), `error.code` (the inference core's code: empty_image, request_too_large,
invalid_image, image_too_large), `source.topic`, `source.partition`, `source.offset`. It never
stops the consumer.

Outputs keep the input's order: the prediction of a message read from partition P goes to
partition P of the output topic (P modulo its partition count), as do dead letters.

Two ways to run the model:
  embedded (default)  the model is loaded in this process with the HTTP server's code
                      (classify_server.build_models: MODEL_DIR, versions, hot reload, settings);
                      the messages of one poll are classified together, in one session.run.
  --remote URL        each poll's images are sent to a running server's TensorFlow Serving REST
                      API, POST URL/v1/models/<MODEL_NAME>/versions/<v>:predict, in requests of at
                      most --batch-size images (keep it <= the server's MAX_PARTS). A 4xx for one
                      image sends it to the dead-letter topic; a server that is down or answers
                      5xx is retried with backoff, the batch kept (never dead-lettered).

Delivery is at-least-once: the offsets of a batch are committed only after all its outputs
(predictions and dead letters) are acknowledged by the broker (acks=all, idempotent producer).
A consumer that dies before committing has its batch read again by whoever takes its
partitions over: no message is lost, some may be classified twice (same key, same
topic/partition/offset fields, so duplicates can be recognised downstream). If the broker does
not acknowledge an output within delivery.timeout.ms, the consumer exits with status 1
without committing; restart it.

Scaling out: start more consumers with the same --group-id; Kafka shares the input topic's
partitions among them (so at most as many busy consumers as partitions). SIGTERM or SIGINT
finishes the batch in hand, commits it, and leaves the group (its partitions move at once).

Settings, flags or environment variables: --bootstrap-servers / KAFKA_BOOTSTRAP_SERVERS,
--input-topic / KAFKA_INPUT_TOPIC, --output-topic / KAFKA_OUTPUT_TOPIC, --dead-letter-topic /
KAFKA_DEAD_LETTER_TOPIC (default: <input-topic>.dead-letter), --group-id / KAFKA_GROUP_ID
(classify-stream), --remote / STREAM_REMOTE_URL, --batch-size / STREAM_BATCH_SIZE (32, the
most messages classified together), --batch-wait-ms / STREAM_BATCH_WAIT_MS (0: classify what
has arrived; more waits to fill batches), -X key=value / KAFKA_CONFIG (k=v,k=v: any librdkafka
property, for both clients, or only one with a `consumer.` or `producer.` prefix), and the
server's MODEL_DIR, MODEL_NAME, MODEL_POLL_SECONDS, TOP_K, MAX_UPLOAD_BYTES, MAX_IMAGE_PIXELS,
TF_INTRA_OP_THREADS, TF_INTER_OP_THREADS, LOG_LEVEL.
"""
import argparse
import base64
import http.client
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from classify_server.inference import CODES, InferenceError, check_size  # noqa: E402  (no TensorFlow)
from classify_server.ranking import top_k  # noqa: E402

log = logging.getLogger("classify_server.stream")

DLQ_SUFFIX = ".dead-letter"


# The dead-letter `error.type` of each inference error code (the names this header has always had).
DEAD_LETTER_TYPE = {
    "empty_image": "EmptyMessage",
    "request_too_large": "MessageTooLarge",
    "invalid_image": "InvalidImage",
    "image_too_large": "ImageTooLarge",
    "invalid_input": "InvalidInput",
    "too_many_images": "TooManyImages",
    "model_not_found": "ModelNotFound",
    "version_not_served": "VersionNotServed",
    "not_ready": "NotReady",
}
assert set(DEAD_LETTER_TYPE) == set(CODES)


class RemoteUnavailable(RuntimeError):
    """The model server did not answer usefully (down, 5xx, garbled): retry the batch later."""


# Codes a server answers about the images of a request, not about itself: each image is judged alone.
PER_IMAGE = {"empty_image", "request_too_large", "invalid_image", "image_too_large", "invalid_input",
             "too_many_images"}


# ---------------------------------------------------------------- the two ways to run the model

class Embedded:
    """The model in this process, behind the HTTP server's inference core."""

    def __init__(self, config):
        from classify_server import build_models
        from classify_server.inference import Inference
        self.config = config
        self.core = Inference(build_models(config), config)
        self.name = config["MODEL_NAME"]

    def describe(self):
        return (f"embedded model {self.name!r} version {self.core.models.current.version} "
                f"from {self.config['MODEL_DIR']}")

    def classify(self, images):
        """(model version, [top-k [[label, score], ...] or InferenceError, one per image])."""
        version, labels, results = self.core.classify_each(images)
        return version, [r if isinstance(r, InferenceError) else top_k(labels, r, self.config["TOP_K"])
                         for r in results]

    def close(self):
        pass


class Remote:
    """A running classify_server's TensorFlow Serving REST API (metadata.labels names the scores).

    Labels and version come from GET .../metadata; :predict is asked of that version explicitly,
    so a hot reload on the server (404 for the old version) makes us re-read the metadata and
    never mislabels an answer.
    """

    def __init__(self, url, config, batch_size, timeout=60):
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SystemExit(f"classify_server.stream: --remote must be an http(s) URL, got {url!r}")
        match = re.match(r"^(.*?)/v1/models/([^/:]+)", parts.path)
        self.prefix = (match.group(1) if match else parts.path).rstrip("/")
        self.name = urllib.parse.unquote(match.group(2)) if match else config["MODEL_NAME"]
        self.url = f"{parts.scheme}://{parts.netloc}{self.prefix}/v1/models/{self.name}"
        self.https, self.host, self.port = parts.scheme == "https", parts.hostname, parts.port
        self.timeout, self.batch_size, self.top_k = timeout, batch_size, config["TOP_K"]
        self.connection = None
        self.labels = self.version = None

    def describe(self):
        return f"remote model {self.name!r} version {self.version} at {self.url}"

    def _request(self, method, path, body=None):
        """(status, parsed JSON body) over one kept-alive connection; RemoteUnavailable if none."""
        where = f"{method} {self.url}{path}"
        path = f"{self.prefix}/v1/models/{urllib.parse.quote(self.name, safe='')}{path}"
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self.connection is None:
                kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self.connection = kind(self.host, self.port, timeout=self.timeout)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.connection.close()
                self.connection = None
                if attempt == 2:
                    raise RemoteUnavailable(f"{where}: {type(exc).__name__}: {exc}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            answer = {"error": raw[:200].decode(errors="replace")}
        return response.status, answer

    def refresh(self):
        status, answer = self._request("GET", "/metadata")
        if status != 200:
            raise RemoteUnavailable(f"GET {self.url}/metadata answered {status}: {answer.get('error', answer)}")
        try:
            self.labels = list(answer["metadata"]["labels"])
            self.version = int(answer["model_spec"]["version"])
        except (KeyError, TypeError, ValueError):
            raise RemoteUnavailable(f"GET {self.url}/metadata: no metadata.labels or model_spec.version "
                                    "in the answer") from None

    def _predict(self, images):
        body = json.dumps({"instances": [{"b64": base64.b64encode(data).decode("ascii")} for data in images]})
        return self._request("POST", f"/versions/{self.version}:predict", body)

    def classify(self, images):
        import numpy as np
        if self.version is None:
            self.refresh()
        results = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            status, answer = self._predict(chunk)
            if answer.get("code") == "version_not_served":  # the server moved to another version: learn it
                old = self.version
                self.refresh()
                log.info("remote model version %s -> %s", old, self.version)
                if start and self.version != old:  # one version answers a whole batch: start it again
                    return self.classify(images)
                status, answer = self._predict(chunk)
            if status == 200:
                answers = self._rows(answer.get("predictions"), len(chunk))
            elif answer.get("code") in PER_IMAGE and len(chunk) > 1:  # which image? ask for each alone
                if answer["code"] == "too_many_images":
                    log.warning("%s; lower --batch-size to the server's MAX_PARTS", answer.get("error"))
                answers = [self.classify_one(data) for data in chunk]
            elif answer.get("code") in PER_IMAGE:
                answers = [self._rejection(answer)]
            else:
                raise RemoteUnavailable(f"POST {self.url}/versions/{self.version}:predict answered "
                                        f"{status}: {answer.get('error', answer)}")
            for row in answers:
                results.append(row if isinstance(row, InferenceError)
                               else top_k(self.labels, np.asarray(row, dtype=np.float32), self.top_k))
        return self.version, results

    def classify_one(self, data):
        status, answer = self._predict([data])
        if status == 200:
            return self._rows(answer.get("predictions"), 1)[0]
        if answer.get("code") in PER_IMAGE:
            return self._rejection(answer)
        raise RemoteUnavailable(f"POST {self.url}/versions/{self.version}:predict answered "
                                f"{status}: {answer.get('error', answer)}")

    def _rows(self, rows, count):
        if not (isinstance(rows, list) and len(rows) == count
                and all(isinstance(r, list) and len(r) == len(self.labels) for r in rows)):
            raise RemoteUnavailable(f"{self.url}: :predict answered no {count} x {len(self.labels)} predictions")
        return rows

    @staticmethod
    def _rejection(answer):
        """The server's error for a request of one image, as the embedded core words it (no "image 1")."""
        message = re.sub(r"^image 1(: | is )", lambda m: "" if m.group(1) == ": " else "the image is ",
                         str(answer.get("error", answer)))
        return InferenceError(answer["code"], message)

    def close(self):
        if self.connection is not None:
            self.connection.close()


# ---------------------------------------------------------------- the consumer

def kafka_settings(items):
    """-X key=value items -> (consumer properties, producer properties)."""
    consumer, producer = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SystemExit(f"classify_server.stream: Kafka setting {item!r} is not key=value")
        if key.startswith("consumer."):
            consumer[key[len("consumer."):]] = value
        elif key.startswith("producer."):
            producer[key[len("producer."):]] = value
        else:
            consumer[key] = producer[key] = value
    return consumer, producer


class StreamClassifier:
    """Poll a batch, classify it, produce the answers, wait for their acks, commit, repeat."""

    def __init__(self, engine, args, config):
        from confluent_kafka import Consumer, Producer
        self.engine, self.args, self.config = engine, args, config
        consumer_extra, producer_extra = kafka_settings(args.kafka_config)
        common = {"bootstrap.servers": args.bootstrap_servers, "client.id": "classify-stream"}
        self.consumer = Consumer({
            **common, "group.id": args.group_id,
            "enable.auto.commit": False, "enable.auto.offset.store": False,  # we commit, after the acks
            "auto.offset.reset": "earliest",
            **consumer_extra})
        self.producer = Producer({
            **common, "acks": "all", "enable.idempotence": True,  # in order, no duplicates from retries
            "linger.ms": 0,  # each batch is flushed at once anyway
            **producer_extra})
        self.stopping = threading.Event()
        self.partitions = {}  # output topic -> partition count
        self.counts = {"messages": 0, "predictions": 0, "dead_letters": 0, "batches": 0}

    # -- topics

    def _partition_count(self, topic):
        metadata = self.producer.list_topics(topic, timeout=30)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise SystemExit(f"classify_server.stream: topic {topic!r} does not exist on {self.args.bootstrap_servers}"
                             f" ({info.error if info is not None else 'absent'}); create it, e.g. kafka-topics.sh "
                             f"--create --topic {topic} --partitions <as many as {self.args.input_topic}>")
        return len(info.partitions)

    def refresh_partitions(self):
        for topic in (self.args.output_topic, self.args.dead_letter_topic):
            self.partitions[topic] = self._partition_count(topic)

    def _on_assign(self, consumer, partitions):
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")
        try:
            self.refresh_partitions()  # an output topic may have grown
        except SystemExit as exc:
            log.error("%s", exc)

    def _on_revoke(self, consumer, partitions):
        # Called from inside poll(): the batch in hand is always finished and committed by then.
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    # -- the loop

    def run(self):
        self.refresh_partitions()
        self.consumer.subscribe([self.args.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("consuming %s as group %r -> %s (dead letters: %s), %s", self.args.input_topic,
                 self.args.group_id, self.args.output_topic, self.args.dead_letter_topic, self.engine.describe())
        last_report = time.monotonic()
        try:
            while not self.stopping.is_set():
                batch = self.poll_batch()
                if batch:
                    self.handle(batch)
                if time.monotonic() - last_report >= 60:
                    last_report = time.monotonic()
                    log.info("so far: %s", self.counts)
        finally:
            self.close()
        return 0

    def poll_batch(self):
        """What has arrived, up to --batch-size messages: one blocking poll, then what is ready."""
        first = self.consumer.poll(1.0)  # short: a SIGTERM is noticed within a second
        if first is None:
            return []
        messages = [first]
        if self.args.batch_size > 1:
            messages += self.consumer.consume(self.args.batch_size - 1, self.args.batch_wait_ms / 1000)
        batch = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.fatal():
                raise FatalKafkaError(f"fatal Kafka error: {error}")
            else:
                log.warning("consumer: %s", error)
        return batch

    def handle(self, batch):
        started = time.perf_counter()
        results = self.classify(batch)
        classified = time.perf_counter()
        if results is None:  # stopping while the model server was down: not committed, read again later
            return
        version, answers = results
        failures = []

        def on_delivery(error, message):
            if error is not None:
                failures.append(f"{message.topic()}[{message.partition()}]: {error}")

        for message, answer in zip(batch, answers):
            if isinstance(answer, InferenceError):
                self.dead_letter(message, answer, on_delivery)
            else:
                self.produce(self.args.output_topic, message, json.dumps({
                    "labels": answer, "model": self.engine.name, "model_version": version,
                    "topic": message.topic(), "partition": message.partition(), "offset": message.offset(),
                    "timestamp": _timestamp(message)}).encode(), on_delivery)
                self.counts["predictions"] += 1
        while self.producer.flush(1.0):  # every output acknowledged (or failed for good) before the commit
            pass
        if failures:
            raise DeliveryFailed(f"{len(failures)} outputs not acknowledged, offsets not committed: "
                                 f"{'; '.join(failures[:3])}")
        acknowledged = time.perf_counter()
        self.commit(batch)
        self.counts["messages"] += len(batch)
        self.counts["batches"] += 1
        log.debug("batch of %d: classified in %.1f ms, outputs acknowledged in %.1f ms, committed in %.1f ms",
                  len(batch), 1000 * (classified - started), 1000 * (acknowledged - classified),
                  1000 * (time.perf_counter() - acknowledged))

    def classify(self, batch):
        """The engine's answers for the batch; the checks that need no model first."""
        answers, images, where = [None] * len(batch), [], []
        for i, message in enumerate(batch):
            try:
                check_size(message.value(), self.config["MAX_UPLOAD_BYTES"], "the message's value")
            except InferenceError as exc:
                answers[i] = exc
            else:
                images.append(message.value())
                where.append(i)
        version = None
        delay = 1.0
        while images:
            try:
                version, results = self.engine.classify(images)
                break
            except RemoteUnavailable as exc:
                log.warning("%s; retrying the batch of %d in %.0fs", exc, len(batch), delay)
                if self.stopping.wait(delay):
                    log.warning("stopping with a batch of %d not classified: not committed, it will be read again",
                                len(batch))
                    return None
                delay = min(delay * 2, 30)
        else:
            results = []
        for i, result in zip(where, results):
            answers[i] = result
        return version, answers

    def produce(self, topic, message, value, on_delivery, headers=None):
        count = self.partitions.get(topic) or 1
        self.producer.produce(topic, value=value, key=message.key(), partition=message.partition() % count,
                              headers=headers, on_delivery=on_delivery)

    def dead_letter(self, message, rejected, on_delivery):
        from confluent_kafka import KafkaError, KafkaException
        kind = DEAD_LETTER_TYPE[rejected.code]
        log.info("dead letter %s[%d]@%d: %s: %s", message.topic(), message.partition(), message.offset(),
                 kind, rejected.message)
        headers = [("error", rejected.message.encode()), ("error.type", kind.encode()),
                   ("error.code", rejected.code.encode()),
                   ("source.topic", message.topic().encode()), ("source.partition", str(message.partition()).encode()),
                   ("source.offset", str(message.offset()).encode())]
        try:
            self.produce(self.args.dead_letter_topic, message, message.value(), on_delivery, headers)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            headers.append(("value.omitted", f"{len(message.value())} bytes, over the producer's "
                                             "message.max.bytes".encode()))
            self.produce(self.args.dead_letter_topic, message, None, on_delivery, headers)
        self.counts["dead_letters"] += 1

    def commit(self, batch):
        from confluent_kafka import KafkaException, TopicPartition
        ends = {}
        for message in batch:
            key = (message.topic(), message.partition())
            ends[key] = max(ends.get(key, -1), message.offset() + 1)
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance took the partitions: their new owner reads them again
            log.warning("commit failed (%s): the batch will be read again by the partitions' owner", exc.args[0])

    def close(self):
        log.info("leaving group %r: %s", self.args.group_id, self.counts)
        try:
            self.consumer.close()  # LeaveGroup: the partitions move to the others at once
        finally:
            self.producer.flush(10)
            self.engine.close()


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge an output: the batch is not committed."""


class FatalKafkaError(RuntimeError):
    pass


def _timestamp(message):
    from confluent_kafka import TIMESTAMP_NOT_AVAILABLE
    kind, value = message.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else value


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    from classify_server import settings
    config = settings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m classify_server.stream",
        description="Classify the images of a Kafka topic into another topic (see the module's docstring).")
    parser.add_argument("--bootstrap-servers", default=config["KAFKA_BOOTSTRAP_SERVERS"] or None,
                        help="Kafka brokers, HOST:PORT[,HOST:PORT] (KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--input-topic", default=config["KAFKA_INPUT_TOPIC"] or None,
                        help="topic of encoded images (KAFKA_INPUT_TOPIC)")
    parser.add_argument("--output-topic", default=config["KAFKA_OUTPUT_TOPIC"] or None,
                        help="topic for the JSON predictions (KAFKA_OUTPUT_TOPIC)")
    parser.add_argument("--dead-letter-topic", default=config["KAFKA_DEAD_LETTER_TOPIC"] or None,
                        help=f"topic for messages that cannot be classified (KAFKA_DEAD_LETTER_TOPIC; "
                             f"default <input-topic>{DLQ_SUFFIX})")
    parser.add_argument("--group-id", default=config["KAFKA_GROUP_ID"],
                        help="consumer group: consumers sharing it share the partitions (KAFKA_GROUP_ID, "
                             "default classify-stream)")
    parser.add_argument("--remote", default=config["STREAM_REMOTE_URL"] or None, metavar="URL",
                        help="call this server's TF Serving REST :predict instead of loading the model "
                             "(STREAM_REMOTE_URL, e.g. http://classifier:8000)")
    parser.add_argument("--batch-size", type=int, default=config["STREAM_BATCH_SIZE"],
                        help="most messages classified together (STREAM_BATCH_SIZE, default 32)")
    parser.add_argument("--batch-wait-ms", type=int, default=config["STREAM_BATCH_WAIT_MS"],
                        help="after the first message, wait this long for more to fill a batch "
                             "(STREAM_BATCH_WAIT_MS, default 0)")
    parser.add_argument("-X", dest="kafka_config", action="append", metavar="KEY=VALUE",
                        default=[item for item in config["KAFKA_CONFIG"].split(",") if item.strip()],
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
    args = parse_args(argv)
    config = settings.from_env()
    settings.setup_logging(config)
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        raise SystemExit("classify_server.stream needs confluent-kafka: "
                         "pip install 'classify-service[stream]'") from None

    if args.remote:
        engine = Remote(args.remote, config, args.batch_size)
        try:
            engine.refresh()
        except RemoteUnavailable as exc:  # not fatal: the batches wait for it
            log.warning("%s; will retry", exc)
    else:
        from classify_server.model import ModelLoadError
        try:
            engine = Embedded(config)
        except ModelLoadError as exc:
            raise SystemExit(f"classify_server.stream: {exc}") from None

    stream = StreamClassifier(engine, args, config)

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
