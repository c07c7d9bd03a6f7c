"""Slow clients and a crowd against the default server (classify_server.http_server.worker): what an attacker with a
laptop, or a crowd, does to `gunicorn classify_server:app`, on 127.0.0.1, bounded in count and time. The
attacks are bench/abuse.py's (which also runs them against nginx, docs/reliability.md); their figures are
printed as `FIGURE ...` lines."""
import json
import threading
import time

import pytest
import requests
from support.images import shape_image
from support.processes import Server

import bench.abuse as abuse

GOOD = shape_image("red_circle", 1)
HEADER_TIMEOUT, RATE_GRACE, MAX_QUEUE, THREADS = 10, 5, 64, 4  # the defaults (docs/settings.md)


@pytest.fixture(scope="module")
def default_server(trained_model, tmp_path_factory):
    """gunicorn classify_server:app with every setting at its default (one worker), over the shared model."""
    s = Server({"MODEL_DIR": trained_model}, log_path=tmp_path_factory.mktemp("overload") / "gunicorn.log")
    yield s.wait_ready(timeout=180)
    s.stop()


def metric(url, name):
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def workers(server):
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        return f.read().split()


def test_64_slow_clients_do_not_stop_a_well_behaved_one(default_server):
    """Issue 18: 32 connections dripping their headers (a line every 2 s) and 32 dripping a promised 1 MB
    body (a byte every 2 s) while one client sends requests for 20 s: at least 95 % of them answered 200,
    none slower than 2 s; the server answers each slow connection 408 and closes it, within HEADER_TIMEOUT
    for headers and once the body's grace period is over (BODY_MIN_RATE) for bodies."""
    url = default_server.url
    def cut(part):
        return metric(url, f'classify_slow_clients_cut_total{{part="{part}"}}')

    cut_before = {part: cut(part) for part in ("headers", "body")}
    answers, headers, bodies = abuse.slow_clients(url, GOOD, 32, 32, seconds=20)
    print("FIGURE slow_clients", json.dumps(abuse.slow_figures(answers, headers, bodies)))
    assert sum(status == 200 for status, _ in answers) >= 0.95 * len(answers), answers
    assert max(seconds for _, seconds in answers) <= 2.0, sorted(answers, key=lambda a: a[1])[-5:]
    for d in headers:
        assert d.status == 408 and b"HEADER_TIMEOUT" in d.received, d.received
        assert HEADER_TIMEOUT - 0.5 <= d.closed_after <= HEADER_TIMEOUT + 2, d.closed_after
    for d in bodies:
        assert d.status == 408 and b"BODY_MIN_RATE" in d.received, d.received
        assert RATE_GRACE - 0.5 <= d.closed_after <= RATE_GRACE + 2, d.closed_after
    for part, drippers in (("headers", headers), ("body", bodies)):
        assert cut(part) - cut_before[part] == len(drippers)


def test_200_clients_at_once_get_200_or_503_with_retry_after(default_server):
    """Issue 18: 200 clients at once for 10 s, each sending its next request as soon as it has an answer:
    every answer is 200 or 503 with Retry-After, nothing is reset, no request waits longer than the queue
    bound (MAX_QUEUE requests, at the rate the server answers them) plus one inference; health checks stay
    fast and ready throughout (shedding is not unreadiness), and the worker lives on."""
    url = default_server.url
    pids = workers(default_server)
    shed_before = metric(url, "classify_shed_total")
    probes = []

    def probe():
        for _ in range(8):
            time.sleep(1)
            start = time.monotonic()
            status = requests.get(url + "/readyz", timeout=10).status_code
            probes.append((status, time.monotonic() - start))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    figures = abuse.crowd_figures(*abuse.crowd(url, GOOD, clients=200, seconds=10))
    prober.join(30)
    bound = (MAX_QUEUE + THREADS) / figures["200_per_s"]  # the queue's wait at the served rate, plus the inference
    print("FIGURE crowd", json.dumps(dict(figures, bound_s=round(bound, 3), readyz=probes)))
    assert figures["failed"] == [], figures
    assert figures["200"] and figures["503"], figures  # overloaded, and still serving
    assert figures["503_without_retry_after"] == 0
    # 2x: the crowd's 200 threads share the 2 cores with the server, and a whole suite's run is slower than this
    # test alone (CI: 1.44 s against a 1.42 s bound at 1.5x); an unbounded queue would wait many seconds.
    assert figures["200_max_s"] <= 2 * bound + 0.5, (figures, bound)
    assert figures["503_p99_s"] < 0.5, figures  # at once
    assert metric(url, "classify_shed_total") - shed_before == figures["503"]
    assert len(probes) == 8 and all(status == 200 and t < 1.0 for status, t in probes), probes
    assert workers(default_server) == pids
    assert requests.post(url + "/", files={"data": ("x.jpg", GOOD)}, timeout=10).status_code == 200
    assert metric(url, "classify_queue_depth") == 0
