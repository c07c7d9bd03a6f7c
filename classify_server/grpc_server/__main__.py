"""`python -m classify_server.grpc_server` and `classify_grpc`: TensorFlow's start-up lines filtered
(TF Serving's protos import TensorFlow), then the server (grpc_server.server.main)."""
from classify_contract import tf_noise


def main(argv=None):
    tf_noise.import_tensorflow_quietly()
    from classify_server.grpc_server.server import main as serve
    return serve(argv)


if __name__ == "__main__":
    main()
