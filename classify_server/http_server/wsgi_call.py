"""Running a WSGI app on one complete request (classify_server.http_server.reader) and writing its answer.

The worker's threads call `respond`: it builds the PEP 3333 environ from the request, calls the app,
and returns the whole answer as bytes. The app's answers here are small (JSON, the page, a report's
files), so they are joined in memory and always sent with a Content-Length; the event loop then
writes them without blocking.
"""
import io
import json
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import unquote_to_bytes

import httptools

from classify_server.http_server.reader import Request

# Connection-level headers are the server's to send (PEP 3333 forbids them to apps).
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailers", b"transfer-encoding", b"upgrade"))
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 413: "Content Too Large",
           414: "URI Too Long", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


@dataclass
class Answer:
    """What the app answered, as the access log reads it (gunicorn's logger: status, headers, sent)."""
    status: str
    headers: list
    sent: int
    data: bytes  # the answer's bytes on the wire
    keep_alive: bool


@dataclass(frozen=True)
class Peer:
    """The two ends of a connection, for the environ."""
    client: tuple
    server: tuple


def environ_of(request: Request, peer: Peer, errors=sys.stderr) -> dict:
    """The WSGI environ of a request. Headers whose names hold '_' are dropped (as gunicorn does), so
    that `X_Forwarded_For` cannot pass for `X-Forwarded-For` in the app."""
    target = request.target
    if target == b"*":
        path, query = b"*", b""
    else:
        url = httptools.parse_url(target)
        path, query = url.path or b"/", url.query or b""
    environ = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "RAW_URI": target.decode("latin-1"),
        "SERVER_PROTOCOL": "HTTP/" + request.version,
        "SERVER_NAME": str(peer.server[0]),
        "SERVER_PORT": str(peer.server[1]),
        "REMOTE_ADDR": str(peer.client[0]),
        "REMOTE_PORT": str(peer.client[1]),
        "CONTENT_LENGTH": str(len(request.body)),  # the decoded body, whatever its framing was
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(request.body),
        "wsgi.input_terminated": True,
        "wsgi.errors": errors,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = name.decode("latin-1").upper()
        if "_" in key or key in ("CONTENT-LENGTH", "TRANSFER-ENCODING"):
            continue
        key = "CONTENT_TYPE" if key == "CONTENT-TYPE" else "HTTP_" + key.replace("-", "_")
        value = value.decode("latin-1")
        environ[key] = environ[key] + "," + value if key in environ else value
    return environ


def respond(app, request: Request, environ: dict, keep_alive: bool) -> Answer:
    """Call the app and serialise its answer. `keep_alive`: whether the connection may stay open."""
    started = []

    def start_response(status, headers, exc_info=None):
        if exc_info and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started
    code = int(status[:3])
    headers = [(name, value) for name, value in headers if name.lower().encode("latin-1") not in HOP_BY_HOP]
    if request.method == "HEAD" or code in (204, 304) or code < 200:
        body = b""
    elif not any(name.lower() == "content-length" for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    head = head_bytes(status, headers, keep_alive, request.version)
    return Answer(status, headers, len(body), head + body, keep_alive)


def head_bytes(status: str, headers: list, keep_alive: bool, version: str = "1.1") -> bytes:
    lines = [f"HTTP/1.1 {status}\r\nDate: {http_date()}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version == "1.0":  # an HTTP/1.0 client closes unless told otherwise
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


_date = [0, ""]


def http_date() -> str:
    now = int(time.time())
    if now != _date[0]:
        _date[:] = [now, formatdate(now, usegmt=True)]
    return _date[1]


def error_answer(status: int, message: str, keep_alive: bool = False, extra: tuple = (), code: str = "") -> Answer:
    """The JSON error the app answers with ({"error": ...}, and the inference error code where one
    applies), for what the server refuses itself."""
    body = json.dumps({"error": message, "code": code} if code else {"error": message}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               ("X-Content-Type-Options", "nosniff"), *extra]
    status_line = f"{status} {REASONS.get(status, 'Error')}"
    return Answer(status_line, headers, len(body), head_bytes(status_line, headers, keep_alive) + body, keep_alive)
