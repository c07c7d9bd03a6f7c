"""TensorFlow Serving's gRPC API, so its clients and stubs work here: `python -m classify_server.tfserving_grpc`.

    PredictionService.Predict           inputs {"images": DT_STRING [N] or scalar, encoded image bytes}
                                        -> outputs {"scores": DT_FLOAT [N, classes],
                                                    "classes": DT_STRING [N, classes] (the labels)}
    PredictionService.GetModelMetadata  metadata_field ["signature_def"] -> a SignatureDefMap in an Any
    ModelService.GetModelStatus         model_version_status: version, state, status

The same port also serves the Open Inference Protocol's `inference.GRPCInferenceService`
(classify_server.v2_grpc), `grpc.health.v1.Health` (SERVING once listening, with the model loaded
and warm; NOT_SERVING from the stop signal on; per service name and for "") and server
reflection (grpcurl lists and calls every service).

The model is loaded, versioned and hot-reloaded exactly as for the HTTP server
(classify_server.versions.load_models: MODEL_DIR, MODEL_NAME, MODEL_POLL_SECONDS...), every
request goes through the inference core (classify_server.inference), and the signature is the
REST API's (classify_server.tfserving_rest.signature_def). Settings, as
environment variables or flags: GRPC_HOST / --host (0.0.0.0), GRPC_PORT / --port (8500),
GRPC_THREADS (4, requests served at once; more wait), MAX_UPLOAD_BYTES (the largest
request message), GRACEFUL_TIMEOUT (30 s for requests in flight after SIGTERM/SIGINT).

Status codes, as TensorFlow Serving answers them (the REST API's HTTP codes alongside):
NOT_FOUND (404) for another model name or a version that is not served; INVALID_ARGUMENT
(400) for an unreadable or empty image, a missing `images` input or an unknown one, a
wrong dtype or shape; RESOURCE_EXHAUSTED (413) for anything over a size limit: an image
over MAX_IMAGE_PIXELS, more than MAX_PARTS images, and (answered by gRPC itself) a message
over MAX_UPLOAD_BYTES; FAILED_PRECONDITION for an unknown signature_name; INTERNAL for a
server fault (details in the log). The classic inception_client.py's signature name
`predict_images` is accepted as another name of `serving_default`.
"""
import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2,  # noqa: E402
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2,
                                     prediction_service_pb2_grpc, status_pb2)

from grpc_health.v1 import health as health_lib  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402

from classify_server import inference, settings, v2_grpc  # noqa: E402
from classify_server.inference import INVALID_INPUT, Inference, InferenceError  # noqa: E402
from classify_server.engine import ModelLoadError  # noqa: E402
from classify_server.tfserving_rest import INPUT_KEY, signature_def  # noqa: E402
from classify_server.versions import load_models  # noqa: E402

log = logging.getLogger("classify_server")

SIGNATURE = "serving_default"
SIGNATURE_ALIASES = {"", SIGNATURE, "predict_images"}  # "": the default; predict_images: inception_client.py's
OUTPUTS = ("scores", "classes")
# The gRPC status of each inference error code, as TensorFlow Serving answers them.
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
_STATES = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type.values_by_name


def _shape(*dims):
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])


def signature_def_map(engine):
    """The REST API's signature_def (classify_server.tfserving_rest), as the proto GetModelMetadata packs."""
    return json_format.ParseDict(signature_def(engine), get_model_metadata_pb2.SignatureDefMap())


def images_from(tensor, core):
    """The encoded images of an `images` TensorProto: a scalar or a vector of strings."""
    if tensor.dtype != types_pb2.DT_STRING:
        raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' must be DT_STRING (encoded image bytes), got "
                                            f"{types_pb2.DataType.Name(tensor.dtype)}")
    dims = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_shape.unknown_rank or len(dims) > 1 or any(d < 0 for d in dims):
        raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' must be a scalar or a vector [N] of encoded "
                                            f"images, got shape {dims}")
    count = dims[0] if dims else 1
    core.check_count(count)  # before a single value is repeated to fill the shape
    values = list(tensor.string_val)
    if len(values) == 1 and count > 1:  # a single value fills the shape, as tf.make_ndarray reads it
        values = values * count
    if len(values) != count:
        raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' has shape {dims} but {len(values)} values")
    return values


