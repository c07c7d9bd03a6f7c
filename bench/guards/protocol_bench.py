"""Guard: re-run when a protocol adapter changes; every protocol's throughput against multipart's.

One image through every protocol the server speaks, side by side in one run.

    .venv/bin/python -m bench.guards.protocol_bench [--rounds 3] [--duration 5] [--concurrency 1,4]

One model (inception_v3, random weights: each image costs what a real one does), served by
`gunicorn classify_server:app` (multipart POST /, TF Serving REST, V2 REST) and by the gRPC server
(TF Serving's PredictionService and V2's GRPCInferenceService), both with their defaults. Every
protocol gets the same 500x375 flower JPEG from clients in this process (threads, each with its own
connection, in a closed loop for --duration seconds), the protocols in turn, their order rotated
each round. Prints req/s and p50 for each protocol and concurrency (medians over the rounds), and
each one's req/s over multipart's. The clients share the machine's 2 cores with the servers, as
wrk does in serve_bench.py; compare the rows with each other, not with serve_bench's figures.

Traffic goes to 127.0.0.1 only; every run is bounded in time; every process is ended at exit.
"""
import argparse
import base64
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench import _common as C
from bench.guards import serve_bench  # its default image and readiness probe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per protocol, concurrency and round")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--architecture", default="inception_v3")
    p.add_argument("--image", help="the JPEG to send (default: the first 500x375 flower photo)")
    return p.parse_args(argv)


def callers(http_port, grpc_port, jpeg):
    """{protocol: make()}, make() giving one thread's call (its own connection): one request, checked."""
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    url = f"http://127.0.0.1:{http_port}"
    b64 = base64.b64encode(jpeg).decode()
    boundary = "----protocolbench"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    v2_head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": len(jpeg) + 4}}],
                          "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    bodies = {
        "multipart POST /": ("/", multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        "TF Serving REST :predict (base64 JSON)": ("/v1/models/model:predict",
                                                    json.dumps({"instances": [{"b64": b64}]}).encode(),
                                                    {"Content-Type": "application/json"}),
        "V2 REST infer (binary)": ("/v2/models/model/infer", v2_head + struct.pack("<I", len(jpeg)) + jpeg,
                                   {"Inference-Header-Content-Length": str(len(v2_head))}),
        "V2 REST infer (base64 JSON)": ("/v2/models/model/infer", json.dumps(
            {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64]}]}).encode(),
            {"Content-Type": "application/json"}),
    }

    def http(path, body, headers):
        def make():
            session = requests.Session()

            def call():
                response = session.post(url + path, data=body, headers=headers, timeout=60)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
            return call
        return make

    tf_request = predict_pb2.PredictRequest()
    tf_request.model_spec.name = "model"
    tf_request.inputs["images"].CopyFrom(tf.make_tensor_proto([jpeg], shape=[1]))
    v2_request = service_pb2.ModelInferRequest(model_name="model")
    v2_request.inputs.add(name="images", datatype="BYTES", shape=[1])
    v2_request.raw_input_contents.append(struct.pack("<I", len(jpeg)) + jpeg)

    def tf_grpc():
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        return lambda: stub.Predict(tf_request, timeout=60)

    def v2_grpc():
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        return lambda: stub.ModelInfer(v2_request, timeout=60)

    made = {name: http(*args) for name, args in bodies.items()}
    made.update({"TF Serving gRPC Predict": tf_grpc, "V2 gRPC ModelInfer": v2_grpc})
    return made


def load(make, concurrency, duration):
    """(requests/s, p50 ms) of `concurrency` closed-loop threads for `duration` seconds."""
    calls = [make() for _ in range(concurrency)]
    for call in calls:
        call()  # connection set-up outside the measurement
    latencies, errors, lock = [], [], threading.Lock()
    start = time.perf_counter()
    deadline = start + duration

    def loop(call):
        mine = []
        try:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                call()
                mine.append(time.perf_counter() - t)
        except Exception as exc:  # reported, never hidden
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 120)
    if errors:
        raise SystemExit(f"errors: {errors[:3]}")
    return len(latencies) / (time.perf_counter() - start), 1000 * statistics.median(latencies)


def start_servers(work, model_dir):
    env = serve_bench.caller_env()
    env.update(MODEL_DIR=model_dir, MODEL_POLL_SECONDS="0", ACCESS_LOG="")
    grpc_port = C.free_port()
    with open(os.path.join(work, "grpc.log"), "wb") as log:
        C.start([sys.executable, "-m", "classify_server.grpc_server", "--host", "127.0.0.1", "--port",
                 str(grpc_port)], cwd=C.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, http_port = C.start_gunicorn(C.ROOT, env, os.path.join(work, "gunicorn.log"))
    return http_port, grpc_port  # the gRPC server may still be loading: main waits for its first answer


def main(argv=None):
    flags = parse_args(argv)
    concurrency = [int(c) for c in flags.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="protocol-bench-")
    try:
        model_dir = C.make_model(work, flags.architecture, 200)
        with open(flags.image or serve_bench.default_image(), "rb") as f:
            jpeg = f.read()
        http_port, grpc_port = start_servers(work, model_dir)
        made = callers(http_port, grpc_port, jpeg)
        names = list(made)
        for name in names:  # each protocol once before measuring: the gRPC server may still be loading
            deadline = time.monotonic() + 180
            while True:
                try:
                    made[name]()()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        results = {(n, c): [] for n in names for c in concurrency}
        for r in range(flags.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for c in concurrency:
                for name in order:
                    rps, p50 = load(made[name], c, flags.duration)
                    results[name, c].append((rps, p50))
                    C.log(f"round {r + 1} c={c} {name}: {rps:.2f} req/s, p50 {p50:.1f} ms")
        rows = []
        for name in names:
            row = [name]
            for c in concurrency:
                rps = statistics.median(x for x, _ in results[name, c])
                base = statistics.median(x for x, _ in results[names[0], c])
                row += [f"{rps:.2f}", f"{statistics.median(p for _, p in results[name, c]):.1f}", f"{rps / base:.3f}"]
            rows.append(row)
        headers = ["protocol"] + [h for c in concurrency for h in (f"req/s c={c}", f"p50 ms c={c}", f"/ multipart c={c}")]
        print(C.table(headers, rows, title=f"one JPEG per request, {flags.rounds} rounds of {flags.duration:g} s "
                                           "(medians)"))
        C.print_machine(os.cpu_count() or 1, C.revision(), C.other_busy_processes())
    finally:
        C.stop_all()
        subprocess.run(["rm", "-rf", work], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
