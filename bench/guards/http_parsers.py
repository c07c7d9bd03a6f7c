"""Guard: re-run when the request reader or httptools changes; what reading one request costs.

The two strict HTTP/1.1 parsers the worker could read requests with, side by side: llhttp (httptools,
what classify_server.http_server.reader uses) and h11 (pure Python), on the requests the server gets.

    .venv/bin/python -m bench.guards.http_parsers [--seconds 1] [--rounds 5]

Each request is read whole from its bytes, as the worker's loop reads it (arriving in 64 KiB pieces):
method, target, headers and body. The two sides alternate, round after round; prints microseconds per
request for each (median over the rounds, min-max) and h11 / httptools.
"""
import argparse
import os
import statistics
import time

import h11

from bench import _common as C
from classify_server.http_server.reader import RequestReader

FLOWER = os.path.join(C.FLOWERS, "daisy", "1031799732_e7f4008c03.jpg")
HEAD = b"Host: 127.0.0.1:8000\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"


def requests():
    jpeg = open(FLOWER, "rb").read() if os.path.exists(FLOWER) else os.urandom(100_000)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg"
            b"\r\n\r\n" + jpeg + b"\r\n--b--\r\n")
    chunked = b"".join(b"%x\r\n" % len(body[i:i + 8192]) + body[i:i + 8192] + b"\r\n"
                       for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
    return {
        "GET /healthz": b"GET /healthz HTTP/1.1\r\n" + HEAD + b"\r\n",
        f"POST / multipart JPEG ({len(body) // 1024} KiB)": (
            b"POST / HTTP/1.1\r\n" + HEAD + b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body),
        "the same, chunked (8 KiB chunks)": (
            b"POST / HTTP/1.1\r\n" + HEAD + b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked),
    }


def pieces(data, size=65536):
    return [data[i:i + size] for i in range(0, len(data), size)]


def read_httptools(parts):
    reader = RequestReader()
    for part in parts:
        reader.feed(part)
    request = reader.requests.popleft()
    return request.method, request.target, request.headers, request.body


def read_h11(parts):
    conn = h11.Connection(h11.SERVER)
    body = []
    for part in parts:
        conn.receive_data(part)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request.method, request.target, list(request.headers), b"".join(body)
    raise AssertionError("incomplete")


def per_request_us(read, parts, seconds):
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        read(parts)
        count += 1
    return (time.perf_counter() - start) / count * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.0, help="per side, per round, per request")
    p.add_argument("--rounds", type=int, default=5)
    flags = p.parse_args(argv)
    print("| request | httptools (llhttp) us | h11 us | h11 / httptools |")
    print("| --- | --- | --- | --- |")
    for name, data in requests().items():
        parts = pieces(data)
        assert read_httptools(parts)[3] == read_h11(parts)[3]  # both read the same body
        times = {"httptools": [], "h11": []}
        for round_ in range(flags.rounds):
            order = [("httptools", read_httptools), ("h11", read_h11)]
            for side, read in (order if round_ % 2 == 0 else order[::-1]):
                times[side].append(per_request_us(read, parts, flags.seconds))
        fast, slow = (statistics.median(times[s]) for s in ("httptools", "h11"))
        spread = {s: f"{min(t):.1f}-{max(t):.1f}" for s, t in times.items()}
        print(f"| {name} | {fast:.1f} ({spread['httptools']}) | {slow:.1f} ({spread['h11']}) | {slow / fast:.1f} |")


if __name__ == "__main__":
    main()
