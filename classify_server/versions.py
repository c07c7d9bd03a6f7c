"""Model versions and hot reload, as TensorFlow Serving does them.

MODEL_DIR is either one model folder (graph.pb, labels.txt, model.json) or a base
folder of numbered versions, TF Serving's layout: MODEL_DIR/1/, MODEL_DIR/2/...
(retrain.model_folder defines both).
The newest complete version is served. With polling on, a newer version is loaded
beside the current one and warmed up, then swapped in: requests in flight finish
on the old session, which is closed after the last of them. A version that fails
to load is reported in its status and the current one keeps serving.
"""
import logging
import os
import threading
import time
from contextlib import contextmanager

from classify_server.engine import ModelLoadError, load
from retrain import model_folder

log = logging.getLogger("classify_server")


class Servable:
    """One loaded version and the number of requests using it."""

    def __init__(self, version, engine):
        self.version, self.engine = version, engine
        self.users, self.retired = 0, False


class ModelManager:
    def __init__(self, model_dir, load, poll_seconds=0):
        """`load(folder)` returns a warmed-up engine or raises ModelLoadError."""
        self.model_dir, self.load, self.poll_seconds = model_dir, load, poll_seconds
        self.lock = threading.Lock()
        self.status = {}  # version -> (state, error message), TF Serving's states
        self.versioned = model_folder.is_base(model_dir)
        self.current = None
        if not self.versioned:
            self.current = Servable(1, load(model_dir))
            self.status[1] = ("AVAILABLE", "")
            return
        errors = []
        for version in reversed(model_folder.versions(model_dir)):  # the newest that loads
            try:
                self._load_version(version)
                break
            except ModelLoadError as exc:
                errors.append(str(exc))
        if self.current is None:
            raise ModelLoadError("; ".join(errors) or f"no model in {model_dir}")

    @property
    def ready(self):
        """Whether a version is loaded and warmed up: what every readiness probe asks."""
        return self.current is not None and self.current.engine.ready

    @classmethod
    def static(cls, engine, version=1):
        """A manager around one already loaded engine (no folder, no polling)."""
        manager = cls.__new__(cls)
        manager.model_dir, manager.poll_seconds, manager.versioned = engine.model_dir, 0, False
        manager.lock, manager.current = threading.Lock(), Servable(version, engine)
        manager.status = {version: ("AVAILABLE", "")}
        return manager

    def _load_version(self, version):
        self.status[version] = ("LOADING", "")
        try:
            engine = self.load(os.path.join(self.model_dir, str(version)))
        except ModelLoadError as exc:
            self.status[version] = ("END", str(exc))
            log.error("model version %s failed to load, keeping version %s: %s",
                      version, self.current and self.current.version, exc)
            raise
        self._swap(Servable(version, engine))
        log.info("serving model version %s from %s", version, self.model_dir)

    def _swap(self, new):
        with self.lock:
            old, self.current = self.current, new
            self.status[new.version] = ("AVAILABLE", "")
            if old is None:
                return
            old.retired = True
            self.status[old.version] = ("END", "")
            close_now = old.users == 0
        if close_now:
            old.engine.close()

    @contextmanager
    def acquire(self):
        """The servable to use for one request; its session stays open until released."""
        with self.lock:
            servable = self.current
            servable.users += 1
        try:
            yield servable
        finally:
            with self.lock:
                servable.users -= 1
                close = servable.retired and servable.users == 0
            if close:
                servable.engine.close()

    def poll(self):
        """Load the newest version if it is newer than the one served and not known bad."""
        if not self.versioned:
            return
        for version in reversed(model_folder.versions(self.model_dir)):
            if version <= self.current.version:
                return
            if self.status.get(version, ("", ""))[0] != "END":
                try:
                    self._load_version(version)
                except ModelLoadError:
                    continue  # reported; try the next older one that is still newer
                return

    def start_polling(self):
        if not (self.versioned and self.poll_seconds > 0):
            return

        def loop():
            while True:
                time.sleep(self.poll_seconds)
                try:
                    self.poll()
                except Exception:  # never let the poller die: log and poll again
                    log.exception("model version poll failed")

        threading.Thread(target=loop, name="model-poller", daemon=True).start()

    def version_status(self, version=None):
        """TF Serving's model_version_status list."""
        items = sorted(self.status.items(), reverse=True)
        return [{"version": str(v), "state": state,
                 "status": {"error_code": "UNKNOWN" if error else "OK", "error_message": error}}
                for v, (state, error) in items if version is None or v == version]


def load_models(config):
    """The ModelManager over config["MODEL_DIR"], polling every MODEL_POLL_SECONDS for a new version.

    Shared by the HTTP app, the gRPC server and the Kafka consumer, so all load and version alike.
    """
    models = ModelManager(config["MODEL_DIR"], lambda folder: load(folder, config), config["MODEL_POLL_SECONDS"])
    models.start_polling()
    return models
