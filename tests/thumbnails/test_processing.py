"""The pure processing module, with real images of every kind it must handle."""

from __future__ import annotations

import pytest

from tests.thumbnails import images
from thumbnails import processing

SIZES = [128, 256, 512]
MAX = 50_000_000


def thumbs_by_size(data: bytes, sizes=SIZES) -> dict[int, processing.Thumb]:
    return {t.size: t for t in processing.make_thumbnails(data, sizes, max_pixels=MAX)}


def test_jpeg_keeps_aspect_with_longest_side_equal_to_size():
    thumbs = thumbs_by_size(images.jpeg((1200, 800)))
    assert [(t.size, t.width, t.height, t.format) for t in thumbs.values()] == [
        (128, 128, 85, "JPEG"),
        (256, 256, 171, "JPEG"),
        (512, 512, 341, "JPEG"),
    ]
    for thumb in thumbs.values():
        image = images.open_bytes(thumb.data)
        assert image.format == "JPEG"
        assert image.size == (thumb.width, thumb.height)
        assert images.close_to(image.getpixel((thumb.width // 2, 5)), images.RED)
        assert images.close_to(image.getpixel((thumb.width // 2, thumb.height - 5)), images.BLUE)


def test_returns_smallest_first_whatever_order_sizes_come_in():
    thumbs = processing.make_thumbnails(images.jpeg(), [512, 128, 256, 128], max_pixels=MAX)
    assert [t.size for t in thumbs] == [128, 256, 512]


def test_large_jpeg_uses_draft_decoding_and_keeps_exact_sizes():
    thumbs = thumbs_by_size(images.jpeg((4000, 3000)))
    assert {s: (t.width, t.height) for s, t in thumbs.items()} == {128: (128, 96), 256: (256, 192), 512: (512, 384)}


def test_never_upscales():
    thumbs = thumbs_by_size(images.jpeg((300, 100)))
    assert (thumbs[128].width, thumbs[128].height) == (128, 43)
    assert (thumbs[256].width, thumbs[256].height) == (256, 85)
    assert (thumbs[512].width, thumbs[512].height) == (300, 100)
    assert images.open_bytes(thumbs[512].data).size == (300, 100)


def test_exif_orientation_is_applied_and_metadata_stripped():
    data = images.jpeg_rotated((1200, 800), orientation=6)
    assert processing.inspect(data, max_pixels=MAX) == processing.ImageInfo("JPEG", 800, 1200)
    thumb = thumbs_by_size(data)[256]
    assert (thumb.width, thumb.height) == (171, 256)
    image = images.open_bytes(thumb.data)
    assert image.size == (171, 256)
    # Red was on top of the stored pixels; turned a quarter clockwise it is on the right.
    assert images.close_to(image.getpixel((thumb.width - 5, thumb.height // 2)), images.RED)
    assert images.close_to(image.getpixel((5, thumb.height // 2)), images.BLUE)
    assert dict(image.getexif()) == {}
    assert "exif" not in image.info
    assert "icc_profile" not in image.info


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_of_png_and_webp(fmt):
    from PIL import Image

    exif = Image.Exif()
    exif[images.ORIENTATION] = 6
    data = images.encode(images.halves((600, 400)), fmt, exif=exif.tobytes())
    thumb = thumbs_by_size(data)[128]
    image = images.open_bytes(thumb.data)
    assert image.size == (85, 128)
    assert images.close_to(image.getpixel((80, 64)), images.RED)
    assert images.close_to(image.getpixel((4, 64)), images.BLUE)


def test_jpeg_comment_and_icc_profile_are_not_copied():
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = images.encode(images.halves((800, 600)), "JPEG", comment=b"secret place", icc_profile=icc)
    image = images.open_bytes(thumbs_by_size(data)[128].data)
    assert "comment" not in image.info
    assert "icc_profile" not in image.info
    assert images.close_to(image.getpixel((64, 3)), images.RED)


def test_cmyk_jpeg_becomes_rgb_with_its_colours():
    thumb = thumbs_by_size(images.jpeg_cmyk((1000, 700)))[256]
    image = images.open_bytes(thumb.data)
    assert thumb.format == "JPEG"
    assert image.mode == "RGB"
    assert (thumb.width, thumb.height) == (256, 179)
    assert images.close_to(image.getpixel((128, 5)), (255, 0, 0), tolerance=60)
    assert images.close_to(image.getpixel((128, 170)), (0, 0, 255), tolerance=60)


def test_png_with_alpha_stays_png_with_transparency():
    thumb = thumbs_by_size(images.png_alpha((900, 600)))[512]
    image = images.open_bytes(thumb.data)
    assert thumb.format == "PNG"
    assert image.format == "PNG"
    assert image.mode == "RGBA"
    assert (image.width, image.height) == (512, 341)
    assert image.getpixel((256, 5))[3] == 255
    assert image.getpixel((256, 335))[3] == 0


def test_opaque_rgba_png_becomes_jpeg():
    data = images.encode(
        images.halves((600, 400), top=(*images.RED, 255), bottom=(*images.BLUE, 255), mode="RGBA"), "PNG"
    )
    thumb = thumbs_by_size(data)[128]
    assert thumb.format == "JPEG"
    assert images.open_bytes(thumb.data).mode == "RGB"


def test_palette_png_with_transparency():
    thumb = thumbs_by_size(images.png_palette_transparent((600, 400)))[256]
    image = images.open_bytes(thumb.data)
    assert thumb.format == "PNG"
    assert image.mode == "RGBA"
    assert images.close_to(image.getpixel((128, 5)), (*images.RED, 255))
    assert image.getpixel((128, 165))[3] == 0


def test_sixteen_bit_png_is_scaled_not_clipped():
    thumb = thumbs_by_size(images.png_16bit((600, 400), value=32768))[128]
    image = images.open_bytes(thumb.data)
    assert thumb.format == "JPEG"
    assert (image.width, image.height) == (128, 85)
    value = image.getpixel((64, 40))
    assert 118 <= value <= 138, value  # half intensity, not white


def test_webp():
    thumb = thumbs_by_size(images.webp((1000, 600)))[512]
    image = images.open_bytes(thumb.data)
    assert (image.width, image.height) == (512, 307)
    assert images.close_to(image.getpixel((256, 5)), images.RED)


def test_animated_gif_gives_its_first_frame():
    data = images.gif_animated((400, 300))
    assert processing.inspect(data, max_pixels=MAX).format == "GIF"
    thumb = thumbs_by_size(data)[128]
    image = images.open_bytes(thumb.data)
    assert (image.width, image.height) == (128, 96)
    assert images.close_to(image.convert("RGB").getpixel((64, 48)), images.RED)


@pytest.mark.parametrize(
    ("data", "fmt", "size"),
    [
        (images.jpeg((640, 480)), "JPEG", (640, 480)),
        (images.png_alpha((300, 200)), "PNG", (300, 200)),
        (images.webp((320, 240)), "WEBP", (320, 240)),
        (images.gif_animated((50, 40)), "GIF", (50, 40)),
    ],
)
def test_inspect_reads_format_from_content(data, fmt, size):
    info = processing.inspect(data, max_pixels=MAX)
    assert (info.format, (info.width, info.height)) == (fmt, size)
    assert info.extension == processing.EXTENSIONS[fmt]


def test_inspect_refuses_what_is_not_an_image():
    with pytest.raises(processing.NotAnImage):
        processing.inspect(b"GIF89a but really a text file", max_pixels=MAX)
    with pytest.raises(processing.NotAnImage):
        processing.inspect(b"", max_pixels=MAX)


def test_inspect_refuses_other_image_formats():
    with pytest.raises(processing.UnsupportedFormat, match="BMP"):
        processing.inspect(images.bmp(), max_pixels=MAX)
    with pytest.raises(processing.UnsupportedFormat, match="TIFF"):
        processing.inspect(images.encode(images.halves((10, 10)), "TIFF"), max_pixels=MAX)


def test_decompression_bomb_is_refused_before_decoding():
    data = images.jpeg((400, 300))
    with pytest.raises(processing.TooManyPixels):
        processing.inspect(data, max_pixels=400 * 300 - 1)
    with pytest.raises(processing.TooManyPixels):
        processing.make_thumbnails(data, SIZES, max_pixels=1000)
    assert processing.inspect(data, max_pixels=400 * 300).width == 400


def test_huge_declared_size_is_refused_from_the_header():
    # A PNG header that claims 100000 x 100000 pixels: 10 billion, beyond Pillow's own bomb limit too.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(processing.TooManyPixels):
        processing.inspect(data, max_pixels=MAX)


def test_truncated_jpeg_passes_the_header_check_but_is_corrupt():
    data = images.truncated_jpeg()
    assert processing.inspect(data, max_pixels=MAX).format == "JPEG"
    with pytest.raises(processing.CorruptImage):
        processing.make_thumbnails(data, SIZES, max_pixels=MAX)


def test_truncated_png_is_corrupt():
    data = images.png_alpha()
    with pytest.raises(processing.CorruptImage):
        processing.make_thumbnails(data[: len(data) // 2], SIZES, max_pixels=MAX)


def test_sizes_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        processing.make_thumbnails(images.jpeg(), [], max_pixels=MAX)


@pytest.mark.parametrize(
    ("width", "height", "size", "expected"),
    [(4000, 3000, 512, (512, 384)), (3000, 4000, 512, (384, 512)), (100, 50, 512, (100, 50)), (5000, 1, 100, (100, 1))],
)
def test_fit(width, height, size, expected):
    assert processing.fit(width, height, size) == expected
