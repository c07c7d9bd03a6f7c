"""Reading HTTP/1.1 requests from one connection's bytes, strictly, with llhttp (httptools).

The worker's event loop (classify_server.http_server.worker) feeds each connection's bytes to a RequestReader as
they arrive and takes whole requests from it: method, target, headers and the decoded body. llhttp,
the parser of Node.js and uvicorn, does the parsing; it is strict by default (no leniency flag is set
here): it rejects a Content-Length with a Transfer-Encoding, lengths that differ or hold anything but
ASCII digits or overflow, bad chunk sizes and chunk CRLFs, bare CR or LF, obsolete line folding,
control characters in headers and a transfer coding list that does not end in `chunked`. On top of it
this module keeps the rules of RFC 9112 that a parser leaves to its server, and the size limits:

- HTTP/1.0 and 1.1 only (505); HTTP/1.1 needs exactly one Host, 1.0 at most one (400);
- `Transfer-Encoding` must be `chunked` alone (501: no other coding is decoded here), and not in 1.0;
- `Expect` may only be `100-continue` (417);
- the request line (414), each header line, their count and the whole head (431), and the body (413:
  a Content-Length over the limit is refused before its body arrives) are capped;
- a chunked body's trailer fields are read (under the same limits) and dropped;
- an Upgrade or CONNECT request is answered as a plain request and its connection closed (nothing
  after its head is read), or refused (400) when it has a body, which llhttp would not read.

A request is only handed on once it is complete and has passed all of these; anything else ends in
one HTTPError with its status, and the connection is answered that and closed.
"""
from collections import deque
from dataclasses import dataclass

import httptools


class HTTPError(Exception):
    """A request that is refused: its status, and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_line: int = 4094  # request line's target (gunicorn's limit_request_line)
    max_fields: int = 100  # header lines (limit_request_fields)
    max_field: int = 8190  # one header line (limit_request_field_size)
    max_head: int = 64 * 1024  # request line and headers together
    max_body: int = 10 * 1024 * 1024  # the decoded body (MAX_UPLOAD_BYTES)


@dataclass
class Request:
    """One complete request: headers as received (names as sent, values without surrounding blanks)."""
    method: str
    target: bytes
    version: str  # "1.0" or "1.1"
    headers: list
    body: bytes
    keep_alive: bool  # the client's wish (HTTP/1.1 unless `Connection: close`; 1.0 with keep-alive)

    def header(self, name: bytes):
        """The value of a header sent once (None if absent); `name` in lower case."""
        return header_value(self.headers, name)


def header_value(headers, name: bytes):
    """The first value of header `name` (lower case) in a list of (name, value), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


