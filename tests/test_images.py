"""Image headers read by Pillow (lipsync.media.images) and the size limits built on them:
the upload check (``check_image``) and ``decode_image``'s decompression-bomb limit.

A bomb is a small file whose header declares a huge image. Each is crafted from a real
image with its declared size patched (checksums kept valid), and must be refused from
the header alone: the tests make any decoding fail loudly.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from lipsync.errors import InvalidInputError
from lipsync.inputs import check_image
from lipsync.media import video
from lipsync.media.images import ImageHeader, read_header, sniff_image

LIMIT = 40_000_000  # the default max_image_pixels
_IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3)).astype(np.uint8)  # 64x48


def _encoded(ext: str) -> bytes:
    return cv2.imencode(ext, _IMAGE)[1].tobytes()


def _png_declaring(width: int, height: int) -> bytes:
    png = bytearray(_encoded(".png"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(png[12:29]))  # IHDR's checksum, as a real bomb has it
    return bytes(png)


def _sof(jpeg: bytes) -> int:
    return jpeg.index(b"\xff\xc0")  # cv2 writes baseline JPEGs: one SOF0


def _jpeg_declaring(width: int, height: int, before_sof: bytes = b"") -> bytes:
    """A real JPEG whose frame header says ``width`` x ``height``; ``before_sof`` is inserted just
    before that header (stray bytes libjpeg skips with a warning)."""
    jpeg = bytearray(_encoded(".jpg"))
    i = _sof(jpeg)
    jpeg[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg[:i]) + before_sof + bytes(jpeg[i:])


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding, by OpenCV or Pillow, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ------------------------------------------------------------------ reading headers
@pytest.mark.parametrize("ext,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".bmp", "BMP"), (".tiff", "TIFF"),
                                     (".webp", "WEBP"), (".ppm", "PPM")])
def test_headers_give_format_and_size_without_decoding(ext, fmt, no_decoding):
    assert read_header(_encoded(ext)) == ImageHeader(fmt, 64, 48)


def test_formats_restrict_what_is_read():
    png = _encoded(".png")
    assert read_header(png, formats=("PNG",)) == ("PNG", 64, 48)
    assert read_header(png, formats=("JPEG",)) is None
    assert sniff_image(png) == "png" and sniff_image(_encoded(".jpg")) == "jpeg"
    assert sniff_image(_encoded(".bmp")) is None and sniff_image(b"") is None


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"just text, not an image",
                                  _png_declaring(0, 48), _jpeg_declaring(0, 0)])
def test_unreadable_headers_are_none(data):
    assert read_header(data) is None


def test_a_header_with_a_bad_checksum_is_not_read():
    png = bytearray(_png_declaring(20000, 20000))
    png[32] ^= 1
    assert read_header(bytes(png)) is None  # libpng refuses it too ("IHDR: CRC error")


def test_memoryview_input_is_read():
    assert read_header(memoryview(_encoded(".jpg"))) == ("JPEG", 64, 48)


# ------------------------------------------------------------------ Pillow's own bomb limit
def test_pillows_global_limit_is_neither_relied_on_nor_changed(monkeypatch, no_decoding):
    default = Image.MAX_IMAGE_PIXELS
    bomb = _png_declaring(20000, 20000)  # 400 MP: over twice Pillow's limit, Image.open raises
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a DecompressionBombWarning
        assert read_header(bomb) == ("PNG", 20000, 20000)
        # our limit is a setting: a generous one lets it through the header check
        assert check_image(bomb, 500_000_000) == bomb
    assert Image.MAX_IMAGE_PIXELS == default
    # ... and a strict Pillow limit does not get in the way either
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_header(_encoded(".png")) == ("PNG", 64, 48)
    assert check_image(_encoded(".jpg"), LIMIT)


# ------------------------------------------------------------------ the upload check
def test_upload_check_accepts_png_and_jpeg_only():
    for ext in (".png", ".jpg"):
        data = _encoded(ext)
        assert check_image(data, LIMIT) is data
    for data in (_encoded(".bmp"), _encoded(".webp"), b"GIF89a" + b"\0" * 100):
        with pytest.raises(InvalidInputError) as err:
            check_image(data, LIMIT)
        assert err.value.code == "invalid_image" and err.value.message == "the avatar must be a PNG or JPEG image"


@pytest.mark.parametrize("data,kind", [(b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "PNG"), (_png_declaring(64, 0), "PNG"),
                                       (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9",
                                        "JPEG")])
def test_upload_check_refuses_unreadable_headers(data, kind):
    with pytest.raises(InvalidInputError) as err:
        check_image(data, LIMIT)
    assert err.value.code == "invalid_image" and err.value.message == f"the avatar is not a readable {kind} image"


@pytest.mark.parametrize("bomb", [_png_declaring(20000, 20000), _jpeg_declaring(20000, 20000),
                                  _jpeg_declaring(20000, 20000, before_sof=b"\x42")],
                         ids=["png", "jpeg", "jpeg-stray-byte"])
def test_upload_check_refuses_bombs_from_the_header(bomb, no_decoding):
    with pytest.raises(InvalidInputError) as err:
        check_image(bomb, LIMIT)
    assert err.value.code == "image_too_large"
    assert err.value.message == "the image is 20000x20000 pixels; at most 40,000,000 pixels are accepted"
    assert check_image(_png_declaring(6000, 6000), 36_000_000)  # the limit itself is accepted


# ------------------------------------------------------------------ decode_image
@pytest.mark.parametrize("junk", [b"\x42", b"\x00\x13\x37", b"\xff\xff\xff", b"\xff\x00", b"\x42\xff\x00\x17"])
def test_stray_bytes_before_the_frame_header_do_not_hide_a_bomb(junk, monkeypatch):
    # libjpeg skips them ("Corrupt JPEG data: N extraneous bytes before marker") and decodes...
    image = video.decode_image(_jpeg_declaring(64, 48, before_sof=junk))
    assert image.shape == (48, 64, 3)
    # ... so the size behind them is what counts
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("the bomb was decoded"))
    with pytest.raises(InvalidInputError) as err:
        video.decode_image(_jpeg_declaring(20000, 20000, before_sof=junk))
    assert err.value.code == "image_too_large" and "20000x20000" in err.value.message


def _bmp_declaring(width: int, height: int) -> bytes:
    bmp = bytearray(_encoded(".bmp"))
    bmp[18:26] = struct.pack("<ii", width, height)
    return bytes(bmp)


@pytest.mark.parametrize("bomb", [_png_declaring(20000, 20000), _jpeg_declaring(20000, 20000),
                                  _bmp_declaring(20000, 20000), b"P6\n20000 20000\n255\n" + b"\0" * 64],
                         ids=["png", "jpeg", "bmp", "ppm"])
def test_decode_image_refuses_bombs_of_any_format_before_decoding(bomb, no_decoding):
    with pytest.raises(InvalidInputError) as err:
        video.decode_image(bomb)
    assert err.value.code == "image_too_large"
    assert err.value.message == "the image is 20000x20000 pixels; at most 40 megapixels are accepted"


def test_two_frame_headers_never_let_a_large_one_decode():
    small = _encoded(".jpg")
    i = _sof(small)
    sof = small[i:i + 2 + int.from_bytes(small[i + 2:i + 4], "big")]
    big = bytearray(sof)
    big[5:9] = struct.pack(">HH", 20000, 20000)
    # Pillow reads the last frame header, libjpeg refuses a second one: refused either way.
    for data in (small[:i] + bytes(big) + small[i:], small[:i] + sof + bytes(big) + small[i + len(sof):]):
        with pytest.raises(InvalidInputError) as err:
            video.decode_image(data)
        assert err.value.code in ("image_too_large", "invalid_image")


def test_what_has_no_readable_header_is_not_decoded(no_decoding):
    # OpenCV decodes these float formats, but Pillow cannot read their size: it could be a bomb.
    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 20000 +X 20000\n" + b"\0" * 64
    pfm = b"PF\n20000 20000\n-1\n" + b"\0" * 64
    for data in (hdr, pfm, b"\x89PNG\r\n\x1a\n" + b"\0" * 10):
        with pytest.raises(InvalidInputError) as err:
            video.decode_image(data)
        assert err.value.code == "invalid_image" and err.value.message == "the file is not a readable image"


def test_decode_image_keeps_its_pixels():
    assert np.array_equal(video.decode_image(_encoded(".png")), _IMAGE)
    assert np.array_equal(video.decode_image(_encoded(".bmp")), _IMAGE)
    jpeg = _encoded(".jpg")
    assert np.array_equal(video.decode_image(jpeg), cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR))
