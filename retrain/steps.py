"""The steps of a retrain run, in the order retrain.cli's main calls them; each takes what it needs.

    choose_architecture   the backbone --architecture names
    list_images           the photos, split into training, validation and testing by a hash of each name
    Backbone              the ImageNet network, built on first use (cached bottlenecks never need it)
    compute_bottlenecks   each photo's feature vector, cached under --bottleneck_dir
    find_label_issues     the training photos likeliest to carry a wrong label (cleanlab, on the bottlenecks)
    train_model           the new layer on the bottlenecks (refit on training + validation), or, with
                          --fine_tune or augmentation, on the photos' pixels
    evaluate              validation and test accuracy, the confusion matrix
    export_model          the frozen graph (backbone + new layer), model.tflite (with its TFLite metadata)
                          and --export's ONNX model, each measured on the test split
    write_model_folder    graph.pb, labels.txt, model.json, model.tflite, report.html (and a SavedModel),
    publish_version       or the next numbered version under --model_base_path

Imported by main after the flags are parsed: TensorFlow and Keras take seconds to import, and --help
and flag errors should not.
"""
import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from classify_contract import atomic, model_folder
from classify_contract.preprocessing import PREPROCESSING_VERSION
from retrain import backbones, bottlenecks, export, exports, label_issues, progress, report, train
from retrain.images import ImageLists, create_image_lists, images_in, maybe_download_flowers


def choose_architecture(name):
    if name not in backbones.ARCHITECTURES:
        raise SystemExit(f"error: unknown --architecture {name!r}; "
                         f"choose one of {', '.join(backbones.ARCHITECTURES)}")
    return backbones.ARCHITECTURES[name]


def warn_if_random(weights):
    if weights == "none":
        print("\n" + "!" * 72 + "\n!! --weights none: RANDOM backbone weights. The model will be close to\n"
              "!! useless; this is for tests and speed benchmarks only.\n" + "!" * 72 + "\n", file=sys.stderr)


def list_images(flags):
    """(the main image folder, its photos and --extra_image_dir's split into the three sets); without
    --image_dir, TensorFlow's flower photos downloaded to ~/flower_photos."""
    image_dir = flags.image_dir or maybe_download_flowers(os.path.expanduser("~/flower_photos"))
    for folder in flags.extra_image_dir:
        if not os.path.isdir(folder):
            print(f"note: --extra_image_dir {folder} does not exist (no feedback yet?); skipped", file=sys.stderr)
    image_dirs = [image_dir] + [d for d in flags.extra_image_dir if os.path.isdir(d)]
    return image_dir, create_image_lists(image_dirs, flags.validation_percentage, flags.testing_percentage)


class Backbone:
    """The ImageNet network of `arch` with `weights`, built on first use: a run whose bottlenecks are all
    cached never needs the Keras model. Frozen (`graph_def`), it computes the bottlenecks and, with the new
    layer appended, becomes graph.pb."""

    def __init__(self, arch, weights, bottleneck_dir):
        self.arch, self.weights = arch, weights
        self.cache_dir = os.path.join(bottleneck_dir, f"{arch.name}-{backbones.weights_tag(arch, weights)}"
                                                      f"-p{PREPROCESSING_VERSION}")

    @functools.cached_property
    def model(self):
        return backbones.build_backbone(self.arch, self.weights)

    @functools.cached_property
    def graph_def(self):
        return backbone_graph_def(self.cache_dir, lambda: self.model, self.arch.size)


@dataclass
class Split:
    """One set's photos that have a bottleneck: paths, bottlenecks [N, features], label indices."""
    paths: list
    x: np.ndarray
    y: np.ndarray


@dataclass
class Dataset:
    labels: list
    training: Split
    validation: Split
    testing: Split
    skipped: dict  # {path: why it could not be read}
    counts: dict  # {set name: {label: photos with a bottleneck}}


def compute_bottlenecks(lists: ImageLists, backbone: Backbone) -> Dataset:
    """Every photo's bottleneck (cached), split into the three sets; photos that cannot be read are
    skipped with a warning naming each, and a class left with none stops the run."""
    all_paths = [p for s in lists.sets().values() for paths in s.values() for p in paths]
    features, skipped = bottlenecks.get_bottlenecks(
        all_paths, lambda: bottlenecks.frozen_forward(backbone.graph_def), backbone.arch.size, backbone.cache_dir)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s):", file=sys.stderr)
        for path, reason in sorted(skipped.items()):
            print(f"  {path}: {reason}", file=sys.stderr)
    labels = lists.labels
    for label in labels:
        if not any(p in features for s in lists.sets().values() for p in s[label]):
            raise SystemExit(f"error: class {label!r} has no usable image; add images or remove its folder")

    def split(image_set):
        paths = [p for label in labels for p in image_set[label] if p in features]
        y = np.array([i for i, label in enumerate(labels) for p in image_set[label] if p in features], np.int64)
        x = np.stack([features[p] for p in paths]) if paths else np.zeros((0, 1), np.float32)
        return Split(paths, x, y)

    data = Dataset(labels, split(lists.training), split(lists.validation), split(lists.testing), skipped,
                   {name: {label: sum(p in features for p in image_set[label]) for label in labels}
                    for name, image_set in lists.sets().items()})
    print(f"{len(data.training.y)} training, {len(data.validation.y)} validation, {len(data.testing.y)} testing "
          f"images in {len(labels)} classes", file=sys.stderr)
    if not len(data.training.y):
        raise SystemExit("error: no training images; lower --testing_percentage/--validation_percentage "
                         "or add images")
    return data


