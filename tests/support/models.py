"""Model folders written by hand (a tiny frozen graph, as retrain writes one or as third parties publish them),
the real data and weights in ../shared, and a model folder's labels."""
import json
import os
import shutil

import numpy as np

from . import ROOT

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flower_photos")
MOBILENET_WEIGHTS = os.path.join(SHARED, "models", "mobilenet_v2_1.0_224_no_top.weights.h5")
LITE0_PRESET = os.path.join(SHARED, "models", "efficientnet_lite0_imagenet")  # README's offline command's weights

# Random MobileNetV2 weights give (almost) the same features for every image, so a
# model trained on them answers the same for all: real weights, when ../shared has
# them, make the tests' models tell images apart.
TEST_WEIGHTS = MOBILENET_WEIGHTS if os.path.isfile(MOBILENET_WEIGHTS) else "none"

# The Python with mediapipe==0.10.21 that writes model.tflite's TFLite metadata (retrain.tflite_metadata): .ci/run
# makes it in the checkout; $TFLITE_METADATA_PYTHON, as for retrain, names another.
METADATA_PYTHON = os.environ.get("TFLITE_METADATA_PYTHON") or os.path.join(ROOT, ".venv-tflite-metadata", "bin",
                                                                            "python")


def write_colour_model(folder, labels=("red", "green", "blue"), sharpness=32.0):
    """A tiny frozen graph whose answer depends on the image's colours (a trained model on few
    shapes may not): the softmax of its mean red, green and blue over `sharpness`."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        tf.nn.softmax(tf.reduce_mean(pixels, axis=[1, 2]) / sharpness, name="final_result")
    return write_graph_model(folder, graph, labels)


def write_sleepy_model(folder, warm_up_seconds, request_seconds, labels=("red", "green", "blue")):
    """write_colour_model's graph that also waits, without using a core: `warm_up_seconds` for a
    grey image (the server's warm-up run), `request_seconds` for any other (a tf.data sleep, which
    DatasetToSingleElement pays twice: once for the element, once to check there is no second)."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3], name="input")
        means = tf.reduce_mean(pixels, axis=[1, 2])
        scores = tf.nn.softmax(means / 32.0)
        grey = tf.reduce_max(tf.reduce_max(means, axis=1) - tf.reduce_min(means, axis=1)) < 8.0
        sleep_us = tf.where(grey, tf.constant(int(warm_up_seconds * 5e5), tf.int64),
                            tf.constant(int(request_seconds * 5e5), tf.int64))
        shape = tf.TensorShape([None, len(labels)])
        dataset = tf.raw_ops.TensorDataset(components=[scores], output_shapes=[shape])
        dataset = tf.raw_ops.SleepDataset(input_dataset=dataset, sleep_microseconds=sleep_us,
                                          output_types=[tf.float32], output_shapes=[shape])
        (out,) = tf.raw_ops.DatasetToSingleElement(dataset=dataset, output_types=[tf.float32], output_shapes=[shape])
        tf.identity(out, name="final_result")
    return write_graph_model(folder, graph, labels)


def write_graph_model(folder, graph, labels, size=32):
    """A model folder (classify_contract.model_folder) of a tf.Graph taking [None, size, size, 3] at `input` and
    answering at `final_result`, written as retrain writes one."""
    from classify_contract import model_folder
    from retrain import export
    os.makedirs(folder)
    export.write_model(os.path.join(folder, model_folder.GRAPH), os.path.join(folder, model_folder.LABELS),
                       graph.as_graph_def(), size, list(labels), {})
    return str(folder)


IMAGENET_LABELS = ["background", "tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
IMAGENET_SIDECAR = {"input": "input", "output": "InceptionV3/Predictions/Reshape_1", "input_height": 40,
                    "input_width": 40, "input_mean": 128.0, "input_std": 128.0}
IMAGENET_WEIGHTS = [[3.0, -2.0, 0.5, 1.0, -1.0, 0.0], [-1.0, 2.5, 0.0, -2.0, 1.5, 0.5],
                    [0.5, 0.0, -3.0, 2.0, 1.0, -0.5]]


def write_third_party_model(folder):
    """A frozen graph as third parties publish them (slim's Inception names: `input`, pixels scaled
    to [-1, 1] by the caller, `InceptionV3/Predictions/Reshape_1`), its labels and the model.json a
    user writes for it (IMAGENET_SIDECAR). Its scores (third_party_scores) depend on the colours."""
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 40, 40, 3], name="input")
        logits = tf.matmul(tf.reduce_mean(pixels, axis=[1, 2]), tf.constant(IMAGENET_WEIGHTS))
        tf.nn.softmax(logits, name="InceptionV3/Predictions/Reshape_1")
    os.makedirs(folder)
    with open(os.path.join(folder, "graph.pb"), "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("".join(label + "\n" for label in IMAGENET_LABELS))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(IMAGENET_SIDECAR, f)
    return str(folder)


def third_party_scores(data):
    """What write_third_party_model's graph must answer for encoded image `data`, worked out here
    with the shared decoding and numpy."""
    from classify_contract.preprocessing import decode_image
    x = (decode_image(data, (40, 40)) - 128.0) / 128.0
    logits = x.mean(axis=(0, 1)) @ np.array(IMAGENET_WEIGHTS)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def read_labels(model_dir):
    with open(os.path.join(model_dir, "labels.txt"), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def config_text(*models):
    """A model_config_list of (name, base_path[, extra text]) tuples."""
    body = "".join(f'  config {{ name: "{m[0]}" base_path: "{m[1]}" model_platform: "tensorflow" '
                   f'{m[2] if len(m) > 2 else ""} }}\n' for m in models)
    return "model_config_list {\n" + body + "}\n"


def write_config(path, *models):
    """Write the config atomically, as a user's deploy tool should (the poller never reads half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(config_text(*models))
    os.replace(tmp, path)
    return str(path)


def publish_copy(model_dir, base, version, label_suffix):
    """Publish model_dir as base/version atomically, its labels renamed so answers tell versions apart."""
    tmp = os.path.join(base, f".tmp-{version}")
    shutil.copytree(model_dir, tmp)
    with open(os.path.join(model_dir, "labels.txt")) as f:
        labels = [line.strip() + label_suffix for line in f if line.strip()]
    with open(os.path.join(tmp, "labels.txt"), "w") as f:
        f.write("\n".join(labels) + "\n")
    os.rename(tmp, os.path.join(base, str(version)))
    return set(labels)


def load_frozen_graph(path):
    import tensorflow as tf
    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    return graph


def run_frozen_graph(path, input_name, output_name, batch):
    """The graph in a plain TF1 Session, as classify_server runs it."""
    import tensorflow as tf
    with tf.compat.v1.Session(graph=load_frozen_graph(path)) as session:
        return session.run(output_name, {input_name: batch})


def held_out(folder, split="testing"):
    """A split of the e2e flower_model's photos as retrain made it (by file name): (path, label) pairs."""
    from retrain.images import create_image_lists
    with open(os.path.join(folder, "model.json"), encoding="utf-8") as f:
        image_dir = json.load(f)["image_dir"]
    lists = create_image_lists([image_dir], 10, 30)
    return [(p, label) for label, paths in sorted(lists.sets()[split].items()) for p in paths]


def engine(folder, kind):
    """The model in `folder`, loaded in this process by engine `kind` (MODEL_ENGINE: tf or tflite)."""
    from classify_server import settings
    from classify_server.engines import load
    return load(str(folder), settings.from_env({"MODEL_ENGINE": kind}).engine)
