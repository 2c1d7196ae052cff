"""What every TTS provider returns, and the interface they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lipsync.errors import InvalidInputError

LANGUAGES = ("ru", "kk", "en")  # the voices: the page's select and the OpenAPI document list these
DEFAULT_LANGUAGE = "ru"  # an omitted `language` (the seed's clients always sent one)
AUTO = "auto"            # `language`: the voice follows the text (lipsync/tts/language.py)
LANGUAGE_CHOICES = (AUTO, *LANGUAGES)  # what a request's `language` may be


def validate_request(text: str, language: str, *, allow_mismatch: bool = True) -> tuple[str, str]:
    """Check a synthesis request; returns (text, language), the language one of ``LANGUAGES``.

    ``language`` is one of ``LANGUAGE_CHOICES`` in any case; ``"auto"`` is resolved from
    the text (``lipsync.tts.language.resolve_language``). Raises ``InvalidInputError`` with
    code ``unsupported_language``, ``empty_text`` or, only with ``allow_mismatch=False``,
    ``language_mismatch`` (an explicit language that does not fit the text's script).

    Shared by every provider, which speak what they are given: they call it with the
    default ``allow_mismatch=True``, since a request is checked as a whole (the service
    passes ``allow_mismatch=False`` unless the client asked otherwise) and one sentence of
    a Russian text may well be in Latin letters ("Wi-Fi.").
    """
    from lipsync.tts.language import normalize_language, resolve_language  # it imports this module

    lang = normalize_language(language)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("the text is empty", code="empty_text")
    return text, resolve_language(text, lang, allow_mismatch=allow_mismatch)


@dataclass(frozen=True)
class PhonemeEvent:
    """One phoneme of synthesised speech.

    ``start``/``end`` are seconds from the start of ``Speech.samples``;
    ``phoneme`` is the espeak-ng phoneme mnemonic (e.g. ``"a"``, ``"m"``,
    ``"_:"`` for a pause).
    """

    start: float
    end: float
    phoneme: str


@dataclass(frozen=True)
class Speech:
    """Mono speech at ``sample_rate`` Hz.

    ``samples``: float32 array of shape (n,), values in [-1, 1].
    ``phonemes``: the timeline reported by the synthesiser, empty when unknown
    (uploaded recordings, remote TTS).
    """

    samples: np.ndarray
    sample_rate: int = 16000
    phonemes: tuple[PhonemeEvent, ...] = field(default_factory=tuple)

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / float(self.sample_rate)


class TTSProvider(Protocol):
    """A speech synthesiser. Implementations must be safe to call from many threads."""

    name: str

    def synthesize(self, text: str, language: str) -> Speech:
        """Speak ``text`` in ``language`` (one of ``LANGUAGES``, or ``"auto"``) at 16 kHz mono.

        Raises ``lipsync.errors.TTSError`` (or ``TTSTimeoutError``) on failure.
        """
        ...
