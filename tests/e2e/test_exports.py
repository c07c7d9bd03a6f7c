"""Issue 30: the model in the runtimes users already have. model.tflite's TFLite metadata read by MediaPipe's
ImageClassifier, model.onnx run by ONNX Runtime, the Triton repository's config.pbtxt read with Triton's own
protobuf, README's snippets run, and a failed export failing the run in one line. The flower model
(e2e/conftest.py's flower_model) is written with all three."""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
from support import ROOT
from support.models import METADATA_PYTHON, engine, held_out, read_labels
from support.processes import run_retrain

from classify_server.core.inference import preprocess

INT8_AGREEMENT, INT8_MEAN_DIFFERENCE = 0.95, 0.03  # int8 model.tflite against graph.pb (test_tflite_runs.py)


def needs_metadata(folder):
    """Skip (a failure under CI) when the flower model was written without the metadata writer's Python."""
    if not json.loads((folder / "model.json").read_text())["tflite"].get("metadata"):
        pytest.skip(f"model.tflite has no TFLite metadata: no writer at {METADATA_PYTHON} (.ci/run makes it: python3 "
                    "-m venv .venv-tflite-metadata && .venv-tflite-metadata/bin/pip install mediapipe==0.10.21)")


def image_classifier(path):
    """MediaPipe's ImageClassifier of the model file `path` alone, answering every class's score."""
    from mediapipe.tasks.python import BaseOptions, vision
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    return vision.ImageClassifier.create_from_options(options)


def pixels_of(path, spec):
    """The photo as the server decodes it, rounded to the 8-bit RGB that MediaPipe's images hold."""
    with open(path, "rb") as f:
        return np.clip(np.rint(preprocess(spec, f.read(), None)), 0, 255).astype(np.uint8)


def test_mediapipe_classifies_with_model_tflite_alone(flower_model, tmp_path):
    """MediaPipe's ImageClassifier (the real package), given model.tflite and nothing else, on the 216
    held-out photos: the labels come from the file itself, the top label is our tflite engine's (what the server
    runs with MODEL_ENGINE=tflite) for every photo, the scores within the int8 tolerance of graph.pb's; and
    on the photo files themselves (MediaPipe resizing them its own way) about as accurate."""
    import mediapipe as mp
    folder, _ = flower_model
    needs_metadata(folder)
    alone = tmp_path / "model.tflite"
    alone.write_bytes((folder / "model.tflite").read_bytes())
    labels = read_labels(folder)
    assert zipfile.ZipFile(alone).read("labels.txt").decode().split("\n") == labels  # the associated file
    reference, ours = engine(folder, "tf"), engine(folder, "tflite")
    photos = held_out(folder)
    truth = np.array([labels.index(label) for _, label in photos])
    scores = {name: [] for name in ("mediapipe", "tflite", "tf")}
    on_files = []
    with image_classifier(alone) as classifier:
        for path, _ in photos:
            pixels = pixels_of(path, reference.input_spec)
            categories = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels)) \
                .classifications[0].categories
            assert sorted((c.index, c.category_name) for c in categories) == list(enumerate(labels))
            row = np.zeros(len(labels))
            row[[c.index for c in categories]] = [c.score for c in categories]
            scores["mediapipe"].append(row)
            scores["tflite"].append(ours.predict([pixels.astype(np.float32)])[0])
            scores["tf"].append(reference.predict([pixels.astype(np.float32)])[0])
            on_files.append(classifier.classify(mp.Image.create_from_file(path)).classifications[0].categories[0].index)
    mediapipe, tflite, tf = (np.array(scores[name]) for name in ("mediapipe", "tflite", "tf"))
    accuracy = {name: float(np.mean(np.argmax(s, 1) == truth)) for name, s in scores.items()}
    accuracy["mediapipe, its own resizing"] = float(np.mean(np.array(on_files) == truth))
    agree = float(np.mean(np.argmax(mediapipe, 1) == np.argmax(tf, 1)))
    print(f"accuracy {accuracy}; MediaPipe against our tflite engine: largest score difference "
          f"{np.abs(mediapipe - tflite).max():.4f}; against graph.pb: top-1 agreement {agree:.3f}, mean score "
          f"difference {np.abs(mediapipe - tf).mean():.4f}")
    assert (np.argmax(mediapipe, 1) == np.argmax(tflite, 1)).all()
    np.testing.assert_allclose(mediapipe, tflite, atol=0.01)  # the same int8 model: the same quantized answers
    assert agree >= INT8_AGREEMENT and np.abs(mediapipe - tf).mean() < INT8_MEAN_DIFFERENCE
    assert accuracy["mediapipe, its own resizing"] >= accuracy["tflite"] - 0.05


