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
both through classify_contract.tflite_runtime. Its answers there are compared with graph.pb's, photo by
photo (`compare`: an exact McNemar test), and the run warns only when the loss is both over
--max_quantization_drop and unlikely to be chance.
"""
import random
import warnings

import numpy as np

from classify_contract import tf_noise
from classify_contract.preprocessing import decode_image
from classify_contract.tflite_runtime import interpreter, run

QUANTIZATIONS = ("int8", "dynamic", "float16", "float32", "none")
CALIBRATION_IMAGES = 100
# The quantization warning's false-alarm rate: when model.tflite is truly as accurate as graph.pb, at most 1
# run in 20 warns. A warning raised by chance teaches users to ignore warnings.
ALPHA = 0.05


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


def export(graph_def, size, quantization, calibration_paths, test_paths, test_y, float_predicted, max_drop):
    """(model.tflite's bytes, what the sidecar says of it), its accuracy measured on the test split against
    graph.pb's answers there (`float_predicted`, class indices); a loud warning when it is more than
    `max_drop` below graph.pb's and the paired test says that is no chance (compare)."""
    import sys
    import time
    start = time.time()
    content = convert(graph_def, size, quantization, calibration_paths)
    predicted = predictions(content, size, test_paths)
    info = {"quantization": quantization, "bytes": len(content),
            "accuracy": {"test": float(np.mean(predicted == np.asarray(test_y))) if len(test_y) else None},
            "seconds": round(time.time() - start, 1)}
    if not len(test_y):
        return content, info
    print(f"model.tflite ({quantization}, {len(content) / 1e6:.1f} MB) test accuracy = {info['accuracy']['test']:.4f}")
    if float_predicted is None:
        return content, info
    comparison = compare(test_y, float_predicted, predicted)
    info["paired_test"] = comparison
    drop = comparison["drop"]
    said = (f"{quantization} quantization {'costs' if drop >= 0 else 'gains'} {abs(drop):.4f} of test accuracy: of "
            f"{len(test_y)} test photos, {comparison['worse']} right by graph.pb are wrong by model.tflite and "
            f"{comparison['better']} the other way (exact McNemar test, one-sided p = {comparison['p_value']:.3g})")
    if drop > max_drop and comparison["p_value"] < ALPHA:
        info["warning"] = f"{said}: over --max_quantization_drop {max_drop}, and unlikely to be chance"
        print("\n" + "!" * 72 + f"\n!! WARNING: model.tflite: {info['warning']}.\n!! Serve graph.pb "
              "(MODEL_ENGINE=tf), or try --tflite_quantization dynamic or float16.\n" + "!" * 72 + "\n",
              file=sys.stderr)
    else:
        verdict = ("within what chance gives on this many photos" if comparison["p_value"] >= ALPHA
                   else f"within --max_quantization_drop {max_drop}")
        info["against_graph"] = f"{said}: {verdict}"
        print(f"model.tflite against graph.pb: {info['against_graph']}")
    return content, info


def compare(truth, float_predicted, quantized_predicted):
    """graph.pb's and model.tflite's answers on the same photos, paired: the accuracy model.tflite loses
    (`drop`), the photos only graph.pb gets right (`worse`) and only model.tflite does (`better`), and the
    exact McNemar test's one-sided p-value for "model.tflite is less accurate".

    Paired, because both models answer the same photos: the photos they agree on say nothing about which is
    better, so only the discordant ones count, and under "as accurate" each is equally likely to go either
    way: worse ~ Binomial(worse + better, 1/2). Exact (scipy's binomial test), because there are a handful
    of them, where McNemar's chi-square approximation is poor. One-sided, because only a loss is worth a
    warning: a quantized model that does better is no alarm.
    """
    from scipy.stats import binomtest
    truth = np.asarray(truth)
    float_right, quantized_right = np.asarray(float_predicted) == truth, np.asarray(quantized_predicted) == truth
    worse, better = int(np.sum(float_right & ~quantized_right)), int(np.sum(~float_right & quantized_right))
    p_value = binomtest(worse, worse + better, 0.5, alternative="greater").pvalue if worse + better else 1.0
    return {"drop": float(np.mean(float_right) - np.mean(quantized_right)), "worse": worse, "better": better,
            "p_value": float(p_value)}


def predictions(content, size, paths, threads=2):
    """The converted model's answers (class indices) for images, decoded as served."""
    runner = interpreter(content, threads)
    return np.array([int(np.argmax(run(runner, decode_image(path, (size, size))))) for path in paths], np.int64)
