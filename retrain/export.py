"""Writing the model: a frozen graph.pb, labels.txt, a JSON sidecar, and a SavedModel.

graph.pb takes float32 images [None, H, W, 3] of raw RGB values in [0, 255] at
`input:0` and answers class probabilities at `final_result:0`. The sidecar
(model.json) tells the server those names and the image size; classify_contract.model_folder
defines the format. Every file is written atomically, so a server watching the
directory never reads half a model.
"""
import json
import os
import shutil
import tempfile
import time

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from classify_contract import atomic
from classify_contract.model_folder import SIDECAR, TFLITE

INPUT_NAME = "input"
OUTPUT_NAME = "final_result"
BOTTLENECK_NAME = "bottleneck"


def _serving_function(model, shape):
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    def serve(inputs):
        return model(inputs, training=False)
    return serve


def frozen_graph_def(model, shape, output_name=OUTPUT_NAME):
    """A Keras model as one GraphDef, weights folded in as constants: `input:0` -> `output_name:0`."""
    frozen = convert_variables_to_constants_v2(_serving_function(model, shape).get_concrete_function())
    graph_def = frozen.graph.as_graph_def()
    _rename(graph_def, frozen.outputs[0].name.split(":")[0], output_name)  # the name retrain.py's graphs use
    return graph_def


def stitched_graph_def(backbone_def, head_def):
    """One graph from a frozen backbone (output `bottleneck`) and a frozen head on its features.

    This is how retrain.py built its graph: the new layer appended to a frozen
    network. A run that trains the head alone never builds the Keras backbone.
    """
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(backbone_def, name="")
        features = graph.get_tensor_by_name(BOTTLENECK_NAME + ":0")
        tf.import_graph_def(head_def, input_map={INPUT_NAME + ":0": features}, name="head")
    graph_def = graph.as_graph_def()
    # The head's own input placeholder is unfed now (the backbone feeds its consumers): drop it.
    nodes = [node for node in graph_def.node if node.name != "head/" + INPUT_NAME]
    del graph_def.node[:]
    graph_def.node.extend(nodes)
    _rename(graph_def, "head/" + OUTPUT_NAME, OUTPUT_NAME)
    return graph_def


def _rename(graph_def, old, new):
    """Rename the output node `old` (nothing consumes it, so no input needs changing)."""
    for node in graph_def.node:
        if node.name == old:
            node.name = new


def write_model(output_graph, output_labels, graph_def, size, labels, info, tflite_model=None):
    """Write graph.pb, labels.txt, the sidecar and model.tflite (when given) beside graph.pb, each atomically."""
    atomic.write_bytes(output_graph, graph_def.SerializeToString())
    tflite_path = os.path.join(os.path.dirname(os.path.abspath(output_graph)), TFLITE)
    if tflite_model is not None:
        atomic.write_bytes(tflite_path, tflite_model)
    elif os.path.exists(tflite_path):  # an earlier run's, of another model: never leave it beside this one
        os.unlink(tflite_path)
    atomic.write_text(output_labels, "".join(label + "\n" for label in labels))
    sidecar = dict(info, input=INPUT_NAME + ":0", output=OUTPUT_NAME + ":0", input_height=size,
                   input_width=size, input_mean=0.0, input_std=1.0,
                   graph=os.path.basename(output_graph), labels=os.path.basename(output_labels),
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    atomic.write_text(os.path.join(os.path.dirname(os.path.abspath(output_graph)), SIDECAR),
                      json.dumps(sidecar, indent=2) + "\n")


def write_saved_model(saved_model_dir, model, size):
    """A SavedModel for TensorFlow Serving; `serving_default` takes encoded image bytes.

    TF Serving has no Pillow, so this signature decodes with TensorFlow's own ops
    (tf.io.decode_image, antialiased bilinear resize, centre crop; TensorFlow has no
    op for EXIF orientation, so rotated-by-tag photos are not turned); `predict_images`
    takes already-decoded pixels like graph.pb does.
    """
    pixels = _serving_function(model, [None, size, size, 3])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_bytes(images):
        def decode(data):
            # As decode_image does: scale the short side to `size`, crop the centre.
            raw = tf.cast(tf.io.decode_image(data, expand_animations=False), tf.float32)
            channels = tf.shape(raw)[-1]  # 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA
            rgb = tf.cond(channels < 3, lambda: tf.image.grayscale_to_rgb(raw[..., :1]), lambda: raw[..., :3])
            alpha = tf.cond(channels % 2 == 0, lambda: raw[..., -1:] / 255.0, lambda: tf.ones_like(raw[..., :1]))
            image = rgb * alpha + 255.0 * (1.0 - alpha)  # transparency over white, as decode_image does
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scaled = tf.cast(tf.math.ceil(shape * size / tf.reduce_min(shape)), tf.int32)
            image = tf.image.resize(image, scaled, antialias=True)
            return tf.image.resize_with_crop_or_pad(image, size, size)
        return {"scores": pixels(tf.map_fn(decode, images, fn_output_signature=tf.float32))}

    module = tf.Module()
    module.model = model
    tf.saved_model.save(module, saved_model_dir, signatures={"serving_default": serve_bytes,
                                                             "predict_images": pixels})


def publish(target_dir, write):
    """Call write(tmp_dir), then rename tmp_dir to target_dir: it appears complete or not at all."""
    parent = os.path.dirname(os.path.abspath(target_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target_dir)}.")
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target_dir):
            shutil.rmtree(target_dir)
        os.rename(tmp, target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
