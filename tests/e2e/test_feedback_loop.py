"""Corrections from users, the whole loop: feedback and --extra_image_dir through retrain runs to a new
served version, and a worse version refused."""
import json
import os
import threading
import time

import requests
from support.images import make_image_dir, shape_image
from support.models import TEST_WEIGHTS
from support.processes import run_retrain


def test_retrain_refuses_a_version_worse_than_the_served_one(tmp_path, image_dir):
    base = tmp_path / "models"
    args = ["--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", "none",
            "--how_many_training_steps", 50, "--model_base_path", base,
            "--bottleneck_dir", tmp_path / "bn", "--summaries_dir", ""]
    run_retrain(*args)
    sidecar = base / "1" / "model.json"
    meta = json.loads(sidecar.read_text())
    accuracy = meta["accuracy"]["test"]  # the same data, cache and seeds give the same accuracy again

    def served_accuracy(value):
        meta["accuracy"]["test"] = value
        sidecar.write_text(json.dumps(meta))

    served_accuracy(accuracy + 0.025)  # a drop of 0.025: over the default --max_accuracy_drop of 0.02
    refused = run_retrain(*args, check=False)
    assert refused.returncode == 3 and "--max_accuracy_drop 0.02" in refused.stderr, refused.stderr
    assert f"test accuracy {accuracy:.4f} is below version 1's {accuracy + 0.025:.4f}" in refused.stderr
    assert sorted(os.listdir(base)) == ["1"]
    served_accuracy(accuracy + 0.015)  # within the default: published
    run_retrain(*args)
    assert sorted(os.listdir(base)) == ["1", "2"]


def test_the_whole_loop_feedback_to_a_new_served_version(tmp_path, start_server):
    data = make_image_dir(tmp_path / "data", classes=("red_circle", "green_square"), per_class=12)
    base, feedback_dir = tmp_path / "models", tmp_path / "feedback"
    common = ["--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS, "--how_many_training_steps", 1000,
              "--model_base_path", base, "--bottleneck_dir", tmp_path / "bn", "--summaries_dir", "",
              "--image_dir", data, "--extra_image_dir", feedback_dir]
    run_retrain(*common)
    server = start_server({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": "1", "FEEDBACK_DIR": str(feedback_dir)})
    probe = shape_image("blue_triangle", 7)
    labels = [label for label, _ in requests.post(server.url + "/", files={"data": ("p.jpg", probe)}).json()]
    assert "blue_triangle" not in labels

    failures, answers, stop = [], [], threading.Event()

    def client_loop():  # traffic throughout the loop, bounded in count and time
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 20000:
            try:
                r = requests.post(server.url + "/", files={"data": ("p.jpg", probe)}, timeout=30)
                (answers if r.status_code == 200 else failures).append(r.text)
            except requests.RequestException as exc:
                failures.append(str(exc))
            time.sleep(0.05)

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        for i in range(14):  # corrections for a class the model has never seen
            r = requests.post(server.url + "/feedback", data={"label": "blue_triangle"},
                              files={"data": (f"{i}.jpg", shape_image("blue_triangle", 1000 + i))})
            assert r.status_code == 201, r.text
        run_retrain(*common, "--max_accuracy_drop", "1")
        assert sorted(os.listdir(base)) == ["1", "2"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = requests.post(server.url + "/", files={"data": ("p.jpg", probe)}).json()
            if "blue_triangle" in [label for label, _ in answer]:
                break
            time.sleep(0.5)
        assert "blue_triangle" in [label for label, _ in answer], "version 2 was not picked up"
        assert answer[0][0] == "blue_triangle", answer
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures[:3]
    assert answers
