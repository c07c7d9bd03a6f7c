"""Retrain an ImageNet network to recognise your own classes of images.

Transfer learning as TensorFlow's classic image_retraining/retrain.py did it,
on TensorFlow 2 / Keras 3. Put your photos in one folder per class:

    ~/flower_photos/daisy/photo1.jpg
    ~/flower_photos/roses/another.png
    ...

and run

    python -m retrain --image_dir ~/flower_photos

An ImageNet backbone (Inception-v3 by default, or --architecture mobilenet_v2)
turns each image into a "bottleneck", its pooled feature vector; these are cached
under --bottleneck_dir, so later runs skip that slow part. A new softmax layer is
trained on them, and the backbone plus that layer are written as one frozen graph:

    model/graph.pb     float32 images [None, H, W, 3], raw RGB 0-255, at input:0;
                       class probabilities at final_result:0
    model/labels.txt   one label per line, in the order of the probabilities
    model/model.json   tensor names, image size, architecture, accuracies

which `gunicorn classify_server:app` serves. Images are split into training,
validation and testing sets by a hash of their file name, so adding images never
moves old ones between sets. The new layer is trained on the training set and
judged on validation, then trained again on both (--refit); the test set is
judged last, never seen in training. Without --image_dir, TensorFlow's flower_photos
data set is downloaded to ~/flower_photos. For the last points of accuracy, and
time to spare, --fine_tune also trains the top of the backbone.
"""
import argparse
import os
import time

from classify_contract import model_folder, tf_noise
from retrain import exports, triton_repository
from retrain.tflite import QUANTIZATIONS as TFLITE_QUANTIZATIONS


def shown_default(action):
    """An argument's default as `--help` and README's flag table show it ("" when there is none)."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if isinstance(action, argparse.BooleanOptionalAction):
        return "on" if action.default else "off"
    if action.default is None or action.default == [] or action.default is argparse.SUPPRESS:
        return ""
    return str(action.default)


def rate_or_auto(text):
    """A flag's value: "auto" (the architecture decides) or a positive number."""
    if text == "auto":
        return text
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive rate")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written, and each flag's default after its help."""

    def _get_help_string(self, action):
        default = shown_default(action)
        return action.help + (f" (default: {default.replace('%', '%%')})" if default and action.help else "")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m retrain", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--image_dir", default=None,
                   help="folder with one subfolder of images per class (none: ~/flower_photos, downloaded when absent)")
    p.add_argument("--extra_image_dir", action="append", default=[],
                   help="more labelled images in the same layout, e.g. the server's FEEDBACK_DIR (repeatable)")
    p.add_argument("--architecture", default="inception_v3",
                   help="inception_v3 (299x299), mobilenet_v2, efficientnet_v2_b0, resnet50, convnext_tiny, "
                        "efficientnet_lite0 (224x224) or efficientnet_lite2 (260x260)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (downloaded by Keras or KerasHub), a local .weights.h5 file (a KerasHub preset "
                        "folder for efficientnet_lite*), or none (random: tests only)")
    p.add_argument("--output_dir", default="model", help="where graph.pb, labels.txt and model.json go")
    p.add_argument("--output_graph", default=None, help="the graph's path, if not OUTPUT_DIR/graph.pb")
    p.add_argument("--output_labels", default=None, help="the labels' path, if not OUTPUT_DIR/labels.txt")
    p.add_argument("--saved_model_dir", default=None, help="also export a SavedModel here (TensorFlow Serving)")
    p.add_argument("--model_base_path", default=None,
                   help="write the next numbered version into this folder (TensorFlow Serving's layout: "
                        "graph.pb, labels.txt, model.json and a SavedModel in DIR/N), instead of --output_dir")
    p.add_argument("--max_accuracy_drop", type=float, default=0.02,
                   help="with --model_base_path, refuse to publish a version whose test accuracy is lower "
                        "than the newest version's by more than this")
    p.add_argument("--tflite_quantization", default="auto", choices=("auto",) + TFLITE_QUANTIZATIONS,
                   help="model.tflite beside graph.pb, for MODEL_ENGINE=tflite: int8, dynamic, float16, float32 or "
                        "none (auto: int8 for mobilenet_v2, float16 once fine-tuned, int8 for the EfficientNet-Lite "
                        "ones, dynamic for the others; docs/operations.md: Engines)")
    p.add_argument("--max_quantization_drop", type=float, default=0.01,
                   help="warn loudly when model.tflite's test accuracy is lower than graph.pb's by more, and a "
                        "paired test on the test photos says it is no chance (docs/training.md)")
    p.add_argument("--tflite_calibration_dir", default=None,
                   help="int8: calibrate on up to 100 images from this folder (any layout: e.g. photos like those "
                        "the model will serve) instead of 100 of the training photos")
    p.add_argument("--tflite_metadata_python", default=None,
                   help="a Python with mediapipe==0.10.21, which writes model.tflite's TFLite metadata for MediaPipe "
                        "(a venv of its own: docs/training.md; default $TFLITE_METADATA_PYTHON; none: no metadata)")
    p.add_argument("--export", action="append", nargs="+", default=[], metavar="FORMAT",
                   help="also write the model for another runtime: `onnx` (model.onnx beside graph.pb) or "
                        "`triton DIR` (a Triton model repository DIR/NAME); repeatable; needs pip install '.[export]'")
    p.add_argument("--model_name", default=None,
                   help="the model's name in model.tflite's metadata and the Triton repository (default: the "
                        "--image_dir folder's name)")
    p.add_argument("--bottleneck_dir", default="/tmp/bottleneck",
                   help="cache of each image's features, per architecture and weights: later runs skip that part")
    p.add_argument("--summaries_dir", default="/tmp/retrain_logs",
                   help="TensorBoard summaries of the training (empty: none)")
    p.add_argument("--how_many_training_steps", type=int, default=4000, help="training steps of the new layer")
    p.add_argument("--learning_rate", type=float, default=0.001,
                   help="Adam learning rate of the new layer, decaying to 0 over the steps")
    p.add_argument("--train_batch_size", type=int, default=100, help="bottlenecks per training step")
    p.add_argument("--l2_regularization", type=float, default=0.01,
                   help="L2 penalty on the new layer's weights (chosen by 5-fold CV: docs/benchmark-history.md run P)")
    p.add_argument("--eval_step_interval", type=int, default=100, help="steps between validation reports")
    refit = p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    refit.help = ("once validated, train the new layer again on the training and validation images together "
                  "(not with --fine_tune or distortions, which choose their best epoch on validation)")
    p.add_argument("--testing_percentage", type=int, default=10,
                   help="percentage of the images held out for the final test (by a hash of the file name)")
    p.add_argument("--validation_percentage", type=int, default=10,
                   help="percentage of the images used to validate during training")
    p.add_argument("--flip_left_right", action="store_true", help="randomly mirror training images (trains on pixels)")
    p.add_argument("--random_crop", type=int, default=0, help="percentage margin to randomly crop (trains on pixels)")
    p.add_argument("--random_scale", type=int, default=0, help="percentage to randomly scale up (trains on pixels)")
    p.add_argument("--random_brightness", type=int, default=0,
                   help="percentage to randomly change brightness (trains on pixels)")
    p.add_argument("--fine_tune", action="store_true",
                   help="then also train the top of the backbone, keeping the best epoch on validation (slow)")
    p.add_argument("--fine_tune_epochs", type=int, default=8, help="epochs of fine-tuning")
    p.add_argument("--fine_tune_learning_rate", type=rate_or_auto, default="auto",
                   help="fine-tuning's learning rate, decaying to 0 over the epochs (auto: the architecture's, 3e-4 "
                        "for the EfficientNet-Lite ones, 1e-4 for the others; rate, epochs and fraction chosen by "
                        "CV: docs/benchmark-history.md runs Q and V)")
    p.add_argument("--fine_tune_fraction", type=float, default=0.3, help="share of the backbone's layers to train")
    p.add_argument("--fine_tune_batch_size", type=int, default=32, help="images per fine-tuning step")
    p.add_argument("--print_misclassified_test_images", action="store_true",
                   help="list the test images the model gets wrong")
    p.add_argument("--print_label_issues", action="store_true",
                   help="list the training photos likeliest to carry a wrong label (report.html shows them)")
    return p


