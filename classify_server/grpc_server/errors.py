"""The inference core's errors as gRPC statuses, in one table: what every RPC of the gRPC server
(TF Serving's services, grpc_server.tfserving; the V2 service, grpc_server.v2) answers for them, as TensorFlow
Serving does. errors.py is the same table for HTTP."""
import logging

import grpc

from classify_server.core import inference
from classify_server.core.inference import InferenceError

log = logging.getLogger("classify_server")

GRPC_STATUS = {
    inference.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    inference.INVALID_IMAGE: grpc.StatusCode.INVALID_ARGUMENT,
    inference.EMPTY_IMAGE: grpc.StatusCode.INVALID_ARGUMENT,
    inference.IMAGE_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    inference.REQUEST_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    inference.TOO_MANY_IMAGES: grpc.StatusCode.RESOURCE_EXHAUSTED,
    inference.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    inference.VERSION_NOT_SERVED: grpc.StatusCode.NOT_FOUND,
    inference.NOT_READY: grpc.StatusCode.UNAVAILABLE,
}
assert set(GRPC_STATUS) == set(inference.CODES)


class Abort(Exception):
    """A status of a protocol's own, outside the core's codes (TF Serving's FAILED_PRECONDITION for an
    unknown signature)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def rpc(call, name=None):
    """call(request, context) with the core's errors as their gRPC statuses (GRPC_STATUS), Abort as its
    own, and anything else as INTERNAL (logged)."""
    name = name or call.__name__

    def wrapper(request, context):
        try:
            return call(request, context)
        except InferenceError as exc:
            context.abort(GRPC_STATUS[exc.code], exc.message)
        except Abort as exc:
            context.abort(exc.code, exc.message)
        except Exception:
            log.exception("gRPC %s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
    wrapper.__name__ = name
    return wrapper


def rpc_methods(servicer, names):
    """Wrap each of the servicer's methods `names` with rpc()."""
    for name in names:
        setattr(servicer, name, rpc(getattr(servicer, name)))
