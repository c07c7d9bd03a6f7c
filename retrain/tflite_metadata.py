"""TFLite metadata in model.tflite: its name, its labels (as the associated file labels.txt) and its input's
normalisation and size, so MediaPipe's ImageClassifier (and ML Kit, and Android Studio's model import) use it
with no other file and no code.

The maintained writer is MediaPipe's (`mediapipe.tasks.python.metadata.metadata_writers`; tflite-support's is
archived). Its native part (`mediapipe.tasks.cc`) ships in mediapipe 0.10.21's Linux wheels and in none
later, and mediapipe 0.10.21 requires protobuf < 5 and numpy < 2, while TensorFlow 2.21 requires
protobuf >= 6.31: it cannot be installed beside TensorFlow. So the writer runs in a Python of its own
(`--tflite_metadata_python`, default $TFLITE_METADATA_PYTHON), one small venv:

    python3 -m venv .venv-tflite-metadata && .venv-tflite-metadata/bin/pip install mediapipe==0.10.21

retrain hands it the converted model and gets the same model back with its metadata
(retrain/tflite_metadata_writer.py, the only file that process runs). Without that Python, model.tflite is
written without metadata and retrain says so; LiteRT, the server and label_image read it either way.
"""
import json
import os
import subprocess
import sys
import tempfile

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tflite_metadata_writer.py")
SETUP = "python3 -m venv .venv-tflite-metadata && .venv-tflite-metadata/bin/pip install mediapipe==0.10.21"
DESCRIPTION = "Retrained {architecture} image classifier: float RGB 0-255 in, one probability per label out."


class MetadataError(Exception):
    """The writer failed; the message says why, in one line."""


def add(content, python, name, architecture, labels, timeout=300):
    """`content` (model.tflite's bytes) with its metadata, written by `python`'s MediaPipe."""
    # The model scales its pixels itself (graph.pb's contract): the input is the image's 0-255 as floats.
    spec = {"name": name, "description": DESCRIPTION.format(architecture=architecture), "labels": list(labels),
            "mean": 0.0, "std": 1.0}
    with tempfile.TemporaryDirectory(prefix="retrain-tflite-metadata-") as tmp:
        source, spec_path, target = (os.path.join(tmp, n) for n in ("in.tflite", "spec.json", "out.tflite"))
        with open(source, "wb") as f:
            f.write(content)
        with open(spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        try:
            result = subprocess.run([python, WRITER, source, spec_path, target], capture_output=True, text=True,
                                    timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MetadataError(f"cannot run {python}: {exc}") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise MetadataError(f"{python} {os.path.basename(WRITER)} failed: {last} "
                                f"(it needs mediapipe==0.10.21: {SETUP})")
        with open(target, "rb") as f:
            return f.read()


def note_missing():
    print("note: model.tflite has no TFLite metadata (MediaPipe's ImageClassifier needs it): set up its writer "
          f"once with `{SETUP}` and pass --tflite_metadata_python .venv-tflite-metadata/bin/python "
          "(docs/training.md: Use the model elsewhere)", file=sys.stderr)
