"""The gRPC server (`python -m classify_server.grpc_server`, or `classify_grpc`): TensorFlow Serving's
PredictionService and ModelService (tfserving) and the Open Inference Protocol's GRPCInferenceService
(v2), each handed the inference core; the core's error codes map to gRPC statuses in one table (errors)."""
