"""The gunicorn worker of `gunicorn classify_server:app`: gthread, with each request read whole on its
event loop before it takes a thread.

gunicorn's gthread worker gives a connection to one of its THREADS as soon as bytes arrive, and that
thread then reads headers and body from a blocking socket: a few clients sending slowly hold every
thread while everyone else waits (eight such connections stopped a bare server for good). Here the
worker's main loop, which already watches every idle kept-alive connection, also reads each request
until it is complete, without blocking, as nginx buffers requests for its upstreams. Only a complete
request takes a thread, so a slow client costs a buffer and a file descriptor, not a thread. And:

- its headers must arrive within HEADER_TIMEOUT seconds, its body within BODY_TIMEOUT and, once it
  has had RATE_GRACE seconds, at BODY_MIN_RATE bytes/s on average; else it is answered 408 (nothing,
  if it sent nothing at all) and its connection is closed;
- at most MAX_QUEUE complete requests wait for a thread; the next ones are answered 503 with
  Retry-After by this loop at once, without a thread, so overload is answered in microseconds
  instead of queueing until clients time out. Health checks and /metrics never wait behind that
  queue: they have a thread of their own, so a probe sees an overloaded server as alive and ready.

A request whose body is larger than MAX_UPLOAD_BYTES, or whose framing this loop does not follow
(gunicorn's parser then answers it), goes to a thread after its headers, where BODY_TIMEOUT bounds
its reads (gunicorn.conf.py's pre_request). TLS connections are read by the threads as in gthread:
terminate TLS in nginx or the ingress in front.
"""
import json
import selectors
import socket
import time
from concurrent import futures
from functools import partial

from gunicorn.workers import gthread

from classify_server import metrics, settings

RATE_GRACE = 5.0  # seconds a body may take before BODY_MIN_RATE applies (a connection's slow start)
CHECK_EVERY = 0.25  # seconds between looks at the deadlines of requests being read
LINGER = 2.0  # seconds a closed-for-writing connection is read and discarded, so the client gets the answer
MAX_HEAD = 64 * 1024  # bytes of request line and headers
RETRY_AFTER = 1  # seconds, in a 503's Retry-After
CONTROL_PATHS = frozenset(("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"))


