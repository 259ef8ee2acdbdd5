"""Image inspection and thumbnail making: pure Pillow, bytes in and bytes out.

No ORM and no Django settings here: limits come in as arguments, so this module can be tested,
benchmarked and reused on its own.

Speed comes from two things. A JPEG is decoded with Pillow's draft mode, which lets libjpeg
scale by 1/2, 1/4 or 1/8 while decoding (a 4000x3000 photo wanted at 512 px is decoded at
1000x750, sixteen times fewer pixels). The sizes are then made largest first, each one from
the previous result instead of from the original.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

#: Formats accepted, by the name Pillow gives them after looking at the content.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
#: File extension used when an original of each format is stored.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}

JPEG_QUALITY = 85
_ORIENTATION_TAG = 0x0112
# The errors Pillow raises on broken data while decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class ImageError(ValueError):
    """The bytes cannot be made into thumbnails. Retrying never helps."""


class NotAnImage(ImageError):
    """The content is not an image at all."""


class UnsupportedFormat(ImageError):
    """An image, but not of an allowed format."""


class TooManyPixels(ImageError):
    """More pixels than allowed: refused before decoding (decompression bomb guard)."""


class CorruptImage(ImageError):
    """An allowed format whose data is broken or truncated."""


@dataclass(frozen=True)
class ImageInfo:
    """What an upload is, read from its header. Width and height as displayed (EXIF orientation applied)."""

    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


@dataclass(frozen=True)
class Thumb:
    """One encoded thumbnail."""

    size: int
    width: int
    height: int
    format: str  # "JPEG" or "PNG"
    data: bytes

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    """Opens (header only) an image of an allowed format with at most `max_pixels` pixels."""
    try:
        # Only the allowed decoders ever see untrusted bytes.
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise _identify_failure(data) from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImage(f"cannot read the image: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage("the image has no pixels")
    if width * height > max_pixels:
        raise TooManyPixels(f"{width}x{height} is {width * height} pixels; at most {max_pixels} are allowed")
    return image


def _identify_failure(data: bytes) -> ImageError:
    """Tells "some other image format" from "not an image" for the error message."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            found = other.format
    except Exception:  # noqa: BLE001 - anything a decoder raises means "not an image we know"
        return NotAnImage("the file is not an image")
    return UnsupportedFormat(f"{found} images are not supported; use JPEG, PNG, WebP or GIF")


def _orientation(image: Image.Image, *, loaded: bool = True) -> int:
    if not loaded and image.format == "PNG" and "exif" not in image.info:
        return 1  # a PNG's eXIf chunk may follow the pixels; Pillow would decode them all to find it
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except _DECODE_ERRORS:  # a broken EXIF block must not sink a readable image
        return 1


def inspect(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Validates an upload from its header: an allowed format (from the content, never the
    file name) within `max_pixels`. Raises an `ImageError` subclass otherwise."""
    with _open(data, max_pixels=max_pixels) as image:
        width, height = image.size
        if _orientation(image, loaded=False) in (5, 6, 7, 8):  # rotated a quarter turn
            width, height = height, width
        return ImageInfo(format=image.format or "", width=width, height=height)


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """The dimensions of `width`x`height` scaled so its longest side is `size`, never upscaled."""
    longest = max(width, height)
    if longest <= size:
        return width, height
    scale = size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _normalise_mode(image: Image.Image) -> Image.Image:
    """RGB, RGBA or L, whatever the source mode was."""
    mode = image.mode
    if mode in ("RGB", "L") and "transparency" in image.info:  # a colour key (PNG tRNS)
        return image.convert("RGBA")
    if mode in ("RGB", "L", "RGBA"):
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale to 8 bits (a plain convert("L") would clip everything above 255 to white).
        return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if mode == "F":
        return image.point(lambda value: value * 255).convert("L")
    if mode == "P":
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return image.convert("RGBA")
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _to_srgb(image: Image.Image, icc: bytes | None) -> Image.Image:
    """Converts from the embedded colour profile to sRGB, so dropping the profile keeps the colours."""
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        output_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):  # a broken profile: keep the pixels as they are
        return image


def _decode(data: bytes, *, largest: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decodes just enough of the image for a thumbnail of `largest` px, oriented and in a plain
    mode; also returns the full size of the original as displayed."""
    image = _open(data, max_pixels=max_pixels)
    full = image.size
    try:
        if image.format == "JPEG":
            width, height = image.size
            longest = max(width, height)
            if longest > largest:
                box = (math.ceil(largest * width / longest), math.ceil(largest * height / longest))
                image.draft(image.mode, box)
        image.load()
        icc = image.info.get("icc_profile")
        orientation = _orientation(image)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImage(f"the image data is broken or truncated: {exc}") from exc
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
        if orientation in (5, 6, 7, 8):
            full = (full[1], full[0])
    image = _to_srgb(image, icc)
    return _normalise_mode(image), full


def _has_alpha(image: Image.Image) -> bool:
    if image.mode != "RGBA":
        return False
    low, _high = image.getchannel("A").getextrema()
    return low < 255


def _encode(image: Image.Image) -> tuple[str, bytes]:
    """JPEG for opaque images, PNG when there is transparency; no metadata either way."""
    out = io.BytesIO()
    image.info = {}  # Pillow copies some entries (a comment, a profile) into what it writes
    if _has_alpha(image):
        image.save(out, format="PNG", compress_level=6)
        return "PNG", out.getvalue()
    opaque = image.convert("RGB") if image.mode == "RGBA" else image
    opaque.save(out, format="JPEG", quality=JPEG_QUALITY)
    return "JPEG", out.getvalue()


def make_thumbnails(data: bytes, sizes: Iterable[int], *, max_pixels: int) -> list[Thumb]:
    """Thumbnails of the image in `data`, one per size (the longest side), smallest first.

    EXIF orientation is applied, metadata (EXIF, ICC after converting to sRGB, comments) is
    dropped, the aspect ratio is kept and an image is never upscaled. Raises `ImageError`.
    """
    wanted = sorted({int(size) for size in sizes}, reverse=True)
    if not wanted or wanted[-1] < 1:
        raise ValueError("sizes must be positive integers")
    current, (width, height) = _decode(data, largest=wanted[0], max_pixels=max_pixels)
    thumbs = []
    for size in wanted:
        # Dimensions from the original's, so chaining never adds up rounding errors.
        target = fit(width, height, size)
        if target != current.size:
            # reducing_gap: a fast box reduction first, then Lanczos on the last factor of 2.
            current = current.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
        fmt, encoded = _encode(current)
        thumbs.append(Thumb(size=size, width=current.width, height=current.height, format=fmt, data=encoded))
    thumbs.reverse()
    return thumbs
