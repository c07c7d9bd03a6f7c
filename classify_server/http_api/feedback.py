"""Corrections from users become training data (opt-in with FEEDBACK_DIR).

POST /feedback with multipart `data` (the image) and form field `label` (an
existing label or a new class name) stores the image as
FEEDBACK_DIR/<label>/<sha256>.<ext>, the layout `python -m retrain
--extra_image_dir FEEDBACK_DIR` reads. Same bytes under the same label are stored
once. GET /feedback tells the page whether feedback is on and which labels exist.
"""
import hashlib
import os
import re
import threading
import time

from flask import Blueprint, abort, jsonify, request

from classify_contract import atomic
from classify_server.core.inference import INVALID_IMAGE, TOO_MANY_IMAGES, Inference, InferenceError
from classify_server.http_api.core_calls import uploaded_images

NEW_LABEL = re.compile(r"[A-Za-z0-9_\- ]{1,64}")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp"}


class RateLimiter:
    """At most `per_minute` corrections per client address (per worker), a sliding minute.

    `clock` is injectable so that tests can move time on instead of waiting a minute.
    """

    def __init__(self, per_minute, clock=time.monotonic):
        self.per_minute, self.clock, self.lock, self.seen = per_minute, clock, threading.Lock(), {}

    def allow(self, client):
        now = self.clock()
        with self.lock:
            if len(self.seen) > 10000:  # bound the memory: forget quiet clients
                self.seen = {k: v for k, v in self.seen.items() if v and v[-1] > now - 60}
            recent = [t for t in self.seen.get(client, []) if t > now - 60]
            if len(recent) >= self.per_minute:
                self.seen[client] = recent
                return False
            self.seen[client] = recent + [now]
            return True


def validate_label(label, known):
    label = (label or "").strip()
    if label in known:
        return label
    if not NEW_LABEL.fullmatch(label) or label.strip(". ") != label:
        abort(400, "label must be an existing label or a new name of letters, digits, spaces, '-' and '_', "
                   "at most 64 characters")
    return label


def store(folder, label, data, kind):
    """Write the image (of format `kind`) atomically under its label; returns (path, whether it was new)."""
    if kind not in EXTENSIONS:
        raise InferenceError(INVALID_IMAGE, f"{kind} images are not kept for training; "
                                            "send JPEG, PNG, GIF, BMP or WebP")
    path = os.path.join(folder, label, f"{hashlib.sha256(data).hexdigest()}.{EXTENSIONS[kind]}")
    if os.path.exists(path):
        return path, False
    atomic.write_bytes(path, data)
    return path, True


def blueprint(core: Inference, limiter: RateLimiter, folder: str) -> Blueprint:
    """This protocol's routes, handed the inference core, the per-client limit and where corrections are
    stored (FEEDBACK_DIR; empty: feedback is off)."""
    bp = Blueprint("feedback", __name__)

    def _feedback_dir():
        if not folder:
            abort(404, "feedback is off: set FEEDBACK_DIR to a folder to collect corrections")
        return folder

    def _labels(folder):
        with core.servable() as servable:
            labels = list(servable.engine.labels)
        extra = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))) \
            if os.path.isdir(folder) else []
        return labels + [n for n in extra if n not in labels]

    @bp.get("/feedback")
    def feedback_info():
        return jsonify(enabled=True, labels=_labels(_feedback_dir()))

    @bp.post("/feedback")
    def feedback():
        folder = _feedback_dir()
        if not limiter.allow(request.remote_addr):
            abort(429, f"too many corrections: at most {limiter.per_minute} a minute (FEEDBACK_PER_MINUTE)")
        label = validate_label(request.form.get("label"), _labels(folder))
        images, names = uploaded_images()
        if len(images) > 1:
            raise InferenceError(TOO_MANY_IMAGES, f"send one image with a correction, got {len(images)} 'data' parts")
        kind = core.check_image(images[0], names[0])  # only real images are kept
        path, new = store(folder, label, images[0], kind)
        name = os.path.relpath(path, folder)
        return jsonify(stored=name, label=label, new=new,
                       message=f"stored as {name}" if new else f"already stored as {name}"), 201 if new else 200

    return bp