class RequestReader:
    """The requests in one connection's bytes. Call feed() with each chunk received; complete requests
    collect in `requests` (in order; pipelined ones too); `error` is set at the first refusal, after
    which nothing more is read. `expect_continue` turns True when a request's head asks for 100 Continue
    (the caller sends it and resets the flag)."""

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits
        self.requests: deque[Request] = deque()
        self.error: HTTPError | None = None
        self.expect_continue = False
        self.closed = False  # after an Upgrade/CONNECT: the rest of the connection is not HTTP
        self.in_head = False  # a request has begun and its headers are not complete
        self.in_body = False  # its headers are complete, its body is not
        self.head_bytes = 0  # bytes fed while a head was incomplete (an upper bound on its size)
        self.body_bytes = 0  # bytes fed while a body was incomplete (on the wire: with chunk framing)
        self._parser = httptools.HttpRequestParser(self)
        self._reset()

    def _reset(self):
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._body = bytearray()

    @property
    def idle(self):
        """No request begun and not complete."""
        return not (self.in_head or self.in_body)

    def feed(self, data: bytes) -> None:
        if self.error is not None or self.closed:
            return
        was_head, was_body = self.in_head, self.in_body
        try:
            self._parser.feed_data(data)
        except HTTPError as exc:
            self.error = exc
        except httptools.HttpParserUpgrade:
            self._upgraded()
        except httptools.HttpParserCallbackError as exc:  # raised by a callback below
            context = exc.__context__
            self.error = context if isinstance(context, HTTPError) else HTTPError(400, f"bad request: {exc}")
        except httptools.HttpParserError as exc:
            self.error = HTTPError(400, f"bad request: {exc}")
        if self.error is None:
            # The head's and body's bytes, counted over whole chunks: exact enough for a limit.
            if self.in_head:
                self.head_bytes = (self.head_bytes if was_head else 0) + len(data)
                if self.head_bytes > self.limits.max_head:
                    self.error = HTTPError(431, f"request headers larger than {self.limits.max_head} bytes")
            if self.in_body:
                self.body_bytes = (self.body_bytes if was_body else 0) + len(data)

    def _upgraded(self):
        self.closed = True  # what follows the head is another protocol's: never read as HTTP
        request = self.requests[-1] if self.requests else None
        if request is None or request.header(b"content-length") not in (None, b"0") or \
                request.header(b"transfer-encoding") is not None:
            if request is not None:
                self.requests.pop()
            self.error = HTTPError(400, "bad request: an Upgrade or CONNECT request with a body")
            return
        request.keep_alive = False

    # --- llhttp's callbacks -------------------------------------------------------------------

    def on_message_begin(self):
        self.in_head, self.head_bytes = True, 0

    def on_url(self, url: bytes):
        self._url += url
        if len(self._url) > self.limits.max_line:
            raise HTTPError(414, f"request target longer than {self.limits.max_line} bytes")

    def on_header(self, name: bytes, value: bytes):
        size = len(name) + len(value) + 4
        self._head_size += size
        if size > self.limits.max_field:
            raise HTTPError(431, f"a request header line longer than {self.limits.max_field} bytes")
        if len(self._headers) >= self.limits.max_fields:
            raise HTTPError(431, f"more than {self.limits.max_fields} request headers")
        if self._head_size > self.limits.max_head:
            raise HTTPError(431, f"request headers larger than {self.limits.max_head} bytes")
        if not self.in_body:  # after the body: a chunked body's trailer fields, read and dropped
            self._headers.append((name, value.strip(b" \t")))

    def on_headers_complete(self):
        self.in_head, self.in_body, self.body_bytes = False, True, 0
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise HTTPError(505, f"HTTP version {version} is not supported: use HTTP/1.1")
        names = [name.lower() for name, _ in self._headers]
        hosts = names.count(b"host")
        if hosts > 1 or (version == "1.1" and hosts == 0):
            raise HTTPError(400, "bad request: an HTTP/1.1 request needs exactly one Host header")
        codings = [value for name, value in self._headers if name.lower() == b"transfer-encoding"]
        if codings:
            if version == "1.0":
                raise HTTPError(400, "bad request: Transfer-Encoding in an HTTP/1.0 request")
            if len(codings) > 1 or codings[0].lower() != b"chunked":
                raise HTTPError(501, "Transfer-Encoding other than 'chunked' alone is not supported")
        length = header_value(self._headers, b"content-length")
        if length is not None and int(length) > self.limits.max_body:  # llhttp checked it is digits
            raise self._too_large()
        expect = header_value(self._headers, b"expect")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise HTTPError(417, "the only Expect understood is 100-continue")
            self.expect_continue = version == "1.1"

    def on_body(self, body: bytes):
        self._body += body
        if len(self._body) > self.limits.max_body:
            raise self._too_large()

    def _too_large(self):
        # The app's words for it, and nginx's in deploy/local_cluster.sh: one answer, whoever gives it.
        return HTTPError(413, f"request body too large: the limit is {self.limits.max_body} bytes (MAX_UPLOAD_BYTES)")

    def on_message_complete(self):
        self.in_head = self.in_body = False
        self.expect_continue = False
        self.requests.append(Request(self._parser.get_method().decode("ascii"), self._url,
                                     self._parser.get_http_version(), self._headers, bytes(self._body),
                                     self._parser.should_keep_alive()))
        self._reset()
