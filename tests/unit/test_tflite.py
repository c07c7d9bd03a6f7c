"""The TFLite engine (MODEL_ENGINE=tflite) in this process, over the model.tflite retrain writes beside
graph.pb: its accuracy, hot reload and metadata, a missing file, the bfloat16 rewrite. Retrain runs, real
photos and the server with it are e2e/test_tflite_runs.py's."""
import io
import json
import os
import shutil

import numpy as np
import pytest
from support.images import shape_image
from support.models import engine

from classify_server.core.inference import preprocess
from classify_server.engines import ModelLoadError, load
from classify_server.http_api import create_app

IMAGES = [shape_image(label, 60 + i) for i, label in enumerate(["red_circle", "green_square", "blue_triangle"])]


def test_retrain_writes_model_tflite_with_its_accuracy(trained_model):
    info = json.loads(open(os.path.join(trained_model, "model.json")).read())
    assert info["tflite"]["quantization"] == "int8"  # mobilenet_v2's default
    assert os.path.getsize(os.path.join(trained_model, "model.tflite")) == info["tflite"]["bytes"]
    assert 0 <= info["tflite"]["accuracy"]["test"] <= 1


def test_hot_reload_and_metadata_with_the_tflite_engine(trained_model, tmp_path):
    base = tmp_path / "models"
    shutil.copytree(trained_model, base / "1")
    app = create_app({"MODEL_DIR": str(base), "MODEL_ENGINE": "tflite", "MODEL_POLL_SECONDS": 0})
    c = app.test_client()
    meta = c.get("/v1/models/model/metadata").get_json()["metadata"]
    assert meta["engine"] == "tflite" and meta["graph"].endswith("model.tflite")
    shutil.copytree(trained_model, base / ".tmp")
    labels = [line.strip() + "_v2" for line in open(os.path.join(trained_model, "labels.txt")) if line.strip()]
    (base / ".tmp" / "labels.txt").write_text("\n".join(labels) + "\n")
    os.rename(base / ".tmp", base / "2")
    app.extensions["models"].poll_versions()
    answer = c.post("/", data={"data": (io.BytesIO(IMAGES[0]), "x.jpg")}).get_json()
    assert {label for label, _ in answer} <= set(labels)


def test_a_missing_model_tflite_says_what_to_do(trained_model, tmp_path):
    folder = tmp_path / "graph_only"
    shutil.copytree(trained_model, folder)
    os.unlink(folder / "model.tflite")
    with pytest.raises(ModelLoadError) as info:
        engine(folder, "tflite")
    assert "model.tflite is missing" in str(info.value) and "MODEL_ENGINE=tf" in str(info.value)


def cpu_has_bf16():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_bfloat16_rewrite_answers_as_float32_does(trained_model):
    """TF_BFLOAT16=1: the same top labels and scores within 0.05; on a CPU with bf16 the rewrite really
    runs (the scores differ a little from float32's)."""
    from classify_server import settings
    fp32 = load(trained_model, settings.from_env({}).engine)
    bf16 = load(trained_model, settings.from_env({"TF_BFLOAT16": "1"}).engine)
    x = np.stack([preprocess(fp32.input_spec, image, None) for image in IMAGES])
    a, b = fp32.predict(list(x)), bf16.predict(list(x))
    assert (np.argmax(a, 1) == np.argmax(b, 1)).all()
    np.testing.assert_allclose(a, b, atol=0.05)
    if cpu_has_bf16():
        assert np.abs(a - b).max() > 1e-6, "no difference: the bfloat16 rewrite did not run"


def test_the_paired_test_counts_only_the_photos_the_two_models_disagree_on():
    """Exact McNemar, one-sided: 7 photos only graph.pb gets right, 1 only model.tflite does, of 297 (README's
    first run): p = P(X >= 7 | X ~ Binomial(8, 1/2)) = 9/256; the photos both get right or wrong count for nothing."""
    from retrain.tflite import compare
    truth = np.zeros(297, np.int64)
    graph = np.zeros(297, np.int64)
    graph[:26] = 1  # 26 both get wrong...
    quantized = graph.copy()
    quantized[100:107] = 2  # 7 only graph.pb gets right
    quantized[0] = 0  # 1 only model.tflite gets right
    result = compare(truth, graph, quantized)
    assert (result["worse"], result["better"]) == (7, 1)
    assert result["p_value"] == pytest.approx(9 / 256) and result["drop"] == pytest.approx(6 / 297)
    assert compare(truth, quantized, graph)["p_value"] == pytest.approx(1 - 1 / 256)  # a gain is no alarm
    assert compare(truth, graph, graph) == {"drop": 0.0, "worse": 0, "better": 0, "p_value": 1.0}
