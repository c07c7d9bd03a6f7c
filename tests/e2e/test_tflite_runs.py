"""The TFLite engine (MODEL_ENGINE=tflite) through real processes: retrain runs' quantization, its answers
against graph.pb's on real photos, the server with it, and an unknown engine refused by gunicorn."""
import base64
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
from support import ROOT
from support.images import shape_image
from support.models import engine, held_out
from support.processes import run_retrain

from classify_server.core.inference import preprocess

IMAGES = [shape_image(label, 60 + i) for i, label in enumerate(["red_circle", "green_square", "blue_triangle"])]


def converted(folder, quantization, to):
    """A model folder of `folder`'s labels and its graph.pb converted to model.tflite as `quantization`."""
    import tensorflow as tf

    from retrain import tflite
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((folder / "graph.pb").read_bytes())
    to.mkdir()
    shutil.copy(folder / "labels.txt", to)
    train = [p for p, _ in held_out(folder, "training")]
    (to / "model.tflite").write_bytes(tflite.convert(graph_def, 224, quantization, train))
    return to


def test_tflite_matches_graph_pb_on_real_photos(flower_model, tmp_path):
    """On the 216 held-out flower photos, through the shared preprocessing: float32 TFLite is graph.pb
    (1e-4); float16 within 0.05 (measured 0.03) with the same accuracy; the int8 default agrees on the
    top label for at least 95 % of photos (measured 0.977, mean score difference 0.015, accuracy the same)."""
    folder, _ = flower_model
    reference, as_int8 = engine(folder, "tf"), engine(folder, "tflite")
    as_float = engine(converted(folder, "float32", tmp_path / "float32"), "tflite")
    as_f16 = engine(converted(folder, "float16", tmp_path / "float16"), "tflite")
    photos = held_out(folder)
    assert len(photos) == 216
    labels = reference.labels
    scores = {name: [] for name in ("tf", "float16", "float32", "int8")}
    for path, _ in photos:
        with open(path, "rb") as f:
            x = preprocess(reference.input_spec, f.read(), None)
        for name, e in (("tf", reference), ("float16", as_f16), ("float32", as_float), ("int8", as_int8)):
            scores[name].append(e.predict([x])[0])
    tf_scores, f16, f32, i8 = (np.array(scores[n]) for n in ("tf", "float16", "float32", "int8"))
    truth = np.array([labels.index(label) for _, label in photos])
    accuracy = {n: float(np.mean(np.argmax(np.array(s), 1) == truth)) for n, s in scores.items()}
    agree = float(np.mean(np.argmax(i8, 1) == np.argmax(tf_scores, 1)))
    print(f"accuracy {accuracy}; int8 top-1 agreement {agree:.3f}, largest score difference "
          f"{np.abs(i8 - tf_scores).max():.3f}, mean {np.abs(i8 - tf_scores).mean():.4f}")
    np.testing.assert_allclose(f32, tf_scores, atol=1e-4)
    np.testing.assert_allclose(f16, tf_scores, atol=0.05)
    assert accuracy["float16"] == accuracy["tf"]
    assert agree >= 0.95 and np.abs(i8 - tf_scores).mean() < 0.03 and abs(accuracy["int8"] - accuracy["tf"]) <= 0.02
    info = json.loads((folder / "model.json").read_text())
    assert info["tflite"]["accuracy"]["test"] == pytest.approx(accuracy["int8"], abs=1e-6)  # what retrain wrote


def test_quantization_none_leaves_no_stale_model_tflite(image_dir, tmp_path):
    out = tmp_path / "model"
    common = ["--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", "none",
              "--how_many_training_steps", 20, "--output_dir", out, "--bottleneck_dir", tmp_path / "bn",
              "--summaries_dir", ""]
    run_retrain(*common, "--tflite_quantization", "float16")
    assert json.loads((out / "model.json").read_text())["tflite"]["quantization"] == "float16"
    run_retrain(*common, "--tflite_quantization", "none")
    assert not (out / "model.tflite").exists() and "tflite" not in json.loads((out / "model.json").read_text())


def test_no_warning_when_the_paired_test_says_chance(image_dir, tmp_path):
    """A drop over --max_quantization_drop (any is, over -1) is not enough: the warning needs the paired test
    too, and model.tflite does no worse than graph.pb on these photos. The difference is stated plainly."""
    out = tmp_path / "model"
    result = run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", "none",
                         "--how_many_training_steps", 20, "--output_dir", out,
                         "--bottleneck_dir", tmp_path / "bn", "--summaries_dir", "", "--max_quantization_drop", "-1")
    info = json.loads((out / "model.json").read_text())["tflite"]
    assert "warning" not in info and "WARNING" not in result.stderr, result.stderr
    paired = info["paired_test"]
    assert paired["worse"] <= paired["better"] and paired["p_value"] >= 0.5
    assert f"model.tflite against graph.pb: {info['against_graph']}" in result.stdout
    assert "within what chance gives" in info["against_graph"]
    assert f"p = {paired['p_value']:.3g}" in info["against_graph"]
    assert info["against_graph"] in (out / "report.html").read_text()


def worker_maps(server):
    """The memory maps of the server's (only) worker: which libraries it has loaded."""
    pids = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    with open(f"/proc/{pids[0]}/maps") as f:
        return f.read()


def test_the_server_with_the_tflite_engine(trained_model, start_server):
    """Every answer from model.tflite, matching the engine in this process; bad input as ever; and a worker
    that never loads TensorFlow."""
    server = start_server({"MODEL_DIR": trained_model, "MODEL_ENGINE": "tflite", "TOP_K": "10"})
    local = engine(trained_model, "tflite")
    for image in IMAGES:
        want = local.predict([preprocess(local.input_spec, image, None)])[0]
        answer = requests.post(server.url + "/", files={"data": ("x.jpg", image)}, timeout=30).json()
        assert dict(answer) == pytest.approx(dict(zip(local.labels, want.tolist())), abs=1e-6)
        r = requests.post(server.url + "/v1/models/model:predict",
                          json={"instances": [{"b64": base64.b64encode(image).decode()}]}, timeout=30)
        np.testing.assert_allclose(r.json()["predictions"][0], want, atol=1e-6)
    several = requests.post(server.url + "/", files=[("data", (f"{i}.jpg", image)) for i, image in enumerate(IMAGES)],
                            timeout=30).json()  # one request of three images: run one by one, the same answers
    for image, answer in zip(IMAGES, several):
        want = local.predict([preprocess(local.input_spec, image, None)])[0]
        assert dict(answer) == pytest.approx(dict(zip(local.labels, want.tolist())), abs=1e-6)
    r = requests.post(server.url + "/", files={"data": ("bad.jpg", IMAGES[0][:300])}, timeout=30)
    assert r.status_code == 400 and r.json()["code"] == "invalid_image"
    assert requests.post(server.url + "/", files={"data": ("x.jpg", IMAGES[1])}, timeout=30).status_code == 200
    maps = worker_maps(server)
    assert "litert" in maps.lower() or "tflite" in maps.lower()
    assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps, "the worker loaded TensorFlow"


def test_model_engine_must_be_known():
    result = subprocess.run([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", "127.0.0.1:0"], cwd=ROOT,
                            env=dict(os.environ, MODEL_ENGINE="onnx"), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "MODEL_ENGINE='onnx' must be tf or tflite" in result.stderr, result.stderr
