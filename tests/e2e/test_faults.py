"""Faults under load: a worker killed, the master stopped, the model files broken while serving, slow
clients, retrain killed midway.

Each test drives a real gunicorn on 127.0.0.1 (or `python -m retrain`) with client threads; every loop
is bounded in count and in time. The figures (failed requests, recovery time, ...) are printed as
`FIGURE ...` lines: `python -m pytest tests/e2e/test_faults.py -s | grep FIGURE`, and docs/reliability.md
collects them. Other work on the machine slows everything down, so time limits are generous.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from support import ROOT
from support.clients import assert_same_answer, classify
from support.images import make_image_dir, shape_image
from support.models import TEST_WEIGHTS, write_sleepy_model
from support.processes import Server

GOOD = shape_image("red_circle", 1)
TIMEOUT = 30  # seconds, for one request under load
BODY_TIMEOUT = 5  # seconds, BODY_TIMEOUT of the slow-client server


def figure(name, **values):
    print(f"FIGURE {name} " + json.dumps(values), flush=True)


def wait_for(condition, timeout, interval=0.1, what="condition"):
    """Poll until condition() is truthy (returns it), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s")


def worker_pids(server):
    try:
        with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
            return sorted(int(pid) for pid in f.read().split())
    except FileNotFoundError:
        return []


