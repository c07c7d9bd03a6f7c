"""The inference core: what happens to an image, whichever protocol brought it.

    adapters: multipart POST / (multipart)   TF Serving REST and gRPC   V2 REST and gRPC
              Kafka consumer (stream)   label_image CLI   corrections (feedback)
                 |  parse the request; format the answer; map InferenceError.code to a status
                 v
    Inference.resolve(model, version)  (adapters ask it first, before they read their inputs)
    Inference.classify(images, model, version)
        choose the model (registry.Models) and version (versions.ModelManager) first, enforce the limits (images per
        request, bytes, pixels), decode each image with the shared preprocessing
        (classify_contract.preprocessing, via the engine's input spec), run the engine (batched when
        BATCH_MAX_SIZE is on), time decode and inference, and count the request per model and version
        (statistics: Triton's statistics extension, also at GET /metrics)
                 |
                 v
    Prediction(model, version, labels, scores [N, classes], timing)  or  InferenceError(code, message)

As KServe's dataplane sits under its REST and gRPC endpoints. Adapters never decode an image
or run the model themselves; each maps the codes below to its own status in one table.
"""
from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from classify_contract import preprocessing
from classify_server.core import statistics
from classify_server.core.ranking import top_k

if TYPE_CHECKING:
    from classify_server.core.registry import Models
    from classify_server.core.versions import ModelManager, Servable
    from classify_server.engines import Engine, InputSpec
    from classify_server.engines.base import Preprocessed
    from classify_server.settings import Limits

log = logging.getLogger("classify_server")

# Every way a request can fail that is the client's to fix (or to wait out), with a stable code.
INVALID_INPUT = "invalid_input"            # the request itself is malformed (an adapter's parse)
INVALID_IMAGE = "invalid_image"            # not an image the shared preprocessing can decode
EMPTY_IMAGE = "empty_image"                # zero bytes
IMAGE_TOO_LARGE = "image_too_large"        # over MAX_IMAGE_PIXELS (a decompression bomb)
REQUEST_TOO_LARGE = "request_too_large"    # over MAX_UPLOAD_BYTES
TOO_MANY_IMAGES = "too_many_images"        # over MAX_PARTS in one request
MODEL_NOT_FOUND = "model_not_found"        # no model of that name here
VERSION_NOT_SERVED = "version_not_served"  # that version is not the one served (or a label is unknown)
NOT_READY = "not_ready"                    # no version loaded and warmed up yet
CODES = (INVALID_INPUT, INVALID_IMAGE, EMPTY_IMAGE, IMAGE_TOO_LARGE, REQUEST_TOO_LARGE, TOO_MANY_IMAGES,
         MODEL_NOT_FOUND, VERSION_NOT_SERVED, NOT_READY)


