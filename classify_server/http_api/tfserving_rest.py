"""TensorFlow Serving's REST API, same paths and JSON shapes, so its clients work here.

    GET  /v1/models                                   {"models": [names]}, as KServe's V1 protocol lists them
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]            model_version_status
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata   signature_def, plus labels and sizes
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict    {"instances": [{"b64": ...}, ...]}
                                                                 or {"inputs": {"images": [{"b64": ...}]}}
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:classify   {"examples": [{"images": {"b64": ...}}]}

An image is its encoded bytes in base64, under the input key `images` (as the
classic inception_client.py sends it). Errors are {"error": "..."} with TF
Serving's status codes.
"""
import base64
import binascii

from flask import Blueprint, jsonify, request

from classify_server.codecs.tfserving import INPUT_KEY, signature_def
from classify_server.core.inference import INVALID_INPUT, Inference, InferenceError
from classify_server.http_api.core_calls import classify as run_classify


def _invalid(message):
    raise InferenceError(INVALID_INPUT, message)


def _decode_b64(value, where):
    if isinstance(value, dict) and len(value) == 1 and INPUT_KEY in value:
        value = value[INPUT_KEY]  # {"images": {"b64": ...}}
    if not (isinstance(value, dict) and isinstance(value.get("b64"), str)):
        _invalid(f"{where}: expected an encoded image as {{\"b64\": \"<base64>\"}} "
                   f"(optionally under the key \"{INPUT_KEY}\")")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        _invalid(f"{where}: b64 value is not valid base64")


def _request_images():
    """The encoded images of a :predict body, and whether it used the columnar form."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        _invalid("JSON Parse error: the body must be a JSON object with \"instances\" or \"inputs\"")
    if "instances" in body:
        items, columnar = body["instances"], False
    elif "inputs" in body:
        items, columnar = body["inputs"], True
        if isinstance(items, dict) and INPUT_KEY in items:
            items = items[INPUT_KEY]
        if isinstance(items, dict):
            items = [items]
    else:
        _invalid("Missing 'inputs' or 'instances' key")
    return _images_from(items, "instance"), columnar


def _images_from(items, what):
    if not isinstance(items, list) or not items:
        _invalid(f"expected a non-empty list of {what}s")
    return [_decode_b64(item, f"{what} {i}") for i, item in enumerate(items)]


def blueprint(core: Inference) -> Blueprint:
    """This protocol's routes, handed the inference core."""
    bp = Blueprint("tfserving", __name__, url_prefix="/v1/models")

    def routes(method, suffix):
        """The decorator of one endpoint on a model, a version of it, or a version label of it."""
        def decorate(view):
            for prefix in ("/<name>", "/<name>/versions/<int:version>", "/<name>/labels/<label>"):
                view = bp.route(prefix + suffix, methods=[method], endpoint=view.__name__)(view)
            return view
        return decorate

    @bp.get("")
    def model_list():
        return jsonify(models=core.models.names)

    @routes("GET", "")
    def model_status(name, version=None, label=None):
        return jsonify(model_version_status=core.status(name, version, label))

    @routes("GET", "/metadata")
    def metadata(name, version=None, label=None):
        with core.servable(name, version, label) as servable:
            engine = servable.engine
            return jsonify(model_spec={"name": name, "signature_name": "", "version": str(servable.version)},
                           # TF Serving nests the SignatureDefMap: metadata.signature_def.signature_def
                           metadata=dict(signature_def=signature_def(engine), version=servable.version,
                                         **engine.metadata()))

    @routes("POST", ":predict")
    def predict(name, version=None, label=None):
        images, columnar = _request_images()
        scores = run_classify(core, images, name, version, label=label).scores.tolist()
        return jsonify(outputs=scores) if columnar else jsonify(predictions=scores)

    @routes("POST", ":classify")
    def classify(name, version=None, label=None):
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "examples" not in body:
            _invalid("JSON Parse error: the body must be a JSON object with \"examples\"")
        prediction = run_classify(core, _images_from(body["examples"], "example"), name, version, label=label)
        return jsonify(result=[[[label, score] for label, score in zip(prediction.labels, row)]
                               for row in prediction.scores.tolist()])

    return bp
