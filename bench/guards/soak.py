"""Guard: re-run before a release; minutes of load must end without errors, replaced workers or growth.

Soak: `gunicorn classify_server:app` under steady load for minutes; errors, latency, worker memory.

    python -m bench.guards.soak                          # 3 minutes at concurrency 16, 2 workers, 127.0.0.1
    python -m bench.guards.soak --duration 600 --model_dir model
    python -m bench.guards.soak --url http://127.0.0.1:8000 --master_pid 1234   # a server already running

Starts gunicorn (the project's gunicorn.conf.py) over --model_dir, or over a small model it trains
first on generated images; keeps --concurrency kept-alive connections busy with POST / (eight
different images, each answer checked against the one it got at the start) until --duration seconds
or --max_requests requests, whichever comes first. Prints requests, errors by kind, p50/p90/p99,
throughput, and each worker's RSS after warm-up (start) and at the end, with the growth; exits 1 when
there were errors, a worker was replaced, or a worker grew by 10% or more. The client is asyncio on
raw sockets: a few percent of one core at this rate, so it barely competes with the server.

Slow clients and crowds: bench/abuse.py.
"""
import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import _common as c

BOUNDARY = b"soak-boundary-5e1f"


def images():
    """Eight distinct encoded images (JPEG and PNG, several sizes): name -> bytes."""
    from PIL import Image, ImageDraw
    out = {}
    for i, (size, fmt) in enumerate([((640, 480), "JPEG"), ((320, 240), "PNG"), ((1024, 768), "JPEG"),
                                     ((224, 224), "PNG"), ((800, 600), "JPEG"), ((300, 400), "JPEG"),
                                     ((128, 96), "PNG"), ((1200, 900), "JPEG")]):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 120, (size[1], size[0], 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        colour = [(220, 30, 30), (30, 200, 40), (30, 40, 220)][i % 3]
        w, h = size
        draw.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out[f"{i}.{fmt.lower()}"] = buffer.getvalue()
    return out


def request_bytes(host, port, name, data):
    body = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="data"; filename="' + name.encode()
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + b"\r\n--" + BOUNDARY + b"--\r\n")
    head = (f"POST / HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary="
            f"{BOUNDARY.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def exchange(reader, writer, raw, timeout):
    """One request on an open connection: (status, body, the server closes the connection)."""
    writer.write(raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
    return status, body, headers.get("connection", "").lower() == "close"


def same_answer(got, expected, tol=1e-5):
    return ([label for label, _ in got] == [label for label, _ in expected]
            and all(abs(a - b) <= tol for (_, a), (_, b) in zip(got, expected)))


class Soak:
    def __init__(self, host, port, requests_by_name, expected, concurrency, duration, max_requests, timeout):
        self.host, self.port, self.requests, self.expected = host, port, requests_by_name, expected
        self.concurrency, self.duration, self.max_requests, self.timeout = concurrency, duration, max_requests, timeout
        self.latencies, self.errors, self.sent = [], {}, 0

    def error(self, kind):
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def client(self, index, deadline):
        names = sorted(self.requests)
        connection = None
        i = index
        while time.monotonic() < deadline and self.sent < self.max_requests:
            self.sent += 1
            name = names[i % len(names)]
            i += 1
            start = time.monotonic()
            try:
                if connection is None:
                    connection = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)
                status, body, close = await exchange(*connection, self.requests[name], self.timeout)
                if status != 200:
                    self.error(f"HTTP {status}")
                elif not same_answer(json.loads(body), self.expected[name]):
                    self.error("wrong answer")
                else:
                    self.latencies.append(time.monotonic() - start)
                if close:
                    connection[1].close()
                    connection = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.error(type(exc).__name__)
                if connection is not None:
                    connection[1].close()
                    connection = None
                await asyncio.sleep(0.1)
        if connection is not None:
            connection[1].close()

    async def run(self):
        deadline = time.monotonic() + self.duration
        await asyncio.gather(*(self.client(i, deadline) for i in range(self.concurrency)))


async def warm_up(host, port, requests_by_name, timeout):
    """Each image once: its answer is the reference for the whole run."""
    reader, writer = await asyncio.open_connection(host, port)
    expected = {}
    for name, raw in requests_by_name.items():
        status, body, _ = await exchange(reader, writer, raw, timeout)
        if status != 200:
            raise SystemExit(f"warm-up request for {name} answered {status}: {body[:200]!r}")
        expected[name] = json.loads(body)
    writer.close()
    return expected


def train_small_model(out):
    """A small model over generated images (a minute): MobileNetV2, real weights when ../shared has them."""
    from PIL import Image
    images_dir = os.path.join(out, "images")
    for label, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
        os.makedirs(os.path.join(images_dir, label))
        for i in range(12):
            rng = np.random.default_rng(hash((label, i)) % 2**32)
            pixels = rng.integers(0, 90, (96, 128, 3), dtype=np.uint8)
            pixels[24:72, 32:96] = colour
            Image.fromarray(pixels).save(os.path.join(images_dir, label, f"{i}.jpg"))
    weights = c.MOBILENET_WEIGHTS if os.path.isfile(c.MOBILENET_WEIGHTS) else "none"
    model = os.path.join(out, "model")
    code, wall, lines = c.run_timed([sys.executable, "-m", "retrain", "--image_dir", images_dir, "--architecture",
                                     "mobilenet_v2", "--weights", weights, "--how_many_training_steps", "100",
                                     "--output_dir", model, "--bottleneck_dir", os.path.join(out, "cache"),
                                     "--summaries_dir", ""], timeout=900)
    if code != 0:
        raise SystemExit("retrain failed:\n" + "\n".join(line for _, _, line in lines[-20:]))
    c.log(f"trained a small model in {wall:.0f}s: {model}")
    return model


def start_server(model_dir, workers, port):
    env = dict(os.environ, MODEL_DIR=os.path.abspath(model_dir), WEB_CONCURRENCY=str(workers), ACCESS_LOG="",
               PORT=str(port), HOST="127.0.0.1")
    log = open(os.path.join(tempfile.mkdtemp(prefix="soak-"), "gunicorn.log"), "w+b")
    process = c.start([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{port}"],
                      cwd=c.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import urllib.request
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise SystemExit(f"gunicorn exited with {process.returncode}:\n{log.read().decode(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200 and len(c.children_of(process.pid)) >= workers:
                    return process, log
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("gunicorn not ready after 300 s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=180, help="seconds of load after warm-up (default 180)")
    p.add_argument("--max_requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup", type=float, default=15, help="seconds of load before the start RSS is read")
    p.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY of the gunicorn started here")
    p.add_argument("--model_dir", help="serve this model (default: train a small one first)")
    p.add_argument("--url", help="an already running server, http://127.0.0.1:PORT (with --master_pid)")
    p.add_argument("--master_pid", type=int, help="its gunicorn master, to find the workers' memory")
    p.add_argument("--timeout", type=float, default=30, help="seconds for one request")
    p.add_argument("--json", help="also write the figures here")
    flags = p.parse_args(argv)

    if flags.url:
        host, port = flags.url.split("//")[1].split(":")
        port, master, server = int(port.rstrip("/")), flags.master_pid, None
    else:
        if flags.model_dir:
            model_dir = flags.model_dir
        else:
            import atexit
            import shutil
            scratch = tempfile.mkdtemp(prefix="soak-model-")
            atexit.register(shutil.rmtree, scratch, True)
            model_dir = train_small_model(scratch)
        host, port = "127.0.0.1", c.free_port()
        c.log(f"starting gunicorn, {flags.workers} workers, on {host}:{port} over {model_dir}")
        server, server_log = start_server(model_dir, flags.workers, port)
        c.log(f"gunicorn's log: {server_log.name}")
        master = server.pid
    requests_by_name = {name: request_bytes(host, port, name, data) for name, data in images().items()}
    expected = asyncio.run(warm_up(host, port, requests_by_name, flags.timeout))
    workers = c.children_of(master) if master else []  # without --master_pid: no memory figures
    rss_idle = {pid: c.rss_mib(pid) for pid in workers}

    c.log(f"warm-up: {flags.warmup:.0f}s at concurrency {flags.concurrency}")
    warm = Soak(host, port, requests_by_name, expected, flags.concurrency, flags.warmup, flags.max_requests,
                flags.timeout)
    asyncio.run(warm.run())
    rss_start = {pid: c.rss_mib(pid) for pid in workers}
    load_start = c.load_average()
    c.log(f"soak: {flags.duration:.0f}s (at most {flags.max_requests} requests) at concurrency {flags.concurrency}")
    soak = Soak(host, port, requests_by_name, expected, flags.concurrency, flags.duration, flags.max_requests,
                flags.timeout)
    samples = []

    async def sample_memory():
        while True:
            await asyncio.sleep(10)
            samples.append({pid: c.rss_mib(pid) for pid in workers})

    async def soak_and_sample():
        sampler = asyncio.ensure_future(sample_memory())
        started = time.monotonic()
        await soak.run()
        sampler.cancel()
        return time.monotonic() - started

    wall = asyncio.run(soak_and_sample())
    rss_end = {pid: c.rss_mib(pid) for pid in workers}
    workers_after = c.children_of(master) if master else []
    busy = [b for b in c.other_busy_processes(exclude=[master or 0] + workers) if b[1]]
    if server is not None:
        c.stop(server)

    latencies = np.array(soak.latencies) * 1000
    errors = sum(soak.errors.values())
    growth = {pid: (rss_end[pid] - rss_start[pid]) / rss_start[pid] * 100 if rss_start[pid] and rss_end[pid]
              else float("nan") for pid in workers}
    figures = {
        "revision": c.revision(), "duration_s": round(wall, 1), "concurrency": flags.concurrency,
        "requests": int(soak.sent), "ok": len(soak.latencies), "errors": errors, "errors_by_kind": soak.errors,
        "throughput_rps": round(len(soak.latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "p90_ms": round(float(np.percentile(latencies, 90)), 1) if len(latencies) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "max_ms": round(float(latencies.max()), 1) if len(latencies) else None,
        "workers": [{"pid": pid, "rss_idle_mib": round(rss_idle[pid] or 0, 1), "rss_start_mib": round(rss_start[pid] or 0, 1),
                     "rss_end_mib": round(rss_end[pid] or 0, 1), "rss_max_mib": round(max(
                         [s.get(pid) or 0 for s in samples] + [rss_end[pid] or 0]), 1),
                     "growth_pct": round(growth[pid], 2)} for pid in workers],
        "rss_every_10s_mib": {str(pid): [round(x.get(pid) or 0) for x in samples] for pid in workers},
        "workers_replaced": sorted(set(workers) ^ set(workers_after)),
        "load_average_start": load_start, "load_average_end": c.load_average(),
        "other_busy_processes": busy[:8],
    }
    print(c.table(["requests", "ok", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                  [[figures["requests"], figures["ok"], figures["errors"], figures["throughput_rps"],
                    figures["p50_ms"], figures["p90_ms"], figures["p99_ms"], figures["max_ms"]]],
                  title=f"soak: {wall:.0f}s at concurrency {flags.concurrency}, {len(workers)} workers"))
    print(c.table(["worker", "RSS idle MiB", "RSS start MiB", "RSS end MiB", "RSS max MiB", "growth"],
                  [[str(w["pid"]), w["rss_idle_mib"], w["rss_start_mib"], w["rss_end_mib"], w["rss_max_mib"],
                    f"{w['growth_pct']:+.2f}%"] for w in figures["workers"]]))
    for pid, series in figures["rss_every_10s_mib"].items():
        print(f"worker {pid} RSS every 10 s (MiB): {' '.join(map(str, series))}")
    print(f"errors by kind: {soak.errors or 'none'}; workers replaced: {figures['workers_replaced'] or 'none'}")
    print(f"load average {' '.join(load_start)} -> {' '.join(figures['load_average_end'])}; {figures['revision']}")
    if busy:
        print("other processes busy at the end (contention):")
        for cpu, cmd in busy[:8]:
            print(f"  {cpu:5.2f} s/s  {cmd}")
    if flags.json:
        with open(flags.json, "w") as f:
            json.dump(figures, f, indent=2)
    ok = errors == 0 and not figures["workers_replaced"] and all(g < 10 for g in growth.values())
    print("PASS" if ok else "FAIL: errors, a replaced worker, or memory growth of 10% or more")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
