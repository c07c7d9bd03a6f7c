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
import functools
import os
import sys
import time

import numpy as np

from classify_contract import atomic, model_folder, tf_noise
from classify_contract.preprocessing import PREPROCESSING_VERSION
from retrain.images import create_image_lists, maybe_download_flowers
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
                   help="inception_v3 (299x299), mobilenet_v2, efficientnet_v2_b0, resnet50 or convnext_tiny (224x224)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (downloaded by Keras), a local .weights.h5 file, or none (random: tests only)")
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
                        "none (auto: int8 for mobilenet_v2, dynamic for inception_v3; docs/operations.md: Engines)")
    p.add_argument("--max_quantization_drop", type=float, default=0.01,
                   help="warn loudly when model.tflite's test accuracy is lower than graph.pb's by more")
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
    p.add_argument("--fine_tune_learning_rate", type=float, default=1e-4,
                   help="fine-tuning's learning rate, decaying to 0 over the epochs (rate, epochs and fraction "
                        "chosen by 5-fold CV: docs/benchmark-history.md run Q)")
    p.add_argument("--fine_tune_fraction", type=float, default=0.3, help="share of the backbone's layers to train")
    p.add_argument("--fine_tune_batch_size", type=int, default=32, help="images per fine-tuning step")
    p.add_argument("--print_misclassified_test_images", action="store_true",
                   help="list the test images the model gets wrong")
    return p


def parse_args(argv=None):
    p = build_parser()
    flags = p.parse_args(argv)
    flags.output_graph = flags.output_graph or os.path.join(flags.output_dir, model_folder.GRAPH)
    flags.output_labels = flags.output_labels or os.path.join(flags.output_dir, model_folder.LABELS)
    if flags.saved_model_dir:
        saved = os.path.abspath(flags.saved_model_dir)
        for output in (flags.output_graph, flags.output_labels):
            if os.path.commonpath([saved, os.path.abspath(output)]) == saved:
                p.error(f"--saved_model_dir {flags.saved_model_dir} would replace the folder of {output}; "
                        "give it a folder of its own")
    return flags


