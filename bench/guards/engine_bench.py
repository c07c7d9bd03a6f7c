"""Guard: re-run when an engine, TensorFlow or LiteRT changes; every engine's speed and accuracy.

The engines side by side, in one run: TensorFlow's float32 session over graph.pb against LiteRT over
model.tflite in each quantization, for MobileNetV2 and Inception-v3 (--architectures: any of retrain's), in this
process (no HTTP), then served by the default server.

    .venv/bin/python -m bench.guards.engine_bench [--per_class 200] [--rounds 3] [--seconds 3]

MobileNetV2 and EfficientNet-Lite0/Lite2 are retrained on the real ImageNet weights (../shared) over
`--per_class` flower photos a class, 30 % of them held out as its test split, so their accuracies mean
something; Inception-v3 has random weights (no ImageNet weights offline), so only its speed does. "TF session bf16" is the session
with TensorFlow's oneDNN auto-mixed-precision rewrite (TF_BFLOAT16=1). Each model.tflite is converted
from that graph.pb (retrain.tflite.convert, int8 calibrated on training photos). Every variant is
judged on the same held-out photos, decoded once by the shared preprocessing, as the server feeds
them. Speed: images per second, sustained over `--seconds`, alternating the variants round after
round so that the machine's drift falls on all alike; "1 caller" is batch 1, one request at a time;
"2 callers" is two threads at once (the session's two concurrent runs, or two interpreters of the
pool), what a worker does under load; "batch 8" is the session's best batch. Threads as the server's
defaults on this machine (TF_INTRA_OP_THREADS = TF_INTER_OP_THREADS = cores).

Then, served (--served, the wrk concurrencies; "" skips it): each architecture's model behind one default
server (`gunicorn classify_server:app`, its gunicorn.conf.py) with the tf engine over graph.pb and with
the tflite engine over the int8 model.tflite, every server up at once and wrk's multipart POST of
serve_bench (a 500x375 flower JPEG) on one at a time, alternating their order round after round:
req/s and p50 as users would see them, architecture beside architecture.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from bench import _common as C
from classify_contract import model_folder
from classify_contract.preprocessing import decode_image
from retrain.images import create_image_lists

VARIANTS = ("float32", "float16", "dynamic", "int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per_class", type=int, default=200, help="flower photos a class for the architectures with real weights")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--architectures", default="mobilenet_v2,inception_v3")
    p.add_argument("--served", default="1,4", help="comma-separated wrk concurrencies for the served part ('': skip)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run of the served part")
    return p.parse_args(argv)


def retrain(work, architecture, per_class, weights):
    images = C.flower_subset(os.path.join(work, "images"), per_class)
    out = os.path.join(work, "model")
    cmd = [sys.executable, "-m", "retrain", "--image_dir", images, "--architecture", architecture,
           "--weights", weights, "--how_many_training_steps", "1000", "--testing_percentage", "30",
           "--output_dir", out, "--bottleneck_dir", os.path.join(work, "bottlenecks"), "--summaries_dir", "",
           "--tflite_quantization", "none"]
    C.log("retraining: " + " ".join(cmd))
    code, _, lines = C.run_timed(cmd, 3600)
    if code != 0:
        raise SystemExit("retrain failed:\n" + "\n".join(line for _, _, line in lines[-30:]))
    lists = create_image_lists([images], 10, 30)  # retrain's split, by file name
    return out, lists


def engines(model_dir, lists, size, config):
    """{variant: a loaded engine}: the session, and one TFLite folder per quantization."""
    import tensorflow as tf

    from classify_server.engines import load
    from retrain import tflite
    graph_def = tf.compat.v1.GraphDef()
    with open(os.path.join(model_dir, model_folder.GRAPH), "rb") as f:
        graph_def.ParseFromString(f.read())
    train_paths = [p for paths in lists.training.values() for p in paths]
    from classify_server import settings
    built = {"TF session fp32": load(model_dir, settings.from_env({**config, "MODEL_ENGINE": "tf"}).engine),
             "TF session bf16": load(model_dir, settings.from_env({**config, "TF_BFLOAT16": "1"}).engine)}
    for variant in VARIANTS:
        folder = f"{model_dir}-{variant}"
        os.makedirs(folder)
        shutil.copy(os.path.join(model_dir, model_folder.LABELS), folder)
        start = time.time()
        content = tflite.convert(graph_def, size, variant, train_paths)
        with open(os.path.join(folder, model_folder.TFLITE), "wb") as f:
            f.write(content)
        C.log(f"{variant}: {len(content) / 1e6:.1f} MB in {time.time() - start:.0f} s")
        built[f"TFLite {variant}"] = load(folder, settings.from_env({**config, "MODEL_ENGINE": "tflite"}).engine)
    return built


def images_per_second(engine, pixels, seconds, callers=1, batch=1):
    """Images per second, sustained: `callers` threads each predicting batches of `batch` for `seconds`."""
    inputs = [[pixels[(i + j) % len(pixels)] for j in range(batch)] for i in range(callers)]

    def predict(i):
        engine.predict(inputs[i])
        return batch

    return C.rate(predict, callers, seconds)


def accuracy(engine, pixels, y):
    predicted = [int(np.argmax(engine.predict([x])[0])) for x in pixels]
    return float(np.mean(np.array(predicted) == y))


def served(models, concurrency, rounds, duration, work):
    """{(architecture, engine, c): [(req/s, p50 ms, errors)]}: one default server per model folder of
    `models` {(architecture, engine): folder}, wrk on each in turn, the order reversed every other round."""
    from bench.guards import serve_bench
    _, lua = serve_bench.write_body(serve_bench.default_image(), work)
    ports = {}
    for (architecture, engine), folder in models.items():
        env = serve_bench.caller_env() | {"MODEL_DIR": folder, "MODEL_ENGINE": engine, "MODEL_POLL_SECONDS": "0",
                                          "ACCESS_LOG": ""}
        ports[architecture, engine] = C.start_gunicorn(C.ROOT, env, os.path.join(work, f"{architecture}-{engine}.log"))[1]
    for port in ports.values():  # warm each: first runs of each shape, connections
        serve_bench.wrk(f"http://127.0.0.1:{port}/", lua, max(concurrency), 2)
    runs = {(*key, c): [] for key in ports for c in concurrency}
    for round_ in range(rounds):
        order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
        for c in concurrency:
            for key in order:
                r = serve_bench.wrk(f"http://127.0.0.1:{ports[key]}/", lua, c, duration)
                runs[(*key, c)].append((r["rps"], r["p50_us"] / 1000, r["non200"] + r["socket_errors"]))
        C.log(f"served: round {round_ + 1} of {rounds} done")
    C.stop_all()
    return runs


def main(argv=None):
    flags = parse_args(argv)
    cores = os.cpu_count() or 1
    config = {"TF_INTRA_OP_THREADS": str(cores), "TF_INTER_OP_THREADS": str(cores)}  # settings' variables
    work = tempfile.mkdtemp(prefix="engine-bench-")
    C.print_machine(cores, C.revision(), C.other_busy_processes())
    models = {}  # (architecture, engine): the folder a server loads, for the served part
    try:
        for architecture in flags.architectures.split(","):
            real = os.path.exists(C.SHARED_WEIGHTS.get(architecture, ""))
            folder = os.path.join(work, architecture)
            os.makedirs(folder)
            model_dir, lists = retrain(folder, architecture, flags.per_class if real else 8,
                                       C.SHARED_WEIGHTS[architecture] if real else "none")
            from retrain.backbones import ARCHITECTURES
            size = ARCHITECTURES[architecture].size
            built = engines(model_dir, lists, size, config)
            served_int8 = shutil.copytree(model_dir, f"{model_dir}-served-int8")  # a whole folder, int8 model.tflite
            shutil.copy(os.path.join(f"{model_dir}-int8", model_folder.TFLITE), served_int8)
            models[architecture, "tf"], models[architecture, "tflite"] = model_dir, served_int8
            labels = sorted(lists.testing)
            paths = [(p, i) for i, label in enumerate(labels) for p in lists.testing[label]]
            pixels = [decode_image(p, (size, size)) for p, _ in paths]
            y = np.array([i for _, i in paths])
            modes = [("1 caller", 1, 1), ("2 callers", 2, 1), ("batch 8", 1, 8)]
            runs = {(name, mode): [] for name in built for mode, _, _ in modes}
            for round_ in range(flags.rounds):
                order = list(built) if round_ % 2 == 0 else list(reversed(built))
                for name in order:
                    for mode, callers, batch in modes:
                        if batch > 1 and not name.startswith("TF session"):
                            continue  # an interpreter runs one image at a time: batch 8 is 8 runs
                        runs[(name, mode)].append(images_per_second(built[name], pixels, flags.seconds, callers, batch))
                C.log(f"{architecture}: round {round_ + 1} of {flags.rounds} done")
            base = statistics.median(runs[("TF session fp32", "1 caller")])
            base2 = statistics.median(runs[("TF session fp32", "2 callers")])
            rows = []
            for name, engine in built.items():
                one, two = (statistics.median(runs[(name, m)]) for m in ("1 caller", "2 callers"))
                eight = statistics.median(runs[(name, "batch 8")]) if runs[(name, "batch 8")] else None
                acc = accuracy(engine, pixels, y) if real else None
                rows.append([name, C.fmt(one), C.fmt(two), C.fmt(eight), f"{one / base:.2f}x", f"{two / base2:.2f}x",
                             C.fmt(acc, 4) if acc is not None else "- (random weights)"])
                engine.close()
            title = (f"{architecture}, {'real ImageNet weights, ' + str(len(y)) + ' held-out flower photos' if real else 'random weights'}"
                     f", images/s (median of {flags.rounds} rounds of {flags.seconds:g} s)")
            print(C.table(["engine", "1 caller", "2 callers", "batch 8", "1 caller vs TF", "2 callers vs TF",
                           "test accuracy"], rows, title), flush=True)
        concurrency = [int(c) for c in flags.served.split(",") if c]
        if concurrency:
            runs = served(models, concurrency, flags.rounds, flags.duration, work)
            rows = [[architecture, engine, c, f"{statistics.median(x for x, _, _ in runs[architecture, engine, c]):.1f}"
                     f" ({min(x for x, _, _ in runs[architecture, engine, c]):.1f}-"
                     f"{max(x for x, _, _ in runs[architecture, engine, c]):.1f})",
                     f"{statistics.median(p for _, p, _ in runs[architecture, engine, c]):.1f}",
                     sum(e for _, _, e in runs[architecture, engine, c])]
                    for architecture, engine in models for c in concurrency]
            print(C.table(["architecture", "engine", "c", "req/s, median (min-max)", "p50 ms", "errors"], rows,
                          f"served: one default server each (tflite: int8), {flags.rounds} alternating rounds of "
                          f"{flags.duration} s"), flush=True)
    finally:
        C.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
