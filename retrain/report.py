"""report.html: what a retrain run did and how good its model is, for people to look at.

Written into the model folder beside graph.pb (and into each numbered version), with its pictures in
report/ beside it: accuracy with a 95% confidence interval, precision, recall and F1 per class, the
confusion matrix (counts and row-normalised), the training curves, the misclassified test photos as
thumbnails, the training photos likeliest to carry a wrong label (retrain.label_issues) as thumbnails,
the data per class, skipped files, the run's settings and timings, and the quantized model's accuracy
against graph.pb's. Pictures are drawn with matplotlib's Agg backend (no display needed). Every file is
written atomically, report.html last, so a reader never sees half a report.
"""
import html
import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from classify_contract import atomic
from classify_contract.model_folder import REPORT as HTML, REPORT_FILES as FOLDER

THUMBNAIL = 160  # pixels, the longer side of a photo's thumbnail (misclassified, likely label error)
MAX_THUMBNAILS = 200  # of each list


@dataclass
class Run:
    """What the report shows, gathered by retrain.cli as the run goes."""
    labels: list
    architecture: str
    weights: str
    counts: dict  # {"training"|"validation"|"testing": {label: images}}
    skipped: dict  # {path: reason}
    settings: dict  # the flags
    accuracy: dict = field(default_factory=dict)  # {"validation"|"test": accuracy}
    sizes: dict = field(default_factory=dict)  # {"validation"|"test": images judged}
    test_paths: list = field(default_factory=list)
    test_truth: np.ndarray = None
    test_scores: np.ndarray = None  # [images, classes] probabilities
    head_history: list = field(default_factory=list)  # [{"step", "loss", "train_accuracy", "validation_accuracy"}]
    fine_tune_history: dict = field(default_factory=dict)  # Keras History.history: per-epoch lists
    timings: dict = field(default_factory=dict)  # {stage: seconds}
    tflite: dict = None  # model.json's "tflite" info
    exports: dict = field(default_factory=dict)  # model.json's "onnx" and "triton" entries (retrain.exports)
    refit: bool = False  # the new layer was trained again on training + validation after its validation
    label_issues: list = field(default_factory=list)  # [retrain.label_issues.LabelIssue], likeliest first


def wilson_interval(correct, total, z=1.96):
    """95% confidence interval of a proportion (Wilson's score interval; sound near 0 and 1)."""
    if not total:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(truth, predicted, class_count):
    matrix = np.zeros((class_count, class_count), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    return matrix


def format_confusion(matrix, labels):
    width = max(8, max(len(label) for label in labels) + 1)
    lines = ["true \\ predicted".ljust(width) + "".join(label[:width - 1].rjust(width) for label in labels)]
    for label, row in zip(labels, matrix):
        lines.append(label[:width - 1].ljust(width) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def per_class(matrix):
    """[(precision, recall, f1, support)] per class from a confusion matrix (rows: truth)."""
    rows = []
    for i in range(len(matrix)):
        tp, predicted, support = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((float(precision), float(recall), float(f1), int(support)))
    return rows


def misclassified(run):
    """[(path, true label, predicted label, score)] of the test photos the model got wrong, in test order."""
    if run.test_scores is None:
        return []
    predicted = np.argmax(run.test_scores, axis=1)
    return [(path, run.labels[t], run.labels[p], float(run.test_scores[i, p]))
            for i, (path, t, p) in enumerate(zip(run.test_paths, run.test_truth, predicted)) if t != p]


def _png(figure):
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100, bbox_inches="tight")
    return out.getvalue()


def _confusion_png(matrix, labels):
    from matplotlib.figure import Figure  # the Agg canvas, with no pyplot state and no display
    figure = Figure(figsize=(4 + 1.6 * len(labels), 1.5 + 0.6 * len(labels)))
    normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for axes, values, title, fmt in ((figure.add_subplot(1, 2, 1), matrix, "counts", "{:d}"),
                                     (figure.add_subplot(1, 2, 2), normalised, "share of each true class", "{:.2f}")):
        axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
        axes.set_title(title)
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        for (i, j), value in np.ndenumerate(values):
            axes.text(j, i, fmt.format(value), ha="center", va="center",
                      color="white" if normalised[i, j] > 0.5 else "black")
    return _png(figure)


def _curves_png(run):
    from matplotlib.figure import Figure
    panels = 3 if run.fine_tune_history else 2
    figure = Figure(figsize=(5 * panels, 3.6))
    steps = [h["step"] for h in run.head_history]
    loss = figure.add_subplot(1, panels, 1)
    loss.plot(steps, [h["loss"] for h in run.head_history])
    loss.set(title="new layer: training loss", xlabel="step")
    accuracy = figure.add_subplot(1, panels, 2)
    accuracy.plot(steps, [h["train_accuracy"] for h in run.head_history], label="training batch")
    validation = [h["validation_accuracy"] for h in run.head_history]
    if not all(math.isnan(v) for v in validation):
        accuracy.plot(steps, validation, label="validation")
    accuracy.set(title="new layer: accuracy", xlabel="step")
    accuracy.legend()
    if run.fine_tune_history:
        epochs = figure.add_subplot(1, panels, 3)
        for key, name in (("accuracy", "training"), ("val_accuracy", "validation")):
            values = run.fine_tune_history.get(key)
            if values:
                epochs.plot(range(1, len(values) + 1), values, marker="o", label=name)
        epochs.set(title="fine-tuning: accuracy", xlabel="epoch")
        epochs.legend()
    return _png(figure)


def _thumbnail(path):
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=80)
    return out.getvalue()


