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
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from retrain import atomic
from retrain.preprocessing import InvalidImage, ImageTooLarge, decode_image

BATCH_SIZE = 32


def cache_path(cache_dir, image_path):
    # A hash of the image's folder keeps images of the same label and name in two
    # --image_dir folders apart.
    folder = os.path.dirname(os.path.abspath(image_path))
    tag = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return os.path.join(cache_dir, os.path.basename(folder), f"{tag}_{os.path.basename(image_path)}.npy")


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


def get_bottlenecks(image_paths, forward, size, cache_dir, batch_size=BATCH_SIZE):
    """Return ({path: feature vector}, {path: reason}) for every image, skipping bad ones.

    `forward` maps a batch of decoded images to their feature vectors.

    Images are decoded by a thread pool (Pillow releases the GIL) a few batches ahead
    of the backbone, so decoding overlaps the network instead of adding to it.
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
    batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=len(missing), unit="img", desc="bottlenecks") as bar:
        pending = deque()
        for batch in batches[:3]:
            pending.append((batch, pool.submit(_decode_batch, batch, (size, size))))
        next_batch = 3
        while pending:
            batch, future = pending.popleft()
            if next_batch < len(batches):
                pending.append((batches[next_batch],
                                pool.submit(_decode_batch, batches[next_batch], (size, size))))
                next_batch += 1
            decoded = future.result()
            good = [(p, img) for p, img in zip(batch, decoded) if not isinstance(img, Exception)]
            for p, err in zip(batch, decoded):
                if isinstance(err, Exception):
                    skipped[p] = str(err)
            if good:
                vectors = np.asarray(forward(np.stack([img for _, img in good])))
                for (p, _), vector in zip(good, vectors):
                    buffer = io.BytesIO()
                    np.save(buffer, vector)
                    atomic.write_bytes(cache_path(cache_dir, p), buffer.getvalue(), durable=False)
                    features[p] = vector
            bar.update(len(batch))
    return features, skipped
