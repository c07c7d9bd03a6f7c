"""The Open Inference Protocol ("V2": KServe, Triton, Seldon MLServer, OpenVINO Model Server) over REST,
so that `tritonclient.http` and KServe's REST clients work here unchanged.

    GET  /v2                                          server metadata and extensions
    GET  /v2/health/live, /v2/health/ready            200 when live / when the model is loaded and warm
    GET  /v2/models/<name>[/versions/<v>]             model metadata: inputs and outputs (-1: any size)
    GET  /v2/models/<name>[/versions/<v>]/ready       200 when that model (version) answers
    POST /v2/models/<name>[/versions/<v>]/infer       one BYTES input of encoded images, shape [N]
    GET  /v2/models/<name>[/versions/<v>]/config      Triton's model configuration extension: model_config.proto
    GET  /v2/models[/<name>[/versions/<v>]]/stats     Triton's statistics extension: per model version, summed
                                                      over the workers (classify_server.core.statistics)

Bytes in JSON are base64 strings, as KServe's image examples send them; with the binary tensor data
extension (header Inference-Header-Content-Length, `binary_data_size` on the input) each element is a
4-byte little-endian length, then its bytes. Outputs: `scores` FP32 [N, classes] and `labels` BYTES
[classes]; `"binary_data": true` on a requested output answers it in binary, and Triton's
classification extension (`"classification": K` on `scores`) answers BYTES [N, K] "score:index:label",
best first. Errors are {"error": message, "code": code} (the core's code): 400 for a malformed
tensor, 404 for a model or version not served, 413 over a limit; never 500 for what a client sent;
another path under /v2 is 404 {"error": NOT_FOUND} (create_app's handler answers it).
"""
import base64
import binascii
import json

from flask import Blueprint, Response, jsonify, request

from classify_server.codecs import json_body, v2_tensors
from classify_server.core.inference import INVALID_INPUT, Inference, InferenceError
from classify_server.http_api.core_calls import classify

INPUT = v2_tensors.INPUT
HEADER_LENGTH = "Inference-Header-Content-Length"
NOT_FOUND = ("no such path of the Open Inference Protocol (V2): GET /v2, /v2/health/{live,ready}, "
             "/v2/models/stats, /v2/models/NAME[/versions/V][/ready|/config|/stats]; POST .../infer")


def _invalid(message):
    raise InferenceError(INVALID_INPUT, message)


def _split_body():
    """(the JSON inference header, the binary data after it)."""
    body = request.get_data(cache=False)
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        head, binary = body, b""
    else:
        if not length.isdigit() or int(length) > len(body):
            _invalid(f"{HEADER_LENGTH} must be a length within the body ({len(body)} bytes), got {length[:40]!r}")
        head, binary = body[:int(length)], body[int(length):]
    header = json_body.loads(head, "the inference request")  # nesting past its MAX_DEPTH: 400, never parsed
    if not isinstance(header, dict):
        _invalid("the inference request must be a JSON object with \"inputs\"")
    return header, binary


def _b64(item, i):
    if not isinstance(item, str):
        _invalid(f"element {i} of \"{INPUT}\" must be a base64 string")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        _invalid(f"element {i} of \"{INPUT}\" is not valid base64")


def _wanted(requested):
    """[(output name, parameters)]: those requested, or all of them."""
    if requested is None:
        return v2_tensors.wanted(None)
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        _invalid("\"outputs\" must be a list of objects with a \"name\"")
    return v2_tensors.wanted([(o.get("name"), o.get("parameters") or {}) for o in requested])


def blueprint(core: Inference) -> Blueprint:
    """This protocol's routes, handed the inference core."""
    bp = Blueprint("v2", __name__, url_prefix="/v2")

    @bp.get("")
    def server_metadata():
        return jsonify(name=v2_tensors.SERVER, version="1", extensions=v2_tensors.EXTENSIONS)

    @bp.get("/health/live")
    def live():
        return jsonify(live=True)

    @bp.get("/health/ready")
    def ready():
        is_ready = core.models.ready
        return jsonify(ready=is_ready), 200 if is_ready else 503

    @bp.get("/models/<name>")
    @bp.get("/models/<name>/versions/<int:version>")
    def model_metadata(name, version=None):
        with core.servable(name, version) as servable:
            return jsonify(v2_tensors.model_metadata(name, servable, core, version))

    @bp.get("/models/<name>/ready")
    @bp.get("/models/<name>/versions/<int:version>/ready")
    def model_ready(name, version=None):
        with core.servable(name, version):
            return jsonify(name=name, ready=True)

    @bp.get("/models/<name>/config")
    @bp.get("/models/<name>/versions/<int:version>/config")
    def model_config(name, version=None):
        with core.servable(name, version) as servable:
            return jsonify(v2_tensors.model_config(name, servable, core))

    @bp.get("/models/stats")
    @bp.get("/models/<name>/stats")
    @bp.get("/models/<name>/versions/<int:version>/stats")
    def model_statistics(name=None, version=None):
        return jsonify(model_stats=core.statistics(name, version))

    @bp.post("/models/<name>/infer")
    @bp.post("/models/<name>/versions/<int:version>/infer")
    def infer(name, version=None):
        core.resolve(name, version)  # an unknown model or version is a 404 before anything else is read
        header, binary = _split_body()
        count, read, wanted = _parse(header, binary)
        prediction = classify(core, read, name, version, count=count)
        request_parameters = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
        all_binary = request_parameters.get("binary_data_output") is True  # tritonclient asks so when it names none
        outputs, chunks = [], []
        for output_name, parameters in wanted:
            output = v2_tensors.output(output_name, parameters, prediction)
            if parameters.get("binary_data", all_binary) is True:
                chunk = v2_tensors.encode(output.pop("data"), output["datatype"])
                output["parameters"] = {"binary_data_size": len(chunk)}
                chunks.append(chunk)
            outputs.append(output)
        answer = {"model_name": name, "model_version": str(prediction.version), "outputs": outputs}
        if isinstance(header.get("id"), str):
            answer["id"] = header["id"]
        if not chunks:
            return jsonify(answer)
        head = json.dumps(answer, separators=(",", ":")).encode()
        return Response(head + b"".join(chunks), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(head))})

    def _parse(header, binary):
        """(the number of images, a function reading them, [(output name, its parameters)]) of a V2 inference
        request: the core checks the number before it reads them (Inference.classify)."""
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            _invalid(f"expected one input, \"{INPUT}\": a BYTES tensor of encoded images")
        tensor = inputs[0]
        shape = tensor.get("shape")
        count = v2_tensors.check_input(tensor.get("name"), tensor.get("datatype"), shape)
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            _invalid("input parameters must be a JSON object")
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
                _invalid(f"binary_data_size {str(size)[:20]} is not within the {len(binary)} bytes after the header")
            if size != len(binary):
                _invalid(f"binary_data_size {size} does not match the {len(binary)} bytes after the header")
        elif not isinstance(tensor.get("data"), list):
            _invalid(f"input \"{INPUT}\" has no data: base64 strings in \"data\", or binary_data_size")

        def read():
            if "binary_data_size" in parameters:
                images = v2_tensors.decode_bytes(binary)
            else:
                images = [_b64(item, i) for i, item in enumerate(tensor["data"])]
            if len(images) != count:
                _invalid(f"input \"{INPUT}\" has shape [{count}] but {len(images)} elements")
            return images
        return count, read, _wanted(header.get("outputs"))

    return bp
