"""What an image file's header says, read by Pillow without decoding: its format and size.

The one header reader: the upload check (``lipsync.inputs.check_image``) and the
decompression-bomb limit of ``lipsync.media.video.decode_image`` both read sizes with it,
before any decoder sees the bytes. Pillow's plugins parse a header when a file is opened
and decode only on ``load()``, which is never called here. Its JPEG reader skips what
libjpeg's marker reader skips (stray bytes between segments, fill bytes, ``FF 00``), so a
JPEG that libjpeg would still decode has its size read too: a bomb cannot hide behind a
byte of junk.

Pillow's own decompression-bomb check is a process-wide global (``PIL.Image.MAX_IMAGE_PIXELS``:
a warning above about 89 megapixels, ``DecompressionBombError`` above twice that) applied by
``Image.open``. Our limit is a setting (``max_image_pixels``) that the callers compare with
the size read here, so headers are read through the plugins ``Image.open`` would use, minus
that global check: it is neither relied on nor changed, and a header beyond Pillow's limit
still gives its width and height for the error message.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import NamedTuple

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # start of image, then the first marker
_FIRST = ("PNG", "JPEG")  # tried first when any format goes: what avatars nearly always are


class ImageHeader(NamedTuple):
    """An image's format (Pillow's name: ``PNG``, ``JPEG``, ``MPO`` for a camera JPEG with
    more frames after the first, ``WEBP``...) and its size in pixels (> 0 for PNG and JPEG)."""

    format: str
    width: int
    height: int


def sniff_image(data: bytes) -> str | None:
    """``png`` or ``jpeg`` from the file's signature (its first bytes), else None."""
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SIGNATURE:
        return "jpeg"
    return None


def read_header(data: bytes, formats: Iterable[str] | None = None) -> ImageHeader | None:
    """Format and size of the image in ``data`` from its header alone, without decoding.

    ``formats`` (Pillow's names, e.g. ``("PNG",)``) limits what ``data`` may be; by default any
    format Pillow reads. None when no plugin reads the header: not an image, a format Pillow
    lacks, a truncated or malformed header, a PNG or JPEG of size zero. The caller checks the size
    against its limit: Pillow's global limit is not applied (see the module docstring).
    """
    Image.init()  # registers every plugin (imports them on the first call only)
    names = formats if formats is not None else _FIRST + tuple(n for n in Image.ID if n not in _FIRST)
    prefix = bytes(data[:16])
    fp = io.BytesIO(data)
    for name in names:
        # What Image.open does for each format, without its _decompression_bomb_check.
        factory, accept = Image.OPEN.get(name.upper(), (None, None))
        if factory is None:
            continue
        try:
            if accept is not None:
                claimed = accept(prefix)
                if not claimed or isinstance(claimed, str):  # a string: "this format, but unsupported"
                    continue
            fp.seek(0)
            with factory(fp, "") as image:
                return ImageHeader(image.format, image.size[0], image.size[1])
        except Exception:  # noqa: BLE001 - this plugin cannot read it (Image.open moves on too)
            continue
    return None
