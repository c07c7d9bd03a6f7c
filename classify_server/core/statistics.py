"""Per model and version statistics of the requests the core runs, as Triton's statistics extension
reports them: counts and cumulative durations of successes and failures, and of the phases of a success.

They are Prometheus counters labelled by model and version, so that each gunicorn worker counts for
itself and `read` sums them over all workers the way GET /metrics does (prometheus_client's
multiprocess mode over PROMETHEUS_MULTIPROC_DIR, set up by gunicorn_config; one process: its own
registry). They show at GET /metrics too.

    success, fail     requests that reached a served version: answered, or refused (a bad image, over a limit)
                      or failed there; their whole time in the core
    queue             waiting to hold the version (the HTTP worker's MAX_QUEUE wait comes before the core)
    compute_input     decoding the images with the shared preprocessing
    compute_infer     the engine's run (its batching queue included)
    compute_output    building the answer's scores (adapters format them afterwards)
    inference_count   images run; execution_count: engine runs; last_inference: ms since the epoch
    batch_stats       per batch size (the images of one engine run the core made), the runs and the
                      cumulative time of their compute_input, compute_infer and compute_output
                      (with BATCH_MAX_SIZE on, the engine may join several such runs into one session run)
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Metric, multiprocess

OUTCOMES = ("success", "fail")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")

REQUESTS = Counter("classify_model_requests", "requests the core ran or refused, by model, version and outcome",
                   ["model", "version", "outcome"])
REQUEST_SECONDS = Counter("classify_model_request_seconds", "cumulative time of those requests in the core",
                          ["model", "version", "outcome"])
PHASE_SECONDS = Counter("classify_model_phase_seconds", "cumulative time of the phases of successful requests",
                        ["model", "version", "phase"])
INFERENCES = Counter("classify_model_inferences", "images run by the engine", ["model", "version"])
EXECUTIONS = Counter("classify_model_executions", "engine runs (one per batch of a request)", ["model", "version"])
BATCHES = Counter("classify_model_batches", "engine runs by batch size (images)", ["model", "version", "batch_size"])
BATCH_SECONDS = Counter("classify_model_batch_phase_seconds", "cumulative time of the compute phases of those runs",
                        ["model", "version", "batch_size", "phase"])
LAST_INFERENCE = Gauge("classify_model_last_inference_ms", "when the model last answered or refused a request, "
                       "ms since the epoch", ["model", "version"], multiprocess_mode="max")
_METRICS = (REQUESTS, REQUEST_SECONDS, PHASE_SECONDS, INFERENCES, EXECUTIONS, BATCHES, BATCH_SECONDS, LAST_INFERENCE)
COMPUTE = PHASES[1:]  # the phases of a run, as Triton's batch_stats has them


@dataclass
class Timer:
    """The phases of one request, timed as the core goes (perf_counter seconds)."""
    start: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    _mark: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._mark = self.start

    def phase(self, name: str) -> float:
        """End phase `name` now; its seconds."""
        now = time.perf_counter()
        seconds = self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now
        return seconds


def record(model: str, version: int, timer: Timer, ok: bool, images: int = 0, executions: int = 0,
           requests: int = 1) -> None:
    """Count `requests` of one outcome, ended now, run together: each took all of `timer`'s time, as
    Triton counts each request of a batch; and `executions` engine runs of `images` images in all (one
    run: batch_stats counts it under its size, its phases once)."""
    if requests < 1:
        return
    labels = (model, str(version))
    outcome = "success" if ok else "fail"
    REQUESTS.labels(*labels, outcome).inc(requests)
    REQUEST_SECONDS.labels(*labels, outcome).inc((time.perf_counter() - timer.start) * requests)
    if ok:
        for phase in PHASES:
            PHASE_SECONDS.labels(*labels, phase).inc(timer.phases.get(phase, 0.0) * requests)
    if images:
        INFERENCES.labels(*labels).inc(images)
    if executions:
        EXECUTIONS.labels(*labels).inc(executions)
        size = str(images // executions)
        BATCHES.labels(*labels, size).inc(executions)
        for phase in COMPUTE:
            BATCH_SECONDS.labels(*labels, size, phase).inc(timer.phases.get(phase, 0.0))
    LAST_INFERENCE.labels(*labels).set(time.time() * 1000)


def _families() -> Iterable[Metric]:
    """Every worker's samples, summed (multiprocess), or this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return multiprocess.MultiProcessCollector(None).collect()
    return [family for metric in _METRICS for family in metric.collect()]


def read(wanted: Iterable[tuple[str, int]]) -> list[dict[str, object]]:
    """Triton's ModelStatistics, as JSON, of each (model, version) in `wanted`: zeros for what never ran."""
    totals = {(model, str(version)): _Totals() for model, version in wanted}
    for family in _families():
        for sample in family.samples:
            found = totals.get((sample.labels.get("model", ""), sample.labels.get("version", "")))
            if found is not None:
                found.add(sample.name, sample.labels, sample.value)
    return [found.as_json(model, version) for (model, version), found in totals.items()]


@dataclass
class _Totals:
    """One model version's sums, as they are read."""
    count: dict[str, int] = field(default_factory=dict)
    ns: dict[str, int] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0
    batches: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # size -> phase -> [count, ns]

    def _batch(self, labels: dict[str, str]) -> dict[str, list[int]]:
        return self.batches.setdefault(int(labels["batch_size"]), {phase: [0, 0] for phase in COMPUTE})

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        if name == "classify_model_requests_total":
            # Each phase is timed once per successful request.
            for key in (labels["outcome"], *(PHASES if labels["outcome"] == "success" else ())):
                self.count[key] = self.count.get(key, 0) + round(value)
        elif name in ("classify_model_request_seconds_total", "classify_model_phase_seconds_total"):
            key = labels.get("outcome") or labels["phase"]
            self.ns[key] = self.ns.get(key, 0) + round(value * 1e9)
        elif name == "classify_model_inferences_total":
            self.inference_count += round(value)
        elif name == "classify_model_executions_total":
            self.execution_count += round(value)
        elif name == "classify_model_batches_total":
            for counted in self._batch(labels).values():  # each phase is timed once per run
                counted[0] += round(value)
        elif name == "classify_model_batch_phase_seconds_total":
            self._batch(labels)[labels["phase"]][1] += round(value * 1e9)
        elif name == "classify_model_last_inference_ms":
            self.last_inference = max(self.last_inference, round(value))

    def as_json(self, model: str, version: str) -> dict[str, object]:
        keys = (*OUTCOMES, *PHASES, "cache_hit", "cache_miss")  # no response cache: always zero
        return {"name": model, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {key: {"count": self.count.get(key, 0), "ns": self.ns.get(key, 0)} for key in keys},
                "batch_stats": [{"batch_size": size, **{phase: {"count": count, "ns": ns}
                                                        for phase, (count, ns) in phases.items()}}
                                for size, phases in sorted(self.batches.items())]}
