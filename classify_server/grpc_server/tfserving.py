"""TensorFlow Serving's gRPC services, so its clients and stubs work here (served by grpc_server.server).

    PredictionService.Predict           inputs {"images": DT_STRING [N] or scalar, encoded image bytes}
                                        -> outputs {"scores": DT_FLOAT [N, classes],
                                                    "classes": DT_STRING [N, classes] (the labels)}
    PredictionService.GetModelMetadata  metadata_field ["signature_def"] -> a SignatureDefMap in an Any
    ModelService.GetModelStatus         model_version_status: version, state, status

`model_spec` names the model, and a version or a version label (MODEL_CONFIG_FILE's version_labels).
Every request goes through the inference core (classify_server.core.inference), and the signature is the
REST API's (classify_server.codecs.tfserving.signature_def). Status codes, as TensorFlow Serving
answers them (grpc_server.errors' table; the REST API's HTTP codes alongside): NOT_FOUND (404) for a model
or version that is not served; INVALID_ARGUMENT (400) for an unreadable or empty image, a missing
`images` input or an unknown one, a wrong dtype or shape; RESOURCE_EXHAUSTED (413) for anything over
a size limit: an image over MAX_IMAGE_PIXELS, more than MAX_PARTS images, and (answered by gRPC
itself) a message over MAX_UPLOAD_BYTES; FAILED_PRECONDITION for an unknown signature_name; INTERNAL
for a server fault (details in the log). The classic inception_client.py's signature name
`predict_images` is accepted as another name of `serving_default`.
"""
import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from classify_server.codecs.tfserving import INPUT_KEY, SIGNATURE, SIGNATURE_NAMES, signature_def
from classify_server.core.inference import INVALID_INPUT, InferenceError
from classify_server.grpc_server.errors import Abort, rpc_methods

OUTPUTS = ("scores", "classes")
_STATES = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type.values_by_name


def _shape(*dims):
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])


def signature_def_map(engine):
    """The served signature_def (classify_server.codecs.tfserving), as the proto GetModelMetadata packs."""
    return json_format.ParseDict(signature_def(engine), get_model_metadata_pb2.SignatureDefMap())


def images_from(tensor):
    """(the number of images, a function reading them) of an `images` TensorProto: a scalar or a vector of
    strings; the core checks the number before it reads them (Inference.classify)."""
    if tensor.dtype != types_pb2.DT_STRING:
        raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' must be DT_STRING (encoded image bytes), got "
                                            f"{types_pb2.DataType.Name(tensor.dtype)}")
    dims = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_shape.unknown_rank or len(dims) > 1 or any(d < 0 for d in dims):
        raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' must be a scalar or a vector [N] of encoded "
                                            f"images, got shape {dims}")
    count = dims[0] if dims else 1

    def read():
        values = list(tensor.string_val)
        if len(values) == 1 and count > 1:  # a single value fills the shape, as tf.make_ndarray reads it
            values = values * count
        if len(values) != count:
            raise InferenceError(INVALID_INPUT, f"input '{INPUT_KEY}' has shape {dims} but {len(values)} values")
        return values
    return count, read


class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer, model_service_pb2_grpc.ModelServiceServicer):
    """Both services over the inference core. Classify, Regress, MultiInference: UNIMPLEMENTED."""

    def __init__(self, core):
        self.core = core
        rpc_methods(self, ("Predict", "GetModelMetadata", "GetModelStatus"))

    @staticmethod
    def version_of(spec):
        """(version, label) of a model_spec: either may be None."""
        choice = spec.WhichOneof("version_choice")
        return (spec.version.value if choice == "version" else None,
                spec.version_label if choice == "version_label" else None)

    def Predict(self, request, context):
        spec = request.model_spec
        version, label = self.version_of(spec)
        self.core.resolve(spec.name, version, label)  # the model first, as TF Serving: NOT_FOUND before the rest
        if spec.signature_name not in SIGNATURE_NAMES:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
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
        count, read = images_from(request.inputs[INPUT_KEY])
        prediction = self.core.classify(read, spec.name, version, label=label, count=count)
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

    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        if not request.metadata_field:
            raise InferenceError(INVALID_INPUT, "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise InferenceError(INVALID_INPUT, f"Metadata field {field} is not supported")
        version, label = self.version_of(spec)
        with self.core.servable(spec.name, version, label) as servable:
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(signature_def_map(servable.engine))
        return response

    def GetModelStatus(self, request, context):
        spec = request.model_spec
        response = get_model_status_pb2.GetModelStatusResponse()
        for entry in self.core.status(spec.name, self.version_of(spec)[0]):
            item = response.model_version_status.add(version=int(entry["version"]),
                                                      state=_STATES.Value(entry["state"]))
            item.status.error_code = _ERROR_CODES[entry["status"]["error_code"]].number
            item.status.error_message = entry["status"]["error_message"]
        return response


def add_to_server(core, server):
    """Both services on `server`; their full names (for health and reflection)."""
    servicer = Servicer(core)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
    return [prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
            model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name]