def connections_of(pid, port):
    """How many established TCP connections to `port` the process `pid` holds (accepted by it)."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
    except FileNotFoundError:
        return 0
    return count


def outcome_of(exc):
    """A short name for why a request failed: the innermost cause requests wraps."""
    text = repr(exc)
    if "Connection refused" in text:
        return "ConnectionRefusedError"
    for name in ("ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected", "BrokenPipeError",
                 "ReadTimeout", "ConnectTimeout", "IncompleteRead"):
        if name in text:
            return name
    return type(exc).__name__


class Load:
    """`clients` threads POSTing GOOD until stopped, each request recorded as (start, end, outcome), the
    outcome being the status (200 only with the reference answer) or why it failed. Bounded: at most
    `seconds` seconds and `max_requests` requests. keepalive=True: one kept-alive connection per client
    (as browsers and SDKs do); False: a new connection per request."""

    def __init__(self, url, reference, clients=8, keepalive=False, seconds=150, max_requests=50_000):
        self.url, self.reference, self.clients, self.keepalive = url, reference, clients, keepalive
        self.seconds, self.max_requests = seconds, max_requests
        self.records, self.lock, self.stopping = [], threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(TIMEOUT + 5)

    def _client(self):
        session = requests.Session() if self.keepalive else requests
        deadline = time.monotonic() + self.seconds
        while not self.stopping.is_set() and time.monotonic() < deadline and len(self.records) < self.max_requests:
            start = time.monotonic()
            try:
                response = session.post(self.url + "/", files={"data": ("x.jpg", GOOD)}, timeout=TIMEOUT)
                outcome = response.status_code
                if outcome == 200:
                    try:
                        assert_same_answer(response.json(), self.reference, tol=1e-5)
                    except AssertionError:
                        outcome = "wrong answer"
            except requests.RequestException as exc:
                outcome = outcome_of(exc)
            with self.lock:
                self.records.append((start, time.monotonic(), outcome))
            if outcome != 200:
                time.sleep(0.05)  # do not spin on a refused connection

    def failures(self):
        return [r for r in self.records if r[2] != 200]

    def rate(self, since, until):
        done = [r for r in self.records if since <= r[1] < until and r[2] == 200]
        return len(done) / max(until - since, 1e-9)


def metrics_dir(folder):
    """A PROMETHEUS_MULTIPROC_DIR of the test's own (else gunicorn.conf.py makes one in /tmp per server, left
    behind)."""
    os.makedirs(folder, exist_ok=True)
    return str(folder)


def percentile(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


# --- servers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(trained_model, tmp_path_factory):
    """'pair': 2 workers over a copy of the model (broken on purpose later); 'single': 1 worker of 4
    threads with BODY_TIMEOUT=5, for the slow clients and SIGTERM. Started together to share the wait."""
    root = tmp_path_factory.mktemp("faults")
    model = root / "model"
    shutil.copytree(trained_model, model)
    started = {"pair": Server({"MODEL_DIR": str(model), "PROMETHEUS_MULTIPROC_DIR": metrics_dir(root / "pair")},
                              workers=2, log_path=root / "pair.log"),
               "single": Server({"MODEL_DIR": trained_model, "THREADS": "4", "BODY_TIMEOUT": str(BODY_TIMEOUT),
                                 "GRACEFUL_TIMEOUT": "20", "PROMETHEUS_MULTIPROC_DIR": metrics_dir(root / "single")},
                                workers=1, log_path=root / "single.log")}
    try:
        for s in started.values():
            s.wait_ready(timeout=180)
        started["model"] = model
        yield started
    finally:
        for name in ("pair", "single"):
            started[name].stop()


@pytest.fixture(scope="module")
def reference(servers):
    return classify(servers["pair"].url, GOOD)


# --- kill -9 of one worker -------------------------------------------------------------------------

def test_kill_9_one_worker_under_load(servers, reference):
    s = servers["pair"]
    before = worker_pids(s)
    assert len(before) == 2
    with Load(s.url, reference, clients=8) as load:
        time.sleep(5)  # steady state
        victim = before[0]
        os.kill(victim, signal.SIGSTOP)  # frozen, it accepts no more connections while they are counted
        in_flight = connections_of(victim, s.port)  # connections the victim holds: requests in flight on it
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replacement = wait_for(lambda: [p for p in worker_pids(s) if p not in before], 30,
                               what="a replacement worker")[0]
        respawned = time.monotonic()
        # A worker accepts connections only once its model is loaded: its first accepted one is the
        # moment full capacity is back.
        wait_for(lambda: connections_of(replacement, s.port), 150, interval=0.05, what="the replacement serving")
        recovered = time.monotonic()
        time.sleep(5)
    end = load.records[-1][1]
    failures = load.failures()
    latencies = [r[1] - r[0] for r in load.records if r[2] == 200]
    figure("kill9", requests=len(load.records), failed=len(failures), in_flight_on_victim=in_flight,
           failure_kinds=sorted({str(r[2]) for r in failures}), respawn_s=round(respawned - killed, 2),
           full_capacity_s=round(recovered - killed, 2),
           rate_before=round(load.rate(killed - 5, killed), 1), rate_degraded=round(load.rate(killed, recovered), 1),
           rate_after=round(load.rate(recovered, end), 1), p99_s=round(percentile(latencies, 99), 3))
    # Only requests in flight on the killed worker failed: all started before the kill, no more of them
    # than it had connections.
    assert all(r[0] < killed for r in failures), failures
    assert len(failures) <= in_flight, (failures, in_flight)
    assert all(r[2] == 200 for r in load.records if r[0] > killed), "a request after the kill failed"
    assert recovered - killed < 150
    assert sorted(worker_pids(s)) == sorted([before[1], replacement])


# --- the model files deleted or overwritten while serving ------------------------------------------

def test_model_files_deleted_then_garbage_the_loaded_model_keeps_answering(servers, reference):
    s, model = servers["pair"], servers["model"]
    workers = worker_pids(s)
    with Load(s.url, reference, clients=4, keepalive=True) as load:
        time.sleep(2)
        for name in os.listdir(model):
            shutil.rmtree(model / name) if (model / name).is_dir() else os.unlink(model / name)
        time.sleep(3)
        for name in ("graph.pb", "labels.txt", "model.json"):
            (model / name).write_bytes(os.urandom(4096))
        time.sleep(3)
        probes = [requests.get(s.url + path, timeout=TIMEOUT).status_code
                  for path in ("/readyz", "/healthz", "/v1/models/model/metadata")]
    figure("model_files_broken", requests=len(load.records), failed=len(load.failures()))
    assert len(load.records) > 10 and load.failures() == []
    assert probes == [200, 200, 200]
    assert_same_answer(classify(s.url, GOOD), reference)
    assert worker_pids(s) == workers


def test_a_worker_replaced_after_the_model_files_broke_does_not_stop_the_server(servers, reference):
    s, model = servers["pair"], servers["model"]
    for name in ("graph.pb", "labels.txt", "model.json"):
        (model / name).write_bytes(os.urandom(4096))
    before = worker_pids(s)
    os.kill(before[0], signal.SIGKILL)
    # The replacement cannot load the broken model; the other worker must go on answering meanwhile.
    deadline = time.monotonic() + 60
    answered = 0
    while time.monotonic() < deadline:
        try:
            assert_same_answer(classify(s.url, GOOD), reference)
            answered += 1
        except (requests.RequestException, AssertionError) as exc:
            figure("replaced_worker_after_broken_model", answered=answered, error=outcome_of(exc),
                   server_exited=s.process.poll())
            raise AssertionError(f"the server stopped answering: {exc!r}\n{s.output()[-2000:]}") from None
        time.sleep(0.5)
    assert s.process.poll() is None


# --- slow clients ----------------------------------------------------------------------------------

def multipart_body(data, filename="x.jpg"):
    return (b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"%s\"\r\n\r\n" % filename.encode()
            + data + b"\r\n--b--\r\n")


def read_answer(sock, timeout=10):
    """(status, JSON body or the raw text) of the HTTP answer arriving on `sock`, or (why it failed, None)."""
    import http.client
    sock.settimeout(timeout)
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, None
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.decode(errors="replace")


def drip(port, body, piece, interval, seconds, head_extra=b""):
    """POST `body` a `piece` of bytes every `interval` seconds (100 bytes at once first), for at most `seconds`,
    and stop sending as soon as an answer arrives (a client that goes on sending to a server that has answered
    and closed gets a reset that can discard the answer). Returns (status or failure, JSON body, seconds)."""
    import select
    head = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (len(body), head_extra))
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(head + body[:100])
            sent = 100
            while sent < len(body) and time.monotonic() - start < seconds:
                if select.select([sock], [], [], interval)[0]:
                    break  # answered before the whole body was sent
                sock.sendall(body[sent:sent + piece])
                sent += piece
        except OSError:
            pass  # reset while sending: whatever answer arrived first is still read below
        status, answer = read_answer(sock)
    return status, answer, time.monotonic() - start


def trickle(port, seconds, results, index):
    """Send headers and start a multipart body, then one byte a second for `seconds` (bounded)."""
    results[index] = drip(port, multipart_body(GOOD), piece=1, interval=1.0, seconds=seconds)


def assert_body_timeout_answer(status, answer):
    """docs/operations.md: a body that does not arrive within BODY_TIMEOUT is answered 408, with the JSON error."""
    assert status == 408, (status, answer)
    assert isinstance(answer, dict) and list(answer) == ["error"] and "BODY_TIMEOUT" in answer["error"], answer


def test_slow_clients_do_not_block_others_beyond_body_timeout(servers, reference):
    """As many clients trickling their bodies as the worker has threads, BODY_TIMEOUT=5: they hold no thread
    (normal requests are answered meanwhile), and each is cut at BODY_TIMEOUT with a 408 (docs/operations.md), not a
    reset or a generic 400. tests/e2e/test_overload.py has the 64-client attack."""
    s = servers["single"]
    threads = 4
    hold = 4 * BODY_TIMEOUT
    results = [None] * threads
    slow = [threading.Thread(target=trickle, args=(s.port, hold, results, i), daemon=True) for i in range(threads)]
    for thread in slow:
        thread.start()
    time.sleep(1.5)  # all four are being read by the worker's four threads
    waits = []
    for _ in range(3):
        start = time.monotonic()
        assert_same_answer(classify(s.url, GOOD), reference)
        waits.append(time.monotonic() - start)
    for thread in slow:
        thread.join(hold + 30)
    figure("slow_clients", slow_clients=threads, threads=threads, body_timeout_s=BODY_TIMEOUT,
           trickle_s=hold, normal_request_waits_s=[round(w, 2) for w in waits],
           slow_client_outcomes=sorted({str(r[0]) for r in results}),
           slow_client_held_s=round(max(r[2] for r in results), 1))
    assert max(waits) < BODY_TIMEOUT + 10, waits  # generous: the machine is shared
    assert all(r[2] < hold for r in results), results  # cut off before they finished trickling
    assert all(r[2] >= BODY_TIMEOUT - 0.5 for r in results), results  # but not before BODY_TIMEOUT
    for status, answer, _ in results:
        assert_body_timeout_answer(status, answer)


def conf_timeout(tmp_path, **env):
    """gunicorn.conf.py's `timeout`, as gunicorn reads the file, under `env` alone (in a subprocess: the
    file sets environment variables and makes a metrics folder)."""
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['timeout'])"
    base = {k: v for k, v in os.environ.items() if k not in ("TIMEOUT", "BODY_TIMEOUT")}
    base["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "gunicorn.conf.py")], cwd=ROOT,
                            env=dict(base, **env), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_body_timeout_defaults_to_timeout(tmp_path):
    """docs/settings.md: BODY_TIMEOUT's default is TIMEOUT, whose default is 60 s (gunicorn's worker timeout too);
    0 is a value of its own (no limit)."""
    from classify_server import settings
    assert conf_timeout(tmp_path) == 60 and conf_timeout(tmp_path, TIMEOUT="7") == 7
    assert settings.from_env({}).http.body_timeout == 60
    assert settings.from_env({"TIMEOUT": "7"}).http.body_timeout == 7
    assert settings.from_env({"TIMEOUT": "7", "BODY_TIMEOUT": ""}).http.body_timeout == 7
    assert settings.from_env({"TIMEOUT": "7", "BODY_TIMEOUT": "2.5"}).http.body_timeout == 2.5
    assert settings.from_env({"TIMEOUT": "7", "BODY_TIMEOUT": "0"}).http.body_timeout == 0


DRIP_TIMEOUT = 1  # TIMEOUT of the two servers below, so BODY_TIMEOUT's default: 1 s
DRIP_SECONDS = 3  # how long the slow body takes


@pytest.fixture(scope="module")
def drip_servers(tmp_path_factory):
    """Two servers over the colour model with TIMEOUT=1, so 1 s for a body by default: 'default' without
    BODY_TIMEOUT, 'off' with BODY_TIMEOUT=0. gunicorn's own worker timeout is set apart (-t 120: a worker
    loading TensorFlow must not be killed after 1 s); the config file's TIMEOUT is what BODY_TIMEOUT takes."""
    from support.models import write_colour_model
    root = tmp_path_factory.mktemp("drip")
    model = write_colour_model(root / "model")
    started = {name: Server(dict({"MODEL_DIR": model, "TIMEOUT": str(DRIP_TIMEOUT),
                                  "PROMETHEUS_MULTIPROC_DIR": metrics_dir(root / name)}, **env),
                            args=("-t", "120"), log_path=root / f"{name}.log")
               for name, env in (("default", {}), ("off", {"BODY_TIMEOUT": "0"}))}
    try:
        for server in started.values():
            server.wait_ready(timeout=180)
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_a_slow_body_is_cut_at_the_default_and_answered_when_body_timeout_is_0(drip_servers):
    """The same body dripped over DRIP_SECONDS to both servers at once: the default (TIMEOUT, 1 s here) cuts
    it with a 408; BODY_TIMEOUT=0 waits for all of it and classifies it."""
    body = multipart_body(GOOD)
    piece = (len(body) - 100) // int(DRIP_SECONDS / 0.25) + 1  # the whole body in DRIP_SECONDS
    reference = classify(drip_servers["off"].url, GOOD)
    results = {}

    def send(name):
        results[name] = drip(drip_servers[name].port, body, piece, 0.25, DRIP_SECONDS + 5)

    clients = [threading.Thread(target=send, args=(name,), daemon=True) for name in drip_servers]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(DRIP_SECONDS + 30)
    figure("body_timeout_default_vs_0", **{name: [r[0], round(r[2], 2)] for name, r in results.items()})
    status, answer, seconds = results["default"]
    assert_body_timeout_answer(status, answer)
    assert DRIP_TIMEOUT - 0.2 <= seconds < DRIP_SECONDS, seconds  # cut at the default, mid-body
    status, answer, seconds = results["off"]
    assert status == 200, (status, answer)
    assert_same_answer(answer, reference)
    assert seconds >= DRIP_SECONDS - 0.5, seconds  # the whole slow body was waited for


