"""`--export triton DIR`: a Triton Inference Server model repository of model.onnx.

    DIR/NAME/config.pbtxt      platform onnxruntime_onnx, max_batch_size, dynamic batching, the input and
                               output as the ONNX file declares them, the output's labels as label_filename
    DIR/NAME/labels.txt        one label per line (Triton's classification extension answers with them)
    DIR/NAME/VERSION/model.onnx

config.pbtxt is Triton's own protobuf (tritonclient's model_config_pb2) printed by protobuf's text_format,
and the dims come from the ONNX file itself, so config and model cannot disagree. DIR/NAME is written in a
temporary folder and renamed into place: Triton, polling the repository, never sees half of it.
"""
import os
import re

from classify_contract import atomic, model_folder

CONFIG = "config.pbtxt"
MAX_BATCH_SIZE = 32
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a folder name Triton and its URLs take as it is


def config_text(name, onnx_content, labels_file=model_folder.LABELS, max_batch_size=MAX_BATCH_SIZE):
    """config.pbtxt's text for the ONNX model `onnx_content` (bytes); its first dimension is the batch."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    graph = onnx.load_model_from_string(onnx_content).graph
    (model_input,), (model_output,) = graph.input, graph.output

    def dims(tensor):
        shape = tensor.type.tensor_type.shape.dim[1:]  # after the batch dimension, which Triton adds
        return [d.dim_value if d.HasField("dim_value") else -1 for d in shape]

    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size,
                            dynamic_batching=mc.ModelDynamicBatching())
    config.input.add(name=model_input.name, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NHWC,
                     dims=dims(model_input))
    config.output.add(name=model_output.name, data_type=mc.TYPE_FP32, dims=dims(model_output),
                      label_filename=labels_file)
    return text_format.MessageToString(config)


def write(repository, name, version, onnx_content, labels):
    """REPOSITORY/NAME complete (replacing an earlier one); returns its path."""
    from retrain.export import publish
    if not NAME.match(name):
        raise ValueError(f"{name!r} is not a Triton model name (letters, digits, _ . -); choose one with --model_name")
    text = config_text(name, onnx_content)

    def fill(folder):
        atomic.write_text(os.path.join(folder, CONFIG), text)
        atomic.write_text(os.path.join(folder, model_folder.LABELS), "".join(label + "\n" for label in labels))
        atomic.write_bytes(os.path.join(folder, str(version), model_folder.ONNX), onnx_content)

    target = os.path.join(repository, name)
    publish(target, fill)
    return target
