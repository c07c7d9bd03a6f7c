"""Study: chose the quantization defaults by cross-validation; re-run only to choose again.

Does quantization cost accuracy? k-fold cross-validation over all the shared flower photos, so that a
default is chosen on more than one lucky split.

    .venv/bin/python -m bench.studies.quantization_cv [--folds 5] [--quantizations float16,int8]
    .venv/bin/python -m bench.studies.quantization_cv --architecture efficientnet_lite0 --folds 10 --seeds 0,1,2

MobileNetV2 on the real ImageNet weights (../shared) by default, or --architecture's shared weights. Every photo's bottleneck is computed once
(cached as retrain caches them, in a temp folder); for each fold, the new layer is trained with
retrain's default flags on the other folds, stitched onto the frozen backbone as retrain builds
graph.pb, and converted to model.tflite in each quantization (retrain.tflite.convert, int8 calibrated
on that fold's training photos). The float graph and every model.tflite are judged on the held-out
fold's photos, decoded by the shared preprocessing as served. Prints each fold's accuracies and, per
quantization, the mean and spread of (quantized - float) over the folds.
"""
import argparse
import os
import shutil
import statistics
import tempfile

import numpy as np

from bench import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--quantizations", default="float16,int8")
    p.add_argument("--variant", default="default", help="retrain's flags for the new layer: default or NAME=VALUE,...")
    p.add_argument("--architecture", default="mobilenet_v2", help="retrain's --architecture")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the shuffles that deal the folds")
    return p.parse_args(argv)


def main(argv=None):
    flags = parse_args(argv)
    from bench.studies.cv import FlowerFolds, retrain_flags
    from classify_contract import tflite_runtime
    from classify_contract.preprocessing import decode_image
    from retrain import export, tflite, train
    settings = retrain_flags(flags.variant)  # retrain's defaults for the new layer, or the variant's
    work = tempfile.mkdtemp(prefix="quantization-cv-")
    try:
        data = FlowerFolds(work, flags.folds, architecture=flags.architecture)
        arch, labels, backbone_def = data.arch, data.labels, data.backbone_def
        x_all, y_all = data.x, data.y
        pixels = {}
        rows, deltas = [], {q: [] for q in flags.quantizations.split(",")}
        folds = [(seed, fold) for seed in map(int, flags.seeds.split(",")) for fold in range(flags.folds)]
        for seed, fold in folds:
            data.reshuffle(seed)
            train_rows, test_rows = data.split(fold)
            head = train.train_head(x_all[train_rows], y_all[train_rows], None, len(labels), settings)
            graph_def = export.stitched_graph_def(backbone_def,
                                                  export.frozen_graph_def(head, [None, x_all.shape[1]]))
            float_accuracy = float(np.mean(np.argmax(head.predict(x_all[test_rows], verbose=0), 1)
                                           == y_all[test_rows]))
            test_paths = [data.paths[i] for i in test_rows]
            for path in test_paths:
                if path not in pixels:
                    pixels[path] = decode_image(path, (arch.size, arch.size)).astype(np.uint8)
            row = [f"{seed}/{fold + 1}", str(len(test_rows)), f"{float_accuracy:.4f}"]
            for quantization in deltas:
                content = tflite.convert(graph_def, arch.size, quantization,
                                         [data.paths[i] for i in train_rows])
                runner = tflite_runtime.interpreter(content, os.cpu_count() or 1)
                predicted = [int(np.argmax(tflite_runtime.run(runner, pixels[p].astype(np.float32)))) for p in test_paths]
                accuracy = float(np.mean(np.array(predicted) == y_all[test_rows]))
                deltas[quantization].append(accuracy - float_accuracy)
                row.append(f"{accuracy:.4f} ({accuracy - float_accuracy:+.4f})")
            rows.append(row)
            C.log(f"seed/fold {seed}/{fold + 1}: " + "  ".join(row))
        C.print_machine(os.cpu_count(), C.revision(), C.other_busy_processes())
        print(C.table(["seed/fold", "test photos", "float (graph.pb)"] + list(deltas), rows,
                      f"{flags.folds}-fold accuracy, {flags.architecture} (real weights), retrain's default flags"))
        summary = [[q, f"{statistics.mean(d):+.4f}", f"{min(d):+.4f} .. {max(d):+.4f}",
                    f"{statistics.stdev(d):.4f}" if len(d) > 1 else "-"] for q, d in deltas.items()]
        print(C.table(["quantization", "mean (quantized - float)", "range over folds", "stdev"], summary,
                      "Accuracy cost of quantization"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
