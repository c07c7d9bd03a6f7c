"""The Kafka stream consumer's settings, in this process: flags, the environment, KAFKA_CONFIG, --remote's URL.
The consumer itself, against a real broker, is e2e/test_stream.py's."""
import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka: pip install -e '.[stream,test]'")


def test_settings_from_flags_and_environment(monkeypatch):
    from classify_server import settings
    from classify_server.stream import cli, consumer
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:9092")
    monkeypatch.setenv("KAFKA_INPUT_TOPIC", "in")
    monkeypatch.setenv("KAFKA_OUTPUT_TOPIC", "out")
    monkeypatch.setenv("KAFKA_CONFIG", "security.protocol=ssl,consumer.fetch.wait.max.ms=10")
    monkeypatch.setenv("STREAM_BATCH_SIZE", "4")
    args = cli.parse_args([], settings.from_env().stream)
    assert (args.bootstrap_servers, args.input_topic, args.output_topic, args.dead_letter_topic, args.group_id,
            args.batch_size, args.remote) == ("kafka:9092", "in", "out", "in.dead-letter", "classify-stream", 4, None)
    consumer_settings, producer_settings = consumer.kafka_settings(args.kafka_config)
    assert consumer_settings == {"security.protocol": "ssl", "fetch.wait.max.ms": "10"}
    assert producer_settings == {"security.protocol": "ssl"}
    args = cli.parse_args(["--input-topic", "a", "--output-topic", "b", "--group-id", "g", "--remote",
                              "http://h:8000", "-X", "producer.linger.ms=1"], settings.from_env().stream)
    assert (args.input_topic, args.output_topic, args.group_id, args.remote) == ("a", "b", "g", "http://h:8000")
    assert consumer.kafka_settings(args.kafka_config)[1]["linger.ms"] == "1"


def test_remote_url_forms():
    from classify_server.stream.backends import Remote
    assert Remote("http://h:8000", "model", 5, 32).url == "http://h:8000/v1/models/model"
    assert Remote("h:8000/", "model", 5, 32).url == "http://h:8000/v1/models/model"
    assert Remote("https://h/prefix/v1/models/flowers:predict", "model", 5, 32).url == \
        "https://h/prefix/v1/models/flowers"
