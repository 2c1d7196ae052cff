"""Checks of what a client sends, by content (never by file name), before any work.

* ``read_upload``: an uploaded file's bytes, within the upload limit.
* ``clean_text``: request text as the TTS may receive it.
* ``check_image``: an avatar upload is a PNG/JPEG within the pixel limit (header only).
* ``sniff_audio`` / ``normalize_recording``: a recording is a known audio container,
  decoded once with ffmpeg forced to that demuxer, cut at the duration limit and
  handed on as 16 kHz mono WAV.

Every refusal is an ``InvalidInputError`` (400) or ``PayloadTooLargeError`` (413) with a
stable code; the web layer answers them as JSON.
"""

from __future__ import annotations

import io
import os
import re
import wave
from typing import BinaryIO

from lipsync.media.audio import SAMPLE_RATE
from lipsync.errors import InvalidInputError, PayloadTooLargeError
from lipsync.media.ffmpeg import run_ffmpeg
from lipsync.media.images import image_size, sniff_image
from lipsync.settings import Settings
from lipsync.tempdirs import process_temp_dir

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def read_upload(stream: BinaryIO, limit: int, what: str, invalid_code: str) -> bytes:
    """The bytes of an uploaded file, read from ``stream`` up to ``limit`` bytes (+1 to tell).

    ``PayloadTooLargeError`` (``upload_too_large``) when it holds more than ``limit`` bytes,
    ``InvalidInputError`` with ``invalid_code`` when it is empty; ``what`` names the file
    in the message ("avatar image").
    """
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the {what} is larger than the limit of {limit} bytes", code="upload_too_large")
    if not data:
        raise InvalidInputError(f"the {what} is empty", code=invalid_code)
    return data


def clean_text(text):
    """Text as the TTS may receive it: control characters become spaces; lone surrogates
    (possible in JSON, not encodable as UTF-8) are refused. Non-strings pass through for
    the service's own ``invalid_text`` check."""
    if not isinstance(text, str):
        return text
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise InvalidInputError("'text' contains invalid Unicode (a lone surrogate)", code="invalid_text")
    return _CONTROL_CHARS.sub(" ", text)


def check_image(data: bytes, max_pixels: int) -> bytes:
    """``data`` if it is a PNG/JPEG whose header says at most ``max_pixels`` (width x height); else a 400."""
    kind = sniff_image(data)
    if kind is None:
        raise InvalidInputError("the avatar must be a PNG or JPEG image", code="invalid_image")
    size = image_size(data)
    if size is None or size[0] == 0 or size[1] == 0:
        raise InvalidInputError(f"the avatar is not a readable {kind.upper()} image", code="invalid_image")
    width, height = size
    if width * height > max_pixels:
        raise InvalidInputError(f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted",
                                code="image_too_large")
    return data


def sniff_audio(data: bytes) -> str | None:
    """The ffmpeg demuxer for an upload, from its first bytes; None for anything not audio/video we take."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # webm, mka, mkv
    if head[4:8] == b"ftyp":
        return "mov"       # mp4, m4a, mov, 3gp
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:6] == b"#!AMR\n":
        return "amr"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        if layer == 0 and head[1] & 0xF6 == 0xF0:
            return "aac"   # ADTS
        if layer != 0 and (head[1] >> 3) & 0x3 != 1 and len(head) >= 3 and head[2] >> 4 not in (0, 15):
            return "mp3"   # MPEG audio frame: valid version and bitrate index
    return None


def normalize_recording(data: bytes, settings: Settings, temp_root: str) -> bytes:
    """An upload as 16 kHz mono 16-bit WAV bytes, refusing what is not audio or lasts more than
    ``settings.max_audio_seconds`` before the render.

    The upload is written to a per-request folder under ``temp_root`` and decoded by ffmpeg
    (at most ``settings.ffmpeg_timeout`` s, 120 s at the most) with the sniffed demuxer.
    """
    demuxer = sniff_audio(data)
    if demuxer is None:
        raise InvalidInputError("the audio file is not in a supported format (WAV, MP3, AAC, OGG/Opus, FLAC, "
                                "M4A/MP4, WebM/MKV, AIFF, AMR)", code="invalid_audio")
    limit = settings.max_audio_seconds
    with process_temp_dir("up", temp_root) as tmp:
        path = os.path.join(tmp, "upload")
        with open(path, "wb") as f:
            f.write(data)
        # -f: the demuxer we sniffed, never ffmpeg's own guess (no playlists, no concat lists);
        # -t: stop decoding just past the limit.
        pcm = run_ffmpeg(["-protocol_whitelist", "file", "-f", demuxer, "-i", path, "-t", f"{limit + 0.1:.3f}",
                          "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le",
                          "-acodec", "pcm_s16le", "pipe:1"], timeout=min(settings.ffmpeg_timeout, 120.0),
                         error=lambda message: InvalidInputError(message, code="invalid_audio"),
                         what="could not decode the audio")
    samples = len(pcm) // 2
    if samples == 0:
        raise InvalidInputError("the audio contains no sound samples", code="invalid_audio")
    if samples > limit * SAMPLE_RATE:
        raise PayloadTooLargeError(f"the audio lasts more than {limit:.0f} s, the limit", code="audio_too_long")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm[: samples * 2])
    return out.getvalue()