def main(argv=None):
    flags = parse_args(argv)
    tf_noise.import_tensorflow_quietly()  # its start-up lines drown the progress and read like failures
    # Heavy imports after parsing, so that --help and flag errors are instant.
    from retrain import backbones, bottlenecks, export, report, train

    if flags.architecture not in backbones.ARCHITECTURES:
        raise SystemExit(f"error: unknown --architecture {flags.architecture!r}; "
                         f"choose one of {', '.join(backbones.ARCHITECTURES)}")
    arch = backbones.ARCHITECTURES[flags.architecture]
    image_dir = flags.image_dir or maybe_download_flowers(os.path.expanduser("~/flower_photos"))
    for folder in flags.extra_image_dir:
        if not os.path.isdir(folder):
            print(f"note: --extra_image_dir {folder} does not exist (no feedback yet?); skipped", file=sys.stderr)
    image_dirs = [image_dir] + [d for d in flags.extra_image_dir if os.path.isdir(d)]
    lists = create_image_lists(image_dirs, flags.validation_percentage, flags.testing_percentage)
    labels = lists.labels
    if flags.weights == "none":
        print("\n" + "!" * 72 + "\n!! --weights none: RANDOM backbone weights. The model will be close to\n"
              "!! useless; this is for tests and speed benchmarks only.\n" + "!" * 72 + "\n", file=sys.stderr)

    start = time.time()
    # Built on first use: a run whose bottlenecks are all cached never needs the Keras backbone.
    backbone = functools.cache(lambda: backbones.build_backbone(arch, flags.weights))
    cache_dir = os.path.join(flags.bottleneck_dir, f"{arch.name}-{backbones.weights_tag(flags.weights)}"
                                                   f"-p{PREPROCESSING_VERSION}")
    # The frozen backbone computes the bottlenecks and, with the new layer appended, becomes graph.pb.
    backbone_def = functools.cache(lambda: backbone_graph_def(cache_dir, backbone, arch.size))
    all_paths = [p for s in lists.sets().values() for paths in s.values() for p in paths]
    features, skipped = bottlenecks.get_bottlenecks(
        all_paths, lambda: bottlenecks.frozen_forward(backbone_def()), arch.size, cache_dir)
    timings = {"bottlenecks": time.time() - start}
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for path, reason in sorted(skipped.items()):
            print(f"  {path}: {reason}", file=sys.stderr)
    for label in labels:
        if not any(p in features for s in lists.sets().values() for p in s[label]):
            raise SystemExit(f"error: class {label!r} has no usable image; add images or remove its folder")

    def arrays(image_set):
        paths = [p for i, label in enumerate(labels) for p in image_set[label] if p in features]
        y = np.array([i for i, label in enumerate(labels) for p in image_set[label] if p in features], np.int64)
        x = np.stack([features[p] for p in paths]) if paths else np.zeros((0, 1), np.float32)
        return paths, x, y

    (train_paths, train_x, train_y), (val_paths, val_x, val_y), (test_paths, test_x, test_y) = (
        arrays(lists.training), arrays(lists.validation), arrays(lists.testing))
    print(f"{len(train_y)} training, {len(val_y)} validation, {len(test_y)} testing images "
          f"in {len(labels)} classes", file=sys.stderr)
    if not len(train_y):
        raise SystemExit("error: no training images; lower --testing_percentage/--validation_percentage "
                         "or add images")
    run = report.Run(labels, arch.name, flags.weights, skipped=skipped, settings=vars(flags),
                     counts={name: {label: sum(p in features for p in image_set[label]) for label in labels}
                             for name, image_set in lists.sets().items()})
    stage = time.time()
    head = train.train_head(train_x, train_y, (val_x, val_y) if len(val_y) else None, len(labels), flags,
                            run.head_history)
    on_pixels = flags.fine_tune or train.augmentation_layers(flags) is not None
    if flags.refit and len(val_y) and not on_pixels:
        head = refit_head(head, (train_x, train_y), (val_x, val_y), len(labels), flags, run)
    timings["training the new layer"] = time.time() - stage

    if on_pixels:
        stage = time.time()
        trained = train.train_on_images(backbone(), head, train_paths, train_y, (val_paths, val_y), arch.size, flags,
                                        run.fine_tune_history)
        timings["training on pixels" + (" (fine-tuning)" if flags.fine_tune else "")] = time.time() - stage
        model = lambda: trained  # noqa: E731

        def predict(paths, x):
            return trained.predict(train.load_images(paths, arch.size).astype(np.float32), verbose=0)

        def graph_def():
            return export.frozen_graph_def(trained, [None, arch.size, arch.size, 3])
    else:
        model = functools.cache(lambda: train.build_classifier(backbone(), head))

        def predict(paths, x):
            return head.predict(x, verbose=0)

        def graph_def():
            return export.stitched_graph_def(backbone_def(),
                                             export.frozen_graph_def(head, [None, train_x.shape[1]]))

    accuracy = run.accuracy
    for name, paths, x, y in (("validation", val_paths, val_x, val_y), ("test", test_paths, test_x, test_y)):
        if len(y) and name not in accuracy:  # validation is already judged when the layer was refit
            scores = predict(paths, x)
            predicted = np.argmax(scores, axis=1)
            accuracy[name], run.sizes[name] = float(np.mean(predicted == y)), len(y)
            print(f"{name} accuracy = {accuracy[name]:.4f} (N={len(y)})")
    if "test" in accuracy:
        run.test_paths, run.test_truth, run.test_scores = test_paths, test_y, scores
        print("confusion matrix (test set):")
        print(report.format_confusion(report.confusion_matrix(test_y, predicted, len(labels)), labels))
        if flags.print_misclassified_test_images:
            print("misclassified test images:")
            for path, truth, guess, _ in report.misclassified(run):
                print(f"  {path}  (true {truth}, predicted {guess})")
    else:
        print("warning: the test set is empty; no test accuracy (raise --testing_percentage or add images)",
              file=sys.stderr)

    # Paths in model.json are absolute, whatever folder retrain ran from (the server may run elsewhere).
    weights = flags.weights if flags.weights in ("imagenet", "none") else os.path.abspath(flags.weights)
    info = {"architecture": arch.name, "weights": weights, "labels_count": len(labels),
            "accuracy": accuracy, "fine_tuned": bool(flags.fine_tune), "refit": run.refit,
            "image_dir": os.path.abspath(image_dir),
            "training_seconds": round(time.time() - start, 1)}
    stage = time.time()
    frozen = graph_def()
    quantization = arch.quantization if flags.tflite_quantization == "auto" else flags.tflite_quantization
    tflite_model = None
    if quantization != "none":
        from retrain import tflite
        tflite_model, info["tflite"] = tflite.export(frozen, arch.size, quantization, train_paths, test_paths, test_y,
                                                     accuracy.get("test"), flags.max_quantization_drop)
        run.tflite = info["tflite"]
    timings["export"] = time.time() - stage
    timings["total"] = time.time() - start
    run.timings = timings
    if flags.model_base_path:
        return publish_version(flags, export, frozen, model, arch.size, labels, info, tflite_model, run)
    export.write_model(flags.output_graph, flags.output_labels, frozen, arch.size, labels, info, tflite_model)
    print(f"wrote {flags.output_graph} and {flags.output_labels}" + (" and model.tflite" if tflite_model else ""))
    print(f"report: {report.write(os.path.dirname(os.path.abspath(flags.output_graph)), run)}")
    if flags.saved_model_dir:
        export.publish(flags.saved_model_dir, lambda tmp: export.write_saved_model(tmp, model(), arch.size))
        print(f"wrote SavedModel {flags.saved_model_dir}")
    return 0


