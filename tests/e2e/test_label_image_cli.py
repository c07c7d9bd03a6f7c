"""`python -m classify_server.label_image`: one image with --image, or paths on stdin, one JSON line each."""
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading

import pytest
from PIL import Image
from support import ROOT
from support.clients import assert_same_answer, post_images
from support.images import encode, shape_image
from support.models import read_labels


@pytest.fixture(scope="module")
def server_client(flask_app):
    """The server's Flask app over the same model, through its test client."""
    return flask_app.test_client()


def label_image_command(*args):
    return [sys.executable, "-m", "classify_server.label_image", *map(str, args)]


def run_label_image(*args, stdin=None, timeout=180):
    return subprocess.run(label_image_command(*args), cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def server_answer(client, data):
    response = post_images(client, [data])
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_one_image_prints_labels_with_scores(trained_model, server_client, tmp_path):
    data = shape_image("red_circle", 7, size=(96, 72))
    image = tmp_path / "red circle.jpg"  # a space in the path, as photos often have
    image.write_bytes(data)
    labels = read_labels(trained_model)
    graph, labels_path = os.path.join(trained_model, "graph.pb"), os.path.join(trained_model, "labels.txt")
    result = run_label_image("--graph", graph, "--labels", labels_path, "--image", image)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == min(5, len(labels)), result.stdout
    printed = []
    for line in lines:
        label, score = line.rsplit(" ", 1)
        assert label in labels, line
        printed.append([label, float(score)])
    assert [s for _, s in printed] == sorted((s for _, s in printed), reverse=True)
    assert_same_answer(printed, server_answer(server_client, data), tol=1e-5)  # printed with 5 decimals


class LineReader:
    """stdout lines of a process, each waited for with a time limit."""

    def __init__(self, stream):
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def next(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s") from None


def test_stdin_mode_answers_each_path_as_it_arrives(trained_model, server_client, tmp_path):
    """Paths one per line, no --image: one JSON line per image, written as soon as its path arrives
    (the next path is only sent after the answer), equal to the server's answers; bad paths get an
    error line and the next paths are still answered."""
    images = {"red.jpg": shape_image("red_circle", 21),
              "green.png": shape_image("green_square", 22, fmt="PNG"),
              "blue.gif": encode(Image.open(io.BytesIO(shape_image("blue_triangle", 23, fmt="PNG"))), "GIF")}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image\n")
    # --labels from another folder than the graph's.
    (tmp_path / "labels").mkdir()
    shutil.copy(os.path.join(trained_model, "labels.txt"), tmp_path / "labels" / "my_labels.txt")
    sequence = [str(tmp_path / "red.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path / "notes.txt"),
                str(tmp_path / "green.png"), str(tmp_path), str(tmp_path / "blue.gif")]

    stderr = open(tmp_path / "stderr.txt", "w+")  # a file, not a pipe nobody drains
    process = subprocess.Popen(
        label_image_command("--graph", os.path.join(trained_model, "graph.pb"),
                            "--labels", tmp_path / "labels" / "my_labels.txt"),
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        reader = LineReader(process.stdout)
        answers = []
        for i, path in enumerate(sequence):
            process.stdin.write(path + "\n" + ("\n" if i == 2 else ""))  # and one blank line, ignored
            process.stdin.flush()
            line = reader.next(timeout=180 if i == 0 else 60)  # the first waits for the model to load
            assert line is not None, (tmp_path / "stderr.txt").read_text()
            answers.append(json.loads(line))
        process.stdin.close()
        assert reader.next(timeout=60) is None  # nothing more
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()

    assert [a["image"] for a in answers] == sequence
    for answer in answers:
        name = os.path.basename(answer["image"])
        if name in images:
            assert "error" not in answer, answer
            assert_same_answer(answer["labels"], server_answer(server_client, images[name]), tol=1e-6)
        else:
            assert "labels" not in answer and isinstance(answer["error"], str) and answer["error"], answer
    assert code != 0  # some images failed
