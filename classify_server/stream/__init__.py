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
                      (classify_server.core.versions.load_models: MODEL_DIR, versions, hot reload, settings);
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

The package's parts: engines (Embedded, Remote), consumer (the loop, at-least-once), cli (flags).
"""
