"""The model for runtimes other than this server's: model.tflite's TFLite metadata (MediaPipe, ML Kit),
`--export onnx` (model.onnx beside graph.pb, for ONNX Runtime) and `--export triton DIR` (a Triton model
repository of that ONNX model).

Each is made in memory from graph.pb's GraphDef and measured on the test split before anything is written,
then written atomically; model.json lists each with its size and test accuracy, report.html shows them. An
export that fails stops the run with one line saying which and why, and nothing of it is written. What
only writing needs (tf2onnx, onnxruntime, onnx: `pip install .[export]`; MediaPipe's writer, in a Python of
its own: retrain.tflite_metadata) is imported here, never by the server.
"""
import os
import sys
from dataclasses import dataclass, field

from classify_contract import atomic, model_folder

FORMATS = ("onnx", "triton")
INSTALL = "pip install '.[export]'"


def requested(parser, values):
    """`--export` values ([["onnx"], ["triton", DIR]]) as {format: DIR or None}; a usage error otherwise."""
    wanted = {}
    for value in values:
        name, rest = value[0], value[1:]
        if name not in FORMATS:
            parser.error(f"--export {name}: unknown format; choose onnx or triton DIR")
        if name == "onnx" and rest:
            parser.error(f"--export onnx takes no folder (model.onnx goes beside graph.pb), not {' '.join(rest)}")
        if name == "triton" and len(rest) != 1:
            parser.error("--export triton takes one folder: the Triton model repository, e.g. --export triton models")
        wanted[name] = rest[0] if rest else None
    return wanted


def model_name(flags):
    """The model's name in its TFLite metadata and its Triton repository: --model_name, or the image folder's."""
    if flags.model_name:
        return flags.model_name
    return os.path.basename(os.path.abspath(flags.image_dir)) if flags.image_dir else "flower_photos"


def fail(which, exc):
    """Stop the run with one line: which export failed and why."""
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, ImportError):
        why = f"{why}; install what exports need with {INSTALL}"
    raise SystemExit(f"error: {which} failed, nothing of it written: {why}")


def tflite_metadata(content, flags, architecture, labels, tflite_info):
    """model.tflite's bytes with its TFLite metadata when --tflite_metadata_python is set (else as they are,
    with a note); model.json's "tflite" says which."""
    from retrain import tflite_metadata
    if not flags.tflite_metadata_python:
        tflite_metadata.note_missing()
        tflite_info["metadata"] = False
        return content
    try:
        content = tflite_metadata.add(content, flags.tflite_metadata_python, model_name(flags), architecture,
                                      labels)
    except tflite_metadata.MetadataError as exc:
        fail("model.tflite's TFLite metadata", exc)
    # The metadata adds buffers, no operation: the accuracy measured before holds.
    tflite_info.update(metadata=True, bytes=len(content), name=model_name(flags))
    return content


@dataclass
class Made:
    """The exports of a run, converted and measured, not written yet."""
    onnx: bytes = None
    wanted: dict = field(default_factory=dict)  # {format: DIR or None}, as requested()


def make(flags, graph_def, size, testing, info):
    """Convert and measure what --export asks for; model.json's "onnx" and "triton" entries go into `info`."""
    made = Made(wanted=flags.exports)
    if not made.wanted:
        return made
    which = "--export " + " and ".join(made.wanted)
    try:
        from retrain import onnx_export, triton_repository
        made.onnx, onnx_info = onnx_export.export(graph_def, size, testing.paths, testing.y)
        if "onnx" in made.wanted:
            info["onnx"] = dict(onnx_info, path=model_folder.ONNX)
        if "triton" in made.wanted:
            triton_repository.config_text(model_name(flags), made.onnx)  # it must make one before anything is written
            info["triton"] = {"path": os.path.abspath(os.path.join(made.wanted["triton"], model_name(flags))),
                              "bytes": onnx_info["bytes"], "accuracy": onnx_info["accuracy"],
                              "platform": "onnxruntime_onnx"}
    except Exception as exc:  # noqa: BLE001 - any converter's failure ends the run the same way, in one line
        fail(which, exc)
    return made


def write_beside(folder, made):
    """model.onnx into the model folder, or an earlier run's removed (never beside another model)."""
    path = os.path.join(folder, model_folder.ONNX)
    if "onnx" in made.wanted:
        atomic.write_bytes(path, made.onnx)
        print(f"wrote {model_folder.ONNX}")
    elif os.path.exists(path):
        os.unlink(path)


def write_elsewhere(flags, made, labels, version=1):
    """The Triton repository, when asked for."""
    if "triton" not in made.wanted:
        return
    from retrain import triton_repository
    try:
        target = triton_repository.write(made.wanted["triton"], model_name(flags), version, made.onnx, labels)
    except (OSError, ValueError) as exc:
        fail("--export triton", exc)
    print(f"wrote Triton model repository {target} (version {version})", file=sys.stdout)