class InferenceError(Exception):
    """A request the core will not answer: `code` (one of CODES) for machines, `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Prediction:
    model: str
    version: int
    labels: list[str]
    scores: np.ndarray  # [images, classes], in the order of `labels`
    timing: dict[str, float] = field(default_factory=dict)  # seconds: decode, inference

    def top_k(self, k: int) -> list[list[list[str | float]]]:
        """[[label, score], ...] best first, one list per image."""
        return [top_k(self.labels, row, k) for row in self.scores]


class Inference:
    """The one path from encoded images to scores, over the served models (registry.Models)."""

    def __init__(self, models: Models, limits: Limits, on_inference: Callable[[float], object] | None = None) -> None:
        self.models = models
        self.limits = limits  # enforced here; limits.top_k is the answers' default length
        self.on_inference = on_inference  # e.g. a Prometheus histogram's observe(seconds)

    def manager(self, model: str | None = None) -> ModelManager:
        """The versions.ModelManager of `model` (None: the default model)."""
        if not self.models.ready:
            raise InferenceError(NOT_READY, "the models are still loading; retry shortly")
        manager = self.models.get(model)
        if manager is None:
            raise InferenceError(MODEL_NOT_FOUND, f"Servable not found for request: Latest({model}); this server "
                                                  f"serves {', '.join(map(repr, self.models.names))}")
        return manager

    @contextmanager
    def servable(self, model: str | None = None, version: int | None = None,
                 label: str | None = None) -> Iterator[Servable]:
        """The served version of `model` (None: the default model; `version` or `label` None: its newest),
        held for one request.

        The version is checked on the version acquired, so a hot swap in between cannot answer
        from another version than the one asked for.
        """
        manager = self.manager(model)
        version = _labelled(manager, version, label)
        with manager.acquire(version) as servable:
            if servable is None and version is None:
                raise InferenceError(MODEL_NOT_FOUND, f"Servable not found for request: Latest({manager.name}); "
                                                      f"no version loaded: {manager.error}")
            if servable is None:
                served = sorted(manager.served)
                raise InferenceError(VERSION_NOT_SERVED,
                                     f"Servable not found for request: Specific({manager.name}, {version}); "
                                     f"version{'s' if len(served) > 1 else ''} "
                                     f"{', '.join(map(str, served)) or 'none'} served")
            yield servable

    def resolve(self, model: str | None = None, version: int | None = None, label: str | None = None) -> int:
        """The version that would answer `model` (and `version` or `label`) now, or InferenceError: what every
        adapter asks before it reads or decodes a request's inputs, so that a request to a model or version
        not served is answered 404 (NOT_FOUND) whatever else is wrong with it, as TF Serving and KServe
        answer, and nothing is decoded for a model this server does not have."""
        with self.servable(model, version, label) as servable:
            return servable.version

    def status(self, model: str | None = None, version: int | None = None,
               label: str | None = None) -> list[dict[str, object]]:
        """TF Serving's model_version_status entries of `model`, of one version (or label) or all."""
        manager = self.models.get(model)
        if manager is None:
            raise InferenceError(MODEL_NOT_FOUND, f"Could not find any versions of model {model}")
        entries = manager.version_status(_labelled(manager, version, label))
        if not entries:
            raise InferenceError(VERSION_NOT_SERVED, f"Could not find version {version} of model {model}")
        return entries

    def statistics(self, model: str | None = None, version: int | None = None) -> list[dict[str, object]]:
        """Triton's ModelStatistics (core.statistics, summed over the workers) of each version served of
        `model` (None: of every model), or of that `version` alone."""
        if model is None:
            wanted = [(name, v) for name, manager in self.models.managers.items() for v in sorted(manager.served)]
        elif version is None:
            manager = self.manager(model)
            wanted = [(manager.name, v) for v in sorted(manager.served)]
        else:
            with self.servable(model, version) as servable:
                wanted = [(servable.model, servable.version)]
        return statistics.read(wanted)

    def check_count(self, count: int) -> None:
        """Raise unless a request of `count` images is allowed."""
        if count < 1:
            raise InferenceError(INVALID_INPUT, "no image in the request")
        if count > self.limits.max_parts:
            raise InferenceError(TOO_MANY_IMAGES, f"too many images: {count}, the limit is "
                                                  f"{self.limits.max_parts} (MAX_PARTS)")

    def classify(self, images: Sequence[bytes] | Callable[[], Sequence[bytes]], model: str | None = None,
                 version: int | None = None, names: Sequence[str | None] | None = None, label: str | None = None,
                 count: int | None = None) -> Prediction:
        """Scores for encoded images, all or none: the first bad image fails the request.

        `images`: the encoded images, or a function reading them from the request, called once the `count`
        images the request declares are allowed (a request declaring a million is refused before one is
        read); a refusal or a failure of either kind counts as a failure of the version (statistics).
        `names` (file names, when the protocol has them) make the error messages say which image.
        """
        timer = statistics.Timer()
        with self.servable(model, version, label) as servable:
            timer.phase("queue")
            try:
                if callable(images):
                    if count is not None:
                        self.check_count(count)
                    images = images()
                self.check_count(len(images))
                for i, data in enumerate(images):
                    self.check_size(data, _which(i, names))
                engine = servable.engine
                inputs = [self._decode(engine, data, _which(i, names)) for i, data in enumerate(images)]
                decode = timer.phase("compute_input")
                scores = self._run(engine, inputs)
                prediction = Prediction(servable.model, servable.version, engine.labels, scores,
                                        {"decode": decode, "inference": timer.phase("compute_infer")})
                timer.phase("compute_output")
            except Exception:  # refused (InferenceError) or failed: a failure of this version, as Triton counts
                statistics.record(servable.model, servable.version, timer, ok=False)
                raise
            statistics.record(servable.model, servable.version, timer, ok=True, images=len(images), executions=1)
            return prediction

    def classify_each(self, images: Sequence[bytes], model: str | None = None, version: int | None = None
                      ) -> tuple[int, list[str], list[np.ndarray | InferenceError]]:
        """(version, labels, [scores or InferenceError, one per image]): a bad image fails alone.

        For a stream of independent messages, where one bad message must not hold up the others.
        """
        results: list[np.ndarray | InferenceError | None] = [None] * len(images)
        inputs: list[Preprocessed] = []
        where: list[int] = []
        timer = statistics.Timer()
        with self.servable(model, version) as servable:
            timer.phase("queue")
            engine = servable.engine
            try:
                for i, data in enumerate(images):
                    try:
                        self.check_size(data, "")
                        inputs.append(self._decode(engine, data, ""))
                        where.append(i)
                    except InferenceError as exc:
                        results[i] = exc
                    except Exception as exc:  # a decoder fault on odd input fails that image, not the batch
                        log.exception("preprocessing failed")
                        results[i] = InferenceError(INVALID_IMAGE, f"preprocessing failed: {exc}")
                timer.phase("compute_input")
                if inputs:
                    scores = self._run(engine, inputs)
                    timer.phase("compute_infer")
                    for i, row in zip(where, scores):
                        results[i] = row
                    timer.phase("compute_output")
            except Exception:
                statistics.record(servable.model, servable.version, timer, ok=False, requests=len(images))
                raise
            # Each image is a request of its own (a message), run with the others.
            statistics.record(servable.model, servable.version, timer, ok=True, images=len(inputs),
                              executions=1, requests=len(inputs))
            statistics.record(servable.model, servable.version, timer, ok=False, requests=len(images) - len(inputs))
            # Each image failed or was run: no result is None.
            return servable.version, engine.labels, cast("list[np.ndarray | InferenceError]", results)

    def check_image(self, data: bytes, name: str | None = None) -> str:
        """The format ("JPEG", "PNG"...) of one image that the shared preprocessing decodes whole,
        or InferenceError. The model is not run."""
        which = _which(0, [name])
        with self.servable() as servable:
            self.check_size(data, which)
            self._decode(servable.engine, data, which)
        return preprocessing.probe_image(data)[0]

    def check_size(self, data: bytes, which: str) -> None:
        check_size(data, self.limits.max_upload_bytes, which)

    def _decode(self, engine: Engine, data: bytes, which: str) -> Preprocessed:
        try:
            return preprocess(engine.input_spec, data, self.limits.max_image_pixels)
        except preprocessing.ImageTooLarge as exc:
            raise InferenceError(IMAGE_TOO_LARGE, f"{which}: {exc} (MAX_IMAGE_PIXELS)" if which
                                 else f"{exc} (MAX_IMAGE_PIXELS)") from None
        except preprocessing.InvalidImage as exc:
            raise InferenceError(INVALID_IMAGE, f"{which or 'the image'} is not a readable image "
                                                f"(JPEG, PNG, GIF, BMP, WebP...): {exc}") from None

    def _run(self, engine: Engine, inputs: list[Preprocessed]) -> np.ndarray:
        start = time.perf_counter()
        scores = engine.predict(inputs)
        if self.on_inference:
            self.on_inference(time.perf_counter() - start)
        return scores


