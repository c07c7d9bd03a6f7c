"""Guard: re-run when a request's path changes; the CPU each stage of one request costs.

Where a request's CPU goes, stage by stage, in this process: what is left to cut once the engine is fast.

    .venv/bin/python -m bench.guards.stage_bench --model_dir MODEL [--image JPEG] [--seconds 2]

For one JPEG (default: the first 500x375 flower photo) and a model folder with graph.pb and
model.tflite, each stage of a multipart request alone, repeated for `--seconds`, one thread:
parsing the multipart body (werkzeug, as Flask does), decoding (classify_contract.preprocessing.decode_image,
the shared preprocessing), the float conversion an engine's input needs, each engine on one image
(MODEL_ENGINE=tf and tflite, threads as the server's defaults), ranking and the JSON answer; then the
whole request through Flask's test client (all of the above plus Flask's own work, no socket). CPU
milliseconds per call (process CPU time, so an engine's helper threads count). The gunicorn side (the
socket, the worker's threads) is what serve_bench.py measures on top. Last, the in-process ceiling a
server's req/s is judged against: decode + engine, 1, 4 and 16 threads at once, images per second.
"""
import argparse
import io
import os
import time

from bench import _common as C
from bench.guards import serve_bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a model folder with graph.pb and model.tflite")
    p.add_argument("--image", help="the JPEG (default: the first 500x375 flower photo)")
    p.add_argument("--seconds", type=float, default=2.0)
    return p.parse_args(argv)


def cost(call, seconds):
    """(CPU ms, wall ms) per call of `call()`, over about `seconds`."""
    call()
    count, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        call()
        count += 1
    return 1000 * (time.process_time() - cpu) / count, 1000 * (time.perf_counter() - wall) / count


def main(argv=None):
    flags = parse_args(argv)
    import numpy as np
    from flask import jsonify
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from classify_contract.preprocessing import decode_image
    from classify_server.core.ranking import top_k
    from classify_server.engines import load
    from classify_server.http_api import create_app, settings

    with open(flags.image or serve_bench.default_image(), "rb") as f:
        jpeg = f.read()
    cores = os.cpu_count() or 1
    threads = {"TF_INTRA_OP_THREADS": str(cores), "TF_INTER_OP_THREADS": str(cores)}
    engines = {kind: load(flags.model_dir, settings.from_env({**threads, "MODEL_ENGINE": kind}).engine)
               for kind in ("tf", "tflite")}
    spec = engines["tf"].input_spec
    pixels = decode_image(jpeg, (spec.height, spec.width))
    labels = engines["tf"].labels
    scores = engines["tf"].predict([pixels])[0]
    builder = EnvironBuilder(method="POST", data={"data": (io.BytesIO(jpeg), "x.jpg")})
    environ = builder.get_environ()
    body = environ["wsgi.input"].read()

    def parse():
        env = dict(environ, **{"wsgi.input": io.BytesIO(body)})
        return Request(env).files["data"].read()

    app = create_app(dict(MODEL_DIR=flags.model_dir, MODEL_POLL_SECONDS=0))
    client = app.test_client()

    def answer():
        with app.test_request_context():
            return jsonify(top_k(labels, scores, 5)).get_data()

    def whole():
        r = client.post("/", data={"data": (io.BytesIO(jpeg), "x.jpg")})
        assert r.status_code == 200, r.data

    stages = [
        ("multipart parse (werkzeug)", parse),
        ("decode_image (Pillow: decode, EXIF, RGB, fit)", lambda: decode_image(jpeg, (spec.height, spec.width))),
        ("float conversion, batch of 1", lambda: np.asarray(pixels, np.float32)[np.newaxis].copy()),
        ("engine tf (session.run)", lambda: engines["tf"].predict([pixels])),
        (f"engine tflite ({engines['tflite'].sidecar.get('tflite', {}).get('quantization', '?')})",
         lambda: engines["tflite"].predict([pixels])),
        ("rank + JSON answer", answer),
        ("whole request, Flask test client, MODEL_ENGINE=tf", whole),
    ]
    rows = []
    for name, call in stages:
        cpu, wall = cost(call, flags.seconds)
        rows.append([name, f"{cpu:.3f}", f"{wall:.3f}"])
    ceiling = []
    for kind in ("tf", "tflite"):
        def decode_and_run(_, engine=engines[kind]):
            engine.predict([decode_image(jpeg, (spec.height, spec.width))])
            return 1
        ceiling.append([f"decode + engine {kind}"] + [C.fmt(C.rate(decode_and_run, callers, flags.seconds))
                                                      for callers in (1, 4, 16)])
    C.print_machine(cores, C.revision(), C.other_busy_processes())
    print(f"image: {flags.image or serve_bench.default_image()}, {len(jpeg)} bytes; model {flags.model_dir}\n")
    print(C.table(["stage", "CPU ms per call", "wall ms per call"], rows, "Stages of one request, in process"))
    print(C.table(["in process", "1 caller", "4 callers", "16 callers"], ceiling,
                  "The ceiling a server's req/s compares with: decode + engine, images/s, threads at once"))


if __name__ == "__main__":
    main()
