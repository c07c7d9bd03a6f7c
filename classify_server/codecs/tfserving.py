"""TensorFlow Serving's served signature, as its REST API (http_api.tfserving_rest) and gRPC services
(grpc_server.tfserving) both describe it: encoded images in under INPUT_KEY, scores and classes out."""


INPUT_KEY = "images"
SIGNATURE = "serving_default"
# The names a request may give the served signature: "" (the default), its own, and the classic
# inception_client.py's "predict_images"; any other is an error (REST 400, gRPC FAILED_PRECONDITION).
SIGNATURE_NAMES = frozenset({"", SIGNATURE, "predict_images"})


def signature_def(engine):
    """The SignatureDefMap (its JSON form) of the served signature: encoded images in."""
    tensor = {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
              "name": INPUT_KEY}
    scores = {"dtype": "DT_FLOAT", "name": "scores", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": str(len(engine.labels)), "name": ""}],
        "unknown_rank": False}}
    classes = dict(scores, dtype="DT_STRING", name="classes")
    return {"signature_def": {SIGNATURE: {
        "inputs": {INPUT_KEY: tensor}, "outputs": {"scores": scores, "classes": classes},
        "method_name": "tensorflow/serving/predict"}}}