# --- SIGTERM to the master -------------------------------------------------------------------------

def probe_connection(port, timeout=5):
    """A new connection, a request on it: 'refused', 'answered <status>', or what went wrong."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = sock.recv(100)
            return "answered " + answer.split(b" ")[1].decode() if answer else "closed without an answer"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__


def listening(port):
    """Whether a socket listens on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as f:
        return any(int(fields[1].split(":")[1], 16) == port and fields[3] == "0A"
                   for fields in (line.split() for line in f.readlines()[1:]))


def slow_upload(port, data, seconds, result):
    """A legitimate but slow upload: `data` sent in 25 pieces over `seconds`; result gets (status, answer, when)."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"big.png\"\r\n\r\n" + data
            + b"\r\n--b--\r\n")
    head = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
    import http.client
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        step = len(body) // 25 + 1
        for i in range(0, len(body), step):
            sock.sendall(body[i:i + step])
            time.sleep(seconds / 25)
        response = http.client.HTTPResponse(sock)
        response.begin()
        result.append((response.status, json.loads(response.read()), time.monotonic()))


# A connection made in the instant the signal is being delivered, before the worker's handler has shut its
# listener, can still be queued and then reset (or answered): new connections are judged from this long after
# SIGTERM. The listener went 9 to 46 ms after the signal with the 8 clients on 2 shared cores, up to 79 ms with
# two busy loops added (load 4.8); the margin is for a busier machine, and still 4 times shorter than the stop
# (~2 s with the slow upload in flight, where gap 3's connections were queued and reset at the end).
REFUSED_AFTER = 0.5
PROBE_INTERVAL = 0.05


@pytest.fixture(scope="module")
def sigterm_run(servers, reference):
    """SIGTERM to the master of the 1-worker server while 8 clients post images and one client uploads a
    1 MB image slowly (2.5 s): that request keeps the worker in its graceful stop, and meanwhile new
    connections are tried every PROBE_INTERVAL s, and the listening socket watched. Returns what happened."""
    from PIL import Image
    from support.images import encode
    s = servers["single"]
    big = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (600, 600, 3), np.uint8)), "PNG")
    big_answer = classify(s.url, big)
    probes, slow, listener_gone = [], [], []

    def watch_listener():  # when the listening socket goes: the moment new connections are refused
        while time.monotonic() - terminated < 10 and listening(s.port):
            time.sleep(0.002)
        listener_gone.append(time.monotonic() - terminated)

    with Load(s.url, reference, clients=8, keepalive=True) as load:
        time.sleep(3)
        uploader = threading.Thread(target=slow_upload, args=(s.port, big, 2.5, slow), daemon=True)
        uploader.start()
        time.sleep(0.5)
        assert listening(s.port)
        terminated = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        watcher = threading.Thread(target=watch_listener, daemon=True)
        watcher.start()
        deadline = time.monotonic() + 40
        while s.process.poll() is None and time.monotonic() < deadline:
            # Short: a connection left queued must not hold up the next probes for the rest of the stop.
            probes.append((time.monotonic() - terminated, probe_connection(s.port, timeout=0.5)))
            time.sleep(PROBE_INTERVAL)
        code = s.process.wait(timeout=30)
        exited = time.monotonic() - terminated
        uploader.join(TIMEOUT)
        watcher.join(15)
    probes.append((time.monotonic() - terminated, probe_connection(s.port)))
    in_flight = [r for r in load.records if r[0] < terminated]
    after = [r for r in load.records if r[0] >= terminated]
    slow_answered = slow[0][2] - terminated if slow else None
    run = dict(code=code, exited=exited, in_flight=in_flight, after=after, probes=probes, slow=slow,
               slow_answered=slow_answered, listener_gone=listener_gone[0] if listener_gone else None,
               big_answer=big_answer, output=s.output())
    count = lambda items: {str(k): sum(1 for i in items if i == k) for k in {str(i) for i in items}}  # noqa: E731
    figure("sigterm", exit_code=code, exit_s=round(exited, 2), in_flight=len(in_flight) + 1,
           failed_in_flight=len([r for r in in_flight if r[2] != 200]) + (0 if slow and slow[0][0] == 200 else 1),
           slow_upload_status=slow[0][0] if slow else None,
           slow_upload_answered_s=slow_answered and round(slow_answered, 2),
           listener_gone_ms=run["listener_gone"] and round(1000 * run["listener_gone"], 1),
           started_after=len(after), after_outcomes=count([str(r[2]) for r in after]),
           probes_during_stop=count([p for t, p in probes[:-1]]),
           probes_before_refused_after=[[round(t, 3), p] for t, p in probes[:-1] if t < REFUSED_AFTER],
           probe_after_exit=probes[-1][1])
    return run


def test_sigterm_to_the_master_requests_in_flight_finish(sigterm_run, reference):
    run = sigterm_run
    assert run["code"] == 0, run["output"][-2000:]
    assert run["in_flight"] and all(r[2] == 200 for r in run["in_flight"]), \
        [r for r in run["in_flight"] if r[2] != 200]
    assert run["slow"], "the slow upload in flight got no answer"
    status, answer, _ = run["slow"][0]
    assert status == 200
    assert_same_answer(answer, run["big_answer"], tol=1e-5)
    # Kept-alive clients get their last answers (Connection: close), then the refusal of new connections.
    assert all(r[2] in (200, "ConnectionRefusedError", "ConnectionResetError") for r in run["after"]), run["after"]
    assert run["probes"][-1][1] == "refused"


def test_sigterm_to_the_master_new_connections_are_refused_at_once(sigterm_run):
    """From REFUSED_AFTER after the signal every new connection is refused, neither answered (the worker
    would still be taking new work) nor queued and later reset (gap 3), while the request in flight
    (the slow upload, ~2 s more) is still being served."""
    run = sigterm_run
    during = [(t, p) for t, p in run["probes"][:-1] if t >= REFUSED_AFTER]
    assert during and all(p == "refused" for t, p in during), \
        f"not refused from {REFUSED_AFTER} s after SIGTERM: {[(round(t, 3), p) for t, p in run['probes']]}"
    # Judged while the request in flight was still being served, not only once the worker had finished.
    assert run["slow_answered"] is not None
    while_in_flight = [p for t, p in during if t < run["slow_answered"]]
    assert len(while_in_flight) >= 3, (run["slow_answered"], run["probes"])
    # The listening socket itself went at once (tens of ms), long before the request in flight was answered.
    assert run["listener_gone"] is not None and run["listener_gone"] < min(REFUSED_AFTER, run["slow_answered"]), \
        (run["listener_gone"], run["slow_answered"])
    after = [r[2] for r in run["after"]]
    assert all(outcome in (200, "ConnectionRefusedError") for outcome in after), after


# --- start-up and hot swap: models that take their time -------------------------------------------

def get_outcome(url, timeout):
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        return outcome_of(exc)
    return response.status_code


WARM_UP_SECONDS = 4


@pytest.fixture(scope="module")
def start_up(tmp_path_factory):
    """A server whose model's warm-up run takes WARM_UP_SECONDS, and /readyz and /healthz asked every 0.1 s
    (0.5 s each at most) from gunicorn's start to the first /readyz 200. Returns what was seen."""
    root = tmp_path_factory.mktemp("start-up")
    model = write_sleepy_model(root / "model", WARM_UP_SECONDS, 0)
    server = Server({"MODEL_DIR": model, "PROMETHEUS_MULTIPROC_DIR": metrics_dir(root / "metrics")},
                    log_path=root / "gunicorn.log")
    seen, worker_seen = [], None
    try:
        start = time.monotonic()
        while time.monotonic() - start < 180 and server.process.poll() is None:
            if worker_seen is None and worker_pids(server):
                worker_seen = time.monotonic() - start  # the worker starts loading TensorFlow, then the model
            at = time.monotonic() - start
            seen.append((at, get_outcome(server.url + "/readyz", 0.5), get_outcome(server.url + "/healthz", 0.5)))
            if seen[-1][1] == 200:
                break
            time.sleep(0.1)
        ready = requests.get(server.url + "/readyz", timeout=TIMEOUT).json() if seen[-1][1] == 200 else None
    finally:
        server.stop()
    changes = [x for i, x in enumerate(seen) if i == 0 or x[1:] != seen[i - 1][1:]]
    figure("start_up", warm_up_s=WARM_UP_SECONDS, worker_seen_s=worker_seen and round(worker_seen, 2),
           probes=len(seen), changes=[[round(t, 2), r, h] for t, r, h in changes])
    return dict(seen=seen, worker_seen=worker_seen, ready=ready, output=server.output())


