"""Issue 26's kinds of hostile HTTP, byte for byte, against a real `gunicorn classify_server:app` worker.

Each case is sent on raw sockets to the default server (one worker, every setting at its default);
after each, the worker must be the same process and a legitimate request must be answered within 2 s.
The answers are read with httptools' response parser, so one request gets exactly one answer. The
smuggling cases run against a server that sheds (one thread, MAX_QUEUE=0, a model that takes 2 s):
the hidden request must never be answered. The reader's rules themselves are tests/unit/test_http_reader.py's.
"""
import select
import socket
import threading
import time

import httptools
import pytest
import requests
from support.images import shape_image
from support.models import write_colour_model, write_sleepy_model
from support.processes import Server

GOOD = shape_image("red_circle", 1)
HOST = b"Host: 127.0.0.1\r\n"
RATE_GRACE = 5  # seconds before BODY_MIN_RATE applies (classify_server.http_server.worker)


class Answers:
    """The HTTP answers in the bytes a server sent, as httptools reads them."""

    def __init__(self, data):
        self.statuses, self.bodies = [], []
        self._body = b""
        self._parser = httptools.HttpResponseParser(self)
        self._parser.feed_data(data)

    def on_body(self, body):
        self._body += body

    def on_message_complete(self):
        self.statuses.append(self._parser.get_status_code())
        self.bodies.append(self._body)
        self._body = b""


def send(port, data, seconds=10):
    """Send `data`, then read until the server closes (at most `seconds`): the answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        return Answers(receive(sock, seconds))


def receive(sock, seconds):
    received, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        if not select.select([sock], [], [], max(0.0, end - time.monotonic()))[0]:
            break
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return received


def worker_pids(server):
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as f:
        return sorted(int(pid) for pid in f.read().split())


def assert_unharmed(server, pids):
    """The same worker, and a legitimate request answered within 2 s."""
    start = time.monotonic()
    response = requests.post(server.url + "/", files={"data": ("a.jpg", GOOD)}, timeout=2)
    assert response.status_code == 200 and time.monotonic() - start < 2, response.text
    assert worker_pids(server) == pids, "the worker died or was restarted"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    s = Server({"MODEL_DIR": write_colour_model(root / "model")}, log_path=root / "gunicorn.log")
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.stop()


@pytest.fixture
def pids(server):
    return worker_pids(server)


# --- one request that killed or hung the worker ---------------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: \xb9\r\n\r\nx",  # str.isdigit() accepts it, int() did not
    b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: " + b"9" * 4301 + b"\r\n\r\n",  # over int()'s digit limit
    b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n-6\r\nabcdef\r\n0\r\n\r\n",  # looped forever
], ids=["length_superscript", "length_4301_digits", "negative_chunk_size"])
def test_one_request_neither_kills_nor_hangs_the_worker(server, pids, request_bytes):
    start = time.monotonic()
    answers = send(server.port, request_bytes)
    assert answers.statuses == [400] and b"bad request" in answers.bodies[0], answers.bodies
    assert time.monotonic() - start < 2
    assert_unharmed(server, pids)


# --- connections held open ------------------------------------------------------------------------

def hold(port, data, results, index, seconds):
    results[index] = send(port, data, seconds)


def test_header_lines_that_never_end_hold_no_thread(server, pids):
    """Eight connections sending ten 7,000-byte header lines and no blank line: each is answered 431 at
    once (the head is capped on the loop), and the server classifies meanwhile."""
    data = b"POST / HTTP/1.1\r\n" + HOST + (b"X-Long: " + b"a" * 7000 + b"\r\n") * 10
    results = [None] * 8
    threads = [threading.Thread(target=hold, args=(server.port, data, results, i, 15)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert_unharmed(server, pids)
    for thread in threads:
        thread.join(20)
    assert all(r.statuses == [431] for r in results), [r.statuses for r in results]
    assert requests.get(server.url + "/readyz", timeout=2).status_code == 200


def drip(port, head, pieces, interval, seconds):
    """Send `head`, then one of `pieces` every `interval` seconds until answered (at most `seconds`):
    (the answers, seconds until the answer)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(head)
        for piece in pieces:
            if select.select([sock], [], [], interval)[0] or time.monotonic() - start > seconds:
                break
            try:
                sock.sendall(piece)
            except OSError:
                break
        answers = Answers(receive(sock, max(1.0, seconds - (time.monotonic() - start))))
    return answers, time.monotonic() - start


