"""The engine boundary: what every engine is and shares (InputSpec, Engine, ModelLoadError).

An engine is one loaded model version. The core (classify_server.core.inference) decodes each
image with the shared preprocessing into what `input_spec` asks for, and hands the engine
a batch of them; the engine only runs the model. Today's engine is the persistent
TensorFlow session over graph.pb (classify_server.engines.tf_session, MODEL_ENGINE=tf) and LiteRT's
interpreters over model.tflite (classify_server.engines.tflite, MODEL_ENGINE=tflite). Each implements the
members below and is chosen where versions are loaded (classify_server.engines.load); no adapter
changes.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from classify_contract import model_folder


class ModelLoadError(RuntimeError):
    """The model folder is missing, incomplete or corrupt: its message says which file and why."""


@dataclass(frozen=True)
class InputSpec:
    """What one preprocessed image must be for this engine."""
    height: int
    width: int
    encoded: bool = False  # JPEG bytes (the classic retrain.py graph decodes them itself), not pixels
    mean: float = 0.0      # pixels are fed as (x - mean) / std
    std: float = 1.0


@dataclass(frozen=True)
class Batching:
    """Dynamic batching (engines.batching): requests join a run until it holds `max_size` images or
    `timeout_ms` has passed."""
    max_size: int
    timeout_ms: float


# One preprocessed image, as the core hands it to an engine (inference.preprocess): float32 pixels
# [H, W, 3], or JPEG bytes when its input_spec is `encoded`.
Preprocessed = np.ndarray | bytes


class Engine(Protocol):
    """What every engine is (engines.load checks both, TFSessionEngine and TFLiteEngine, against it)."""
    labels: list[str]      # one per score, in order
    input_spec: InputSpec
    model_dir: str         # its folder (absolute): versions.ModelManager.static, the page, metadata
    ready: bool            # warmed up: answers correctly and fast
    loaded_at: float       # time.time() when warmed up (set by warmed_up)
    instances: int         # runs of the model at once in this process (Triton's instance_group count)
    batching: Batching | None  # how concurrent requests are batched into one run, or None: each runs alone

    def warm_up(self) -> None:
        """One run on a blank input: checks the model end to end and pays the first-run cost."""

    def predict(self, inputs: list[Preprocessed]) -> np.ndarray:
        """Preprocessed inputs -> scores [len(inputs), len(labels)]; thread-safe (batched where on)."""

    def metadata(self) -> dict[str, object]:
        """What to tell clients about it: labels, input size, tensor names, where it came from."""

    def close(self) -> None:
        """Free it, once no request uses it any more."""


def warmed_up(engine: Engine, probabilities: np.ndarray, path: str) -> None:
    """Mark `engine` ready once its warm-up run answered `probabilities`; ModelLoadError when the model
    at `path` answers another number of scores than it has labels."""
    if probabilities.shape[-1] != len(engine.labels):
        raise ModelLoadError(f"{path} answers {probabilities.shape[-1]} scores but "
                             f"{len(engine.labels)} labels are listed in {model_folder.LABELS}")
    engine.ready, engine.loaded_at = True, time.time()


def metadata(served: Engine, path: str, sidecar: Mapping[str, Any], **extra: object) -> dict[str, object]:
    """What every engine tells clients of itself: labels, input size and scaling, its file, and what made it
    (the sidecar); `extra` adds the engine's own."""
    spec = served.input_spec
    return {"labels": served.labels, "input_height": spec.height, "input_width": spec.width,
            "input_mean": spec.mean, "input_std": spec.std, **extra, "model_dir": served.model_dir, "graph": path,
            **{key: sidecar.get(key) for key in ("weights", "architecture", "accuracy", "tflite", "created")},
            "report": os.path.isfile(os.path.join(served.model_dir, model_folder.REPORT))}
