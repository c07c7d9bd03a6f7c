"""Writes TFLite metadata into a model with MediaPipe's metadata writers: run by retrain.tflite_metadata as

    PYTHON tflite_metadata_writer.py IN.tflite SPEC.json OUT.tflite

in the Python that has `mediapipe==0.10.21` (see retrain.tflite_metadata for why it is another Python). It
imports only MediaPipe and the standard library, nothing of this project. SPEC.json holds the model's
"name", "description", "labels" and the input's normalisation "mean" and "std" ((pixel - mean) / std).
"""
import json
import sys


def main(source, spec_path, target):
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    with open(source, "rb") as f:
        writer = metadata_writer.MetadataWriter.create(bytearray(f.read()))
    writer.add_general_info(spec["name"], spec["description"])
    writer.add_image_input([spec["mean"]], [spec["std"]])  # RGB, its size read from the model's input
    writer.add_classification_output(metadata_writer.Labels().add(spec["labels"], exported_filename="labels.txt"))
    content, _ = writer.populate()
    with open(target, "wb") as f:
        f.write(content)


if __name__ == "__main__":
    main(*sys.argv[1:])
