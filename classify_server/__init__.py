"""An image classifier served over HTTP, gRPC and Kafka: `gunicorn classify_server:app`, then
`curl -F data=@image.jpg localhost:8000/`. README's "Architecture" maps the packages:

    http_api/     the HTTP adapters (Flask blueprints) and their app factory, create_app
    grpc_server/  the gRPC adapters (TF Serving's API, V2) and their server
    stream/       the Kafka consumer           label_image  the command-line classifier
    codecs/       wire formats two adapters share
    core/         the inference core: models, versions, limits, decode, run, rank, one error code
    engines/      a loaded model: a TensorFlow session or LiteRT interpreters
    http_server/  gunicorn's worker (one strict HTTP reader on an event loop) and settings
    wsgi          the app gunicorn serves, and a worker's exit policy when models cannot load
    settings, metrics
"""


def __getattr__(name):
    """`gunicorn classify_server:app` builds the app in each worker, after the fork (classify_server.wsgi)."""
    if name != "app":
        raise AttributeError(name)
    from classify_server.wsgi import load_app
    return load_app()
