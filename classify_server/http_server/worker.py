"""The gunicorn worker of `gunicorn classify_server:app`: one event loop reads every request whole, with
one strict parser, before a thread runs it; the loop writes every answer.

gunicorn's gthread worker gives a connection to a thread as soon as bytes arrive, and the thread then
reads headers and body from a blocking socket: a few slow clients hold every thread. Here the loop
(like nginx in front of its upstreams) reads each connection without blocking, through
classify_server.http_server.reader (llhttp, strict; its docstring lists what is refused), and a thread only
ever receives a complete, validated request. Every phase of a connection has a deadline and a cap:

- a request's line and headers must arrive within HEADER_TIMEOUT seconds of its first byte (a new
  connection that says nothing is closed after HEADER_TIMEOUT, an idle kept-alive one after
  KEEPALIVE); its body within BODY_TIMEOUT and, once it has had RATE_GRACE seconds, at BODY_MIN_RATE
  bytes/s on average: else 408 and the connection is closed;
- the head is capped (414, 431) and the body at MAX_UPLOAD_BYTES (413, before the body arrives when
  its Content-Length says so); anything the parser refuses is answered 400 (or 501, 505, 417);
- at most MAX_QUEUE complete requests wait for a thread; the next ones are answered 503 with
  Retry-After at once, by the loop. Health checks and /metrics have a thread of their own, so a probe
  sees an overloaded server as alive and ready, and never waits behind a client's body (bodies are
  read here, not on a thread);
- answers are written without blocking; a client that does not read its answer within BODY_TIMEOUT
  is dropped, and a connection closed after an answer is drained for at most LINGER seconds.

A refused request gets its JSON error ({"error": ...}) and its connection is closed; an exception
while serving one connection closes that connection and nothing else. The worker builds on
gunicorn's documented base class (gunicorn.workers.base.Worker: signals, heartbeat, the app) and no
other gunicorn code. TLS is not read here: terminate it in nginx or the ingress in front (or set
WORKER_CLASS=gthread).
"""
import datetime
import errno
import functools
import os
import selectors
import socket
import sys
import time
from collections import deque
from concurrent import futures

import httptools
from gunicorn.workers import base

from classify_server import metrics, settings
from classify_server.core import inference
from classify_server.http_server import reader, wsgi_call

RATE_GRACE = 5.0  # seconds a body may take before BODY_MIN_RATE applies (a connection's slow start)
CHECK_EVERY = 0.25  # seconds between looks at the deadlines
LINGER = 2.0  # seconds a closed-for-writing connection is read and discarded, so the client gets the answer
RECEIVE = 65536  # bytes read at once
RETRY_AFTER = 1  # seconds, in a 503's Retry-After
CONTROL_PATHS = frozenset((b"/healthz", b"/readyz", b"/metrics", b"/v2/health/live", b"/v2/health/ready"))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The inference error codes of the refusals the app would have made itself ({"error", "code"}, errors.py).
ERROR_CODES = {400: inference.INVALID_INPUT, 413: inference.REQUEST_TOO_LARGE}

READING, RUNNING, WRITING, LINGERING = "reading", "running", "writing", "lingering"


class Connection:
    """One client connection and where it is: reading a request, running it on a thread, writing the
    answer, or lingering before the close."""

    def __init__(self, sock, peer, limits, now):
        self.sock = sock
        self.peer = peer
        self.reader = reader.RequestReader(limits)
        self.state = READING
        self.events = 0  # what the selector watches for (0: not registered)
        self.served = 0  # requests answered on it
        self.since = now  # when the current state began
        self.began = None  # the current request's first byte
        self.body_began = None  # its headers' end
        self.out = memoryview(b"")
        self.keep_alive = False  # after the answer being written
        self.counted = False  # holds a place in the request threads' queue


