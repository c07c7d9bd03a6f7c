"""One model's versions and their hot reload, as TensorFlow Serving does them.

A model's base path is either one model folder (graph.pb, labels.txt, model.json: served as
version 1) or a base folder of numbered versions, TF Serving's layout: BASE/1/, BASE/2/...
(classify_contract.model_folder defines both). Its version policy (model_config.ModelSpec: the newest by
default, or the latest N, all, specific ones) says which versions are loaded; version labels
name some of them. On each poll a newly wanted version is loaded beside those served and warmed
up, then swapped in; versions no longer wanted are retired: requests in flight finish on them,
and each is closed after the last. A version that fails to load is reported in its status, never
retried, and the versions served keep serving; the last one served is never dropped for nothing.

A model that may wait (one of MODEL_CONFIG_FILE's) and whose base path holds no version yet, or does
not exist yet, waits for one, as TF Serving's file-system source keeps looking: its status is one entry,
version 0 in state START, saying so; each poll looks again and loads the first version that appears.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from classify_contract import model_folder
from classify_server.engines import Engine, ModelLoadError

if TYPE_CHECKING:
    from classify_server.core.model_config import ModelSpec

log = logging.getLogger("classify_server")


class Servable:
    """One loaded version of a model and the number of requests using it."""

    def __init__(self, model: str, version: int, engine: Engine) -> None:
        self.model, self.version, self.engine = model, version, engine
        self.users, self.retired = 0, False


class ModelManager:
    def __init__(self, spec: ModelSpec, load: Callable[[str], Engine], wait: bool = False) -> None:
        """`spec` is a model_config.ModelSpec; `load(folder)` returns a warmed-up engine or raises
        ModelLoadError. Loads what the policy wants; `error` says why when nothing loaded. With `wait`
        a base path that holds no version yet is `waiting` for one rather than an error."""
        self.spec, self.load, self.wait = spec, load, wait
        self.lock = threading.Lock()
        self.status: dict[int, tuple[str, str]] = {}  # version -> (state, error message), TF Serving's states
        self.served: dict[int, Servable] = {}  # version -> Servable
        self.versioned = model_folder.is_base(spec.base_path)
        self.error = ""
        self.sync()

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def static(cls, engine: Engine, name: str = "model") -> ModelManager:
        """A manager around one already loaded engine (no folder, no polling)."""
        from classify_server.core.model_config import ModelSpec
        manager = cls.__new__(cls)
        manager.spec, manager.versioned, manager.error = ModelSpec(name, engine.model_dir), False, ""
        manager.wait = False
        manager.lock, manager.served = threading.Lock(), {1: Servable(name, 1, engine)}
        manager.status = {1: ("AVAILABLE", "")}
        return manager

    @property
    def ready(self) -> bool:
        """Whether a version is loaded and warmed up."""
        latest = self.latest
        return latest is not None and latest.engine.ready

    @property
    def waiting(self) -> bool:
        """Whether the model waits for its first version: it may, none is served and none was tried."""
        return self.wait and not self.served and not self.status

    @property
    def failed(self) -> bool:
        """Whether versions were tried and every one failed to load (`error` says why): none is served, and
        none is loading or awaited, unlike a model that waits for its first version."""
        with self.lock:
            return not self.served and bool(self.status) and all(self._failed(v) for v in self.status)

    @property
    def latest(self) -> Servable | None:
        """The newest version served (None when none is)."""
        with self.lock:
            return self.served[max(self.served)] if self.served else None

    def label_version(self, label: str) -> int | None:
        """The version a label names, or None when it names none."""
        return self.spec.labels.get(label)

    def sync(self) -> None:
        """Load the versions the policy wants that are not served; retire those it no longer wants."""
        try:
            self._sync()
        finally:
            if not self.served:  # what the core answers for the model meanwhile
                self.error = "; ".join(e for _, e in self.status.values() if e) or self._nothing()

    def _nothing(self) -> str:
        """Why nothing is served when nothing failed."""
        base = self.spec.base_path
        if not self.wait:
            return f"model {self.name!r}: no version in {base} that its version policy serves"
        where = f"{base} does not exist yet" if not os.path.isdir(base) else \
            f"no version in {base} yet that its version policy serves"
        inside = model_folder.models_inside(base)
        hint = f" (did you mean base_path: {inside[0]}?)" if inside else ""
        return f"model {self.name!r} is not available yet: waiting for its first version, {where}{hint}"

    def _sync(self) -> None:
        base = self.spec.base_path
        if not self.versioned and not self.served and not self.status:
            # Nothing tried yet (a model that waits): its first version, or the model itself, may be there now.
            self.versioned = model_folder.is_base(base)
        if not self.versioned:
            if not self.served and not self.status and (not self.wait or model_folder.is_model(base)):
                self._load(1, base)
            return
        available = model_folder.versions(base)
        while True:  # a version that fails leaves its place to the next one the policy wants
            wanted = self.spec.wanted([v for v in available if not self._failed(v)])
            todo = [v for v in reversed(wanted) if v not in self.served]
            if not todo:
                break
            for version in todo:
                if not self._load(version, os.path.join(base, str(version))):
                    break
        with self.lock:
            if not any(v in self.served for v in wanted):
                return  # nothing wanted is served: keep what is, rather than serve nothing
            retired = [self.served.pop(v) for v in list(self.served) if v not in wanted]
        for servable in retired:
            self._retire(servable)

    def _failed(self, version: int) -> bool:
        state, error = self.status.get(version, ("", ""))
        return state == "END" and bool(error)

    def _load(self, version: int, folder: str) -> bool:
        with self.lock:
            self.status[version] = ("LOADING", "")
        started = time.monotonic()
        try:
            engine = self.load(folder)
        except ModelLoadError as exc:
            with self.lock:
                self.status[version] = ("END", str(exc))
            if self.served:  # else the caller reports the model's `error`
                log.error("model %r version %s failed to load, still serving %s: %s", self.name, version,
                          ", ".join(map(str, sorted(self.served))), exc)
            return False
        with self.lock:
            self.served[version] = Servable(self.name, version, engine)
            self.error = ""
            self.status[version] = ("AVAILABLE", "")
        log.info("serving model %r version %s from %s: %s engine, %d labels, loaded and warmed up in %.1f s",
                 self.name, version, folder, engine.metadata().get("engine", "?"), len(engine.labels),
                 time.monotonic() - started)
        return True

    def _retire(self, servable: Servable) -> None:
        with self.lock:
            servable.retired = True
            if self.status.get(servable.version, ("", ""))[0] == "AVAILABLE":
                self.status[servable.version] = ("END", "")
            close_now = servable.users == 0
        if close_now:
            servable.engine.close()
        log.info("model %r version %s retired", self.name, servable.version)

    def close(self) -> None:
        """Retire every version (the model is no longer configured): each closes after its last request."""
        with self.lock:
            retired, self.served = list(self.served.values()), {}
        for servable in retired:
            self._retire(servable)

    @contextmanager
    def acquire(self, version: int | None = None) -> Iterator[Servable | None]:
        """The servable of `version` (None: the newest served), held for one request, or None when that
        version is not served; its session stays open until released."""
        with self.lock:
            if version is None:
                servable = self.served[max(self.served)] if self.served else None
            else:
                servable = self.served.get(version)
            if servable is not None:
                servable.users += 1
        if servable is None:
            yield None
            return
        try:
            yield servable
        finally:
            with self.lock:
                servable.users -= 1
                close = servable.retired and servable.users == 0
            if close:
                servable.engine.close()

    def version_status(self, version: int | None = None) -> list[dict[str, object]]:
        """TF Serving's model_version_status list, newest first."""
        with self.lock:
            items = sorted(self.status.items(), reverse=True)
        if not items and self.waiting and version in (None, 0):
            # TF Serving's START: known, nothing done yet; version 0 stands for the one awaited.
            return [{"version": "0", "state": "START", "status": {"error_code": "OK", "error_message": self.error}}]
        return [{"version": str(v), "state": state,
                 "status": {"error_code": "UNKNOWN" if error else "OK", "error_message": error}}
                for v, (state, error) in items if version is None or v == version]
