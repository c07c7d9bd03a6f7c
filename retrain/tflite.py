"""The fast model: model.tflite, converted from graph.pb, beside it in the model folder.

The same model as graph.pb (it is converted from that very GraphDef, so nothing is trained or built
twice): float32 RGB [1, H, W, 3] in [0, 255] in, probabilities out, the backbone's scaling inside.
`--tflite_quantization` chooses how its weights and activations are stored:

    float32   as graph.pb, in TensorFlow Lite's runtime (XNNPACK)
    float16   weights in float16 (half the file), computed in float32
    dynamic   weights in int8, activations quantized on the fly ("dynamic range")
    int8      weights and activations in int8 ("full integer"), calibrated on training images through
              the shared preprocessing (classify_contract.preprocessing.decode_image), as served
    none      no model.tflite

LiteRT (`ai-edge-litert`, TensorFlow Lite's maintained runtime: tf.lite.Interpreter is deprecated)
runs it here to measure its accuracy on the test split, and in the server (MODEL_ENGINE=tflite),
both through classify_contract.tflite_runtime.
"""
import random
import warnings

import numpy as np

from classify_contract import tf_noise
from classify_contract.preprocessing import decode_image
from classify_contract.tflite_runtime import interpreter, run

QUANTIZATIONS = ("int8", "dynamic", "float16", "float32", "none")
CALIBRATION_IMAGES = 100


def convert(graph_def, size, quantization, calibration_paths=()):
    """graph.pb's GraphDef as TFLite flatbuffer bytes, quantized as asked."""
    import tensorflow as tf

    from retrain.export import INPUT_NAME, OUTPUT_NAME

    def imported():
        tf.import_graph_def(graph_def, name="")

    wrapped = tf.compat.v1.wrap_function(imported, [])
    function = wrapped.prune(f"{INPUT_NAME}:0", f"{OUTPUT_NAME}:0")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], wrapped)
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        paths = list(calibration_paths)
        random.Random(0).shuffle(paths)  # a sample of every class, the same each run
        paths = paths[:CALIBRATION_IMAGES]
        if not paths:
            raise ValueError("int8 quantization needs training images to calibrate on")

        def representative():
            for path in paths:
                yield [decode_image(path, (size, size))[np.newaxis]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings(), tf_noise.filtered_stderr():
        # "Statistics for quantized inputs were expected": our inputs stay float32
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def export(graph_def, size, quantization, calibration_paths, test_paths, test_y, float_accuracy, max_drop):
    """(model.tflite's bytes, what the sidecar says of it), its accuracy measured on the test split; a loud
    warning when that is more than `max_drop` below the float model's."""
    import sys
    import time
    start = time.time()
    content = convert(graph_def, size, quantization, calibration_paths)
    test_accuracy = accuracy(content, size, test_paths, test_y)
    info = {"quantization": quantization, "bytes": len(content), "accuracy": {"test": test_accuracy},
            "seconds": round(time.time() - start, 1)}
    if test_accuracy is not None:
        print(f"model.tflite ({quantization}, {len(content) / 1e6:.1f} MB) test accuracy = {test_accuracy:.4f}")
    if test_accuracy is not None and float_accuracy is not None and test_accuracy < float_accuracy - max_drop:
        drop = float_accuracy - test_accuracy
        info["warning"] = (f"{quantization} quantization costs {drop:.4f} of test accuracy "
                           f"(over --max_quantization_drop {max_drop})")
        print("\n" + "!" * 72 + f"\n!! WARNING: model.tflite: {info['warning']}.\n!! Serve graph.pb "
              "(MODEL_ENGINE=tf), or try --tflite_quantization dynamic or float16.\n" + "!" * 72 + "\n",
              file=sys.stderr)
    return content, info


def accuracy(content, size, paths, y, threads=2):
    """The converted model's accuracy on labelled images (paths, class indices), decoded as served."""
    runner = interpreter(content, threads)
    predicted = [int(np.argmax(run(runner, decode_image(path, (size, size))))) for path in paths]
    return float(np.mean(np.array(predicted) == np.asarray(y))) if len(y) else None
