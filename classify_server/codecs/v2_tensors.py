"""The Open Inference Protocol's tensors for this model, shared by its REST and gRPC adapters:
the input and outputs, the metadata, Triton's model configuration, the BYTES layout of the binary
extension, and each output's data (Triton's classification extension included)."""
import struct

import numpy as np

from classify_contract import model_folder
from classify_server.core.inference import INVALID_INPUT, InferenceError

SERVER = "classify-service"
INPUT = "images"
OUTPUTS = ("scores", "labels")
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
# Triton's platform and backend names of each engine (MODEL_ENGINE): the engine that serves, not the file format
# the model folder also holds.
PLATFORMS = {"tf": ("tensorflow_graphdef", "tensorflow"), "tflite": ("tensorflow_lite", "tflite")}


def _invalid(message):
    raise InferenceError(INVALID_INPUT, message)


def model_metadata(name, servable, core, version):
    """The model's metadata; its `versions`: the one asked for, or every version served."""
    classes = len(servable.engine.labels)
    versions = [servable.version] if version is not None else sorted(core.manager(name).served) or [servable.version]
    return {"name": name, "versions": [str(v) for v in versions], "platform": _engine(servable)[0],
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "labels", "datatype": "BYTES", "shape": [classes]}]}


def model_config(name, servable, core):
    """Triton's ModelConfig (model_config.proto) as JSON, field for field what model_metadata says: with
    max_batch_size (MAX_PARTS, the most images a request may hold) each batched tensor's `dims` are its
    shape without the first, batch, dimension; `labels` is answered once per request, [classes], as
    in the metadata (Triton's config has no word for an unbatched output of a batched model)."""
    meta = model_metadata(name, servable, core, servable.version)
    kind = _engine(servable)
    batched = {"images": True, "scores": True, "labels": False}
    types = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}

    def tensor(t):
        return {"name": t["name"], "data_type": types[t["datatype"]],
                "dims": t["shape"][1:] if batched[t["name"]] else t["shape"]}

    def input_tensor(t):
        # One image a batch row: dims [1], which the model takes as [] (Triton's reshape): [N, 1] on the wire,
        # as Triton's tools send it (they need dims), or [N] (check_input takes both).
        return dict(tensor(t), reshape={"shape": []}, format="FORMAT_NONE")

    policy = core.manager(name).spec
    version_policy = {"all": {"all": {}}, "specific": {"specific": {"versions": sorted(policy.versions)}}}.get(
        policy.policy, {"latest": {"num_versions": policy.num_versions}})
    engine = servable.engine
    # How it is served, per process (each gunicorn worker and the gRPC server load their own): the runs at
    # once, and dynamic batching across clients where BATCH_MAX_SIZE has it on.
    layout: dict[str, object] = {"instance_group": [{"name": name, "kind": "KIND_CPU", "count": engine.instances}]}
    if engine.batching is not None:
        layout["dynamic_batching"] = {"preferred_batch_size": [engine.batching.max_size],
                                      "max_queue_delay_microseconds": round(engine.batching.timeout_ms * 1000)}
    return {"name": name, "platform": kind[0], "backend": kind[1], "version_policy": version_policy,
            "max_batch_size": core.limits.max_parts, **layout,
            "input": [input_tensor(t) for t in meta["inputs"]],
            "output": [dict(tensor(t), label_filename=model_folder.LABELS) if t["name"] == "scores" else tensor(t)
                       for t in meta["outputs"]],
            "default_model_filename": kind[2]}


def _engine(servable):
    """(Triton's platform, backend, the file served) of the engine serving `servable`."""
    about = servable.engine.metadata()
    platform, backend = PLATFORMS[str(about.get("engine", "tf"))]
    return platform, backend, str(about.get("graph", "")).rsplit("/", 1)[-1]


def check_input(name, datatype, shape):
    """The number of images of the model's input (BYTES `images` of shape [N], or [N, 1] as Triton's config
    says it with its reshape), or InferenceError."""
    if name != INPUT:
        _invalid(f"unknown input {str(name)[:40]!r}: the model's input is \"{INPUT}\"")
    if datatype != "BYTES":
        _invalid(f"input \"{INPUT}\" must be BYTES (encoded images), got {str(datatype)[:20]}")
    if not (isinstance(shape, list) and len(shape) in (1, 2) and shape[1:] in ([], [1])
            and isinstance(shape[0], int) and shape[0] >= 0):
        _invalid(f"input \"{INPUT}\" must have shape [N] (or [N, 1]), got {str(shape)[:40]}")
    return shape[0]


def decode_bytes(data):
    """BYTES elements in the binary layout: a 4-byte little-endian length, then the bytes."""
    elements, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            _invalid("binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", data, at)
        if at + 4 + size > len(data):
            _invalid(f"binary element {len(elements)} declares {size} bytes, past the end of the data")
        elements.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return elements


def wanted(requested):
    """[(output name, parameters)] of requested [(name, parameters)], checked; all outputs when None."""
    if requested is None:
        return [(name, {}) for name in OUTPUTS]
    for name, parameters in requested:
        if name not in OUTPUTS:
            _invalid(f"unknown output {str(name)[:40]!r}: the outputs are {', '.join(OUTPUTS)}")
        if not isinstance(parameters, dict):
            _invalid("output parameters must be a JSON object")
    return requested


def output(name, parameters, prediction):
    """{"name", "datatype", "shape", "data"} of one output."""
    rows, classes = prediction.scores.shape
    k = parameters.get("classification")
    if k is not None:
        if name != "scores" or not isinstance(k, int) or isinstance(k, bool) or k < 1:
            _invalid("\"classification\" takes a positive number of classes, on the \"scores\" output")
        k = min(k, classes)
        order = np.argsort(-prediction.scores, axis=1)[:, :k]
        data = [f"{prediction.scores[r, i]:f}:{i}:{prediction.labels[i]}" for r in range(rows) for i in order[r]]
        return {"name": name, "datatype": "BYTES", "shape": [rows, k], "data": data}
    if name == "scores":
        return {"name": name, "datatype": "FP32", "shape": [rows, classes],
                "data": prediction.scores.astype(np.float32).ravel().tolist()}
    return {"name": name, "datatype": "BYTES", "shape": [classes], "data": list(prediction.labels)}


def encode(data, datatype):
    """An output's data in the binary layout (FP32 little-endian; BYTES length-prefixed)."""
    if datatype == "FP32":
        return np.asarray(data, dtype="<f4").tobytes()
    return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode("utf-8") for s in data))
