"""The model session: a frozen GraphDef imported once into a persistent tf.compat.v1.Session.

One `TFSessionEngine` lives as long as its gunicorn worker and serves every request;
Session.run is thread-safe, so threaded workers share it. Any frozen
classification graph works: ours (float32 pixels at `input:0`, scaling inside),
the classic retrain.py output (JPEG bytes at `DecodeJpeg/contents:0`), or a
third-party one configured by label_image.py-style settings.
"""
from __future__ import annotations

import io
import os
from typing import Any, cast

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import rewriter_config_pb2

from classify_contract import model_folder
from classify_server.engines import base
from classify_server.engines.base import Batching, InputSpec, ModelLoadError, Preprocessed
from classify_server.engines.batching import Batcher


def _tensor_name(name: str) -> str:
    return name if ":" in name else name + ":0"


def read_spec(model_dir: str, overrides: dict[str, object] | None = None, graph_path: str | None = None,
              labels_path: str | None = None) -> tuple[str, list[str], dict[str, Any], dict[str, Any]]:
    """Where the tensors are and what they take: the sidecar, then `overrides` on top.

    `graph_path` and `labels_path` default to the model folder's own files (label_image may
    name others, and then the folder's sidecar still describes the graph).
    """
    graph_path = graph_path or os.path.join(model_dir, model_folder.GRAPH)
    labels_path = labels_path or os.path.join(model_dir, model_folder.LABELS)
    for path in (graph_path, labels_path):
        if not os.path.isfile(path):
            raise ModelLoadError(f"model not found: {path} is missing (set MODEL_DIR to the folder "
                                 f"retrain wrote, or run: python -m retrain --output_dir {model_dir})")
    spec: dict[str, Any] = {"input_layer": None, "output_layer": "final_result", "input_height": None,
                            "input_width": None, "input_mean": 0.0, "input_std": 1.0}
    try:
        sidecar = model_folder.read_sidecar(model_dir)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if sidecar:
        spec.update(input_layer=sidecar.get("input"), output_layer=sidecar.get("output", "final_result"),
                    input_height=sidecar.get("input_height"), input_width=sidecar.get("input_width"),
                    input_mean=sidecar.get("input_mean", 0.0), input_std=sidecar.get("input_std", 1.0))
    spec.update(overrides or {})
    labels = model_folder.read_labels(labels_path)
    if not labels:
        raise ModelLoadError(f"corrupt model: {labels_path} has no labels")
    return graph_path, labels, spec, sidecar


class TFSessionEngine:
    """The TensorFlow session engine (classify_server.engines.base): graph.pb in one persistent session."""

    loaded_at: float  # set by base.warmed_up

    def __init__(self, model_dir: str, overrides: dict[str, object] | None = None, intra_threads: int = 0,
                 inter_threads: int = 0, batch_max_size: int = 0, batch_timeout_ms: float = 5,
                 graph_path: str | None = None, labels_path: str | None = None, bfloat16: bool = False) -> None:
        self.model_dir = os.path.abspath(model_dir)
        graph_path, self.labels, spec, self.sidecar = read_spec(model_dir, overrides, graph_path, labels_path)
        graph_def = tf.compat.v1.GraphDef()
        try:
            with open(graph_path, "rb") as f:
                graph_def.ParseFromString(f.read())
            graph = tf.Graph()
            with graph.as_default():
                tf.import_graph_def(graph_def, name="")
        except Exception as exc:  # protobuf and TensorFlow raise many kinds on garbage
            raise ModelLoadError(f"corrupt model: cannot import {graph_path} as a frozen GraphDef "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from None
        names = {op.name for op in graph.get_operations()}
        input_name = spec["input_layer"] or ("DecodeJpeg/contents" if "DecodeJpeg/contents" in names else "input")
        try:
            self.input = graph.get_tensor_by_name(_tensor_name(input_name))
            self.output = graph.get_tensor_by_name(_tensor_name(spec["output_layer"]))
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(f"{graph_path}: {exc}; set INPUT_LAYER and OUTPUT_LAYER to the graph's "
                                 "input and output tensor names") from None
        shape = self.input.shape
        self.input_spec = InputSpec(
            height=spec["input_height"] or (shape[1] if shape.rank == 4 and shape[1] else 299),
            width=spec["input_width"] or (shape[2] if shape.rank == 4 and shape[2] else 299),
            encoded=self.input.dtype == tf.string, mean=float(spec["input_mean"]), std=float(spec["input_std"]))
        self.graph_path = graph_path
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_threads,
                                          inter_op_parallelism_threads=inter_threads)
        if bfloat16:  # TF_BFLOAT16: oneDNN computes in bfloat16 where it is safe, on CPUs that have it
            config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = \
                rewriter_config_pb2.RewriterConfig.ON
        self.session = tf.compat.v1.Session(graph=graph, config=config)
        self.ready = False
        self.batcher: Batcher | None = None
        self.batching: Batching | None = None
        # Runs at once: the session's inter-op threads (0: TensorFlow's default, one per core).
        self.instances = inter_threads or os.cpu_count() or 1
        # Graphs that take one scalar string, or a fixed batch size, run each request alone.
        if batch_max_size > 1 and not self.input_spec.encoded and (shape.rank is None or shape[0] is None):
            self.batching = Batching(batch_max_size, batch_timeout_ms)
            self.batcher = Batcher(self._run, batch_max_size, batch_timeout_ms, self.instances)

    def predict(self, inputs: list[Preprocessed]) -> np.ndarray:
        """Preprocessed inputs (a list) -> probabilities, shape (len(inputs), classes)."""
        return self.batcher.predict(inputs) if self.batcher else self._run(inputs)

    def _run(self, inputs: list[Preprocessed]) -> np.ndarray:
        if self.input_spec.encoded:  # the classic graph takes one scalar string per run
            return np.stack([np.reshape(self.session.run(self.output, {self.input: x}), -1) for x in inputs])
        pixels = cast("list[np.ndarray]", inputs)  # not encoded: the core decoded each to pixels
        # One image is fed as a view of its array, not copied into a batch of one.
        batch = pixels[0][np.newaxis] if len(pixels) == 1 else np.stack(pixels)
        return self.session.run(self.output, {self.input: batch})

    def warm_up(self) -> None:
        """One run on a blank image: checks the graph end to end and pays the first-run cost."""
        spec = self.input_spec
        if spec.encoded:
            blank = io.BytesIO()
            Image.new("RGB", (spec.width, spec.height), (128, 128, 128)).save(blank, "JPEG")
            sample: Preprocessed = blank.getvalue()
        else:
            sample = np.full((spec.height, spec.width, 3), (128.0 - spec.mean) / spec.std, np.float32)
        base.warmed_up(self, self.predict([sample]), self.graph_path)

    def metadata(self) -> dict[str, object]:
        return base.metadata(self, self.graph_path, self.sidecar, engine="tf", input_tensor=self.input.name,
                               output_tensor=self.output.name, input_dtype=self.input.dtype.name)

    def close(self) -> None:
        if self.batcher:
            self.batcher.close()
        self.session.close()