def test_the_server_reads_model_tflite_with_its_metadata(flower_model, start_server):
    """The server (MODEL_ENGINE=tflite) serves model.tflite with its metadata as before: held-out photos' scores
    are the in-process engine's."""
    folder, _ = flower_model
    needs_metadata(folder)
    server = start_server({"MODEL_DIR": str(folder), "MODEL_ENGINE": "tflite", "TOP_K": "10"})
    local = engine(folder, "tflite")
    for path, _ in held_out(folder)[::50]:
        with open(path, "rb") as f:
            data = f.read()
        want = local.predict([preprocess(local.input_spec, data, None)])[0]
        answer = requests.post(server.url + "/", files={"data": ("photo.jpg", data)}, timeout=30).json()
        assert dict(answer) == pytest.approx(dict(zip(local.labels, want.tolist())), abs=1e-6)


def test_onnx_runtime_runs_model_onnx_as_graph_pb(flower_model):
    """model.onnx in ONNX Runtime on the held-out photos: graph.pb's scores within 1e-4, the same accuracy, and
    the accuracy retrain measured and wrote into model.json."""
    import onnxruntime
    folder, _ = flower_model
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    reference, labels = engine(folder, "tf"), read_labels(folder)
    photos = held_out(folder)
    inputs = []
    for path, _ in photos:
        with open(path, "rb") as f:
            inputs.append(preprocess(reference.input_spec, f.read(), None))
    batch = np.stack(inputs).astype(np.float32)
    onnx_scores = np.concatenate([session.run(["scores"], {"input": batch[i:i + 32]})[0]
                                  for i in range(0, len(batch), 32)])
    tf_scores = np.array(reference.predict(list(batch)))
    np.testing.assert_allclose(onnx_scores, tf_scores, atol=1e-4)
    truth = np.array([labels.index(label) for _, label in photos])
    accuracy = float(np.mean(np.argmax(onnx_scores, 1) == truth))
    assert accuracy == float(np.mean(np.argmax(tf_scores, 1) == truth))
    info = json.loads((folder / "model.json").read_text())
    assert info["onnx"]["accuracy"]["test"] == pytest.approx(accuracy, abs=1e-6)
    assert info["onnx"]["bytes"] == (folder / "model.onnx").stat().st_size


