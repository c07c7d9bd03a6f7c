"""The engines: one loaded model version each, behind one small interface (base.Engine).

    tf_session   the persistent TensorFlow session over graph.pb (MODEL_ENGINE=tf), with its dynamic batching
    tflite       LiteRT interpreters over model.tflite (MODEL_ENGINE=tflite)

`load` chooses one by MODEL_ENGINE; each engine module imports only `base`, so nothing here is a cycle,
and a tflite worker never imports TensorFlow.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from classify_server.engines.base import Engine, InputSpec, ModelLoadError

if TYPE_CHECKING:
    from classify_server.settings import EngineSettings

__all__ = ["Engine", "InputSpec", "ModelLoadError", "load"]


def load(folder: str, settings: EngineSettings, overrides: dict[str, object] | None = None) -> Engine:
    """A warmed-up engine over one model folder, of the kind settings.kind (MODEL_ENGINE) names;
    `overrides` describe a third-party graph without model.json (settings.ModelSettings.graph_overrides)."""
    engine: Engine
    if settings.kind == "tflite":
        from classify_server.engines.tflite import TFLiteEngine
        engine = TFLiteEngine(folder, settings.intra_op_threads or os.cpu_count() or 1,
                              settings.inter_op_threads or os.cpu_count() or 1)
    else:
        from classify_server.engines.tf_session import TFSessionEngine
        engine = TFSessionEngine(folder, overrides or {}, settings.intra_op_threads, settings.inter_op_threads,
                                 settings.batch_max_size, settings.batch_timeout_ms, bfloat16=bool(settings.bfloat16))
    try:
        engine.warm_up()
    except Exception:
        engine.close()
        raise
    return engine