def refit_head(head, training, validation, class_count, flags, run):
    """The new layer trained again, the same way, on the training and validation images together.

    Validation has chosen nothing by then (the schedule is fixed, the settings came from cross-validation,
    bench/studies/cv.py), so its images may as well train the final layer: 10 % more images, +0.2 points of accuracy
    on unseen photos by CV (docs/benchmark-history.md run Q). `head`'s validation accuracy, judged first, is the one
    reported; the test images stay unseen.
    """
    from retrain import train
    (train_x, train_y), (val_x, val_y) = training, validation
    run.accuracy["validation"], run.sizes["validation"] = train.accuracy_of(head, val_x, val_y), len(val_y)
    run.refit = True
    print(f"validation accuracy = {run.accuracy['validation']:.4f} (N={len(val_y)}); refitting the new layer on "
          f"the {len(train_y)} training and {len(val_y)} validation images")
    quiet = argparse.Namespace(**dict(vars(flags), summaries_dir=""))  # TensorBoard has the first fit's curves
    return train.train_head(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), None, class_count,
                            quiet)


def publish_version(flags, export, graph_def, model, size, labels, info, tflite_model=None, run=None):
    """Write MODEL_BASE_PATH/N+1 complete, or refuse if it is worse than version N."""
    existing = model_folder.versions(flags.model_base_path)
    if existing:
        try:
            previous = model_folder.read_sidecar(os.path.join(flags.model_base_path, str(existing[-1])))
        except ValueError:  # nothing to compare with
            previous = {}
        old, new = previous.get("accuracy", {}).get("test"), info["accuracy"].get("test")
        if old is not None and new is not None and new < old - flags.max_accuracy_drop:
            print(f"error: not publishing: test accuracy {new:.4f} is below version {existing[-1]}'s "
                  f"{old:.4f} by more than --max_accuracy_drop {flags.max_accuracy_drop}", file=sys.stderr)
            return 3
    version = (existing[-1] if existing else 0) + 1
    info = dict(info, version=version)

    def write(folder):
        export.write_model(os.path.join(folder, model_folder.GRAPH), os.path.join(folder, model_folder.LABELS),
                           graph_def, size, labels, info, tflite_model)
        export.write_saved_model(folder, model(), size)  # saved_model.pb beside graph.pb, for TF Serving
        if run is not None:
            from retrain import report
            report.write(folder, run)

    target = os.path.join(flags.model_base_path, str(version))
    export.publish(target, write)
    print(f"wrote version {version}: {target}")
    return 0


def backbone_graph_def(cache_dir, backbone, size):
    """The frozen backbone (`input:0` -> `bottleneck:0`), cached beside its bottlenecks."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    from retrain import export
    path = os.path.join(cache_dir, f"backbone-tf{tf.__version__}.pb")
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
        return graph_def
    except (OSError, DecodeError):  # absent, or damaged: rebuild it
        pass
    graph_def = export.frozen_graph_def(backbone(), [None, size, size, 3], export.BOTTLENECK_NAME)
    atomic.write_bytes(path, graph_def.SerializeToString(), durable=False)
    return graph_def
