"""The consumer loop: poll a batch, classify it, produce the answers and dead letters, wait for their
acknowledgements, commit, repeat (at-least-once; see the package's docstring)."""
import json
import logging
import threading
import time

from classify_server.core import inference
from classify_server.core.inference import CODES, InferenceError, check_size
from classify_server.settings import Limits
from classify_server.stream.backends import Unavailable

log = logging.getLogger("classify_server.stream")


# The dead-letter `error.type` of each inference error code (the names this header has always had).
DEAD_LETTER_TYPE = {
    inference.EMPTY_IMAGE: "EmptyMessage",
    inference.REQUEST_TOO_LARGE: "MessageTooLarge",
    inference.INVALID_IMAGE: "InvalidImage",
    inference.IMAGE_TOO_LARGE: "ImageTooLarge",
    inference.INVALID_INPUT: "InvalidInput",
    inference.TOO_MANY_IMAGES: "TooManyImages",
    inference.MODEL_NOT_FOUND: "ModelNotFound",
    inference.VERSION_NOT_SERVED: "VersionNotServed",
    inference.NOT_READY: "NotReady",
}
assert set(DEAD_LETTER_TYPE) == set(CODES)


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

    def __init__(self, engine, args, limits: Limits):
        from confluent_kafka import Consumer, Producer
        self.engine, self.args, self.limits = engine, args, limits
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
        """The engine's answers for the batch: the model first (gone, every message is dead-lettered
        model_not_found, as every protocol answers 404 before it looks at the inputs), then the checks that
        need no model, then the model."""
        try:
            self.engine.resolve()
        except InferenceError as exc:
            return None, [exc] * len(batch)
        answers, images, where = [None] * len(batch), [], []
        for i, message in enumerate(batch):
            try:
                check_size(message.value(), self.limits.max_upload_bytes, "the message's value")
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
            except Unavailable as exc:
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
