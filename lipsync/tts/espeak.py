"""Offline speech synthesis with libespeak-ng, loaded through ctypes.

The library and its voice data come from the ``espeakng-loader`` wheel, so no
system package is needed. libespeak-ng keeps global state (one current voice,
one callback, one output buffer), so every call into it is serialised by the
module-level ``_LOCK`` and the library is initialised once per process, on
first use (``EspeakTTS.load()`` or the first synthesis).

Synthesis runs in ``AUDIO_OUTPUT_SYNCHRONOUS`` mode: ``espeak_Synth`` returns
when the whole text has been spoken, after calling our callback with chunks of
samples and with the phoneme events (``espeakINITIALIZE_PHONEME_EVENTS``). Each
event carries the output sample index at which its phoneme starts, which gives
the timeline in ``Speech.phonemes``.

Output is not bit-identical from call to call: espeak-ng's pitch "flutter"
keeps its phase between calls, so one text comes out a few samples longer or
shorter; phonemes, timing (within a millisecond) and loudness are the same.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from fractions import Fraction

import numpy as np

from lipsync.errors import InvalidInputError, TTSError
from lipsync.tts.base import PhonemeEvent, Speech, validate_request

log = logging.getLogger(__name__)

OUTPUT_RATE = 16000

# espeak-ng voice for each supported language; all three ship in the
# espeakng-loader data (lang/zle/ru, lang/trk/kk, lang/gmw/en-US) together
# with their pronunciation dictionaries (ru_dict, kk_dict, en_dict).
VOICES = {"ru": "ru", "kk": "kk", "en": "en-us"}

RATE_WPM = 160          # espeak's default is 175; a little slower reads more clearly
VOLUME = 90             # 0-200, espeak's default 100; a little lower keeps its own limiter idle
PEAK_DBFS = -1.0        # output is scaled so its loudest sample sits here
PAUSE = "_"             # phoneme name used for silence we add to the timeline (leading silence)

# --- speak_lib.h constants --------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000       # a short pause after the last sentence, so speech does not end abruptly
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_RATE = 1
_VOLUME = 2
_PUNCTUATION = 5
_CAPITALS = 6
_WORDGAP = 7
_EE_OK = 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """``espeak_EVENT`` from speak_lib.h."""

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int),  # milliseconds
                ("sample", ctypes.c_int),          # output sample index
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))

# One lock for every call into libespeak-ng, whichever EspeakTTS instance
# makes it: the library has a single global state per process.
_LOCK = threading.Lock()
_ENGINE: _Engine | None = None


def _after_fork_in_child() -> None:
    # A worker forked while another thread was synthesising would inherit a
    # held lock and block forever; the engine itself is plain memory (no
    # threads in synchronous mode) and stays usable in the child.
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Engine:
    """The initialised library. Only touched while ``_LOCK`` is held."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
            lib_path = espeakng_loader.get_library_path()
            data_path = espeakng_loader.get_data_path()
            lib = ctypes.CDLL(lib_path)
        except (ImportError, OSError, RuntimeError) as exc:
            raise TTSError(f"the built-in speech synthesiser is not available: {exc} "
                           "(install espeakng-loader)") from exc
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
                                     ctypes.c_void_p]
        # buflength 0: espeak's default chunk (60 ms per callback).
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(),
                                     _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise TTSError(f"the built-in speech synthesiser could not start (espeak-ng error {rate}, "
                           f"data in {data_path})")
        self.lib = lib
        self.sample_rate = rate
        self.voice: str | None = None
        self._chunks: list[bytes] = []
        self._events: list[tuple[int, str]] = []
        self._error: BaseException | None = None
        # Kept on the instance (which lives as long as the process) so the
        # C side never calls a garbage-collected trampoline.
        self._callback = _CALLBACK(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        log.info("espeak-ng initialised from %s, %d Hz", data_path, rate)

    def _on_synth(self, wav, n_samples, events) -> int:
        try:
            if n_samples > 0 and wav:
                self._chunks.append(ctypes.string_at(wav, n_samples * 2))
            i = 0
            while events[i].type != _EVENT_LIST_TERMINATED:
                event = events[i]
                if event.type == _EVENT_PHONEME:
                    raw = ctypes.string_at(ctypes.addressof(event.id), 8).split(b"\0", 1)[0]
                    self._events.append((event.sample, raw.decode("utf-8", "replace")))
                i += 1
            return 0
        except BaseException as exc:  # noqa: BLE001 - never let an exception cross into C
            self._error = exc
            return 1  # abort synthesis

    def set_voice(self, voice: str) -> None:
        if voice != self.voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                self.voice = None
                raise TTSError(f"the espeak-ng voice {voice!r} is missing from the installed voice data")
            self.voice = voice
        # Set every time: choosing a voice resets some of them.
        for parameter, value in ((_RATE, RATE_WPM), (_VOLUME, VOLUME), (_PUNCTUATION, 0),
                                 (_CAPITALS, 0), (_WORDGAP, 0)):
            self.lib.espeak_SetParameter(parameter, value, 0)

    def synth(self, text: str, voice: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Speak ``text``: (int16 samples at ``sample_rate``, [(start sample, phoneme)])."""
        self.set_voice(voice)
        self._chunks, self._events, self._error = [], [], None
        data = text.encode("utf-8") + b"\0"
        buffer = ctypes.create_string_buffer(data, len(data))
        try:
            # No espeakSSML and no espeakPHONEMES: "<b>", "&amp;" and "[[...]]"
            # in user text are read as plain text, never as markup.
            status = self.lib.espeak_Synth(buffer, len(data), 0, _POS_CHARACTER, 0,
                                           _CHARS_UTF8 | _ENDPAUSE, None, None)
            if self._error is not None:
                raise TTSError(f"the built-in speech synthesiser failed: {self._error}")
            if status != _EE_OK:
                raise TTSError(f"the built-in speech synthesiser failed (espeak-ng error {status})")
            samples = np.frombuffer(b"".join(self._chunks), dtype=np.int16).copy()
            return samples, list(self._events)
        finally:
            self._chunks, self._events = [], []


def _engine() -> _Engine:
    """The process-wide engine; call with ``_LOCK`` held."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Engine()
    return _ENGINE


def is_pause(phoneme: str) -> bool:
    """True for espeak's silence phonemes (``_``, ``_:``, ``_!`` ...)."""
    return phoneme.startswith("_")


class EspeakTTS:
    """Speech from libespeak-ng: fast, offline, robotic but clearly articulated.

    Safe to use from many threads (calls are serialised). Output is 16 kHz
    mono float32 peaking at about -1 dBFS, with the phoneme timeline: events
    cover [0, duration] without gaps or overlaps; silences are events whose
    phoneme starts with ``_``. Stress marks (``'``, ``,``) are removed from
    the mnemonics, so ``"'oU"`` arrives as ``"oU"``.
    """

    name = "espeak"

    def __init__(self, voices: dict[str, str] | None = None) -> None:
        self.voices = {**VOICES, **(voices or {})}

    def load(self) -> EspeakTTS:
        """Initialise libespeak-ng and check every voice now, not on the first request.

        Raises ``TTSError`` when the library or a voice is missing.
        """
        with _LOCK:
            engine = _engine()
            for voice in self.voices.values():
                engine.set_voice(voice)
        import scipy.signal  # noqa: F401 - the resampler's ~1 s import belongs to start-up, not the first request
        return self

    def synthesize(self, text: str, language: str) -> Speech:
        text, language = validate_request(text, language)
        # A NUL byte would end the C string early; other control characters
        # are read as spaces by espeak.
        text = text.replace("\0", " ")
        with _LOCK:
            engine = _engine()
            native, events = engine.synth(text, self.voices[language])
            native_rate = engine.sample_rate
        return _to_speech(native, native_rate, events)


def _to_speech(native: np.ndarray, native_rate: int, events: list[tuple[int, str]]) -> Speech:
    if native.size == 0 or not np.any(native):
        raise InvalidInputError("the text contains nothing that can be spoken", code="empty_text")
    samples = native.astype(np.float32) / 32768.0
    if native_rate != OUTPUT_RATE:
        from scipy.signal import resample_poly  # not at module import (~1 s): load() pays it at start-up

        ratio = Fraction(OUTPUT_RATE, native_rate)
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    peak = float(np.max(np.abs(samples)))
    if peak > 0:
        samples *= np.float32(10.0 ** (PEAK_DBFS / 20.0) / peak)
    samples = np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)
    duration = samples.size / OUTPUT_RATE
    return Speech(samples=samples, sample_rate=OUTPUT_RATE,
                  phonemes=_timeline(events, native_rate, duration))


def _timeline(events: list[tuple[int, str]], native_rate: int, duration: float) -> tuple[PhonemeEvent, ...]:
    """Start-sample events -> contiguous PhonemeEvents covering [0, duration].

    Each phoneme lasts until the next one starts; the last until the end.
    Silence before the first phoneme and language-switch markers become
    ``_`` events; zero-length events are dropped and consecutive pauses are
    merged into one (keeping the first one's name).
    """
    starts: list[tuple[float, str]] = []
    for sample, phoneme in sorted(events, key=lambda e: e[0]):  # stable: keeps espeak's order on ties
        name = phoneme.lstrip("',")
        if not name:
            continue
        if name.startswith("(") and name.endswith(")"):
            # "(en)", "(ru)": espeak switching language for a foreign word;
            # the stretch it marks is silent.
            name = PAUSE
        start = min(max(sample / native_rate, 0.0), duration)
        starts.append((start, name))
    if not starts or starts[0][0] > 0.0:
        starts.insert(0, (0.0, PAUSE))
    timeline: list[PhonemeEvent] = []
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else duration
        if end - start <= 1e-9:
            continue
        if timeline and is_pause(name) and is_pause(timeline[-1].phoneme):
            timeline[-1] = PhonemeEvent(timeline[-1].start, end, timeline[-1].phoneme)
            continue
        timeline.append(PhonemeEvent(start, end, name))
    return tuple(timeline)


__all__ = ["EspeakTTS", "VOICES", "validate_request", "is_pause"]
