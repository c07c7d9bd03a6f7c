"""The models one server serves, by name, and the thread that keeps them current.

The models come from classify_server.core.model_config (MODEL_CONFIG_FILE, TF Serving's model config, or
MODEL_DIR and MODEL_NAME as one model), each a versions.ModelManager. At start every model must
load, or the server does not start (as TF Serving), except a configured model whose base path holds no
version yet: it waits for its first (versions.ModelManager.waiting) while the others serve. Then one
poller thread looks for new versions every MODEL_POLL_SECONDS and reads MODEL_CONFIG_FILE again every
MODEL_CONFIG_POLL_SECONDS (TF Serving's --model_config_file_poll_wait_seconds): a model added is
loaded and then served (or waits for its first version), one
removed is retired (its requests in flight finish), one whose base_path or version policy changed is
loaded anew beside the old and then swapped in, its version labels change in place. A model that
fails to load is reported in its status and harms no other; a config file that does not parse keeps
the models served and says why in the log.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from classify_server.core import model_config
from classify_server.core.versions import ModelManager
from classify_server.engines import Engine, ModelLoadError, load

if TYPE_CHECKING:
    from classify_server.core.model_config import ModelSpec
    from classify_server.settings import EngineSettings, ModelSettings

log = logging.getLogger("classify_server")


class Models:
    def __init__(self, load: Callable[[str], Engine] | None, specs: Iterable[ModelSpec] = (), config_file: str = "",
                 poll_seconds: float = 0, config_poll_seconds: float = 0) -> None:
        """`load(folder)` returns a warmed-up engine or raises ModelLoadError; `specs` are the
        model_config.ModelSpecs to serve, loaded by `start`."""
        self.load, self.specs, self.config_file = load, list(specs), config_file
        self.poll_seconds, self.config_poll_seconds = poll_seconds, config_poll_seconds
        # name -> ModelManager, in the config's order; replaced whole, never changed in place
        self.managers: dict[str, ModelManager] = {}
        # name -> the changed ModelSpec that did not load (not tried again on every poll)
        self.rejected: dict[str, ModelSpec] = {}
        # name -> the changed ModelSpec whose base path has no version yet (logged once, looked at each poll)
        self.awaited: dict[str, ModelSpec] = {}
        self.started = False

    @classmethod
    def static(cls, engine: Engine, name: str = "model") -> Models:
        """One already loaded engine as the only model (no folder, no polling)."""
        models = cls(None)
        models.managers, models.started = {name: ModelManager.static(engine, name)}, True
        return models

    def start(self) -> None:
        """Load every model, then poll; ModelLoadError, naming each model that did not load, when any did not
        (a model waiting for its first version did not fail)."""
        managers = {spec.name: self._manager(spec) for spec in self.specs}
        failed = [m for m in managers.values() if m.error and not m.waiting]
        if failed:
            for manager in managers.values():
                manager.close()
            raise ModelLoadError("; ".join(f"model {m.name!r}: {m.error}" if self.config_file else m.error
                                           for m in failed))
        for manager in managers.values():
            if manager.waiting:
                log.warning("%s%s", manager.error, "" if self.poll_seconds else
                            " (MODEL_POLL_SECONDS is 0: it is not looked for again until a restart)")
        self.managers, self.started = managers, True
        self._start_polling()

    @property
    def ready(self) -> bool:
        """Whether the models are loaded and warmed up: what every readiness probe asks. A model added
        later that failed to load, or one waiting for its first version, does not count (it is reported
        in its own status and readiness): an unready server would stop serving every other model too."""
        return self.started and all(m.ready or m.error for m in self.managers.values())

    def get(self, name: str | None = None) -> ModelManager | None:
        """The ModelManager of `name` (None: the default, the config's first), or None."""
        managers = self.managers
        if name is None:
            return next(iter(managers.values()), None)
        return managers.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.managers)

    def poll_versions(self) -> None:
        for manager in list(self.managers.values()):
            failed = manager.failed
            manager.sync()
            if manager.failed and not failed:  # e.g. the first version of a model that waited for one
                log.error("model %r: no version loads, nothing served: %s", manager.name, manager.error)

    def reload_config(self) -> None:
        """Read MODEL_CONFIG_FILE again and serve what it says; keep the models served if it is not usable."""
        try:
            specs = model_config.read(self.config_file)
        except model_config.ConfigError as exc:
            log.error("%s; still serving %s", exc, ", ".join(self.managers) or "nothing")
            return
        old, new = self.managers, {}
        for spec in specs:
            manager = old.get(spec.name)
            if manager is not None and manager.spec == spec:  # same folder and policy
                manager.spec = spec  # the version labels may have changed
            elif manager is not None and self.rejected.get(spec.name) == spec:
                pass  # that change failed already: the old one keeps serving
            else:
                if self.awaited.get(spec.name) != spec:  # a change waiting for its version is looked at each poll
                    log.info("model %r %s: loading from %s", spec.name, "changed" if manager else "added",
                             spec.base_path)
                fresh = self._manager(spec)
                if fresh.waiting and manager is not None and manager.ready:
                    if self.awaited.get(spec.name) != spec:
                        log.warning("%s; until then the old config keeps serving", fresh.error)
                    self.awaited[spec.name] = spec
                    fresh.close()
                    fresh = manager
                elif fresh.waiting:
                    log.warning("%s", fresh.error)
                elif fresh.error and not (manager and manager.ready):
                    log.error("model %r failed to load: %s", spec.name, fresh.error)
                elif fresh.error and manager is not None:  # and so ready (else the branch above)
                    log.error("model %r: its new config does not load, the old one keeps serving: %s",
                              spec.name, fresh.error)
                    fresh.close()
                    fresh, self.rejected[spec.name] = manager, spec
                manager = fresh
            new[spec.name] = manager
        self.managers = new
        self.awaited = {name: spec for name, spec in self.awaited.items() if name in new and new[name].spec != spec}
        for name, manager in old.items():
            if new.get(name) is not manager:
                log.info("model %r %s", name, "replaced" if name in new else "removed")
                manager.close()

    def _manager(self, spec: ModelSpec) -> ModelManager:
        """A ModelManager of `spec`, loaded by `load` (Models.static has none, and no spec to load)."""
        assert self.load is not None, "Models.static loads no model"
        # MODEL_CONFIG_FILE's models may wait for their first version, as TF Serving's; MODEL_DIR's must be there.
        return ModelManager(spec, self.load, wait=bool(self.config_file))

    def _start_polling(self) -> None:
        """One daemon thread: versions every poll_seconds, the config file every config_poll_seconds (0: never)."""
        tasks = [(seconds, job) for seconds, job in (
            (self.poll_seconds, self.poll_versions),
            (self.config_poll_seconds, self.reload_config if self.config_file else None)) if seconds > 0 and job]
        if not tasks:
            return
        due = [time.monotonic() + seconds for seconds, _ in tasks]

        def loop() -> None:
            while True:
                time.sleep(max(0.0, min(due) - time.monotonic()))
                for i, (seconds, job) in enumerate(tasks):
                    if time.monotonic() >= due[i]:
                        try:
                            job()
                        except Exception:  # never let the poller die: log and poll again
                            log.exception("model poll failed")
                        due[i] = time.monotonic() + seconds

        threading.Thread(target=loop, name="model-poller", daemon=True).start()


def load_models(model: ModelSettings, engine: EngineSettings, start: bool = True) -> Models:
    """The Models of these settings, loaded and polled, each version an engine of `engine`'s kind; with
    start=False not loaded yet (the gRPC server listens first, answering NOT_SERVING, then calls start()).

    Shared by the HTTP app, the gRPC server and the Kafka consumer, so all load and version alike.
    """
    overrides = model.graph_overrides()
    models = Models(lambda folder: load(folder, engine, overrides), model_config.from_settings(model),
                    model.config_file, model.poll_seconds, model.config_poll_seconds)
    if start:
        models.start()
    return models
