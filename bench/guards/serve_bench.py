"""Guard: re-run when the server or its defaults change; throughput and latency against ceiling and alternatives.

Benchmark the classification server against its ceiling and against the alternatives.

    .venv/bin/python -m bench.guards.serve_bench [--quick] [--variant K=V,K=V ...]

One run, one model: graph.pb of the default architecture (inception_v3) with
--weights none (random weights cost the same per image as real ones), retrained
here on a few flower photos unless --model_dir is given. Prints tables of:

  a. the ceiling: float32 matmul GFLOP/s (numpy and TensorFlow, square matmul),
     the model's FLOPs per image (conv + matmul, summed from the frozen graph, and
     tf.compat.v1.profiler's count) and the images/s they allow; the raw in-process
     session.run throughput of graph.pb for each batch size and thread setting (each
     setting in a fresh process; sustained: images over the total time of the runs),
     also with two threads calling session.run at once; batch-1 latency (median); and
     the default server's compute layout alone: its one process, batch 1.
  b. the server: `gunicorn classify_server:app` (gunicorn.conf.py defaults; -b
     127.0.0.1:<free port>) under wrk (another process; a Lua script POSTs a multipart
     body with a 500x375 flower JPEG): throughput at each concurrency, p50/p90/p99,
     errors (non-2xx, socket errors), RSS of each worker (from /proc, peak). With
     --variant, the same for other settings (environment variables read by
     gunicorn.conf.py / classify_server.settings), in the same run; and the
     scale-out path, deploy/local_cluster.sh (nginx, least connections, before
     --cluster single-worker instances), under the same load. The default server's
     c = 1 overhead is also measured paired with a bare session.run (`paired`).
  c. the simple-ml-serving baseline: `python -m classify_server.label_image --graph
     ... --image ...` once per image (the graph reloaded for every image).
  d. a typical Flask app calling keras.Model.predict per request
     (bench/studies/alt_flask_predict.py), under gunicorn with the same worker count, same load.
  e. BentoML (bench/studies/bentoml_service.py) over the same graph.pb, from a separate
     virtualenv (--bentoml_venv); skipped, with the reason, when it is not there.
Then ratios against the targets.

Traffic goes to 127.0.0.1 only; every run is bounded (wrk -d, timeouts on every
child); every process started here is ended at exit (see bench/_common.py).
"""
import argparse
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import _common as C

STUDIES = os.path.join(C.ROOT, "bench", "studies")  # the alternatives (d, e) are served from there: no gunicorn.conf.py
BOUNDARY = "----servebench7MA4YWxkTrZu0gW"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
CORES = os.cpu_count() or 1


def _server_settings():
    """The service's settings (classify_server.settings) and the variables gunicorn.conf.py sets for its
    workers: never inherited from the caller's environment, so that "default" means the defaults."""
    from classify_server.settings import NAMES
    return NAMES | {"PROMETHEUS_MULTIPROC_DIR", "CLASSIFY_MODEL_LOADED_FLAG"}


SERVER_SETTINGS = _server_settings()


