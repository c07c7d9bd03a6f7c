"""The TFLite engine (MODEL_ENGINE=tflite): model.tflite in LiteRT's interpreter, no TensorFlow session.

retrain writes model.tflite beside graph.pb (retrain.tflite: the same model, quantized as
--tflite_quantization says). An interpreter is not thread-safe, so each engine keeps a pool of
them: one per request running at once (TF_INTER_OP_THREADS, as for the session's concurrent runs),
made when first needed, each with XNNPACK on TF_INTRA_OP_THREADS threads. A batch is run image by
image on one interpreter (its input is one image; resizing it per request would cost more).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any

import numpy as np

from classify_contract import model_folder, tflite_runtime
from classify_server.engines import base
from classify_server.engines.base import Batching, InputSpec, ModelLoadError, Preprocessed


class TFLiteEngine:
    """The TFLite engine (classify_server.engines.base)."""

    loaded_at: float  # set by base.warmed_up

    def __init__(self, model_dir: str, threads: int = 1, runners: int = 1) -> None:
        self.model_dir = os.path.abspath(model_dir)
        self.path = os.path.join(model_dir, model_folder.TFLITE)
        labels_path = os.path.join(model_dir, model_folder.LABELS)
        if not os.path.isfile(self.path):
            raise ModelLoadError(f"model not found: {self.path} is missing (MODEL_ENGINE=tflite serves the "
                                 "model.tflite that retrain writes unless --tflite_quantization none; or set "
                                 "MODEL_ENGINE=tf to serve graph.pb)")
        if not os.path.isfile(labels_path):
            raise ModelLoadError(f"model not found: {labels_path} is missing")
        self.labels: list[str] = model_folder.read_labels(labels_path)
        try:
            self.sidecar: dict[str, Any] = model_folder.read_sidecar(model_dir)
            with open(self.path, "rb") as f:
                self.content = f.read()
            first = tflite_runtime.interpreter(self.content, threads)
        except (OSError, ValueError, RuntimeError) as exc:  # LiteRT raises ValueError on a bad flatbuffer
            raise ModelLoadError(f"corrupt model: cannot load {self.path} ({type(exc).__name__}: "
                                 f"{str(exc)[:200]})") from None
        detail = first.get_input_details()[0]
        if len(detail["shape"]) != 4 or detail["dtype"] != np.float32:
            raise ModelLoadError(f"{self.path}: expected float32 images [1, H, W, 3] in, got "
                                 f"{detail['dtype'].__name__} {list(detail['shape'])}")
        self.input_spec = InputSpec(height=int(detail["shape"][1]), width=int(detail["shape"][2]))
        self.threads, self.runners = threads, max(1, runners)
        self.instances = self.runners  # interpreters; each request runs alone on one
        self.batching: Batching | None = None
        # Idle interpreters (LiteRT's, untyped); `made` counts all made, at most `runners`.
        self.idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self.made, self.lock = 1, threading.Lock()
        self.idle.put(first)
        self.ready = False

    def _take(self) -> Any:  # a LiteRT Interpreter
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            pass
        with self.lock:
            make = self.made < self.runners
            self.made += make
        return tflite_runtime.interpreter(self.content, self.threads) if make else self.idle.get()

    def predict(self, inputs: list[Preprocessed]) -> np.ndarray:
        """Preprocessed images (a list of float32 [H, W, 3]) -> probabilities [len(inputs), classes]."""
        runner = self._take()
        try:
            return np.stack([tflite_runtime.run(runner, x).copy() for x in inputs])
        finally:
            self.idle.put(runner)

    def warm_up(self) -> None:
        spec = self.input_spec
        base.warmed_up(self, self.predict([np.full((spec.height, spec.width, 3), 128.0, np.float32)]), self.path)

    def metadata(self) -> dict[str, object]:
        return base.metadata(self, self.path, self.sidecar, engine="tflite")

    def close(self) -> None:
        while True:  # the interpreters in use are dropped when their requests put them back
            try:
                self.idle.get_nowait()
            except queue.Empty:
                return
