"""How a model.tflite is run, for retrain (its accuracy check) and the server (MODEL_ENGINE=tflite): a
LiteRT interpreter over the file's bytes, and one image's probabilities from it."""
import contextlib

import numpy as np

from classify_contract import tf_noise

_delegate_announced = False


def interpreter(content, threads=1):
    """A LiteRT interpreter over flatbuffer bytes, tensors allocated, XNNPACK on `threads` threads."""
    global _delegate_announced
    from ai_edge_litert.interpreter import Interpreter
    # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." at a process's first interpreter
    # only: that one is made with the line filtered; later ones (made by the server as requests need them)
    # leave file descriptor 2 alone.
    with contextlib.nullcontext() if _delegate_announced else tf_noise.filtered_stderr():
        runner = Interpreter(model_content=content, num_threads=threads)
        runner.allocate_tensors()
    _delegate_announced = True
    return runner


def run(runner, pixels):
    """Probabilities for one image's float32 pixels [H, W, 3] (a view of the output: copy it to keep it)."""
    runner.set_tensor(runner.get_input_details()[0]["index"], pixels[np.newaxis].astype(np.float32, copy=False))
    runner.invoke()
    return runner.get_tensor(runner.get_output_details()[0]["index"])[0]