def caller_env():
    """This process's environment without any server setting (see _server_settings)."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_SETTINGS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: 3 s per load level, concurrency 1,4,16, fewer raw settings")
    p.add_argument("--model_dir", help="an existing model folder (default: retrain one, inception_v3, weights none)")
    p.add_argument("--architecture", default="inception_v3")
    p.add_argument("--image", help="the JPEG to send (default: the first 500x375 flower photo)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10, --quick 3)")
    p.add_argument("--concurrency", help="comma-separated wrk connection counts (default 1,2,4,8,16)")
    p.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V...]",
                   help="also run the server with these environment overrides, e.g. "
                        "WEB_CONCURRENCY=1,TF_INTRA_OP_THREADS=2 or WORKER_CLASS=sync (repeatable)")
    p.add_argument("--variants", help="several variants separated by ';' (same as repeating --variant)")
    p.add_argument("--reload_runs", type=int, help="label_image runs for the baseline (default 3, --quick 2)")
    p.add_argument("--bentoml_venv", default="/tmp/bentoml-venv",
                   help="virtualenv with bentoml and tensorflow(-cpu) (not the project's)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: raw, reload, flask, bentoml, server (the default server; "
                        "--variant runs still happen)")
    p.add_argument("--cluster", type=int, default=2, metavar="N",
                   help="also run deploy/local_cluster.sh N: nginx (least_conn) before N single-worker instances "
                        "with cores / N TensorFlow threads each (default 2; 0: skip; needs nginx)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (model, logs)")
    flags = p.parse_args(argv)
    flags.duration = flags.duration or (3 if flags.quick else 10)
    flags.concurrency = [int(c) for c in (flags.concurrency or ("1,4,16" if flags.quick else "1,2,4,8,16")).split(",")]
    flags.reload_runs = flags.reload_runs or (2 if flags.quick else 3)
    if flags.variants:
        flags.variant += [v for v in flags.variants.split(";") if v.strip()]
    flags.skip = {s.strip() for s in flags.skip.split(",") if s.strip()}
    return flags


def parse_variant(text):
    env = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --variant {text!r}: expected K=V[,K=V...]")
        env[key.strip()] = value.strip()
    return env


# ====================================================================== child modes (fresh processes)

def child_main(kind, opts):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if kind == "ceiling":
        print("BENCH_JSON " + json.dumps(ceiling(opts)), flush=True)
    elif kind == "sweep":
        print("BENCH_JSON " + json.dumps(sweep(opts)), flush=True)
    elif kind == "loop":
        loop(opts)
    elif kind == "app":
        print("BENCH_JSON " + json.dumps(app_overhead(opts)), flush=True)
    elif kind == "paired":
        print("BENCH_JSON " + json.dumps(paired(opts)), flush=True)


def ceiling(opts):
    import numpy as np
    import tensorflow as tf
    n, repeats = opts["n"], opts["repeats"]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n ** 3

    def best_rate(fn):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flop / min(times) / 1e9, flop / statistics.median(times) / 1e9

    np_best, np_median = best_rate(lambda: a @ b)
    ta, tb = tf.constant(a), tf.constant(b)
    tf_best, tf_median = best_rate(lambda: tf.linalg.matmul(ta, tb).numpy())

    # FLOPs per image, from the frozen graph with the input fixed at batch 1.
    graph_def = tf.compat.v1.GraphDef()
    with open(os.path.join(opts["model_dir"], "graph.pb"), "rb") as f:
        graph_def.ParseFromString(f.read())
    with open(os.path.join(opts["model_dir"], "model.json")) as f:
        size = json.load(f)["input_height"]
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (1, size, size, 3), name="fixed_input")
        tf.import_graph_def(graph_def, input_map={"input:0": x}, name="")
    conv = depthwise = matmul = 0
    counts = {}
    for op in graph.get_operations():
        counts[op.type] = counts.get(op.type, 0) + 1
        if op.type == "Conv2D":
            out, k = op.outputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            conv += 2 * out[0] * out[1] * out[2] * out[3] * k[0] * k[1] * k[2]
        elif op.type == "DepthwiseConv2dNative":
            out, k = op.outputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            depthwise += 2 * out[0] * out[1] * out[2] * out[3] * k[0] * k[1]
        elif op.type == "MatMul":
            a_shape, out = op.inputs[0].shape.as_list(), op.outputs[0].shape.as_list()
            k_dim = a_shape[0] if op.get_attr("transpose_a") else a_shape[1]
            matmul += 2 * out[0] * out[1] * k_dim
    try:
        prof = tf.compat.v1.profiler.profile(
            graph, options=tf.compat.v1.profiler.ProfileOptionBuilder(
                tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build())
        profiler_flops = prof.total_float_ops
    except Exception as exc:  # the profiler is best effort
        profiler_flops = None
        print(f"profiler failed: {exc}", file=sys.stderr)
    return {"numpy_gflops": np_best, "numpy_gflops_median": np_median, "tf_gflops": tf_best,
            "tf_gflops_median": tf_median, "n": n, "conv_flops": conv + depthwise + matmul,
            "conv_only": conv, "depthwise": depthwise, "matmul": matmul, "profiler_flops": profiler_flops,
            "op_counts": {k: v for k, v in counts.items() if k in ("Conv2D", "DepthwiseConv2dNative", "MatMul",
                                                                      "FusedBatchNormV3", "Relu", "AvgPool",
                                                                      "MaxPool")}}


def load_session(opts):
    import numpy as np

    from classify_server.core.inference import preprocess
    from classify_server.engines.tf_session import TFSessionEngine
    clf = TFSessionEngine(opts["model_dir"], None, opts["intra"], opts["inter"])
    clf.warm_up()
    with open(opts["image"], "rb") as f:
        pixels = preprocess(clf.input_spec, f.read(), None)
    return clf, pixels, np


def sweep(opts):
    """session.run throughput per batch size, and batch-1 latency, in this process's one session."""
    from classify_server.core.inference import preprocess
    clf, pixels, np = load_session(opts)
    results = {}
    for b in opts["batches"]:
        batch = np.stack([pixels] * b)
        clf.session.run(clf.output, {clf.input: batch})  # this shape's first run
        times = []
        deadline = time.perf_counter() + opts["min_time"]
        cpu0 = time.process_time()
        while len(times) < opts["min_runs"] or (time.perf_counter() < deadline and len(times) < 200):
            t = time.perf_counter()
            clf.session.run(clf.output, {clf.input: batch})
            times.append(time.perf_counter() - t)
        cpu = time.process_time() - cpu0
        results[b] = {"best": b / min(times), "median": b / statistics.median(times), "runs": len(times),
                      "sustained": b * len(times) / sum(times),
                      "per_cpu_second": b * len(times) / cpu, "cores": cpu / sum(times)}
        print(f"  intra {opts['intra']} inter {opts['inter']} batch {b}: best {results[b]['best']:.2f} img/s",
              file=sys.stderr, flush=True)
    # Two callers at once, a batch of one each: what a threaded worker does with two requests.
    import threading
    one = np.stack([pixels])
    for b in (1, 4):
        batch = np.stack([pixels] * b)
        counts, deadline = [0, 0], time.perf_counter() + opts["min_time"]

        def caller(i, batch=batch, counts=counts, deadline=deadline):
            while time.perf_counter() < deadline or counts[i] < opts["min_runs"]:
                clf.session.run(clf.output, {clf.input: batch})
                counts[i] += 1

        callers = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        t = time.perf_counter()
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
        rate = b * sum(counts) / (time.perf_counter() - t)
        results[f"{b}x2"] = {"best": rate, "median": rate, "sustained": rate, "runs": sum(counts)}
        print(f"  intra {opts['intra']} inter {opts['inter']} batch {b}, 2 callers: {rate:.2f} img/s",
              file=sys.stderr, flush=True)
    latencies = []
    for _ in range(opts["latency_runs"]):
        t = time.perf_counter()
        clf.session.run(clf.output, {clf.input: one})
        latencies.append(time.perf_counter() - t)
    # The server's own per-image path: decode + session.run of one image.
    with open(opts["image"], "rb") as f:
        data = f.read()
    decode = []
    for _ in range(opts["latency_runs"]):
        t = time.perf_counter()
        preprocess(clf.input_spec, data, None)
        decode.append(time.perf_counter() - t)
    return {"batches": results, "latency_ms": statistics.median(latencies) * 1000,
            "latency_min_ms": min(latencies) * 1000, "decode_ms": statistics.median(decode) * 1000}


def loop(opts):
    """Batch-1 session.run for opts['seconds'] once told to go (on stdin): the server's compute alone."""
    clf, pixels, np = load_session(opts)
    one = np.stack([pixels])
    clf.session.run(clf.output, {clf.input: one})
    print("READY", flush=True)
    sys.stdin.readline()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < opts["seconds"]:
        clf.session.run(clf.output, {clf.input: one})
        count += 1
    print("BENCH_JSON " + json.dumps({"count": count, "seconds": time.perf_counter() - t0}), flush=True)


