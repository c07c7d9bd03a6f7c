"""TensorFlow Serving's REST API, same paths and JSON shapes, so its clients work here.

    GET  /v1/models                                   {"models": [names]}, as KServe's V1 protocol lists them
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]            model_version_status
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata   signature_def, plus labels and sizes
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict    {"instances": [{"b64": ...}, ...]}
                                                                 or {"inputs": {"images": [{"b64": ...}]}}
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:classify   {"examples": [{"images": {"b64": ...}}]}

An image is its encoded bytes in base64, under the input key `images` (as the
classic inception_client.py sends it). Errors are {"error": "..."} with TF
Serving's status codes, and TF Serving's rules: the model and version are found
first (404), then the body: JSON of at most json_body.MAX_DEPTH levels, exactly
one of "instances" and "inputs", a signature_name that is the served signature's,
only the input `images`, "examples" (and "context" features in no example) for
:classify; 400 otherwise.
"""
import base64
import binascii

from flask import Blueprint, jsonify, request

from classify_server.codecs import json_body
from classify_server.codecs.tfserving import INPUT_KEY, SIGNATURE_NAMES, signature_def
from classify_server.core.inference import INVALID_INPUT, Inference, InferenceError
from classify_server.http_api.core_calls import classify as run_classify


def _invalid(message):
    raise InferenceError(INVALID_INPUT, message)


def _body():
    """The request's JSON object, its signature_name checked (TF Serving's REST API takes any content type)."""
    body = json_body.loads(request.get_data(cache=False), "the request body")
    if not isinstance(body, dict):
        _invalid("JSON Parse error: the body must be a JSON object")
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        _invalid("'signature_name' key must be a string value")
    if name not in SIGNATURE_NAMES:
        _invalid(f"Serving signature name: \"{name[:80]}\" not found in signature def")
    return body


def _is_b64(value):
    """TF Serving's binary value: an object of exactly one key, "b64" (anything else is a map of names)."""
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _decode_b64(value, where):
    if isinstance(value, dict) and len(value) == 1 and INPUT_KEY in value:
        value = value[INPUT_KEY]  # {"images": {"b64": ...}}
    if not (_is_b64(value) and isinstance(value["b64"], str)):
        _invalid(f"{where}: expected an encoded image as {{\"b64\": \"<base64>\"}} "
                 f"(optionally under the key \"{INPUT_KEY}\")")
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        _invalid(f"{where}: b64 value is not valid base64")


def _check_names(names, where):
    """Raise unless the input names of a row or of the columns are the signature's."""
    unknown = [str(n)[:40] for n in names if n != INPUT_KEY]
    if unknown:  # a few of them named: a hostile body may have a million
        _invalid(f"{where}input tensor alias not found in signature: {', '.join(sorted(unknown[:5]))}"
                 f"{', ...' if len(unknown) > 5 else ''}. "
                 f"Inputs expected to be in the set {{{INPUT_KEY}}}.")


def _request_images(body):
    """The encoded images of a :predict body, and whether it used the columnar form: exactly one of
    "instances" (rows) and "inputs" (columns), as TF Serving's REST API requires."""
    if "instances" in body and "inputs" in body:
        _invalid("Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in body:
        items = body["instances"]
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict) and not _is_b64(item):
                    _check_names(item, f"instance {i}: ")
        return _images_from(items, "instance"), False
    if "inputs" not in body:
        _invalid("Missing 'inputs' or 'instances' key")
    items = body["inputs"]
    if isinstance(items, dict) and not _is_b64(items):  # a map of input names to tensors
        _check_names(items, "")
        if INPUT_KEY not in items:
            _invalid(f"missing input '{INPUT_KEY}': a list of encoded images")
        items = items[INPUT_KEY]
    return _images_from([items] if _is_b64(items) else items, "input"), True


def _example_images(body):
    """(the number of examples, a function reading their images) of a :classify body; an image in "context"
    (features shared by every example, and so in none of them, as TF Serving's REST API says) is every
    example's, decoded once. The core checks the number before a million examples are looked at."""
    if "examples" not in body:
        _invalid("Missing 'examples' key")
    examples, context = body["examples"], body.get("context", {})
    if not isinstance(context, dict):
        _invalid("'context' must be a JSON object of features shared by every example")
    if not isinstance(examples, list) or not examples:
        _invalid("expected a non-empty list of examples")

    def read():
        shared = _decode_b64({INPUT_KEY: context[INPUT_KEY]}, "context") if INPUT_KEY in context else None
        images = []
        for i, example in enumerate(examples):
            if not isinstance(example, dict):
                _invalid(f"example {i}: expected a JSON object of features")
            both = sorted(set(example) & set(context))
            if both:
                _invalid(f"example {i}: feature {both[0][:40]!r} is also in 'context'; a feature goes in one or "
                         "the other")
            images.append(shared if shared is not None else _decode_b64(example, f"example {i}"))
        return images
    return len(examples), read


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
        core.resolve(name, version, label)  # the model first: 404 before anything in the body is read
        images, columnar = _request_images(_body())
        scores = run_classify(core, images, name, version, label=label).scores.tolist()
        return jsonify(outputs=scores) if columnar else jsonify(predictions=scores)

    @routes("POST", ":classify")
    def classify(name, version=None, label=None):
        core.resolve(name, version, label)
        count, read = _example_images(_body())
        prediction = run_classify(core, read, name, version, label=label, count=count)
        return jsonify(result=[[[label, score] for label, score in zip(prediction.labels, row)]
                               for row in prediction.scores.tolist()])

    return bp