SLOW_BODIES = {
    # a leading empty line, then a slow body (gunicorn's parser read those on a thread)
    "leading_crlf": (b"\r\nPOST / HTTP/1.1\r\n" + HOST + b"Content-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n", [b"x"] * 1000),
    # a chunk line over 1 KiB (a long chunk extension), a byte at a time
    "long_chunk_line": (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Type: multipart/form-data; boundary=b\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n5;ext=" + b"e" * 1100, [b"e"] * 1000),
    # chunked, slowly
    "slow_chunks": (b"POST / HTTP/1.1\r\n" + HOST + b"Content-Type: multipart/form-data; boundary=b\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n", [b"1\r\nx\r\n"] * 1000),
}


@pytest.mark.parametrize("case", SLOW_BODIES)
def test_slow_bodies_get_their_408_on_the_loop(server, pids, case):
    """A body under BODY_MIN_RATE is cut once its grace is over, whatever its framing, and holds no thread."""
    head, pieces = SLOW_BODIES[case]
    results = [None] * 5
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, drip(server.port, head, pieces, 0.5, 20)))
               for i in range(5)]  # more than the worker's four threads
    for thread in threads:
        thread.start()
    time.sleep(1)
    assert_unharmed(server, pids)
    for thread in threads:
        thread.join(30)
    for answers, seconds in results:
        assert answers.statuses == [408] and b"BODY_MIN_RATE" in answers.bodies[0], answers.bodies
        assert RATE_GRACE - 0.5 <= seconds <= RATE_GRACE + 2, seconds


@pytest.mark.parametrize("coding", [b"identity, chunked", b"gzip, chunked", b"chunked, gzip"])
def test_transfer_codings_other_than_chunked_are_refused_at_once(server, pids, coding):
    answers = send(server.port, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: " + coding + b"\r\n\r\n1\r\nx")
    assert answers.statuses in ([400], [501]), answers.statuses
    assert_unharmed(server, pids)


@pytest.mark.parametrize("size_line", [b"f" * 40, b"1" + b"0" * 17, b"0x5", b"5 ", b"+5", b"5_0"])
def test_bad_chunk_sizes_are_refused_at_once(server, pids, size_line):
    answers = send(server.port, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + size_line
                   + b"\r\nhello\r\n0\r\n\r\n")
    assert answers.statuses == [400], answers.statuses
    assert_unharmed(server, pids)


def test_clients_that_close_and_never_read_do_not_block_the_loop(server, pids):
    """Twelve clients send `Connection: close` requests, then more bytes, and never read nor close: the
    answers are written and the connections drained without blocking; others are answered meanwhile."""
    socks = []
    try:
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /v1/models/model HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n" + b"junk" * 1000)
            socks.append(sock)
        time.sleep(0.5)
        for _ in range(3):
            assert_unharmed(server, pids)
    finally:
        for sock in socks:
            sock.close()


def test_a_probe_with_a_body_does_not_block_the_probes(server, pids):
    """GET /healthz promising 100 MB is refused at once (413); one dribbling a small body is read on the
    loop, where it holds nothing: the next probes answer within Kubernetes' 1 s."""
    answers = send(server.port, b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: 104857600\r\n\r\n"
                   + b"x" * 1000)
    assert answers.statuses == [413], answers.statuses
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"Content-Length: 1000\r\n\r\nx")
        for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
            start = time.monotonic()
            assert requests.get(server.url + path, timeout=1).status_code == 200
            assert time.monotonic() - start < 1
    assert_unharmed(server, pids)


