"""Dynamic batching: concurrent requests of one worker share one session.run.

The first waiting request opens a batch; others join it until it holds
BATCH_MAX_SIZE images or BATCH_TIMEOUT_MS has passed, then one run serves them
all and each gets exactly its own rows. Off by default (BATCH_MAX_SIZE=0). With
BATCH_TIMEOUT_MS=0 it only gathers requests that queued while the session was
busy, so a lone request is never delayed.
Up to `runners` batches are in the session at once (the worker's inter-op
threads, as for unbatched requests): one run alone leaves cores idle between
its ops, so one batch at a time would lose to plain concurrent runs.
It pays off where a big run costs little more than a small one (a GPU); on this
2-core CPU it won some benchmark runs and lost others (docs/benchmark-history.md).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from classify_server.engines.base import Preprocessed

# One caller's inputs and where its rows go.
_Request = tuple[list[Preprocessed], Future[np.ndarray]]


class Batcher:
    def __init__(self, run: Callable[[list[Preprocessed]], np.ndarray], max_size: int, timeout_ms: float,
                 runners: int = 1) -> None:
        self.run, self.max_size, self.timeout = run, max_size, timeout_ms / 1000.0
        self.queue: queue.Queue[_Request | None] = queue.Queue()  # None: closing
        self.threads = [threading.Thread(target=self._loop, name=f"batcher-{i}", daemon=True)
                        for i in range(max(1, runners))]
        for thread in self.threads:
            thread.start()

    def predict(self, inputs: list[Preprocessed]) -> np.ndarray:
        """Probabilities for `inputs` (a list), run in a batch with other callers' inputs."""
        future: Future[np.ndarray] = Future()
        self.queue.put((inputs, future))
        return future.result()

    def close(self) -> None:
        self.queue.put(None)

    def _collect(self, first: _Request) -> list[_Request]:
        """`first` and the requests that join it: all those already waiting (they queued
        while the last batch ran, so they cost no wait), then new ones until the timeout."""
        batch, size = [first], len(first[0])
        deadline = time.monotonic() + self.timeout
        while size < self.max_size:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # closing: finish this batch, then stop
                self.queue.put(None)
                break
            batch.append(item)
            size += len(item[0])
        return batch

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                self.queue.put(None)  # for the other runners
                return
            batch = self._collect(first)
            try:
                outputs = self.run([x for inputs, _ in batch for x in inputs])
            except Exception as exc:  # every caller of the batch gets the error
                for _, future in batch:
                    future.set_exception(exc)
                continue
            start = 0
            for inputs, future in batch:
                future.set_result(outputs[start:start + len(inputs)])
                start += len(inputs)
