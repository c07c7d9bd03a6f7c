"""The quantization warning means something (issue 29): README's offline run on all the shared photos
(efficientnet_lite0, the shared preset, int8) warns exactly when the paired test on its test photos says
model.tflite's drop is over --max_quantization_drop and no chance, with numbers this test works out again
from the two models' answers; and a quantization broken on purpose (int8 calibrated on one flat grey image,
--tflite_calibration_dir) warns loudly."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from support.models import FLOWERS, LITE0_PRESET, engine
from support.processes import run_retrain
from support.report_page import Page

from classify_server.core.inference import preprocess
from retrain.images import create_image_lists

BOX = "!" * 72


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """(root folder, retrain's CompletedProcess) of README's offline command's retrain, its bottlenecks under
    root (removed afterwards)."""
    if not (os.path.isdir(FLOWERS) and os.path.isdir(LITE0_PRESET)):
        pytest.skip(f"real data absent: needs {FLOWERS} and {LITE0_PRESET}")
    root = tmp_path_factory.mktemp("quantization")
    try:
        yield root, run_retrain(*readme_flags(root), "--output_dir", root / "model")
    finally:
        shutil.rmtree(root)


def readme_flags(root):
    return ("--image_dir", FLOWERS, "--architecture", "efficientnet_lite0", "--weights", LITE0_PRESET,
            "--bottleneck_dir", root / "bottlenecks", "--summaries_dir", "")


def paired_answers(folder):
    """(photos only graph.pb gets right, photos only model.tflite gets right) of the run's test split, each
    model run here, in this process, on the photos as served."""
    lists = create_image_lists([FLOWERS], 10, 10)
    graph, tflite = engine(folder, "tf"), engine(folder, "tflite")
    worse = better = 0
    for label, paths in lists.testing.items():
        for path in paths:
            with open(path, "rb") as f:
                x = preprocess(graph.input_spec, f.read(), None)
            graph_right = graph.labels[int(np.argmax(graph.predict([x])[0]))] == label
            tflite_right = tflite.labels[int(np.argmax(tflite.predict([x])[0]))] == label
            worse, better = worse + (graph_right and not tflite_right), better + (tflite_right and not graph_right)
    return worse, better


def test_the_default_run_warns_only_when_the_paired_test_says_no_chance(default_run):
    root, result = default_run
    folder = root / "model"
    info = json.loads((folder / "model.json").read_text())["tflite"]
    worse, better = paired_answers(folder)
    p_value = binomtest(worse, worse + better, 0.5, alternative="greater").pvalue if worse + better else 1.0
    drop = (worse - better) / 297
    print(f"int8 against graph.pb on the 297 test photos: {worse} worse, {better} better, drop {drop:.4f}, "
          f"one-sided exact McNemar p = {p_value:.4f}")
    assert (info["paired_test"]["worse"], info["paired_test"]["better"]) == (worse, better)
    assert info["paired_test"]["p_value"] == pytest.approx(p_value)
    assert info["paired_test"]["drop"] == pytest.approx(drop)
    text = (folder / "report.html").read_text()
    if drop > 0.01 and p_value < 0.05:
        assert f"WARNING: model.tflite: {info['warning']}" in result.stderr and BOX in result.stderr
        assert f"p = {p_value:.3g}" in info["warning"] and info["warning"] in text and "against_graph" not in info
    else:  # chance: the difference stated plainly, with its p-value, and no alarm anywhere
        assert "WARNING" not in result.stderr and BOX not in result.stderr and "warning" not in info
        assert f"model.tflite against graph.pb: {info['against_graph']}" in result.stdout
        assert f"p = {p_value:.3g}" in info["against_graph"] and info["against_graph"] in text
        assert 'class="warning"' not in text
    assert Page(text).tables["accuracy"]  # the report was written whole


def test_a_quantization_calibrated_on_one_flat_image_warns_loudly(default_run):
    root, _ = default_run
    flat = root / "flat"
    flat.mkdir()
    Image.new("RGB", (224, 224), (128, 128, 128)).save(flat / "grey.png")
    out = root / "broken"
    result = run_retrain(*readme_flags(root), "--output_dir", out, "--tflite_calibration_dir", flat)
    info = json.loads((out / "model.json").read_text())["tflite"]
    print(info)
    assert f"{BOX}\n!! WARNING: model.tflite: int8 quantization costs" in result.stderr, result.stderr
    assert "unlikely to be chance" in info["warning"] and info["paired_test"]["p_value"] < 1e-6
    assert info["paired_test"]["drop"] > 0.3
    assert f'<p class="warning">{info["warning"]}' in (out / "report.html").read_text()
