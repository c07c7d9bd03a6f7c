"""Guard: re-run when the V2 adapters or Triton's extensions change; Triton's perf_analyzer against the
server's V2 HTTP and gRPC, beside wrk's multipart POST / in the same run.

    flock /tmp/cpu-heavy.lock .venv/bin/python -m bench.guards.perf_analyzer_bench \\
        [--model_dir DIR] [--rounds 3] [--window 4] [--concurrency 1,4,16] [--perf-analyzer-cache DIR]

perf_analyzer is the tool Triton's users measure a server with: it reads the model's configuration
(Triton's model configuration extension), sends V2 inference requests from --concurrency clients in a
closed loop, measures in windows of --window seconds until three in a row agree (within
--stability percent; at most --max-trials windows) and reads the server's side (queue, compute) from the
statistics extension. Here it sends the same 500x375 flower JPEG as wrk does (its --input-data: a JSON
file in a temporary folder, the JPEG in base64), one image a request, to V2 REST (`-i http`) and V2 gRPC
(`-i grpc`); wrk POSTs it as multipart to / for 3 windows' time. By default (--stability 1000) every
measurement is perf_analyzer's first three windows, a fixed time as wrk's. The three sides take turns at each
concurrency, their order rotated each round; the table gives medians over the rounds (req/s, p50 and
p99 latency; perf_analyzer's figures are those of its last three windows) and each side's req/s over
wrk's. perf_analyzer and wrk share the machine's cores with the servers.

The model is --model_dir, or mobilenet_v2 with random weights (each image costs what a real one does),
its head trained on a few flower photos. The servers: `gunicorn classify_server:app` and the gRPC server
(python -m classify_server.grpc_server), both with their defaults, as protocol_bench starts them.

perf_analyzer comes from PyPI's perf-analyzer wheel; bench/perf_analyzer_env.sh prepares it (on a
glibc older than 2.38, under Debian 13's loader and libraries) in --perf-analyzer-cache and prints the
command that runs it; --perf-analyzer 'COMMAND' runs another one instead.

Traffic goes to 127.0.0.1 only; every run is bounded (wrk -d, perf_analyzer's trials, a timeout on every
child); every process and the temporary folder are removed at exit.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from bench import _common as C
from bench.guards import protocol_bench, serve_bench

ENV_SCRIPT = os.path.join(C.ROOT, "bench", "perf_analyzer_env.sh")
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "classify-bench",
                             "perf_analyzer")
WRK = "wrk multipart POST /"
SIDES = (WRK, "perf_analyzer V2 HTTP", "perf_analyzer V2 gRPC")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", help="the model to serve (default: mobilenet_v2, random weights, made here)")
    p.add_argument("--architecture", default="mobilenet_v2", help="of the model made without --model_dir")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=4.0, help="perf_analyzer's measurement window, seconds "
                                                             "(wrk runs 3 windows' time)")
    p.add_argument("--stability", type=int, default=1000,
                   help="perf_analyzer's --stability-percentage; by default so wide that its first three windows "
                        "count, whatever their spread, as wrk's fixed time does (on a busy machine perf_analyzer's "
                        "own 10 %% may never be met)")
    p.add_argument("--max-trials", type=int, default=8, help="perf_analyzer's windows at most per measurement")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--image", help="the JPEG to send (default: the first 500x375 flower photo)")
    p.add_argument("--perf-analyzer-cache", default=DEFAULT_CACHE,
                   help="where bench/perf_analyzer_env.sh keeps the wheel and Debian 13's libraries")
    p.add_argument("--perf-analyzer", help="the command that runs perf_analyzer (default: prepared by "
                                           "bench/perf_analyzer_env.sh)")
    return p.parse_args(argv)


def perf_analyzer_command(flags):
    """The argv prefix that runs perf_analyzer."""
    if flags.perf_analyzer:
        return shlex.split(flags.perf_analyzer)
    env = dict(os.environ, PYTHON=sys.executable)
    C.log(f"preparing perf_analyzer in {flags.perf_analyzer_cache} (bench/perf_analyzer_env.sh)")
    done = subprocess.run(["bash", ENV_SCRIPT, flags.perf_analyzer_cache], env=env, stdout=subprocess.PIPE,
                          text=True, timeout=1200)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit("bench/perf_analyzer_env.sh failed (its messages are above): fix what it says, or "
                         "pass --perf-analyzer 'COMMAND'")
    return shlex.split(done.stdout.strip().splitlines()[-1])


def parse_csv(text):
    """perf_analyzer's -f CSV: [{concurrency, rps, p50_ms, p99_ms}], one per concurrency measured
    (its latencies are in microseconds)."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if not row.get("Concurrency"):
            continue
        rows.append({"concurrency": int(row["Concurrency"]), "rps": float(row["Inferences/Second"]),
                     "p50_ms": int(row["p50 latency"]) / 1000, "p99_ms": int(row["p99 latency"]) / 1000})
    if not rows:
        raise ValueError("no measurement in perf_analyzer's CSV:\n" + text[:500])
    return rows


