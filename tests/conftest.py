"""Shared fixtures: generated image folders, a small trained model, a real gunicorn server."""
import io
import json
import os
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flower_photos")
MOBILENET_WEIGHTS = os.path.join(SHARED, "models", "mobilenet_v2_1.0_224_no_top.weights.h5")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true) a skip is a failure: CI has every tool and ../shared, so a test that skips
    there means something is missing from .ci/run, and a green run must mean that everything ran."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


# End-to-end tests (`slow`): whole modules of real processes, and tests that start one through these fixtures.
# `python -m pytest -m "not slow"` runs the rest in under a minute.
SLOW_MODULES = {"test_deploy", "test_faults", "test_grpc", "test_page", "test_protocols", "test_stream"}
SLOW_FIXTURES = {"server", "start_server", "broken_servers", "third_party", "foreign", "messy_run", "offline_runs"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session):
    """The same for a whole module skipped at collection (an importorskip at the top of a file)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") == "true" and reporter and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped")
    if os.environ.get("CI") == "true" and skipped:
        terminalreporter.write_line(f"FAILED: {len(skipped)} skipped under CI=true, where nothing may skip "
                                    "(install what they need in .ci/run)", red=True)

# Random MobileNetV2 weights give (almost) the same features for every image, so a
# model trained on them answers the same for all: real weights, when ../shared has
# them, make the tests' models tell images apart.
TEST_WEIGHTS = MOBILENET_WEIGHTS if os.path.isfile(MOBILENET_WEIGHTS) else "none"

# Each generated class is a shape of its own colour on a noisy background.
CLASSES = {"red_circle": ((220, 30, 30), "ellipse"), "green_square": ((30, 200, 40), "rectangle"),
           "blue_triangle": ((30, 40, 220), "polygon")}


def shape_image(label, seed, size=(64, 48), fmt="JPEG"):
    """Encoded bytes of one generated image of class `label`."""
    rng = np.random.default_rng(seed)
    colour, shape = CLASSES[label]
    w, h = size
    image = Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.integers(0, w // 4), rng.integers(0, h // 4)
    x1, y1 = x0 + w // 2 + rng.integers(0, w // 4), y0 + h // 2 + rng.integers(0, h // 4)
    if shape == "polygon":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    else:
        getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_colour_model(folder, labels=("red", "green", "blue"), sharpness=32.0):
    """A tiny frozen graph whose answer depends on the image's colours (a trained model on few
    shapes may not): the softmax of its mean red, green and blue over `sharpness`."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        tf.nn.softmax(tf.reduce_mean(pixels, axis=[1, 2]) / sharpness, name="final_result")
    os.makedirs(folder)
    with open(os.path.join(folder, "graph.pb"), "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("".join(label + "\n" for label in labels))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump({"input": "input:0", "output": "final_result:0", "input_height": 32, "input_width": 32}, f)
    return str(folder)


def make_image_dir(root, classes=tuple(CLASSES), per_class=12, start=0):
    """One folder per class of generated JPEGs; returns the folder."""
    for label in classes:
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(start, start + per_class):
            with open(os.path.join(root, label, f"{label}_{i:03d}.jpg"), "wb") as f:
                # A stable seed per file (not hash(), which changes per process): the same data every run.
                f.write(shape_image(label, seed=zlib.crc32(f"{label}-{i}".encode())))
    return str(root)


def run_retrain(*args, check=True, timeout=600):
    """`python -m retrain ARGS` in a subprocess, as users run it."""
    result = subprocess.run([sys.executable, "-m", "retrain", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"retrain failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return make_image_dir(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, image_dir):
    """A model folder (graph.pb, labels.txt, model.json): MobileNetV2 over 3 shape classes."""
    out = tmp_path_factory.mktemp("model")
    run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS,
                "--how_many_training_steps", 1000, "--output_dir", out,
                "--bottleneck_dir", tmp_path_factory.mktemp("bottlenecks"), "--summaries_dir", "")
    return str(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process, timeout=30):
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Server:
    """A real `gunicorn classify_server:app` on a loopback port."""

    def __init__(self, env, workers=1, args=(), log_path=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = dict(os.environ, WEB_CONCURRENCY=str(workers), ACCESS_LOG="", **env)
        self.log = open(log_path, "w+b") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{self.port}", *args],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:  # refused, or accepted before a worker is up
                pass
            time.sleep(0.3)
        raise AssertionError(f"gunicorn not ready after {timeout}s:\n{self.output()}")

    def output(self):
        if not self.log_path:
            return ""
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        stop_process(self.process)


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(env) -> a ready Server; all are stopped at the end of the test."""
    servers = []

    def start(env, workers=1, args=(), wait=True):
        server = Server(env, workers, args, log_path=tmp_path / f"gunicorn-{len(servers)}.log")
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    """One gunicorn server with 2 workers over the trained model, shared by a test module."""
    s = Server({"MODEL_DIR": trained_model}, workers=2,
               log_path=tmp_path_factory.mktemp("server") / "gunicorn.log")
    yield s.wait_ready()
    s.stop()


# --- helpers for the server, label_image and page tests -------------------------------------------

def encode(image, fmt, **params):
    """Encoded bytes of a PIL image."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind, data):
    import zlib
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bytes(width, height, bit_depth=8, colour_type=2, raw=b""):
    """A PNG written by hand: `raw` is the filtered scanlines (each starting with its filter byte).

    Cheap to make for any declared size, e.g. a 50000x50000 header over a few bytes of data.
    """
    import zlib
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def read_labels(model_dir):
    with open(os.path.join(model_dir, "labels.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def assert_same_answer(got, expected, tol=1e-5):
    """Two [[label, score], ...] answers: the same labels in the same order, scores within `tol`."""
    assert [label for label, _ in got] == [label for label, _ in expected], (got, expected)
    for (_, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= tol, (got, expected)


def make_app(model_dir, **config):
    """The Flask app of `classify_server.create_app`, in this process, over `model_dir`."""
    from classify_server import create_app
    return create_app(test_config=dict(config, MODEL_DIR=model_dir))


@pytest.fixture(scope="session")
def flask_app(trained_model):
    return make_app(trained_model)


def post_images(client, images, query=""):
    """POST / through a Flask test client, one `data` part per encoded image."""
    parts = [(io.BytesIO(data), f"image{i}") for i, data in enumerate(images)]
    return client.post("/" + query, data={"data": parts}, content_type="multipart/form-data")