def preprocess(spec: InputSpec, data: bytes, max_pixels: int) -> Preprocessed:
    """Encoded image bytes -> what an engine's input takes (engine.InputSpec), through the one shared
    preprocessing (classify_contract.preprocessing.decode_image, as training used it)."""
    if spec.encoded:
        # The classic graph decodes JPEG itself: hand it JPEG whatever came in.
        kind, height, width = preprocessing.probe_image(data)
        pixels = preprocessing.decode_image(data, (height, width), max_pixels)  # validates, rejects bombs
        if kind == "JPEG":
            return data
        out = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=95)
        return out.getvalue()
    pixels = preprocessing.decode_image(data, (spec.height, spec.width), max_pixels)
    if spec.mean or spec.std != 1.0:
        pixels = (pixels - spec.mean) / spec.std
    return pixels


def check_size(data: bytes, max_bytes: int, which: str = "") -> None:
    """Raise unless `data` holds something and at most `max_bytes` (MAX_UPLOAD_BYTES) bytes.

    A function too, for the stream's remote mode, which checks its messages without a model.
    """
    if not data:
        raise InferenceError(EMPTY_IMAGE, f"{which or 'the image'} is empty")
    if len(data) > max_bytes:
        raise InferenceError(REQUEST_TOO_LARGE, f"{which or 'the image'} is {len(data)} bytes, over the limit "
                                                f"of {max_bytes} (MAX_UPLOAD_BYTES)")


def _labelled(manager: ModelManager, version: int | None, label: str | None) -> int | None:
    """`version`, or the version that `label` names (MODEL_CONFIG_FILE's version_labels)."""
    if label is None:
        return version
    named = manager.label_version(label)
    if named is None:
        raise InferenceError(VERSION_NOT_SERVED, f"Unrecognized servable version label: {label}")
    return named


def _which(i: int, names: Sequence[str | None] | None) -> str:
    """How messages name image i: 'image 2', or 'image 2 (cat.jpg)' when the protocol has names."""
    name = names[i] if names and i < len(names) and names[i] else None
    return f"image {i + 1}" + (f" ({name})" if name else "")