def app_overhead(opts):
    """The WSGI app alone, in this process (Flask test client, no HTTP, no gunicorn), interleaved
    with the same process's bare session.run and decode: medians in ms."""
    os.environ.update(MODEL_DIR=opts["model_dir"], TF_INTRA_OP_THREADS=str(opts["intra"]),
                      TF_INTER_OP_THREADS=str(opts["inter"]), PROMETHEUS_MULTIPROC_DIR=opts["metrics_dir"])
    from classify_server.core.inference import preprocess
    from classify_server.http_api import create_app
    app = create_app()
    client = app.test_client()
    with open(opts["body"], "rb") as f:
        body = f.read()
    answer = client.post("/", data=body, headers=MULTIPART)
    if answer.status_code != 200:
        raise RuntimeError(f"test client POST / answered {answer.status_code}: {answer.data[:200]!r}")
    clf, pixels, np = load_session(opts)
    with open(opts["image"], "rb") as f:
        jpeg = f.read()
    one = np.stack([pixels])
    clf.session.run(clf.output, {clf.input: one})
    run, post, decode = [], [], []
    for _ in range(opts["runs"]):
        t0 = time.perf_counter()
        clf.session.run(clf.output, {clf.input: one})
        t1 = time.perf_counter()
        client.post("/", data=body, headers=MULTIPART)
        t2 = time.perf_counter()
        preprocess(clf.input_spec, jpeg, None)
        t3 = time.perf_counter()
        run.append(t1 - t0)
        post.append(t2 - t1)
        decode.append(t3 - t2)
    med = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    return {"run_ms": med(run), "post_ms": med(post), "decode_ms": med(decode), "runs": opts["runs"]}


def paired(opts):
    """One POST to the running server (a kept-alive connection, as wrk's), then one bare batch-1
    session.run in this process with the server's thread settings, alternating: the c = 1 overhead
    measured within the same seconds, so the machine's drift (steal, other load) falls on both alike.
    Medians in ms, with the server's own decode and inference times from its Server-Timing header."""
    clf, pixels, np = load_session(opts)
    one = np.stack([pixels])
    with open(opts["body"], "rb") as f:
        body = f.read()
    conn = http.client.HTTPConnection("127.0.0.1", opts["port"], timeout=120)
    post_ms, run_ms, diff_ms, server = [], [], [], {"decode": [], "inference": []}
    for i in range(opts["runs"] + 2):  # the first two pairs warm up the connection and the session
        t0 = time.perf_counter()
        conn.request("POST", "/", body, MULTIPART)
        response = conn.getresponse()
        response.read()
        t1 = time.perf_counter()
        clf.session.run(clf.output, {clf.input: one})
        t2 = time.perf_counter()
        if response.status != 200:
            raise RuntimeError(f"POST / answered {response.status}")
        if i < 2:
            continue
        post_ms.append((t1 - t0) * 1000)
        run_ms.append((t2 - t1) * 1000)
        diff_ms.append(post_ms[-1] - run_ms[-1])
        for part in response.getheader("Server-Timing", "").split(","):
            name, _, dur = part.strip().partition(";dur=")
            if name in server:
                server[name].append(float(dur))
    conn.close()
    med = statistics.median
    return {"post_ms": med(post_ms), "run_ms": med(run_ms), "diff_ms": med(diff_ms), "runs": opts["runs"],
            "server_decode_ms": med(server["decode"]) if server["decode"] else None,
            "server_inference_ms": med(server["inference"]) if server["inference"] else None}


def run_child(kind, opts, timeout):
    cmd = [sys.executable, "-m", "bench.guards.serve_bench", "--_child", kind, json.dumps(opts)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    code, wall, lines = C.run_timed(cmd, timeout, env=env)
    for _, stream, line in lines:
        if stream == "out" and line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"child {kind} failed ({code}):\n" + "\n".join(l for _, _, l in lines[-20:]))


