"""Classify images from the command line with the server's session code.

    python -m classify_server.label_image --graph model/graph.pb --labels model/labels.txt --image x.jpg

Without --image, reads image paths from stdin, one per line, and classifies each
with the same session as it arrives (the "online" mode), printing one JSON line
per image. Flags are those of TensorFlow's label_image.py.
"""
import argparse
import json
import os
import sys

from classify_contract import tf_noise
from classify_server import settings
from classify_server.core import inference
from classify_server.core.inference import Inference, InferenceError
from classify_server.core.registry import Models
from classify_server.engines import ModelLoadError

# The exit status of each inference error code: 1 for an image that cannot be classified, 2 for
# the command's own setup (which model), as for a model that does not load.
EXIT_STATUS = {code: 1 for code in inference.CODES}
EXIT_STATUS.update({inference.MODEL_NOT_FOUND: 2, inference.VERSION_NOT_SERVED: 2, inference.NOT_READY: 2})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m classify_server.label_image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", default="model/graph.pb")
    p.add_argument("--labels", default=None, help="default: labels.txt beside the graph")
    p.add_argument("--image", default=None, help="one image; without it, paths are read from stdin")
    p.add_argument("--input_layer")
    p.add_argument("--output_layer")
    p.add_argument("--input_height", type=int)
    p.add_argument("--input_width", type=int)
    p.add_argument("--input_mean", type=float)
    p.add_argument("--input_std", type=float)
    p.add_argument("--top_k", type=int, default=5)
    return p.parse_args(argv)


def load(flags):
    """A TFSessionEngine over --graph and --labels, which need not sit in one model folder (the sidecar
    beside the graph, if any, still gives its input size, mean and std)."""
    from classify_server.engines.tf_session import TFSessionEngine
    overrides = {k: v for k, v in vars(flags).items()
                 if k.startswith(("input_", "output_")) and v is not None}
    return TFSessionEngine(os.path.dirname(os.path.abspath(flags.graph)), overrides, graph_path=flags.graph,
                      labels_path=flags.labels)


def classify_file(core, path, top_k):
    with open(path, "rb") as f:
        return core.classify([f.read()], names=[path]).top_k(top_k)[0]


def main(argv=None):
    flags = parse_args(argv)
    tf_noise.import_tensorflow_quietly()  # before the TensorFlow engine is imported (load)
    try:
        limits = settings.current().limits  # MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES: the server's limits
        classifier = load(flags)
        classifier.warm_up()  # also checks that the graph answers as many scores as there are labels
        core = Inference(Models.static(classifier), limits)
    except (ModelLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if flags.image:
        try:
            answer = classify_file(core, flags.image, flags.top_k)
        except OSError as exc:
            print(f"error: {flags.image}: {exc}", file=sys.stderr)
            return 1
        except InferenceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return EXIT_STATUS[exc.code]
        for label, score in answer:
            print(f"{label} {score:.5f}")
        return 0
    status = 0
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            answer = {"image": path, "labels": classify_file(core, path, flags.top_k)}
        except OSError as exc:
            answer, status = {"image": path, "error": str(exc)}, 1
        except InferenceError as exc:
            answer, status = {"image": path, "error": exc.message, "code": exc.code}, max(status, EXIT_STATUS[exc.code])
        print(json.dumps(answer), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