def start_report(data, arch, flags):
    """What report.html will show, filled in by the steps as the run goes."""
    return report.Run(data.labels, arch.name, flags.weights, skipped=data.skipped, settings=vars(flags),
                      counts=data.counts)


def find_label_issues(data, flags, run):
    """The training and validation photos likeliest to carry a wrong label (retrain.label_issues), for
    report.html and --print_label_issues; a few seconds: new layers on the cached bottlenecks."""
    stage = time.time()
    paths = data.training.paths + data.validation.paths
    x = np.concatenate([data.training.x, data.validation.x]) if len(data.validation.y) else data.training.x
    y = np.concatenate([data.training.y, data.validation.y])
    quiet = argparse.Namespace(**dict(vars(flags), summaries_dir=""))  # TensorBoard: the real layer's curves

    def train_head(fold_x, fold_y):  # the run's own new layer, its settings and schedule
        return train.train_head(fold_x, fold_y, None, len(data.labels), quiet, quiet=True)

    with progress.bar(total=label_issues.folds_for(y, len(data.labels)), unit="fold", desc="label issues") as bar:
        run.label_issues = label_issues.find(paths, x, y, data.labels, train_head, on_fold=lambda: bar.update(1))
    run.timings["label issues"] = time.time() - stage
    found = len(run.label_issues)
    print(f"likely label errors: {found} of the {len(y)} training and validation photos" + (
        "" if not found else ":" if flags.print_label_issues else
        " (report.html shows them; --print_label_issues lists them)"))
    if flags.print_label_issues:
        for issue in run.label_issues:
            print(f"  {issue.path}  (given {issue.given}, suggested {issue.suggested}, {issue.score:.3f})")


class HeadOnBackbone:
    """The new layer, trained on the bottlenecks, over the frozen backbone."""

    def __init__(self, head, backbone, feature_size):
        self.head, self.backbone, self.feature_size = head, backbone, feature_size

    def predict(self, split):
        return self.head.predict(split.x, verbose=0)

    def graph_def(self):
        return export.stitched_graph_def(self.backbone.graph_def,
                                         export.frozen_graph_def(self.head, [None, self.feature_size]))

    @functools.cached_property
    def keras_model(self):  # only a SavedModel needs it
        return train.build_classifier(self.backbone.model, self.head)


class TrainedOnPixels:
    """Backbone and new layer trained together on the photos' pixels (--fine_tune, augmentation)."""

    def __init__(self, model, size):
        self.keras_model, self.size = model, size

    def predict(self, split):
        return self.keras_model.predict(train.load_images(split.paths, self.size).astype(np.float32), verbose=0)

    def graph_def(self):
        return export.frozen_graph_def(self.keras_model, [None, self.size, self.size, 3])


def train_model(data, backbone, flags, run):
    """The new layer on the bottlenecks (then again on training + validation with --refit); with
    --fine_tune or augmentation, then the whole model on the photos' pixels."""
    training, validation, classes = data.training, data.validation, len(data.labels)
    stage = time.time()
    head = train.train_head(training.x, training.y, (validation.x, validation.y) if len(validation.y) else None,
                            classes, flags, run.head_history)
    on_pixels = flags.fine_tune or train.augmentation_layers(flags) is not None
    if flags.refit and len(validation.y) and not on_pixels:
        head = refit_head(head, (training.x, training.y), (validation.x, validation.y), classes, flags, run)
    run.timings["training the new layer"] = time.time() - stage
    if not on_pixels:
        return HeadOnBackbone(head, backbone, training.x.shape[1])
    stage = time.time()
    model = train.train_on_images(backbone.model, head, training.paths, training.y,
                                  (validation.paths, validation.y), backbone.arch, flags, run.fine_tune_history)
    run.timings["training on pixels" + (" (fine-tuning)" if flags.fine_tune else "")] = time.time() - stage
    return TrainedOnPixels(model, backbone.arch.size)


def refit_head(head, training, validation, class_count, flags, run):
    """The new layer trained again, the same way, on the training and validation images together.

    Validation has chosen nothing by then (the schedule is fixed, the settings came from cross-validation,
    bench/studies/cv.py), so its images may as well train the final layer: 10 % more images, +0.2 points of
    accuracy on unseen photos by CV (docs/benchmark-history.md run Q). `head`'s validation accuracy, judged
    first, is the one reported; the test images stay unseen.
    """
    (train_x, train_y), (val_x, val_y) = training, validation
    run.accuracy["validation"], run.sizes["validation"] = train.accuracy_of(head, val_x, val_y), len(val_y)
    run.refit = True
    print(f"validation accuracy = {run.accuracy['validation']:.4f} (N={len(val_y)}); refitting the new layer on "
          f"the {len(train_y)} training and {len(val_y)} validation images")
    quiet = argparse.Namespace(**dict(vars(flags), summaries_dir=""))  # TensorBoard has the first fit's curves
    return train.train_head(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]), None, class_count,
                            quiet)