def test_readyz_is_not_200_before_the_warm_up_has_run(start_up):
    seen = start_up["seen"]
    assert seen and seen[-1][1] == 200, f"never ready: {seen[-5:]}\n{start_up['output'][-2000:]}"
    assert start_up["ready"] == {"status": "ready", "version": 1, "models": {"model": 1}}
    # The first 200 comes after the worker started and its warm-up run (WARM_UP_SECONDS) was over.
    assert start_up["worker_seen"] is not None
    assert seen[-1][0] >= start_up["worker_seen"] + WARM_UP_SECONDS - 0.1, (start_up["worker_seen"], seen[-1])
    # Nothing but "not yet" before it: no other status, no error page.
    assert all(r in (503, "ConnectionRefusedError", "ConnectTimeout", "ReadTimeout", "ConnectionError")
               for _, r, _ in seen[:-1]), seen


SWAP_REQUEST_SECONDS = 4  # how long a request takes on version 1 of the hot-swap test


def spy_config(folder):
    """A gunicorn config file: the project's gunicorn.conf.py, plus a line in the log each time a worker runs a
    model (SPY run FOLDER TIME) and closes one (SPY closed FOLDER TIME), TIME from the system-wide monotonic
    clock (time.monotonic() in this process reads the same clock)."""
    path = os.path.join(folder, "spy.conf.py")
    with open(path, "w") as f:
        f.write(f"""
exec(compile(open({os.path.join(ROOT, "gunicorn.conf.py")!r}).read(), "gunicorn.conf.py", "exec"))
_project_post_worker_init = post_worker_init


def post_worker_init(worker):
    _project_post_worker_init(worker)
    import sys, time
    from classify_server.engines.tf_session import TFSessionEngine
    predict, close = TFSessionEngine.predict, TFSessionEngine.close

    def spy_predict(self, inputs):
        print("SPY run", self.model_dir, time.monotonic(), file=sys.stderr, flush=True)
        return predict(self, inputs)

    def spy_close(self):
        print("SPY closed", self.model_dir, time.monotonic(), file=sys.stderr, flush=True)
        return close(self)

    TFSessionEngine.predict, TFSessionEngine.close = spy_predict, spy_close
""")
    return path


