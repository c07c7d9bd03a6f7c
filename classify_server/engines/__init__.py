"""The engines: one loaded model version each, behind one small interface (base.Engine).

    tf_session   the persistent TensorFlow session over graph.pb (MODEL_ENGINE=tf), with its dynamic batching
    tflite       LiteRT interpreters over model.tflite (MODEL_ENGINE=tflite)

`load` chooses one by MODEL_ENGINE; each engine module imports only `base`, so nothing here is a cycle,
and a tflite worker never imports TensorFlow.
"""
import os

from classify_server.engines.base import Engine, InputSpec, ModelLoadError

__all__ = ["Engine", "InputSpec", "ModelLoadError", "load"]


def load(folder, config):
    """A warmed-up engine over one model folder, with these settings (classify_server.settings): the
    kind MODEL_ENGINE names."""
    if config["MODEL_ENGINE"] == "tflite":
        from classify_server.engines.tflite import TFLiteClassifier
        engine = TFLiteClassifier(folder, config["TF_INTRA_OP_THREADS"] or os.cpu_count() or 1,
                                  config["TF_INTER_OP_THREADS"] or os.cpu_count() or 1)
    else:
        from classify_server import settings
        from classify_server.engines.tf_session import Classifier
        engine = Classifier(folder, settings.graph_overrides(config), config["TF_INTRA_OP_THREADS"],
                            config["TF_INTER_OP_THREADS"], config["BATCH_MAX_SIZE"], config["BATCH_TIMEOUT_MS"],
                            bfloat16=config["TF_BFLOAT16"])
    try:
        engine.warm_up()
    except Exception:
        engine.close()
        raise
    return engine
