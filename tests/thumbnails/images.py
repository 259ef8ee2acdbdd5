"""Real images made with Pillow for the thumbnail tests: bytes, as a client would upload them."""

from __future__ import annotations

import io

from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

RED = (220, 20, 20)
BLUE = (20, 20, 220)
ORIENTATION = 0x0112


def halves(size: tuple[int, int], top=RED, bottom=BLUE, mode: str = "RGB") -> Image.Image:
    """An image whose top half is `top` and bottom half `bottom`: orientation stays checkable."""
    width, height = size
    image = Image.new(mode, size, bottom)
    image.paste(Image.new(mode, (width, height // 2), top), (0, 0))
    return image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def jpeg(size=(1200, 800), **params) -> bytes:
    return encode(halves(size), "JPEG", quality=90, **params)


def jpeg_rotated(size=(1200, 800), orientation: int = 6) -> bytes:
    """Stored landscape, red on top; with orientation 6 it displays portrait, red on the right."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[0x010F] = "Test Camera Maker"  # Make: metadata that must not reach a thumbnail
    return encode(halves(size), "JPEG", quality=90, exif=exif.tobytes())


def jpeg_cmyk(size=(1000, 700)) -> bytes:
    red, blue = (0, 255, 255, 0), (255, 255, 0, 0)
    return encode(halves(size, top=red, bottom=blue, mode="CMYK"), "JPEG", quality=90)


def png_alpha(size=(900, 600)) -> bytes:
    """Opaque red on top, fully transparent below."""
    return encode(halves(size, top=(*RED, 255), bottom=(0, 0, 0, 0), mode="RGBA"), "PNG")


def png_16bit(size=(600, 400), value: int = 32768) -> bytes:
    """16-bit grey at half intensity (128 once in 8 bits)."""
    return encode(Image.new("I;16", size, value), "PNG")


def png_palette_transparent(size=(600, 400)) -> bytes:
    """Palette image: index 0 transparent (bottom half), index 1 red (top half)."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    image.paste(1, (0, 0, size[0], size[1] // 2))
    return encode(image, "PNG", transparency=0)


def webp(size=(1000, 600)) -> bytes:
    return encode(halves(size), "WEBP", quality=90)


def gif_animated(size=(400, 300)) -> bytes:
    """Two frames: red first, blue second; thumbnails take the first."""
    first = Image.new("RGB", size, RED).convert("P", palette=Image.Palette.ADAPTIVE)
    second = Image.new("RGB", size, BLUE).convert("P", palette=Image.Palette.ADAPTIVE)
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def bmp(size=(100, 100)) -> bytes:
    return encode(halves(size), "BMP")


def truncated_jpeg(size=(1200, 800)) -> bytes:
    data = jpeg(size)
    return data[: len(data) // 2]


def upload(data: bytes, name: str = "photo.jpg", content_type: str = "image/jpeg") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type=content_type)


def open_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def close_to(pixel, expected, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=False))
