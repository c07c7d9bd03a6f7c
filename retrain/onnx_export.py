"""model.onnx: graph.pb's very GraphDef converted to ONNX (`--export onnx`, and the Triton repository's model).

tf2onnx (ONNX's own converter for TensorFlow, `pip install .[export]`) converts the frozen graph, so nothing
is trained or built twice: float32 RGB [N, H, W, 3] in 0-255 at `input`, the backbone's scaling inside,
probabilities at `scores`, as graph.pb. ONNX Runtime then measures its accuracy on the test split, as
retrain.tflite does model.tflite's.
"""
import logging
import time

import numpy as np

from classify_contract import tf_noise
from classify_contract.preprocessing import decode_image

INPUT, OUTPUT = "input", "scores"
OPSET = 17  # ONNX Runtime 1.14+ and Triton's onnxruntime backend (23.02+) run it
BATCH = 32  # test photos per ONNX Runtime run


def convert(graph_def):
    """graph.pb's GraphDef as ONNX bytes, its batch dimension named `batch`."""
    import tf2onnx

    from retrain.export import INPUT_NAME, OUTPUT_NAME
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    # tf2onnx calls TensorFlow 1 APIs, whose deprecation warnings are tf2onnx's business, not the user's.
    tf_logger.setLevel(logging.ERROR)
    try:
        with tf_noise.filtered_stderr():
            model, _ = tf2onnx.convert.from_graph_def(
                graph_def, input_names=[INPUT_NAME + ":0"], output_names=[OUTPUT_NAME + ":0"], opset=OPSET,
                tensors_to_rename={INPUT_NAME + ":0": INPUT, OUTPUT_NAME + ":0": OUTPUT})
    finally:
        tf_logger.setLevel(level)
    for tensor in (*model.graph.input, *model.graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model.SerializeToString()


def session(content, threads=2):
    """An ONNX Runtime session of `content` on the CPU."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])


def accuracy(content, size, paths, y):
    """The ONNX model's accuracy on labelled images (paths, class indices), decoded as served."""
    if not len(y):
        return None
    runner, predicted = session(content), []
    for start in range(0, len(paths), BATCH):
        batch = np.stack([decode_image(path, (size, size)) for path in paths[start:start + BATCH]])
        predicted.extend(np.argmax(runner.run([OUTPUT], {INPUT: batch.astype(np.float32)})[0], axis=1))
    return float(np.mean(np.array(predicted) == np.asarray(y)))


def export(graph_def, size, test_paths, test_y):
    """(model.onnx's bytes, what model.json says of it: bytes, test accuracy, seconds)."""
    start = time.time()
    content = convert(graph_def)
    test_accuracy = accuracy(content, size, test_paths, test_y)
    if test_accuracy is not None:
        print(f"model.onnx ({len(content) / 1e6:.1f} MB) test accuracy = {test_accuracy:.4f}")
    return content, {"bytes": len(content), "opset": OPSET, "input": INPUT, "output": OUTPUT,
                     "accuracy": {"test": test_accuracy}, "seconds": round(time.time() - start, 1)}