def test_triton_config_matches_the_onnx_model_and_labels(flower_model):
    """config.pbtxt parsed with Triton's own ModelConfig (tritonclient's model_config_pb2): its input and
    output are the ONNX file's, batched, its labels file is labels.txt, its model the folder's model.onnx."""
    import onnxruntime
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    folder, _ = flower_model
    repository = folder.parent / "triton" / "flower_photos"
    config = text_format.Parse((repository / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (config.name, config.platform) == ("flower_photos", "onnxruntime_onnx")
    assert config.max_batch_size > 0 and config.HasField("dynamic_batching")
    model = repository / "1" / "model.onnx"
    assert model.read_bytes() == (folder / "model.onnx").read_bytes()
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [(t.name, t.data_type, ["batch", *t.dims]) for t in declared] == \
               [(t.name, mc.TYPE_FP32, t.shape) for t in actual if t.type == "tensor(float)"]
    assert list(config.output[0].dims) == [len(read_labels(folder))]
    assert (repository / config.output[0].label_filename).read_text() == (folder / "labels.txt").read_text()
    info = json.loads((folder / "model.json").read_text())
    assert info["triton"]["path"] == str(repository) and info["triton"]["accuracy"] == info["onnx"]["accuracy"]


def readme_snippets():
    """The Python blocks of README's "Use the model elsewhere", in order."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Use the model elsewhere"):]
    return re.findall(r"```python\n(.*?)```", section[:section.index("\n## ")], re.S)


def test_readme_snippets_run(flower_model, tmp_path):
    """README's snippets, run as written in a folder holding the model (`model`), the Triton repository
    (`models`) and a held-out photo: MediaPipe's and ONNX Runtime's print graph.pb's label for it; Triton's
    request is what config.pbtxt declares, and the repository's model answers it with that label. (Its last
    block, sending the request, needs a Triton server, which this machine cannot run.)"""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    folder, _ = flower_model
    needs_metadata(folder)
    mediapipe, onnx, triton_request, triton_send = readme_snippets()
    assert "client.infer(" in triton_send
    reference, labels = engine(folder, "tf"), read_labels(folder)
    photo = next(path for path, label in held_out(folder) if label == "sunflowers")
    with open(photo, "rb") as f:
        want = labels[int(np.argmax(reference.predict([preprocess(reference.input_spec, f.read(), None)])[0]))]
    (tmp_path / "model").symlink_to(folder)
    (tmp_path / "models").symlink_to(folder.parent / "triton")
    (tmp_path / "photo.jpg").symlink_to(photo)

    def run(code):
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert run(mediapipe).startswith(f"[('{want}', ")
    assert run(onnx).startswith(f"{want} ")
    check = """
import json, onnxruntime
answer = onnxruntime.InferenceSession("models/flower_photos/1/model.onnx").run(None, {"input": pixels})[0][0]
print(json.dumps({"inputs": [[i.name(), i.shape(), i.datatype()] for i in inputs],
                  "outputs": [o.name() for o in outputs], "top": int(answer.argmax())}))"""
    request = json.loads(run(triton_request + check))
    config = text_format.Parse((tmp_path / "models" / "flower_photos" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert request["inputs"] == [[config.input[0].name, [1, *config.input[0].dims], "FP32"]]
    assert request["outputs"] == [config.output[0].name] and labels[request["top"]] == want


def test_a_failed_export_fails_the_run_in_one_line(image_dir, tmp_path):
    """An export that fails stops the run with one line saying which and why, and leaves nothing of it: the
    metadata writer in a Python without MediaPipe 0.10.21 (here, this one: later MediaPipes lack the writers'
    native part), before anything is written; a Triton repository that cannot be made, after the model
    folder, from which an earlier run's model.onnx is gone (no ONNX file beside another model)."""
    out = tmp_path / "model"
    common = ["--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", "none",
              "--how_many_training_steps", 20, "--output_dir", out, "--bottleneck_dir", tmp_path / "bn",
              "--summaries_dir", "", "--tflite_quantization", "float16"]
    failed = run_retrain(*common, "--tflite_metadata_python", sys.executable, check=False)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.tflite's TFLite metadata failed, nothing of it written: ") and \
        "mediapipe" in last, failed.stderr
    assert not out.exists()

    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier run's model")
    (tmp_path / "a-file").write_text("not a folder\n")
    failed = run_retrain(*common, "--export", "triton", tmp_path / "a-file" / "models", check=False)
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --export triton failed, nothing of it written: "), failed.stderr
    assert (tmp_path / "a-file").read_text() == "not a folder\n"
    assert (out / "graph.pb").exists() and not (out / "model.onnx").exists()  # no stale ONNX beside a new model
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temp file left