def _table(headers, rows, attrs=""):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _export_rows(run):
    """report.html's rows of model.tflite and --export's files: what, its size, its measured test accuracy."""
    def accuracy(info):
        test = info.get("accuracy", {}).get("test")
        return "" if test is None else f"{test:.4f}"

    rows = []
    if run.tflite:
        metadata = ("with TFLite metadata (MediaPipe)" if run.tflite.get("metadata")
                    else "no TFLite metadata (no --tflite_metadata_python)")
        rows.append([f"model.tflite ({run.tflite.get('quantization')})", f"{run.tflite['bytes'] / 1e6:.1f}",
                     accuracy(run.tflite), metadata])
    if "onnx" in run.exports:
        rows.append(["model.onnx", f"{run.exports['onnx']['bytes'] / 1e6:.1f}", accuracy(run.exports["onnx"]),
                     f"ONNX opset {run.exports['onnx'].get('opset')}"])
    if "triton" in run.exports:
        rows.append(["Triton repository (model.onnx)", f"{run.exports['triton']['bytes'] / 1e6:.1f}",
                     accuracy(run.exports["triton"]), run.exports["triton"]["path"]])
    return rows


def _figure(picture, path, caption, pictures):
    """A photo's thumbnail (`picture` in FOLDER, when written), its path and `caption` (HTML)."""
    e = html.escape
    image = f'<img src="{FOLDER}/{e(picture)}" alt="{e(os.path.basename(path))}">' if picture in pictures else ""
    return f'<figure>{image}<figcaption><span class="path">{e(path)}</span><br>{caption}</figcaption></figure>'


def _label_issues_html(issues, pictures):
    e = html.escape
    items = [_figure(f"label-issues/{i}.jpg", issue.path, f"given <b>{e(issue.given)}</b>, suggested "
                     f'<b>{e(issue.suggested)}</b> (<span class="score">{issue.score:.3f}</span>)', pictures)
             for i, issue in enumerate(issues)]
    return (f"<h2>Likely label errors ({len(issues)})</h2><p>Training photos that a new layer trained without "
            "them puts in another class, likeliest wrong first: each with its folder's label, the label that layer "
            "suggests, and its probability of the given label. The first ones are mostly mislabeled; further down, "
            "more are just hard photos. Move or remove the wrong ones and train again.</p>"
            f'<div id="label-issues">{"".join(items) or "<p>none</p>"}</div>')