def evaluate(trained, data, flags, run):
    """Validation accuracy (unless --refit judged it already), then test accuracy and its confusion matrix."""
    accuracy, labels = run.accuracy, data.labels
    for name, split in (("validation", data.validation), ("test", data.testing)):
        if len(split.y) and name not in accuracy:
            scores = trained.predict(split)
            predicted = np.argmax(scores, axis=1)
            accuracy[name], run.sizes[name] = float(np.mean(predicted == split.y)), len(split.y)
            print(f"{name} accuracy = {accuracy[name]:.4f} (N={len(split.y)})")
    if "test" in accuracy:
        test = data.testing
        run.test_paths, run.test_truth, run.test_scores = test.paths, test.y, scores
        print("confusion matrix (test set):")
        print(report.format_confusion(report.confusion_matrix(test.y, predicted, len(labels)), labels))
        if flags.print_misclassified_test_images:
            print("misclassified test images:")
            for path, truth, guess, _ in report.misclassified(run):
                print(f"  {path}  (true {truth}, predicted {guess})")
    else:
        print("warning: the test set is empty; no test accuracy (raise --testing_percentage or add images)",
              file=sys.stderr)


def model_info(arch, flags, image_dir, run, seconds):
    """model.json's description of the model (export adds its own)."""
    # Paths in model.json are absolute, whatever folder retrain ran from (the server may run elsewhere).
    weights = flags.weights if flags.weights in ("imagenet", "none") else os.path.abspath(flags.weights)
    return {"architecture": arch.name, "weights": weights, "labels_count": len(run.labels),
            "accuracy": run.accuracy, "fine_tuned": bool(flags.fine_tune), "refit": run.refit,
            "image_dir": os.path.abspath(image_dir), "training_seconds": round(seconds, 1),
            "label_issues": len(run.label_issues)}


def export_model(trained, data, arch, flags, run, info):
    """(the frozen graph, model.tflite's bytes or None, --export's exports.Made); the TFLite and ONNX models'
    accuracies go into `info`."""
    stage = time.time()
    frozen = trained.graph_def()
    quantization = (arch.default_quantization(flags.fine_tune) if flags.tflite_quantization == "auto"
                    else flags.tflite_quantization)
    tflite_model = None
    if quantization != "none":
        from retrain import tflite
        calibration = (images_in(flags.tflite_calibration_dir) if flags.tflite_calibration_dir
                       else data.training.paths)
        graph_answers = None if run.test_scores is None else np.argmax(run.test_scores, axis=1)
        tflite_model, info["tflite"] = tflite.export(frozen, arch.size, quantization, calibration, data.testing.paths,
                                                     data.testing.y, graph_answers, flags.max_quantization_drop)
        tflite_model = exports.tflite_metadata(tflite_model, flags, arch.name, data.labels, info["tflite"])
        run.tflite = info["tflite"]
    made = exports.make(flags, frozen, arch.size, data.testing, info)
    run.exports = {name: info[name] for name in ("onnx", "triton") if name in info}
    run.timings["export"] = time.time() - stage
    return frozen, tflite_model, made


def write_model_folder(flags, frozen, trained, size, labels, info, tflite_model, run, made):
    """graph.pb, labels.txt, model.json (and model.tflite), report.html, and a SavedModel if asked for."""
    export.write_model(flags.output_graph, flags.output_labels, frozen, size, labels, info, tflite_model)
    print(f"wrote {flags.output_graph} and {flags.output_labels}" + (" and model.tflite" if tflite_model else ""))
    exports.write_beside(os.path.dirname(os.path.abspath(flags.output_graph)), made)
    exports.write_elsewhere(flags, made, labels)
    print(f"report: {report.write(os.path.dirname(os.path.abspath(flags.output_graph)), run)}")
    if flags.saved_model_dir:
        export.publish(flags.saved_model_dir, lambda tmp: export.write_saved_model(tmp, trained.keras_model, size))
        print(f"wrote SavedModel {flags.saved_model_dir}")
    return 0


def publish_version(flags, graph_def, trained, size, labels, info, tflite_model=None, run=None, made=None):
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
        export.write_saved_model(folder, trained.keras_model, size)  # saved_model.pb beside graph.pb, for TF Serving
        if made is not None:
            exports.write_beside(folder, made)
        if run is not None:
            report.write(folder, run)

    target = os.path.join(flags.model_base_path, str(version))
    export.publish(target, write)
    print(f"wrote version {version}: {target}")
    if made is not None:
        exports.write_elsewhere(flags, made, labels, version)
    return 0


def backbone_graph_def(cache_dir, backbone, size):
    """The frozen backbone (`input:0` -> `bottleneck:0`), cached beside its bottlenecks."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
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
