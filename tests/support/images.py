"""Generated images: one class's shape on a noisy background, folders of them, hand-made PNGs."""
import io
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw

# Each generated class is a shape of its own colour on a noisy background.
CLASSES = {"red_circle": ((220, 30, 30), "ellipse"), "green_square": ((30, 200, 40), "rectangle"),
           "blue_triangle": ((30, 40, 220), "polygon")}


def shape_image(label, seed, size=(64, 48), fmt="JPEG"):
    """Encoded bytes of one generated image of class `label`."""
    rng = np.random.default_rng(seed)
    colour, shape = CLASSES[label]
    w, h = size
    image = Image.fromarray(rng.integers(0, 90, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.integers(0, w // 4), rng.integers(0, h // 4)
    x1, y1 = x0 + w // 2 + rng.integers(0, w // 4), y0 + h // 2 + rng.integers(0, h // 4)
    if shape == "polygon":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    else:
        getattr(draw, shape)([x0, y0, x1, y1], fill=colour)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def make_image_dir(root, classes=tuple(CLASSES), per_class=12, start=0):
    """One folder per class of generated JPEGs; returns the folder."""
    for label in classes:
        os.makedirs(os.path.join(root, label), exist_ok=True)
        for i in range(start, start + per_class):
            with open(os.path.join(root, label, f"{label}_{i:03d}.jpg"), "wb") as f:
                # A stable seed per file (not hash(), which changes per process): the same data every run.
                f.write(shape_image(label, seed=zlib.crc32(f"{label}-{i}".encode())))
    return str(root)


def encode(image, fmt, **params):
    """Encoded bytes of a PIL image."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_bytes(width, height, bit_depth=8, colour_type=2, raw=b""):
    """A PNG written by hand: `raw` is the filtered scanlines (each starting with its filter byte).

    Cheap to make for any declared size, e.g. a 50000x50000 header over a few bytes of data.
    """
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def random_bytes(n, seed, prefix=b""):
    return prefix + np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def broken_jpeg():
    data = shape_image("red_circle", 99, size=(320, 240))
    return data[:len(data) // 2]