def parallel_loops(opts, processes, seconds, timeout=600):
    """`processes` fresh processes, each loading the graph, then running batch 1 together."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = [C.start([sys.executable, "-m", "bench.guards.serve_bench", "--_child", "loop",
                      json.dumps(dict(opts, seconds=seconds))], env=env, cwd=C.ROOT, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(processes)]
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            while True:
                line = p.stdout.readline()
                if line.strip() == "READY":
                    break
                if not line or time.monotonic() > deadline:
                    raise RuntimeError("a loop child did not get ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            for line in p.stdout:
                if line.startswith("BENCH_JSON "):
                    results.append(json.loads(line[len("BENCH_JSON "):]))
                    break
        return sum(r["count"] for r in results) / max(r["seconds"] for r in results)
    finally:
        for p in procs:
            C.stop(p)


# ====================================================================== load generation

LUA = r"""
-- POST one multipart body (field `data`, a JPEG) on every request; count non-200 answers.
local f = assert(io.open(%(body)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

non200 = 0
function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
  end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non200") or 0)
  end
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests": %%d, "duration_us": %%d, "non200": %%d, "status_errors": %%d, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"max_us": %%d, "mean_us": %%f}\n',
    summary.requests, summary.duration, bad, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def write_body(image, work):
    with open(image, "rb") as f:
        jpeg = f.read()
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"{os.path.basename(image)}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()
    body_path = os.path.join(work, "body.bin")
    with open(body_path, "wb") as f:
        f.write(body)
    lua_path = os.path.join(work, "post.lua")
    with open(lua_path, "w") as f:
        f.write(LUA % {"body": json.dumps(body_path), "boundary": BOUNDARY})
    return body, lua_path


def wrk(url, lua, connections, duration):
    threads = min(connections, 2)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "60s",
           "-s", lua, url]
    code, wall, lines = C.run_timed(cmd, duration + 120, cwd=STUDIES)
    for _, _stream, line in lines:
        if line.startswith("BENCH_JSON "):
            r = json.loads(line[len("BENCH_JSON "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
            return r
    raise RuntimeError(f"wrk failed ({code}):\n" + "\n".join(l for _, _, l in lines[-20:]))


def post(port, path, body, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, MULTIPART)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_status(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


class RssSampler(threading.Thread):
    """Peak RSS of every descendant of `root`, sampled every 0.5 s."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.peak, self.names = root, {}, {}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(0.5)

    def sample(self):
        for pid in [self.root] + C.descendants_of(self.root):
            rss = C.rss_mib(pid)
            if rss is not None:
                self.peak[pid] = max(rss, self.peak.get(pid, 0))
                if pid not in self.names:
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            self.names[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
                    except OSError:
                        self.names[pid] = "?"

    def stop(self):
        self.stopped.set()
        self.join(5)


def wait_settled(process, port, ready_path, min_children, timeout=240):
    """Until `ready_path` answers 200 and every process of the server has stopped using CPU."""
    t0 = time.monotonic()
    while get_status(port, ready_path) != 200:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"server not ready after {timeout}s")
        time.sleep(0.5)
    quiet = 0
    while quiet < 2 and time.monotonic() - t0 < timeout:
        pids = [process.pid] + C.descendants_of(process.pid)
        before = sum(C.cpu_seconds(p) or 0 for p in pids)
        time.sleep(1.0)
        after = sum(C.cpu_seconds(p) or 0 for p in pids)
        enough = len(C.children_of(process.pid)) >= min_children
        quiet = quiet + 1 if (after - before < 0.15 and enough) else 0
    return time.monotonic() - t0


def serve_and_load(name, cmd, env, cwd, port, path, ready_path, min_children, flags, body, lua, work,
                   pair_opts=None, nested=False):
    """Start a server, check one answer, warm it up, run wrk at each concurrency, stop it.
    With `pair_opts`, also measure its c = 1 overhead against a bare session.run (`paired`).
    `nested`: the command starts several gunicorn masters (local_cluster.sh), whose workers are the workers."""
    process, log, result = start_server(name, cmd, env, cwd, work)
    try:
        result["startup_s"] = wait_settled(process, port, ready_path, min_children)
        result["rss_idle"] = {pid: C.rss_mib(pid) for pid in [process.pid] + C.descendants_of(process.pid)}
        result["answer"] = check_answer(name, port, path, body)
        sampler = RssSampler(process.pid)
        sampler.start()
        warm_up(name, port, path, lua, min_children, flags.duration)
        for c in flags.concurrency:
            result["rows"][c] = load_level(name, process, port, path, lua, c, flags.duration)
        sampler.stop()
        if pair_opts:
            C.log(f"{name}: c=1 paired with a bare session.run, {pair_opts['runs']} pairs")
            result["paired"] = run_child("paired", dict(pair_opts, port=port), 900)
        result.update(processes(process, sampler, nested))
    finally:
        C.stop(process)
        log.close()
    return result


def start_server(name, cmd, env, cwd, work):
    """`cmd` started from `cwd`, its output in a log file under `work`, with a metrics folder of its own:
    (process, open log, the result it fills in)."""
    slug = "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
    log_path = os.path.join(work, f"server-{slug}.log")
    env = dict(env, PROMETHEUS_MULTIPROC_DIR=os.path.join(work, f"metrics-{slug}"))  # removed with `work`
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    C.log(f"{name}: {' '.join(cmd)}")
    log = open(log_path, "wb")
    process = C.start(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    return process, log, {"name": name, "rows": {}, "log": log_path}


def check_answer(name, port, path, body):
    """One POST: a 200 with a list of [label, score]; its first two entries."""
    status, answer = post(port, path, body)
    if status != 200:
        raise RuntimeError(f"{name}: POST {path} answered {status}: {answer[:300]!r}")
    parsed = json.loads(answer)
    assert isinstance(parsed, list) and len(parsed[0]) == 2, f"unexpected answer {answer[:200]!r}"
    return parsed[:2]


def warm_up(name, port, path, lua, min_children, duration):
    """wrk with two connections a worker (at least 2), for up to 5 s: every worker has run the model."""
    warm = max(2 * min_children, 2)
    C.log(f"{name}: warm-up, {warm} connections, {min(5, duration)} s")
    wrk(f"http://127.0.0.1:{port}{path}", lua, warm, min(5, duration))


def load_level(name, process, port, path, lua, c, duration):
    """wrk at `c` connections for `duration` s: its figures, with the CPU cores each server process, wrk and
    every other process on the machine used meanwhile, and the hypervisor's steal."""
    pids = [process.pid] + C.descendants_of(process.pid)
    cpu0 = {pid: C.cpu_seconds(pid) for pid in pids}
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, steal0 = C.machine_cpu_seconds()
    t0 = time.monotonic()
    r = wrk(f"http://127.0.0.1:{port}{path}", lua, c, duration)
    seconds = time.monotonic() - t0
    busy1, steal1 = C.machine_cpu_seconds()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU cores each server process used during the run (worker balance), and wrk's own.
    r["cpu"] = {pid: ((C.cpu_seconds(pid) or cpu0[pid]) - cpu0[pid]) / seconds
                for pid in pids if cpu0[pid] is not None}
    r["wrk_cpu"] = ((children1.ru_utime + children1.ru_stime)
                    - (children0.ru_utime + children0.ru_stime)) / seconds
    # Everything else on the machine (other people's tests...), and the hypervisor's steal.
    r["server_cpu"] = sum(r["cpu"].values())
    r["others_cpu"] = max(0.0, (busy1 - busy0) / seconds - r["server_cpu"] - r["wrk_cpu"])
    r["steal"] = (steal1 - steal0) / seconds
    C.log(f"{name}: c={c}: {r['rps']:.2f} req/s, p50 {r['p50_us'] / 1000:.0f} ms, "
          f"non-200 {r['non200']}, socket errors {r['socket_errors']}")
    return r


def processes(process, sampler, nested):
    """The server's processes: peak RSS and command of each, the master, the workers (`nested`: the
    gunicorn workers of each master local_cluster.sh started)."""
    master_children = C.children_of(process.pid)
    workers = master_children
    if nested:
        workers = [w for c in master_children for w in C.children_of(c) if "gunicorn" in sampler.names.get(w, "")]
    return {"rss": {pid: (sampler.peak[pid], sampler.names.get(pid, "?")) for pid in sampler.peak},
            "master": process.pid, "workers": workers}


# ====================================================================== the benchmark

def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_child":
        return child_main(sys.argv[2], json.loads(sys.argv[3]))
    flags = parse_args(argv)
    work = tempfile.mkdtemp(prefix="serve_bench.")
    C.log(f"work folder {work}; load average {' '.join(C.load_average())}")
    busy_before = C.other_busy_processes()
    revision = C.revision()
    sections = []
    try:
        bench(flags, work, sections)
    except BaseException:
        if sections:
            print("\n".join(sections))
        raise
    finally:
        C.stop_all()
        if flags.keep:
            C.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    busy_after = C.other_busy_processes()
    print("\n".join(sections))
    C.print_machine(CORES, revision, busy_before + busy_after)


def default_image():
    from PIL import Image
    for label in sorted(os.listdir(C.FLOWERS)):
        folder = os.path.join(C.FLOWERS, label)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            with Image.open(path) as im:
                if im.size == (500, 375) and im.format == "JPEG":
                    return path
    raise SystemExit("no 500x375 JPEG in " + C.FLOWERS + "; pass --image")


# The default server's layout (gunicorn.conf.py): WEB_CONCURRENCY or 1 worker, cores / workers TensorFlow threads.
DEFAULT_WORKERS = 1
DEFAULT_INTRA = DEFAULT_INTER = max(1, CORES // DEFAULT_WORKERS)


def bench(flags, work, sections):
    """Every part in turn; each appends its tables to `sections` as soon as it has them (printed even if a
    later part fails)."""
    model_dir, image, body, lua = prepare(flags, work, sections)
    results = {}
    if "raw" not in flags.skip:
        results.update(ceiling_part(flags, work, model_dir, image, sections))
    servers = []
    servers += serve_default_and_variants(flags, work, model_dir, image, body, lua)
    if flags.cluster:
        servers += serve_cluster(flags, work, model_dir, body, lua, sections)
    if "reload" not in flags.skip:
        results["reload"] = reload_baseline(flags, model_dir, image)
        sections.append(reload_table(results["reload"]))
    if "flask" not in flags.skip:
        servers.append(serve_flask(flags, work, model_dir, body, lua))
    if "bentoml" not in flags.skip:
        servers += serve_bentoml(flags, work, model_dir, body, lua, sections)
    if servers:
        sections.append(load_table(servers))
        sections.append(memory_table(servers))
    sections.append(ratios(flags, results, servers, DEFAULT_WORKERS, DEFAULT_INTRA))


def prepare(flags, work, sections):
    """The model (given or made), the image, its multipart body and wrk script; the report's heading."""
    model_dir = os.path.abspath(flags.model_dir) if flags.model_dir else C.make_model(work, flags.architecture, 100)
    image = os.path.abspath(flags.image or default_image())
    body, lua = write_body(image, work)
    with open(os.path.join(model_dir, "model.json")) as f:
        sidecar = json.load(f)
    sections.append(f"# serve benchmark: {sidecar['architecture']} (weights {sidecar['weights']}), "
                    f"{sidecar['input_height']}x{sidecar['input_width']} input, "
                    f"image {os.path.relpath(image, C.ROOT)} ({len(body)} bytes of multipart body), "
                    f"wrk {flags.duration} s per level, {CORES} cores\n")
    return model_dir, image, body, lua


# ---------------------------------------------------------------- a. the ceiling

def ceiling_part(flags, work, model_dir, image, sections):
    """a.: measure the ceiling, sum it up into results, append its two tables (and echo them to stderr)."""
    measured = measure_ceiling(flags, work, model_dir, image)
    results = ceiling_results(measured)
    sections.append(ceiling_table(measured, results))
    sections.append(sweep_table(measured))
    print(sections[-2] + "\n" + sections[-1], file=sys.stderr)
    return results


def measure_ceiling(flags, work, model_dir, image):
    """The matmul rate and FLOPs per image, the session.run sweeps (each setting in a fresh process), the
    default layout alone, and the app's own cost (Flask test client)."""
    C.log("a. ceiling: matmul rate and FLOPs per image")
    ceil = run_child("ceiling", {"model_dir": model_dir, "n": 2048 if flags.quick else 4096,
                                 "repeats": 3 if flags.quick else 5}, 900)
    configs = [(1, 1), (DEFAULT_INTRA, DEFAULT_INTER)] + ([] if flags.quick else [(2, 1), (0, 0)])
    configs = list(dict.fromkeys(configs))
    batches = [1, 4, 16] if flags.quick else [1, 2, 4, 8, 16, 32]
    sweeps = {}
    for intra, inter in configs:
        C.log(f"a. session.run sweep, intra {intra} inter {inter}")
        sweeps[(intra, inter)] = run_child("sweep", {
            "model_dir": model_dir, "image": image, "intra": intra, "inter": inter, "batches": batches,
            "min_time": 1.0 if flags.quick else 3.0, "min_runs": 2 if flags.quick else 3,
            "latency_runs": 7 if flags.quick else 15}, 1800)
    C.log(f"a. the default server's compute alone: {DEFAULT_WORKERS} processes x intra {DEFAULT_INTRA}, batch 1")
    layout = parallel_loops({"model_dir": model_dir, "image": image, "intra": DEFAULT_INTRA,
                             "inter": DEFAULT_INTER},
                            DEFAULT_WORKERS, 4 if flags.quick else 10)
    C.log(f"a. the app alone (Flask test client) against session.run, intra {DEFAULT_INTRA}")
    metrics_dir = os.path.join(work, "metrics-app")
    os.makedirs(metrics_dir, exist_ok=True)
    app = run_child("app", {"model_dir": model_dir, "image": image, "intra": DEFAULT_INTRA,
                            "inter": DEFAULT_INTER,
                            "body": os.path.join(work, "body.bin"), "metrics_dir": metrics_dir,
                            "runs": 7 if flags.quick else 21}, 900)
    return {"ceil": ceil, "configs": configs, "batches": batches, "sweeps": sweeps, "layout": layout, "app": app}


def ceiling_results(m):
    """What the ratios need from part a. The ceiling is a sustained rate (images over the total time of a
    setting's runs), as a server's throughput is; the fastest single run is shown beside it (ceiling_table)."""
    sweeps, configs = m["sweeps"], m["configs"]
    best = max(((v["sustained"], b, cfg) for cfg, s in sweeps.items() for b, v in s["batches"].items()))
    single = min((s["latency_ms"], cfg) for cfg, s in sweeps.items())
    results = {"ceil": m["ceil"], "app": m["app"]}
    results.update(raw_best=best[0], raw_best_at=best[1:], raw_single_ms=single[0], raw_single_at=single[1],
                   layout=m["layout"], sweeps=sweeps)
    default_cfg = (DEFAULT_INTRA, DEFAULT_INTER)
    results["raw_single_default_ms"] = sweeps.get(default_cfg, sweeps[configs[0]])["latency_ms"]
    results["raw_per_cpu"] = sweeps.get(default_cfg, sweeps[configs[0]])["batches"]["1"]["per_cpu_second"]
    results["decode_ms"] = sweeps[configs[0]]["decode_ms"]
    return results


def ceiling_table(m, results):
    ceil, app, sweeps = m["ceil"], m["app"], m["sweeps"]
    gflops = max(ceil["numpy_gflops"], ceil["tf_gflops"])
    flops_img = ceil["conv_flops"]
    best = (results["raw_best"], *results["raw_best_at"])
    fastest = max(((v["best"], b, cfg) for cfg, s in sweeps.items() for b, v in s["batches"].items()))
    single = (results["raw_single_ms"], results["raw_single_at"])
    rows = [(f"numpy float32 matmul {ceil['n']}x{ceil['n']}, GFLOP/s (best; median)",
             f"{ceil['numpy_gflops']:.1f}; {ceil['numpy_gflops_median']:.1f}"),
            (f"TensorFlow float32 matmul {ceil['n']}x{ceil['n']}, GFLOP/s (best; median)",
             f"{ceil['tf_gflops']:.1f}; {ceil['tf_gflops_median']:.1f}"),
            ("model FLOPs per image, conv + depthwise + matmul (GFLOP)", f"{flops_img / 1e9:.3f}"),
            ("model FLOPs per image, tf.compat.v1.profiler (GFLOP)",
             f"{ceil['profiler_flops'] / 1e9:.3f}" if ceil["profiler_flops"] else "-"),
            ("images/s the matmul rate allows (best GFLOP/s / GFLOP per image)", f"{gflops * 1e9 / flops_img:.2f}")]
    rows += [("raw session.run, best sustained img/s (batch, intra, inter): the ceiling",
              f"{best[0]:.2f} (batch {best[1]}, intra {best[2][0]}, inter {best[2][1]})"),
             ("raw session.run, fastest single run, img/s (batch, intra, inter)",
              f"{fastest[0]:.2f} (batch {fastest[1]}, intra {fastest[2][0]}, inter {fastest[2][1]})"),
             ("  of the matmul-rate ceiling", f"{best[0] / (gflops * 1e9 / flops_img):.2f}"),
             ("raw batch-1 latency, median ms (best setting)",
              f"{single[0]:.1f} (intra {single[1][0]}, inter {single[1][1]})"),
             (f"raw batch-1 latency, median ms (intra {DEFAULT_INTRA}, inter {DEFAULT_INTER}: the server's "
              "setting)",
              f"{results['raw_single_default_ms']:.1f}"),
             (f"default server layout alone: {DEFAULT_WORKERS} processes x intra {DEFAULT_INTRA}, batch 1, img/s",
              f"{m['layout']:.2f}"),
             ("decode_image of the test JPEG (median ms, in the server's preprocess)",
              f"{results['decode_ms']:.1f}"),
             (f"in one process, interleaved (intra {DEFAULT_INTRA}): session.run b=1 / decode / "
              "Flask test-client POST / (decode + app + session.run), median ms",
              f"{app['run_ms']:.1f} / {app['decode_ms']:.1f} / {app['post_ms']:.1f}"),
             ("  the app's own cost beyond decode + session.run, ms",
              f"{app['post_ms'] - app['run_ms'] - app['decode_ms']:.1f}")]
    return C.table(["ceiling", "value"], rows, "a. Ceiling")


def sweep_table(m):
    batches = m["batches"]
    heads = (["intra, inter"] + [f"b={b}" for b in batches] + ["b=1 x2", "b=4 x2", "b=1 latency ms",
                                                               "b=1 img per CPU-s", "b=1 cores busy"])
    srows = [(f"{i}, {j}" + (" (TF default)" if i == 0 else ""),
              *[s["batches"][str(b)]["sustained"] for b in batches + ["1x2", "4x2"]], s["latency_ms"],
              s["batches"]["1"]["per_cpu_second"], s["batches"]["1"]["cores"])
             for (i, j), s in m["sweeps"].items()]
    return C.table(heads, srows, "a. Raw session.run throughput of graph.pb, img/s (sustained: "
                                 "images / total time of the runs; each setting in a fresh process; "
                                 "x2: two threads calling session.run at once)")


# ---------------------------------------------------------------- b. the server (and variants), the cluster

def serve_default_and_variants(flags, work, model_dir, image, body, lua):
    """`gunicorn classify_server:app` with its defaults (unless skipped) and with each --variant, loaded in turn."""
    servers = []
    for variant in ([] if "server" in flags.skip else [""]) + flags.variant:
        env_over = parse_variant(variant) if variant else {}
        port = C.free_port()
        env = caller_env()
        env.update(MODEL_DIR=model_dir, **env_over)
        workers = int(env_over.get("WEB_CONCURRENCY", 1))
        name = "gunicorn " + (variant or "default")
        intra = int(env_over.get("TF_INTRA_OP_THREADS", max(1, CORES // workers)))
        inter = int(env_over.get("TF_INTER_OP_THREADS", intra))
        pair_opts = None if variant else {"model_dir": model_dir, "image": image, "intra": intra, "inter": inter,
                                          "body": os.path.join(work, "body.bin"), "runs": 11 if flags.quick else 31}
        servers.append(serve_and_load(
            name, [sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{port}"],
            env, C.ROOT, port, "/", "/readyz", workers, flags, body, lua, work, pair_opts))
        servers[-1]["intra"], servers[-1]["inter"] = intra, inter
    return servers


def serve_cluster(flags, work, model_dir, body, lua, sections):
    """The scale-out path: nginx before --cluster single-worker instances (deploy/local_cluster.sh)."""
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        sections.append("### b. nginx cluster\n\nskipped: no nginx (apt-get install nginx)\n")
        return []
    port = C.free_port()
    env = caller_env()
    env.update(MODEL_DIR=model_dir, LISTEN_HOST="127.0.0.1", LISTEN_PORT=str(port),
               RUN_DIR=os.path.join(work, "cluster"))
    intra = max(1, CORES // flags.cluster)
    server = serve_and_load(
        f"nginx + {flags.cluster} instances", ["bash", os.path.join(C.ROOT, "deploy", "local_cluster.sh"),
                                               str(flags.cluster)],
        env, C.ROOT, port, "/", "/readyz", flags.cluster + 1, flags, body, lua, work, nested=True)
    server.update(intra=intra, inter=intra)
    return [server]


# ---------------------------------------------------------------- c. reload baseline

def reload_baseline(flags, model_dir, image):
    """Seconds per image of `label_image`, the graph reloaded for each one, --reload_runs times."""
    C.log(f"c. reload baseline: label_image x {flags.reload_runs}")
    times = []
    cmd = [sys.executable, "-m", "classify_server.label_image", "--graph", os.path.join(model_dir, "graph.pb"),
           "--image", image]
    for _ in range(flags.reload_runs):
        code, wall, lines = C.run_timed(cmd, 600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if code != 0:
            raise RuntimeError("label_image failed:\n" + "\n".join(l for _, _, l in lines[-20:]))
        times.append(wall)
    return times


def reload_table(times):
    return C.table(
        ["baseline", "value"],
        [("command", "`python -m classify_server.label_image --graph MODEL/graph.pb --image IMAGE`"),
         ("runs", str(len(times))),
         ("seconds per image, each run", " ".join(f"{t:.2f}" for t in times)),
         ("seconds per image, median", f"{statistics.median(times):.2f}"),
         ("images/s (one at a time)", f"{1 / statistics.median(times):.3f}")],
        "c. Reload-per-image baseline (simple-ml-serving)")


# ---------------------------------------------------------------- d. flask + keras predict, e. bentoml

def serve_flask(flags, work, model_dir, body, lua):
    """bench/studies/alt_flask_predict.py under gunicorn, the default's worker count, sync workers."""
    port = C.free_port()
    env = caller_env()
    env.update(MODEL_DIR=model_dir, PYTHONPATH=C.ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    return serve_and_load(
        f"flask+keras predict (gunicorn -w {DEFAULT_WORKERS}, sync)",
        [sys.executable, "-m", "gunicorn", "-w", str(DEFAULT_WORKERS), "-b", f"127.0.0.1:{port}",
         "--timeout", "120", "--chdir", STUDIES, "alt_flask_predict:app"],
        env, STUDIES, port, "/", "/readyz", DEFAULT_WORKERS, flags, body, lua, work)


def serve_bentoml(flags, work, model_dir, body, lua, sections):
    """bench/studies/bentoml_service.py from --bentoml_venv, our default layout; skipped (with the reason in
    `sections`) when the virtualenv is not there, and so is a failure."""
    bentoml = os.path.join(flags.bentoml_venv, "bin", "bentoml")
    if not os.path.exists(bentoml):
        sections.append(f"### e. BentoML\n\nskipped: no {bentoml} (make it with `python -m venv "
                        f"{flags.bentoml_venv} && {flags.bentoml_venv}/bin/pip install bentoml "
                        "tensorflow-cpu==2.21.0 pillow flask prometheus_client`)\n")
        return []
    port = C.free_port()
    env = {k: v for k, v in caller_env().items() if k != "VIRTUAL_ENV"}
    env.update(MODEL_DIR=model_dir, PYTHONPATH=C.ROOT, BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2",
               BENTO_WORKERS=str(DEFAULT_WORKERS), TF_INTRA_OP_THREADS=str(DEFAULT_INTRA),
               TF_INTER_OP_THREADS=str(DEFAULT_INTER))  # our default layout
    env["PATH"] = os.path.join(flags.bentoml_venv, "bin") + os.pathsep + env.get("PATH", "")
    try:
        server = serve_and_load(
            f"bentoml ({DEFAULT_WORKERS} workers)",
            [bentoml, "serve", "bentoml_service:Classifier", "--host", "127.0.0.1", "--port", str(port),
             "--working-dir", STUDIES, "--do-not-track"],
            env, STUDIES, port, "/classify", "/readyz", DEFAULT_WORKERS, flags, body, lua, work)
    except Exception as exc:
        sections.append(f"### e. BentoML\n\nfailed: {exc}\n")
        return []
    server.update(intra=DEFAULT_INTRA, inter=DEFAULT_INTER)
    return [server]


# ---------------------------------------------------------------- tables of b/d/e

def load_table(servers):
    """Every server's figures at each concurrency under wrk, with the CPU each process used."""
    rows = []
    for s in servers:
        for c, r in s["rows"].items():
            workers_cpu = " / ".join(f"{r['cpu'].get(pid, 0):.2f}" for pid in s["workers"])
            other_cpu = sum(v for pid, v in r["cpu"].items() if pid not in s["workers"])
            rows.append((s["name"], str(c), r["rps"], r["p50_us"] / 1000, r["p90_us"] / 1000,
                         r["p99_us"] / 1000, str(r["requests"]), str(r["non200"]), str(r["socket_errors"]),
                         workers_cpu, f"{other_cpu:.2f}", f"{r['wrk_cpu']:.2f}",
                         f"{r['rps'] / r['server_cpu']:.1f}" if r["server_cpu"] > 0.05 else "-",
                         f"{r['others_cpu']:.2f}", f"{r['steal']:.2f}"))
    return C.table(["server", "conc.", "req/s", "p50 ms", "p90 ms", "p99 ms", "requests", "non-2xx",
                    "socket err", "CPU per worker", "CPU master", "CPU wrk", "req per server CPU-s",
                    "CPU others", "steal"], rows,
                   "b/d/e. Under wrk (POST a multipart JPEG; keep-alive connections). CPU columns: cores used "
                   "during the run by each worker, by the master (and any other server process), by wrk, "
                   "by every other process on the machine (not ours: noise), and stolen by the hypervisor")


def memory_table(servers):
    """Every server process's resident memory, idle and at its peak under load."""
    rows = []
    for s in servers:
        master = s["master"]
        for pid, (rss, cmdline) in sorted(s["rss"].items()):
            if cmdline.startswith("sleep "):  # local_cluster.sh's wait loop
                continue
            role = "master" if pid == master else ("worker" if pid in s["workers"] else "child")
            rows.append((s["name"], role, str(pid), s["rss_idle"].get(pid), rss, cmdline[:60]))
        rows.append((s["name"], f"(start-up until settled: {s['startup_s']:.0f} s)", "", None, None, ""))
    return C.table(["server", "process", "pid", "RSS MiB idle", "peak RSS MiB", "command"], rows,
                   "Memory (VmRSS from /proc: once started and idle; peak during the load runs)")


def ratios(flags, results, servers, workers, intra):
    rows = []

    def best_rps(s, at_least=4):
        levels = [(r["rps"], c) for c, r in s["rows"].items() if c >= at_least]
        return max(levels) if levels else (None, None)

    by_name = {s["name"]: s for s in servers}
    default = by_name.get("gunicorn default")
    raw = results.get("raw_best")
    reload_ips = 1 / statistics.median(results["reload"]) if results.get("reload") else None
    flask = next((s for s in servers if s["name"].startswith("flask")), None)
    bento = next((s for s in servers if s["name"].startswith("bentoml")), None)
    for s in servers:
        rps, c = best_rps(s)
        if rps is None:
            continue
        name = s["name"]
        if raw:
            met = "yes" if rps / raw >= 0.95 else "no"
            rows.append((f"{name}: throughput (best at c>={4}: c={c}) / raw ceiling",
                         f"{rps:.2f} / {raw:.2f} = {rps / raw:.3f}", ">= 0.95" if s is default else "",
                         met if s is default else ""))
            rows.append((f"{name}: throughput / default layout alone ({workers} proc x intra {intra}, b=1)",
                         f"{rps / results['layout']:.3f}", "", ""))
            r = s["rows"][c]
            if r["server_cpu"] > 0.05:
                rows.append((f"{name}: req per server CPU-s (c={c}) / raw img per CPU-s (intra {intra}, b=1)",
                             f"{r['rps'] / r['server_cpu']:.2f} / {results['raw_per_cpu']:.2f} = "
                             f"{r['rps'] / r['server_cpu'] / results['raw_per_cpu']:.3f}", "", ""))
                rows.append((f"{name}: cores used by the server / by other processes (c={c})",
                             f"{r['server_cpu']:.2f} / {r['others_cpu']:.2f}", "", ""))
        if 1 in s["rows"] and raw:
            p50 = s["rows"][1]["p50_us"] / 1000
            over = p50 - results["raw_single_ms"]
            # Measured minutes apart, so the machine's drift is in it; the paired row below is not.
            paired_target = "paired" in s
            rows.append((f"{name}: p50 at c=1 - raw batch-1 latency (best setting, measured minutes apart)",
                         f"{p50:.1f} - {results['raw_single_ms']:.1f} = {over:.1f} ms",
                         "<= 5 ms" if s is default and not paired_target else "",
                         ("yes" if over <= 5 else "no") if s is default and not paired_target else ""))
            s_intra = s.get("intra", intra)
            s_inter = s.get("inter", 1)
            same = results["sweeps"].get((s_intra, s_inter))
            if same:
                rows.append((f"{name}: p50 at c=1 - raw batch-1 latency (intra {s_intra}, inter {s_inter}: "
                             "this server's setting)", f"{p50 - same['latency_ms']:.1f} ms", "", ""))
            if "app" in results and s is default:
                app = results["app"]
                rows.append((f"{name}: of which decode / app / HTTP+gunicorn+queueing, ms (in-process split)",
                             f"{app['decode_ms']:.1f} / {app['post_ms'] - app['run_ms'] - app['decode_ms']:.1f} / "
                             f"{p50 - app['post_ms']:.1f}", "", ""))
        if "paired" in s:
            pr = s["paired"]
            rows.append((f"{name}: c=1 paired with a bare session.run b=1 (alternating, same seconds, "
                         f"intra {s['intra']}, inter {s['inter']}; {pr['runs']} pairs): median POST - median run",
                         f"{pr['post_ms']:.1f} - {pr['run_ms']:.1f} = {pr['post_ms'] - pr['run_ms']:.1f} ms "
                         f"(median of the differences {pr['diff_ms']:.1f})",
                         "<= 5 ms" if s is default else "",
                         ("yes" if pr["post_ms"] - pr["run_ms"] <= 5 else "no") if s is default else ""))
            if pr["server_decode_ms"] is not None:
                rows.append((f"{name}:   of which the server's decode / its session.run, from Server-Timing "
                             "(medians)", f"{pr['server_decode_ms']:.1f} / {pr['server_inference_ms']:.1f} ms",
                             "", ""))
        if s is default:
            if reload_ips:
                rows.append(("default: speedup over the reload baseline (throughput c>=4 / 1 per reload)",
                             f"{rps / reload_ips:.1f}x", ">= 30x", "yes" if rps / reload_ips >= 30 else "no"))
            if flask:
                f_rps, f_c = best_rps(flask)
                rows.append(("default: speedup over flask+keras predict (best c>=4 each)", f"{rps / f_rps:.2f}x",
                             ">= 1.3x", "yes" if rps / f_rps >= 1.3 else "no"))
                if 1 in default["rows"] and 1 in flask["rows"]:
                    rows.append(("default: p50 at c=1, flask+predict / default",
                                 f"{flask['rows'][1]['p50_us'] / default['rows'][1]['p50_us']:.2f}x", "", ""))
            if bento:
                b_rps, b_c = best_rps(bento)
                rows.append(("default: speedup over BentoML (best c>=4 each)", f"{rps / b_rps:.2f}x", "", ""))
                if 1 in default["rows"] and 1 in bento["rows"]:
                    rows.append(("default: p50 at c=1, BentoML / default",
                                 f"{bento['rows'][1]['p50_us'] / default['rows'][1]['p50_us']:.2f}x", "", ""))
            errors = sum(r["non200"] + r["socket_errors"] for r in default["rows"].values())
            rows.append(("default: errors (non-2xx + socket) over all levels", str(errors), "0",
                         "yes" if errors == 0 else "no"))
    notes = []
    for (i, j), sw in results.get("sweeps", {}).items():
        want = min(CORES, i or CORES)
        busy = sw["batches"]["1"]["cores"]
        if busy < 0.8 * want:
            notes.append(f"warning: the raw sweep at intra {i}, inter {j} kept only {busy:.2f} of {want} cores busy "
                         "at batch 1 (other processes?): the raw ceiling may be underestimated.")
    if default and results.get("layout"):
        rps, c = best_rps(default)
        if rps and rps > results["layout"]:
            notes.append(f"warning: the server ({rps:.2f} req/s at c={c}) beat its own compute layout measured "
                         f"alone ({results['layout']:.2f} img/s): the raw side was measured under more load.")
    if notes:  # a "met" against a ceiling measured under load means little
        rows = [(a, b, t, m + " (see warnings)" if t in (">= 0.95", "<= 5 ms") and m else m)
                for a, b, t, m in rows]
    return C.table(["ratio", "value", "target", "met"], rows, "Ratios") + "".join(f"\n{n}\n" for n in notes)


if __name__ == "__main__":
    main()
