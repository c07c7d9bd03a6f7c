"""The one image preprocessing, shared by training and serving.

Training and serving must turn a file into exactly the same pixels, or the model
sees different data in production than it learned on (training/serving skew).
Both `retrain` and `classify_server` call `decode_image` and nothing else.

The result is float32 RGB in [0, 255], shape (height, width, 3). Scaling to the
backbone's range happens inside the exported graph, not here.
"""
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats read by retrain from --image_dir (the server accepts whatever Pillow opens).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

DEFAULT_MAX_PIXELS = 50_000_000

# Part of the bottleneck cache key: bump it whenever decode_image's output changes,
# or cached features of the old pixels would train a head for pixels never served.
PREPROCESSING_VERSION = 2

# We enforce our own pixel limit before decoding (ImageTooLarge), so Pillow's
# own bomb check, which would raise on a size we already accepted, is off.
Image.MAX_IMAGE_PIXELS = None


class InvalidImage(ValueError):
    """The bytes are not an image Pillow can decode, or it is truncated."""


class ImageTooLarge(ValueError):
    """The image declares more pixels than allowed (a decompression bomb)."""


def decode_image(data, size, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode encoded image bytes (or a path) to float32 RGB of `size` = (height, width).

    The image is scaled, keeping its aspect ratio, until it covers `size`, and the
    centre is cropped out.
    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images
    become plain RGB (transparency over white); animated images give their first frame.
    """
    height, width = size
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        pixels = image.width * image.height
        if max_pixels and pixels > max_pixels:
            raise ImageTooLarge(
                f"image is {image.width}x{image.height} = {pixels} pixels, over the limit of {max_pixels}")
        if image.format == "JPEG":
            # Decode large JPEGs at a reduced scale (DCT scaling): much faster, and the
            # result still covers twice the target size before the real resize.
            image.draft("RGB", (2 * width, 2 * height))
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        # Keep the aspect ratio: scale the short side to fit, crop the centre. (Squashing
        # the whole photo instead costs about 1 point of accuracy on flower_photos.)
        image = ImageOps.fit(image, (width, height), Image.BILINEAR)
    except (ImageTooLarge, InvalidImage):
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError) as exc:
        # Pillow signals corrupt input through many exception types.
        raise InvalidImage(f"cannot decode image: {exc}") from None
    return np.asarray(image, dtype=np.float32)


def probe_image(data):
    """(format, height, width) of encoded image bytes, reading only the header."""
    try:
        image = Image.open(io.BytesIO(data))
        return image.format, image.height, image.width
    except UnidentifiedImageError:
        raise InvalidImage("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from None


def _to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: Pillow's convert would clip at 255 instead of scaling.
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit, even if dark; "I"/"F" only when over 8-bit range
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
