"""The model-folder format: what retrain writes and every reader (server, gRPC, stream, label_image,
gunicorn.conf.py) reads. Its one definition.

A model folder holds:

    graph.pb     a frozen GraphDef: float32 RGB [None, H, W, 3] in 0-255 at `input:0` (scaling inside),
                 probabilities at `final_result:0`; or any frozen classifier that the sidecar describes
    labels.txt   one label per line, in the order of the graph's outputs
    model.json   the sidecar: `input`, `output` (tensor names), `input_height`, `input_width`,
                 `input_mean`, `input_std`; and what made it (architecture, weights, accuracy...)
    saved_model.pb, variables/   optional: the same model as a SavedModel, for TensorFlow Serving
    model.tflite optional: the same model for TensorFlow Lite (LiteRT), maybe quantized (retrain.tflite);
                 what the server's MODEL_ENGINE=tflite runs; with TFLite metadata (name, labels, input
                 normalisation and size) when retrain had the writer (retrain.tflite_metadata)
    model.onnx   optional (`--export onnx`): the same model for ONNX Runtime (retrain.onnx_export)

A base folder holds numbered versions of one model, TensorFlow Serving's layout: BASE/1/, BASE/2/...
A version is complete when it holds graph.pb and labels.txt: retrain writes each version in a
temporary folder and renames it into place, so a number never names half a model.
"""
import json
import os

GRAPH = "graph.pb"
LABELS = "labels.txt"
SIDECAR = "model.json"
TFLITE = "model.tflite"
ONNX = "model.onnx"
REPORT = "report.html"  # what the run did and how good the model is (retrain.report), for people
REPORT_FILES = "report"  # its pictures, beside it


def is_model(folder):
    """Whether `folder` is one complete model folder."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in (GRAPH, LABELS))


def versions(base):
    """The complete numbered versions under `base`, oldest first ([] when none, or no such folder)."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return sorted(int(name) for name in names if name.isdigit() and is_model(os.path.join(base, name)))


def is_base(folder):
    """Whether `folder` holds numbered versions rather than being a model folder itself."""
    return not is_model(folder) and bool(versions(folder))


def missing(folder):
    """What is missing for `folder` to be a model: the files' paths ([] when it is one)."""
    return [os.path.join(folder, name) for name in (GRAPH, LABELS) if not os.path.isfile(os.path.join(folder, name))]


def models_inside(folder):
    """The model folders (or base folders of versions) directly inside `folder`: what a MODEL_DIR that
    points one level too high probably meant."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, name) for name in names
            if os.path.isdir(os.path.join(folder, name)) and not name.isdigit()
            and (is_model(os.path.join(folder, name)) or versions(os.path.join(folder, name)))]


def read_sidecar(folder):
    """The sidecar's dict ({} when there is none); ValueError when it is there but not JSON."""
    path = os.path.join(folder, SIDECAR)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            sidecar = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"corrupt model sidecar {path}: {exc}") from None
    if not isinstance(sidecar, dict):
        raise ValueError(f"corrupt model sidecar {path}: not a JSON object")
    return sidecar


def read_labels(path):
    """The labels of a labels file, in order (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]
