"""Study: the BentoML alternative serve_bench's part e compares with; not the service.

An established serving framework over the same model: BentoML, for bench/guards/serve_bench.py.

Not part of the service and not one of its dependencies: serve_bench.py runs it from
a separate virtualenv, made with

    python3.11 -m venv /tmp/bentoml-venv
    /tmp/bentoml-venv/bin/pip install bentoml tensorflow-cpu==2.21.0 pillow flask prometheus_client

(flask and prometheus_client because importing classify_server.engines.tf_session imports the
classify_server package), as

    MODEL_DIR=model PYTHONPATH=. bentoml serve bentoml_service:Classifier --working-dir bench/studies

It loads graph.pb with the service's own session code (classify_server.engines.tf_session.TFSessionEngine,
same preprocessing, same thread settings as gunicorn.conf.py: one worker by default
(BENTO_WORKERS), cores / workers TensorFlow threads for each op and as many runs at
once), so only the HTTP framework differs.
POST /classify with multipart field `data` answers [[label, score], ...].
"""
import os
from pathlib import Path

import bentoml

CORES = os.cpu_count() or 1
WORKERS = int(os.environ.get("BENTO_WORKERS", 1))


@bentoml.service(workers=WORKERS, traffic={"timeout": 120})
class Classifier:
    def __init__(self):
        from classify_server.engines.tf_session import TFSessionEngine as Session
        self.model = Session(os.environ.get("MODEL_DIR", "model"),
                             intra_threads=int(os.environ.get("TF_INTRA_OP_THREADS", max(1, CORES // WORKERS))),
                             inter_threads=int(os.environ.get("TF_INTER_OP_THREADS", max(1, CORES // WORKERS))))
        self.model.warm_up()

    @bentoml.api
    def classify(self, data: Path) -> list:
        from classify_server.core.inference import preprocess
        from classify_server.core.ranking import top_k
        probabilities = self.model.predict([preprocess(self.model.input_spec, data.read_bytes(), None)])[0]
        return top_k(self.model.labels, probabilities, 5)