class Worker(base.Worker):
    """See the module's docstring."""

    def init_process(self):
        if self.cfg.is_ssl:
            self.log.error("classify_server.http_server.worker does not read TLS: terminate TLS in front of it "
                           "(nginx, the ingress), or set WORKER_CLASS=gthread")
            sys.exit(3)  # gunicorn's 'worker failed to boot': the master stops with that line
        service = settings.current()  # this worker's one read of the environment (create_app gets the same)
        self.http = service.http  # header_timeout, body_timeout, body_min_rate
        self.limits = reader.Limits(max_line=self.cfg.limit_request_line or 2 ** 20,
                                    max_fields=self.cfg.limit_request_fields,
                                    max_field=self.cfg.limit_request_field_size or 2 ** 20,
                                    max_body=service.limits.max_upload_bytes)
        self.max_queue = service.serving.max_queue
        self.connections = {}  # socket: Connection
        self.in_pool = 0  # requests given to the request threads and not finished
        self.done = deque()  # (connection, answer, bytes sent) from the threads
        self.next_check = 0.0
        self.accepting = False
        self.stop_by = None  # after SIGTERM: when in-flight requests are given up
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        self.pool = futures.ThreadPoolExecutor(self.cfg.threads, thread_name_prefix="request")
        self.control_pool = futures.ThreadPoolExecutor(1, thread_name_prefix="control")
        super().init_process()

    # --- the loop ------------------------------------------------------------------------------

    def run(self):
        for listener in self.sockets:
            listener.setblocking(False)
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, self.on_signal)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wake)
        self.accept_new(True)
        try:
            while self.alive or self.busy():
                self.notify()
                if self.ppid != os.getppid():
                    self.log.info("parent changed, shutting down: %s", self)
                    break
                if not self.alive and self.stop_by is None:
                    self.begin_stop()
                if self.stop_by is not None and time.monotonic() > self.stop_by:
                    break
                for key, _ in self.selector.select(CHECK_EVERY if self.connections else 1.0):
                    try:
                        key.data(key.fileobj)
                    except Exception:  # a step outside any one connection's: logged, and the loop goes on
                        self.log.exception("error in the worker's event loop")
                self.finish_done()
                self.check_deadlines()
        finally:
            for conn in list(self.connections.values()):
                self.close(conn)
            self.pool.shutdown(wait=False)
            self.control_pool.shutdown(wait=False)

    def busy(self):
        return any(conn.state in (RUNNING, WRITING) or not conn.reader.idle for conn in self.connections.values())

    def begin_stop(self):
        """SIGTERM: accept nothing new; what is in flight finishes, and a request that still comes on a
        kept-alive connection is answered with `Connection: close` (closing idle connections now would
        reset requests already on their way). The loop ends once nothing is in flight."""
        self.stop_by = time.monotonic() + self.cfg.graceful_timeout
        self.accept_new(False)
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                pass

    def on_signal(self, fileobj):
        try:
            os.read(self.PIPE[0], 4096)
        except OSError:
            pass

    def on_wake(self, fileobj):
        try:
            self.wake_r.recv(4096)
        except OSError:
            pass

    def watch(self, conn, events, callback=None):
        """Have the selector call `callback` when conn's socket is ready for `events` (0: not at all)."""
        if events == conn.events:
            if events:
                self.selector.modify(conn.sock, events, callback)
            return
        if not events:
            self.selector.unregister(conn.sock)
        elif conn.events:
            self.selector.modify(conn.sock, events, callback)
        else:
            self.selector.register(conn.sock, events, callback)
        conn.events = events

    def guarded(self, conn, step):
        """Run one step of a connection; an exception there ends that connection alone (400 if it can
        still be answered)."""
        try:
            step(conn)
        except Exception:
            self.log.exception("closing the connection of %s after an error in the worker", conn.peer.client)
            if self.connections.get(conn.sock) is not conn:
                return
            try:
                if conn.state == READING:
                    self.refuse(conn, wsgi_call.error_answer(400, "bad request"))
                else:
                    self.close(conn)
            except Exception:
                self.close(conn)

    # --- accepting -----------------------------------------------------------------------------

    def accept_new(self, on):
        on = on and self.alive and len(self.connections) < self.cfg.worker_connections
        if on == self.accepting:
            return
        for listener in self.sockets:
            try:
                if on:
                    self.selector.register(listener, selectors.EVENT_READ, self.on_acceptable)
                else:
                    self.selector.unregister(listener)
            except (KeyError, ValueError, OSError):
                pass
        self.accepting = on

    def on_acceptable(self, listener):
        try:
            sock, client = listener.accept()
        except (BlockingIOError, ConnectionAbortedError, InterruptedError):
            return
        except OSError as exc:  # the listener was shut down (SIGTERM)
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.accept_new(False)
            return
        sock.setblocking(False)
        try:
            server = sock.getsockname()
        except OSError:
            server = ("", 0)
        if not isinstance(client, tuple):  # a unix socket
            client, server = ("", 0), (str(server), 0)
        conn = Connection(sock, wsgi_call.Peer(client[:2], server[:2]), self.limits, time.monotonic())
        self.connections[sock] = conn
        self.accept_new(True)
        self.watch(conn, selectors.EVENT_READ, self.on_readable)

    # --- reading -------------------------------------------------------------------------------

    def on_readable(self, sock):
        conn = self.connections.get(sock)
        if conn is not None:
            self.guarded(conn, self.read)

    def read(self, conn):
        try:
            data = conn.sock.recv(RECEIVE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client has gone
            self.close(conn)
            return
        if conn.began is None:
            conn.began = time.monotonic()
        conn.reader.feed(data)
        self.advance(conn)

    def advance(self, conn):
        """What the connection's bytes so far call for: the next request to a thread, an error answer,
        a 100 Continue, or more bytes."""
        reader = conn.reader
        if reader.requests:
            self.dispatch(conn, reader.requests.popleft())
        elif reader.error is not None:
            error = reader.error
            self.log.debug("refused a request from %s: %d %s", conn.peer.client, error.status, error.message)
            code = ERROR_CODES.get(error.status, "")
            self.refuse(conn, wsgi_call.error_answer(error.status, error.message, code=code))
        elif reader.closed:
            self.close(conn)
        else:
            if reader.expect_continue:
                reader.expect_continue = False
                self.send_now(conn, CONTINUE)
            now = time.monotonic()
            if reader.idle:
                conn.began = conn.body_began = None
            elif conn.began is None:  # a pipelined request's first bytes came with the one before
                conn.began = now
            if reader.in_body and conn.body_began is None:
                conn.body_began = now
            self.watch(conn, selectors.EVENT_READ, self.on_readable)

    def dispatch(self, conn, request):
        self.watch(conn, 0)
        conn.began = conn.body_began = None
        conn.state, conn.since = RUNNING, time.monotonic()
        path = request.target.partition(b"?")[0]
        control = request.method == "GET" and (path in CONTROL_PATHS or path.endswith(b"/ready"))
        keep_alive = request.keep_alive and self.alive and self.cfg.keepalive > 0
        if not control and self.in_pool - self.cfg.threads >= self.max_queue:
            metrics.SHED.inc()
            waiting = self.in_pool - self.cfg.threads
            self.write(conn, wsgi_call.error_answer(
                503, f"server busy: {waiting} requests are waiting (MAX_QUEUE); retry after {RETRY_AFTER} s",
                keep_alive, (("Retry-After", str(RETRY_AFTER)),)))
            return
        try:
            environ = wsgi_call.environ_of(request, conn.peer)
        except (ValueError, httptools.HttpParserError):
            self.write(conn, wsgi_call.error_answer(400, "bad request: the request target is not a URL path",
                                                    code=inference.INVALID_INPUT))
            return
        pool = self.control_pool
        if not control:
            pool, conn.counted = self.pool, True
            self.in_pool += 1
            metrics.QUEUE_DEPTH.set(max(0, self.in_pool - self.cfg.threads))
        pool.submit(self.handle, conn, request, environ, keep_alive)

    # --- on a thread ---------------------------------------------------------------------------

    def handle(self, conn, request, environ, keep_alive):
        """Run the app on one request; send what the socket takes at once, leave the rest to the loop."""
        start = datetime.datetime.now()
        try:
            answer = wsgi_call.respond(self.wsgi, request, environ, keep_alive)
        except Exception:
            self.log.exception("Error handling request %s", request.target[:200].decode("latin-1"))
            answer = wsgi_call.error_answer(500, "internal server error")
        sent = 0
        try:
            sent = conn.sock.send(answer.data)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            sent = -1
        try:
            self.log.access(answer, AccessRequest(request), environ, datetime.datetime.now() - start)
        except Exception:
            self.log.exception("access log")
        self.done.append((conn, answer, sent))
        try:
            self.wake_w.send(b".")
        except BlockingIOError:
            pass  # the loop has wake-ups pending already

    # --- writing -------------------------------------------------------------------------------

    def finish_done(self):
        while self.done:
            conn, answer, sent = self.done.popleft()
            if conn.counted:
                conn.counted = False
                self.in_pool -= 1
                metrics.QUEUE_DEPTH.set(max(0, self.in_pool - self.cfg.threads))
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if sent < 0:
                self.close(conn)
                continue
            conn.served += 1
            self.guarded(conn, functools.partial(self.write, answer=answer, sent=sent))

    def write(self, conn, answer, sent=0):
        conn.state, conn.since = WRITING, time.monotonic()
        conn.out = memoryview(answer.data)[sent:]
        conn.keep_alive = answer.keep_alive  # as its header said (when stopping, the next answer says close)
        self.flush(conn)

    def refuse(self, conn, answer):
        """Answer a request that is refused, then close."""
        self.watch(conn, 0)
        self.write(conn, answer)

    def send_now(self, conn, data):
        """A few bytes while reading (100 Continue): into the socket's buffer, which has room for them."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def on_writable(self, sock):
        conn = self.connections.get(sock)
        if conn is not None:
            self.guarded(conn, self.flush)

    def flush(self, conn):
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self.watch(conn, selectors.EVENT_WRITE, self.on_writable)
                return
            except OSError:
                self.close(conn)
                return
            conn.out = conn.out[sent:]
        if conn.keep_alive:
            conn.state, conn.since = READING, time.monotonic()
            self.advance(conn)  # a pipelined request, or the next one's bytes
        else:
            self.linger(conn)

    def linger(self, conn):
        """Close after the answer: stop writing, then read and drop what the client still sends for
        LINGER seconds, so the answer is not lost to a reset."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.state, conn.since = LINGERING, time.monotonic()
        self.watch(conn, selectors.EVENT_READ, self.on_lingering)

    def on_lingering(self, sock):
        conn = self.connections.get(sock)
        if conn is None:
            return
        try:
            if sock.recv(RECEIVE):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.close(conn)

    def close(self, conn):
        if self.connections.pop(conn.sock, None) is None:
            return
        if conn.events:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.events = 0
        try:
            conn.sock.close()
        except OSError:
            pass
        self.accept_new(True)

    # --- deadlines -----------------------------------------------------------------------------

    def check_deadlines(self):
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_EVERY
        for conn in list(self.connections.values()):
            if conn.state == READING:
                self.guarded(conn, lambda c: self.check_reading(c, now))
            elif conn.state == WRITING and self.http.body_timeout and \
                    now - conn.since > self.http.body_timeout:
                self.log.info("closing the connection of %s: its answer was not read within %gs (BODY_TIMEOUT)",
                              conn.peer.client, self.http.body_timeout)
                self.close(conn)
            elif conn.state == LINGERING and now - conn.since > LINGER:
                self.close(conn)

    def check_reading(self, conn, now):
        reader, limits = conn.reader, self.http
        if reader.idle and conn.began is None:
            idle = limits.header_timeout if not conn.served else self.cfg.keepalive
            if now - conn.since > idle:
                self.close(conn)  # said nothing: nothing to answer
            return
        late = None
        if reader.in_head or conn.body_began is None:
            if now - conn.began > limits.header_timeout:
                late = "headers", f"request headers not received within {limits.header_timeout:g}s (HEADER_TIMEOUT)"
        else:
            took = now - conn.body_began
            rate = reader.body_bytes / took if took else 0
            if limits.body_timeout and took > limits.body_timeout:
                late = "body", (f"the request body did not arrive in time: not within {limits.body_timeout:g}s "
                                "(BODY_TIMEOUT)")
            elif limits.body_min_rate and took > RATE_GRACE and rate < limits.body_min_rate:
                late = "body", (f"the request body did not arrive in time: {rate:.0f} bytes/s, under "
                                f"{limits.body_min_rate} (BODY_MIN_RATE)")
        if late:
            part, message = late
            metrics.CUT_OFF.labels(part).inc()
            self.log.info("closing the connection of %s: %s", conn.peer.client, message)
            self.refuse(conn, wsgi_call.error_answer(408, message))


class AccessRequest:
    """What gunicorn's access log reads of a request: its headers, as text."""

    def __init__(self, request):
        self.request = request

    @property
    def headers(self):
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.request.headers]
