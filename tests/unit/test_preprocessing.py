"""decode_image: the one preprocessing shared by training and serving.

Every image Pillow can open must come out as float32 RGB (H, W, 3) in [0, 255],
whatever its mode, orientation tag or frame count; anything else must raise
InvalidImage or ImageTooLarge, never another exception (callers catch only those).
"""
import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from support.images import shape_image

from classify_contract.preprocessing import ImageTooLarge, InvalidImage, decode_image, probe_image

EXIF_ORIENTATION = 0x0112


def encode(image, fmt="PNG", **params):
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_declaring(width, height):
    """A 68-byte PNG whose header declares width x height RGB pixels (the data is not there)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def assert_rgb(array, size):
    assert array.dtype == np.float32
    assert array.shape == (*size, 3)
    assert array.min() >= 0 and array.max() <= 255


def test_output_is_float32_rgb_0_255_of_the_requested_height_and_width():
    # Height != width, so swapped dimensions would show.
    array = decode_image(shape_image("red_circle", 1, size=(64, 48)), (30, 50))
    assert_rgb(array, (30, 50))
    # Raw pixel values, not scaled to [0, 1] or [-1, 1]: the graph does the scaling.
    white = decode_image(encode(Image.new("RGB", (8, 8), (255, 255, 255))), (4, 4))
    assert white.min() == 255.0


def test_aspect_ratio_is_kept_and_the_centre_cropped():
    # 300x100: red, green, blue thirds. Covering 50x50 scales it to 150x50, and the
    # centre crop is exactly the green third; squashing would keep all three colours.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    array = decode_image(encode(image), (50, 50))
    assert_rgb(array, (50, 50))
    np.testing.assert_allclose(array[:, 2:-2], np.broadcast_to((0, 255, 0), (50, 46, 3)), atol=1)
    # Portrait the same way: the crop takes the middle rows.
    array = decode_image(encode(image.transpose(Image.Transpose.ROTATE_90)), (20, 20))
    np.testing.assert_allclose(array[2:-2], np.broadcast_to((0, 255, 0), (16, 20, 3)), atol=1)


def test_decodes_a_path_as_well_as_bytes(tmp_path):
    data = shape_image("green_square", 2)
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_image(str(path), (24, 32)), decode_image(data, (24, 32)))


def test_exif_orientation_is_applied():
    # Stored 60x40 with a red top-left quadrant; Orientation 6 means "rotate 90 degrees
    # clockwise to display", so the upright image is 40 wide, 60 high, red top-right.
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 20))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)

    array = decode_image(data, (60, 40))
    assert_rgb(array, (60, 40))
    # Same JPEG decode, rotated by hand: identical pixels (the resize is a no-op at this size).
    by_hand = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(array, np.asarray(by_hand, np.float32))
    assert array[5, 35, 0] > 200 and array[5, 35, 2] < 50   # top-right is red
    assert array[5, 5, 2] > 200 and array[5, 5, 0] < 50     # top-left is blue


def test_exif_orientation_is_applied_to_large_jpegs_decoded_in_draft_mode():
    # Large JPEGs take the DCT-scaling shortcut; the rotation must still happen.
    stored = Image.new("RGB", (1200, 800), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 600, 400))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    array = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), (60, 40))
    upright = stored.transpose(Image.Transpose.ROTATE_270).resize((40, 60), Image.BILINEAR)
    assert np.abs(array - np.asarray(upright, np.float32)).mean() < 3


def test_grayscale_becomes_rgb():
    array = decode_image(encode(Image.new("L", (60, 40), 100), "JPEG"), (20, 30))
    assert_rgb(array, (20, 30))
    np.testing.assert_allclose(array, 100, atol=2)


def test_palette_with_transparency_becomes_rgb_over_white():
    for fmt in ("PNG", "GIF"):
        image = Image.new("P", (4, 4), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)   # index 0 black (transparent), 1 red
        image.putpixel((0, 0), 1)
        array = decode_image(encode(image, fmt, transparency=0), (4, 4))
        assert_rgb(array, (4, 4))
        assert tuple(array[0, 0]) == (255, 0, 0), fmt
        assert tuple(array[3, 3]) == (255, 255, 255), fmt  # transparent black shows as white


def test_rgba_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 255, 0, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    array = decode_image(encode(image), (4, 4))
    assert_rgb(array, (4, 4))
    assert tuple(array[0, 0]) == (0, 255, 0)
    assert tuple(array[3, 3]) == (255, 255, 255)
    np.testing.assert_allclose(array[0, 1], 127, atol=1)   # half-transparent black over white


def test_grayscale_with_alpha_becomes_rgb_over_white():
    array = decode_image(encode(Image.new("LA", (4, 4), (0, 0))), (4, 4))
    assert_rgb(array, (4, 4))
    assert array.min() == 255


def test_cmyk_becomes_rgb():
    array = decode_image(encode(Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG"), (20, 30))
    assert_rgb(array, (20, 30))
    np.testing.assert_allclose(array[10, 10], (255, 0, 0), atol=8)


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(ramp)
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "I;16"   # the case under test
    array = decode_image(data, (64, 64))
    assert_rgb(array, (64, 64))
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == 255
    # Mid-grey stays mid-grey; clipping would make half the image 255.
    np.testing.assert_allclose(array[32, 0], 127.5, atol=1.5)
    assert np.mean(array == 255) < 0.01


def test_dark_16_bit_grayscale_png_is_scaled_by_bit_depth():
    data = encode(Image.fromarray(np.full((8, 8), 200, np.uint16)))  # 200/65535: almost black
    np.testing.assert_allclose(decode_image(data, (8, 8)), 200 / 257, atol=0.5)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    array = decode_image(data, (8, 8))
    assert_rgb(array, (8, 8))
    np.testing.assert_allclose(array, np.broadcast_to((255, 0, 0), (8, 8, 3)), atol=2)


def test_1x1_image_is_stretched_to_the_requested_size():
    array = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30))), (224, 224))
    assert_rgb(array, (224, 224))
    np.testing.assert_array_equal(array, np.broadcast_to((10, 20, 30), (224, 224, 3)))


@pytest.mark.parametrize("fmt", ["BMP", "WEBP"])
def test_other_accepted_formats(fmt):
    array = decode_image(encode(Image.new("RGB", (6, 4), (10, 200, 30)), fmt), (4, 6))
    assert_rgb(array, (4, 6))
    np.testing.assert_allclose(array, np.broadcast_to((10, 200, 30), (4, 6, 3)), atol=3)


JPEG = shape_image("blue_triangle", 3, size=(320, 240))
PNG = shape_image("blue_triangle", 3, fmt="PNG")


@pytest.mark.parametrize("data", [JPEG[:len(JPEG) // 2], JPEG[:-40], PNG[:len(PNG) // 2],
                                  os.urandom(2000), b"", b"hello, not an image\n"],
                         ids=["jpeg-half", "jpeg-no-tail", "png-half", "random", "empty", "text"])
def test_undecodable_bytes_raise_invalid_image(data):
    with pytest.raises(InvalidImage):
        decode_image(data, (224, 224))


def test_undecodable_file_raises_invalid_image(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(JPEG[:len(JPEG) // 2])
    with pytest.raises(InvalidImage):
        decode_image(str(path), (224, 224))


def test_image_declaring_too_many_pixels_raises_before_decoding():
    data = png_declaring(50_000, 50_000)   # 2.5 gigapixels declared in 68 bytes
    start = time.monotonic()
    with pytest.raises(ImageTooLarge, match="50000x50000"):
        decode_image(data, (224, 224))
    assert time.monotonic() - start < 1   # the header is read, the 7.5 GB never allocated


def test_max_pixels_is_a_parameter():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLarge):
        decode_image(data, (10, 10), max_pixels=9_999)
    assert decode_image(data, (10, 10), max_pixels=10_000).shape == (10, 10, 3)   # the limit is inclusive


def test_probe_image_reads_format_and_size_from_the_header():
    assert probe_image(shape_image("red_circle", 1, size=(64, 48))) == ("JPEG", 48, 64)
    assert probe_image(shape_image("red_circle", 1, size=(64, 48), fmt="PNG")) == ("PNG", 48, 64)
    assert probe_image(png_declaring(50_000, 40_000)) == ("PNG", 40_000, 50_000)
    for data in (b"", os.urandom(100)):
        with pytest.raises(InvalidImage):
            probe_image(data)