# --- one request, one answer ----------------------------------------------------------------------

BAD_CHUNKING = {
    "size_0x": b"0x10\r\n",
    "size_trailing_space": b"10 \r\n",
    "no_crlf_after_data": b"3\r\nabcXY",
    "forbidden_trailer": b"3\r\nabc\r\n0\r\nContent-Length: 5\r\n\r\n",
}


@pytest.mark.parametrize("case", BAD_CHUNKING)
@pytest.mark.parametrize("path, content_type", [("/", b"multipart/form-data; boundary=b"), ("/", b"text/plain"),
                                                 ("/v1/models/model:predict", b"application/json")],
                         ids=["read_by_the_app", "never_read_by_the_app", "tf_serving_rest"])
def test_framing_errors_get_one_400_never_a_500(server, pids, case, path, content_type):
    answers = send(server.port, f"POST {path} HTTP/1.1\r\n".encode() + HOST + b"Content-Type: " + content_type
                   + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + BAD_CHUNKING[case])
    assert answers.statuses == [400], answers.statuses
    assert_unharmed(server, pids)
    assert "Traceback" not in server.output()


# --- smuggling under overload ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def shedding(tmp_path_factory):
    """A server with one thread and no queue over a model that takes 2 s: a second request is shed (503)."""
    root = tmp_path_factory.mktemp("shedding")
    s = Server({"MODEL_DIR": write_sleepy_model(root / "model", 0, 2), "THREADS": "1", "MAX_QUEUE": "0",
                "ACCESS_LOG": "-"}, log_path=root / "gunicorn.log")
    try:
        s.wait_ready(timeout=180)
        yield s
    finally:
        s.stop()


HIDDEN = b"GET /hidden-request HTTP/1.1\r\n" + HOST + b"\r\n"


@pytest.mark.parametrize("smuggled_chunks", [b"0x0\r\n\r\n", b"+0\r\n\r\n", b"-0\r\n\r\n", b" 0\r\n\r\n",
                                             b"0_0\r\n\r\n", b"1\r\nxYY0\r\n\r\n"])
def test_a_request_hidden_in_bad_chunking_is_never_answered_while_shedding(shedding, smuggled_chunks):
    busy = threading.Thread(target=lambda: requests.post(shedding.url + "/", files={"data": ("a.jpg", GOOD)},
                                                         timeout=30))
    busy.start()
    time.sleep(0.5)  # the one thread is busy for 2 s: what comes now is shed
    try:
        answers = send(shedding.port, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Type: text/plain\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n" + smuggled_chunks + HIDDEN, seconds=5)
    finally:
        busy.join(30)
    assert answers.statuses == [400], answers.statuses
    time.sleep(0.5)
    assert b"/hidden-request" not in shedding.output().encode(), "the hidden request was answered"


def test_pipelined_requests_are_framed_by_the_same_parser_when_shed(shedding):
    """Two valid pipelined requests while shedding: the first is answered 503 and the second on its own."""
    busy = threading.Thread(target=lambda: requests.post(shedding.url + "/", files={"data": ("a.jpg", GOOD)},
                                                         timeout=30))
    busy.start()
    time.sleep(0.5)
    try:
        answers = send(shedding.port, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Type: text/plain\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                       b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n", seconds=5)
    finally:
        busy.join(30)
    assert answers.statuses == [503, 200], answers.statuses


def test_access_log_empty_is_off_and_dash_is_standard_output(server, shedding):
    """docs/settings.md: ACCESS_LOG '-' (the default) logs each request to standard output; empty, none."""
    for s in (server, shedding):
        assert requests.get(s.url + "/healthz", timeout=5).status_code == 200
    time.sleep(0.5)
    assert '"GET /healthz HTTP/1.1" 200' not in server.output()  # ACCESS_LOG="" (support.processes.Server)
    assert '"GET /healthz HTTP/1.1" 200' in shedding.output()  # ACCESS_LOG="-"
