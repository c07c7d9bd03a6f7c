"""The Open Inference Protocol (V2) over gRPC: `inference.GRPCInferenceService`, beside TensorFlow
Serving's services on the gRPC server's port, so that `tritonclient.grpc` and KServe's gRPC clients
work here. The generated service code is the one `tritonclient[grpc]` ships.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig (Triton's model
configuration extension), ModelStatistics (its statistics extension) and ModelInfer: one BYTES input
`images` [N] in `bytes_contents` or `raw_input_contents` (each element a 4-byte little-endian length,
then its bytes); outputs `scores` FP32 [N, classes] and `labels` BYTES [classes] in
`raw_output_contents`, as Triton answers, or the classification extension's BYTES [N, K]
("classification" on `scores`). The core's errors become the gRPC statuses of grpc_server.errors' table.
"""
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from classify_server.codecs import v2_tensors
from classify_server.core.inference import INVALID_INPUT, InferenceError
from classify_server.grpc_server.errors import rpc_methods


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core):
        self.core = core
        rpc_methods(self, ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                           "ModelStatistics", "ModelInfer"))

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.core.models.ready)

    def ModelReady(self, request, context):
        try:
            with self.core.servable(request.name, _version(request.version)):
                return service_pb2.ModelReadyResponse(ready=True)
        except InferenceError:
            return service_pb2.ModelReadyResponse(ready=False)

    def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=v2_tensors.SERVER, version="1",
                                                  extensions=v2_tensors.EXTENSIONS)

    def ModelMetadata(self, request, context):
        version = _version(request.version)
        with self.core.servable(request.name, version) as servable:
            meta = v2_tensors.model_metadata(request.name, servable, self.core, version)
        tensors = {key: [service_pb2.ModelMetadataResponse.TensorMetadata(**t) for t in meta[key]]
                   for key in ("inputs", "outputs")}
        return service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                                 platform=meta["platform"], **tensors)

    def ModelConfig(self, request, context):
        with self.core.servable(request.name, _version(request.version)) as servable:
            config = v2_tensors.model_config(request.name, servable, self.core)
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    def ModelStatistics(self, request, context):
        # Triton's request: no name, every model; a name without a version, its versions.
        stats = self.core.statistics(request.name or None, _version(request.version) if request.name else None)
        return json_format.ParseDict({"model_stats": stats}, service_pb2.ModelStatisticsResponse())

    def ModelInfer(self, request, context):
        version = _version(request.model_version)
        self.core.resolve(request.model_name, version)  # an unknown model or version before anything else is read
        if len(request.inputs) != 1:
            raise InferenceError(INVALID_INPUT, f"expected one input, \"{v2_tensors.INPUT}\"")
        tensor = request.inputs[0]
        count = v2_tensors.check_input(tensor.name, tensor.datatype, list(tensor.shape))

        def read():
            if request.raw_input_contents:
                images = v2_tensors.decode_bytes(request.raw_input_contents[0])
            else:
                images = list(tensor.contents.bytes_contents)
            if len(images) != count:
                raise InferenceError(INVALID_INPUT, f"input \"{v2_tensors.INPUT}\" has shape [{count}] but "
                                                    f"{len(images)} elements")
            return images

        wanted = [(o.name, {"classification": o.parameters["classification"].int64_param}
                   if "classification" in o.parameters else {}) for o in request.outputs]
        prediction = self.core.classify(read, request.model_name, version, count=count)  # count before reading
        response = service_pb2.ModelInferResponse(model_name=request.model_name,
                                                  model_version=str(prediction.version), id=request.id)
        for name, parameters in v2_tensors.wanted(wanted or None):
            output = v2_tensors.output(name, parameters, prediction)
            response.outputs.add(name=output["name"], datatype=output["datatype"], shape=output["shape"])
            response.raw_output_contents.append(v2_tensors.encode(output["data"], output["datatype"]))
        return response


def _version(text):
    """A V2 version string ("" for the served one) as the core's version number."""
    if not text:
        return None
    if not text.isdigit():
        raise InferenceError(INVALID_INPUT, f"model version must be a number, got {text[:40]!r}")
    return int(text)


def add_to_server(core, server):
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(core), server)
    return service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
