"""Corrections from users become training data (opt-in with FEEDBACK_DIR).

POST /feedback with multipart `data` (the image) and form field `label` (an
existing label or a new class name) stores the image as
FEEDBACK_DIR/<label>/<sha256>.<ext>, the layout `python -m retrain
--extra_image_dir FEEDBACK_DIR` reads. Same bytes under the same label are stored
once. GET /feedback tells the page whether feedback is on and which labels exist.

The folder has a quota (FEEDBACK_MAX_BYTES, FEEDBACK_MAX_FILES): a correction that would take it past
either is refused with 507 and not written at all; what is stored is never touched. See Quota for how
usage is measured and why several workers cannot overshoot it.
"""
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, abort, jsonify, request

from classify_contract import atomic
from classify_server import metrics
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


class QuotaExceeded(Exception):
    """A correction refused for room: `limit` (bytes, files or disk) for the metric, `message` for people."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit, self.message = limit, message


class Quota:
    """At most `max_bytes` bytes (the files' sizes) and `max_files` files under FEEDBACK_DIR, for every
    worker and thread together.

    Usage is measured on disk at each new correction, not cached: files that retraining jobs or people
    move out count at once, and no worker's count drifts from another's. The measure and the write
    happen under an exclusive flock on the folder itself, which every worker and thread of this host
    takes in turn, so each sees the files written before it and the server never stores past the
    quota (only writers that do not take the lock, or hosts sharing the folder over a network file
    system without flock, could). The walk stops once the quota is passed: it visits at most
    max_files + 1 files, however many there are.
    """

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files

    def usage(self, folder: str) -> tuple[int, int]:
        """(bytes, files) under `folder`, counted up to just past the quota; symlinks count as files, unfollowed."""
        size = files = 0
        todo = [folder]
        while todo:
            try:
                listing = os.scandir(todo.pop())
            except OSError:  # removed meanwhile, or unreadable: it holds nothing of ours
                continue
            with listing:
                for entry in listing:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            todo.append(entry.path)
                            continue
                        size += entry.stat(follow_symlinks=False).st_size
                    except OSError:  # removed between the listing and the stat
                        continue
                    files += 1
                    if files > self.max_files or size > self.max_bytes:
                        return size, files  # past the quota: no need to count the rest
        return size, files

    @contextmanager
    def held(self, folder: str) -> Iterator[None]:
        """The folder's lock, held (every worker and thread takes it before measuring and writing)."""
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def check(self, folder: str, adding: int) -> None:
        """Raise QuotaExceeded unless one more file of `adding` bytes fits (call with the lock held)."""
        size, files = self.usage(folder)
        if files + 1 > self.max_files:
            raise QuotaExceeded("files", f"feedback storage is full: FEEDBACK_DIR holds {self.max_files} files or "
                                         "more, its limit; nothing was stored (raise FEEDBACK_MAX_FILES, or move "
                                         "corrections already trained on out of FEEDBACK_DIR)")
        if size + adding > self.max_bytes:
            raise QuotaExceeded("bytes", f"feedback storage is full: FEEDBACK_DIR holds {size} bytes, and this image "
                                         f"({adding} bytes) would take it past its limit of {self.max_bytes}; nothing "
                                         "was stored (raise FEEDBACK_MAX_BYTES, or move corrections already trained "
                                         "on out of FEEDBACK_DIR)")


def store(folder, label, data, kind, quota):
    """Write the image (of format `kind`) atomically under its label, within `quota`; returns (path, whether it
    was new). QuotaExceeded when it does not fit."""
    if kind not in EXTENSIONS:
        raise InferenceError(INVALID_IMAGE, f"{kind} images are not kept for training; "
                                            "send JPEG, PNG, GIF, BMP or WebP")
    path = os.path.join(folder, label, f"{hashlib.sha256(data).hexdigest()}.{EXTENSIONS[kind]}")
    if os.path.exists(path):  # a duplicate takes no room: answered as ever, even at the quota
        return path, False
    with quota.held(folder):
        if os.path.exists(path):  # another worker stored it while this one waited for the lock
            return path, False
        quota.check(folder, len(data))
        try:
            atomic.write_bytes(path, data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise QuotaExceeded("disk", f"feedback storage is full: the disk of FEEDBACK_DIR has no room left "
                                        f"({exc.strerror}); nothing was stored (lower FEEDBACK_MAX_BYTES below the "
                                        "free space)") from None
    return path, True


def blueprint(core: Inference, limiter: RateLimiter, folder: str, quota: Quota) -> Blueprint:
    """This protocol's routes, handed the inference core, the per-client limit, where corrections are
    stored (FEEDBACK_DIR; empty: feedback is off) and how much they may take there."""
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
        try:
            path, new = store(folder, label, images[0], kind, quota)
        except QuotaExceeded as exc:
            metrics.FEEDBACK_REFUSED.labels(exc.limit).inc()
            return jsonify(error=exc.message), 507  # Insufficient Storage (RFC 4918): werkzeug has no abort for it
        name = os.path.relpath(path, folder)
        return jsonify(stored=name, label=label, new=new,
                       message=f"stored as {name}" if new else f"already stored as {name}"), 201 if new else 200

    return bp
