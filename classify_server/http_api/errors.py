"""The HTTP status of each inference error code: one table for every HTTP route.

Every route answers an InferenceError as JSON {"error": message, "code": code} with the
status below (TensorFlow Serving's REST clients read "error"; others can rely on "code").
"""
from flask import jsonify

from classify_server.core import inference

HTTP_STATUS = {
    inference.INVALID_INPUT: 400,
    inference.INVALID_IMAGE: 400,
    inference.EMPTY_IMAGE: 400,
    inference.IMAGE_TOO_LARGE: 413,
    inference.REQUEST_TOO_LARGE: 413,
    inference.TOO_MANY_IMAGES: 413,
    inference.MODEL_NOT_FOUND: 404,
    inference.VERSION_NOT_SERVED: 404,
    inference.NOT_READY: 503,
}
assert set(HTTP_STATUS) == set(inference.CODES)


def response(exc):
    """The JSON answer to an InferenceError."""
    answer = jsonify(error=exc.message, code=exc.code)
    answer.status_code = HTTP_STATUS[exc.code]
    if exc.code == inference.NOT_READY:
        answer.headers["Retry-After"] = "5"
    return answer


def init_app(app):
    app.register_error_handler(inference.InferenceError, response)
