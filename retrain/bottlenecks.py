"""Bottlenecks: the backbone's pooled features of each image, computed once and cached.

The cache lives in --bottleneck_dir/<architecture>-<weights>-p<preprocessing
version>/<label>/<folder hash>_<file>.npy, so
a later run (more steps, another learning rate, new images) only computes what is
new. A cache file older than its image is recomputed; files are written
atomically, so a run killed midway never leaves a half-written one.
"""
import hashlib
import io
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from classify_contract import atomic
from classify_contract.preprocessing import ImageTooLarge, InvalidImage, decode_image
from retrain import progress

BATCH_SIZE = 32
# Two batches in the network at once: while one waits for its images or between two
# ops, the other keeps the cores busy (about 10% more images/s on 2 cores).
FORWARD_THREADS = 2
DECODE_THREADS = 2
BATCHES_AHEAD = 4


def cache_path(cache_dir, image_path):
    # A hash of the image's folder keeps images of the same label and name in two
    # --image_dir folders apart.
    folder = os.path.dirname(os.path.abspath(image_path))
    tag = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return os.path.join(cache_dir, os.path.basename(folder), f"{tag}_{os.path.basename(image_path)}.npy")


def frozen_forward(graph_def):
    """A batch -> features function running a frozen backbone graph in its own session.

    The frozen graph is what graph.pb is built from, so the head trains on exactly
    the features it is served, and session.run on it is about 1.5x faster than
    Keras' predict_on_batch on the same network.
    """
    import tensorflow as tf

    from retrain.export import BOTTLENECK_NAME, INPUT_NAME
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    session = tf.compat.v1.Session(graph=graph)
    return lambda batch: session.run(BOTTLENECK_NAME + ":0", {INPUT_NAME + ":0": batch})


def _load_cached(path, image_path):
    try:
        if os.path.getmtime(path) < os.path.getmtime(image_path):
            return None
        return np.load(path)
    except (OSError, ValueError, EOFError):  # missing, empty or half-written: recompute
        return None


def _decode_batch(paths, size):
    """Decode a batch; an unreadable image comes back as its exception, in its place."""
    images = []
    for path in paths:
        try:
            images.append(decode_image(path, size))
        except (InvalidImage, ImageTooLarge, OSError) as exc:
            images.append(exc)
    return images


def get_bottlenecks(image_paths, make_forward, size, cache_dir, batch_size=BATCH_SIZE):
    """Return ({path: feature vector}, {path: reason}) for every image, skipping bad ones.

    `make_forward()` is called once, only if some bottleneck is not cached, and
    returns the function that maps a batch of decoded images to their feature vectors.

    Images are decoded by a thread pool (Pillow releases the GIL) a few batches ahead
    of the network, so decoding overlaps the network instead of adding to it.
    """
    features, skipped, missing = {}, {}, []
    for path in image_paths:
        cached = _load_cached(cache_path(cache_dir, path), path)
        if cached is None:
            missing.append(path)
        else:
            features[path] = cached
    if not missing:
        return features, skipped
    print(f"computing {len(missing)} bottlenecks ({len(features)} cached) into {cache_dir}", file=sys.stderr)
    forward = make_forward()
    start = time.perf_counter()

    def compute(batch, decoding):
        decoded = decoding.result()
        good = [(p, img) for p, img in zip(batch, decoded) if not isinstance(img, Exception)]
        vectors = np.asarray(forward(np.stack([img for _, img in good]))) if good else []
        return batch, decoded, [p for p, _ in good], vectors

    def save(batch, decoded, good, vectors):
        for p, err in zip(batch, decoded):
            if isinstance(err, Exception):
                skipped[p] = str(err)
        for p, vector in zip(good, vectors):
            buffer = io.BytesIO()
            np.save(buffer, vector)
            atomic.write_bytes(cache_path(cache_dir, p), buffer.getvalue(), durable=False)
            features[p] = vector
        bar.update(len(batch))

    batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
    with ThreadPoolExecutor(DECODE_THREADS) as decoders, ThreadPoolExecutor(FORWARD_THREADS) as networks, \
            progress.bar(total=len(missing), unit="img", desc="bottlenecks") as bar:
        def submit(batch):
            return networks.submit(compute, batch, decoders.submit(_decode_batch, batch, (size, size)))
        # The first batch alone: it pays for what the network sets up on its first run.
        pending = deque([submit(batches[0])])
        try:
            save(*pending.popleft().result())
            for batch in batches[1:]:
                pending.append(submit(batch))
                if len(pending) >= BATCHES_AHEAD:
                    save(*pending.popleft().result())
            while pending:
                save(*pending.popleft().result())
        finally:  # on an error, do not compute batches nobody will save
            for future in pending:
                future.cancel()
    seconds = time.perf_counter() - start
    print(f"computed {len(missing)} bottlenecks in {seconds:.1f} s ({len(missing) / seconds:.1f} images/s)",
          file=sys.stderr)
    return features, skipped