class _Abort(Exception):
    """A status of TensorFlow Serving's own, outside the core's codes."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def rpc(call, name=None):
    """call(request, context) with the core's errors as their gRPC statuses (GRPC_STATUS), _Abort as its
    own, and anything else as INTERNAL (logged): what every RPC of the gRPC server goes through."""
    name = name or call.__name__

    def wrapper(request, context):
        try:
            return call(request, context)
        except InferenceError as exc:
            context.abort(GRPC_STATUS[exc.code], exc.message)
        except _Abort as exc:
            context.abort(exc.code, exc.message)
        except Exception:
            log.exception("gRPC %s failed", name)
            context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
    wrapper.__name__ = name
    return wrapper


def _rpc(method):
    """rpc() for a method of the servicer below."""
    def wrapper(self, request, context):
        return rpc(lambda r, c: method(self, r, c), method.__name__)(request, context)
    wrapper.__name__ = method.__name__
    return wrapper


class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """Both services over one ModelManager. Classify, Regress, MultiInference: UNIMPLEMENTED."""

    def __init__(self, core):
        self.core = core

    @staticmethod
    def _version(spec):
        """(version, label) of a model_spec: either may be None."""
        choice = spec.WhichOneof("version_choice")
        return (spec.version.value if choice == "version" else None,
                spec.version_label if choice == "version_label" else None)

    @_rpc
    def Predict(self, request, context):
        spec = request.model_spec
        if spec.signature_name not in SIGNATURE_ALIASES:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"Serving signature key \"{spec.signature_name}\" not found.")
        unknown = sorted(set(request.inputs) - {INPUT_KEY})
        if unknown:
            raise InferenceError(INVALID_INPUT, f"input tensor alias not found in signature: {', '.join(unknown)}. "
                                                f"Inputs expected to be in the set {{{INPUT_KEY}}}.")
        if INPUT_KEY not in request.inputs:
            raise InferenceError(INVALID_INPUT, f"missing input '{INPUT_KEY}': a DT_STRING tensor of encoded images")
        wanted = list(request.output_filter) or list(OUTPUTS)
        bad = [name for name in wanted if name not in OUTPUTS]
        if bad:
            raise InferenceError(INVALID_INPUT, f"output tensor alias not found in signature: "
                                                f"{', '.join(bad)}. Outputs expected to be in the set "
                                                f"{{{', '.join(OUTPUTS)}}}.")
        version, label = self._version(spec)
        prediction = self.core.classify(images_from(request.inputs[INPUT_KEY], self.core), spec.name, version,
                                        label=label)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = prediction.version
        response.model_spec.signature_name = spec.signature_name or SIGNATURE
        rows, classes = prediction.scores.shape
        if "scores" in wanted:
            response.outputs["scores"].CopyFrom(tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, tensor_shape=_shape(rows, classes),
                tensor_content=np.asarray(prediction.scores, dtype=np.float32).tobytes()))
        if "classes" in wanted:
            response.outputs["classes"].CopyFrom(tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING, tensor_shape=_shape(rows, classes),
                string_val=[label.encode("utf-8") for label in prediction.labels] * rows))
        return response

    @_rpc
    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        if not request.metadata_field:
            raise InferenceError(INVALID_INPUT, "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise InferenceError(INVALID_INPUT, f"Metadata field {field} is not supported")
        version, label = self._version(spec)
        with self.core.servable(spec.name, version, label) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(signature_def_map(servable.engine))
        return response

    @_rpc
    def GetModelStatus(self, request, context):
        spec = request.model_spec
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in self.core.status(spec.name, self._version(spec)[0]):
            item = response.model_version_status.add(version=int(entry["version"]),
                                                      state=_STATES.Value(entry["state"]))
            item.status.error_code = _ERROR_CODES[entry["status"]["error_code"]].number
            item.status.error_message = entry["status"]["error_message"]
        return response


def make_server(core, max_message_bytes, threads=4):
    """A grpc.Server with both services, not yet bound or started."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
    ])
    servicer = Servicer(core)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    services = [prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
                model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
                v2_grpc.add_to_server(core, rpc, server)]
    # grpc.health.v1.Health, per service name and for the server (""): SERVING once started with a model
    # loaded and warm (main loads before it listens), NOT_SERVING from the stop signal on.
    health = health_lib.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                    reflection.SERVICE_NAME], server)
    server.health, server.services = health, services
    return server


def set_health(server, status):
    """Every service's health, and the server's (the empty name), to `status` (a ServingStatus)."""
    for name in ["", *server.services]:
        server.health.set(name, status)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m classify_server.tfserving_grpc",
                                     description="Serve MODEL_DIR over TensorFlow Serving's gRPC API.")
    config = settings.from_env()
    parser.add_argument("--host", default=config["GRPC_HOST"], help="address to listen on (GRPC_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=config["GRPC_PORT"],
                        help="port to listen on (GRPC_PORT, default 8500; 0: any free port)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    settings.setup_logging(config)
    threads, grace = config["GRPC_THREADS"], config["GRACEFUL_TIMEOUT"]

    try:
        models = load_models(config)
    except ModelLoadError as exc:
        raise SystemExit(f"classify_server.tfserving_grpc: {exc}") from None
    server = make_server(Inference(models, config), config["MAX_UPLOAD_BYTES"], threads)
    address = f"[{args.host}]:{args.port}" if ":" in args.host and not args.host.startswith("[") else \
        f"{args.host}:{args.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port, error = 0, exc
    else:
        error = "address in use or not available"
    if not port:
        raise SystemExit(f"classify_server.tfserving_grpc: cannot listen on {address}: {error}")

    stopping = threading.Event()

    def on_signal(signum, frame):
        if stopping.is_set():  # a second signal: stop now
            log.warning("%s again: stopping without waiting", signal.Signals(signum).name)
            server.stop(0)
            return
        log.info("%s: finishing requests in flight (up to %ss), then stopping", signal.Signals(signum).name, grace)
        set_health(server, health_pb2.HealthCheckResponse.NOT_SERVING)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    set_health(server, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC (TensorFlow Serving API) listening on %s:%s, model %r version %s from %s, %s threads",
             args.host, port, config["MODEL_NAME"], models.current.version, config["MODEL_DIR"], threads)
    while not stopping.wait(1):
        pass
    server.stop(grace).wait()
    log.info("stopped")
    # gRPC has cancelled the requests still in flight after the grace period (or a second signal), but
    # their handlers' threads run on, and the interpreter's exit would wait for them (it joins the
    # pool's threads): exit now, as gunicorn kills a worker after GRACEFUL_TIMEOUT.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