def input_data(jpeg, work):
    """perf_analyzer's --input-data file: the JPEG as the one element of `images`, in base64. perf_analyzer
    sends b64 data as it is, so a BYTES element carries the binary layout's 4-byte length in front."""
    path = os.path.join(work, "input-data.json")
    element = struct.pack("<I", len(jpeg)) + jpeg
    with open(path, "w") as f:
        json.dump({"data": [{"images": {"b64": base64.b64encode(element).decode()}}]}, f)
    return path


def perf_analyzer(command, protocol, port, data, concurrency, flags, work):
    """{rps, p50_ms, p99_ms} of one perf_analyzer run at `concurrency`."""
    out = os.path.join(work, f"perf-{protocol}-{concurrency}.csv")
    cmd = [*command, "-m", "model", "-u", f"127.0.0.1:{port}", "-i", protocol, "--input-data", data,
           "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval",
           str(int(flags.window * 1000)), "--stability-percentage", str(flags.stability),
           "--max-trials", str(flags.max_trials), "-f", out]
    timeout = flags.window * (flags.max_trials + 2) + 120
    code, _, lines = C.run_timed(cmd, timeout, cwd=work)
    if code != 0 or not os.path.exists(out):
        raise SystemExit(f"perf_analyzer failed ({code}): {shlex.join(cmd)}\n"
                         + "\n".join(line for _, _, line in lines[-25:]))
    with open(out) as f:
        (row,) = parse_csv(f.read())
    os.remove(out)
    return row


def run_wrk(port, lua, concurrency, flags):
    r = serve_bench.wrk(f"http://127.0.0.1:{port}/", lua, concurrency, max(1, round(3 * flags.window)))
    if r["non200"] or r["socket_errors"]:
        raise SystemExit(f"wrk at c={concurrency}: {r['non200']} non-200 answers, {r['socket_errors']} socket errors")
    return {"rps": r["rps"], "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000}


def wait_grpc_ready(port, timeout=240):
    """The gRPC server may still be loading its model when gunicorn answers."""
    import tritonclient.grpc as tritongrpc
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.is_model_ready("model"):
                    return
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the gRPC server on port {port} was not ready in {timeout} s")
            time.sleep(1)
    finally:
        client.close()


def main(argv=None):
    flags = parse_args(argv)
    levels = [int(c) for c in flags.concurrency.split(",")]
    command = perf_analyzer_command(flags)
    work = tempfile.mkdtemp(prefix="perf-analyzer-bench-")
    try:
        model_dir = flags.model_dir or C.make_model(work, flags.architecture, 200)
        image = flags.image or serve_bench.default_image()
        with open(image, "rb") as f:
            jpeg = f.read()
        body, lua = serve_bench.write_body(image, work)
        data = input_data(jpeg, work)
        busy = C.other_busy_processes()
        code_revision = C.revision()
        http_port, grpc_port = protocol_bench.start_servers(work, model_dir)
        status, answer = serve_bench.post(http_port, "/", body)
        if status != 200:
            raise SystemExit(f"multipart POST / answered {status}: {answer[:300]!r}")
        wait_grpc_ready(grpc_port)
        runs = {WRK: lambda c: run_wrk(http_port, lua, c, flags),
                SIDES[1]: lambda c: perf_analyzer(command, "http", http_port, data, c, flags, work),
                SIDES[2]: lambda c: perf_analyzer(command, "grpc", grpc_port, data, c, flags, work)}
        C.log("warming up: each side once at c=2")
        for side in SIDES:
            runs[side](2)
        results = {(side, c): [] for side in SIDES for c in levels}
        for r in range(flags.rounds):
            order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
            for c in levels:
                for side in order:
                    got = runs[side](c)
                    results[side, c].append(got)
                    C.log(f"round {r + 1} c={c} {side}: {got['rps']:.2f} req/s, p50 {got['p50_ms']:.1f} ms, "
                          f"p99 {got['p99_ms']:.1f} ms")
        print(table(results, levels, flags))
        C.print_machine(os.cpu_count() or 1, code_revision, busy)
    finally:
        C.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def table(results, levels, flags):
    def median(side, c, key):
        return statistics.median(r[key] for r in results[side, c])

    rows = []
    for c in levels:
        base = median(WRK, c, "rps")
        for side in SIDES:
            spread = [r["rps"] for r in results[side, c]]
            rows.append([str(c), side, f"{median(side, c, 'rps'):.2f}", f"{min(spread):.2f}-{max(spread):.2f}",
                         f"{median(side, c, 'p50_ms'):.1f}", f"{median(side, c, 'p99_ms'):.1f}",
                         f"{median(side, c, 'rps') / base:.3f}"])
    return C.table(["concurrency", "side", "req/s", "req/s min-max", "p50 ms", "p99 ms", "req/s / wrk's"], rows,
                   title=f"one 500x375 JPEG per request, {flags.rounds} rounds (medians); perf_analyzer windows of "
                         f"{flags.window:g} s, wrk {max(1, round(3 * flags.window))} s")


if __name__ == "__main__":
    sys.exit(main())