def spied(server, what, folder):
    """Times of the spy's `what` lines ('run' or 'closed') for the model in `folder`."""
    times = []
    for line in server.output().splitlines():
        words = line.split()
        if words[:2] == ["SPY", what] and len(words) == 4 and os.path.normpath(words[2]) == os.path.normpath(folder):
            times.append(float(words[3]))
    return times


def test_hot_swap_closes_the_old_session_after_its_requests_in_flight(tmp_path, start_server):
    """docs/operations.md: a new version is loaded and warmed up beside the old one, then swapped in; requests in flight
    finish on the old session, which is closed after them. Version 1 takes SWAP_REQUEST_SECONDS per request;
    version 2 is published while one is in flight."""
    from support.models import write_colour_model
    base = tmp_path / "models"
    v1 = write_sleepy_model(base / "1", 0, SWAP_REQUEST_SECONDS, labels=("v1_red", "v1_green", "v1_blue"))
    s = start_server({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": "1",
                      "PROMETHEUS_MULTIPROC_DIR": metrics_dir(tmp_path / "metrics")}, args=("-c", spy_config(tmp_path)))
    assert requests.get(s.url + "/readyz", timeout=TIMEOUT).json()["version"] == 1

    slow = {}

    def slow_request():
        slow["start"] = time.monotonic()
        response = requests.post(s.url + "/", files={"data": ("x.jpg", GOOD)}, timeout=TIMEOUT)
        slow["end"], slow["status"], slow["answer"] = time.monotonic(), response.status_code, response.json()

    client = threading.Thread(target=slow_request, daemon=True)
    client.start()
    try:
        run_started = wait_for(lambda: spied(s, "run", v1), 15, interval=0.05,
                               what="the request running on version 1")[0]
        # Version 2, published whole (renamed into place) while that request is in its session.run.
        write_colour_model(tmp_path / ".v2", labels=("v2_red", "v2_green", "v2_blue"))
        os.rename(tmp_path / ".v2", base / "2")
        wait_for(lambda: requests.get(s.url + "/readyz", timeout=TIMEOUT).json().get("version") == 2, 30,
                 interval=0.05, what="version 2 served")
        swapped = time.monotonic()
        assert slow.get("status", 200) == 200, f"the request in flight on version 1 failed at the swap: {slow}"
        assert "end" not in slow, "version 1's request ended before the swap: nothing in flight to judge"
        # New requests go to version 2 at once, while version 1's session is still open for the one in flight.
        assert {label for label, _ in classify(s.url, GOOD)} <= {"v2_red", "v2_green", "v2_blue"}
        assert "end" not in slow and spied(s, "closed", v1) == [], \
            "version 1's session was closed while a request was still running on it"
    finally:
        client.join(TIMEOUT + 5)
    assert slow.get("status") == 200, (slow, s.output()[-3000:])
    assert {label for label, _ in slow["answer"]} <= {"v1_red", "v1_green", "v1_blue"}, slow["answer"]
    # Then, and only then, version 1's session is closed: once, after its last request's run.
    closed = wait_for(lambda: spied(s, "closed", v1), 10, interval=0.05, what="version 1's session closed")
    figure("hot_swap", request_s=round(slow["end"] - slow["start"], 2),
           swap_after_run_start_s=round(swapped - run_started, 2), closed_after_swap_s=round(closed[0] - swapped, 2),
           closed_after_answer_s=round(closed[0] - slow["end"], 3))
    assert len(closed) == 1, closed
    assert closed[0] >= run_started + SWAP_REQUEST_SECONDS - 0.1, (closed, run_started)
    assert closed[0] <= slow["end"] + 5, (closed, slow)
    status = {v["version"]: v["state"] for v in requests.get(s.url + "/v1/models/model", timeout=TIMEOUT).json()[
        "model_version_status"]}
    assert status == {"2": "AVAILABLE", "1": "END"}, status


