"""Guard: re-run when the server's front (reader, timeouts, overload) changes; tests/e2e/test_overload.py runs it too.

Slow clients and a crowd against a running server, on 127.0.0.1: what issue 18 asks it to survive.

    python -m bench.abuse --url http://127.0.0.1:8000            # both attacks, then the figures
    python -m bench.abuse --url http://127.0.0.1:8080 --only crowd

slow: --header_drippers connections send a request's headers one line every 2 s, never finishing them,
and --body_drippers promise a 1 MB body and send one byte every 2 s, while one well-behaved client
posts an image, waits for the answer, and posts again (50 ms apart) for --seconds (20): how many of
its requests were answered 200 and how fast, and when the server answered and closed each slow
connection (and with what status).

crowd: --clients (200) asyncio clients on kept-alive connections, each posting the image again as
soon as it has an answer, for --crowd_seconds (10): the answers by status, 503s without Retry-After,
connection failures (resets, timeouts), latency of the 200s and of the 503s.

Every loop is bounded in count and time; the image is a small generated JPEG (tests use these
functions too: tests/e2e/test_overload.py).
"""
import argparse
import asyncio
import io
import json
import select
import socket
import threading
import time

import requests


def jpeg(size=(64, 48)):
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", size, (220, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def multipart_request(image, host="127.0.0.1"):
    body = (b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.jpg\"\r\n\r\n" + image
            + b"\r\n--b--\r\n")
    return (b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body))) + body


class Dripper:
    """One connection sending a request a piece at a time; notes the server's answer and when it closed."""

    def __init__(self, port, head, pieces):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setblocking(False)
        self.started = time.monotonic()
        self.pieces = iter(pieces)
        self.sock.send(head)
        self.received = b""
        self.closed_after = None  # seconds from connecting until the server closed the connection

    def step(self):
        try:
            self.sock.send(next(self.pieces))
        except (StopIteration, OSError):
            pass

    def read(self):
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.received += data
        if not data:
            self.closed_after = time.monotonic() - self.started
            self.sock.close()

    @property
    def status(self):
        return int(self.received.split(b" ")[1]) if self.received.startswith(b"HTTP/1.1 ") else None


def header_dripper(port):
    return Dripper(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n", (b"X-Drip-%d: x\r\n" % i for i in range(1000)))


def body_dripper(port):
    return Dripper(port, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 1000000\r\n\r\n--b", (b"x" for _ in range(1000)))


def drip(drippers, interval, seconds):
    """Every `interval` s each dripper still open sends its next piece, for at most `seconds`; answers
    are read as they come. Connections still open at the end are closed."""
    deadline = time.monotonic() + seconds
    next_step = time.monotonic()
    while time.monotonic() < deadline:
        open_ = [d for d in drippers if d.closed_after is None]
        if not open_:
            break
        if time.monotonic() >= next_step:
            for d in open_:
                d.step()
            next_step += interval
        wait = max(0.0, min(next_step, deadline) - time.monotonic())
        readable = select.select([d.sock for d in open_], [], [], wait)[0]
        for d in open_:
            if d.sock in readable:
                d.read()
    for d in drippers:
        if d.closed_after is None:
            d.sock.close()


def slow_clients(url, image, header_drippers=32, body_drippers=32, seconds=20, interval=2.0):
    """The slow-client attack with one well-behaved client beside it: (its [(status, seconds)], the
    header drippers, the body drippers)."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    headers = [header_dripper(port) for _ in range(header_drippers)]
    bodies = [body_dripper(port) for _ in range(body_drippers)]
    dripping = threading.Thread(target=drip, args=(headers + bodies, interval, seconds + 5), daemon=True)
    dripping.start()
    answers = []
    deadline = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                status = session.post(url + "/", files={"data": ("x.jpg", image)}, timeout=5).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            answers.append((status, time.monotonic() - start))
            time.sleep(0.05)
    dripping.join(seconds + 10)
    return answers, headers, bodies


async def crowd_client(port, request, deadline, results):
    """Requests one after another on a kept-alive connection until `deadline`; each result is (status or
    what failed, Retry-After, seconds). Reconnects when the server closes."""
    reader = writer = None
    try:
        while time.monotonic() < deadline:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            try:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
                results.append((int(lines[0].split()[1]), headers.get("retry-after"), time.monotonic() - start))
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                results.append((type(exc).__name__, None, time.monotonic() - start))
                writer.close()
                reader = writer = None
    except OSError as exc:  # could not connect
        results.append((type(exc).__name__, None, 0.0))
    finally:
        if writer is not None:
            writer.close()


def crowd(url, image, clients=200, seconds=10):
    """(every answer as (status, Retry-After, seconds), the seconds it took, the CPU seconds this process
    spent: the clients' share of the machine) of `clients` at once."""
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    request, results = multipart_request(image), []

    async def everyone():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(crowd_client(port, request, deadline, results) for _ in range(clients)))

    started, cpu = time.monotonic(), time.process_time()
    asyncio.run(everyone())
    return results, time.monotonic() - started, time.process_time() - cpu


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def slow_figures(answers, headers, bodies):
    def closed(drippers):
        times = [d.closed_after for d in drippers if d.closed_after is not None]
        return {"closed": len(times), "of": len(drippers), "statuses": sorted({str(d.status) for d in drippers}),
                "closed_after_s": [round(min(times), 1), round(max(times), 1)] if times else None}
    seconds = [s for _, s in answers]
    return {"requests": len(answers), "answered_200": round(sum(s == 200 for s, _ in answers) / len(answers), 4),
            "p50_s": round(percentile(seconds, 0.5), 4), "max_s": round(max(seconds), 3),
            "header_drippers": closed(headers), "body_drippers": closed(bodies)}


def crowd_figures(results, took, client_cpu):
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    return {"seconds": round(took, 1), "answers": len(results), "200": len(ok), "503": len(shed),
            "503_without_retry_after": sum(r[1] is None for r in shed),
            "failed": sorted({str(r[0]) for r in results if r[0] not in (200, 503)}),
            "200_per_s": round(len(ok) / took, 1),
            "200_p50_s": ok and round(percentile([r[2] for r in ok], 0.5), 3),
            "200_max_s": ok and round(max(r[2] for r in ok), 3),
            "503_p99_s": shed and round(percentile([r[2] for r in shed], 0.99), 4),
            "503_max_s": shed and round(max(r[2] for r in shed), 4),
            "client_cpu_s": round(client_cpu, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server, http://127.0.0.1:PORT (loopback only)")
    p.add_argument("--only", choices=["slow", "crowd"], help="one attack only")
    p.add_argument("--header_drippers", type=int, default=32)
    p.add_argument("--body_drippers", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20, help="of the slow-client attack")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--crowd_seconds", type=float, default=10)
    flags = p.parse_args(argv)
    if not flags.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        p.error("--url must be on 127.0.0.1: this is an attack")
    image = jpeg()
    if flags.only != "crowd":
        figures = slow_figures(*slow_clients(flags.url, image, flags.header_drippers, flags.body_drippers,
                                             flags.seconds))
        print("slow clients:", json.dumps(figures))
    if flags.only != "slow":
        print("crowd:", json.dumps(crowd_figures(*crowd(flags.url, image, flags.clients, flags.crowd_seconds))))


if __name__ == "__main__":
    main()