class Incoming:
    """One request as its bytes arrive: whether it is complete yet, and whether it is late."""

    def __init__(self, data, now, limits):
        self.data = bytearray(data)
        self.started = now
        self.limits = limits
        self.head_end = None  # index just past the headers' blank line
        self.body_started = None
        self.length = None  # Content-Length
        self.chunked = False
        self.scan = 0  # chunked: where the next chunk-size line starts
        self.payload = 0  # chunked: bytes of chunk data so far
        self.trailers = False  # chunked: the last chunk is in, trailers follow
        self.end = None  # index just past the request, once complete
        self.method = self.path = ""
        self.http11 = False
        self.close = False
        self.expect_continue = False
        self.registered = False  # its socket is in the loop's poller, waiting for more bytes

    def add(self, chunk):
        self.data += chunk

    def ready(self, now):
        """Whether the request can go to a thread: complete, or beyond what this loop follows."""
        if self.head_end is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return len(self.data) > MAX_HEAD  # gunicorn's parser answers 431 or 400
            self.head_end = end + 4
            self.body_started = now
            if not self._read_head(bytes(self.data[:end])):
                return True
            if self.length is not None and self.length > self.limits["MAX_UPLOAD_BYTES"]:
                return True  # the app answers 413 without reading it
            self.scan = self.head_end
        if self.chunked:
            return self._chunks_done()
        if len(self.data) >= self.head_end + (self.length or 0):
            self.end = self.head_end + (self.length or 0)
            return True
        return False

    def _read_head(self, head):
        """Read the framing from the headers; False when it is not plain (left to gunicorn's parser)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return False
        self.method, target, version = parts
        self.path = target.split("?", 1)[0]
        self.http11 = version == "HTTP/1.1"
        self.close = not self.http11
        lengths, encodings = [], []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                lengths.append(value)
            elif name == "transfer-encoding":
                encodings.append(value.lower())
            elif name == "expect":
                self.expect_continue = self.http11 and value.lower() == "100-continue"
            elif name == "connection":
                tokens = {t.strip().lower() for t in value.split(",")}
                self.close = "close" in tokens or (not self.http11 and "keep-alive" not in tokens)
        if encodings:
            self.chunked = encodings == ["chunked"] and not lengths
            return self.chunked
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return False
        self.length = int(lengths[0]) if lengths else None
        return True

    def _chunks_done(self):
        data = self.data
        while True:
            if self.trailers:  # after the last chunk's size line: trailer lines, then a blank line
                end = data.find(b"\r\n\r\n", self.scan - 2)
                if end < 0:
                    return len(data) - self.scan > MAX_HEAD
                self.end = end + 4
                return True
            line_end = data.find(b"\r\n", self.scan)
            if line_end < 0:
                return len(data) - self.scan > 1024  # not a chunk-size line: the parser answers 400
            try:
                size = int(bytes(data[self.scan:line_end]).split(b";")[0].strip(), 16)
            except ValueError:
                return True
            if size == 0:
                self.scan, self.trailers = line_end + 2, True
                continue
            if self.payload + size > self.limits["MAX_UPLOAD_BYTES"]:
                return True  # the app answers 413
            if len(data) < line_end + 2 + size + 2:
                return False
            self.scan = line_end + 2 + size + 2
            self.payload += size

    def late(self, now):
        """(which part, why) when the request is overdue, else None."""
        limits = self.limits
        if self.head_end is None:
            if now - self.started > limits["HEADER_TIMEOUT"]:
                return "headers", f"request headers not received within {limits['HEADER_TIMEOUT']:g}s (HEADER_TIMEOUT)"
            return None
        took = now - self.body_started
        if limits["BODY_TIMEOUT"] and took > limits["BODY_TIMEOUT"]:
            return "body", (f"the request body did not arrive in time: not within {limits['BODY_TIMEOUT']:g}s "
                            "(BODY_TIMEOUT)")
        rate = (len(self.data) - self.head_end) / took if took else 0
        if limits["BODY_MIN_RATE"] and took > RATE_GRACE and rate < limits["BODY_MIN_RATE"]:
            return "body", (f"the request body did not arrive in time: {rate:.0f} bytes/s, under "
                            f"{limits['BODY_MIN_RATE']} (BODY_MIN_RATE)")
        return None


class Worker(gthread.ThreadWorker):
    """gthread, reading requests on the event loop (see the module's docstring)."""

    def init_process(self):
        config = settings.from_env()
        self.limits = {name: config[name]
                       for name in ("HEADER_TIMEOUT", "BODY_TIMEOUT", "BODY_MIN_RATE", "MAX_UPLOAD_BYTES")}
        self.max_queue = config["MAX_QUEUE"]
        # TLS is read by the threads; so is HTTP/2 with prior knowledge (its preface is read there).
        self.buffering = not self.cfg.is_ssl and self.cfg.http2_cleartext not in ("prior-knowledge", "both")
        self.reading = {}  # connection: Incoming
        self.lingering = {}  # connection: when to close it
        self.in_pool = 0  # requests given to the request threads and not finished
        self.next_check = 0.0
        self.control_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="control")
        super().init_process()

    # --- reading a request on the loop ---------------------------------------------------------

    def accept(self, listener):
        if not self.buffering:
            return super().accept(listener)
        try:
            sock, client = listener.accept()
        except (BlockingIOError, ConnectionAbortedError, InterruptedError):
            return
        self.nr_conns += 1
        self.read_request(gthread.TConn(self.cfg, sock, client, listener.getsockname()))

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has a new request: read it here, not on a thread."""
        if not self.buffering:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.read_request(conn, readable=True)

    def read_request(self, conn, data=b"", readable=False):
        conn.sock.setblocking(False)
        incoming = self.reading[conn] = Incoming(data, time.monotonic(), self.limits)
        if readable and not self.receive(conn, incoming):
            return
        if not self.advance(conn, incoming):
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_readable, conn))
            incoming.registered = True

    def on_readable(self, conn, sock):
        incoming = self.reading.get(conn)
        if incoming is not None and self.receive(conn, incoming):
            self.advance(conn, incoming)

    def receive(self, conn, incoming):
        """Add what the socket holds; False (and the connection closed) when the client has gone."""
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if chunk:
            incoming.add(chunk)
            return True
        self.stop_reading(conn)
        self.close(conn)
        return False

    def stop_reading(self, conn):
        incoming = self.reading.pop(conn)
        if incoming.registered:
            self.poller.unregister(conn.sock)

    def advance(self, conn, incoming):
        """Send the request on once it is ready; True when it has left the loop's reading."""
        head_seen = incoming.head_end is not None
        if not incoming.ready(time.monotonic()):
            if not head_seen and incoming.head_end is not None and incoming.expect_continue:
                self.send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it before its body
                conn.continue_sent = True
            return False
        self.stop_reading(conn)
        control = incoming.method == "GET" and (incoming.path in CONTROL_PATHS or incoming.path.endswith("/ready"))
        if not control and self.in_pool - self.cfg.threads >= self.max_queue:
            self.shed(conn, incoming)
            return True
        conn.buffered, conn.data_ready = bytes(incoming.data), True
        self.submit(conn, self.control_pool if control else None)
        return True

    # --- handing over to the threads -----------------------------------------------------------

    def enqueue_req(self, conn):
        if self.buffering and conn.initialized:
            # Called by gthread when a response's body drain read past it: the next request, from its start.
            self.read_request(conn, conn.parser.unreader.take_buffered())
        else:
            self.submit(conn)

    def submit(self, conn, pool=None):
        if pool is None:
            pool, conn.counted = self.tpool, True
            self.in_pool += 1
            metrics.QUEUE_DEPTH.set(max(0, self.in_pool - self.cfg.threads))
        fs = pool.submit(self.handle, conn)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def finish_request(self, conn, fs):
        if getattr(conn, "counted", False):
            conn.counted = False
            self.in_pool -= 1
            metrics.QUEUE_DEPTH.set(max(0, self.in_pool - self.cfg.threads))
        super().finish_request(conn, fs)

    def handle(self, conn):
        data = vars(conn).pop("buffered", None)
        if data is not None:
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    def handle_request(self, req, conn):
        if vars(conn).pop("continue_sent", False):
            req._expected_100_continue = False  # this loop has sent it
        return super().handle_request(req, conn)

    # --- answering from the loop ---------------------------------------------------------------

    def shed(self, conn, incoming):
        metrics.SHED.inc()
        # Kept alive when the request's end is known (its framing was followed here) and the client wants it.
        keep_alive = incoming.end is not None and not incoming.close and self.alive
        waiting = self.in_pool - self.cfg.threads
        sent = self.answer(conn, 503, "Service Unavailable",
                           f"server busy: {waiting} requests are waiting (MAX_QUEUE); retry after {RETRY_AFTER} s",
                           f"Retry-After: {RETRY_AFTER}\r\n", keep_alive=keep_alive)
        if sent and keep_alive:
            self.read_request(conn, bytes(incoming.data[incoming.end:]))  # the next request, if pipelined
        else:
            self.linger(conn)

    def answer(self, conn, status, reason, message, headers="", keep_alive=False):
        body = json.dumps({"error": message}).encode()
        connection = "" if keep_alive else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"X-Content-Type-Options: nosniff\r\n{headers}{connection}\r\n")
        return self.send(conn, head.encode() + body)

    def send(self, conn, data):
        """Whether all of `data` went into the socket's buffer at once (it does for a small answer)."""
        try:
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def linger(self, conn):
        """Close after the answer: stop writing, then read and drop what the client still sends for
        LINGER seconds, so the answer is not lost to a reset."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        self.lingering[conn] = time.monotonic() + LINGER
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_lingering, conn))

    def on_lingering(self, conn, sock):
        if conn not in self.lingering:
            return
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.stop_lingering(conn)

    def stop_lingering(self, conn):
        del self.lingering[conn]
        self.poller.unregister(conn.sock)
        self.close(conn)

    def close(self, conn):
        self.nr_conns -= 1
        conn.close()

    # --- deadlines -----------------------------------------------------------------------------

    def wait_for_and_dispatch_events(self, timeout):
        if self.reading or self.lingering:
            timeout = min(timeout, CHECK_EVERY)
        super().wait_for_and_dispatch_events(timeout)

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY
        for conn, incoming in list(self.reading.items()):
            if not incoming.data and (not self.alive or now - incoming.started > self.limits["HEADER_TIMEOUT"]):
                self.stop_reading(conn)  # never said a word (or the worker is stopping): nothing to answer
                self.close(conn)
                continue
            late = incoming.late(now)
            if late:
                part, message = late
                metrics.CUT_OFF.labels(part).inc()
                self.log.info("closing the connection of %s: %s", conn.client, message)
                self.stop_reading(conn)
                self.answer(conn, 408, "Request Timeout", message)
                self.linger(conn)
        for conn, deadline in list(self.lingering.items()):
            if now > deadline:
                self.stop_lingering(conn)

    def run(self):
        try:
            super().run()
        finally:
            self.control_pool.shutdown(wait=False)
