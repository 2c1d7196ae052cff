"""What a PNG or JPEG header says, read without decoding: the kind of image and its size.

The one header parser: the upload checks (``lipsync.inputs.check_image``) and the
decompression-bomb limit of ``lipsync.media.video.decode_image`` both read sizes with it,
before any decoder sees the bytes.
"""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"  # start of image
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the size.
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_SOS = 0xDA  # start of scan: image data follows


def sniff_image(data: bytes) -> str | None:
    """``png`` or ``jpeg`` from the file's first bytes, else None."""
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SOI + b"\xff":
        return "jpeg"
    return None


def image_size(data: bytes, *, tolerant: bool = False) -> tuple[int, int] | None:
    """(width, height) in pixels from a PNG's IHDR chunk or a JPEG's frame (SOF) header, without decoding.

    None when ``data`` is neither kind (see ``sniff_image``), or its header is truncated or
    malformed. ``tolerant`` reads a JPEG as libjpeg does: it may start ``FF D8`` without a
    marker right after, and stray bytes between segments are skipped, so the size of every
    JPEG a decoder would still decode is found (for a pixel limit checked before decoding).
    Otherwise such a file is malformed: None.
    """
    if data[:8] == PNG_SIGNATURE:
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if sniff_image(data) == "jpeg" or (tolerant and data[:2] == JPEG_SOI):
        return _jpeg_size(data, tolerant)
    return None


def _jpeg_size(data: bytes, tolerant: bool) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, walking the segments after the SOI.

    Tolerant, it skips what libjpeg's marker reader skips: bytes other than FF before a
    marker, FF 00 pairs, and nothing but the length of a segment whose length is under 2."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            if not tolerant:
                return None  # a marker was expected here: not a well-formed JPEG
            i += 1  # a stray byte
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x00 and tolerant:  # a stuffed zero outside image data: stray bytes
            i += 2
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == _SOS:  # image data before any frame header
            return None
        if length < 2:
            if not tolerant:
                return None
            length = 2
        i += 2 + length
    return None