def render(run, pictures, matrix, wrong):
    """The report's HTML; `pictures` are the names of the files written into FOLDER, `matrix` the test
    photos' confusion matrix (None without a test set), `wrong` their misclassified() list."""
    e = html.escape
    labels = run.labels
    parts = [f"<h1>Retrained {e(run.architecture)} on {len(labels)} classes</h1>"]
    rows = []
    for name in ("test", "validation"):
        if name in run.accuracy:
            n = run.sizes[name]
            low, high = wilson_interval(round(run.accuracy[name] * n), n)
            shown = "validation (the layer before its refit on training + validation)" if (
                name == "validation" and run.refit) else name
            rows.append([shown, f"{run.accuracy[name]:.4f}", f"{low:.4f} .. {high:.4f}", n])
    if run.tflite:
        rows.append([f"test, model.tflite ({run.tflite.get('quantization')})",
                     f"{run.tflite.get('accuracy', {}).get('test', float('nan')):.4f}", "", run.sizes.get("test", "")])
    parts.append("<h2>Accuracy</h2>" + _table(["images", "accuracy", "95% confidence interval", "photos"], rows,
                                               'id="accuracy"'))
    if run.tflite and run.tflite.get("warning"):
        parts.append(f'<p class="warning">{e(run.tflite["warning"])}</p>')
    elif run.tflite and run.tflite.get("against_graph"):
        parts.append(f'<p id="quantization">model.tflite against graph.pb: {e(run.tflite["against_graph"])}</p>')
    if run.tflite or run.exports:
        parts.append("<h2>Exports</h2>" + _table(["file", "size (MB)", "test accuracy", "notes"],
                                                 _export_rows(run), 'id="exports"'))
    if matrix is not None:
        stats = per_class(matrix)
        parts.append("<h2>Per class (test photos)</h2>" + _table(
            ["class", "precision", "recall", "F1", "support"],
            [[label, f"{p:.3f}", f"{r:.3f}", f"{f:.3f}", s] for label, (p, r, f, s) in zip(labels, stats)],
            'id="per-class"'))
        counts = [[label] + list(row) for label, row in zip(labels, matrix)]
        parts.append("<h2>Confusion matrix (test photos)</h2>"
                     f'<img src="{FOLDER}/confusion.png" alt="confusion matrix">'
                     + _table(["true \\ predicted"] + labels, counts, 'id="confusion"'))
    if "curves.png" in pictures:
        parts.append(f'<h2>Training</h2><img src="{FOLDER}/curves.png" alt="training curves">')
    items = [_figure(f"misclassified/{i}.jpg", path, f"true <b>{e(truth)}</b>, predicted <b>{e(guess)}</b> "
                     f"({score:.2f})", pictures) for i, (path, truth, guess, score) in enumerate(wrong)]
    parts.append(f"<h2>Misclassified test photos ({len(wrong)})</h2>"
                 f'<div id="misclassified">{"".join(items) or "<p>none</p>"}</div>')
    parts.append(_label_issues_html(run.label_issues, pictures))
    splits = ("training", "validation", "testing")
    parts.append("<h2>Data</h2>" + _table(["class"] + list(splits) + ["total"],
                                           [[label] + [run.counts[s].get(label, 0) for s in splits]
                                            + [sum(run.counts[s].get(label, 0) for s in splits)] for label in labels],
                                           'id="data"'))
    if run.skipped:
        parts.append(f"<h3>Skipped files ({len(run.skipped)})</h3>"
                     + _table(["file", "why"], sorted(run.skipped.items()), 'id="skipped"'))
    facts = [["architecture", run.architecture], ["weights", run.weights]]
    facts += [[f"{stage} (s)", f"{seconds:.1f}"] for stage, seconds in run.timings.items()]
    settings = [[f"--{name}", value] for name, value in sorted(run.settings.items())]
    parts.append("<h2>Run</h2>" + _table(["", ""], facts, 'id="run"')
                 + "<h3>Settings</h3>" + _table(["flag", "value"], settings, 'id="settings"'))
    style = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}#misclassified,#label-issues{display:flex;"
             "flex-wrap:wrap;gap:.8em}figure{margin:0;width:170px;font-size:.8em}.path{color:#777;word-break:break-all}"
             ".warning{color:#b00;font-weight:bold}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>retrain report: '
            f'{e(run.architecture)}</title><style>{style}</style></head><body>{"".join(parts)}</body></html>\n')


def write(folder, run):
    """report.html and its pictures into `folder`; returns the report's path."""
    pictures, matrix, wrong = {}, None, misclassified(run)
    if run.test_scores is not None:
        matrix = confusion_matrix(run.test_truth, np.argmax(run.test_scores, axis=1), len(run.labels))
        pictures["confusion.png"] = _confusion_png(matrix, run.labels)
    if run.head_history:
        pictures["curves.png"] = _curves_png(run)
    for kind, paths in (("misclassified", [path for path, _, _, _ in wrong]),
                        ("label-issues", [issue.path for issue in run.label_issues])):
        for i, path in enumerate(paths[:MAX_THUMBNAILS]):
            try:
                pictures[f"{kind}/{i}.jpg"] = _thumbnail(path)
            except OSError:
                pass  # listed without its picture
    for name, content in pictures.items():
        atomic.write_bytes(os.path.join(folder, FOLDER, name), content)
    path = os.path.join(folder, HTML)
    atomic.write_text(path, render(run, pictures, matrix, wrong))
    return path
