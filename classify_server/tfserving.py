"""TensorFlow Serving's REST API, same paths and JSON shapes, so its clients work here.

    GET  /v1/models/<name>[/versions/<v>]            model_version_status
    GET  /v1/models/<name>[/versions/<v>]/metadata   signature_def, plus labels and sizes
    POST /v1/models/<name>[/versions/<v>]:predict    {"instances": [{"b64": ...}, ...]}
                                                     or {"inputs": {"images": [{"b64": ...}]}}
    POST /v1/models/<name>[/versions/<v>]:classify   {"examples": [{"images": {"b64": ...}}]}

An image is its encoded bytes in base64, under the input key `images` (as the
classic inception_client.py sends it). Errors are {"error": "..."} with TF
Serving's status codes.
"""
import base64
import binascii

from flask import Blueprint, abort, current_app, jsonify, request

from classify_server.api import run

bp = Blueprint("tfserving", __name__, url_prefix="/v1/models")

INPUT_KEY = "images"


def _servable_or_404(models, name, version):
    if name != current_app.config["MODEL_NAME"]:
        abort(404, f"Servable not found for request: Latest({name})")
    if version is not None and version != models.current.version:
        abort(404, f"Servable not found for request: Specific({name}, {version}); "
                   f"version {models.current.version} is served")


def signature_def(classifier):
    """The SignatureDefMap (its JSON form) of the served signature: encoded images in."""
    tensor = {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
              "name": INPUT_KEY}
    scores = {"dtype": "DT_FLOAT", "name": "scores", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": str(len(classifier.labels)), "name": ""}],
        "unknown_rank": False}}
    classes = dict(scores, dtype="DT_STRING", name="classes")
    return {"signature_def": {"serving_default": {
        "inputs": {INPUT_KEY: tensor}, "outputs": {"scores": scores, "classes": classes},
        "method_name": "tensorflow/serving/predict"}}}


@bp.get("/<name>")
@bp.get("/<name>/versions/<int:version>")
def model_status(name, version=None):
    models = current_app.extensions["models"]
    if name != current_app.config["MODEL_NAME"]:
        abort(404, f"Could not find any versions of model {name}")
    status = models.version_status(version)
    if not status:
        abort(404, f"Could not find version {version} of model {name}")
    return jsonify(model_version_status=status)


@bp.get("/<name>/metadata")
@bp.get("/<name>/versions/<int:version>/metadata")
def metadata(name, version=None):
    models = current_app.extensions["models"]
    _servable_or_404(models, name, version)
    with models.acquire() as servable:
        classifier = servable.classifier
        return jsonify(model_spec={"name": name, "signature_name": "", "version": str(servable.version)},
                       # TF Serving nests the SignatureDefMap: metadata.signature_def.signature_def
                       metadata=dict(signature_def=signature_def(classifier), version=servable.version,
                                     **classifier.metadata()))


def _decode_b64(value, where):
    if isinstance(value, dict) and len(value) == 1 and INPUT_KEY in value:
        value = value[INPUT_KEY]  # {"images": {"b64": ...}}
    if not (isinstance(value, dict) and isinstance(value.get("b64"), str)):
        abort(400, f"{where}: expected an encoded image as {{\"b64\": \"<base64>\"}} "
                   f"(optionally under the key \"{INPUT_KEY}\")")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        abort(400, f"{where}: b64 value is not valid base64")


def _request_images():
    """The encoded images of a :predict body, and whether it used the columnar form."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "JSON Parse error: the body must be a JSON object with \"instances\" or \"inputs\"")
    if "instances" in body:
        items, columnar = body["instances"], False
    elif "inputs" in body:
        items, columnar = body["inputs"], True
        if isinstance(items, dict) and INPUT_KEY in items:
            items = items[INPUT_KEY]
        if isinstance(items, dict):
            items = [items]
    else:
        abort(400, "Missing 'inputs' or 'instances' key")
    return _images_from(items, "instance"), columnar


def _images_from(items, what):
    if not isinstance(items, list) or not items:
        abort(400, f"expected a non-empty list of {what}s")
    if len(items) > current_app.config["MAX_PARTS"]:
        abort(413, f"too many {what}s: {len(items)}, the limit is {current_app.config['MAX_PARTS']} (MAX_PARTS)")
    return [_decode_b64(item, f"{what} {i}") for i, item in enumerate(items)]


def _run(name, version, images):
    models = current_app.extensions["models"]
    _servable_or_404(models, name, version)
    with models.acquire() as servable:
        classifier = servable.classifier
        return classifier, run(classifier, images)


@bp.post("/<name>:predict")
@bp.post("/<name>/versions/<int:version>:predict")
def predict(name, version=None):
    images, columnar = _request_images()
    _, probabilities = _run(name, version, images)
    scores = [[float(s) for s in row] for row in probabilities]
    return jsonify(outputs=scores) if columnar else jsonify(predictions=scores)


@bp.post("/<name>:classify")
@bp.post("/<name>/versions/<int:version>:classify")
def classify(name, version=None):
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "examples" not in body:
        abort(400, "JSON Parse error: the body must be a JSON object with \"examples\"")
    classifier, probabilities = _run(name, version, _images_from(body["examples"], "example"))
    return jsonify(result=[[[label, float(s)] for label, s in zip(classifier.labels, row)]
                           for row in probabilities])
