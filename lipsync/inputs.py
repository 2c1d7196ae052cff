"""Checks of what a client sends, by content (never by file name), before any work.

* ``check_service_loaded``: work is refused (503) when the service failed to load.
* ``check_upload`` / ``read_upload``: an uploaded file's bytes, within the upload limit.
* ``check_text`` / ``clean_text``: request text is a string, as the TTS may receive it.
* ``check_image``: an avatar upload is a PNG/JPEG within the pixel limit (header only).
* ``sniff_audio`` / ``normalize_recording``: a recording is a known audio container,
  decoded once with ffmpeg forced to that demuxer, cut at the duration limit and
  handed on as 16 kHz mono WAV.
* ``recording_samples``: the samples the pipeline renders from; that WAV is read as it
  is (no second ffmpeg pass), anything else (CLI, library) is decoded here.
* ``check_audio_length``: the one duration check of recordings (``MAX_AUDIO_SECONDS``).
* ``check_speech_estimate`` / ``check_speech_length``: the duration of speech synthesised
  from a text (``MAX_SPEECH_SECONDS``), estimated from the text before any work, then
  checked on what the TTS really produces, sentence by sentence.

Each check and each message lives here once; the server, the job queue and the service
all call these. Every refusal is an ``InvalidInputError`` (400) or ``PayloadTooLargeError``
(413) with a stable code; the web layer answers them as JSON.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from typing import BinaryIO

import numpy as np

from lipsync.errors import InvalidInputError, LipsyncError, PayloadTooLargeError
from lipsync.media.audio import SAMPLE_RATE, pcm_from_wav, pcm_wav
from lipsync.media.ffmpeg import run_ffmpeg
from lipsync.media.images import read_header, sniff_image
from lipsync.settings import Settings
from lipsync.tempdirs import process_temp_dir

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# An upload as messages name it, and the code of an invalid one.
RECORDING = ("audio file", "invalid_audio")
AVATAR = ("avatar image", "invalid_image")


def check_service_loaded(service) -> None:
    """Refuse work (503 ``not_ready``) when ``service`` failed to load; one still loading is fine
    (jobs wait for it). ``service`` is anything with ``status`` and ``error``."""
    if getattr(service, "status", "ready") == "error":
        raise LipsyncError(f"the service failed to load: {getattr(service, 'error', '')}",
                           code="not_ready", status=503)


def check_upload(data, limit: int, kind: tuple[str, str]) -> bytes:
    """``data`` when it is the bytes of a non-empty upload of at most ``limit`` bytes.

    ``kind`` is ``RECORDING`` or ``AVATAR``: what the messages call the file and the code
    of an invalid one. ``PayloadTooLargeError`` (``upload_too_large``) when larger than
    ``limit``, ``InvalidInputError`` when empty or not bytes.
    """
    what, invalid_code = kind
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(f"the {what} must be bytes", code=invalid_code)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the {what} is larger than the limit of {limit} bytes", code="upload_too_large")
    if len(data) == 0:
        raise InvalidInputError(f"the {what} is empty", code=invalid_code)
    return data


def read_upload(stream: BinaryIO, limit: int, kind: tuple[str, str]) -> bytes:
    """The bytes of an uploaded file, read from ``stream`` up to ``limit`` bytes (+1 to tell),
    checked by ``check_upload``."""
    return check_upload(stream.read(limit + 1), limit, kind)


def check_text(text) -> str:
    """``text`` when it is a string; else ``InvalidInputError`` (``invalid_text``)."""
    if not isinstance(text, str):
        raise InvalidInputError("'text' must be a string", code="invalid_text")
    return text


def clean_text(text) -> str:
    """Text as the TTS may receive it: control characters become spaces; a non-string
    (``check_text``) and lone surrogates (possible in JSON, not encodable as UTF-8) are refused."""
    check_text(text)
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise InvalidInputError("'text' contains invalid Unicode (a lone surrogate)", code="invalid_text")
    return _CONTROL_CHARS.sub(" ", text)


def check_image(data: bytes, max_pixels: int) -> bytes:
    """``data`` if it is a PNG/JPEG whose header says at most ``max_pixels`` (width x height); else a 400."""
    kind = sniff_image(data)
    if kind is None:
        raise InvalidInputError("the avatar must be a PNG or JPEG image", code="invalid_image")
    header = read_header(data, formats=(kind.upper(),))  # Pillow's names: PNG, JPEG
    if header is None:  # also a width or height of zero
        raise InvalidInputError(f"the avatar is not a readable {kind.upper()} image", code="invalid_image")
    width, height = header.width, header.height
    if width * height > max_pixels:
        raise InvalidInputError(f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted",
                                code="image_too_large")
    return data


# Speech seconds per character of a text, by the kind of character, for each voice: LOWER bounds,
# so that the estimate refuses a text early only when its speech is clearly too long (the real
# length is checked anyway, sentence by sentence, by ``check_speech_length``). Measured with the
# built-in espeak-ng voices (160 wpm) and set at about 3/4 of the least measured value:
#   letters, realistic ru/kk/en prose (6 paragraphs each, numbers and punctuation included):
#       per letter ru 0.069-0.103 s, kk 0.080-0.093 s, en 0.071-0.106 s
#       (per character, spaces and punctuation counted: ru 0.059-0.078, kk 0.070-0.077, en 0.062-0.078)
#   Cyrillic in the en voice (spelled letter by letter): 0.24-0.26 s per letter
#   digits 0-9 (years, phone numbers, 1,000,000,000 ... 20-digit runs): 0.11-0.65 s per digit
#   CJK ideographs and kana, each spelled out by name: 0.73-0.93 s (Chinese/Japanese sentences),
#       0.66-0.73 s (a run of 100 ideographs)
#   Hangul syllables 0.21-0.26 s; Arabic letters 0.53-0.89 s
# Anything else (spaces, punctuation, symbols, emoji, other scripts: several are not spoken at
# all) counts 0. Texts that read faster than these bounds exist only as garbage (one letter
# repeated: 0.018 s per letter), which at worst is refused early.
SPEECH_SECONDS_PER_CHAR: dict[str, dict[str, float]] = {
    "ru": {"latin": 0.05, "cyrillic": 0.05, "digit": 0.08, "ideograph": 0.5, "hangul": 0.15, "arabic": 0.4},
    "kk": {"latin": 0.058, "cyrillic": 0.058, "digit": 0.08, "ideograph": 0.5, "hangul": 0.15, "arabic": 0.4},
    "en": {"latin": 0.052, "cyrillic": 0.17, "digit": 0.08, "ideograph": 0.5, "hangul": 0.15, "arabic": 0.4},
}


@functools.lru_cache(maxsize=8192)
def _speech_class(ch: str) -> str | None:
    """The kind of character ``ch`` is for ``SPEECH_SECONDS_PER_CHAR``; None: counted as silent."""
    code = ord(ch)
    if "0" <= ch <= "9":
        return "digit"
    if code < 0x250:
        return "latin" if ch.isalpha() else None
    if 0x400 <= code < 0x530:  # Cyrillic and its supplement (Kazakh letters included)
        return "cyrillic" if ch.isalpha() else None
    if 0x600 <= code < 0x700:
        return "arabic" if ch.isalpha() else None
    if (0x3040 <= code < 0x3100 or 0x31F0 <= code < 0x3200 or 0x3400 <= code < 0x4DC0
            or 0x4E00 <= code < 0xA000 or 0xF900 <= code < 0xFB00 or 0xFF66 <= code < 0xFFA0
            or 0x20000 <= code < 0x40000):  # kana, CJK ideographs (extensions, compatibility)
        return "ideograph"
    if 0xAC00 <= code < 0xD7B0:
        return "hangul"
    return None


def estimate_speech_seconds(text: str, language: str) -> float:
    """A lower bound of how long ``text`` lasts when spoken in ``language`` (``ru``, ``kk``, ``en``)."""
    rates = SPEECH_SECONDS_PER_CHAR[language]
    counts = Counter(map(_speech_class, text))
    return sum(rates.get(kind, 0.0) * n for kind, n in counts.items() if kind is not None)


def check_speech_estimate(text: str, language: str, limit: float) -> None:
    """Refuse (413 ``speech_too_long``) a text whose speech would clearly last more than ``limit`` s,
    from the text alone (``estimate_speech_seconds``), before any work."""
    estimate = estimate_speech_seconds(text, language)
    if estimate > limit:
        raise PayloadTooLargeError(f"the text would be spoken for at least {estimate:.0f} s; the limit is "
                                   f"{limit:.0f} s", code="speech_too_long")


def check_speech_length(seconds: float, limit: float) -> None:
    """Refuse (413 ``speech_too_long``) once the speech synthesised so far lasts more than ``limit`` s."""
    if seconds > limit:
        raise PayloadTooLargeError(f"the text is spoken for more than {limit:.0f} s, the limit",
                                   code="speech_too_long")


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


# Decoding stops this far past MAX_AUDIO_SECONDS: enough to tell "too long" without decoding it all.
DECODE_PAST_LIMIT = 0.1  # s



def normalize_recording(data: bytes, settings: Settings, temp_root: str) -> bytes:
    """An upload as 16 kHz mono 16-bit WAV bytes, refusing what is not audio or lasts more than
    ``settings.max_audio_seconds`` before the render.

    The upload is written to a per-request folder under ``temp_root`` and decoded by ffmpeg
    (at most ``settings.ffmpeg_timeout`` s, 120 s at the most) with the sniffed demuxer.
    ``recording_samples`` reads the result without decoding it again.
    """
    demuxer = sniff_audio(data)
    if demuxer is None:
        raise InvalidInputError("the audio file is not in a supported format (WAV, MP3, AAC, OGG/Opus, FLAC, "
                                "M4A/MP4, WebM/MKV, AIFF, AMR)", code="invalid_audio")
    return pcm_wav(_decode(data, demuxer, settings, temp_root))


def recording_samples(data: bytes, settings: Settings, temp_root: str) -> np.ndarray:
    """A recording given to the pipeline as 16 kHz mono float32 samples in [-1, 1].

    ``normalize_recording``'s WAV (what the server hands on) is read as it is: the upload
    is decoded by ffmpeg once. Anything else (the CLI's or a library caller's file, any
    format ffmpeg reads) is decoded here with ffmpeg's own format detection. Either way
    the same upload and duration checks apply.
    """
    pcm = check_recording(data, settings)
    if pcm is None:
        pcm = _decode(data, None, settings, temp_root)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0


def check_recording(data, settings: Settings) -> bytes | None:
    """Check a recording before work: ``normalize_recording``'s WAV by its length (its size
    follows from that, and may exceed the upload limit that the compressed original met), any
    other file by the upload limit. Returns the WAV's 16-bit samples, or None for another file."""
    pcm = pcm_from_wav(data) if isinstance(data, (bytes, bytearray, memoryview)) else None
    if pcm is None:
        check_upload(data, settings.max_upload_bytes, RECORDING)
        return None
    check_audio_length(len(pcm) // 2, settings.max_audio_seconds)
    return pcm


def check_audio_length(samples: int, limit: float) -> None:
    """Refuse ``samples`` (16 kHz) that hold no sound (400) or last more than ``limit`` s (413)."""
    if samples == 0:
        raise InvalidInputError("the audio contains no sound samples", code="invalid_audio")
    if samples > limit * SAMPLE_RATE:
        raise PayloadTooLargeError(f"the audio lasts more than {limit:.0f} s, the limit", code="audio_too_long")


def _decode(data: bytes, demuxer: str | None, settings: Settings, temp_root: str) -> bytes:
    """``data`` decoded by ffmpeg to 16 kHz mono s16le PCM, cut just past ``max_audio_seconds``
    and checked by ``check_audio_length``. ``demuxer``: the sniffed one (an upload: never
    ffmpeg's own guess, so no playlists or concat lists), None to let ffmpeg detect it."""
    limit = settings.max_audio_seconds
    forced = ["-f", demuxer] if demuxer else []
    with process_temp_dir("up", temp_root) as tmp:
        # a file, not a pipe: MP4/M4A keep their index at the end and need a seekable input
        path = os.path.join(tmp, "upload")
        with open(path, "wb") as f:
            f.write(data)
        pcm = run_ffmpeg(["-protocol_whitelist", "file", *forced, "-i", path,
                          "-t", f"{limit + DECODE_PAST_LIMIT:.3f}",
                          "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le",
                          "-acodec", "pcm_s16le", "pipe:1"], timeout=min(settings.ffmpeg_timeout, 120.0),
                         error=lambda message: InvalidInputError(message, code="invalid_audio"),
                         what="could not decode the audio")
    samples = len(pcm) // 2
    check_audio_length(samples, limit)
    return pcm[: samples * 2]