# --- retrain killed midway -------------------------------------------------------------------------

def test_an_atomic_write_killed_midway_leaves_no_partial_file(tmp_path):
    """classify_contract.atomic (every cache file and model file): SIGKILL while 300 MB are being written."""
    target = tmp_path / "graph.pb"
    code = ("import sys; from classify_contract import atomic; "
            "atomic.write_bytes(sys.argv[1], b'x' * (300 * 2**20)); print('done')")
    process = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=ROOT)
    try:
        wait_for(lambda: any(n.endswith(".tmp") and os.path.getsize(tmp_path / n) > 0 for n in os.listdir(tmp_path)),
                 30, interval=0.001, what="the temporary file being written")
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not target.exists()
    leftovers = os.listdir(tmp_path)
    assert all(n.startswith(".graph.pb.") and n.endswith(".tmp") for n in leftovers), leftovers


def _retrain(image_dir, cache, out, steps=60):
    return [sys.executable, "-m", "retrain", "--image_dir", str(image_dir), "--architecture", "mobilenet_v2",
            "--weights", TEST_WEIGHTS, "--how_many_training_steps", str(steps), "--output_dir", str(out),
            "--bottleneck_dir", str(cache), "--summaries_dir", "", "--train_batch_size", "32"]


def _cache_files(cache):
    return [os.path.join(d, n) for d, _, names in os.walk(cache) for n in names if n.endswith(".npy")]