def parse_args(argv=None):
    p = build_parser()
    flags = p.parse_args(argv)
    flags.output_graph = flags.output_graph or os.path.join(flags.output_dir, model_folder.GRAPH)
    flags.output_labels = flags.output_labels or os.path.join(flags.output_dir, model_folder.LABELS)
    flags.tflite_metadata_python = flags.tflite_metadata_python or os.environ.get("TFLITE_METADATA_PYTHON")
    flags.exports = exports.requested(p, flags.export)
    if "triton" in flags.exports and not triton_repository.NAME.match(exports.model_name(flags)):
        p.error(f"{exports.model_name(flags)!r} is not a Triton model name (letters, digits, _ . -): give --model_name")
    if flags.tflite_calibration_dir and not os.path.isdir(flags.tflite_calibration_dir):
        p.error(f"--tflite_calibration_dir {flags.tflite_calibration_dir} is not a folder")
    if flags.saved_model_dir:
        saved = os.path.abspath(flags.saved_model_dir)
        for output in (flags.output_graph, flags.output_labels):
            if os.path.commonpath([saved, os.path.abspath(output)]) == saved:
                p.error(f"--saved_model_dir {flags.saved_model_dir} would replace the folder of {output}; "
                        "give it a folder of its own")
    return flags


def main(argv=None):
    """A retrain run, step by step (retrain.steps says what each does)."""
    flags = parse_args(argv)
    tf_noise.import_tensorflow_quietly()  # its start-up lines drown the progress and read like failures
    from retrain import steps  # TensorFlow and Keras: after parsing, so that --help and flag errors are instant

    arch = steps.choose_architecture(flags.architecture)
    image_dir, lists = steps.list_images(flags)
    steps.warn_if_random(flags.weights)
    start = time.time()
    backbone = steps.Backbone(arch, flags.weights, flags.bottleneck_dir)
    data = steps.compute_bottlenecks(lists, backbone)
    run = steps.start_report(data, arch, flags)
    run.timings["bottlenecks"] = time.time() - start
    steps.find_label_issues(data, flags, run)
    trained = steps.train_model(data, backbone, flags, run)
    steps.evaluate(trained, data, flags, run)
    info = steps.model_info(arch, flags, image_dir, run, time.time() - start)
    frozen, tflite_model, made = steps.export_model(trained, data, arch, flags, run, info)
    run.timings["total"] = time.time() - start
    if flags.model_base_path:
        return steps.publish_version(flags, frozen, trained, arch.size, data.labels, info, tflite_model, run, made)
    return steps.write_model_folder(flags, frozen, trained, arch.size, data.labels, info, tflite_model, run, made)
