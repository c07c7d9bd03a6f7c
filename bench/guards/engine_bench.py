"""Guard: re-run when an engine, TensorFlow or LiteRT changes; every engine's speed and accuracy.

The engines side by side, in one run: TensorFlow's float32 session over graph.pb against LiteRT over
model.tflite in each quantization, for MobileNetV2 and Inception-v3 (--architectures: any of retrain's), in this
process (no HTTP).

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


def main(argv=None):
    flags = parse_args(argv)
    cores = os.cpu_count() or 1
    config = {"TF_INTRA_OP_THREADS": str(cores), "TF_INTER_OP_THREADS": str(cores)}  # settings' variables
    work = tempfile.mkdtemp(prefix="engine-bench-")
    C.print_machine(cores, C.revision(), C.other_busy_processes())
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
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
