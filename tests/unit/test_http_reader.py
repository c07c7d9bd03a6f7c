"""The worker's HTTP reader (classify_server.http_server.reader), in process: property-based against h11.

Valid requests are generated, then mutated (bytes flipped, inserted, deleted, the request truncated or
two run together) and fed to a RequestReader whole and split at every offset. The properties: no
exception escapes; the outcome does not depend on how the bytes were split; and every request the
reader accepts is read the same (method, target, version, headers, body) by h11, a second, independent
strict parser, from the same bytes: where they disagree, a request could be smuggled past a proxy that
reads like one and a server that reads like the other. FUZZ_EXAMPLES (default 200) bounds each test.
"""
import os

import h11
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from classify_server.http_server.reader import HTTPError, Limits, RequestReader

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None, database=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits(max_body=4096)

TOKEN = st.from_regex(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,12}", fullmatch=True)
VALUE = st.from_regex(r"([\x21-\x7e\x80-\xff]([\x20-\x7e\t]{0,20}[\x21-\x7e])?)?", fullmatch=True)
TARGET = st.from_regex(r"/[A-Za-z0-9._~%!$&'()*+,;=:@/-]{0,24}(\?[A-Za-z0-9=&%._/?-]{0,16})?", fullmatch=True)
FRAMED = ("host", "content-length", "transfer-encoding", "expect", "connection", "upgrade", "te", "trailer")