def test_retrain_killed_midway_then_restarted_reuses_the_valid_cache(tmp_path):
    images = make_image_dir(tmp_path / "images", per_class=40)
    cache, out = tmp_path / "cache", tmp_path / "model"
    total = 3 * 40
    # 1. Killed while computing bottlenecks, once some are cached.
    first = subprocess.Popen(_retrain(images, cache, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_cache_files(cache)) >= 1, 240, interval=0.02, what="a first cached bottleneck")
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    cached = _cache_files(cache)
    assert 0 < len(cached) < total, len(cached)
    assert not (out / "graph.pb").exists(), "a killed run left a graph.pb"
    for path in cached:  # atomic: every cache file present is whole
        assert np.load(path).ndim == 1
    # A torn cache file (as a crash of a non-atomic writer, or a full disk, would leave) is not read.
    torn = cached[0]
    with open(torn, "r+b") as f:
        f.truncate(os.path.getsize(torn) // 2)
    os.utime(torn)  # newer than its image, so only its content says it is bad
    valid = len(cached) - 1
    # 2. Restarted: computes only what is missing (and the torn file), and publishes a whole graph.pb.
    sizes_seen = set()
    second = subprocess.Popen(_retrain(images, cache, out), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while second.poll() is None and time.monotonic() < deadline:
            try:
                sizes_seen.add(os.path.getsize(out / "graph.pb"))
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        stdout, stderr = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, stderr[-3000:]
    line = [x for x in stderr.splitlines() if x.startswith("computing")]
    figure("retrain_killed", cached_at_kill=len(cached), reused=valid, computed_line=line)
    assert len(line) == 1 and line[0].startswith(f"computing {total - valid} bottlenecks ({valid} cached)"), line
    final = os.path.getsize(out / "graph.pb")
    assert sizes_seen <= {final}, f"graph.pb was seen at sizes {sizes_seen}, final {final}"
    import tensorflow as tf
    tf.compat.v1.GraphDef().ParseFromString((out / "graph.pb").read_bytes())
    assert len(_cache_files(cache)) == total