@st.composite
def requests(draw):
    """Bytes of one valid HTTP/1.1 request, its body framed by Content-Length, chunks or nothing."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    headers = [(b"Host", b"example.test")]
    for name, value in draw(st.lists(st.tuples(TOKEN, VALUE), max_size=5)):
        if name.lower() not in FRAMED:
            headers.append((name.encode(), value.encode("latin-1")))
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "none"] if not body else ["length", "chunked"]))
    if draw(st.booleans()):
        headers.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
        payload = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        payload = b"".join(b"%x" % len(p) + draw(st.sampled_from([b"", b";ext=1", b";a"])) + b"\r\n" + p + b"\r\n"
                           for p in pieces) + b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: t\r\n"])) + b"\r\n"
    else:
        payload = b""
    head = draw(st.permutations(headers))
    return (f"{method} {draw(TARGET)} HTTP/1.1\r\n".encode() + b"".join(n + b": " + v + b"\r\n" for n, v in head)
            + b"\r\n" + payload)


@st.composite
def mutated(draw):
    data = draw(requests())
    if draw(st.booleans()):
        data += draw(requests())  # pipelined
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data = data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1:]
        elif kind == "insert":
            data = data[:at] + draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b";", b"-",
                                                     b"0", b"f", b"x", b",", b"\xb9", b"\xff"])) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + 1:]
        elif kind == "truncate":
            data = data[:at]
        else:  # a fragment of a request, as a header or chunk line might be smuggled in
            data = data[:at] + draw(st.sampled_from([b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                                                     b"\r\n0\r\n\r\n", b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
                                                     b"Transfer-Encoding: identity, chunked\r\n"])) + data[at:]
    return data


def read(data, pieces=(None,)):
    """(requests as comparable tuples, the refusal's status or None) of `data` fed in the given pieces."""
    reader = RequestReader(LIMITS)
    start = 0
    for end in (*pieces, len(data)):
        end = len(data) if end is None else end
        reader.feed(data[start:end])
        start = end
    got = [(r.method, r.target, r.version, [(n.lower(), v) for n, v in r.headers], r.body) for r in reader.requests]
    return got, (reader.error.status if reader.error else None), reader


def h11_read(data, count):
    """The first `count` requests h11 reads from `data` (it answers each with an empty 200 to go on)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMITS.max_head)
    conn.receive_data(data.lstrip(b"\r\n"))  # RFC 9112 2.2: empty lines before a request line may be ignored
    got, current, body = [], None, b""
    while len(got) < count:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            break
        if isinstance(event, h11.Request):
            current, body = event, b""
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            got.append((current.method.decode(), bytes(current.target), current.http_version.decode(),
                        [(n.lower(), bytes(v)) for n, v in current.headers.raw_items()], body))
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
    return got


def agree_with_h11(data):
    got, _, _ = read(data)
    if got:
        assert h11_read(data, len(got)) == got, data


@FUZZ
@given(requests())
def test_valid_requests_are_read_as_h11_reads_them(data):
    got, error, reader = read(data)
    assert error is None and len(got) == 1 and reader.idle, (data, error)
    assert h11_read(data, 1) == got


@FUZZ
@given(mutated())
def test_mutated_requests_never_raise_and_what_is_accepted_h11_reads_the_same(data):
    agree_with_h11(data)


@FUZZ
@given(mutated())
def test_the_outcome_does_not_depend_on_how_the_bytes_arrive(data):
    whole, error, _ = read(data)
    for at in range(len(data) + 1):
        assert read(data, (at,))[:2] == (whole, error), (data, at)
    assert read(data, range(len(data)))[:2] == (whole, error)  # a byte at a time


# --- what RFC 9112 says to refuse, one case each ---------------------------------------------------

HOST = b"Host: a\r\n"
REFUSED = {
    "content_length_and_chunked": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    "differing_lengths": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    "length_superscript_one": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: \xb9\r\n\r\na"),
    "length_of_4301_digits": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: " + b"9" * 4301 + b"\r\n\r\n"),
    "length_with_plus": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +3\r\n\r\nabc"),
    "negative_chunk_size": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n-6\r\nabc"),
    "chunk_size_0x": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n"),
    "chunk_size_underscore": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n1_0\r\n"),
    "chunk_size_space": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n"),
    "chunk_size_overflow": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40),
    "no_crlf_after_chunk": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n"),
    "bare_lf": (400, b"POST / HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc"),
    "bare_cr": (400, b"POST / HTTP/1.1\r\nHost: a\rContent-Length: 3\r\n\r\nabc"),
    "obsolete_line_folding": (400, b"GET / HTTP/1.1\r\n" + HOST + b"X: b\r\n c\r\n\r\n"),
    "space_before_colon": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length : 3\r\n\r\nabc"),
    "control_character_in_a_header": (400, b"GET / HTTP/1.1\r\n" + HOST + b"X: a\x01b\r\n\r\n"),
    "chunked_then_gzip": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, gzip\r\n\r\n"),
    "identity_then_chunked": (501, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: identity, chunked\r\n\r\n"),
    "gzip_then_chunked": (501, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n"),
    "two_transfer_encodings": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n"),
    "chunked_in_http_1_0": (400, b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    "no_host": (400, b"GET / HTTP/1.1\r\n\r\n"),
    "two_hosts": (400, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    "http_0_9": (505, b"GET /\r\n\r\n"),
    "http_2_0_line": (505, b"GET / HTTP/2.0\r\n\r\n"),
    "unknown_expectation": (417, b"POST / HTTP/1.1\r\n" + HOST + b"Expect: 200-ok\r\nContent-Length: 1\r\n\r\n"),
    "target_over_the_line_limit": (414, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"),
    "a_header_line_over_its_limit": (431, b"GET / HTTP/1.1\r\n" + HOST + b"X: " + b"a" * 9000 + b"\r\n\r\n"),
    "too_many_headers": (431, b"GET / HTTP/1.1\r\n" + HOST + b"X: a\r\n" * 101 + b"\r\n"),
    "header_lines_that_never_end": (431, b"GET / HTTP/1.1\r\n" + HOST + (b"X-" + b"a" * 7000 + b": b\r\n") * 10),
    "one_line_that_never_ends": (431, b"GET / HTTP/1.1\r\n" + HOST + b"X: " + b"a" * 70000),
    "declared_body_over_the_limit": (413, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 4097\r\n\r\n"),
    "chunked_body_over_the_limit": (413, b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                                    + b"800\r\n" + b"a" * 2048 + b"\r\n" + b"801\r\n" + b"a" * 2049 + b"\r\n"),
    "upgrade_with_a_body": (400, b"POST / HTTP/1.1\r\n" + HOST + b"Connection: upgrade\r\nUpgrade: h2c\r\n"
                            b"Content-Length: 2\r\n\r\nab"),
    "unknown_method": (400, b"BREW / HTTP/1.1\r\n" + HOST + b"\r\n"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_rfc_9112_says_to_refuse_is_refused(case):
    status, data = REFUSED[case]
    got, error, reader = read(data)
    assert (got, error) == ([], status), (got, error)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # nothing more is read after a refusal
    assert not reader.requests


def test_a_request_after_a_refused_pipelined_one_is_never_read():
    got, error, _ = read(b"GET /a HTTP/1.1\r\n" + HOST + b"\r\n" + REFUSED["negative_chunk_size"][1]
                         + b"\r\nGET /hidden HTTP/1.1\r\n" + HOST + b"\r\n")
    assert [r[1] for r in got] == [b"/a"] and error == 400


def test_accepted_odd_but_valid_requests():
    got, error, reader = read(b"\r\nPOST /p?q=1 HTTP/1.1\r\nhOsT:  a \t\r\nTransfer-Encoding: Chunked\r\n"
                              b"Expect: 100-continue\r\n\r\n3;x=y\r\nabc\r\n0\r\nHost: trailer\r\n\r\n")
    assert error is None and got == [("POST", b"/p?q=1", "1.1", [(b"host", b"a"), (b"transfer-encoding", b"Chunked"),
                                                                  (b"expect", b"100-continue")], b"abc")]
    got, error, reader = read(b"GET /x HTTP/1.0\r\n\r\n")  # HTTP/1.0 needs no Host; it closes by default
    assert error is None and [r.keep_alive for r in reader.requests] == [False]
    got, error, reader = read(b"GET / HTTP/1.1\r\n" + HOST + b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\nPRI *")
    assert error is None and reader.closed and [r.keep_alive for r in reader.requests] == [False]


def test_100_continue_is_asked_for_once_the_head_is_in_and_not_when_the_body_came_with_it():
    reader = RequestReader(LIMITS)
    reader.feed(b"POST / HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert reader.expect_continue and reader.in_body
    reader.expect_continue = False
    reader.feed(b"abc")
    assert [r.body for r in reader.requests] == [b"abc"] and reader.idle
    got, error, reader = read(b"POST / HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    assert not reader.expect_continue and len(got) == 1


def test_http_error_carries_its_status():
    assert HTTPError(413, "too large").status == 413
